//! The DiT: config, embeddings, blocks, the whole network, and its weights on disk.

pub mod block;
pub mod config;
pub mod dit;
pub mod embed;
pub mod weights;

pub use config::{AttnScale, DitConfig};
pub use dit::Dit;
