//! Data: IDX files → an in-memory data set → shuffled batches in [-1, 1].

pub mod dataset;
pub mod idx;
pub mod loader;

pub use dataset::{ImageDataset, Split, default_data_dir};
pub use loader::{Batch, BatchLoader, Position};
