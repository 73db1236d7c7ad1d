//! Data: files (IDX, image folders, CSV lists, CIFAR-10 batches) → a data set in memory (or,
//! too large for it, its file list) → shuffled batches in [-1, 1].

pub mod cifar;
pub mod dataset;
pub mod decode;
pub mod file_list;
pub mod idx;
pub mod loader;
pub mod source;
pub mod store;

pub use dataset::{ImageDataset, Split, default_data_dir};
pub use loader::{Batch, BatchLoader, Position};
pub use source::{DataArgs, DataFormat, DataSource};
pub use store::ImageStore;
