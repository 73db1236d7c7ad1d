//! The optimizer and the weights' moving average, on the flat parameter vector: used by the
//! trainer and, sharded, by the distributed schemes.

pub mod adam;
pub mod ema;

pub use adam::{AdamConfig, AdamState};
