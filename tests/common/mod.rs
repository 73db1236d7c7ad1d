//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::Path;

use dits::data::idx::encode_idx;

/// Write a small MNIST-layout data set of `n` 28×28 images (raw IDX, both splits): a bright
/// square whose position depends on the label, plus seeded speckle (other speckle in the test
/// split, so that its images are not copies of the training images).
pub fn write_toy_dataset(dir: &Path, n: u32) {
    std::fs::create_dir_all(dir).unwrap();
    let mut state = 12345u32;
    for split in ["train", "t10k"] {
        let mut pixels = Vec::with_capacity(n as usize * 784);
        let mut labels = Vec::with_capacity(n as usize);
        for i in 0..n {
            let label = (i % 10) as u8;
            labels.push(label);
            for y in 0..28u32 {
                for x in 0..28u32 {
                    state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    let (cx, cy) = (4 + 2 * label as u32, 6 + label as u32);
                    let on = x.abs_diff(cx) < 4 && y.abs_diff(cy) < 4;
                    pixels.push(if on { 230 } else { (state >> 28) as u8 });
                }
            }
        }
        std::fs::write(dir.join(format!("{split}-images-idx3-ubyte")), encode_idx(&[n, 28, 28], &pixels)).unwrap();
        std::fs::write(dir.join(format!("{split}-labels-idx1-ubyte")), encode_idx(&[n], &labels)).unwrap();
    }
}

/// The arguments of `dits train` on the data set in `data/` (beside the run), writing `out`, with
/// `flags` after: the command line every multi-step test starts from.
pub fn train_args(out: &str, flags: &[&str]) -> Vec<String> {
    ["train", "--data", "data", "--out", out].iter().chain(flags).map(|s| s.to_string()).collect()
}
