//! The optimizer and the weights' moving average, on the flat parameter vector: used by the
//! trainer and, sharded, by the distributed schemes.

pub mod adam;
pub mod ema;

pub use adam::{AdamConfig, AdamState};

/// Elements per task of the element-wise updates run on every thread: enough work to outweigh
/// a task's cost, and no effect on the results (each element is computed alone).
pub(crate) const CHUNK: usize = 1 << 14;
