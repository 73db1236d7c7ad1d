//! Training: a run's recipe and state, one optimisation step, and a run's life around it.
//!
//! - [`config`] and [`recipe`]: the recipe, its defaults, and how a TOML file and flags change it.
//! - [`state`], [`params`], [`checkpoint`], [`metrics`]: what a run is at a step and what it writes;
//!   [`budget`]: a length in minutes turned into steps.
//! - [`step`]: one optimisation step ([`Trainer`]); [`snapshot`]: rank 0's trainer sent to the others;
//!   [`tensor_parallel`], [`tp_layout`], [`sequence_parallel`]: a trainer's share on a grid;
//!   [`pieces`]: the gradient piece by piece, on which [`zero`] (ZeRO-2/3) and [`pipeline`]
//!   (a pipeline stage) run; [`precision`]: mixed precision and fp16's loss scale.
//! - [`start`]: how a run starts (new or resumed), resolved once; [`run`]: the loop, with
//!   [`run_dir`] (the lock), [`stop`] (signals) and [`preview`] (grids while it trains);
//!   [`launch`]: every rank of a world.

pub mod budget;
pub mod checkpoint;
pub mod config;
pub mod launch;
pub mod metrics;
pub mod params;
pub mod pieces;
pub mod pipeline;
pub mod precision;
pub mod preview;
pub mod recipe;
pub mod run;
pub mod run_dir;
pub mod sequence_parallel;
pub mod snapshot;
pub mod start;
pub mod state;
pub mod step;
pub mod stop;
pub mod tensor_parallel;
pub mod tp_layout;
pub mod zero;

pub use config::{Length, LossKind, LrDecay, TimestepSampling, TrainConfig};
pub use launch::launch;
pub use run::{CheckpointEvent, CheckpointHook, Interrupted, TrainOptions, TrainSummary, run};
pub use start::{ResumeFlags, Start};
pub use state::RunState;
pub use step::Trainer;
