//! The gradient computed piece by piece ([`crate::model::pieces`]): each piece of the network
//! runs as its own autodiff graph, its inputs the leaves of that graph, and the backward walks
//! the pieces in reverse, handing each one the gradient of its outputs. burn's backward returns
//! every gradient of a graph at once, with no hook per parameter; one graph per piece is what
//! lets ZeRO-2 reduce a piece's gradients as soon as they exist, ZeRO-3 hold one piece's weights
//! at a time, and a pipeline stage run only its own pieces.

use std::ops::Range;

use anyhow::ensure;
use burn::prelude::*;
use burn::tensor::Gradients;

use super::config::LossKind;
use super::params::ParamTable;
use crate::kernels::TensorParallel;
use crate::model::pieces::{Block, Piece};
use crate::model::{DitConfig, DitNet};

/// Where each piece's parameters lie in the flat vector, with modules to run a piece on any
/// values of its parameters.
#[derive(Clone)]
pub struct Pieces {
    /// The flat ranges, in order: the embeddings, each block, the final layer.
    pub segments: Vec<Range<usize>>,
    shell: DitNet,
    shell_table: ParamTable,
    block: Block,
    block_table: ParamTable,
}

/// A piece's place in [`Pieces::segments`].
pub fn segment_of(piece: Piece, depth: usize) -> usize {
    match piece {
        Piece::Embed => 0,
        Piece::Block(i) => 1 + i,
        Piece::Head => 1 + depth,
    }
}

impl Pieces {
    /// The pieces of `model`, whose flat layout is `table`. The parameters of each piece must be
    /// one contiguous range, in piece order (the field order of both families).
    pub fn new(model: &DitNet, table: &ParamTable) -> anyhow::Result<Self> {
        let depth = model.depth();
        ensure!(depth > 0, "a network without blocks cannot be cut into pieces");
        let family = model.family();
        let mut segments: Vec<Option<Range<usize>>> = vec![None; depth + 2];
        let mut last = 0;
        for slot in &table.slots {
            let seg = segment_of(Piece::of(family, &slot.name), depth);
            ensure!(seg >= last, "parameter {} is out of piece order", slot.name);
            last = seg;
            let r = segments[seg].get_or_insert(slot.offset..slot.offset);
            r.end = slot.offset + slot.len();
        }
        let segments: Vec<Range<usize>> = segments.into_iter().flatten().collect();
        ensure!(segments.len() == depth + 2, "every piece of the network must have parameters");
        ensure!(
            segments.windows(2).all(|w| w[0].end == w[1].start) && segments[depth + 1].end == table.total,
            "the pieces' parameters do not tile the flat vector"
        );
        let block = model.block(0);
        let (shell, block_table) = (model.shell(), ParamTable::of(&block));
        let shell_table = ParamTable::of(&shell);
        ensure!(
            shell_table.total == segments[0].len() + segments[depth + 1].len(),
            "the shell's parameters are not the embeddings' and the final layer's"
        );
        Ok(Self { segments, shell, shell_table, block, block_table })
    }

    pub fn depth(&self) -> usize {
        self.segments.len() - 2
    }

    /// The shell with the embeddings' values `embed` and the final layer's `head`.
    pub fn shell_with(&self, embed: &[f32], head: &[f32]) -> DitNet {
        let flat = [embed, head].concat();
        self.shell_table.write_values(self.shell.clone(), &flat)
    }

    /// A block with the values `flat`.
    pub fn block_with(&self, flat: &[f32]) -> Block {
        self.block_table.write_values(self.block.clone(), flat)
    }

    /// The shell's gradients split into the embeddings' and the final layer's.
    fn shell_grads(&self, shell: &DitNet, grads: &Gradients) -> (Vec<f32>, Vec<f32>) {
        let mut flat = self.shell_table.read_grads(shell, grads);
        let head = flat.split_off(self.segments[0].len());
        (flat, head)
    }

    /// A block's gradients.
    fn block_grads(&self, block: &Block, grads: &Gradients) -> Vec<f32> {
        self.block_table.read_grads(block, grads)
    }
}

/// What travels between pieces: the tokens `[B, S, W]` and the condition `[B, W]`.
#[derive(Clone, Debug)]
pub struct Carry {
    pub x: Tensor<3>,
    pub cond: Tensor<2>,
}

impl Carry {
    /// Fresh leaves of a new graph with these values.
    pub fn leaves(&self) -> Carry {
        let leaf = |t: Tensor<3>| Tensor::from_inner(t.inner()).require_grad();
        Carry { x: leaf(self.x.clone()), cond: Tensor::from_inner(self.cond.clone().inner()).require_grad() }
    }

    /// The values alone, outside any graph (on the inner device).
    pub fn values(&self) -> Carry {
        Carry { x: self.x.clone().inner(), cond: self.cond.clone().inner() }
    }
}

/// A micro-batch's inputs to the first piece and its target, on the autodiff device.
pub struct MicroBatch {
    pub xt: Tensor<4>,
    pub t: Tensor<1, Int>,
    pub y: Tensor<1, Int>,
    pub target: Tensor<4>,
    /// The loss is scaled by this before the backward: the micro-batch's share of the batch.
    pub weight: f32,
}

impl MicroBatch {
    /// One micro-batch of `cfg`'s images as tensors on `device`.
    pub fn new(
        cfg: &DitConfig,
        device: &Device,
        xt: &[f32],
        target: &[f32],
        t: &[usize],
        labels: &[u8],
        weight: f32,
    ) -> Self {
        let b = labels.len();
        let dims = [b, cfg.channels, cfg.image_size, cfg.image_size];
        let ints = |v: Vec<i64>| Tensor::<1, Int>::from_data(TensorData::new(v, [b]), device);
        MicroBatch {
            xt: Tensor::from_data(TensorData::new(xt.to_vec(), dims), device),
            target: Tensor::from_data(TensorData::new(target.to_vec(), dims), device),
            t: ints(t.iter().map(|&v| v as i64).collect()),
            y: ints(labels.iter().map(|&v| v as i64).collect()),
            weight,
        }
    }
}

/// A piece's forward, kept for its backward: the graph's leaves and outputs.
#[allow(clippy::large_enum_variant)] // one per piece in flight, moved once
pub enum Pending {
    /// The embeddings: no leaves (the images are data), the carry out.
    Embed {
        shell: DitNet,
        out: Carry,
    },
    Block {
        block: Block,
        input: Carry,
        out: Carry,
    },
    /// The final layer: the carry in, the weighted loss out (and its value, unweighted).
    Head {
        shell: DitNet,
        input: Carry,
        loss: Tensor<1>,
        value: f32,
    },
}

/// The embeddings of `mb` on `shell`.
pub fn forward_embed(shell: DitNet, mb: &MicroBatch) -> Pending {
    let (x, cond) = shell.embed(mb.xt.clone(), mb.t.clone(), mb.y.clone());
    Pending::Embed { shell, out: Carry { x, cond } }
}

/// `block` on the carry `input` (any graph: it gets leaves of its own).
pub fn forward_block(block: Block, input: &Carry, tp: &TensorParallel) -> Pending {
    let input = input.leaves();
    let x = block.forward(input.x.clone(), input.cond.clone(), tp);
    let out = Carry { x, cond: input.cond.clone() };
    Pending::Block { block, input, out }
}

/// The final layer and the loss of `mb`, scaled by its weight.
pub fn forward_head(shell: DitNet, input: &Carry, mb: &MicroBatch, kind: LossKind) -> Pending {
    let input = input.leaves();
    let target = shell.patchify(mb.target.clone());
    let diff = shell.head(input.x.clone(), input.cond.clone()) - target;
    let loss = match kind {
        LossKind::L1 => diff.abs().mean(),
        LossKind::Mse => diff.square().mean(),
    };
    let value = loss.clone().into_data().iter::<f32>().next().unwrap_or(f32::NAN);
    Pending::Head { shell, input, loss: loss * mb.weight, value }
}

impl Pending {
    /// The carry this piece hands to the next.
    pub fn out(&self) -> &Carry {
        match self {
            Pending::Embed { out, .. } | Pending::Block { out, .. } => out,
            Pending::Head { .. } => panic!("the final layer hands on a loss, not a carry"),
        }
    }
}

/// A piece's backward: its parameters' gradients.
pub enum PieceGrads {
    /// The embeddings' (segment 0).
    Embed(Vec<f32>),
    Block(Vec<f32>),
    /// The final layer's (the last segment).
    Head(Vec<f32>),
}

/// The backward of `pending`, given the gradient of its output carry (`None` for the final
/// layer, whose output is the loss): its parameters' gradients, and the gradient of its input
/// carry (`None` for the embeddings).
pub fn backward(pieces: &Pieces, pending: Pending, upstream: Option<Carry>) -> (PieceGrads, Option<Carry>) {
    let seed = |out: &Carry, up: Option<Carry>| {
        let up = up.expect("a carry's backward needs the gradient of the carry");
        let up = Carry { x: Tensor::from_inner(up.x.inner()), cond: Tensor::from_inner(up.cond.inner()) };
        (out.x.clone() * up.x).sum() + (out.cond.clone() * up.cond).sum()
    };
    let input_grad = |input: &Carry, grads: &Gradients| {
        let zero_cond = || input.cond.clone().inner().zeros_like();
        Carry {
            x: input.x.grad(grads).unwrap_or_else(|| input.x.clone().inner().zeros_like()),
            cond: input.cond.grad(grads).unwrap_or_else(zero_cond),
        }
    };
    match pending {
        Pending::Embed { shell, out } => {
            let grads = seed(&out, upstream).backward();
            (PieceGrads::Embed(pieces.shell_grads(&shell, &grads).0), None)
        }
        Pending::Block { block, input, out } => {
            let grads = seed(&out, upstream).backward();
            (PieceGrads::Block(pieces.block_grads(&block, &grads)), Some(input_grad(&input, &grads)))
        }
        Pending::Head { shell, input, loss, .. } => {
            let grads = loss.backward();
            (PieceGrads::Head(pieces.shell_grads(&shell, &grads).1), Some(input_grad(&input, &grads)))
        }
    }
}
