//! Everything that defines a training run besides the model shape.

use anyhow::{bail, ensure};
use serde::{Deserialize, Serialize};

use super::precision::{DEFAULT_SCALE_POWER, Precision};
use crate::diffusion::schedule::ScheduleKind;
use crate::optim::adam::AdamConfig;

/// The regression loss between predicted and true noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LossKind {
    /// Mean absolute error, as mnist-dits trains.
    L1,
    /// Mean squared error, the DDPM paper's "simple" loss.
    Mse,
}

/// How the learning rate falls after warm-up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LrDecay {
    /// Constant.
    #[default]
    None,
    /// Half a cosine from the peak to zero at the run's last step: short runs end on small,
    /// careful steps instead of the jitter of a high constant rate.
    Cosine,
}

/// Which noise levels training visits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum TimestepSampling {
    /// Every level equally often (DDPM).
    #[default]
    Uniform,
    /// t = sigmoid(n), n ~ N(mean, std²), rounded to a level: more training in the middle of
    /// the schedule, where the prediction is hardest (Esser et al. 2024, for flow matching).
    LogitNormal { mean: f64, std: f64 },
}

impl TimestepSampling {
    /// A level in `0..levels`.
    pub fn draw(&self, levels: usize, rng: &mut impl rand::Rng) -> usize {
        match *self {
            TimestepSampling::Uniform => rng.random_range(0..levels),
            TimestepSampling::LogitNormal { mean, std } => {
                let n: f64 = rand_distr::Distribution::sample(&rand_distr::StandardNormal, rng);
                let t = 1.0 / (1.0 + (-(mean + std * n)).exp());
                ((t * levels as f64).ceil() as usize).clamp(1, levels) - 1
            }
        }
    }
}

/// How long a run is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Length {
    Steps(u64),
    Epochs(u64),
    /// Minutes of training on this machine: the step count is fixed from the rate of the
    /// run's first steps ([`super::budget`]).
    Minutes(f64),
}

impl Length {
    /// The length of the default recipe: a budget, so that a slow CPU still gets a finished
    /// schedule rather than a half-decayed one.
    pub const DEFAULT: Length = Length::Minutes(10.0);

    /// From `--steps` (first), `--epochs` or `--minutes`; `None` when none is given.
    pub fn from_flags(steps: Option<u64>, epochs: Option<u64>, minutes: Option<f64>) -> anyhow::Result<Option<Self>> {
        let length = steps.map(Length::Steps).or(epochs.map(Length::Epochs)).or(minutes.map(Length::Minutes));
        if let Some(Length::Steps(0) | Length::Epochs(0)) = length {
            bail!("--steps/--epochs must be at least 1");
        }
        if let Some(Length::Minutes(m)) = length {
            ensure!(m.is_finite() && m > 0.0, "--minutes must be a positive number, got {m}");
        }
        Ok(length)
    }

    /// Optimizer steps, with `per_epoch` steps in an epoch; for a time budget, the provisional
    /// count the run starts with until its first steps fix the real one.
    pub fn steps(self, per_epoch: u64) -> u64 {
        match self {
            Length::Steps(s) => s,
            Length::Epochs(e) => e * per_epoch,
            Length::Minutes(_) => super::budget::PROVISIONAL_STEPS,
        }
    }

    /// The budget of a [`Length::Minutes`].
    pub fn budget(self) -> Option<super::budget::TimeBudget> {
        match self {
            Length::Minutes(minutes) => Some(super::budget::TimeBudget { minutes, fixed_at: None }),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub batch: usize,
    /// The batch's gradient is the size-weighted mean of this many micro-batches' gradients,
    /// computed in parallel: burn-flex's kernels barely use a second core at these sizes, a
    /// second micro-batch does. The same step as one batch up to float rounding, and a
    /// setting of the run (checkpointed), so a run's numbers do not depend on the machine's
    /// thread count. 1 in checkpoints of earlier versions; unless given, a new run's is
    /// [`TrainConfig::micro_batches_for`] its batch.
    #[serde(default = "one")]
    pub micro_batches: usize,
    pub lr: f64,
    /// The run's total number of optimizer steps (a resumed run continues up to it).
    pub total_steps: u64,
    pub seed: u64,
    pub loss: LossKind,
    pub adam: AdamConfig,
    /// Linear learning-rate warm-up over this many steps (0: none).
    pub warmup_steps: u64,
    /// Decay after warm-up, over the run's `total_steps`.
    #[serde(default)]
    pub lr_decay: LrDecay,
    /// Probability that a training image's label is replaced by the null label, so the model
    /// also learns the unconditional prediction (classifier-free guidance). 0: never.
    #[serde(default)]
    pub label_dropout: f64,
    /// Mirror training images left-right at random (half of them, drawn per epoch and image),
    /// as smalldiffusion trains its Fashion-MNIST DiT. Off for digits, whose mirror images are
    /// not digits.
    #[serde(default)]
    pub hflip: bool,
    /// Decay of the weights' moving average (see [`super::ema`]); 0 keeps the raw weights.
    pub ema_decay: f64,
    pub checkpoint_every: u64,
    pub log_every: u64,
    /// Draw a grid of the moving average's samples every N steps, at a checkpoint
    /// (`RUN_DIR/samples/step-NNNNNNN.png`, see [`super::preview`]); 0: never (as in
    /// checkpoints of earlier versions).
    #[serde(default)]
    pub sample_every: u64,
    /// Judge the moving average every N steps, at a checkpoint: accuracy and FID-CNN of a
    /// small sample set, in `metrics.jsonl` and `evals.jsonl` (the layer above training does
    /// it, through [`super::TrainOptions::on_checkpoint`]); 0: never.
    #[serde(default)]
    pub eval_every: u64,
    /// Number of noise levels T.
    pub timesteps: usize,
    /// The noise schedule (named `beta_schedule` in checkpoints of earlier versions).
    #[serde(alias = "beta_schedule")]
    pub schedule: ScheduleKind,
    #[serde(default)]
    pub timestep_sampling: TimestepSampling,
    /// The float type of the forward and backward (see [`super::precision`]).
    #[serde(default)]
    pub precision: Precision,
    /// fp16's initial loss scale, 2^this.
    #[serde(default = "scale_power")]
    pub loss_scale_power: u32,
}

fn scale_power() -> u32 {
    DEFAULT_SCALE_POWER
}

fn one() -> usize {
    1
}

/// The default recipe, the one place its values are written (the CLI's help shows them from
/// here), chosen by measurement (README, "Choosing the default recipe"): flow matching
/// (velocity prediction) with logit-normal noise levels, MSE, small batches and a learning rate
/// twice mnist-dits', warmed up then decayed, reach at equal CPU time what mnist-dits' DDPM
/// recipe (L1, 1e-3, batch 1000) does not reach at all; label dropout makes guided sampling
/// possible.
impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            batch: 32,
            micro_batches: 2,
            lr: 2e-3,
            // Fixed from the run's length when it starts (`Length`).
            total_steps: 1,
            seed: 0,
            loss: LossKind::Mse,
            adam: AdamConfig::default(),
            warmup_steps: 200,
            lr_decay: LrDecay::Cosine,
            label_dropout: 0.1,
            hflip: false,
            ema_decay: 0.999,
            checkpoint_every: 500,
            log_every: 50,
            sample_every: 1000,
            eval_every: 0,
            timesteps: 1000,
            schedule: ScheduleKind::Flow,
            timestep_sampling: TimestepSampling::LogitNormal { mean: 0.0, std: 1.0 },
            precision: Precision::Fp32,
            loss_scale_power: DEFAULT_SCALE_POWER,
        }
    }
}

/// Images per micro-batch above which [`TrainConfig::micro_batches_for`] cuts finer.
const MICRO_BATCH_IMAGES: usize = 64;

impl TrainConfig {
    /// The default cut of a `batch` into micro-batches: two (one per core of a 2-core machine)
    /// up to batch 191, then a power of two with about 64 images each (4 at batch 256, 8 at
    /// 512). Larger micro-batches than that ran slower: their activations leave the caches, and
    /// two halves of a large batch on two cores leave one idle whenever the other falls behind;
    /// at batch 32 four micro-batches of 8 ran slower than two (README, "Speed").
    pub fn micro_batches_for(batch: usize) -> usize {
        (batch / MICRO_BATCH_IMAGES).next_power_of_two().max(2).min(batch.max(1))
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(self.batch > 0, "--batch must be at least 1");
        ensure!(
            (1..=self.batch).contains(&self.micro_batches),
            "--micro-batches must be between 1 and the batch size {}, got {}",
            self.batch,
            self.micro_batches
        );
        ensure!(self.lr.is_finite() && self.lr > 0.0, "--lr must be a positive number, got {}", self.lr);
        ensure!(self.checkpoint_every > 0, "--checkpoint-every must be at least 1");
        ensure!(self.log_every > 0, "--log-every must be at least 1");
        ensure!((0.0..1.0).contains(&self.ema_decay), "--ema-decay must be in [0, 1), got {}", self.ema_decay);
        ensure!(
            (0.0..1.0).contains(&self.label_dropout),
            "--label-dropout must be in [0, 1), got {}",
            self.label_dropout
        );
        ensure!(self.timesteps >= 2, "the diffusion needs at least 2 timesteps");
        self.schedule.validate()?;
        ensure!(self.loss_scale_power <= 120, "--loss-scale-power must be at most 120 (2^120 is near f32's range)");
        if let TimestepSampling::LogitNormal { mean, std } = self.timestep_sampling {
            ensure!(
                mean.is_finite() && std.is_finite() && std > 0.0,
                "logit-normal sampling needs a finite mean and std > 0"
            );
        }
        Ok(())
    }

    /// Learning rate at `step` (0-based): linear warm-up, then the decay.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.lr_decay {
            LrDecay::None => self.lr,
            LrDecay::Cosine => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
                self.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_micro_batches_hold_about_64_images_and_are_at_least_two() {
        let cut: Vec<usize> = [1, 2, 32, 127, 191, 192, 256, 512, 1000].map(TrainConfig::micro_batches_for).to_vec();
        assert_eq!(cut, [1, 2, 2, 2, 2, 4, 4, 8, 16]);
        for batch in 1..3000 {
            let m = TrainConfig::micro_batches_for(batch);
            assert!((1..=batch).contains(&m) && m.is_power_of_two(), "batch {batch}: {m}");
        }
    }

    fn cfg(warmup_steps: u64, lr_decay: LrDecay) -> TrainConfig {
        TrainConfig { lr: 2e-3, total_steps: 1100, warmup_steps, lr_decay, ..TrainConfig::default() }
    }

    #[test]
    fn warm_up_is_linear_then_constant() {
        let c = cfg(100, LrDecay::None);
        assert!((c.lr_at(0) - 2e-5).abs() < 1e-12);
        assert!((c.lr_at(49) - 1e-3).abs() < 1e-12);
        assert_eq!(c.lr_at(100), 2e-3);
        assert_eq!(c.lr_at(1099), 2e-3);
    }

    #[test]
    fn logit_normal_levels_cluster_in_the_middle_and_stay_in_range() {
        let s = TimestepSampling::LogitNormal { mean: 0.0, std: 1.0 };
        let mut rng = crate::rng::stream(0, crate::rng::Purpose::Bench, 0);
        let draws: Vec<usize> = (0..20_000).map(|_| s.draw(1000, &mut rng)).collect();
        assert!(draws.iter().all(|&t| t < 1000));
        let middle = draws.iter().filter(|&&t| (250..750).contains(&t)).count() as f64 / 20_000.0;
        // P(|n| < logit(0.75) = 1.0986) = 0.728 for n ~ N(0, 1).
        assert!((middle - 0.728).abs() < 0.02, "{middle}");
    }

    #[test]
    fn checkpoints_of_earlier_versions_still_read() {
        // Before these fields existed every run was uniform in t and computed whole batches.
        let old = TrainConfig {
            timestep_sampling: TimestepSampling::Uniform,
            micro_batches: 1,
            schedule: ScheduleKind::default(),
            ..cfg(0, LrDecay::None)
        };
        let mut v = serde_json::to_value(&old).unwrap();
        let o = v.as_object_mut().unwrap();
        let sched = o.remove("schedule").unwrap();
        o.insert("beta_schedule".into(), sched);
        o.remove("timestep_sampling");
        o.remove("micro_batches");
        assert_eq!(serde_json::from_value::<TrainConfig>(v).unwrap(), old);
    }

    #[test]
    fn cosine_falls_from_the_peak_to_zero_at_the_last_step() {
        let c = cfg(100, LrDecay::Cosine);
        assert_eq!(c.lr_at(100), 2e-3);
        assert!((c.lr_at(600) - 1e-3).abs() < 1e-12, "half way: half the peak");
        assert!(c.lr_at(1099) < 1e-7 && c.lr_at(1099) > 0.0);
        assert!((1..1000).all(|s| c.lr_at(100 + s) < c.lr_at(100 + s - 1)));
    }
}
