//! Folding a block's attention projections into two weight matrices (as batch norm is folded
//! into a convolution): the same function with fewer multiply-adds, in training and sampling.
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
//! The folded weights are computed from the parameters with differentiable tensor operations,
//! so in training the gradients flow back to `Wq`, `Wk`, `Wv`, `Lv` and their biases: the
//! parameters, checkpoints and PyTorch weights are the unfolded model's. (`bk` gets an exactly
//! zero gradient, as it mathematically has: it does not change the function. Unfolded, its
//! gradient is rounding noise, which Adam's normalisation can turn into steps of up to lr.)
//! The results equal the unfolded block's up to float rounding (the products are associated
//! differently); `tests` bounds the difference.

use burn::prelude::*;

use super::block::MnistDitsBlock;
use crate::kernels::{
    Activation, AttentionProjections, SequenceParallel, fold_attention, fused_linear, linear_bias,
    projected_folded_attention,
};

/// Whether folding saves work for `tokens` tokens of width `width` and heads of `head_dim`.
/// Multiply-adds per token and head: unfolded 3WD (q, k, v) + DW (output) + 2SD (scores,
/// weighted sum); folded 2W² (q', v') + 2SW.
pub fn folding_pays(tokens: usize, width: usize, head_dim: usize) -> bool {
    width * width + tokens * width < 2 * width * head_dim + tokens * head_dim
}

/// One block's attention with its projections folded.
#[derive(Debug, Clone)]
pub struct FoldedAttention {
    /// `h → [Q'₀ … Q'ₕ₋₁ | V'₀ … V'ₕ₋₁]`, `[W, 2·H·W]`, and its bias `[2·H·W]`.
    pub(super) weight: Tensor<2>,
    pub(super) bias: Tensor<1>,
    pub(super) heads: usize,
    pub(super) scale: f64,
}

impl FoldedAttention {
    /// The folded form of `block`'s attention over `tokens` tokens, or `None` when folding
    /// would cost more multiply-adds than it saves.
    pub fn new(block: &MnistDitsBlock, tokens: usize) -> Option<Self> {
        Self::fold(block, tokens, true)
    }

    /// [`Self::new`] for the heads a block holds, without the output projection's bias: for a
    /// tensor-parallel shard, whose partial outputs are summed over the ranks before the bias.
    pub fn without_output_bias(block: &MnistDitsBlock, tokens: usize) -> Option<Self> {
        Self::fold(block, tokens, false)
    }

    fn fold(block: &MnistDitsBlock, tokens: usize, output_bias: bool) -> Option<Self> {
        let d = block.head_dim;
        let [w, inner] = block.wq.weight.dims();
        let h = inner / d; // the heads this block holds
        if !folding_pays(tokens, w, d) {
            return None;
        }
        let b_out = linear_bias(&block.lv);
        let projections = AttentionProjections {
            wq: block.wq.weight.val(),
            bq: linear_bias(&block.wq),
            wk: block.wk.weight.val(),
            wv: block.wv.weight.val(),
            bv: linear_bias(&block.wv),
            lv: block.lv.weight.val(),
            b_out: if output_bias { b_out } else { b_out.zeros_like() },
        };
        let (weight, bias) = fold_attention(projections, h);
        Some(Self { weight, bias, heads: h, scale: block.attn_scale })
    }

    /// [`Self::forward`] on this rank's tokens `h` `[B, S/P, W]` of sequences split over the
    /// ranks of `sp` (the folded weights are those of every token: fold with the whole count).
    pub fn forward_sequence_shard(&self, h: Tensor<3>, sp: &SequenceParallel) -> Tensor<3> {
        let qv = fused_linear(h.clone(), self.weight.clone(), self.bias.clone(), Activation::Identity);
        sp.folded_attention(qv, h, self.scale)
    }

    /// `h` `[B, S, W]` (the modulated LayerNorm's output) → the attention's contribution after
    /// the output projection, `[B, S, W]`.
    pub fn forward(&self, h: Tensor<3>) -> Tensor<3> {
        projected_folded_attention(h, self.weight.clone(), self.bias.clone(), self.heads, self.scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{TensorParallel, folded_attention, folded_attention_composed};
    use crate::model::config::DitConfig;
    use burn::tensor::Distribution;

    fn max_rel_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        let scale = b.clone().abs().max().into_scalar::<f32>().max(1e-6);
        (a - b).abs().max().into_scalar::<f32>() / scale
    }

    fn normal<const D: usize>(shape: [usize; D], seed: u64, device: &Device) -> Tensor<D> {
        crate::rng::with_device_seed(device, seed, || Tensor::random(shape, Distribution::Normal(0.0, 1.0), device))
    }

    /// A block with folded attention computes what the unfolded block computes, with non-zero
    /// biases everywhere (PyTorch's initialisation), and the folded kernel what the composed
    /// operations compute.
    #[test]
    fn folded_block_equals_the_block() {
        let cfg = DitConfig::mnist_dits();
        let device = Device::flex();
        let block = crate::rng::with_device_seed(&device, 5, || {
            let b = MnistDitsBlock::new(&cfg, &device);
            crate::rng::init_params_now(&b);
            b
        });
        let folded = FoldedAttention::new(&block, cfg.tokens()).expect("mnist-dits folds");
        let x = normal([3, cfg.tokens(), cfg.width], 6, &device);
        let cond = normal([3, cfg.width], 7, &device);
        let want = block.forward_unfolded(x.clone(), cond.clone(), &TensorParallel::single());
        let diff = max_rel_diff(block.forward_folded(x.clone(), cond.clone(), &folded), want.clone());
        assert!(diff < 1e-5, "folded block differs by {diff}");
        let diff = max_rel_diff(block.forward(x.clone(), cond.clone(), &TensorParallel::single()), want);
        assert!(diff < 1e-5, "the block's own forward differs from the unfolded block by {diff}");
        let qv = fused_linear(x.clone(), folded.weight.clone(), folded.bias.clone(), Activation::Identity);
        let kernel = folded_attention(qv.clone(), x.clone(), folded.heads, folded.scale);
        let composed = folded_attention_composed(qv, x, folded.heads, folded.scale);
        let diff = max_rel_diff(kernel, composed);
        assert!(diff < 1e-5, "folded attention kernel vs composed: {diff}");
    }

    /// The folded kernel's backward pass against autodiff through the composed operations:
    /// the gradients of `qv` and of the keys (1e-5 relative).
    #[test]
    fn folded_attention_gradients_match_composed() {
        let device = Device::flex().autodiff();
        for (b, s, heads, w) in [(2, 49, 4, 64), (3, 10, 3, 20)] {
            let qv = normal([b, s, 2 * heads * w], 11, &device).require_grad();
            let keys = normal([b, s, w], 12, &device).require_grad();
            let upstream = normal([b, s, w], 13, &device);
            let run = |f: fn(Tensor<3>, Tensor<3>, usize, f64) -> Tensor<3>| {
                let (qv, keys) = (qv.clone(), keys.clone());
                let out = f(qv.clone(), keys.clone(), heads, 0.3);
                let grads = (out.clone() * upstream.clone()).sum().backward();
                (out.inner(), qv.grad(&grads).unwrap(), keys.grad(&grads).unwrap())
            };
            let (kernel, composed) = (run(folded_attention), run(folded_attention_composed));
            assert!(max_rel_diff(kernel.0, composed.0) < 1e-5, "{b}×{s}×{heads}×{w}: outputs differ");
            let d = max_rel_diff(kernel.1, composed.1);
            assert!(d < 1e-5, "{b}×{s}×{heads}×{w}: qv gradients differ by {d}");
            let d = max_rel_diff(kernel.2, composed.2);
            assert!(d < 1e-5, "{b}×{s}×{heads}×{w}: key gradients differ by {d}");
        }
    }

    /// Gradients reach every projection parameter through the folding and match the unfolded
    /// block's, except `bk`'s: unused when folded, and vanishing (rounding only) unfolded.
    #[test]
    fn parameter_gradients_match_the_unfolded_block() {
        let cfg = DitConfig::mnist_dits();
        let device = Device::flex().autodiff();
        let block = crate::rng::with_device_seed(&device, 21, || {
            let b = MnistDitsBlock::new(&cfg, &device);
            crate::rng::init_params_now(&b);
            b
        });
        let x = normal([2, cfg.tokens(), cfg.width], 22, &device);
        let cond = normal([2, cfg.width], 23, &device);
        let upstream = normal([2, cfg.tokens(), cfg.width], 24, &device);
        let grads_of = |out: Tensor<3>| (out * upstream.clone()).sum().backward();
        let single = TensorParallel::single();
        let (folded, unfolded) = (
            grads_of(block.forward(x.clone(), cond.clone(), &single)),
            grads_of(block.forward_unfolded(x, cond, &single)),
        );
        for (name, layer) in [("wq", &block.wq), ("wk", &block.wk), ("wv", &block.wv), ("lv", &block.lv)] {
            let (a, b) = (layer.weight.grad(&folded).unwrap(), layer.weight.grad(&unfolded).unwrap());
            let d = max_rel_diff(a, b);
            assert!(d < 1e-4, "{name}.weight gradient differs by {d}");
            let bias = layer.bias.as_ref().unwrap();
            let b = bias.grad(&unfolded).unwrap();
            if name == "wk" {
                // Folded, bk is not used at all (training reads a missing gradient as zero).
                assert!(bias.grad(&folded).is_none(), "bk should not reach the folded graph");
                let largest = b.abs().max().into_scalar::<f32>();
                assert!(largest < 1e-5, "bk's unfolded gradient should vanish, is {largest}");
            } else {
                let d = max_rel_diff(bias.grad(&folded).unwrap(), b);
                assert!(d < 1e-4, "{name}.bias gradient differs by {d}");
            }
        }
    }

    /// The DiT-paper shapes (heads narrower than the tokens) are not folded.
    #[test]
    fn wide_tokens_are_not_folded() {
        let cfg = DitConfig::mnist_dits();
        let device = Device::flex();
        let mut block = MnistDitsBlock::new(&cfg, &device);
        block.head_dim = 16; // 4 heads of 16 over 64-wide tokens
        assert!(FoldedAttention::new(&block, cfg.tokens()).is_none());
    }
}
