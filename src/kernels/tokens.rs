//! Token shards of a sequence-parallel group as a differentiable operation of the kernel
//! extension: gathering every rank's tokens (whose backward sums the gradients and keeps this
//! rank's tokens) and the converse, summing the ranks' partial outputs for every token and
//! keeping this rank's (whose backward gathers). mnist-dits' folded attention under Ulysses
//! needs both: its keys are the tokens themselves, and its heads are summed in the kernel.

use std::sync::Arc;

use burn::backend::flex::FlexTensor;

use super::flex::{contiguous, flex_tensor};
use crate::collective::Collective;

/// Which way a [`TokenShards`] moves data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenDirection {
    /// `[B, S/P, W]` (this rank's tokens) → `[B, S, W]` (every rank's, in rank order).
    Gather,
    /// `[B, S, W]` (a partial sum for every token) → `[B, S/P, W]` (the sum, this rank's tokens).
    ReduceScatter,
}

/// One token gather or reduce-scatter over the ranks of `comm`.
#[derive(Clone)]
pub struct TokenShards {
    pub comm: Arc<dyn Collective>,
    pub direction: TokenDirection,
}

impl std::fmt::Debug for TokenShards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenShards({:?} over {} ranks)", self.direction, self.comm.size())
    }
}

impl super::Adjoint for TokenShards {
    fn forward(&self, x: &FlexTensor) -> FlexTensor {
        self.apply(x)
    }

    fn backward(&self, grad: &FlexTensor) -> FlexTensor {
        self.reversed().apply(grad)
    }
}

impl TokenShards {
    /// The operation whose backward this one is.
    fn reversed(&self) -> Self {
        let direction = match self.direction {
            TokenDirection::Gather => TokenDirection::ReduceScatter,
            TokenDirection::ReduceScatter => TokenDirection::Gather,
        };
        Self { direction, ..self.clone() }
    }

    fn apply(&self, x: &FlexTensor) -> FlexTensor {
        let x = contiguous(x);
        let [batch, tokens, width] =
            <[usize; 3]>::try_from(x.layout().shape().to_vec()).expect("token shards: a 3-d tensor");
        let p = self.comm.size();
        let x = x.storage::<f32>();
        match self.direction {
            TokenDirection::Gather => {
                let mut all = vec![0f32; x.len() * p];
                self.comm.all_gather(x, &mut all);
                // Block r holds rank r's tokens of every image: they become rows r·T.. of each.
                let (block, rows) = (x.len(), tokens * width);
                let mut out = vec![0f32; all.len()];
                for (r, from) in all.chunks_exact(block).enumerate() {
                    for (b, image) in from.chunks_exact(rows).enumerate() {
                        let at = (b * p + r) * rows;
                        out[at..at + rows].copy_from_slice(image);
                    }
                }
                flex_tensor(out, vec![batch, tokens * p, width])
            }
            TokenDirection::ReduceScatter => {
                assert_eq!(tokens % p, 0, "token shards: tokens not divisible by the ranks");
                let rows = tokens / p * width;
                // Block r: rank r's tokens of every image.
                let mut send = Vec::with_capacity(x.len());
                for r in 0..p {
                    for image in x.chunks_exact(tokens * width) {
                        send.extend_from_slice(&image[r * rows..(r + 1) * rows]);
                    }
                }
                let mut mine = vec![0f32; x.len() / p];
                self.comm.reduce_scatter_sum(&send, &mut mine);
                flex_tensor(mine, vec![batch, tokens / p, width])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::Local;

    /// On one rank both are the identity; several ranks are tested under MPI through the
    /// sequence-parallel training runs (`tests/distributed.rs`).
    #[test]
    fn one_rank_token_shards_are_the_identity() {
        let x = flex_tensor((0..2 * 5 * 3).map(|i| i as f32).collect(), vec![2, 5, 3]);
        for direction in [TokenDirection::Gather, TokenDirection::ReduceScatter] {
            let op = TokenShards { comm: Arc::new(Local), direction };
            let y = op.reversed().apply(&op.apply(&x));
            assert_eq!(y.storage::<f32>(), x.storage::<f32>());
        }
    }
}
