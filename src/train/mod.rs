//! Training: the flat parameter view, Adam, checkpoints, metrics, and the loop.

pub mod adam;
pub mod checkpoint;
pub mod config;
pub mod ema;
pub mod metrics;
pub mod params;
pub mod recipe;
pub mod trainer;

pub use config::{LossKind, LrDecay, TimestepSampling, TrainConfig};
pub use trainer::{Length, TrainOptions, TrainSummary, Trainer};

use crate::diffusion::schedule::Schedule;

/// The default recipe, chosen by measurement (README, "Choosing the default recipe"): MSE and
/// a learning rate twice mnist-dits', warmed up then decayed, train faster than mnist-dits'
/// L1 at 1e-3 in the same minutes; label dropout makes guided sampling possible.
pub fn default_train_config() -> TrainConfig {
    TrainConfig {
        batch: DEFAULT_BATCH,
        lr: 2e-3,
        total_steps: 1,
        seed: 0,
        loss: LossKind::Mse,
        adam: adam::AdamConfig::default(),
        warmup_steps: 200,
        lr_decay: config::LrDecay::Cosine,
        label_dropout: 0.1,
        ema_decay: 0.999,
        checkpoint_every: 500,
        log_every: 50,
        timesteps: 1000,
        schedule: Schedule::default(),
        timestep_sampling: config::TimestepSampling::Uniform,
    }
}

/// Batch size of the default recipe.
pub const DEFAULT_BATCH: usize = 64;
/// Epochs of the default recipe.
pub const DEFAULT_EPOCHS: u64 = 6;
