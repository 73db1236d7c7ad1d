//! DeepSpeed-Ulysses sequence parallelism for a DiT block's attention, built on the
//! differentiable all-to-all ([`super::Exchange`]).
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

use super::{Exchange, ExchangeDirection, TokenDirection, TokenShards, exchange, packed_attention, token_shards};
use crate::collective::Collective;

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
            heads.is_multiple_of(p) && seq.is_multiple_of(p),
            "sequence parallelism over {p} ranks needs token and head counts divisible by {p}: \
             the model has {seq} tokens and {heads} heads (per tensor-parallel rank)"
        );
        Ok(Self { comm, seq, heads })
    }

    /// The tokens this rank holds.
    pub fn my_tokens(&self) -> Range<usize> {
        let n = self.seq / self.comm.size();
        self.comm.rank() * n..(self.comm.rank() + 1) * n
    }

    /// This rank's tokens of `embed(image)`, where `embed` turns `patch`-sized patches into
    /// tokens row by row: `embed` runs only on the band of patch rows that holds them.
    pub fn embed_shard(&self, image: Tensor<4>, patch: usize, embed: impl FnOnce(Tensor<4>) -> Tensor<3>) -> Tensor<3> {
        let (mine, side) = (self.my_tokens(), image.dims()[3] / patch);
        let rows = mine.start / side..mine.end.div_ceil(side);
        let band = image.narrow(2, rows.start * patch, rows.len() * patch); // [B, C, rows·p, W·p]
        embed(band).narrow(1, mine.start - rows.start * side, mine.len()) // [B, S/P, W]
    }

    /// This rank's tokens of `x` `[B, S, W]`.
    pub fn shard_of(&self, x: Tensor<3>) -> Tensor<3> {
        let mine = self.my_tokens();
        x.narrow(1, mine.start, mine.len())
    }

    /// The ranks of the group.
    pub fn size(&self) -> usize {
        self.comm.size()
    }

    /// Folded attention (see [`super::folded_attention`]) of the whole sequence from this
    /// rank's folded queries and values `qv` `[B, S/P, 2·H·W]` and tokens `keys` `[B, S/P, W]`;
    /// returns this rank's rows of the output summed over all heads, `[B, S/P, W]`.
    /// Differentiable. The heads are exchanged for the tokens, every rank's tokens are gathered
    /// as the keys, and the per-head-group partial outputs are summed over the ranks.
    pub fn folded_attention(&self, qv: Tensor<3>, keys: Tensor<3>, scale: f64) -> Tensor<3> {
        let [_, tokens, row] = qv.dims();
        assert_eq!(tokens, self.seq / self.comm.size(), "qv holds {tokens} tokens, not this rank's share");
        let width = row / (2 * self.heads);
        let plan = Exchange {
            comm: self.comm.clone(),
            chunks: 2,
            heads: self.heads,
            head_dim: width,
            direction: ExchangeDirection::SeqToHeads,
        };
        let group = exchange(qv, plan); // [B, S, 2·(H/P)·W]
        let shards = |direction| TokenShards { comm: self.comm.clone(), direction };
        let keys = token_shards(keys, shards(TokenDirection::Gather)); // [B, S, W]
        let partial = super::folded_attention(group, keys, self.heads / self.comm.size(), scale);
        token_shards(partial, shards(TokenDirection::ReduceScatter))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::CommStats;

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
}
