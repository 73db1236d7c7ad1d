//! The networks: a config with its FLOP model, the two DiT families (owenliang/mnist-dits and
//! the DiT paper's), one type over both, and their weights on disk.

pub mod config;
pub mod dit;
pub mod flops;
pub mod mnist_dits;
pub mod net;
pub mod patchify;
pub mod pieces;
pub mod tensor_parallel;
pub mod weights;

pub use config::{AttnScale, DitConfig, Family};
pub use dit::Dit;
pub use mnist_dits::MnistDits;
pub use net::DitNet;
