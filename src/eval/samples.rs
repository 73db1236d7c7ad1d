//! Reading a directory of samples named `<class>_<index>.png`.

use std::path::Path;

use anyhow::{Context, bail, ensure};

use crate::data::decode::decode;

/// Images as `[n, C, H, W]` values in [-1, 1], and each one's intended class.
pub struct SampleSet {
    pub images: Vec<f32>,
    pub labels: Vec<usize>,
}

/// The class in a sample file name, if it is one: `7_00042.png` → 7.
pub fn class_of(name: &str) -> Option<usize> {
    let stem = name.strip_suffix(".png")?;
    let (class, index) = stem.split_once('_')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(class) || !digits(index) {
        return None;
    }
    class.parse().ok()
}

/// Every `<class>_<index>.png` in `dir` (other files are ignored), checked against the data
/// set's class count and image shape `[channels, height, width]`.
pub fn read_dir(dir: &Path, classes: usize, shape: [usize; 3]) -> anyhow::Result<SampleSet> {
    ensure!(dir.is_dir(), "samples directory {} does not exist", dir.display());
    let mut files: Vec<(String, usize)> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            class_of(&name).map(|c| (name, c))
        })
        .collect();
    files.sort();
    ensure!(
        files.len() >= 2,
        "{}: need at least 2 files named <class>_<index>.png, found {}",
        dir.display(),
        files.len()
    );
    let [c, h, w] = shape;
    let mut images = Vec::with_capacity(files.len() * c * h * w);
    let mut labels = Vec::with_capacity(files.len());
    for (name, class) in files {
        let path = dir.join(&name);
        if class >= classes {
            bail!("{}: class {class} is outside the data set's {classes} classes", path.display());
        }
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let img = decode(&bytes, None).with_context(|| format!("{}: not a readable PNG", path.display()))?;
        if (img.channels, img.height, img.width) != (c, h, w) {
            bail!(
                "{}: {}×{}×{} pixels, the data set's images are {c}×{h}×{w}",
                path.display(),
                img.channels,
                img.height,
                img.width
            );
        }
        images.extend(img.data.iter().map(|&p| p as f32 / 127.5 - 1.0));
        labels.push(class);
    }
    Ok(SampleSet { images, labels })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names() {
        assert_eq!(class_of("7_00042.png"), Some(7));
        assert_eq!(class_of("12_0.png"), Some(12));
        for bad in ["grid.png", "process.png", "7_.png", "_1.png", "7_1.jpg", "a_1.png", "7_1a.png", "-1_2.png"] {
            assert_eq!(class_of(bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn class_of_never_panics_and_round_trips(s in ".{0,20}", c in 0usize..1000, i in 0usize..100000) {
            let _ = class_of(&s);
            prop_assert_eq!(class_of(&format!("{c}_{i:05}.png")), Some(c));
        }
    }
}
