//! Ulysses' all-to-all between token shards and head groups, as a differentiable operation of
//! the kernel extension: the plan ([`Exchange`]) and the data movement on a contiguous buffer.
//! The distributed layer's Ulysses attention is built from it.

use std::sync::Arc;

use burn::backend::flex::FlexTensor;

use super::flex::{contiguous, flex_tensor};
use crate::collective::Collective;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeDirection {
    /// `[B, S/P, C·H·D]` → `[B, S, C·(H/P)·D]`.
    SeqToHeads,
    /// The inverse.
    HeadsToSeq,
}

/// One all-to-all of sequence parallelism: `chunks` blocks of `heads` heads of `head_dim` per
/// token, over the ranks of `comm`.
#[derive(Clone)]
pub struct Exchange {
    pub comm: Arc<dyn Collective>,
    pub chunks: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub direction: ExchangeDirection,
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Exchange({:?}, {} chunks of {}×{} over {} ranks)",
            self.direction,
            self.chunks,
            self.heads,
            self.head_dim,
            self.comm.size()
        )
    }
}

impl super::Adjoint for Exchange {
    fn forward(&self, x: &FlexTensor) -> FlexTensor {
        self.apply(x)
    }

    fn backward(&self, grad: &FlexTensor) -> FlexTensor {
        self.reversed().apply(grad)
    }
}

impl Exchange {
    fn reversed(&self) -> Self {
        let direction = match self.direction {
            ExchangeDirection::SeqToHeads => ExchangeDirection::HeadsToSeq,
            ExchangeDirection::HeadsToSeq => ExchangeDirection::SeqToHeads,
        };
        Self { direction, ..self.clone() }
    }

    fn apply(&self, x: &FlexTensor) -> FlexTensor {
        let x = contiguous(x);
        let shape: [usize; 3] = x.layout().shape().to_vec().try_into().expect("exchange: a 3-d tensor");
        let (data, shape) = self.run(x.storage::<f32>(), shape);
        flex_tensor(data, shape.to_vec())
    }

    /// Runs the exchange on a contiguous `[B, tokens, columns]` buffer; returns the result and
    /// its shape.
    fn run(&self, x: &[f32], shape: [usize; 3]) -> (Vec<f32>, [usize; 3]) {
        let p = self.comm.size();
        let group = self.heads / p * self.head_dim;
        let [batch, tokens, columns] = shape;
        match self.direction {
            ExchangeDirection::SeqToHeads => {
                assert_eq!(columns, self.chunks * self.heads * self.head_dim, "exchange: wrong width");
                let l = Blocks { batch, tokens, chunks: self.chunks, group, ranks: p };
                (seq_to_heads(self.comm.as_ref(), x, l), [batch, tokens * p, self.chunks * group])
            }
            ExchangeDirection::HeadsToSeq => {
                assert_eq!(columns, self.chunks * group, "exchange: wrong width");
                assert_eq!(tokens % p, 0, "exchange: tokens not divisible by the ranks");
                let l = Blocks { batch, tokens: tokens / p, chunks: self.chunks, group, ranks: p };
                (heads_to_seq(self.comm.as_ref(), x, l), [batch, tokens / p, self.chunks * self.heads * self.head_dim])
            }
        }
    }
}

/// Sizes of one exchange: `chunks` blocks of `heads · head_dim` columns per token (3 for
/// `qkv`, 1 for the attention output), over `ranks`.
#[derive(Debug, Clone, Copy)]
struct Blocks {
    batch: usize,
    /// Tokens per rank.
    tokens: usize,
    chunks: usize,
    /// Columns of one head group within a chunk: `(H/P)·D`.
    group: usize,
    ranks: usize,
}

impl Blocks {
    fn block(&self) -> usize {
        self.batch * self.tokens * self.chunks * self.group
    }
}

/// `[B, T, C·H·D]` (this rank's T tokens, all heads) → `[B, P·T, C·(H/P)·D]` (all tokens, this
/// rank's head group).
fn seq_to_heads(comm: &dyn Collective, x: &[f32], l: Blocks) -> Vec<f32> {
    let Blocks { batch, tokens, chunks, group, ranks } = l;
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
fn heads_to_seq(comm: &dyn Collective, y: &[f32], l: Blocks) -> Vec<f32> {
    let Blocks { tokens, chunks, group, ranks, .. } = l;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::Local;

    /// On one rank both exchanges are the identity; the layouts' inverse property for several
    /// ranks is tested under MPI (`tests/distributed.rs`).
    #[test]
    fn one_rank_exchanges_are_the_identity() {
        let plan = |direction| Exchange { comm: Arc::new(Local), chunks: 3, heads: 2, head_dim: 4, direction };
        let x: Vec<f32> = (0..2 * 5 * 24).map(|i| i as f32).collect();
        let (y, shape) = plan(ExchangeDirection::SeqToHeads).run(&x, [2, 5, 24]);
        assert_eq!((&y, shape), (&x, [2, 5, 24]));
        let (z, _) = plan(ExchangeDirection::HeadsToSeq).run(&y, shape);
        assert_eq!(z, x);
    }
}
