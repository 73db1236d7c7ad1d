//! Fused CPU kernels for the DiT hot spots, as a burn backend extension.
//!
//! Each kernel is an operation of the [`DitKernels`] extension trait, implemented for burn's
//! CPU backend `Flex` (plain Rust over the tensors' buffers, [`flex`]) and for `Autodiff<Flex>`
//! (the same forward plus a handwritten backward, [`autodiff`]). The `Tensor`-level functions
//! of [`ops`] pick the kernel on the CPU and the composed burn operations on any other device
//! (CUDA, wgpu), so GPU builds keep working unchanged; the composed versions are also what the
//! kernels are tested against. The numerical engines are one file each below them.

/// Defines `$name` (with visibility `$vis`) that runs `$body` (an `#[inline(always)]` function)
/// compiled for the extension the kernels use ([`isa::active`]).
macro_rules! multiversion {
    ($vis:vis $name:ident($($arg:ident: $ty:ty),*) => $body:ident) => {
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) {
            // Not in fuzz builds: nightly LLVM cannot compile these with cargo-fuzz's coverage
            // passes ("Cannot select"), and no fuzz target reaches the kernels.
            #[cfg(all(target_arch = "x86_64", not(fuzzing)))]
            {
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $ty),*) { $body($($arg),*) }
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) { $body($($arg),*) }
                match $crate::kernels::isa::active() {
                    // SAFETY: the active extension is one the CPU has (`isa::active`).
                    $crate::kernels::isa::Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    $crate::kernels::isa::Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::kernels::isa::Isa::Portable => {}
                }
            }
            $body($($arg),*)
        }
    };
}

mod autodiff;
mod exchange;
mod flex;
mod ops;
mod parallel;
mod sequence;
#[cfg(test)]
mod tests;
mod tokens;

pub mod attention;
pub mod buffer;
pub mod cache;
pub mod feed_forward;
pub mod fold;
pub mod gemm;
pub mod inference_block;
pub mod isa;
pub mod linear;
pub mod norm;
pub mod panels;
pub mod patches;
pub mod peak;
pub mod projected_attention;
pub mod residual;
pub mod simd;
pub mod tile;
pub mod tile_avx2;
pub mod transpose;
pub mod weight_gradient;

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, backend_extension};

pub use exchange::{Exchange, ExchangeDirection};

/// A data movement of the extension and its adjoint, which the backward pass runs: the
/// collectives (Ulysses' exchange, Megatron's sums, token shards) and the patch layout.
pub(crate) trait Adjoint: Clone + Send + std::fmt::Debug + 'static {
    fn forward(&self, x: &burn::backend::flex::FlexTensor) -> burn::backend::flex::FlexTensor;
    fn backward(&self, grad: &burn::backend::flex::FlexTensor) -> burn::backend::flex::FlexTensor;
}
pub use linear::Activation;
pub use ops::*;
pub use parallel::{GroupSum, ReduceIn, TensorParallel};
pub use sequence::SequenceParallel;
pub use tokens::{TokenDirection, TokenShards};

#[backend_extension(Flex, Autodiff)]
pub trait DitKernels: Backend {
    /// Multi-head self-attention from a packed `qkv` `[B, S, 3·H·D]` to `[B, S, H·D]`
    /// (see [`attention`]).
    fn packed_attention(qkv: FloatTensor<Self>, heads: usize, scale: f64) -> FloatTensor<Self>;

    /// Attention with folded projections, `qv` `[B, S, 2·H·W]` and `keys` `[B, S, W]` to
    /// `[B, S, W]` (see [`attention::folded_forward`]).
    fn folded_attention(qv: FloatTensor<Self>, keys: FloatTensor<Self>, heads: usize, scale: f64) -> FloatTensor<Self>;

    /// [`Self::folded_attention`] of `qv = h·weight + bias` and the keys `h` `[B, S, W]`: the
    /// projection and the attention in one pass over the images where the CPU can (see
    /// [`projected_attention`]).
    fn projected_folded_attention(
        h: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        heads: usize,
        scale: f64,
    ) -> FloatTensor<Self>;

    /// adaLN: `LN(x)·(1 + scale) + shift`, see [`norm`].
    fn modulated_layer_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self>;

    /// `x + gate·y` with a per-image gate, see [`residual`].
    fn gated_residual(x: FloatTensor<Self>, gate: FloatTensor<Self>, y: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `act(x·W + b)` over the last axis of `x`, see [`linear`].
    fn fused_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        activation: Activation,
    ) -> FloatTensor<Self>;

    /// The feed-forward network `act(x·W₁ + b₁)·W₂ + b₂` over the last axis of `x`, ReLU or the
    /// identity inside, see [`feed_forward`].
    fn feed_forward(
        x: FloatTensor<Self>,
        w1: FloatTensor<Self>,
        b1: FloatTensor<Self>,
        w2: FloatTensor<Self>,
        b2: FloatTensor<Self>,
        activation: Activation,
    ) -> FloatTensor<Self>;

    /// A block's attention projections folded into one weight and its bias, `[W + 1, 2·H·W]`
    /// (weight rows, then the bias row), from `wq`, `wk`, `wv` `[W, H·D]`, `bq`, `bv` `[H·D]`,
    /// `lv` `[H·D, W]` and the output bias `b_out` `[W]`; see [`fold`].
    #[allow(clippy::too_many_arguments)]
    fn fold_attention(
        wq: FloatTensor<Self>,
        bq: FloatTensor<Self>,
        wk: FloatTensor<Self>,
        wv: FloatTensor<Self>,
        bv: FloatTensor<Self>,
        lv: FloatTensor<Self>,
        b_out: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self>;

    /// Ulysses' all-to-all between token shards and head groups, see
    /// [`Exchange`]; the backward pass is the opposite exchange.
    fn exchange(x: FloatTensor<Self>, plan: Exchange) -> FloatTensor<Self>;

    /// Megatron's `f` or `g`: a sum over a tensor-parallel group in one pass, the identity in
    /// the other, see [`TensorParallel`].
    fn group_sum(x: FloatTensor<Self>, op: GroupSum) -> FloatTensor<Self>;

    /// Gather or reduce-scatter a sequence-parallel group's token shards, see [`TokenShards`];
    /// the backward pass is the other one.
    fn token_shards(x: FloatTensor<Self>, op: TokenShards) -> FloatTensor<Self>;

    /// Images to patch tokens or back, see [`patches::Patches`]; the backward pass is the other
    /// direction.
    fn patches(x: FloatTensor<Self>, op: patches::Patches) -> FloatTensor<Self>;
}
