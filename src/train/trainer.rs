//! The training step (noise, predict, loss, backward, Adam) and the loop around it (data,
//! progress, metrics, checkpoints, resume).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use burn::prelude::*;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::Rng;
use rayon::prelude::*;

use super::adam::AdamState;
use super::checkpoint::{self, Checkpoint, CheckpointState};
use super::config::{LossKind, TrainConfig};
use super::metrics::{self, MetricsRecord};
use super::params::ParamTable;
use crate::data::{Batch, BatchLoader, ImageDataset, Position, Split};
use crate::diffusion::sampler::gaussian;
use crate::diffusion::schedule::NoiseSchedule;
use crate::model::{DitConfig, DitNet, weights};
use crate::profile::{self, Region};
use crate::rng::{Purpose, derive_seed, stream};

/// A model with its optimizer state and counters.
pub struct Trainer {
    device: Device,
    model: DitNet,
    table: ParamTable,
    /// The master copy of the weights; the model's tensors are rebuilt from it after each step.
    params: Vec<f32>,
    adam: AdamState,
    /// Moving average of `params`.
    ema: Vec<f32>,
    schedule: NoiseSchedule,
    pub state: CheckpointState,
}

/// What one step computed.
#[derive(Debug, Clone, Copy)]
pub struct StepOutcome {
    pub loss: f32,
    pub lr: f64,
}

impl Trainer {
    /// A fresh model, initialised from the run's seed. `device` gets autodiff.
    pub fn new(model_cfg: DitConfig, train: TrainConfig, data_dir: String, device: &Device) -> anyhow::Result<Self> {
        model_cfg.validate()?;
        train.validate()?;
        ensure!(
            train.label_dropout == 0.0 || model_cfg.null_class,
            "label dropout needs a model with a null label (null_class = true)"
        );
        let device = device.clone().autodiff();
        let model =
            DitNet::new(&model_cfg, &device, derive_seed(train.seed, Purpose::Init, 0));
        let table = ParamTable::of(&model);
        let params = table.read_values(&model);
        let adam = AdamState::new(table.total);
        let ema = params.clone();
        let schedule = NoiseSchedule::new(train.schedule, train.timesteps);
        let state = CheckpointState::new(model_cfg, train, table.clone(), data_dir);
        Ok(Self { device, model, table, params, adam, ema, schedule, state })
    }

    /// Continue from a loaded checkpoint.
    pub fn from_checkpoint(ckpt: Checkpoint, origin: &Path, device: &Device) -> anyhow::Result<Self> {
        let device = device.clone().autodiff();
        let mut model = DitNet::new(&ckpt.state.model, &device, 0);
        weights::load_safetensors_bytes(&mut model, ckpt.model_bytes, &origin.join(checkpoint::MODEL_FILE))?;
        let table = ParamTable::of(&model);
        ensure!(
            table == ckpt.state.params,
            "{}: the parameter layout recorded in the checkpoint does not match its model config",
            origin.display()
        );
        let params = table.read_values(&model);
        let mut ema_model = DitNet::new(&ckpt.state.model, &device.clone().inner(), 0);
        weights::load_safetensors_bytes(&mut ema_model, ckpt.ema_bytes, &origin.join(checkpoint::EMA_FILE))?;
        let ema = table.read_values(&ema_model);
        let schedule = NoiseSchedule::new(ckpt.state.train.schedule, ckpt.state.train.timesteps);
        Ok(Self { device, model, table, params, adam: ckpt.adam, ema, schedule, state: ckpt.state })
    }

    pub fn model(&self) -> &DitNet {
        &self.model
    }

    pub fn params(&self) -> &[f32] {
        &self.params
    }

    pub fn ema(&self) -> &[f32] {
        &self.ema
    }

    pub fn table(&self) -> &ParamTable {
        &self.table
    }

    /// One optimizer step on `batch`; the timesteps and noise come from the stream of this
    /// step, so the step is a pure function of (weights, optimizer state, batch, seed, step).
    pub fn step(&mut self, batch: &Batch) -> StepOutcome {
        let b = batch.labels.len();
        let mut rng = stream(self.state.train.seed, Purpose::TrainNoise, self.state.step);
        let sampling = self.state.train.timestep_sampling;
        let t: Vec<usize> = (0..b).map(|_| sampling.draw(self.schedule.timesteps(), &mut rng)).collect();
        let eps = gaussian(&mut rng, batch.images.len());
        let labels = match self.state.model.null_label() {
            Some(null) => drop_labels(&batch.labels, self.state.train.label_dropout, null as u8, &mut rng),
            None => batch.labels.clone(),
        };
        self.step_on(&batch.images, &labels, &t, eps)
    }

    /// One optimizer step with given levels `t` and noise `eps` (one row per image).
    pub fn step_on(&mut self, x0: &[f32], labels: &[u8], t: &[usize], eps: Vec<f32>) -> StepOutcome {
        let step = self.state.step;
        let (xt, target) = profile::time(Region::Noising, || {
            let mut xt = vec![0f32; x0.len()];
            self.schedule.add_noise(x0, t, &eps, &mut xt);
            let mut target = vec![0f32; x0.len()];
            self.schedule.target(x0, &eps, &mut target);
            (xt, target)
        });
        let (loss, g) = self.gradient(&xt, &target, t, labels);

        let train = &self.state.train;
        let lr = train.lr_at(step);
        profile::time(Region::Optimizer, || {
            self.adam.update(&train.adam, lr, &mut self.params, &g);
            super::ema::update(&mut self.ema, &self.params, super::ema::decay_at(train.ema_decay, step));
        });
        // Cloning a module clones tensor handles, not data.
        self.model = profile::time(Region::WriteBack, || self.table.write_values(self.model.clone(), &self.params));

        self.state.step += 1;
        StepOutcome { loss, lr }
    }

    /// The batch's loss and flat gradient: the size-weighted mean over the run's micro-batches,
    /// each on its own copy of the model (its own autodiff graph), in parallel.
    fn gradient(&self, xt: &[f32], target: &[f32], t: &[usize], labels: &[u8]) -> (f32, Vec<f32>) {
        let b = labels.len();
        let row = xt.len() / b;
        let parts = micro_batches(b, self.state.train.micro_batches);
        let results: Vec<(f32, Vec<f32>)> = parts
            .par_iter()
            .map(|r| {
                let model = if r.start == 0 {
                    self.model.clone()
                } else {
                    self.table.write_values(self.model.clone(), &self.params)
                };
                let rows = r.start * row..r.end * row;
                self.micro_gradient(&model, &xt[rows.clone()], &target[rows], &t[r.clone()], &labels[r.clone()])
            })
            .collect();
        let mut results = results;
        if results.len() == 1 {
            return results.pop().expect("one part");
        }
        // A fixed order of summation: the step does not depend on which thread finished first.
        profile::time(Region::Gradients, || {
            let mut loss = 0f32;
            let mut g = vec![0f32; self.table.total];
            for (r, (part_loss, part_g)) in parts.iter().zip(&results) {
                let w = r.len() as f32 / b as f32;
                loss += w * part_loss;
                g.iter_mut().zip(part_g).for_each(|(a, &v)| *a += w * v);
            }
            (loss, g)
        })
    }

    fn micro_gradient(
        &self,
        model: &DitNet,
        xt: &[f32],
        target: &[f32],
        t: &[usize],
        labels: &[u8],
    ) -> (f32, Vec<f32>) {
        let cfg = &self.state.model;
        let b = labels.len();
        let dims = [b, cfg.channels, cfg.image_size, cfg.image_size];
        let d = &self.device;
        let xt = Tensor::<4>::from_data(TensorData::new(xt.to_vec(), dims), d);
        let target = Tensor::<4>::from_data(TensorData::new(target.to_vec(), dims), d);
        let tt = Tensor::<1, Int>::from_data(TensorData::new(t.iter().map(|&v| v as i64).collect::<Vec<_>>(), [b]), d);
        let y =
            Tensor::<1, Int>::from_data(TensorData::new(labels.iter().map(|&v| v as i64).collect::<Vec<_>>(), [b]), d);
        let (loss, loss_value) = profile::time(Region::Forward, || {
            let loss = noise_loss(model, xt, tt, y, target, self.state.train.loss);
            let value = loss.to_data().iter::<f32>().next().unwrap_or(f32::NAN);
            (loss, value)
        });
        let grads = profile::time(Region::Backward, || loss.backward());
        (loss_value, profile::time(Region::Gradients, || self.table.read_grads(model, &grads)))
    }

    /// Save a checkpoint of the current state under `run_dir`.
    pub fn save(&self, run_dir: &Path, keep: usize) -> anyhow::Result<PathBuf> {
        let model_bytes = weights::to_safetensors_bytes(&self.model)?;
        let ema_bytes = weights::to_safetensors_bytes(&self.table.write_values(self.model.clone(), &self.ema))?;
        checkpoint::save(run_dir, self.state.clone(), &model_bytes, &ema_bytes, &self.adam, keep)
    }
}

/// `parts` contiguous, non-empty row ranges covering `0..batch`, sizes differing by at most one
/// (the first ones larger).
pub fn micro_batches(batch: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.clamp(1, batch.max(1));
    let (size, extra) = (batch / parts, batch % parts);
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let len = size + usize::from(i < extra);
            start += len;
            start - len..start
        })
        .collect()
}

/// Replace each label by `null` with probability `p` (label dropout for classifier-free
/// guidance). Draws nothing when `p` is 0, so runs without dropout keep their noise streams.
pub fn drop_labels(labels: &[u8], p: f64, null: u8, rng: &mut impl Rng) -> Vec<u8> {
    if p == 0.0 {
        return labels.to_vec();
    }
    labels.iter().map(|&l| if rng.random_bool(p) { null } else { l }).collect()
}

/// The training objective: the loss between the network's prediction and its target (the
/// noise ε, or the flow velocity ε − x_0; see [`NoiseSchedule::target`]).
pub fn noise_loss(
    model: &DitNet,
    xt: Tensor<4>,
    t: Tensor<1, Int>,
    y: Tensor<1, Int>,
    target: Tensor<4>,
    kind: LossKind,
) -> Tensor<1> {
    let diff = model.forward(xt, t, y) - target;
    match kind {
        LossKind::L1 => diff.abs().mean(),
        LossKind::Mse => diff.square().mean(),
    }
}

/// How long a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Length {
    Steps(u64),
    Epochs(u64),
}

/// Everything `dits train` needs.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
    pub model: DitConfig,
    pub train: TrainConfig,
    pub length: Length,
    /// Continue the run in `run_dir` from its latest checkpoint.
    pub resume: bool,
    /// Stop at this step with a checkpoint, although the run (and so its learning-rate
    /// schedule) is sized by `length`; `--resume` continues it.
    pub stop_after: Option<u64>,
    /// Checkpoints kept on disk.
    pub keep: usize,
    pub progress: bool,
    pub device: Device,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub steps: u64,
    pub final_loss: f64,
    pub samples_per_s: f64,
    pub elapsed_s: f64,
    pub checkpoint: PathBuf,
}

/// `dits train`.
pub fn run(opts: TrainOptions) -> anyhow::Result<TrainSummary> {
    let run_dir = &opts.run_dir;
    let mut trainer = if opts.resume {
        let dir = checkpoint::resolve(run_dir)?;
        let ckpt = checkpoint::load(&dir)?;
        let trainer = Trainer::from_checkpoint(ckpt, &dir, &opts.device)?;
        metrics::truncate_after(run_dir, trainer.state.step)?;
        trainer
    } else {
        if checkpoint::checkpoints_dir(run_dir).exists() || run_dir.join(metrics::METRICS_FILE).exists() {
            bail!(
                "{} already holds a training run: pass --resume {} to continue it, or choose another --out",
                run_dir.display(),
                run_dir.display()
            );
        }
        Trainer::new(opts.model.clone(), opts.train.clone(), opts.data_dir.display().to_string(), &opts.device)?
    };
    let data_dir = if opts.resume { PathBuf::from(&trainer.state.data_dir) } else { opts.data_dir.clone() };
    let cfg = trainer.state.model.clone();
    let ds = Arc::new(ImageDataset::load(&data_dir, Split::Train, cfg.classes)?);
    ensure!(
        ds.height == cfg.image_size && ds.width == cfg.image_size && ds.channels == cfg.channels,
        "{}: images are {}×{}×{}, the model expects {}×{}×{}",
        data_dir.display(),
        ds.channels,
        ds.height,
        ds.width,
        cfg.channels,
        cfg.image_size,
        cfg.image_size
    );
    let batch = trainer.state.train.batch;
    BatchLoader::check(ds.len(), batch)?;
    let per_epoch = crate::data::loader::batches_per_epoch(ds.len(), batch);
    trainer.state.train.total_steps = match opts.length {
        Length::Steps(s) => s,
        Length::Epochs(e) => e * per_epoch,
    };
    trainer.state.train.validate()?;
    let total = trainer.state.train.total_steps;
    ensure!(
        trainer.state.step < total,
        "the run is already at step {} of {total}: pass a larger --steps/--epochs to continue it",
        trainer.state.step
    );
    let stop = opts.stop_after.map_or(total, |s| s.min(total));
    ensure!(trainer.state.step < stop, "--stop-after {stop} is not past the run's current step {}", trainer.state.step);
    std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;

    let start_step = trainer.state.step;
    let mut loader = BatchLoader::new(
        ds,
        batch,
        trainer.state.train.seed,
        Position { epoch: start_step / per_epoch, index: start_step % per_epoch },
    );
    let bar = progress_bar(opts.progress, start_step, total);
    let (log_every, ckpt_every) = (trainer.state.train.log_every, trainer.state.train.checkpoint_every);
    let run_start = Instant::now();
    let elapsed_before = trainer.state.elapsed_s;
    let mut interval = (Instant::now(), 0f64, 0u64);
    let mut last_loss = f64::NAN;
    let mut last_ckpt = None;
    tracing::info!(
        "training {} parameters from step {start_step} to {total} ({per_epoch} steps per epoch, batch {batch})",
        trainer.table().total
    );
    while trainer.state.step < stop {
        let b = loader.next_batch();
        let out = trainer.step(&b);
        if !out.loss.is_finite() {
            bar.abandon();
            bail!(
                "the loss became {} at step {}: training stopped, the last checkpoint is kept. \
                 A learning rate too high for this batch size is the usual cause (try a lower --lr)",
                out.loss,
                trainer.state.step
            );
        }
        let step = trainer.state.step;
        trainer.state.epoch = step / per_epoch;
        trainer.state.batch_in_epoch = step % per_epoch;
        interval.1 += out.loss as f64;
        interval.2 += 1;
        bar.set_position(step);
        if step % log_every == 0 || step == stop {
            let secs = interval.0.elapsed().as_secs_f64();
            let rate = (interval.2 as usize * batch) as f64 / secs.max(1e-9);
            last_loss = interval.1 / interval.2 as f64;
            bar.set_message(format!("epoch {} | loss {last_loss:.4} | {rate:.0} samples/s", b.epoch));
            metrics::append(
                run_dir,
                &MetricsRecord {
                    step,
                    epoch: b.epoch,
                    loss: last_loss,
                    lr: out.lr,
                    samples_per_s: rate,
                    elapsed_s: elapsed_before + run_start.elapsed().as_secs_f64(),
                },
            )?;
            interval = (Instant::now(), 0.0, 0);
        }
        if step % ckpt_every == 0 || step == stop {
            trainer.state.elapsed_s = elapsed_before + run_start.elapsed().as_secs_f64();
            let dir = trainer.save(run_dir, opts.keep)?;
            if let Err(e) = metrics::plot_loss(run_dir) {
                tracing::warn!("could not draw the loss plot: {e:#}");
            }
            bar.suspend(|| tracing::info!("step {step}: checkpoint {}", dir.display()));
            last_ckpt = Some(dir);
        }
    }
    bar.finish();
    let elapsed = run_start.elapsed().as_secs_f64();
    Ok(TrainSummary {
        steps: trainer.state.step,
        final_loss: last_loss,
        samples_per_s: ((trainer.state.step - start_step) as usize * batch) as f64 / elapsed.max(1e-9),
        elapsed_s: elapsed,
        checkpoint: last_ckpt.expect("at least one step ran, and the last step always checkpoints"),
    })
}

fn progress_bar(visible: bool, start: u64, total: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(total),
        if visible { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() },
    );
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30.cyan/blue}] {pos}/{len} steps, ETA {eta} | {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_position(start);
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_batches_cover_the_batch_in_near_equal_contiguous_parts() {
        assert_eq!(micro_batches(11, 3), vec![0..4, 4..8, 8..11]);
        assert_eq!(micro_batches(32, 2), vec![0..16, 16..32]);
        assert_eq!(micro_batches(3, 5), vec![0..1, 1..2, 2..3]);
        assert_eq!(micro_batches(7, 1), vec![0..7]);
    }

    #[test]
    fn label_dropout_replaces_about_p_of_the_labels_reproducibly() {
        let labels: Vec<u8> = (0..10_000).map(|i| (i % 10) as u8).collect();
        let run = |seed| drop_labels(&labels, 0.1, 10, &mut stream(seed, Purpose::TrainNoise, 0));
        let dropped = run(1);
        let nulls = dropped.iter().filter(|&&l| l == 10).count();
        assert!((900..1100).contains(&nulls), "{nulls} of 10000 dropped at p = 0.1");
        assert!(dropped.iter().zip(&labels).all(|(&d, &l)| d == l || d == 10));
        assert_eq!(run(1), dropped);
        assert_ne!(run(2), dropped);
        assert_eq!(drop_labels(&labels, 0.0, 10, &mut stream(1, Purpose::TrainNoise, 0)), labels);
    }
}
