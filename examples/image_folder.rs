//! Writes an MNIST-layout (IDX) data set out as an image folder, torchvision's `ImageFolder`
//! layout: `OUT/train/<class>/NNNNN.png` and `OUT/test/<class>/NNNNN.png`. With `--tint`, each
//! digit is coloured by its class (red zeros, green ones, …): a colour set with a real signal.
//! The quality rows of the README's Data section are measured on these.
//!
//!   cargo run --release --example image_folder -- IDX_DIR OUT [--names a,b,…] [--tint]

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use dits::data::{DataSource, Split};
use image::{GrayImage, Rgb, RgbImage};

/// Class colours of `--tint`, and the class names they give the folders.
const TINTS: [([u16; 3], &str); 10] = [
    ([255, 40, 40], "red"),
    ([40, 255, 40], "green"),
    ([40, 40, 255], "blue"),
    ([255, 255, 40], "yellow"),
    ([40, 255, 255], "cyan"),
    ([255, 40, 255], "magenta"),
    ([255, 140, 0], "orange"),
    ([140, 0, 255], "violet"),
    ([0, 140, 255], "azure"),
    ([255, 255, 255], "white"),
];

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut positional = Vec::new();
    let (mut names, mut tint): (Option<Vec<String>>, bool) = (None, false);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--tint" => tint = true,
            "--names" => {
                names = Some(it.next().context("--names needs a value")?.split(',').map(String::from).collect())
            }
            _ => positional.push(PathBuf::from(a)),
        }
    }
    let [src, out] = positional.as_slice() else { bail!("usage: image_folder IDX_DIR OUT [--names a,b,…] [--tint]") };
    for split in [Split::Train, Split::Test] {
        let ds = DataSource::idx(src).load(split)?;
        let classes: Vec<String> = match (&names, tint) {
            (_, true) => TINTS.iter().map(|t| t.1.to_string()).collect(),
            (Some(n), false) => n.clone(),
            (None, false) => ds.classes.clone(),
        };
        let dir = out.join(if split == Split::Train { "train" } else { "test" });
        for i in 0..ds.len() {
            let c = ds.labels[i] as usize;
            let name = classes.get(c).with_context(|| format!("no name for class {c}"))?;
            let path = dir.join(name).join(format!("{i:05}.png"));
            write(&path, ds.image(i), ds.width as u32, tint.then(|| TINTS[c % 10].0))?;
        }
        eprintln!("{}: {} images", dir.display(), ds.len());
    }
    Ok(())
}

fn write(path: &Path, gray: &[u8], side: u32, tint: Option<[u16; 3]>) -> anyhow::Result<()> {
    std::fs::create_dir_all(path.parent().expect("a class folder"))?;
    let saved = match tint {
        None => GrayImage::from_raw(side, side, gray.to_vec()).context("image size")?.save(path),
        Some(t) => RgbImage::from_fn(side, side, |x, y| {
            let v = gray[(y * side + x) as usize] as u16;
            Rgb(t.map(|c| (v * c / 255) as u8))
        })
        .save(path),
    };
    saved.with_context(|| format!("writing {}", path.display()))
}
