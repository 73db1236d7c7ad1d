//! IDX file reader (the MNIST container format), gzip or raw, validated before any large
//! allocation.
//!
//! Layout: two zero bytes, a type byte (0x08 = unsigned byte, the only type image data sets
//! use), the number of dimensions, then each dimension as a big-endian u32, then the data in
//! row-major order. Written by hand because the format is 20 lines of spec and no maintained
//! crate validates it the way a training tool must (clear errors, no huge allocation on a
//! hostile header, no trailing garbage).

use std::io::Read;
use std::path::Path;

use flate2::read::GzDecoder;
use thiserror::Error;

/// The largest IDX payload accepted (4 GiB): far above any image data set this tool trains on,
/// and a guard against allocating from a corrupt or hostile header.
pub const MAX_PAYLOAD_BYTES: u64 = 4 << 30;

const UNSIGNED_BYTE: u8 = 0x08;

/// What is wrong with an IDX file.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum IdxError {
    #[error("cannot read: {0}")]
    Io(String),
    #[error("file is shorter than its {0}-byte header")]
    TruncatedHeader(usize),
    #[error("bad magic number {magic:#010x}: the first two bytes must be zero")]
    BadMagic { magic: u32 },
    #[error("element type {0:#04x} is not supported (only 0x08, unsigned byte)")]
    UnsupportedType(u8),
    #[error("expected {expected} dimensions, the header says {found}")]
    WrongRank { expected: usize, found: usize },
    #[error("dimension {index} is zero")]
    ZeroDimension { index: usize },
    #[error("dimensions {dims:?} describe {bytes} bytes, over the {MAX_PAYLOAD_BYTES}-byte limit")]
    TooLarge { dims: Vec<u32>, bytes: u64 },
    #[error("truncated: the header promises {expected} data bytes, the file has {found}")]
    TruncatedData { expected: u64, found: u64 },
    #[error("{0} unexpected bytes after the data")]
    TrailingData(u64),
}

/// A decoded IDX array of unsigned bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Read an IDX file of `rank` dimensions, transparently gunzipping `*.gz` (detected by the gzip
/// magic bytes, not the name).
pub fn read_idx_file(path: &Path, rank: usize) -> anyhow::Result<IdxArray> {
    let bytes =
        std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), IdxError::Io(e.to_string())))?;
    parse_idx(&bytes, rank).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Parse IDX bytes (gzip or raw). The header is validated before the payload is allocated.
pub fn parse_idx(bytes: &[u8], rank: usize) -> Result<IdxArray, IdxError> {
    if bytes.starts_with(&[0x1f, 0x8b]) { parse_stream(GzDecoder::new(bytes), rank) } else { parse_stream(bytes, rank) }
}

fn parse_stream(mut reader: impl Read, rank: usize) -> Result<IdxArray, IdxError> {
    let mut magic = [0u8; 4];
    read_header(&mut reader, &mut magic, 4)?;
    if magic[0] != 0 || magic[1] != 0 {
        return Err(IdxError::BadMagic { magic: u32::from_be_bytes(magic) });
    }
    if magic[2] != UNSIGNED_BYTE {
        return Err(IdxError::UnsupportedType(magic[2]));
    }
    let found_rank = magic[3] as usize;
    if found_rank != rank {
        return Err(IdxError::WrongRank { expected: rank, found: found_rank });
    }
    let header_len = 4 + 4 * rank;
    let mut dim_bytes = vec![0u8; 4 * rank];
    read_header(&mut reader, &mut dim_bytes, header_len)?;
    let dims: Vec<u32> = dim_bytes.chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]])).collect();
    if let Some(index) = dims.iter().position(|&d| d == 0) {
        return Err(IdxError::ZeroDimension { index });
    }
    // u64 products of at most 255 u32 factors can overflow; saturate and compare to the limit.
    let bytes = dims.iter().fold(1u64, |acc, &d| acc.saturating_mul(d as u64));
    if bytes > MAX_PAYLOAD_BYTES {
        return Err(IdxError::TooLarge { dims, bytes });
    }
    // Read at most one byte more than promised: enough to detect trailing data without letting
    // a gzip bomb grow the buffer.
    let mut data = Vec::with_capacity(bytes as usize);
    let read = (&mut reader).take(bytes + 1).read_to_end(&mut data).map_err(|e| IdxError::Io(e.to_string()))? as u64;
    if read < bytes {
        return Err(IdxError::TruncatedData { expected: bytes, found: read });
    }
    if read > bytes {
        let rest = std::io::copy(&mut reader, &mut std::io::sink()).unwrap_or(0);
        return Err(IdxError::TrailingData(read - bytes + rest));
    }
    Ok(IdxArray { dims: dims.into_iter().map(|d| d as usize).collect(), data })
}

fn read_header(reader: &mut impl Read, buf: &mut [u8], header_len: usize) -> Result<(), IdxError> {
    reader.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => IdxError::TruncatedHeader(header_len),
        _ => IdxError::Io(e.to_string()),
    })
}

/// Encode an unsigned-byte IDX array (used by tests and to write small fixtures).
pub fn encode_idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, UNSIGNED_BYTE, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reads_raw_and_gzip_alike() {
        let raw = encode_idx(&[2, 3], &[1, 2, 3, 4, 5, 6]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &raw).unwrap();
        let gz = gz.finish().unwrap();
        let a = parse_idx(&raw, 2).unwrap();
        assert_eq!(a.dims, vec![2, 3]);
        assert_eq!(a.data, vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(parse_idx(&gz, 2).unwrap(), a);
    }

    #[test]
    fn rejects_each_kind_of_corruption() {
        let good = encode_idx(&[2, 2], &[0, 1, 2, 3]);
        assert_eq!(parse_idx(&good[..3], 2), Err(IdxError::TruncatedHeader(4)));
        assert_eq!(parse_idx(&good[..9], 2), Err(IdxError::TruncatedHeader(12)));
        let mut bad = good.clone();
        bad[0] = 7;
        assert!(matches!(parse_idx(&bad, 2), Err(IdxError::BadMagic { .. })));
        let mut bad = good.clone();
        bad[2] = 0x0D;
        assert_eq!(parse_idx(&bad, 2), Err(IdxError::UnsupportedType(0x0D)));
        assert_eq!(parse_idx(&good, 3), Err(IdxError::WrongRank { expected: 3, found: 2 }));
        assert_eq!(parse_idx(&good[..good.len() - 1], 2), Err(IdxError::TruncatedData { expected: 4, found: 3 }));
        let mut long = good.clone();
        long.extend_from_slice(&[9, 9]);
        assert_eq!(parse_idx(&long, 2), Err(IdxError::TrailingData(2)));
        let zero = encode_idx(&[0, 2], &[]);
        assert_eq!(parse_idx(&zero, 2), Err(IdxError::ZeroDimension { index: 0 }));
    }

    #[test]
    fn huge_header_fails_before_allocating() {
        // 2^31 rows of 28x28: 1.6 TB promised by a 16-byte file.
        let hostile = encode_idx(&[1 << 31, 28, 28], &[]);
        assert!(matches!(parse_idx(&hostile, 3), Err(IdxError::TooLarge { .. })));
    }

    #[test]
    fn reads_the_shipped_mnist_labels() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/mnist/t10k-labels-idx1-ubyte.gz");
        let labels = read_idx_file(&path, 1).unwrap();
        assert_eq!(labels.dims, vec![10_000]);
        assert!(labels.data.iter().all(|&l| l < 10));
        assert_eq!(&labels.data[..5], &[7, 2, 1, 0, 4]);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_idx(&bytes, 1);
            let _ = parse_idx(&bytes, 3);
        }

        #[test]
        fn well_formed_arrays_round_trip(d0 in 1u32..6, d1 in 1u32..6, seed in any::<u8>()) {
            let data: Vec<u8> = (0..d0 * d1).map(|i| (i as u8).wrapping_mul(seed)).collect();
            let parsed = parse_idx(&encode_idx(&[d0, d1], &data), 2).unwrap();
            prop_assert_eq!(parsed.dims, vec![d0 as usize, d1 as usize]);
            prop_assert_eq!(parsed.data, data);
        }

        #[test]
        fn any_truncation_is_an_error(cut in 0usize..21) {
            let good = encode_idx(&[3, 3], &[1; 9]);
            prop_assert!(parse_idx(&good[..cut], 2).is_err());
        }
    }
}
