//! A block ready for sampling: its attention folded once (see [`super::folded`]), its six
//! modulation Linears concatenated once, and, where the CPU runs it, the whole block packed for
//! the fused inference kernel ([`crate::kernels::inference_block`]), whose weights are then
//! packed once per network instead of once per Linear call.

use burn::nn::{LayerNorm, Linear};
use burn::prelude::*;
use burn::tensor::DType;

use super::block::{LN_EPS, MnistDitsBlock};
use super::folded::FoldedAttention;
use crate::kernels::inference_block::{BlockWeights, PackedBlock};
use crate::kernels::{Activation, TensorParallel, cat_linears, fused_linear, packed_block};

/// One block prepared for inference (see [`crate::model::Inference`]).
#[derive(Debug, Clone)]
pub struct PreparedBlock {
    folded: FoldedAttention,
    /// The modulation Linears side by side (`[W, 6·W]`, `[6·W]`).
    modulation: (Tensor<2>, Tensor<1>),
    packed: Option<PackedBlock>,
}

impl PreparedBlock {
    /// `None` where folding does not pay (see [`FoldedAttention::new`]). `pack`: also pack the
    /// block for the fused kernel, where it runs (f32 weights, AVX2 or AVX-512 panels).
    pub fn new(block: &MnistDitsBlock, tokens: usize, pack: bool) -> Option<Self> {
        let folded = FoldedAttention::new(block, tokens)?;
        let width = block.ln1.gamma.dims()[0];
        let f32_weights = block.wq.weight.val().dtype() == DType::F32;
        let packed = (pack && f32_weights && PackedBlock::available(width)).then(|| pack_block(block, &folded));
        Some(Self { modulation: cat_linears(&block.modulation_layers()), folded, packed })
    }

    /// Whether the block runs as one fused kernel.
    pub fn is_packed(&self) -> bool {
        self.packed.is_some()
    }

    /// `block` on `x` `[B, S, W]` under the condition `cond` `[B, W]`: the same values as
    /// [`MnistDitsBlock::forward`] with the attention folded, bit for bit when packed.
    pub fn forward(&self, block: &MnistDitsBlock, x: Tensor<3>, cond: Tensor<2>) -> Tensor<3> {
        let (weight, bias) = &self.modulation;
        let modulation = fused_linear(cond, weight.clone(), bias.clone(), Activation::Identity);
        if let Some(out) = self.packed.as_ref().and_then(|packed| packed_block(&x, &modulation, packed)) {
            return out;
        }
        block.forward_modulated(x, modulation, &TensorParallel::single(), |h| self.folded.forward(h))
    }
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().expect("f32 weights")
}

/// A Linear's weight and bias (zeros where it has none).
fn linear_values(layer: &Linear) -> (Vec<f32>, Vec<f32>) {
    let weight = layer.weight.val();
    let bias = layer.bias.as_ref().map_or_else(|| vec![0.0; weight.dims()[1]], |b| values(b.val()));
    (values(weight), bias)
}

fn norm_values(ln: &LayerNorm) -> (Vec<f32>, Vec<f32>) {
    let weight = values(ln.gamma.val());
    let bias = ln.beta.as_ref().map_or_else(|| vec![0.0; weight.len()], |b| values(b.val()));
    (weight, bias)
}

fn pack_block(block: &MnistDitsBlock, folded: &FoldedAttention) -> PackedBlock {
    let norms = [norm_values(&block.ln1), norm_values(&block.ln2)];
    let attention = (values(folded.weight.clone()), values(folded.bias.clone()));
    let (expand, contract) = (linear_values(&block.ff.expand), linear_values(&block.ff.contract));
    PackedBlock::pack(BlockWeights {
        norms: [(&norms[0].0, &norms[0].1), (&norms[1].0, &norms[1].1)],
        epsilon: LN_EPS as f32,
        attention: (&attention.0, &attention.1),
        heads: folded.heads,
        scale: folded.scale as f32,
        expand: (&expand.0, &expand.1),
        contract: (&contract.0, &contract.1),
    })
}
