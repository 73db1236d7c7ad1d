//! A trainer as one stage of a pipeline ([`crate::distributed::pipeline`]): it keeps the weights,
//! moving average and Adam's moments of its own pieces only (one contiguous range of the flat
//! vector), runs them on each micro-batch in the 1F1B order, and passes the carry forward and
//! its gradient back with point-to-point messages. The last stage computes the loss; the batch's
//! loss is then summed over the pipeline so that every rank logs the same figure.
//!
//! Every micro-batch runs on modules of its own (fresh tensors from the stage's weights), so the
//! autodiff graphs of the micro-batches in flight share no leaf, as the data-parallel
//! micro-batches do.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::ensure;
use burn::prelude::*;

use super::pieces::{self, Carry, MicroBatch, Pending, PieceGrads, Pieces};
use super::step::Trainer;
use crate::distributed::pipeline::{Action, Pipeline, bubble_theory, check_stages, one_f_one_b, stage_pieces};
use crate::model::DitConfig;
use crate::model::pieces::Block;
use crate::optim::AdamState;
use crate::profile::{self, Region};
use crate::ranges::micro_batches;

/// This rank's stage of its pipeline.
pub(super) struct Stage {
    pub pipe: Pipeline,
    /// The pieces this stage runs (indices into [`Pieces::segments`]).
    pub pieces: Range<usize>,
    /// Every stage's range of the flat parameter vector, in stage order.
    pub flat: Vec<Range<usize>>,
    /// Time spent running pieces, and waiting for (or moving) messages, over this run's steps.
    pub busy: Duration,
    pub idle: Duration,
}

impl Stage {
    fn mine(&self) -> Range<usize> {
        self.flat[self.pipe.stage()].clone()
    }
}

/// A carry as one message: the tokens, then the condition.
fn message(c: &Carry) -> Vec<f32> {
    let mut v: Vec<f32> = c.x.clone().into_data().iter::<f32>().collect();
    v.extend(c.cond.clone().into_data().iter::<f32>());
    v
}

/// The f32 values of a carry of `rows` images of `cfg`.
fn message_len(cfg: &DitConfig, rows: usize) -> usize {
    rows * cfg.width * (cfg.tokens() + 1)
}

/// The carry of a [`message`] of `rows` images of `cfg`, on `device`.
fn carry_of(v: Vec<f32>, cfg: &DitConfig, rows: usize, device: &Device) -> Carry {
    let (tokens, width) = (cfg.tokens(), cfg.width);
    let mut x = v;
    let cond = x.split_off(rows * tokens * width);
    Carry {
        x: Tensor::from_data(TensorData::new(x, [rows, tokens, width]), device),
        cond: Tensor::from_data(TensorData::new(cond, [rows, width]), device),
    }
}

impl Trainer {
    /// Run stage `pp.stage()` of a pipeline: keep only this stage's share of every vector. Every
    /// rank must hold the same full trainer when this is called, and call it before
    /// [`Trainer::with_data_parallel`] (which may shard the stage's optimizer state further).
    pub fn with_pipeline(mut self, pp: Option<Pipeline>) -> anyhow::Result<Self> {
        let Some(pipe) = pp else { return Ok(self) };
        ensure!(
            self.tp.size() == 1 && self.sp.is_none(),
            "--pp combines with data parallelism only: not with --tp or --sp"
        );
        let pieces = Pieces::new(&self.model, &self.table)?;
        let (depth, stages) = (pieces.depth(), pipe.stages());
        check_stages(depth, stages)?;
        let flat: Vec<Range<usize>> = (0..stages)
            .map(|s| {
                let r = stage_pieces(depth, stages, s);
                pieces.segments[r.start].start..pieces.segments[r.end - 1].end
            })
            .collect();
        let stage = Stage {
            pieces: stage_pieces(depth, stages, pipe.stage()),
            pipe,
            flat,
            busy: Duration::ZERO,
            idle: Duration::ZERO,
        };
        let mine = stage.mine();
        self.params = self.params[mine.clone()].to_vec();
        self.ema = self.ema[mine.clone()].to_vec();
        self.adam =
            AdamState { m: self.adam.m[mine.clone()].to_vec(), v: self.adam.v[mine].to_vec(), step: self.adam.step };
        self.model = self.model.shell();
        (self.pieces, self.stage) = (Some(pieces), Some(stage));
        Ok(self)
    }

    /// This stage's loss share (the last stage's; 0 elsewhere) and gradient of its parameters,
    /// both weighted by the micro-batches' shares of the global batch of `batch`; and the time
    /// spent running pieces and waiting for messages.
    pub(super) fn pipeline_gradient(
        &self,
        xt: &[f32],
        target: &[f32],
        t: &[usize],
        labels: &[u8],
        batch: usize,
    ) -> (f32, Vec<f32>, Duration, Duration) {
        let stage = self.stage.as_ref().expect("a pipeline trainer has its stage");
        let pieces = self.pieces.as_ref().expect("a pipeline trainer has its pieces");
        let (pipe, cfg, device) = (&stage.pipe, &self.state.model, &self.device);
        let comm = pipe.comm.as_ref();
        let (first, last, s) = (pipe.is_first(), pipe.is_last(), pipe.stage());
        let (prev, next) = (s.wrapping_sub(1), s + 1);
        let depth = pieces.depth();
        let offset = stage.mine().start;
        let local = |seg: usize| pieces.segments[seg].start - offset..pieces.segments[seg].end - offset;
        let blocks: Vec<usize> = stage.pieces.clone().filter(|&seg| (1..=depth).contains(&seg)).collect();

        let b = labels.len();
        let row = xt.len() / b.max(1);
        let parts = micro_batches(b, self.state.train.micro_batches);
        let m = parts.len();
        // Each micro-batch's share of the global batch weights its loss and gradients after the
        // backward, as the one-process step weights its micro-batches: the same products.
        let share: Vec<f32> = parts.iter().map(|r| r.len() as f32 / batch as f32).collect();
        let micro = |i: usize| {
            let r = &parts[i];
            let rows = r.start * row..r.end * row;
            MicroBatch::new(cfg, device, &xt[rows.clone()], &target[rows], &t[r.clone()], &labels[r.clone()], 1.0)
        };
        // A fresh shell (the embeddings' and final layer's weights this stage has; zeros for the
        // piece it does not run) and fresh blocks per micro-batch.
        let shell = || {
            let zeros = |seg: usize| vec![0f32; pieces.segments[seg].len()];
            let embed = if first { self.params[local(0)].to_vec() } else { zeros(0) };
            let head = if last { self.params[local(depth + 1)].to_vec() } else { zeros(depth + 1) };
            pieces.shell_with(&embed, &head)
        };
        let block = |seg: usize| -> Block { pieces.block_with(&self.params[local(seg)]) };

        let mut inputs: Vec<Option<Carry>> = vec![None; m];
        let mut outputs: Vec<Option<Vec<f32>>> = vec![None; m];
        let mut out_grads: Vec<Option<Carry>> = vec![None; m];
        let mut in_grads: Vec<Option<Vec<f32>>> = vec![None; m];
        let mut pending: Vec<Vec<Pending>> = (0..m).map(|_| Vec::new()).collect();
        let mut grad = vec![0f32; self.params.len()];
        let mut loss = 0f32;
        let (mut busy, mut idle) = (Duration::ZERO, Duration::ZERO);
        let buffer = |i: usize| vec![0f32; message_len(cfg, parts[i].len())];

        for action in one_f_one_b(pipe.stages(), s, m) {
            let start = Instant::now();
            match action {
                Action::Forward(i) => {
                    let mb = (first || last).then(|| micro(i));
                    let mut run = Vec::new();
                    let mut carry = if first {
                        let embed = profile::time(Region::Forward, || {
                            pieces::forward_embed(shell(), mb.as_ref().expect("first"))
                        });
                        let out = embed.out().clone();
                        run.push(embed);
                        out
                    } else {
                        inputs[i].take().expect("the input was received before the forward")
                    };
                    for &seg in &blocks {
                        let p = profile::time(Region::Forward, || pieces::forward_block(block(seg), &carry, &self.tp));
                        carry = p.out().clone();
                        run.push(p);
                    }
                    if last {
                        let mb = mb.as_ref().expect("last");
                        let head = profile::time(Region::Forward, || {
                            pieces::forward_head(shell(), &carry, mb, self.state.train.loss)
                        });
                        if let Pending::Head { value, .. } = &head {
                            loss += share[i] * value;
                        }
                        run.push(head);
                    } else {
                        outputs[i] = Some(message(&carry));
                    }
                    pending[i] = run;
                    busy += start.elapsed();
                }
                Action::Backward(i) => {
                    let mut upstream = if last { None } else { out_grads[i].take() };
                    let run = std::mem::take(&mut pending[i]);
                    for (seg, p) in stage.pieces.clone().rev().zip(run.into_iter().rev()) {
                        let (g, up) = profile::time(Region::Backward, || pieces::backward(pieces, p, upstream));
                        let (PieceGrads::Embed(g) | PieceGrads::Block(g) | PieceGrads::Head(g)) = g;
                        grad[local(seg)].iter_mut().zip(&g).for_each(|(a, &v)| *a += share[i] * v);
                        upstream = up;
                    }
                    if !first {
                        in_grads[i] = Some(message(&upstream.expect("a block hands back its input's gradient")));
                    }
                    busy += start.elapsed();
                }
                action => {
                    // What this action sends (an output forward, an input's gradient back), and
                    // which micro-batch's message it receives from which neighbour.
                    let output = |o: &mut Vec<Option<Vec<f32>>>, i: usize| o[i].take().expect("its piece ran");
                    let (send, recv) = match action {
                        Action::RecvForward(i) => (None, Some((i, prev))),
                        Action::SendForward(i) => (Some((output(&mut outputs, i), next)), None),
                        Action::SendForwardRecvBackward { send, recv } => {
                            (Some((output(&mut outputs, send), next)), Some((recv, next)))
                        }
                        Action::RecvBackward(i) => (None, Some((i, next))),
                        Action::SendBackward(i) => (Some((output(&mut in_grads, i), prev)), None),
                        Action::SendBackwardRecvForward { send, recv } => {
                            (Some((output(&mut in_grads, send), prev)), Some((recv, prev)))
                        }
                        Action::Forward(_) | Action::Backward(_) => unreachable!("computed above"),
                    };
                    let mut buf = recv.map(|(i, _)| buffer(i));
                    let into = buf.as_deref_mut().zip(recv.map(|(_, from)| from));
                    comm.exchange(send.as_ref().map(|(m, to)| (&m[..], *to)), into);
                    if let (Some(buf), Some((i, from))) = (buf, recv) {
                        let carry = carry_of(buf, cfg, parts[i].len(), device);
                        // From the previous stage comes an input, from the next a gradient.
                        if from == prev { inputs[i] = Some(carry) } else { out_grads[i] = Some(carry) }
                    }
                    idle += start.elapsed();
                }
            }
        }
        (loss, grad, busy, idle)
    }

    /// Adds a step's time running pieces and waiting for messages to the stage's totals.
    pub(super) fn count_pipeline_time(&mut self, busy: Duration, idle: Duration) {
        if let Some(stage) = &mut self.stage {
            (stage.busy, stage.idle) = (stage.busy + busy, stage.idle + idle);
        }
    }

    /// [`Trainer::first_non_finite`] of this stage's gradient.
    pub(super) fn first_non_finite_stage(&self, loss: f32, grad: &[f32]) -> Option<String> {
        let stage = self.stage.as_ref()?;
        self.first_non_finite_of(loss, std::iter::once(stage.mine()), grad)
    }

    /// The batch's loss on every rank of the pipeline (only the last stage computes it).
    pub(super) fn pipeline_loss(&self, loss: f32) -> f32 {
        let Some(stage) = &self.stage else { return loss };
        let mut l = [if stage.pipe.is_last() { loss } else { 0.0 }];
        stage.pipe.comm.all_reduce_sum(&mut l);
        l[0]
    }

    /// How idle each stage was, against the 1F1B bubble of equal stages: one line per stage
    /// on world rank 0 (`None` elsewhere, and without a pipeline). Every rank calls this.
    pub fn pipeline_report(&self, world: &dyn crate::collective::Collective) -> Option<Vec<String>> {
        let stage = self.stage.as_ref()?;
        let (p, depth) = (stage.pipe.stages(), self.pieces.as_ref().map_or(0, |p| p.depth()));
        let mine = [stage.pipe.stage() as f32, stage.busy.as_secs_f32(), stage.idle.as_secs_f32()];
        let all = world.gather_to_root(&mine)?;
        let m = micro_batches(self.dp.my_rows(self.state.train.batch).len(), self.state.train.micro_batches).len();
        let mut lines = vec![format!(
            "pipeline: {p} stages, {m} micro-batches; 1F1B with equal stages idles (P−1)/(M+P−1) = {:.1}% of a step",
            100.0 * bubble_theory(p, m)
        )];
        for (rank, r) in all.chunks_exact(3).enumerate() {
            let s = r[0] as usize;
            let blocks = stage_pieces(depth, p, s);
            let (first, last) = (blocks.start.max(1) - 1, blocks.end.min(depth + 1) - 2);
            let total = (r[1] + r[2]).max(1e-9);
            lines.push(format!(
                "rank {rank}, stage {s} (blocks {first}..={last}{}{}): busy {:.2} s, idle {:.1}% (waiting for messages)",
                if s == 0 { ", embeddings" } else { "" },
                if s + 1 == p { ", final layer" } else { "" },
                r[1],
                100.0 * r[2] / total
            ));
        }
        Some(lines)
    }

    /// [`Trainer::save`] of a pipeline: each stage's data-parallel lead gathers its stage's
    /// optimizer state, then the stages' vectors are gathered into the full layout on rank 0.
    pub(super) fn save_pipeline(&self, run_dir: &Path, keep: usize) -> anyhow::Result<PathBuf> {
        let stage = self.stage.as_ref().expect("a pipeline trainer has its stage");
        let dir = super::checkpoint::checkpoint_dir(run_dir, self.state.step);
        let Some(adam) = self.dp.gather_optimizer(&self.adam, &self.partition) else { return Ok(dir) };
        let comm = stage.pipe.comm.as_ref();
        let gather = |mine: &[f32]| gather_stages(comm, mine, &stage.flat);
        let (params, ema, m, v) = (gather(&self.params), gather(&self.ema), gather(&adam.m), gather(&adam.v));
        let (Some(params), Some(ema), Some(m), Some(v)) = (params, ema, m, v) else { return Ok(dir) };
        self.save_full(run_dir, keep, &params, &ema, &AdamState { m, v, step: adam.step })
    }
}

/// The full vector on the pipeline's first rank (`None` elsewhere), from each stage's range
/// `ranges[stage]` of it (`mine`: this stage's).
fn gather_stages(comm: &dyn crate::collective::Collective, mine: &[f32], ranges: &[Range<usize>]) -> Option<Vec<f32>> {
    let longest = ranges.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut send = mine.to_vec();
    send.resize(longest, 0.0);
    let all = comm.gather_to_root(&send)?;
    let mut full = vec![0f32; ranges.last().map_or(0, |r| r.end)];
    for (r, sent) in ranges.iter().zip(all.chunks_exact(longest.max(1))) {
        full[r.clone()].copy_from_slice(&sent[..r.len()]);
    }
    Some(full)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::Local;

    #[test]
    fn a_carry_survives_its_message() {
        let cfg = DitConfig::mnist_dits();
        let device = Device::default();
        let (rows, tokens, width) = (2, cfg.tokens(), cfg.width);
        let x: Vec<f32> = (0..rows * tokens * width).map(|i| i as f32).collect();
        let cond: Vec<f32> = (0..rows * width).map(|i| -(i as f32)).collect();
        let c = Carry {
            x: Tensor::from_data(TensorData::new(x.clone(), [rows, tokens, width]), &device),
            cond: Tensor::from_data(TensorData::new(cond.clone(), [rows, width]), &device),
        };
        let msg = message(&c);
        assert_eq!(msg.len(), message_len(&cfg, rows));
        let back = carry_of(msg, &cfg, rows, &device);
        assert_eq!(back.x.into_data().iter::<f32>().collect::<Vec<_>>(), x);
        assert_eq!(back.cond.into_data().iter::<f32>().collect::<Vec<_>>(), cond);
    }

    #[test]
    fn one_stage_gathers_its_own_vector() {
        let whole = std::slice::from_ref(&(0..3));
        assert_eq!(gather_stages(&Local, &[1.0, 2.0, 3.0], whole), Some(vec![1.0, 2.0, 3.0]));
    }
}
