//! The training step (noise, predict, loss, backward, Adam) and the loop around it (data,
//! progress, metrics, checkpoints, resume).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
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
use crate::distributed::data_parallel::DataParallel;
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
    /// Adam's moments for this rank's shard of `params` (all of them unless ZeRO-1).
    adam: AdamState,
    /// Moving average of `params`.
    ema: Vec<f32>,
    schedule: NoiseSchedule,
    pub state: CheckpointState,
    /// The ranks this trainer shares its steps with (one, by default).
    dp: DataParallel,
    /// Check every step's loss and gradient for NaN/Inf (`--detect-anomaly`).
    pub detect_anomaly: bool,
}

/// What one step computed.
#[derive(Debug, Clone)]
pub struct StepOutcome {
    pub loss: f32,
    pub lr: f64,
    /// With `detect_anomaly`: what was first found not finite (the loss, or a parameter's
    /// gradient on this rank), before the optimizer step used it.
    pub anomaly: Option<String>,
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
        let model = DitNet::new(&model_cfg, &device, derive_seed(train.seed, Purpose::Init, 0));
        let table = ParamTable::of(&model);
        let params = table.read_values(&model);
        let adam = AdamState::new(table.total);
        let ema = params.clone();
        let state = CheckpointState::new(model_cfg, train, table.clone(), data_dir);
        Ok(Self::assemble(device, model, table, params, adam, ema, state))
    }

    /// A trainer of one rank, without anomaly checks, from its parts.
    fn assemble(
        device: Device,
        model: DitNet,
        table: ParamTable,
        params: Vec<f32>,
        adam: AdamState,
        ema: Vec<f32>,
        state: CheckpointState,
    ) -> Self {
        let schedule = NoiseSchedule::new(state.train.schedule, state.train.timesteps);
        Self {
            device,
            model,
            table,
            params,
            adam,
            ema,
            schedule,
            state,
            dp: DataParallel::default(),
            detect_anomaly: false,
        }
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
        Ok(Self::assemble(device, model, table, params, ckpt.adam, ema, ckpt.state))
    }

    /// Share the steps with the ranks of `dp`: from now on this rank computes the gradient of
    /// its rows of each batch and keeps the optimizer state of its shard. All ranks must hold
    /// the same weights and state when this is called (see [`Trainer::broadcast_from_lead`]).
    pub fn with_data_parallel(mut self, dp: DataParallel) -> Self {
        self.adam = dp.shard_of(&self.adam);
        self.dp = dp;
        self
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

    /// One optimizer step with given levels `t` and noise `eps` (one row per image) of the
    /// whole (global) batch; with several ranks, this rank computes its rows only.
    pub fn step_on(&mut self, x0: &[f32], labels: &[u8], t: &[usize], eps: Vec<f32>) -> StepOutcome {
        let step = self.state.step;
        let batch = labels.len();
        let rows = self.dp.my_rows(batch);
        let row = x0.len() / batch.max(1);
        let (x0, eps) = (&x0[rows.start * row..rows.end * row], &eps[rows.start * row..rows.end * row]);
        let (t, labels) = (&t[rows.clone()], &labels[rows.clone()]);
        let (xt, target) = profile::time(Region::Noising, || {
            let mut xt = vec![0f32; x0.len()];
            self.schedule.add_noise(x0, t, eps, &mut xt);
            let mut target = vec![0f32; x0.len()];
            self.schedule.target(x0, eps, &mut target);
            (xt, target)
        });
        let (loss, g) = self.gradient(&xt, &target, t, labels);
        let anomaly = if self.detect_anomaly { self.first_non_finite(loss, &g) } else { None };

        let train = &self.state.train;
        let lr = train.lr_at(step);
        let loss = profile::time(Region::Optimizer, || {
            let loss = self.dp.step(g, loss, rows.len(), batch, &mut self.adam, &train.adam, lr, &mut self.params);
            super::ema::update(&mut self.ema, &self.params, super::ema::decay_at(train.ema_decay, step));
            loss
        });
        // Cloning a module clones tensor handles, not data.
        self.model = profile::time(Region::WriteBack, || self.table.write_values(self.model.clone(), &self.params));

        self.state.step += 1;
        StepOutcome { loss, lr, anomaly }
    }

    /// The loss if it is not finite, else the first parameter whose gradient has a NaN or an
    /// infinity, by name.
    fn first_non_finite(&self, loss: f32, grad: &[f32]) -> Option<String> {
        if !loss.is_finite() {
            return Some(format!("the loss is {loss}"));
        }
        let i = grad.iter().position(|g| !g.is_finite())?;
        let slot = self.table.slots.iter().find(|s| s.range().contains(&i))?;
        let bad = grad[slot.range()].iter().filter(|g| !g.is_finite()).count();
        Some(format!(
            "the gradient of {} ({bad} of its {} values) is {} (first non-finite gradient in parameter order)",
            slot.name,
            slot.len(),
            grad[i]
        ))
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

    /// Save a checkpoint of the current state under `run_dir`. With several ranks every rank
    /// must call this (ZeRO-1 gathers the optimizer state) and rank 0 alone writes; all return
    /// the checkpoint's directory.
    pub fn save(&self, run_dir: &Path, keep: usize) -> anyhow::Result<PathBuf> {
        let Some(adam) = self.dp.gather_optimizer(&self.adam, self.table.total) else {
            return Ok(checkpoint::checkpoint_dir(run_dir, self.state.step));
        };
        let model_bytes = weights::to_safetensors_bytes(&self.model)?;
        let ema_bytes = weights::to_safetensors_bytes(&self.table.write_values(self.model.clone(), &self.ema))?;
        checkpoint::save(run_dir, self.state.clone(), &model_bytes, &ema_bytes, &adam, keep)
    }

    /// Rank 0's trainer on every rank: rank 0 passes its own (or the error that kept it from
    /// building one), the others receive its state, weights and optimizer state. A world of one
    /// returns `lead` as it is.
    pub fn broadcast_from_lead(
        lead: Option<anyhow::Result<Self>>,
        comm: &dyn crate::distributed::Collective,
        device: &Device,
    ) -> anyhow::Result<Self> {
        if comm.size() == 1 {
            return lead.expect("rank 0 builds the trainer");
        }
        let mut bytes = match &lead {
            Some(Ok(t)) => t.snapshot()?,
            // Empty: rank 0 failed and reports why itself.
            _ => Vec::new(),
        };
        comm.broadcast_bytes(&mut bytes);
        match lead {
            Some(trainer) => trainer,
            None if bytes.is_empty() => bail!("rank 0 could not start the run (its error says why)"),
            None => Self::from_snapshot(&bytes, device),
        }
    }

    /// State, weights, moving average and optimizer state as bytes: the state as JSON, then
    /// little-endian f32 vectors, each after its length.
    fn snapshot(&self) -> anyhow::Result<Vec<u8>> {
        let mut out = Vec::new();
        let json = serde_json::to_vec(&self.state)?;
        out.extend((json.len() as u64).to_le_bytes());
        out.extend(json);
        out.extend(self.adam.step.to_le_bytes());
        for v in [&self.params, &self.ema, &self.adam.m, &self.adam.v] {
            out.extend((v.len() as u64).to_le_bytes());
            v.iter().for_each(|x| out.extend(x.to_le_bytes()));
        }
        Ok(out)
    }

    fn from_snapshot(bytes: &[u8], device: &Device) -> anyhow::Result<Self> {
        let mut at = 0;
        let mut take = |n: usize| -> anyhow::Result<&[u8]> {
            let s = bytes.get(at..at + n).context("truncated trainer snapshot from rank 0")?;
            at += n;
            Ok(s)
        };
        let u64_of = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
        let json_len = u64_of(take(8)?) as usize;
        let state: CheckpointState = serde_json::from_slice(take(json_len)?)?;
        let adam_step = u64_of(take(8)?);
        let mut vector = || -> anyhow::Result<Vec<f32>> {
            let n = u64_of(take(8)?) as usize;
            Ok(take(4 * n)?.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect())
        };
        let (params, ema, m, v) = (vector()?, vector()?, vector()?, vector()?);
        let device = device.clone().autodiff();
        let model = DitNet::new(&state.model, &device, 0);
        let table = ParamTable::of(&model);
        ensure!(table == state.params && params.len() == table.total, "trainer snapshot: parameter layout mismatch");
        let model = table.write_values(model, &params);
        let adam = AdamState { m, v, step: adam_step };
        Ok(Self::assemble(device, model, table, params, adam, ema, state))
    }

    /// Bytes of optimizer state this rank keeps.
    pub fn optimizer_bytes(&self) -> usize {
        self.dp.optimizer_bytes(self.table.total)
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
    /// The run's length; `None` keeps a resumed run's own.
    pub length: Option<Length>,
    /// Continue the run in `run_dir` from its latest checkpoint.
    pub resume: bool,
    /// Stop at this step with a checkpoint, although the run (and so its learning-rate
    /// schedule) is sized by `length`; `--resume` continues it.
    pub stop_after: Option<u64>,
    /// Checkpoints kept on disk.
    pub keep: usize,
    pub progress: bool,
    pub device: Device,
    /// The ranks of a multi-process run (one by default).
    pub dp: DataParallel,
    /// Check each step's loss and gradients for NaN/Inf and name the first parameter affected.
    pub detect_anomaly: bool,
}

/// Set when the process is asked to stop (Ctrl-C, SIGTERM, SIGHUP): the loop finishes its
/// step, writes a checkpoint and returns. A second request exits at once (the last checkpoint
/// on disk is complete either way: checkpoints are written to a temporary name and renamed).
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

/// Install the stop handler (once per process; tests run several trainings in one).
fn catch_stop_signals() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let handler = || {
            if STOP_REQUESTED.swap(true, Ordering::SeqCst) {
                eprintln!("stopping now, without a checkpoint (the last one on disk is intact)");
                std::process::exit(130);
            }
            eprintln!("stopping after this step and its checkpoint (press Ctrl-C again to stop at once)");
        };
        if let Err(e) = ctrlc::set_handler(handler) {
            tracing::warn!("Ctrl-C will not stop training cleanly: {e}");
        }
    });
}

/// Whether any rank was asked to stop (all ranks then stop at the same step).
fn stop_requested(dp: &DataParallel) -> bool {
    let mine = STOP_REQUESTED.load(Ordering::SeqCst);
    if dp.world() == 1 {
        return mine;
    }
    let mut flag = [f32::from(u8::from(mine))];
    dp.comm.all_reduce_sum(&mut flag);
    flag[0] > 0.0
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub steps: u64,
    pub final_loss: f64,
    pub samples_per_s: f64,
    pub elapsed_s: f64,
    pub checkpoint: PathBuf,
    /// This process's rank, and the number of ranks (1 without `--dist`).
    pub rank: usize,
    pub ranks: usize,
    /// Stopped early by a signal (Ctrl-C), after a checkpoint.
    pub interrupted: bool,
}

/// `dits train`. With several ranks (`opts.dp`), every rank calls this: rank 0 builds or
/// resumes the run and hands it to the others, and alone writes checkpoints, metrics and
/// progress.
pub fn run(opts: TrainOptions) -> anyhow::Result<TrainSummary> {
    let run_dir = &opts.run_dir;
    let dp = opts.dp.clone();
    // Held until the run returns: one process at a time trains in a run directory.
    let mut run_lock = None;
    let lead = dp.is_lead().then(|| {
        if opts.resume && run_dir.is_dir() {
            run_lock = Some(lock_run_dir(run_dir)?);
        }
        start_or_resume(&opts)
    });
    let trainer = Trainer::broadcast_from_lead(lead, dp.comm.as_ref(), &opts.device)?;
    ensure!(
        trainer.state.train.batch >= dp.world(),
        "the batch ({}) is smaller than the number of ranks ({}): each rank needs at least one image",
        trainer.state.train.batch,
        dp.world()
    );
    let mut trainer = trainer.with_data_parallel(dp.clone());
    trainer.detect_anomaly = opts.detect_anomaly;
    let data_dir = if opts.resume { PathBuf::from(&trainer.state.data_dir) } else { opts.data_dir.clone() };
    let lead = dp.is_lead();
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
    if let Some(length) = opts.length {
        trainer.state.train.total_steps = match length {
            Length::Steps(s) => s,
            Length::Epochs(e) => e * per_epoch,
        };
    }
    trainer.state.train.validate()?;
    let total = trainer.state.train.total_steps;
    ensure!(
        trainer.state.step < total,
        "the run is already at step {} of {total}: pass a larger --steps/--epochs to continue it",
        trainer.state.step
    );
    let stop = opts.stop_after.map_or(total, |s| s.min(total));
    ensure!(trainer.state.step < stop, "--stop-after {stop} is not past the run's current step {}", trainer.state.step);
    let _run_lock = match (lead, run_lock) {
        (false, _) => None,
        (true, Some(held)) => Some(held),
        (true, None) => {
            std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
            Some(lock_run_dir(run_dir)?)
        }
    };

    let start_step = trainer.state.step;
    let mut loader = BatchLoader::new(
        ds,
        batch,
        trainer.state.train.seed,
        Position { epoch: start_step / per_epoch, index: start_step % per_epoch },
    );
    let bar = progress_bar(opts.progress && lead, start_step, total);
    let (log_every, ckpt_every) = (trainer.state.train.log_every, trainer.state.train.checkpoint_every);
    let run_start = Instant::now();
    let elapsed_before = trainer.state.elapsed_s;
    let mut interval = (Instant::now(), 0f64, 0u64);
    let mut last_loss = f64::NAN;
    let mut last_ckpt = None;
    if lead {
        tracing::info!(
            "training {} parameters from step {start_step} to {total} ({per_epoch} steps per epoch, batch {batch})",
            trainer.table().total
        );
    }
    if lead && dp.world() > 1 {
        tracing::info!(
            "{} ranks, {} rows of each batch on rank 0, optimizer state {:?}: {:.2} MiB on rank 0",
            dp.world(),
            dp.my_rows(batch).len(),
            dp.zero,
            trainer.optimizer_bytes() as f64 / (1 << 20) as f64
        );
    }
    catch_stop_signals();
    STOP_REQUESTED.store(false, Ordering::SeqCst);
    let mut interrupted = false;
    while trainer.state.step < stop && !interrupted {
        let b = loader.next_batch();
        let out = trainer.step(&b);
        if let Some(anomaly) = &out.anomaly {
            bar.abandon();
            bail!("anomaly at step {}: {anomaly}; training stopped, the last checkpoint is kept", trainer.state.step);
        }
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
        interrupted = stop_requested(&dp);
        trainer.state.epoch = step / per_epoch;
        trainer.state.batch_in_epoch = step % per_epoch;
        interval.1 += out.loss as f64;
        interval.2 += 1;
        bar.set_position(step);
        if step % log_every == 0 || step == stop || interrupted {
            let secs = interval.0.elapsed().as_secs_f64();
            let rate = (interval.2 as usize * batch) as f64 / secs.max(1e-9);
            last_loss = interval.1 / interval.2 as f64;
            bar.set_message(format!("epoch {} | loss {last_loss:.4} | {rate:.0} samples/s", b.epoch));
            if lead {
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
            }
            interval = (Instant::now(), 0.0, 0);
        }
        if step % ckpt_every == 0 || step == stop || interrupted {
            trainer.state.elapsed_s = elapsed_before + run_start.elapsed().as_secs_f64();
            let dir = trainer.save(run_dir, opts.keep)?;
            if lead {
                if let Err(e) = metrics::plot_loss(run_dir) {
                    tracing::warn!("could not draw the loss plot: {e:#}");
                }
                bar.suspend(|| tracing::info!("step {step}: checkpoint {}", dir.display()));
            }
            last_ckpt = Some(dir);
        }
    }
    if interrupted {
        bar.abandon();
    } else {
        bar.finish();
    }
    let elapsed = run_start.elapsed().as_secs_f64();
    if dp.world() > 1 {
        let c = dp.comm.stats();
        let steps = (trainer.state.step - start_step).max(1);
        tracing::info!(
            "rank {}: {:.1} s of {elapsed:.1} s in communication, {:.2} MB sent per step ({} calls)",
            dp.rank(),
            c.time.as_secs_f64(),
            c.bytes as f64 / steps as f64 / 1e6,
            c.calls
        );
    }
    Ok(TrainSummary {
        steps: trainer.state.step,
        final_loss: last_loss,
        samples_per_s: ((trainer.state.step - start_step) as usize * batch) as f64 / elapsed.max(1e-9),
        elapsed_s: elapsed,
        checkpoint: last_ckpt.expect("at least one step ran, and the last step always checkpoints"),
        rank: dp.rank(),
        ranks: dp.world(),
        interrupted,
    })
}

/// Lock `run_dir` for this process (an advisory lock on `run_dir/.lock`, released by the
/// kernel when the process ends, however it ends).
fn lock_run_dir(run_dir: &Path) -> anyhow::Result<std::fs::File> {
    let path = run_dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            bail!("{}: another dits process is training in this run directory", run_dir.display())
        }
        Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {}", path.display())),
    }
}

/// Rank 0's trainer: a new run, or the run in `opts.run_dir` resumed from its latest checkpoint.
fn start_or_resume(opts: &TrainOptions) -> anyhow::Result<Trainer> {
    let run_dir = &opts.run_dir;
    if opts.resume {
        let dir = checkpoint::resolve(run_dir)?;
        let ckpt = checkpoint::load(&dir)?;
        let mut trainer = Trainer::from_checkpoint(ckpt, &dir, &opts.device)?;
        metrics::truncate_after(run_dir, trainer.state.step)?;
        // The two settings a resumed run may change (checked by the CLI).
        trainer.state.train.checkpoint_every = opts.train.checkpoint_every;
        trainer.state.train.log_every = opts.train.log_every;
        return Ok(trainer);
    }
    if checkpoint::checkpoints_dir(run_dir).exists() || run_dir.join(metrics::METRICS_FILE).exists() {
        bail!(
            "{} already holds a training run: pass --resume {} to continue it, or choose another --out",
            run_dir.display(),
            run_dir.display()
        );
    }
    Trainer::new(opts.model.clone(), opts.train.clone(), opts.data_dir.display().to_string(), &opts.device)
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
