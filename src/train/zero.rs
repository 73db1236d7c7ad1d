//! ZeRO-2 and ZeRO-3 steps: the gradient computed piece by piece ([`super::pieces`]) and each
//! piece's gradient reduce-scattered into this rank's shard the moment its backward produces it,
//! so no rank holds the batch's reduced gradient whole, only its shard plus the piece in flight.
//!
//! ZeRO-3 keeps only its shard of the weights too. A block's weights are all-gathered just
//! before its forward and dropped after it; the backward gathers them again and recomputes the
//! block's forward from its stored input, because burn's tape keeps every tensor a forward used
//! alive until the backward: keeping a block's graph would keep its weights. The price is one
//! more forward per block (activation checkpointing). The shell (embeddings and final layer)
//! stays gathered through a micro-batch: the first and last pieces to run.

use std::borrow::Cow;

use super::pieces::{self, Carry, MicroBatch, Pending, PieceGrads, Pieces, segment_of};
use super::step::Trainer;
use crate::distributed::data_parallel::ZeroStage;
use crate::model::pieces::{Block, Piece};
use crate::profile::{self, Region};
use crate::ranges::micro_batches;

impl Trainer {
    /// This rank's values of segment `s`: its slice of the full weights (ZeRO-2) or the
    /// segment all-gathered from every rank's shard (ZeRO-3).
    fn segment_values(&self, s: usize) -> Cow<'_, [f32]> {
        let part = &self.partition;
        if self.dp.zero == ZeroStage::Three {
            Cow::Owned(part.all_gather(self.dp.comm.as_ref(), s, &self.params[part.in_shard(s)]))
        } else {
            Cow::Borrowed(&self.params[part.segments()[s].clone()])
        }
    }

    /// Block `i` with its weights: the model's own (ZeRO-2), or gathered (ZeRO-3).
    fn piece_block(&self, pieces: &Pieces, i: usize) -> Block {
        match self.dp.zero {
            ZeroStage::Three => pieces.block_with(&self.segment_values(segment_of(Piece::Block(i), pieces.depth()))),
            _ => self.model.block(i),
        }
    }

    /// The loss of this rank's rows (weighted by their share of the global batch of `batch`)
    /// and this rank's shard of the batch's summed gradient.
    pub(super) fn sharded_gradient(
        &self,
        xt: &[f32],
        target: &[f32],
        t: &[usize],
        labels: &[u8],
        batch: usize,
    ) -> (f32, Vec<f32>) {
        let pieces = self.pieces.as_ref().expect("ZeRO-2/3 trainers have their pieces");
        let depth = pieces.depth();
        let recompute = self.dp.zero == ZeroStage::Three;
        let comm = self.dp.comm.as_ref();
        let part = &self.partition;
        let mut shard = vec![0f32; part.len()];
        let mut reduce = |s: usize, grads: &[f32]| {
            profile::time(Region::Gradients, || part.reduce_scatter_add(comm, s, grads, &mut shard[part.in_shard(s)]))
        };
        let b = labels.len();
        let row = xt.len() / b.max(1);
        let mut loss = 0f32;
        for r in micro_batches(b, self.state.train.micro_batches) {
            let mb = MicroBatch::new(
                &self.state.model,
                &self.device,
                &xt[r.start * row..r.end * row],
                &target[r.start * row..r.end * row],
                &t[r.clone()],
                &labels[r.clone()],
                r.len() as f32 / batch as f32,
            );
            // The shell's two pieces get modules of their own: one graph each.
            let (embed_vals, head_vals) = (self.segment_values(0), self.segment_values(depth + 1));
            let embed_shell = if recompute { pieces.shell_with(&embed_vals, &head_vals) } else { self.model.shell() };
            let embed = profile::time(Region::Forward, || pieces::forward_embed(embed_shell, &mb));
            let head_shell = pieces.shell_with(&embed_vals, &head_vals);
            drop((embed_vals, head_vals));

            // Forward: keep each block's graph (ZeRO-2) or only its input (ZeRO-3).
            let mut carry = embed.out().clone();
            let mut kept: Vec<Pending> = Vec::new();
            let mut inputs: Vec<Carry> = Vec::new();
            for i in 0..depth {
                let block = self.piece_block(pieces, i);
                let pending = profile::time(Region::Forward, || pieces::forward_block(block, &carry, &self.tp));
                if recompute {
                    inputs.push(carry.values());
                    carry = pending.out().values();
                } else {
                    carry = pending.out().clone();
                    kept.push(pending);
                }
            }
            let head =
                profile::time(Region::Forward, || pieces::forward_head(head_shell, &carry, &mb, self.state.train.loss));
            drop(carry);
            if let Pending::Head { value, .. } = &head {
                loss += mb.weight * value;
            }

            // Backward, piece by piece in reverse, each piece's gradient reduced at once.
            let (grads, mut upstream) = profile::time(Region::Backward, || pieces::backward(pieces, head, None));
            let PieceGrads::Head(g) = grads else { unreachable!("the head's backward") };
            reduce(depth + 1, &g);
            for i in (0..depth).rev() {
                let pending = match kept.pop() {
                    Some(p) => p,
                    None => {
                        let block = self.piece_block(pieces, i);
                        profile::time(Region::Forward, || pieces::forward_block(block, &inputs[i], &self.tp))
                    }
                };
                let (grads, up) = profile::time(Region::Backward, || pieces::backward(pieces, pending, upstream));
                let PieceGrads::Block(g) = grads else { unreachable!("a block's backward") };
                reduce(1 + i, &g);
                upstream = up;
                inputs.truncate(i);
            }
            let (grads, _) = profile::time(Region::Backward, || pieces::backward(pieces, embed, upstream));
            let PieceGrads::Embed(g) = grads else { unreachable!("the embeddings' backward") };
            reduce(0, &g);
        }
        (loss, shard)
    }
}

impl Trainer {
    /// Adam on this rank's shard; ZeRO-2 then all-gathers the new weights, piece by piece.
    pub(super) fn optimizer_step_sharded(&mut self, grad: &[f32], lr: f64) {
        let cfg = self.state.train.adam.clone();
        if self.dp.zero == ZeroStage::Three {
            self.adam.update(&cfg, lr, &mut self.params, grad);
            return;
        }
        let part = &self.partition;
        let mut shard = part.take(&self.params);
        self.adam.update(&cfg, lr, &mut shard, grad);
        for (s, range) in part.segments().iter().enumerate() {
            let whole = part.all_gather(self.dp.comm.as_ref(), s, &shard[part.in_shard(s)]);
            self.params[range.clone()].copy_from_slice(&whole);
        }
    }

    /// [`Trainer::first_non_finite`] of this rank's gradient shard.
    pub(super) fn first_non_finite_shard(&self, loss: f32, shard: &[f32]) -> Option<String> {
        self.first_non_finite_of(loss, self.partition.mine(), shard)
    }

    /// [`Trainer::save`] under ZeRO-3: the shards gathered into the full layout on rank 0.
    pub(super) fn save_sharded(&self, run_dir: &std::path::Path, keep: usize) -> anyhow::Result<std::path::PathBuf> {
        let comm = self.dp.comm.as_ref();
        let part = &self.partition;
        let gathered = (
            part.gather_to_root(comm, &self.params),
            part.gather_to_root(comm, &self.ema),
            self.dp.gather_optimizer(&self.adam, part),
        );
        let (Some(params), Some(ema), Some(adam)) = gathered else {
            return Ok(super::checkpoint::checkpoint_dir(run_dir, self.state.step));
        };
        self.save_full(run_dir, keep, &params, &ema, &adam)
    }
}
