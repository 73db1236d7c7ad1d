//! The networks: a config, the two DiT families (owenliang/mnist-dits and the DiT paper), one
//! type over both, and their weights on disk.

pub mod config;
pub mod mnist_dits;
pub mod net;
pub mod paper;
pub mod weights;

pub use config::{AttnScale, DitConfig, Family};
pub use mnist_dits::MnistDits;
pub use net::DitNet;
pub use paper::PaperDit;
