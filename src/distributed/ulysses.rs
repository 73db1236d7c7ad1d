//! DeepSpeed-Ulysses sequence parallelism for a DiT block's attention.
//!
//! Each of P ranks holds S/P tokens of every image. Everything in a DiT block but attention
//! works token by token, so it runs on the local tokens unchanged; attention needs all tokens.
//! An all-to-all turns the local `qkv` (S/P tokens × all H heads) into all S tokens × the H/P
//! heads of this rank's group, attention runs exactly per head, and a second all-to-all turns
//! the output (S tokens × H/P heads) back into S/P tokens × all heads. The backward pass is the
//! same two exchanges in reverse around attention's backward. Parameter gradients are partial
//! sums over each rank's tokens: summing them over the ranks (an all-reduce, as in data
//! parallelism) gives the single-rank gradient.

use std::ops::Range;
use std::sync::Arc;

use anyhow::ensure;
use burn::prelude::*;

use super::Collective;
use crate::kernels::{Exchange, ExchangeDirection, exchange, packed_attention};

/// The ranks a sequence is split over.
#[derive(Clone)]
pub struct SequenceParallel {
    comm: Arc<dyn Collective>,
    seq: usize,
    heads: usize,
}

impl std::fmt::Debug for SequenceParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SequenceParallel({} tokens, {} heads over {} ranks)", self.seq, self.heads, self.comm.size())
    }
}

impl SequenceParallel {
    /// Split sequences of `seq` tokens, and attention's `heads`, over the ranks of `comm`.
    pub fn new(comm: Arc<dyn Collective>, seq: usize, heads: usize) -> anyhow::Result<Self> {
        let p = comm.size();
        ensure!(
            heads.is_multiple_of(p),
            "sequence parallelism over {p} ranks needs a head count divisible by {p}: the model has {heads} heads"
        );
        ensure!(
            seq.is_multiple_of(p),
            "sequence parallelism over {p} ranks needs a token count divisible by {p}: the model has {seq} tokens"
        );
        Ok(Self { comm, seq, heads })
    }

    /// The tokens this rank holds.
    pub fn my_tokens(&self) -> Range<usize> {
        let n = self.seq / self.comm.size();
        self.comm.rank() * n..(self.comm.rank() + 1) * n
    }

    /// Multi-head attention of the whole sequence from this rank's packed `qkv` `[B, S/P,
    /// 3·H·D]`; returns this rank's rows of the output, `[B, S/P, H·D]`. Differentiable.
    pub fn attention(&self, qkv: Tensor<3>, scale: f64) -> Tensor<3> {
        let [_, tokens, row] = qkv.dims();
        assert_eq!(tokens, self.seq / self.comm.size(), "qkv holds {tokens} tokens, not this rank's share");
        let head_dim = row / (3 * self.heads);
        let plan =
            |chunks, direction| Exchange { comm: self.comm.clone(), chunks, heads: self.heads, head_dim, direction };
        let group = exchange(qkv, plan(3, ExchangeDirection::SeqToHeads));
        let out = packed_attention(group, self.heads / self.comm.size(), scale);
        exchange(out, plan(1, ExchangeDirection::HeadsToSeq))
    }
}

/// Sizes of one exchange: `chunks` blocks of `heads · head_dim` columns per token (3 for
/// `qkv`, 1 for the attention output), over `ranks`.
#[derive(Debug, Clone, Copy)]
struct Layout {
    batch: usize,
    /// Tokens per rank.
    tokens: usize,
    chunks: usize,
    /// Columns of one head group within a chunk: `(H/P)·D`.
    group: usize,
    ranks: usize,
}

impl Layout {
    fn block(&self) -> usize {
        self.batch * self.tokens * self.chunks * self.group
    }
}

/// `[B, T, C·H·D]` (this rank's T tokens, all heads) → `[B, P·T, C·(H/P)·D]` (all tokens, this
/// rank's head group).
fn seq_to_heads(comm: &dyn Collective, x: &[f32], l: Layout) -> Vec<f32> {
    let Layout { batch, tokens, chunks, group, ranks } = l;
    let width = chunks * group * ranks;
    // Send block j: head group j of every local token, in (b, t, c) order.
    let mut send = Vec::with_capacity(x.len());
    for j in 0..ranks {
        for row in x.chunks_exact(width) {
            for c in 0..chunks {
                let start = c * group * ranks + j * group;
                send.extend_from_slice(&row[start..start + group]);
            }
        }
    }
    let mut recv = vec![0f32; x.len()];
    comm.all_to_all(&send, &mut recv);
    // Block i holds rank i's tokens: they become rows i·T.. of each image.
    let mut out = vec![0f32; x.len()];
    let out_row = chunks * group;
    for (i, block) in recv.chunks_exact(l.block()).enumerate() {
        for (bt, src) in block.chunks_exact(out_row).enumerate() {
            let (b, t) = (bt / tokens, bt % tokens);
            let dst = (b * ranks * tokens + i * tokens + t) * out_row;
            out[dst..dst + out_row].copy_from_slice(src);
        }
    }
    debug_assert_eq!(send.len(), batch * tokens * width);
    out
}

/// The inverse of [`seq_to_heads`].
fn heads_to_seq(comm: &dyn Collective, y: &[f32], l: Layout) -> Vec<f32> {
    let Layout { tokens, chunks, group, ranks, .. } = l;
    let in_row = chunks * group;
    // Send block i: the rows of rank i's tokens, in (b, t) order.
    let mut send = Vec::with_capacity(y.len());
    for i in 0..ranks {
        for image in y.chunks_exact(ranks * tokens * in_row) {
            send.extend_from_slice(&image[i * tokens * in_row..(i + 1) * tokens * in_row]);
        }
    }
    let mut recv = vec![0f32; y.len()];
    comm.all_to_all(&send, &mut recv);
    // Block j holds head group j of this rank's tokens.
    let width = chunks * group * ranks;
    let mut out = vec![0f32; y.len()];
    for (j, block) in recv.chunks_exact(l.block()).enumerate() {
        for (bt, src) in block.chunks_exact(in_row).enumerate() {
            for c in 0..chunks {
                let dst = bt * width + c * group * ranks + j * group;
                out[dst..dst + group].copy_from_slice(&src[c * group..(c + 1) * group]);
            }
        }
    }
    out
}

/// Runs one exchange on a contiguous `[B, tokens, columns]` buffer; returns the result and its
/// shape.
pub(crate) fn run_exchange(plan: &Exchange, x: &[f32], shape: [usize; 3]) -> (Vec<f32>, [usize; 3]) {
    let p = plan.comm.size();
    let group = plan.heads / p * plan.head_dim;
    let [batch, tokens, columns] = shape;
    match plan.direction {
        ExchangeDirection::SeqToHeads => {
            assert_eq!(columns, plan.chunks * plan.heads * plan.head_dim, "exchange: wrong width");
            let l = Layout { batch, tokens, chunks: plan.chunks, group, ranks: p };
            (seq_to_heads(plan.comm.as_ref(), x, l), [batch, tokens * p, plan.chunks * group])
        }
        ExchangeDirection::HeadsToSeq => {
            assert_eq!(columns, plan.chunks * group, "exchange: wrong width");
            assert_eq!(tokens % p, 0, "exchange: tokens not divisible by the ranks");
            let l = Layout { batch, tokens: tokens / p, chunks: plan.chunks, group, ranks: p };
            (heads_to_seq(plan.comm.as_ref(), x, l), [batch, tokens / p, plan.chunks * plan.heads * plan.head_dim])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distributed::{CommStats, Local};

    /// A world of `size` ranks that only answers for its size (no collective is called).
    struct Sized(usize);

    impl Collective for Sized {
        fn rank(&self) -> usize {
            0
        }
        fn size(&self) -> usize {
            self.0
        }
        fn all_reduce_sum(&self, _: &mut [f32]) {
            unreachable!()
        }
        fn reduce_scatter_sum(&self, _: &[f32], _: &mut [f32]) {
            unreachable!()
        }
        fn all_gather(&self, _: &[f32], _: &mut [f32]) {
            unreachable!()
        }
        fn gather_to_root(&self, _: &[f32]) -> Option<Vec<f32>> {
            unreachable!()
        }
        fn broadcast(&self, _: &mut [f32]) {
            unreachable!()
        }
        fn broadcast_bytes(&self, _: &mut Vec<u8>) {
            unreachable!()
        }
        fn all_to_all(&self, _: &[f32], _: &mut [f32]) {
            unreachable!()
        }
        fn abort(&self, _: i32) -> ! {
            unreachable!()
        }
        fn stats(&self) -> CommStats {
            CommStats::default()
        }
    }

    #[test]
    fn the_ranks_must_divide_heads_and_tokens() {
        let err = SequenceParallel::new(Arc::new(Sized(4)), 196, 6).unwrap_err().to_string();
        assert!(err.contains("6 heads") && err.contains("divisible by 4"), "{err}");
        let err = SequenceParallel::new(Arc::new(Sized(2)), 49, 6).unwrap_err().to_string();
        assert!(err.contains("49 tokens"), "{err}");
        assert_eq!(SequenceParallel::new(Arc::new(Sized(2)), 196, 6).unwrap().my_tokens(), 0..98);
    }

    /// On one rank both exchanges are the identity; the layouts' inverse property for several
    /// ranks is tested under MPI (`tests/distributed.rs`).
    #[test]
    fn one_rank_exchanges_are_the_identity() {
        let plan = |direction| Exchange { comm: Arc::new(Local), chunks: 3, heads: 2, head_dim: 4, direction };
        let x: Vec<f32> = (0..2 * 5 * 24).map(|i| i as f32).collect();
        let (y, shape) = run_exchange(&plan(ExchangeDirection::SeqToHeads), &x, [2, 5, 24]);
        assert_eq!((&y, shape), (&x, [2, 5, 24]));
        let (z, _) = run_exchange(&plan(ExchangeDirection::HeadsToSeq), &y, shape);
        assert_eq!(z, x);
    }
}
