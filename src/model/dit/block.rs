//! The DiT block with adaLN-Zero conditioning, and DiT's final layer.
//!
//! `shift, scale, gate = Linear(SiLU(c))` (zero-initialised, so every block starts as the
//! identity and the network as zero);
//! `x += gate₁·Attn(LN(x)·(1+scale₁) + shift₁)`, `x += gate₂·MLP(LN(x)·(1+scale₂) + shift₂)`,
//! with LayerNorms that have no parameters of their own.

use crate::kernels::cast_like;
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::activation::silu;

use super::embed::{xavier_linear, zero_linear};
use crate::kernels::{
    Activation, SequenceParallel, TensorParallel, gated_residual, linear_act, modulated_layer_norm, packed_attention,
};
use crate::model::config::DitConfig;

/// DiT's LayerNorm epsilon.
const LN_EPS: f64 = 1e-6;

/// `LN(x)·(1 + scale) + shift` (the LayerNorm without parameters of its own), with `scale`,
/// `shift`: `[B, W]` broadcast over tokens; one fused kernel on the CPU.
fn modulated_norm(x: Tensor<3>, shift: Tensor<2>, scale: Tensor<2>) -> Tensor<3> {
    let width = x.dims()[2];
    let (ones, zeros) = (Tensor::<1>::ones([width], &x.device()), Tensor::<1>::zeros([width], &x.device()));
    let (ones, zeros) = (cast_like(ones, &x), cast_like(zeros, &x));
    modulated_layer_norm(x, ones, zeros, shift, scale, LN_EPS)
}

/// timm's `Attention`: one `qkv` projection, heads of `head_dim`, `proj` back to the width.
#[derive(Module, Debug)]
pub struct Attention {
    pub qkv: Linear,
    pub proj: Linear,
    pub heads: usize,
    pub scale: f64,
}

impl Attention {
    /// Over the heads of this rank of `tp` (Megatron: `qkv` column-parallel, `proj`
    /// row-parallel), and with `sp` over this rank's tokens of the sequence (Ulysses: the heads
    /// exchanged for the tokens around attention); all heads and tokens on one rank.
    pub fn forward(&self, x: Tensor<3>, tp: &TensorParallel, sp: Option<&SequenceParallel>) -> Tensor<3> {
        let qkv = linear_act(&self.qkv, tp.enter(x), Activation::Identity); // [B, S/P, 3·(H/T)·D]
        let out = match sp {
            Some(sp) => sp.attention(qkv, self.scale),
            None => packed_attention(qkv, self.heads / tp.size(), self.scale),
        };
        tp.row_linear(&self.proj, out)
    }
}

/// `fc1 → GELU(tanh) → fc2`; PyTorch keys `mlp.fc1`, `mlp.fc2`. On the CPU the GELU runs inside
/// the fused Linear kernel (burn's composed `gelu_approximate` spent most of a DiT training step
/// in scalar `powf` and `tanh` calls).
#[derive(Module, Debug)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl Mlp {
    /// Over this rank's hidden columns of `tp` (`fc1` column-parallel, `fc2` row-parallel).
    pub fn forward(&self, x: Tensor<3>, tp: &TensorParallel) -> Tensor<3> {
        tp.row_linear(&self.fc2, linear_act(&self.fc1, tp.enter(x), Activation::GeluTanh))
    }
}

#[derive(Module, Debug)]
pub struct DitBlock {
    pub attn: Attention,
    pub mlp: Mlp,
    /// `SiLU → Linear(width → 6·width)`, PyTorch key `adaLN_modulation.1`.
    pub ada_ln: Linear,
}

impl DitBlock {
    pub fn new(cfg: &DitConfig, device: &Device) -> Self {
        let w = cfg.width;
        Self {
            attn: Attention {
                qkv: xavier_linear(w, 3 * w, device),
                proj: xavier_linear(w, w, device),
                heads: cfg.heads,
                scale: cfg.attn_scale_value(),
            },
            mlp: Mlp {
                fc1: xavier_linear(w, w * cfg.mlp_ratio, device),
                fc2: xavier_linear(w * cfg.mlp_ratio, w, device),
            },
            ada_ln: zero_linear(w, 6 * w, device),
        }
    }

    /// `x`: `[B, S, W]`, `c`: `[B, W]` → `[B, S, W]`, its heads and MLP columns split over the
    /// ranks of `tp`; with `sp`, `x` is this rank's tokens `[B, S/P, W]` of sequences split over
    /// the ranks of `sp` (DeepSpeed-Ulysses): everything but attention is token-wise.
    pub fn forward(&self, x: Tensor<3>, c: Tensor<2>, tp: &TensorParallel, sp: Option<&SequenceParallel>) -> Tensor<3> {
        self.around(x, c, |h| self.attn.forward(h, tp, sp), tp)
    }

    /// [`Self::forward`] on this rank's tokens of sequences split over `sp`, the block whole.
    pub fn forward_sequence_parallel(&self, x: Tensor<3>, c: Tensor<2>, sp: &SequenceParallel) -> Tensor<3> {
        self.forward(x, c, &TensorParallel::single(), Some(sp))
    }

    /// The block around `attention`, which maps the modulated tokens to the attention's output.
    fn around(
        &self,
        x: Tensor<3>,
        c: Tensor<2>,
        attention: impl FnOnce(Tensor<3>) -> Tensor<3>,
        tp: &TensorParallel,
    ) -> Tensor<3> {
        let m = self.ada_ln.forward(silu(c)).chunk(6, 1); // 6 × [B, W]
        let [shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp] =
            <[Tensor<2>; 6]>::try_from(m).expect("six chunks");
        let h = modulated_norm(x.clone(), shift_msa, scale_msa);
        let x = gated_residual(x, gate_msa, attention(h));
        let h = modulated_norm(x.clone(), shift_mlp, scale_mlp);
        gated_residual(x, gate_mlp, self.mlp.forward(h, tp))
    }
}

/// `LN → modulate(shift, scale) → Linear(width → p²·C)`, both Linears zero-initialised.
/// PyTorch keys `final_layer.linear`, `final_layer.adaLN_modulation.1`.
#[derive(Module, Debug)]
pub struct FinalLayer {
    pub linear: Linear,
    pub ada_ln: Linear,
}

impl FinalLayer {
    pub fn new(width: usize, patch_values: usize, device: &Device) -> Self {
        Self { linear: zero_linear(width, patch_values, device), ada_ln: zero_linear(width, 2 * width, device) }
    }

    /// `[B, S, W]`, `[B, W]` → `[B, S, p²·C]`.
    pub fn forward(&self, x: Tensor<3>, c: Tensor<2>) -> Tensor<3> {
        let [shift, scale] = <[Tensor<2>; 2]>::try_from(self.ada_ln.forward(silu(c)).chunk(2, 1)).expect("two chunks");
        linear_act(&self.linear, modulated_norm(x, shift, scale), Activation::Identity)
    }
}
