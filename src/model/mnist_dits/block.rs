//! One DiT block: adaLN modulation from the condition, multi-head self-attention, a
//! feed-forward network, each added back through a condition-dependent gate α.
//!
//! `h = LN(x)·(1+γ) + β;  x = x + α·Attn(h)`, then the same with the FFN.

use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::{relu, softmax};

use crate::model::config::DitConfig;

/// `Linear(width → ratio·width) → ReLU → Linear(ratio·width → width)`; PyTorch keys `ff.0`
/// and `ff.2`.
#[derive(Module, Debug)]
pub struct FeedForward {
    pub expand: Linear,
    pub contract: Linear,
}

impl FeedForward {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.contract.forward(relu(self.expand.forward(x)))
    }
}

#[derive(Module, Debug)]
pub struct DitBlock {
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

impl DitBlock {
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

    /// `x`: `[batch, tokens, width]`, `cond`: `[batch, width]` → `[batch, tokens, width]`.
    pub fn forward(&self, x: Tensor<3>, cond: Tensor<2>) -> Tensor<3> {
        let modulation = |l: &Linear| l.forward(cond.clone()).unsqueeze_dim::<3>(1); // [B,1,W]
        let (g1, b1, a1) = (modulation(&self.gamma1), modulation(&self.beta1), modulation(&self.alpha1));
        let (g2, b2, a2) = (modulation(&self.gamma2), modulation(&self.beta2), modulation(&self.alpha2));

        let h = self.ln1.forward(x.clone()) * (g1 + 1.0) + b1; // [B,S,W]
        let x = x + a1 * self.lv.forward(self.attention(h)); // [B,S,W]

        let h = self.ln2.forward(x.clone()) * (g2 + 1.0) + b2; // [B,S,W]
        x + a2 * self.ff.forward(h)
    }

    /// Multi-head self-attention without the output projection: `[B,S,W] → [B,S,H·D]`.
    fn attention(&self, h: Tensor<3>) -> Tensor<3> {
        let [b, s, _] = h.dims();
        let (nh, d) = (self.heads, self.head_dim);
        let split = |l: &Linear| l.forward(h.clone()).reshape([b, s, nh, d]).swap_dims(1, 2); // [B,H,S,D]
        let q = split(&self.wq);
        let k = split(&self.wk).swap_dims(2, 3); // [B,H,D,S]
        let v = split(&self.wv);
        let scores = softmax(q.matmul(k) * self.attn_scale, 3); // [B,H,S,S]
        scores.matmul(v).swap_dims(1, 2).reshape([b, s, nh * d]) // [B,S,H·D]
    }
}
