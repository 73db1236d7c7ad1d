//! CIFAR-10's binary version: `data_batch_1.bin` … `data_batch_5.bin` and `test_batch.bin`, each
//! a run of 3,073-byte records (a label byte, then the 32×32 red, green and blue planes), with the
//! class names in `batches.meta.txt`.

use std::path::Path;

use anyhow::{Context, ensure};

use super::file_list::read_class_names;

pub const SIDE: usize = 32;
const PIXELS: usize = 3 * SIDE * SIDE;
const RECORD: usize = 1 + PIXELS;

/// The training batches' names, in order.
pub const TRAIN_FILES: [&str; 5] =
    ["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin"];
pub const TEST_FILE: &str = "test_batch.bin";
pub const META_FILE: &str = "batches.meta.txt";

/// Whether `dir` looks like CIFAR-10's binary version.
pub fn is_cifar_dir(dir: &Path) -> bool {
    dir.join(TRAIN_FILES[0]).is_file()
}

/// The class names: `batches.meta.txt`, else the ids `0..10`.
pub fn class_names(dir: &Path) -> anyhow::Result<Vec<String>> {
    let meta = dir.join(META_FILE);
    if meta.is_file() { read_class_names(&meta) } else { Ok((0..10).map(|i| i.to_string()).collect()) }
}

/// Append the records of `files` to `pixels` (channel-major, as they are stored) and `labels`.
pub fn read_batches(
    dir: &Path,
    files: &[&str],
    classes: usize,
    pixels: &mut Vec<u8>,
    labels: &mut Vec<u8>,
) -> anyhow::Result<()> {
    for name in files {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        ensure!(
            !bytes.is_empty() && bytes.len().is_multiple_of(RECORD),
            "{}: {} bytes is not a whole number of {RECORD}-byte CIFAR-10 records",
            path.display(),
            bytes.len()
        );
        for (i, record) in bytes.chunks_exact(RECORD).enumerate() {
            ensure!(
                (record[0] as usize) < classes,
                "{}: record {i} has label {}, outside the {classes} classes",
                path.display(),
                record[0]
            );
            labels.push(record[0]);
            pixels.extend_from_slice(&record[1..]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of CIFAR records with these labels, pixel `p` of record `r` being `r + p`.
    pub fn records(labels: &[u8]) -> Vec<u8> {
        labels
            .iter()
            .enumerate()
            .flat_map(|(r, &l)| std::iter::once(l).chain((0..PIXELS).map(move |p| (r + p) as u8)))
            .collect()
    }

    #[test]
    fn records_load_to_their_planes_and_bad_files_are_named() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("data_batch_1.bin"), records(&[3, 9])).unwrap();
        let (mut px, mut lb) = (Vec::new(), Vec::new());
        read_batches(d.path(), &["data_batch_1.bin"], 10, &mut px, &mut lb).unwrap();
        assert_eq!(lb, [3, 9]);
        assert_eq!((px.len(), px[0], px[PIXELS], px[PIXELS + 1]), (2 * PIXELS, 0, 1, 2));
        assert!(is_cifar_dir(d.path()));
        assert_eq!(class_names(d.path()).unwrap().len(), 10);

        let mut bytes = records(&[1]);
        bytes.pop();
        std::fs::write(d.path().join("data_batch_1.bin"), bytes).unwrap();
        let err = read_batches(d.path(), &["data_batch_1.bin"], 10, &mut px, &mut lb).unwrap_err().to_string();
        assert!(err.contains("not a whole number"), "{err}");
        std::fs::write(d.path().join("data_batch_1.bin"), records(&[11])).unwrap();
        let err = read_batches(d.path(), &["data_batch_1.bin"], 10, &mut px, &mut lb).unwrap_err().to_string();
        assert!(err.contains("record 0 has label 11"), "{err}");
    }
}
