//! Where a run's training images live while it trains: decoded in memory (every format, when
//! the decoded set fits the memory limit), or as files decoded again each time a batch needs
//! them (image folders and CSV lists larger than the limit). Either way an image is a function
//! of its index alone, so batches do not depend on where the pixels came from.

use anyhow::{Context, ensure};

use super::dataset::ImageDataset;
use super::decode::decode;
use super::file_list::Entry;

/// Image files already checked once (every file decoded to the same shape), read again on
/// demand.
#[derive(Debug, Clone)]
pub struct StreamedFiles {
    pub entries: Vec<Entry>,
    /// `--image-size`, applied at every decode.
    pub size: Option<u32>,
    pub channels: usize,
    pub side: usize,
    pub classes: Vec<String>,
}

impl StreamedFiles {
    /// Decode image `index` into `out` (`channels × side × side` bytes). A file that changed
    /// since the check (now unreadable, or another shape) is an error naming it.
    pub fn read(&self, index: usize, out: &mut [u8]) -> anyhow::Result<()> {
        let e = &self.entries[index];
        let bytes = std::fs::read(&e.path).with_context(|| format!("reading {}", e.describe()))?;
        let p =
            decode(&bytes, self.size).with_context(|| format!("{} (changed since it was checked)", e.describe()))?;
        ensure!(
            (p.channels, p.height, p.width) == (self.channels, self.side, self.side),
            "{} is now {}×{}×{}, not the {}×{}×{} it was when checked",
            e.describe(),
            p.channels,
            p.height,
            p.width,
            self.channels,
            self.side,
            self.side
        );
        out.copy_from_slice(&p.data);
        Ok(())
    }
}

/// A split's images, in memory or on disk.
#[derive(Debug, Clone)]
pub enum ImageStore {
    Memory(ImageDataset),
    Files(StreamedFiles),
}

impl ImageStore {
    pub fn len(&self) -> usize {
        match self {
            ImageStore::Memory(ds) => ds.len(),
            ImageStore::Files(f) => f.entries.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn label(&self, index: usize) -> u8 {
        match self {
            ImageStore::Memory(ds) => ds.labels[index],
            ImageStore::Files(f) => f.entries[index].label,
        }
    }

    /// `(channels, height, width)`.
    pub fn shape(&self) -> (usize, usize, usize) {
        match self {
            ImageStore::Memory(ds) => (ds.channels, ds.height, ds.width),
            ImageStore::Files(f) => (f.channels, f.side, f.side),
        }
    }

    pub fn image_len(&self) -> usize {
        let (c, h, w) = self.shape();
        c * h * w
    }

    pub fn classes(&self) -> &[String] {
        match self {
            ImageStore::Memory(ds) => &ds.classes,
            ImageStore::Files(f) => &f.classes,
        }
    }

    /// Whether reading an image decodes a file.
    pub fn streams(&self) -> bool {
        matches!(self, ImageStore::Files(_))
    }

    /// Image `index` as bytes into `out`.
    pub fn read(&self, index: usize, out: &mut [u8]) -> anyhow::Result<()> {
        match self {
            ImageStore::Memory(ds) => {
                out.copy_from_slice(ds.image(index));
                Ok(())
            }
            ImageStore::Files(f) => f.read(index, out),
        }
    }
}
