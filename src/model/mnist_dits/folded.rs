//! Inference-time folding of a block's attention projections (as batch norm is folded into a
//! convolution before deployment): the same function with fewer multiplications.
//!
//! Scores need only `qᵢ·kⱼ` per head. With `q = hWq + bq` and `k = hWk + bk`,
//! `qᵢ·kⱼ = (hᵢ·WqₕWkₕᵀ + bqₕWkₕᵀ)·hⱼ + (terms that do not depend on the key j)`, and a softmax
//! over the keys ignores such terms. So each head's queries fold into `Q'ₕ = h·Aₕ + uₕ`, scored
//! against the normalised tokens `h` themselves: no key projection. Likewise, through the output
//! projection `Lv`, `Σₕ Pₕ(hWvₕ + bvₕ)Lvₕ + b = Σₕ Pₕ(h·WvₕLvₕ + bvₕLvₕ) + b`, and `b` joins
//! head 0's value bias because every row of `Pₕ` sums to one: no output projection.
//!
//! Folded heads are `W` wide instead of `D`, so this pays only when heads are at least as wide as
//! the tokens. In mnist-dits (4 heads of 64 over 64-wide tokens, 49 tokens) it removes the key
//! and output projections, 26% of the forward pass's multiply-adds; in the DiT-paper presets
//! (`W = H·D`) it would add work, and [`FoldedAttention::new`] declines.
//!
//! The results equal the unfolded block's up to float rounding (the products are associated
//! differently); `tests` bounds the difference.

use burn::module::Param;
use burn::nn::Linear;
use burn::prelude::*;

use super::block::DitBlock;
use crate::kernels::{Activation, folded_attention, linear_act};

/// One block's attention with its projections folded (inference only: no gradients).
#[derive(Debug, Clone)]
pub struct FoldedAttention {
    /// `h → [Q'₀ … Q'ₕ₋₁ | V'₀ … V'ₕ₋₁]`, `[W, 2·H·W]`.
    qv: Linear,
    heads: usize,
    scale: f64,
}

impl FoldedAttention {
    /// The folded form of `block`'s attention over `tokens` tokens, or `None` when folding
    /// would cost more multiply-adds than it saves.
    pub fn new(block: &DitBlock, tokens: usize) -> Option<Self> {
        let (h, d) = (block.heads, block.head_dim);
        let w = block.wq.weight.dims()[0];
        // Multiply-adds per token and head: unfolded 3WD (q, k, v) + DW (output) + 2SD (scores,
        // weighted sum); folded 2W² (q', v') + 2SW.
        if w * w + tokens * w >= 2 * w * d + tokens * d {
            return None;
        }
        let bias = |layer: &Linear| match &layer.bias {
            Some(b) => b.val(),
            None => Tensor::zeros([layer.weight.dims()[1]], &layer.weight.device()),
        };
        let (wq, wk, wv, lv) =
            (block.wq.weight.val(), block.wk.weight.val(), block.wv.weight.val(), block.lv.weight.val());
        let (bq, bv, b_out) = (bias(&block.wq).unsqueeze::<2>(), bias(&block.wv).unsqueeze::<2>(), bias(&block.lv));
        let mut weights = Vec::with_capacity(2 * h);
        let mut biases = Vec::with_capacity(2 * h);
        for head in 0..h {
            let wk_t = wk.clone().narrow(1, head * d, d).transpose(); // [D, W]
            weights.push(wq.clone().narrow(1, head * d, d).matmul(wk_t.clone())); // Aₕ = WqₕWkₕᵀ
            biases.push(bq.clone().narrow(1, head * d, d).matmul(wk_t)); // uₕ = bqₕWkₕᵀ
        }
        for head in 0..h {
            let lv_h = lv.clone().narrow(0, head * d, d); // [D, W]
            weights.push(wv.clone().narrow(1, head * d, d).matmul(lv_h.clone())); // WvₕLvₕ
            let c = bv.clone().narrow(1, head * d, d).matmul(lv_h); // bvₕLvₕ
            biases.push(if head == 0 { c + b_out.clone().unsqueeze::<2>() } else { c });
        }
        let qv = Linear {
            weight: Param::from_tensor(Tensor::cat(weights, 1)),
            bias: Some(Param::from_tensor(Tensor::cat(biases, 1).reshape([2 * h * w]))),
        };
        Some(Self { qv, heads: h, scale: block.attn_scale })
    }

    /// `h` `[B, S, W]` (the modulated LayerNorm's output) → the attention's contribution after
    /// the output projection, `[B, S, W]`.
    pub fn forward(&self, h: Tensor<3>) -> Tensor<3> {
        let qv = linear_act(&self.qv, h.clone(), Activation::Identity);
        folded_attention(qv, h, self.heads, self.scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::DitConfig;
    use burn::tensor::Distribution;

    fn max_rel_diff(a: Tensor<3>, b: Tensor<3>) -> f32 {
        let scale = b.clone().abs().max().into_scalar::<f32>().max(1e-6);
        (a - b).abs().max().into_scalar::<f32>() / scale
    }

    /// A block with folded attention computes what the block computes, with non-zero biases
    /// everywhere (PyTorch's initialisation), on the CPU kernel and on the composed operations.
    #[test]
    fn folded_block_equals_the_block() {
        let cfg = DitConfig::mnist_dits();
        let device = Device::flex();
        let block = crate::rng::with_device_seed(&device, 5, || DitBlock::new(&cfg, &device));
        let folded = FoldedAttention::new(&block, cfg.tokens()).expect("mnist-dits folds");
        let x = crate::rng::with_device_seed(&device, 6, || {
            Tensor::<3>::random([3, cfg.tokens(), cfg.width], Distribution::Normal(0.0, 1.0), &device)
        });
        let cond = crate::rng::with_device_seed(&device, 7, || {
            Tensor::<2>::random([3, cfg.width], Distribution::Normal(0.0, 1.0), &device)
        });
        let want = block.forward(x.clone(), cond.clone());
        let got = block.forward_folded(x.clone(), cond.clone(), &folded);
        let diff = max_rel_diff(got, want.clone());
        assert!(diff < 1e-5, "folded block differs by {diff}");
        // The attention alone, kernel vs composed operations.
        let h = x.clone();
        let qv = linear_act(&folded.qv, h.clone(), Activation::Identity);
        let kernel = folded_attention(qv.clone(), h.clone(), folded.heads, folded.scale);
        let composed = crate::kernels::folded_attention_composed(qv, h, folded.heads, folded.scale);
        let diff = max_rel_diff(kernel, composed);
        assert!(diff < 1e-5, "folded attention kernel vs composed: {diff}");
    }

    /// The DiT-paper shapes (heads narrower than the tokens) are not folded.
    #[test]
    fn wide_tokens_are_not_folded() {
        let cfg = DitConfig::mnist_dits();
        let device = Device::flex();
        let mut block = DitBlock::new(&cfg, &device);
        block.head_dim = 16; // 4 heads of 16 over 64-wide tokens
        assert!(FoldedAttention::new(&block, cfg.tokens()).is_none());
    }
}
