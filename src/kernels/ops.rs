//! The kernels as `Tensor` functions: the fused kernel on the CPU backend in f32, the composed
//! burn operations (each `*_composed`, also the kernels' test reference) everywhere else.

use std::sync::atomic::{AtomicBool, Ordering};

use burn::backend::{Dispatch, Flex};
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::activation::softmax;
use burn::tensor::module::layer_norm;

use super::flex::packed_block_forward;
use super::inference_block::PackedBlock;
use super::patches::{PatchDirection, PatchOrder, Patches};
use super::{Activation, DitKernels, Exchange, TokenShards};

/// True when `device` runs on the CPU backend these kernels are written for.
pub(crate) fn on_flex(device: &Device) -> bool {
    device.clone().inner() == Device::flex()
}

/// Off: every kernel takes its composed path (`dits bench --composed`, to measure what the
/// fused kernels save, and what a low-precision run, which composes, gives up).
static FUSED: AtomicBool = AtomicBool::new(true);

/// Turns the fused kernels on or off for the whole process.
pub fn set_fused(on: bool) {
    FUSED.store(on, Ordering::Relaxed);
}

/// Whether `x` is an f32 tensor on the CPU backend, the one the kernels are written for.
fn flex_f32<const D: usize>(x: &Tensor<D>) -> bool {
    on_flex(&x.device()) && x.dtype() == DType::F32
}

/// Whether the fused kernel takes `x`.
fn runs_fused<const D: usize>(x: &Tensor<D>) -> bool {
    flex_f32(x) && FUSED.load(Ordering::Relaxed)
}

/// `x` in the float type of `like`: the values a mixed-precision model makes itself (time
/// frequencies, positions, zeros) follow its weights' type. The identity in f32.
pub fn cast_like<const D: usize, const E: usize>(x: Tensor<D>, like: &Tensor<E>) -> Tensor<D> {
    let dtype = like.dtype();
    if x.dtype() == dtype { x } else { x.cast(dtype) }
}

/// f32 for the numerically fragile reductions of a low-precision forward (LayerNorm's mean and
/// variance, softmax's exponent sum), as mixed-precision training keeps them.
fn in_f32<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if x.dtype() == DType::F32 { x } else { x.cast(DType::F32) }
}

/// Sequence parallelism's exchange on the CPU backend (the only one it supports).
pub fn exchange(x: Tensor<3>, plan: Exchange) -> Tensor<3> {
    assert!(flex_f32(&x), "sequence parallelism runs on the CPU backend, in f32");
    Tensor::from_dispatch(<Dispatch as DitKernels>::exchange(x.into_dispatch(), plan))
}

/// A sequence-parallel group's token gather or reduce-scatter on the CPU backend.
pub fn token_shards(x: Tensor<3>, op: TokenShards) -> Tensor<3> {
    assert!(flex_f32(&x), "sequence parallelism runs on the CPU backend, in f32");
    Tensor::from_dispatch(<Dispatch as DitKernels>::token_shards(x.into_dispatch(), op))
}

/// Images `[B, C, H, W]` → patch tokens `[B, gh·gw, p²·C]`, each token's values in `order`
/// (see [`Patches`]).
pub fn patchify(image: Tensor<4>, patch: usize, order: PatchOrder) -> Tensor<3> {
    let [_, channels, height, width] = image.dims();
    let op = Patches { channels, height, width, patch, order, direction: PatchDirection::ToTokens };
    if runs_fused(&image) {
        return Tensor::from_dispatch(<Dispatch as DitKernels>::patches(image.into_dispatch(), op));
    }
    patchify_composed(image, patch, order)
}

/// [`patchify`] from burn's own operations.
pub fn patchify_composed(image: Tensor<4>, patch: usize, order: PatchOrder) -> Tensor<3> {
    let [b, c, height, width] = image.dims();
    let (gh, gw, p) = (height / patch, width / patch, patch);
    let grid = image.reshape([b, c, gh, p, gw, p]);
    let patches = match order {
        PatchOrder::ChannelsFirst => grid.permute([0, 2, 4, 1, 3, 5]), // [B, gh, gw, C, p, p]
        PatchOrder::ChannelsLast => grid.permute([0, 2, 4, 3, 5, 1]),  // [B, gh, gw, p, p, C]
    };
    patches.reshape([b, gh * gw, p * p * c])
}

/// Patch tokens `[B, gh·gw, p²·C]` (values in `order`) → images `[B, C, H, W]`: the inverse of
/// [`patchify`].
pub fn unpatchify(
    tokens: Tensor<3>,
    channels: usize,
    [height, width]: [usize; 2],
    patch: usize,
    order: PatchOrder,
) -> Tensor<4> {
    let op = Patches { channels, height, width, patch, order, direction: PatchDirection::ToImage };
    if runs_fused(&tokens) {
        return Tensor::from_dispatch(<Dispatch as DitKernels>::patches(tokens.into_dispatch(), op));
    }
    unpatchify_composed(tokens, channels, [height, width], patch, order)
}

/// [`unpatchify`] from burn's own operations.
pub fn unpatchify_composed(
    tokens: Tensor<3>,
    channels: usize,
    [height, width]: [usize; 2],
    patch: usize,
    order: PatchOrder,
) -> Tensor<4> {
    let b = tokens.dims()[0];
    let (gh, gw, p, c) = (height / patch, width / patch, patch, channels);
    let grid = match order {
        PatchOrder::ChannelsFirst => tokens.reshape([b, gh, gw, c, p, p]).permute([0, 3, 1, 4, 2, 5]),
        PatchOrder::ChannelsLast => tokens.reshape([b, gh, gw, p, p, c]).permute([0, 5, 1, 3, 2, 4]),
    }; // [B, C, gh, p, gw, p]
    grid.reshape([b, c, height, width])
}

/// Multi-head self-attention: `qkv` `[B, S, 3·H·D]` (queries, keys, values side by side, head
/// `h` at columns `h·D..` of each) → `[B, S, H·D]`, with `softmax(scale · Q Kᵀ) V` per head.
pub fn packed_attention(qkv: Tensor<3>, heads: usize, scale: f64) -> Tensor<3> {
    if runs_fused(&qkv) {
        Tensor::from_dispatch(<Dispatch as DitKernels>::packed_attention(qkv.into_dispatch(), heads, scale))
    } else {
        packed_attention_composed(qkv, heads, scale)
    }
}

/// [`packed_attention`] from burn's own operations: the reference, and the path off the CPU.
pub fn packed_attention_composed(qkv: Tensor<3>, heads: usize, scale: f64) -> Tensor<3> {
    let [b, s, w3] = qkv.dims();
    let hd = w3 / 3;
    let mut parts = qkv.chunk(3, 2).into_iter();
    let mut next_heads = || parts.next().expect("three chunks").reshape([b, s, heads, hd / heads]).swap_dims(1, 2); // [B,H,S,D]
    let (q, k, v) = (next_heads(), next_heads(), next_heads());
    let probs = cast_like(softmax(in_f32(q.matmul(k.swap_dims(2, 3)) * scale), 3), &v); // [B,H,S,S]
    probs.matmul(v).swap_dims(1, 2).reshape([b, s, hd])
}

/// Attention with the key, value and output projections folded into the weights (see
/// `model::mnist_dits::folded`): `qv` `[B, S, 2·H·W]` (folded queries, then folded
/// values, head `h` at `h·W..` of each), `keys` `[B, S, W]` → `Σₕ softmax(scale · Q'ₕ Kᵀ) V'ₕ`,
/// `[B, S, W]`.
pub fn folded_attention(qv: Tensor<3>, keys: Tensor<3>, heads: usize, scale: f64) -> Tensor<3> {
    if runs_fused(&qv) {
        Tensor::from_dispatch(<Dispatch as DitKernels>::folded_attention(
            qv.into_dispatch(),
            keys.into_dispatch(),
            heads,
            scale,
        ))
    } else {
        folded_attention_composed(qv, keys, heads, scale)
    }
}

/// A whole mnist-dits block fused for sampling ([`PackedBlock::forward`]): `x` `[B, S, W]` and
/// the per-image modulation `[B, 6·W]`, where that kernel runs: plain (not autodiff) CPU tensors
/// in f32 with the fused kernels on. `None` elsewhere, and the caller runs the block's kernels
/// one by one.
pub fn packed_block(x: &Tensor<3>, modulation: &Tensor<2>, block: &PackedBlock) -> Option<Tensor<3>> {
    if !runs_fused(x) || !flex_f32(modulation) {
        return None;
    }
    let x = x.clone().try_into_primitive::<Flex>().ok()?;
    let modulation = modulation.clone().try_into_primitive::<Flex>().ok()?;
    Some(Tensor::from_primitive::<Flex>(packed_block_forward(&x, &modulation, block)))
}

/// [`folded_attention`] of `qv = h·weight + bias` (no activation) and the keys `h` `[B, S, W]`,
/// `weight` `[W, 2·H·W]`: on the CPU in one pass over the images, in sampling and training.
pub fn projected_folded_attention(
    h: Tensor<3>,
    weight: Tensor<2>,
    bias: Tensor<1>,
    heads: usize,
    scale: f64,
) -> Tensor<3> {
    if runs_fused(&h) {
        Tensor::from_dispatch(<Dispatch as DitKernels>::projected_folded_attention(
            h.into_dispatch(),
            weight.into_dispatch(),
            bias.into_dispatch(),
            heads,
            scale,
        ))
    } else {
        let qv = fused_linear_composed(h.clone(), weight, bias, Activation::Identity);
        folded_attention_composed(qv, h, heads, scale)
    }
}

/// [`folded_attention`] from burn's own operations.
pub fn folded_attention_composed(qv: Tensor<3>, keys: Tensor<3>, heads: usize, scale: f64) -> Tensor<3> {
    let [b, s, w] = keys.dims();
    let mut parts = qv.chunk(2, 2).into_iter();
    let mut next_heads = || parts.next().expect("two chunks").reshape([b, s, heads, w]).swap_dims(1, 2); // [B,H,S,W]
    let (q, v) = (next_heads(), next_heads());
    let k = keys.unsqueeze_dim::<4>(1).repeat_dim(1, heads); // [B,H,S,W]
    let probs = cast_like(softmax(in_f32(q.matmul(k.swap_dims(2, 3)) * scale), 3), &v); // [B,H,S,S]
    probs.matmul(v).sum_dim(1).reshape([b, s, w])
}

/// adaLN: `LayerNorm(x; weight, bias, ε)·(1 + scale) + shift` for `x` `[B, S, W]`, with
/// `weight`, `bias` `[W]` and the per-image `shift`, `scale` `[B, W]`.
pub fn modulated_layer_norm(
    x: Tensor<3>,
    weight: Tensor<1>,
    bias: Tensor<1>,
    shift: Tensor<2>,
    scale: Tensor<2>,
    epsilon: f64,
) -> Tensor<3> {
    if runs_fused(&x) {
        Tensor::from_dispatch(<Dispatch as DitKernels>::modulated_layer_norm(
            x.into_dispatch(),
            weight.into_dispatch(),
            bias.into_dispatch(),
            shift.into_dispatch(),
            scale.into_dispatch(),
            epsilon,
        ))
    } else {
        modulated_layer_norm_composed(x, weight, bias, shift, scale, epsilon)
    }
}

/// [`modulated_layer_norm`] from burn's own operations.
pub fn modulated_layer_norm_composed(
    x: Tensor<3>,
    weight: Tensor<1>,
    bias: Tensor<1>,
    shift: Tensor<2>,
    scale: Tensor<2>,
    epsilon: f64,
) -> Tensor<3> {
    let normed = cast_like(layer_norm(in_f32(x.clone()), in_f32(weight), Some(in_f32(bias)), epsilon), &x);
    normed * (scale.unsqueeze_dim::<3>(1) + 1.0) + shift.unsqueeze_dim::<3>(1)
}

/// `x + gate·y` for `x`, `y` `[B, S, W]` and a per-image `gate` `[B, W]`.
pub fn gated_residual(x: Tensor<3>, gate: Tensor<2>, y: Tensor<3>) -> Tensor<3> {
    if runs_fused(&x) {
        Tensor::from_dispatch(<Dispatch as DitKernels>::gated_residual(
            x.into_dispatch(),
            gate.into_dispatch(),
            y.into_dispatch(),
        ))
    } else {
        gated_residual_composed(x, gate, y)
    }
}

/// [`gated_residual`] from burn's own operations.
pub fn gated_residual_composed(x: Tensor<3>, gate: Tensor<2>, y: Tensor<3>) -> Tensor<3> {
    x + gate.unsqueeze_dim::<3>(1) * y
}

/// `act(x·W + b)` for a burn `Linear` (its bias, or none), over the last axis of `x`.
pub fn linear_act<const D: usize>(layer: &burn::nn::Linear, x: Tensor<D>, activation: Activation) -> Tensor<D> {
    fused_linear(x, layer.weight.val(), linear_bias(layer), activation)
}

/// A layer's bias, or zeros of its output width for a layer without one.
pub fn linear_bias(layer: &burn::nn::Linear) -> Tensor<1> {
    let weight = layer.weight.val();
    layer
        .bias
        .as_ref()
        .map(|b| b.val())
        .unwrap_or_else(|| cast_like(Tensor::zeros([weight.dims()[1]], &weight.device()), &weight))
}

/// `act(x·W₁ + b₁)·W₂ + b₂`, a feed-forward network with ReLU or the identity inside: on the
/// CPU one kernel that keeps the hidden layer's rows in cache between the two products, forward
/// and backward (see [`super::feed_forward`]); elsewhere, and for GELU, the two Linear layers.
pub fn feed_forward(
    x: Tensor<3>,
    (w1, b1): (Tensor<2>, Tensor<1>),
    (w2, b2): (Tensor<2>, Tensor<1>),
    activation: Activation,
) -> Tensor<3> {
    if !runs_fused(&x) {
        return feed_forward_composed(x, (w1, b1), (w2, b2), activation);
    }
    Tensor::from_dispatch(<Dispatch as DitKernels>::feed_forward(
        x.into_dispatch(),
        w1.into_dispatch(),
        b1.into_dispatch(),
        w2.into_dispatch(),
        b2.into_dispatch(),
        activation,
    ))
}

/// [`feed_forward`] from burn's own operations.
pub fn feed_forward_composed(
    x: Tensor<3>,
    (w1, b1): (Tensor<2>, Tensor<1>),
    (w2, b2): (Tensor<2>, Tensor<1>),
    activation: Activation,
) -> Tensor<3> {
    fused_linear_composed(fused_linear_composed(x, w1, b1, activation), w2, b2, Activation::Identity)
}

/// A block's attention projections, as [`fold_attention`] reads them: `wq`, `wk`, `wv`
/// `[W, H·D]`, their biases `bq`, `bv` `[H·D]` (`bk` drops out of the fold), the output
/// projection `lv` `[H·D, W]` and its bias `b_out` `[W]` (zeros to leave it out).
#[derive(Debug, Clone)]
pub struct AttentionProjections {
    pub wq: Tensor<2>,
    pub bq: Tensor<1>,
    pub wk: Tensor<2>,
    pub wv: Tensor<2>,
    pub bv: Tensor<1>,
    pub lv: Tensor<2>,
    pub b_out: Tensor<1>,
}

/// The folded weight `[W, 2·H·W]` and bias `[2·H·W]` of `heads` heads (see
/// [`super::fold`]): one operation on the CPU, forward and backward; burn's operations
/// elsewhere.
pub fn fold_attention(p: AttentionProjections, heads: usize) -> (Tensor<2>, Tensor<1>) {
    if !runs_fused(&p.wq) {
        return fold_attention_composed(p, heads);
    }
    let AttentionProjections { wq, bq, wk, wv, bv, lv, b_out } = p;
    let [w, _] = wq.dims();
    let fold: Tensor<2> = Tensor::from_dispatch(<Dispatch as DitKernels>::fold_attention(
        wq.into_dispatch(),
        bq.into_dispatch(),
        wk.into_dispatch(),
        wv.into_dispatch(),
        bv.into_dispatch(),
        lv.into_dispatch(),
        b_out.into_dispatch(),
        heads,
    ));
    let columns = fold.dims()[1];
    (fold.clone().narrow(0, 0, w), fold.narrow(0, w, 1).reshape([columns]))
}

/// [`fold_attention`] from burn's own operations.
pub fn fold_attention_composed(p: AttentionProjections, heads: usize) -> (Tensor<2>, Tensor<1>) {
    let AttentionProjections { wq, bq, wk, wv, bv, lv, b_out } = p;
    let d = wq.dims()[1] / heads;
    let (bq, bv) = (bq.unsqueeze::<2>(), bv.unsqueeze::<2>());
    let mut weights = Vec::with_capacity(2 * heads);
    let mut biases = Vec::with_capacity(2 * heads);
    for head in 0..heads {
        let wk_t = wk.clone().narrow(1, head * d, d).transpose(); // [D, W]
        weights.push(wq.clone().narrow(1, head * d, d).matmul(wk_t.clone())); // Aₕ = WqₕWkₕᵀ
        biases.push(bq.clone().narrow(1, head * d, d).matmul(wk_t)); // uₕ = bqₕWkₕᵀ
    }
    for head in 0..heads {
        let lv_h = lv.clone().narrow(0, head * d, d); // [D, W]
        weights.push(wv.clone().narrow(1, head * d, d).matmul(lv_h.clone())); // WvₕLvₕ
        let c = bv.clone().narrow(1, head * d, d).matmul(lv_h); // bvₕLvₕ
        biases.push(if head == 0 { c + b_out.clone().unsqueeze::<2>() } else { c });
    }
    let columns = 2 * heads * wq.dims()[0];
    (Tensor::cat(weights, 1), Tensor::cat(biases, 1).reshape([columns]))
}

/// Several Linear layers over the same input as one: their weights side by side, outputs
/// concatenated on the last axis (one GEMM and one pass instead of one per layer).
pub fn linear_cat<const D: usize>(layers: &[&burn::nn::Linear], x: Tensor<D>, activation: Activation) -> Tensor<D> {
    let (weight, bias) = cat_linears(layers);
    fused_linear(x, weight, bias, activation)
}

/// The weights of `layers` side by side, `[in, Σ out]`, and their biases (zeros for a layer
/// without one), `[Σ out]`: the one Linear that [`linear_cat`] runs.
pub fn cat_linears(layers: &[&burn::nn::Linear]) -> (Tensor<2>, Tensor<1>) {
    let weight = Tensor::cat(layers.iter().map(|l| l.weight.val()).collect(), 1);
    let device = weight.device();
    let bias = Tensor::cat(
        layers
            .iter()
            .map(|l| {
                let zeros = || cast_like(Tensor::zeros([l.weight.dims()[1]], &device), &weight);
                l.bias.as_ref().map(|b| b.val()).unwrap_or_else(zeros)
            })
            .collect(),
        0,
    );
    (weight, bias)
}

/// `act(x·W + b)`: `x` `[.., in]`, `weight` `[in, out]`, `bias` `[out]`.
pub fn fused_linear<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<2>,
    bias: Tensor<1>,
    activation: Activation,
) -> Tensor<D> {
    if runs_fused(&x) {
        Tensor::from_dispatch(<Dispatch as DitKernels>::fused_linear(
            x.into_dispatch(),
            weight.into_dispatch(),
            bias.into_dispatch(),
            activation,
        ))
    } else {
        fused_linear_composed(x, weight, bias, activation)
    }
}

/// [`fused_linear`] from burn's own operations.
pub fn fused_linear_composed<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<2>,
    bias: Tensor<1>,
    activation: Activation,
) -> Tensor<D> {
    let z = burn::tensor::module::linear(x, weight, Some(bias));
    match activation {
        Activation::Identity => z,
        Activation::Relu => burn::tensor::activation::relu(z),
        Activation::GeluTanh => burn::tensor::activation::gelu_approximate(z),
    }
}
