//! Training on several ranks: the engines that run the [`Collective`] operations (MPI
//! processes, or threads of one process with a device each), the world a run's ranks form,
//! and the schemes built on them: the process grid ([`grid`]), data parallelism with ZeRO-1
//! ([`data_parallel`]); the model's tensor-parallel shards and the kernels' Megatron `f`/`g`
//! operators and Ulysses all-to-all are used through the grid's groups.
//!
//! [`Local`] is the world of one process (every operation is the identity); with the `mpi`
//! feature, [`mpi::MpiWorld`] runs them on MPI (`mpirun -np N dits train --dist mpi`).

pub mod data_parallel;
pub mod devices;
pub mod grid;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod partition;
pub mod pipeline;
pub mod world;

pub use crate::collective::{Collective, CommStats, Local, StatsRecorder};
