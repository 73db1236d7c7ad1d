//! Everything that defines a training run besides the model shape.

use anyhow::ensure;
use serde::{Deserialize, Serialize};

use super::adam::AdamConfig;
use crate::diffusion::schedule::BetaSchedule;

/// The regression loss between predicted and true noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LossKind {
    /// Mean absolute error, as mnist-dits trains.
    L1,
    /// Mean squared error, the DDPM paper's "simple" loss.
    Mse,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub batch: usize,
    pub lr: f64,
    /// The run's total number of optimizer steps (a resumed run continues up to it).
    pub total_steps: u64,
    pub seed: u64,
    pub loss: LossKind,
    pub adam: AdamConfig,
    /// Linear learning-rate warm-up over this many steps (0: none).
    pub warmup_steps: u64,
    /// Decay of the weights' moving average (see [`super::ema`]); 0 keeps the raw weights.
    pub ema_decay: f64,
    pub checkpoint_every: u64,
    pub log_every: u64,
    pub timesteps: usize,
    pub beta_schedule: BetaSchedule,
}

impl TrainConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(self.batch > 0, "--batch must be at least 1");
        ensure!(self.lr.is_finite() && self.lr > 0.0, "--lr must be a positive number, got {}", self.lr);
        ensure!(self.total_steps > 0, "the number of training steps must be at least 1");
        ensure!(self.checkpoint_every > 0, "--checkpoint-every must be at least 1");
        ensure!(self.log_every > 0, "--log-every must be at least 1");
        ensure!((0.0..1.0).contains(&self.ema_decay), "--ema-decay must be in [0, 1), got {}", self.ema_decay);
        ensure!(self.timesteps >= 2, "the diffusion needs at least 2 timesteps");
        Ok(())
    }

    /// Learning rate at `step` (0-based), after warm-up.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            self.lr * (step + 1) as f64 / self.warmup_steps as f64
        } else {
            self.lr
        }
    }
}
