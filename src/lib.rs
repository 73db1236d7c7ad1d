//! dits: class-conditional Diffusion Transformers (DiT) in Rust, on burn.
//!
//! The modules follow the data: [`data`] (IDX files → batches) → [`model`] (the DiT) →
//! [`diffusion`] (schedule, noising, samplers) → [`train`] → [`sample`] → [`eval`]; [`bench`] measures.

pub mod bench;
pub mod data;
pub mod device;
pub mod diffusion;
pub mod distributed;
pub mod eval;
pub mod fsutil;
pub mod images;
pub mod kernels;
pub mod memory;
pub mod model;
pub mod profile;
pub mod rng;
pub mod sample;
pub mod train;
