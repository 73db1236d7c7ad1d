//! Even splits of `0..len` into contiguous ranges: each rank's share of a batch or of the
//! parameters, a batch's micro-batches, inference chunks.

use std::ops::Range;

/// `parts` contiguous ranges covering `0..len`, sizes differing by at most one (the first ones
/// larger); some are empty when `len < parts`.
pub fn even_ranges(len: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.max(1);
    let (size, extra) = (len / parts, len % parts);
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let n = size + usize::from(i < extra);
            start += n;
            start - n..start
        })
        .collect()
}

/// [`even_ranges`] with no empty range: at most `len` parts (one, when `len` is 0).
pub fn micro_batches(len: usize, parts: usize) -> Vec<Range<usize>> {
    even_ranges(len, parts.clamp(1, len.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_ranges_cover_the_range_in_near_equal_parts() {
        assert_eq!(even_ranges(11, 3), vec![0..4, 4..8, 8..11]);
        assert_eq!(even_ranges(2, 4), vec![0..1, 1..2, 2..2, 2..2]);
        assert_eq!(even_ranges(8, 1), vec![0..8]);
    }

    #[test]
    fn micro_batches_cover_the_batch_in_near_equal_contiguous_parts() {
        assert_eq!(micro_batches(11, 3), vec![0..4, 4..8, 8..11]);
        assert_eq!(micro_batches(32, 2), vec![0..16, 16..32]);
        assert_eq!(micro_batches(3, 5), vec![0..1, 1..2, 2..3]);
        assert_eq!(micro_batches(7, 1), vec![0..7]);
    }
}
