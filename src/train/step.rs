//! One optimisation step, a pure function of (weights, optimizer state, batch, seed, step):
//! noise the batch, predict, take the loss and its gradient over the micro-batches, and let the
//! ranks' data-parallel step update the weights and their moving average.

use std::path::{Path, PathBuf};

use anyhow::ensure;
use burn::prelude::*;
use burn::tensor::DType;
use rand::Rng;
use rayon::prelude::*;

use super::checkpoint::{self, Checkpoint};
use super::config::{LossKind, TrainConfig};
use super::params::ParamTable;
use super::pieces::{MicroBatch, Pieces};
use super::pipeline::Stage;
use super::sequence_parallel::shard_loss;
use super::state::RunState;
use super::tp_layout::TpLayout;
use crate::data::{Batch, DataSource};
use crate::diffusion::schedule::NoiseSchedule;
use crate::distributed::data_parallel::{DataParallel, ZeroStage};
use crate::distributed::partition::Partition;
use crate::kernels::{SequenceParallel, TensorParallel};
use crate::model::{DitConfig, DitNet, weights};
use crate::optim::{AdamState, CHUNK, ema};
use crate::profile::{self, Region};
use crate::ranges::micro_batches;
use crate::rng::{Purpose, derive_seed, standard_normal, stream};

/// A model with its optimizer state and counters.
pub struct Trainer {
    pub(super) device: Device,
    pub(super) model: DitNet,
    pub(super) table: ParamTable,
    /// The master copy of the weights; the model's tensors are rebuilt from it after each step.
    /// Under ZeRO-3, this rank's shard of them (and `model` is the shell alone).
    pub(super) params: Vec<f32>,
    /// Adam's moments for this rank's shard of `params` (all of them without ZeRO).
    pub(super) adam: AdamState,
    /// Moving average of `params` (under ZeRO-3, of this rank's shard).
    pub(super) ema: Vec<f32>,
    /// Which parameters' optimizer state (and from ZeRO-2, gradients) this rank keeps.
    pub(super) partition: Partition,
    /// The network cut into pieces, for ZeRO-2 and -3 and pipeline stages.
    pub(super) pieces: Option<Pieces>,
    /// This rank's pipeline stage (`None`: it runs the whole network). Then `params`, `ema` and
    /// `adam` hold the stage's range of the flat vector, and `model` is the shell.
    pub(super) stage: Option<Stage>,
    pub(super) schedule: NoiseSchedule,
    pub state: RunState,
    /// The ranks this trainer shares its steps with (one, by default).
    pub(super) dp: DataParallel,
    /// The ranks the blocks are split over, and this rank's share of the parameters (`None`:
    /// all of them); see [`super::tensor_parallel`].
    pub(super) tp: TensorParallel,
    pub(super) layout: Option<TpLayout>,
    /// The ranks each image's tokens are split over (see [`super::sequence_parallel`]).
    pub(super) sp: Option<SequenceParallel>,
    /// Check every step's loss and gradient for NaN/Inf (`--detect-anomaly`).
    pub detect_anomaly: bool,
}

/// Bytes of a rank's training state by kind ([`Trainer::memory`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    pub params: usize,
    pub grads: usize,
    pub optimizer: usize,
}

/// What one step computed.
#[derive(Debug, Clone)]
pub struct StepOutcome {
    pub loss: f32,
    pub lr: f64,
    /// With `detect_anomaly`: what was first found not finite (the loss, or a parameter's
    /// gradient on this rank), before the optimizer step used it.
    pub anomaly: Option<String>,
    /// fp16: the gradient overflowed, and the step changed nothing but the loss scale.
    pub skipped: bool,
    /// fp16: the loss scale this step used.
    pub loss_scale: Option<f32>,
}

impl Trainer {
    /// A fresh model, initialised from the run's seed. `device` gets autodiff.
    pub fn new(model_cfg: DitConfig, train: TrainConfig, data: DataSource, device: &Device) -> anyhow::Result<Self> {
        model_cfg.validate()?;
        train.validate()?;
        ensure!(
            train.label_dropout == 0.0 || model_cfg.null_class,
            "label dropout needs a model with a null label (null_class = true)"
        );
        let device = device.clone().autodiff();
        let seed = derive_seed(train.seed, Purpose::Init, 0);
        let model = if device.clone().inner() == Device::flex() {
            DitNet::new(&model_cfg, &device, seed)
        } else {
            // Each backend draws its own random numbers: a GPU run draws its weights on the CPU,
            // so that a seed starts the same network on every device.
            let drawn = DitNet::new(&model_cfg, &Device::flex(), seed);
            let table = ParamTable::of(&drawn);
            table.write_values(DitNet::new(&model_cfg, &device, seed), &table.read_values(&drawn))
        };
        let table = ParamTable::of(&model);
        let params = table.read_values(&model);
        let adam = AdamState::new(table.total);
        let ema = params.clone();
        let state = RunState::new(model_cfg, train, table.clone(), data);
        Ok(Self::assemble(device, model, table, params, adam, ema, state))
    }

    /// A trainer of one rank, without anomaly checks, from its parts.
    pub(super) fn assemble(
        device: Device,
        model: DitNet,
        table: ParamTable,
        params: Vec<f32>,
        adam: AdamState,
        ema: Vec<f32>,
        state: RunState,
    ) -> Self {
        let schedule = NoiseSchedule::new(state.train.schedule, state.train.timesteps);
        let partition = Partition::replicated(table.total);
        Self {
            partition,
            pieces: None,
            stage: None,
            device,
            model,
            table,
            params,
            adam,
            ema,
            schedule,
            state,
            dp: DataParallel::default(),
            tp: TensorParallel::single(),
            layout: None,
            sp: None,
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
    ///
    /// Under ZeRO-3 this rank then keeps only its shard of the weights and their average, and of
    /// the model only the shell: the blocks are built from gathered weights as they run.
    pub fn with_data_parallel(mut self, dp: DataParallel) -> anyhow::Result<Self> {
        if dp.zero.shards_gradients() {
            ensure!(
                self.tp.size() == 1 && self.sp.is_none(),
                "--zero {} shards over data-parallel ranks only: it does not combine with --tp or --sp (use --zero 1)",
                dp.zero.number()
            );
            ensure!(
                self.stage.is_none(),
                "--zero {} does not combine with --pp: a stage already keeps only its own pieces' state (use --zero 1)",
                dp.zero.number()
            );
            self.pieces = Some(Pieces::new(&self.model, &self.table)?);
        }
        let segments = self.pieces.as_ref().map_or_else(Vec::new, |p| p.segments.clone());
        self.partition = dp.partition(self.params.len(), &segments);
        self.adam = dp.shard_of(&self.adam, &self.partition);
        if dp.zero == ZeroStage::Three {
            self.params = self.partition.take(&self.params);
            self.ema = self.partition.take(&self.ema);
            self.model = self.model.shell();
        }
        self.dp = dp;
        Ok(self)
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
        let eps = standard_normal(&mut rng, batch.images.len());
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
        let train = &self.state.train;
        let lr = train.lr_at(step);
        let decay = ema::decay_at(train.ema_decay, step);
        let loss_scale = self.state.loss_scale.as_ref().map(|s| s.scale);
        let mut skipped = false;
        let (loss, anomaly) = if self.stage.is_some() {
            let (loss, g, busy, idle) = self.pipeline_gradient(&xt, &target, t, labels, batch);
            let anomaly = if self.detect_anomaly { self.first_non_finite_stage(loss, &g) } else { None };
            let train = &self.state.train;
            // The gradient is already weighted by the micro-batches' shares of the global batch.
            let (loss, _) = profile::time(Region::Optimizer, || {
                self.dp.step(g, loss, batch, batch, &mut self.adam, &train.adam, lr, &mut self.params, None)
            });
            ema::update(&mut self.ema, &self.params, decay);
            self.count_pipeline_time(busy, idle);
            (self.pipeline_loss(loss), anomaly)
        } else if self.dp.zero.shards_gradients() {
            let (loss, g) = self.sharded_gradient(&xt, &target, t, labels, batch);
            let loss = self.dp.sum_loss(loss);
            let anomaly = if self.detect_anomaly { self.first_non_finite_shard(loss, &g) } else { None };
            profile::time(Region::Optimizer, || {
                self.optimizer_step_sharded(&g, lr);
                if self.dp.zero == ZeroStage::Three {
                    ema::update(&mut self.ema, &self.params, decay);
                }
            });
            (loss, anomaly)
        } else {
            let (loss, g) = self.gradient(&xt, &target, t, labels, loss_scale.unwrap_or(1.0));
            // Under fp16 an overflowed gradient is expected now and then: the loss scale skips it.
            let checked: &[f32] = if loss_scale.is_some() { &[] } else { &g };
            let anomaly = if self.detect_anomaly { self.first_non_finite(loss, checked) } else { None };
            let train = &self.state.train;
            let (loss, taken) = profile::time(Region::Optimizer, || {
                self.dp.step(g, loss, rows.len(), batch, &mut self.adam, &train.adam, lr, &mut self.params, loss_scale)
            });
            if let Some(scale) = &mut self.state.loss_scale {
                scale.update(!taken);
            }
            skipped = !taken;
            (loss, anomaly)
        };
        if !skipped && self.dp.zero != ZeroStage::Three && self.stage.is_none() {
            ema::update(&mut self.ema, &self.params, decay);
            // Cloning a module clones tensor handles, not data.
            self.model = profile::time(Region::WriteBack, || self.table.write_values(self.model.clone(), &self.params));
        }

        self.state.step += 1;
        StepOutcome { loss, lr, anomaly, skipped, loss_scale }
    }

    /// [`Trainer::first_non_finite`] of a part of the gradient: `values` are the flat vector's
    /// `ranges`, in order (a ZeRO shard, a pipeline stage).
    pub(super) fn first_non_finite_of(
        &self,
        loss: f32,
        ranges: impl Iterator<Item = std::ops::Range<usize>>,
        values: &[f32],
    ) -> Option<String> {
        if !loss.is_finite() || values.iter().all(|g| g.is_finite()) {
            return self.first_non_finite(loss, &[]);
        }
        // Spread over a full-length vector (zeros elsewhere) to name the parameter.
        let mut full = vec![0f32; self.table.total];
        let mut at = 0;
        for r in ranges {
            full[r.clone()].copy_from_slice(&values[at..at + r.len()]);
            at += r.len();
        }
        self.first_non_finite(loss, &full)
    }

    /// The loss if it is not finite, else the first parameter whose gradient has a NaN or an
    /// infinity, by name.
    pub(super) fn first_non_finite(&self, loss: f32, grad: &[f32]) -> Option<String> {
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
    ///
    /// Under mixed precision each micro-batch runs on its own low-precision copy of the master
    /// weights; `loss_scale` multiplies the loss before the backward (fp16; 1 otherwise), and the
    /// gradient returned is of the scaled loss.
    fn gradient(&self, xt: &[f32], target: &[f32], t: &[usize], labels: &[u8], loss_scale: f32) -> (f32, Vec<f32>) {
        let b = labels.len();
        let row = xt.len() / b;
        let parts = micro_batches(b, self.state.train.micro_batches);
        let dtype = self.state.train.precision.dtype();
        let part = |r: &std::ops::Range<usize>| {
            let model = if r.start == 0 && dtype == DType::F32 {
                self.model.clone()
            } else {
                self.table.write_values_as(self.model.clone(), &self.params, dtype)
            };
            let rows = r.start * row..r.end * row;
            let (xt, target) = (&xt[rows.clone()], &target[rows]);
            self.micro_gradient(&model, xt, target, &t[r.clone()], &labels[r.clone()], loss_scale)
        };
        // The tensor- and sequence-parallel collectives of the micro-batches must pair up across
        // the ranks: one micro-batch at a time then.
        let results: Vec<(f32, Vec<f32>)> = if self.tp.size() > 1 || self.sp.is_some() {
            parts.iter().map(part).collect()
        } else {
            parts.par_iter().map(part).collect()
        };
        let mut results = results;
        if results.len() == 1 {
            return results.pop().expect("one part");
        }
        // A fixed order of summation: the step does not depend on which thread finished first.
        profile::time(Region::Gradients, || {
            let weights: Vec<f32> = parts.iter().map(|r| r.len() as f32 / b as f32).collect();
            let loss = weights.iter().zip(&results).fold(0f32, |loss, (w, (part_loss, _))| loss + w * part_loss);
            // Each element summed over the parts in order, whichever thread takes it.
            let mut g = vec![0f32; self.table.total];
            g.par_chunks_mut(CHUNK).enumerate().for_each(|(c, g)| {
                for (w, (_, part_g)) in weights.iter().zip(&results) {
                    g.iter_mut().zip(&part_g[c * CHUNK..]).for_each(|(a, &v)| *a += w * v);
                }
            });
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
        loss_scale: f32,
    ) -> (f32, Vec<f32>) {
        let MicroBatch { xt, t: tt, y, target, .. } =
            MicroBatch::new(&self.state.model, &self.device, xt, target, t, labels, 1.0);
        let dtype = self.state.train.precision.dtype();
        let xt = if dtype == DType::F32 { xt } else { xt.cast(dtype) };
        let (loss, loss_value) = profile::time(Region::Forward, || {
            let kind = self.state.train.loss;
            let loss = match &self.sp {
                Some(sp) => shard_loss(model, (xt, tt, y, target), kind, &self.tp, sp),
                None => noise_loss_parallel(model, xt, tt, y, target, kind, &self.tp),
            };
            let value = loss.to_data().iter::<f32>().next().unwrap_or(f32::NAN);
            (if loss_scale == 1.0 { loss } else { loss * loss_scale }, value)
        });
        let grads = profile::time(Region::Backward, || loss.backward());
        (loss_value, profile::time(Region::Gradients, || self.table.read_grads(model, &grads)))
    }

    /// Save a checkpoint of the current state under `run_dir`, in the one-process layout. With
    /// several ranks every rank must call this (ZeRO-1 and tensor parallelism gather their
    /// shards) and rank 0 alone writes; all return the checkpoint's directory.
    pub fn save(&self, run_dir: &Path, keep: usize) -> anyhow::Result<PathBuf> {
        if self.dp.zero == ZeroStage::Three {
            return self.save_sharded(run_dir, keep);
        }
        if self.stage.is_some() {
            return self.save_pipeline(run_dir, keep);
        }
        let Some(adam) = self.dp.gather_optimizer(&self.adam, &self.partition) else {
            return Ok(checkpoint::checkpoint_dir(run_dir, self.state.step));
        };
        let Some((model, ema, adam)) = self.gather_shards(adam) else {
            return Ok(checkpoint::checkpoint_dir(run_dir, self.state.step));
        };
        let table = ParamTable::of(&model);
        let model_bytes = weights::to_safetensors_bytes(&model)?;
        let ema_bytes = weights::to_safetensors_bytes(&table.write_values(model, &ema))?;
        checkpoint::save(run_dir, self.state.clone(), &model_bytes, &ema_bytes, &adam, keep)
    }

    /// Rank 0's save of the full vectors (weights, moving average, optimizer state) gathered
    /// from the ranks' shards or stages.
    pub(super) fn save_full(
        &self,
        run_dir: &Path,
        keep: usize,
        params: &[f32],
        ema: &[f32],
        adam: &AdamState,
    ) -> anyhow::Result<PathBuf> {
        let template = DitNet::new(&self.state.model, &self.device.clone().inner(), 0);
        let model_bytes = weights::to_safetensors_bytes(&self.table.write_values(template.clone(), params))?;
        let ema_bytes = weights::to_safetensors_bytes(&self.table.write_values(template, ema))?;
        checkpoint::save(run_dir, self.state.clone(), &model_bytes, &ema_bytes, adam, keep)
    }

    /// Bytes of optimizer state (Adam's two moments) this rank keeps.
    pub fn optimizer_bytes(&self) -> usize {
        2 * 4 * self.adam.m.len()
    }

    /// The buffers this rank holds at the peak of a step, by kind, as the ZeRO paper counts
    /// them (the model's own f32 tensors and the activations aside).
    pub fn memory(&self) -> Memory {
        let piece = self.pieces.as_ref().map_or(0, |p| p.segments.iter().map(|r| r.len()).max().unwrap_or(0));
        let shell = self.pieces.as_ref().map_or(0, |p| p.segments[0].len() + p.segments[p.depth() + 1].len());
        let (params, grads) = match self.dp.zero {
            ZeroStage::Off | ZeroStage::One => (self.params.len(), self.params.len()),
            // The reduced shard, and the piece whose gradient is being reduced.
            ZeroStage::Two => (self.params.len(), self.partition.len() + piece),
            // The shard, the shell and one block gathered.
            ZeroStage::Three => (self.params.len() + shell + piece, self.partition.len() + piece),
        };
        // Mixed precision adds the half-width copy of the weights and its gradients.
        let half = if self.state.train.precision.is_mixed() { 2 * self.params.len() } else { 0 };
        Memory { params: 4 * params + half, grads: 4 * grads + half, optimizer: self.optimizer_bytes() }
    }
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
    noise_loss_parallel(model, xt, t, y, target, kind, &TensorParallel::single())
}

/// [`noise_loss`] of a tensor-parallel shard `model` (the same value on every rank of `tp`).
pub fn noise_loss_parallel(
    model: &DitNet,
    xt: Tensor<4>,
    t: Tensor<1, Int>,
    y: Tensor<1, Int>,
    target: Tensor<4>,
    kind: LossKind,
    tp: &TensorParallel,
) -> Tensor<1> {
    // The loss in f32 whatever the forward's precision.
    let prediction = model.forward_parallel(xt, t, y, tp);
    let prediction = if prediction.dtype() == DType::F32 { prediction } else { prediction.cast(DType::F32) };
    let diff = prediction - target;
    match kind {
        LossKind::L1 => diff.abs().mean(),
        LossKind::Mse => diff.square().mean(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
