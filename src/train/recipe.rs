//! A training recipe from three sources, each overriding the one before: the defaults (the
//! model preset and [`TrainConfig::default`]), a TOML file (`--config run.toml`) and
//! command-line flags. The file's keys are the flags' names without the dashes, in a `[model]`
//! and a `[train]` table; an unknown or mistyped key is an error naming it.
//!
//! ```toml
//! [model]
//! preset = "dit-s4"
//! depth = 4
//!
//! [train]
//! schedule = "flow"
//! lr = 1e-3
//! epochs = 10
//! ```

use std::path::Path;

use anyhow::{Context, ensure};
use serde::Deserialize;

use super::config::{Length, LossKind, LrDecay, TimestepSampling, TrainConfig};
use super::precision::Precision;
use crate::diffusion::schedule::ScheduleKind;
use crate::model::{DitConfig, Family};

/// Model shape: a preset, then any size changed.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, clap::Args)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ModelOverrides {
    /// Model preset: mnist-dits, dit-s2, dit-s4.
    #[arg(long = "model", value_name = "PRESET")]
    #[serde(alias = "model")]
    pub preset: Option<String>,
    /// Patch side (must divide the image side).
    #[arg(long)]
    pub patch: Option<usize>,
    /// Number of DiT blocks.
    #[arg(long)]
    pub depth: Option<usize>,
    /// Attention heads.
    #[arg(long)]
    pub heads: Option<usize>,
    /// Width of each head (DiT family: width = heads × head-dim).
    #[arg(long)]
    pub head_dim: Option<usize>,
    /// Token width (DiT family: heads × head-dim unless given).
    #[arg(long)]
    pub width: Option<usize>,
    /// Hidden width of the MLP as a multiple of the width.
    #[arg(long)]
    pub mlp_ratio: Option<usize>,
}

impl ModelOverrides {
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    /// `self` where given, else `base`.
    pub fn or(self, base: Self) -> Self {
        Self {
            preset: self.preset.or(base.preset),
            patch: self.patch.or(base.patch),
            depth: self.depth.or(base.depth),
            heads: self.heads.or(base.heads),
            head_dim: self.head_dim.or(base.head_dim),
            width: self.width.or(base.width),
            mlp_ratio: self.mlp_ratio.or(base.mlp_ratio),
        }
    }

    /// The config: the preset with the given sizes, validated.
    pub fn resolve(&self) -> anyhow::Result<DitConfig> {
        let mut c = DitConfig::preset(self.preset.as_deref().unwrap_or(Self::DEFAULT_PRESET))?;
        c.patch = self.patch.unwrap_or(c.patch);
        c.depth = self.depth.unwrap_or(c.depth);
        c.heads = self.heads.unwrap_or(c.heads);
        c.mlp_ratio = self.mlp_ratio.unwrap_or(c.mlp_ratio);
        match (c.family, self.width, self.head_dim) {
            // The DiT family splits the width into heads: derive whichever was not given.
            (Family::Dit, Some(w), None) => {
                ensure!(c.heads > 0 && w.is_multiple_of(c.heads), "--heads {} does not divide --width {w}", c.heads);
                c.width = w;
                c.head_dim = w / c.heads;
            }
            (Family::Dit, None, hd) => {
                c.head_dim = hd.unwrap_or(c.head_dim);
                c.width = c.heads * c.head_dim;
            }
            (_, w, hd) => {
                c.width = w.unwrap_or(c.width);
                c.head_dim = hd.unwrap_or(c.head_dim);
            }
        }
        c.validate()?;
        Ok(c)
    }
}

/// Training settings; absent ones keep their defaults.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, clap::Args)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TrainOverrides {
    /// Total epochs of the run.
    #[arg(long, conflicts_with = "steps")]
    pub epochs: Option<u64>,
    /// Total optimizer steps of the run (instead of --epochs).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Train for this many minutes on this machine: the step count (and so the learning-rate
    /// schedule) is fixed from the rate of the first steps and kept by a resumed run.
    #[arg(long, conflicts_with_all = ["steps", "epochs"])]
    pub minutes: Option<f64>,
    /// Batch size (drop-last).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Float type of the forward and backward: fp32, or bf16/fp16 on a copy of the fp32 master
    /// weights (fp16 with dynamic loss scaling).
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
    /// fp16's initial loss scale is 2^P (DeepSpeed's initial_scale_power).
    #[arg(long)]
    pub loss_scale_power: Option<u32>,
    /// Micro-batches per batch, their gradients computed in parallel and averaged; part of the
    /// recipe, not the machine, so results do not depend on --threads [default: 2, or a power
    /// of two of about 64 images each from batch 192 on: 4 at 256].
    #[arg(long)]
    pub micro_batches: Option<usize>,
    /// Peak Adam learning rate.
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    /// Seed of every random number in the run.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Loss between prediction and target.
    #[arg(long, value_enum)]
    pub loss: Option<LossKind>,
    /// Linear learning-rate warm-up over the first N steps.
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// Learning-rate decay after warm-up, over the run's total steps.
    #[arg(long, value_enum)]
    pub lr_decay: Option<LrDecay>,
    /// Probability of training on the null label instead of the image's label, which enables
    /// classifier-free guidance at sampling time.
    #[arg(long, allow_negative_numbers = true)]
    pub label_dropout: Option<f64>,
    /// Random horizontal flips of the training images (`--hflip`, or `--hflip false`), drawn
    /// per epoch and image from the seed.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub hflip: Option<bool>,
    /// Decay of the weights' moving average used for sampling.
    #[arg(long, allow_negative_numbers = true)]
    pub ema_decay: Option<f64>,
    /// Noise schedule: linear, cosine, sigmoid, log-linear, flow.
    #[arg(long)]
    pub schedule: Option<String>,
    /// Noise levels visited in training: uniform, or logit-normal (mean 0, std 1).
    #[arg(long, value_enum)]
    pub timestep_sampling: Option<TimestepSamplingName>,
    /// Save a checkpoint every N steps (and always at the end).
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Log metrics every N steps.
    #[arg(long)]
    pub log_every: Option<u64>,
    /// Draw a grid of the moving average's samples every N steps (with a checkpoint there),
    /// from fixed noise and labels, to RUN_DIR/samples/step-NNNNNNN.png; 0: never.
    #[arg(long)]
    pub sample_every: Option<u64>,
    /// Judge the moving average every N steps (with a checkpoint there): accuracy and FID-CNN
    /// of 500 samples, logged in metrics.jsonl and evals.jsonl (the judge is trained first if
    /// not cached); 0: never.
    #[arg(long)]
    pub eval_every: Option<u64>,
}

impl ModelOverrides {
    /// The preset used when none is given.
    pub const DEFAULT_PRESET: &str = "mnist-dits";
}

/// The name clap shows for a value of a `ValueEnum`.
pub fn value_name(v: impl clap::ValueEnum) -> String {
    v.to_possible_value().map(|p| p.get_name().to_string()).unwrap_or_default()
}

impl TrainOverrides {
    /// What each flag defaults to, by clap argument id, from [`TrainConfig::default`] and
    /// [`Length::DEFAULT`]: the CLI shows these in `--help`, so no help text repeats a value.
    pub fn defaults() -> Vec<(&'static str, String)> {
        let d = TrainConfig::default();
        let sampling = match d.timestep_sampling {
            TimestepSampling::Uniform => "uniform".to_string(),
            TimestepSampling::LogitNormal { mean, std } => format!("logit-normal, mean {mean}, std {std}"),
        };
        let length = match Length::DEFAULT {
            Length::Epochs(e) => ("epochs", e.to_string()),
            Length::Steps(s) => ("steps", s.to_string()),
            Length::Minutes(m) => ("minutes", m.to_string()),
        };
        vec![
            length,
            ("batch", d.batch.to_string()),
            ("micro_batches", d.micro_batches.to_string()),
            ("precision", value_name(d.precision)),
            ("loss_scale_power", d.loss_scale_power.to_string()),
            ("lr", d.lr.to_string()),
            ("seed", d.seed.to_string()),
            ("loss", value_name(d.loss)),
            ("warmup_steps", d.warmup_steps.to_string()),
            ("lr_decay", value_name(d.lr_decay)),
            ("label_dropout", d.label_dropout.to_string()),
            ("hflip", d.hflip.to_string()),
            ("ema_decay", d.ema_decay.to_string()),
            ("schedule", d.schedule.name().to_string()),
            ("timestep_sampling", sampling),
            ("checkpoint_every", d.checkpoint_every.to_string()),
            ("log_every", d.log_every.to_string()),
            ("sample_every", d.sample_every.to_string()),
            ("eval_every", d.eval_every.to_string()),
        ]
    }
}

/// `--timestep-sampling` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TimestepSamplingName {
    Uniform,
    LogitNormal,
}

impl TrainOverrides {
    /// `self` where given, else `base`.
    pub fn or(self, base: Self) -> Self {
        // A length on the command line replaces the file's, whichever unit either uses.
        let (epochs, steps, minutes) = if self.epochs.is_some() || self.steps.is_some() || self.minutes.is_some() {
            (self.epochs, self.steps, self.minutes)
        } else {
            (base.epochs, base.steps, base.minutes)
        };
        Self {
            epochs,
            steps,
            minutes,
            batch: self.batch.or(base.batch),
            micro_batches: self.micro_batches.or(base.micro_batches),
            precision: self.precision.or(base.precision),
            loss_scale_power: self.loss_scale_power.or(base.loss_scale_power),
            lr: self.lr.or(base.lr),
            seed: self.seed.or(base.seed),
            loss: self.loss.or(base.loss),
            warmup_steps: self.warmup_steps.or(base.warmup_steps),
            lr_decay: self.lr_decay.or(base.lr_decay),
            label_dropout: self.label_dropout.or(base.label_dropout),
            hflip: self.hflip.or(base.hflip),
            ema_decay: self.ema_decay.or(base.ema_decay),
            schedule: self.schedule.or(base.schedule),
            timestep_sampling: self.timestep_sampling.or(base.timestep_sampling),
            checkpoint_every: self.checkpoint_every.or(base.checkpoint_every),
            log_every: self.log_every.or(base.log_every),
            sample_every: self.sample_every.or(base.sample_every),
            eval_every: self.eval_every.or(base.eval_every),
        }
    }

    /// `base` with every given setting applied (not validated: see [`TrainConfig::validate`]).
    pub fn apply(&self, mut t: TrainConfig) -> anyhow::Result<TrainConfig> {
        t.batch = self.batch.unwrap_or(t.batch);
        t.micro_batches = self.micro_batches.unwrap_or(t.micro_batches);
        t.precision = self.precision.unwrap_or(t.precision);
        t.loss_scale_power = self.loss_scale_power.unwrap_or(t.loss_scale_power);
        t.lr = self.lr.unwrap_or(t.lr);
        t.seed = self.seed.unwrap_or(t.seed);
        t.loss = self.loss.unwrap_or(t.loss);
        t.warmup_steps = self.warmup_steps.unwrap_or(t.warmup_steps);
        t.lr_decay = self.lr_decay.unwrap_or(t.lr_decay);
        t.label_dropout = self.label_dropout.unwrap_or(t.label_dropout);
        t.hflip = self.hflip.unwrap_or(t.hflip);
        t.ema_decay = self.ema_decay.unwrap_or(t.ema_decay);
        if let Some(name) = &self.schedule {
            t.schedule = ScheduleKind::from_name(name)?;
        }
        if let Some(s) = self.timestep_sampling {
            t.timestep_sampling = match s {
                TimestepSamplingName::Uniform => TimestepSampling::Uniform,
                TimestepSamplingName::LogitNormal => TimestepSampling::LogitNormal { mean: 0.0, std: 1.0 },
            };
        }
        t.checkpoint_every = self.checkpoint_every.unwrap_or(t.checkpoint_every);
        t.log_every = self.log_every.unwrap_or(t.log_every);
        t.sample_every = self.sample_every.unwrap_or(t.sample_every);
        t.eval_every = self.eval_every.unwrap_or(t.eval_every);
        Ok(t)
    }
}

/// A `--config` file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeFile {
    #[serde(default)]
    pub model: ModelOverrides,
    #[serde(default)]
    pub train: TrainOverrides,
}

impl RecipeFile {
    /// Errors name the file, and the line when the parser knows it (a mistyped value's message
    /// names only the type, so the line shows the key).
    pub fn parse(text: &str, origin: &Path) -> anyhow::Result<Self> {
        toml::from_str(text).map_err(|e| {
            let message = e.message().trim_end();
            match e.span().filter(|s| s.start <= text.len()) {
                Some(span) => {
                    let line_no = text[..span.start].matches('\n').count() + 1;
                    let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
                    anyhow::anyhow!("{}:{line_no}: `{line}`: {message}", origin.display())
                }
                None => anyhow::anyhow!("{}: {message}", origin.display()),
            }
        })
    }

    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn file_then_flags_override_the_defaults() {
        let file = RecipeFile::parse(
            "[model]\npreset = \"dit-s4\"\ndepth = 4\n\n[train]\nschedule = \"flow\"\nlr = 1e-3\nepochs = 10\nlabel-dropout = 0.2\n",
            Path::new("run.toml"),
        )
        .unwrap();
        let cli = TrainOverrides { lr: Some(5e-4), steps: Some(100), ..Default::default() };
        let t = cli.or(file.train.clone());
        assert_eq!((t.lr, t.steps, t.epochs, t.label_dropout), (Some(5e-4), Some(100), None, Some(0.2)));
        let cfg = t.apply(TrainConfig::default()).unwrap();
        assert_eq!(cfg.schedule, ScheduleKind::Flow);
        let model = ModelOverrides { heads: Some(4), ..Default::default() }.or(file.model).resolve().unwrap();
        assert_eq!((model.family, model.depth, model.heads, model.head_dim, model.width), (Family::Dit, 4, 4, 32, 128));
    }

    #[test]
    fn unknown_and_mistyped_keys_are_named() {
        let e = RecipeFile::parse("[train]\nlearning-rate = 1e-3\n", Path::new("r.toml")).unwrap_err().to_string();
        assert!(e.contains("r.toml") && e.contains("learning-rate"), "{e}");
        let e = RecipeFile::parse("[train]\nbatch = \"big\"\n", Path::new("r.toml")).unwrap_err().to_string();
        assert!(e.contains("r.toml") && e.contains("invalid type"), "{e}");
        let e = RecipeFile::parse("[optimizer]\nlr = 1\n", Path::new("r.toml")).unwrap_err().to_string();
        assert!(e.contains("optimizer"), "{e}");
    }

    #[test]
    fn sizes_are_checked() {
        let bad = |m: ModelOverrides| m.resolve().unwrap_err().to_string();
        assert!(bad(ModelOverrides { patch: Some(5), ..Default::default() }).contains("does not divide"));
        let dit =
            ModelOverrides { preset: Some("dit-s4".into()), width: Some(100), heads: Some(6), ..Default::default() };
        assert!(bad(dit).contains("does not divide"));
        assert!(
            bad(ModelOverrides { preset: Some("dit-xl".into()), ..Default::default() })
                .contains("unknown model preset")
        );
        let w = ModelOverrides { preset: Some("dit-s4".into()), width: Some(96), heads: Some(3), ..Default::default() };
        assert_eq!(w.resolve().unwrap().head_dim, 32);
    }

    proptest! {
        /// Whatever text the file holds, parsing returns (never panics), and what parses
        /// round-trips through the merge unchanged.
        #[test]
        fn parsing_never_panics(text in "\\PC{0,200}") {
            let _ = RecipeFile::parse(&text, Path::new("fuzz.toml"));
        }

        #[test]
        fn numbers_in_a_file_arrive_unchanged(batch in 1usize..100_000, depth in 1usize..64, lr in 1e-7f64..1.0) {
            let text = format!("[model]\ndepth = {depth}\n[train]\nbatch = {batch}\nlr = {lr:e}\n");
            let f = RecipeFile::parse(&text, Path::new("p.toml")).unwrap();
            prop_assert_eq!(f.model.depth, Some(depth));
            prop_assert_eq!(f.train.batch, Some(batch));
            prop_assert_eq!(f.train.lr, Some(lr));
        }
    }
}
