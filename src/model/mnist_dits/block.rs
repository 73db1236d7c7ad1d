//! One DiT block: adaLN modulation from the condition, multi-head self-attention, a
//! feed-forward network, each added back through a condition-dependent gate α.
//!
//! `h = LN(x)·(1+γ) + β;  x = x + α·Attn(h)`, then the same with the FFN.

use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;

use super::folded::FoldedAttention;
use crate::kernels::{
    Activation, SequenceParallel, TensorParallel, feed_forward, gated_residual, linear_act, linear_bias, linear_cat,
    modulated_layer_norm, packed_attention,
};
use crate::model::config::DitConfig;

/// `Linear(width → ratio·width) → ReLU → Linear(ratio·width → width)`; PyTorch keys `ff.0`
/// and `ff.2`. Bias and ReLU are applied inside the fused Linear kernel on the CPU.
#[derive(Module, Debug)]
pub struct FeedForward {
    pub expand: Linear,
    pub contract: Linear,
}

impl FeedForward {
    /// Over this rank's hidden columns of `tp` (`expand` column-parallel, `contract`
    /// row-parallel).
    pub fn forward(&self, x: Tensor<3>, tp: &TensorParallel) -> Tensor<3> {
        if tp.size() == 1 {
            let (expand, contract) = (&self.expand, &self.contract);
            let layers = ((expand.weight.val(), linear_bias(expand)), (contract.weight.val(), linear_bias(contract)));
            return feed_forward(x, layers.0, layers.1, Activation::Relu);
        }
        tp.row_linear(&self.contract, linear_act(&self.expand, tp.enter(x), Activation::Relu))
    }
}

/// PyTorch's `nn.LayerNorm` epsilon, which mnist-dits keeps.
pub(super) const LN_EPS: f64 = 1e-5;

/// `ln(x)·(1 + scale) + shift` through the fused kernel, with `ln`'s own weight and bias.
pub(crate) fn adaln(ln: &LayerNorm, x: Tensor<3>, shift: Tensor<2>, scale: Tensor<2>) -> Tensor<3> {
    let weight = ln.gamma.val();
    let bias = ln.beta.as_ref().map(|b| b.val()).unwrap_or_else(|| weight.zeros_like());
    modulated_layer_norm(x, weight, bias, shift, scale, LN_EPS)
}

#[derive(Module, Debug)]
pub struct MnistDitsBlock {
    pub gamma1: Linear,
    pub beta1: Linear,
    pub alpha1: Linear,
    pub gamma2: Linear,
    pub beta2: Linear,
    pub alpha2: Linear,
    pub ln1: LayerNorm,
    pub ln2: LayerNorm,
    pub wq: Linear,
    pub wk: Linear,
    pub wv: Linear,
    /// Output projection of the attention (`heads·head_dim → width`).
    pub lv: Linear,
    pub ff: FeedForward,
    pub heads: usize,
    pub head_dim: usize,
    pub attn_scale: f64,
}

impl MnistDitsBlock {
    pub fn new(cfg: &DitConfig, device: &Device) -> Self {
        let w = cfg.width;
        let inner = cfg.heads * cfg.head_dim;
        let lin = |i, o| LinearConfig::new(i, o).init(device);
        Self {
            gamma1: lin(w, w),
            beta1: lin(w, w),
            alpha1: lin(w, w),
            gamma2: lin(w, w),
            beta2: lin(w, w),
            alpha2: lin(w, w),
            ln1: LayerNormConfig::new(w).init(device),
            ln2: LayerNormConfig::new(w).init(device),
            wq: lin(w, inner),
            wk: lin(w, inner),
            wv: lin(w, inner),
            lv: lin(inner, w),
            ff: FeedForward { expand: lin(w, w * cfg.mlp_ratio), contract: lin(w * cfg.mlp_ratio, w) },
            heads: cfg.heads,
            head_dim: cfg.head_dim,
            attn_scale: cfg.attn_scale_value(),
        }
    }

    /// `x`: `[batch, tokens, width]`, `cond`: `[batch, width]` → `[batch, tokens, width]`, the
    /// heads and FFN columns split over the ranks of `tp` (this block holds this rank's shard).
    ///
    /// Runs the attention folded (see [`super::folded`]) where that saves work, as it does for
    /// the mnist-dits shapes: the same function as [`Self::forward_unfolded`] up to rounding.
    /// Split over ranks, each folds its own heads and the head sum is the group's all-reduce.
    pub fn forward(&self, x: Tensor<3>, cond: Tensor<2>, tp: &TensorParallel) -> Tensor<3> {
        let tokens = x.dims()[1];
        if tp.size() == 1 {
            return match FoldedAttention::new(self, tokens) {
                Some(folded) => self.forward_folded(x, cond, &folded),
                None => self.forward_unfolded(x, cond, tp),
            };
        }
        match FoldedAttention::without_output_bias(self, tokens) {
            Some(folded) => {
                self.forward_with(x, cond, tp, |h| self.output_bias(tp.reduce(folded.forward(tp.enter(h)))))
            }
            None => self.forward_unfolded(x, cond, tp),
        }
    }

    /// The block as written in mnist-dits: separate query, key, value and output projections.
    pub fn forward_unfolded(&self, x: Tensor<3>, cond: Tensor<2>, tp: &TensorParallel) -> Tensor<3> {
        self.forward_with(x, cond, tp, |h| tp.row_linear(&self.lv, self.attention(tp.enter(h), tp.size())))
    }

    /// [`Self::forward`] on this rank's tokens `x` `[B, S/P, W]` of sequences split over the
    /// ranks of `sp` (DeepSpeed-Ulysses): folded where that pays, as [`Self::forward`] (the
    /// keys, the tokens themselves, gathered from every rank; the heads' partial sums summed).
    pub fn forward_sequence_shard(
        &self,
        x: Tensor<3>,
        cond: Tensor<2>,
        tp: &TensorParallel,
        sp: &SequenceParallel,
    ) -> Tensor<3> {
        let tokens = x.dims()[1] * sp.size();
        let folded = match tp.size() {
            1 => FoldedAttention::new(self, tokens),
            _ => FoldedAttention::without_output_bias(self, tokens),
        };
        match folded {
            Some(folded) => self.forward_with(x, cond, tp, |h| {
                let out = folded.forward_sequence_shard(tp.enter(h), sp);
                if tp.size() == 1 { out } else { self.output_bias(tp.reduce(out)) }
            }),
            None => self.forward_with(x, cond, tp, |h| {
                let qkv = linear_cat(&[&self.wq, &self.wk, &self.wv], tp.enter(h), Activation::Identity);
                tp.row_linear(&self.lv, sp.attention(qkv, self.attn_scale))
            }),
        }
    }

    /// [`Self::forward`] with the folded weights given (computed once for many calls).
    pub fn forward_folded(&self, x: Tensor<3>, cond: Tensor<2>, folded: &FoldedAttention) -> Tensor<3> {
        self.forward_with(x, cond, &TensorParallel::single(), |h| folded.forward(h))
    }

    /// `x` plus the output projection's bias.
    fn output_bias(&self, x: Tensor<3>) -> Tensor<3> {
        match &self.lv.bias {
            Some(b) => x + b.val().unsqueeze(),
            None => x,
        }
    }

    /// The block around `attention`, which maps the normalised tokens to the attention's
    /// output after its projection.
    fn forward_with(
        &self,
        x: Tensor<3>,
        cond: Tensor<2>,
        tp: &TensorParallel,
        attention: impl FnOnce(Tensor<3>) -> Tensor<3>,
    ) -> Tensor<3> {
        self.forward_modulated(x, self.modulation(cond), tp, attention)
    }

    /// The six modulation Linears, in this order, whose outputs [`Self::modulation`] places
    /// side by side.
    pub(super) fn modulation_layers(&self) -> [&Linear; 6] {
        [&self.gamma1, &self.beta1, &self.alpha1, &self.gamma2, &self.beta2, &self.alpha2]
    }

    /// γ₁ β₁ α₁ γ₂ β₂ α₂ side by side, `[B, 6·W]`: the six modulation Linears as one product.
    fn modulation(&self, cond: Tensor<2>) -> Tensor<2> {
        linear_cat(&self.modulation_layers(), cond, Activation::Identity)
    }

    /// [`Self::forward_with`] from the modulation `[B, 6·W]` (see [`Self::modulation`]).
    pub(super) fn forward_modulated(
        &self,
        x: Tensor<3>,
        modulation: Tensor<2>,
        tp: &TensorParallel,
        attention: impl FnOnce(Tensor<3>) -> Tensor<3>,
    ) -> Tensor<3> {
        let [g1, b1, a1, g2, b2, a2] = <[Tensor<2>; 6]>::try_from(modulation.chunk(6, 1)).expect("six chunks");
        let h = adaln(&self.ln1, x.clone(), b1, g1); // LN(x)·(1+γ₁) + β₁
        let x = gated_residual(x, a1, attention(h)); // x + α₁·Attn(h)
        let h = adaln(&self.ln2, x.clone(), b2, g2);
        gated_residual(x, a2, self.ff.forward(h, tp))
    }

    /// Multi-head self-attention without the output projection: `[B,S,W] → [B,S,H·D]`.
    ///
    /// `wq`, `wk`, `wv` run as one projection (their weights side by side), which is the
    /// packed layout the attention kernel reads.
    /// With the heads split over `ranks`, this block's share of them.
    fn attention(&self, h: Tensor<3>, ranks: usize) -> Tensor<3> {
        let qkv = linear_cat(&[&self.wq, &self.wk, &self.wv], h, Activation::Identity);
        packed_attention(qkv, self.heads / ranks, self.attn_scale)
    }
}
