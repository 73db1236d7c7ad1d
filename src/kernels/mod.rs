//! Fused CPU kernels for the DiT hot spots, as a burn backend extension.
//!
//! Each kernel is an operation of the [`DitKernels`] extension trait, implemented for burn's
//! CPU backend `Flex` (plain Rust over the tensors' buffers) and for `Autodiff<Flex>` (the same
//! forward plus a handwritten backward). The `Tensor`-level functions below pick the kernel on
//! the CPU and the composed burn operations on any other device (CUDA, wgpu), so GPU builds
//! keep working unchanged; the composed versions are also what the kernels are tested against.

/// Defines `$name` that runs `$body` (an `#[inline(always)]` function) compiled for the best
/// vector extension the CPU has.
macro_rules! multiversion {
    ($name:ident($($arg:ident: $ty:ty),*) => $body:ident) => {
        #[allow(clippy::too_many_arguments)]
        pub fn $name($($arg: $ty),*) {
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
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports the features the function was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

pub mod attention;
pub mod buffer;
pub mod gemm;
pub mod linear;
pub mod norm;
pub mod residual;
pub mod simd;
pub mod tile;
pub mod transpose;

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::{FlexTensor, Layout};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::module::layer_norm;
use burn::tensor::{Bytes, DType};

use crate::profile::{self, Region};
use attention::AttnDims;
pub use linear::Activation;
use linear::LinearDims;
use norm::{NormDims, NormParams};

#[backend_extension(Flex, Autodiff)]
pub trait DitKernels: Backend {
    /// Multi-head self-attention from a packed `qkv` `[B, S, 3·H·D]` to `[B, S, H·D]`
    /// (see [`attention`]).
    fn packed_attention(qkv: FloatTensor<Self>, heads: usize, scale: f64) -> FloatTensor<Self>;

    /// Attention with folded projections, `qv` `[B, S, 2·H·W]` and `keys` `[B, S, W]` to
    /// `[B, S, W]` (see [`attention::folded_forward`]).
    fn folded_attention(qv: FloatTensor<Self>, keys: FloatTensor<Self>, heads: usize, scale: f64) -> FloatTensor<Self>;

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

    /// Ulysses' all-to-all between token shards and head groups, see
    /// [`crate::distributed::ulysses`]; the backward pass is the opposite exchange.
    fn exchange(x: FloatTensor<Self>, plan: Exchange) -> FloatTensor<Self>;
}

/// Which way an [`Exchange`] moves data.
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
    pub comm: std::sync::Arc<dyn crate::distributed::Collective>,
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
        let (data, shape) = crate::distributed::ulysses::run_exchange(self, x.storage::<f32>(), shape);
        flex_tensor(data, shape.to_vec())
    }
}

/// Sequence parallelism's exchange on the CPU backend (the only one it supports).
pub fn exchange(x: Tensor<3>, plan: Exchange) -> Tensor<3> {
    assert!(on_flex(&x.device()) && x.dtype() == DType::F32, "sequence parallelism runs on the CPU backend, in f32");
    Tensor::from_dispatch(<Dispatch as DitKernels>::exchange(x.into_dispatch(), plan))
}

/// True when `device` runs on the CPU backend these kernels are written for.
fn on_flex(device: &Device) -> bool {
    device.clone().inner() == Device::flex()
}

/// Multi-head self-attention: `qkv` `[B, S, 3·H·D]` (queries, keys, values side by side, head
/// `h` at columns `h·D..` of each) → `[B, S, H·D]`, with `softmax(scale · Q Kᵀ) V` per head.
pub fn packed_attention(qkv: Tensor<3>, heads: usize, scale: f64) -> Tensor<3> {
    if on_flex(&qkv.device()) && qkv.dtype() == DType::F32 {
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
    let mut split = || parts.next().expect("three chunks").reshape([b, s, heads, hd / heads]).swap_dims(1, 2); // [B,H,S,D]
    let (q, k, v) = (split(), split(), split());
    let probs = softmax(q.matmul(k.swap_dims(2, 3)) * scale, 3); // [B,H,S,S]
    probs.matmul(v).swap_dims(1, 2).reshape([b, s, hd])
}

/// Attention with the key, value and output projections folded into the weights (see
/// `model::mnist_dits::folded`): `qv` `[B, S, 2·H·W]` (folded queries, then folded
/// values, head `h` at `h·W..` of each), `keys` `[B, S, W]` → `Σₕ softmax(scale · Q'ₕ Kᵀ) V'ₕ`,
/// `[B, S, W]`.
pub fn folded_attention(qv: Tensor<3>, keys: Tensor<3>, heads: usize, scale: f64) -> Tensor<3> {
    if on_flex(&qv.device()) && qv.dtype() == DType::F32 {
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

/// [`folded_attention`] from burn's own operations.
pub fn folded_attention_composed(qv: Tensor<3>, keys: Tensor<3>, heads: usize, scale: f64) -> Tensor<3> {
    let [b, s, w] = keys.dims();
    let mut parts = qv.chunk(2, 2).into_iter();
    let mut split = || parts.next().expect("two chunks").reshape([b, s, heads, w]).swap_dims(1, 2); // [B,H,S,W]
    let (q, v) = (split(), split());
    let k = keys.unsqueeze_dim::<4>(1).repeat_dim(1, heads); // [B,H,S,W]
    let probs = softmax(q.matmul(k.swap_dims(2, 3)) * scale, 3); // [B,H,S,S]
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
    if on_flex(&x.device()) && x.dtype() == DType::F32 {
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
    layer_norm(x, weight, Some(bias), epsilon) * (scale.unsqueeze_dim::<3>(1) + 1.0) + shift.unsqueeze_dim::<3>(1)
}

/// `x + gate·y` for `x`, `y` `[B, S, W]` and a per-image `gate` `[B, W]`.
pub fn gated_residual(x: Tensor<3>, gate: Tensor<2>, y: Tensor<3>) -> Tensor<3> {
    if on_flex(&x.device()) && x.dtype() == DType::F32 {
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
    let weight = layer.weight.val();
    let bias =
        layer.bias.as_ref().map(|b| b.val()).unwrap_or_else(|| Tensor::zeros([weight.dims()[1]], &weight.device()));
    fused_linear(x, weight, bias, activation)
}

/// Several Linear layers over the same input as one: their weights side by side, outputs
/// concatenated on the last axis (one GEMM and one pass instead of one per layer).
pub fn linear_cat<const D: usize>(layers: &[&burn::nn::Linear], x: Tensor<D>, activation: Activation) -> Tensor<D> {
    let weight = Tensor::cat(layers.iter().map(|l| l.weight.val()).collect(), 1);
    let device = weight.device();
    let bias = Tensor::cat(
        layers
            .iter()
            .map(|l| l.bias.as_ref().map(|b| b.val()).unwrap_or_else(|| Tensor::zeros([l.weight.dims()[1]], &device)))
            .collect(),
        0,
    );
    fused_linear(x, weight, bias, activation)
}

/// `act(x·W + b)`: `x` `[.., in]`, `weight` `[in, out]`, `bias` `[out]`.
pub fn fused_linear<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<2>,
    bias: Tensor<1>,
    activation: Activation,
) -> Tensor<D> {
    if on_flex(&x.device()) && x.dtype() == DType::F32 {
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

fn norm_dims(shape: &[usize]) -> NormDims {
    let [batch, seq, width] = <[usize; 3]>::try_from(shape).expect("expected [B, S, W]");
    NormDims { batch, seq, width }
}

fn attn_dims(shape: &[usize], heads: usize) -> AttnDims {
    let [batch, seq, w3] = <[usize; 3]>::try_from(shape).expect("packed attention takes [B, S, 3·H·D]");
    assert!(w3 % (3 * heads) == 0, "packed attention: width {w3} is not 3 × a multiple of {heads} heads");
    AttnDims { batch, seq, heads, head_dim: w3 / 3 / heads }
}

/// The f32 elements of a CPU tensor in row-major order (copied only if it was strided).
fn contiguous(t: &FlexTensor) -> FlexTensor {
    t.to_contiguous()
}

fn flex_tensor(data: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::new(Bytes::from_elems(data), Layout::contiguous(Shape::from(shape)), DType::F32)
}

fn attention_forward(qkv: &FlexTensor, heads: usize, scale: f64, keep_probs: bool) -> (FlexTensor, Option<FlexTensor>) {
    let d = attn_dims(qkv.layout().shape(), heads);
    let x = contiguous(qkv);
    let (out, probs) = profile::time(Region::AttentionForward, || {
        attention::forward(x.storage::<f32>(), d, scale as f32, keep_probs, attention::Engine::best())
    });
    let out = flex_tensor(out, vec![d.batch, d.seq, d.inner()]);
    (out, probs.map(|p| flex_tensor(p, vec![d.batch, d.heads, d.seq, d.seq])))
}

fn folded_dims(qv: &FlexTensor, keys: &FlexTensor, heads: usize) -> attention::FoldedDims {
    let [batch, seq, width] = <[usize; 3]>::try_from(keys.layout().shape().as_ref()).expect("keys are [B, S, W]");
    let d = attention::FoldedDims { batch, seq, heads, width };
    assert_eq!(qv.layout().shape().as_ref(), [batch, seq, d.row()], "folded attention: qv must be [B, S, 2·H·W]");
    d
}

/// Folded attention on contiguous inputs: the output and, when `keep_probs`, the probabilities.
fn folded_attention_forward(
    qv: &FlexTensor,
    keys: &FlexTensor,
    heads: usize,
    scale: f64,
    keep_probs: bool,
) -> (FlexTensor, Option<FlexTensor>) {
    let d = folded_dims(qv, keys, heads);
    let (out, probs) = profile::time(Region::AttentionForward, || {
        attention::folded_forward(
            qv.storage::<f32>(),
            keys.storage::<f32>(),
            d,
            scale as f32,
            keep_probs,
            attention::Engine::best(),
        )
    });
    let out = flex_tensor(out, vec![d.batch, d.seq, d.width]);
    (out, probs.map(|p| flex_tensor(p, vec![d.batch, d.seq, d.heads * d.seq])))
}

/// The inputs of a modulated LayerNorm, contiguous.
#[derive(Debug, Clone)]
struct NormInputs {
    x: FlexTensor,
    weight: FlexTensor,
    bias: FlexTensor,
    shift: FlexTensor,
    scale: FlexTensor,
    epsilon: f64,
}

impl NormInputs {
    fn new(
        x: &FlexTensor,
        weight: &FlexTensor,
        bias: &FlexTensor,
        shift: &FlexTensor,
        scale: &FlexTensor,
        epsilon: f64,
    ) -> Self {
        let [x, weight, bias, shift, scale] = [x, weight, bias, shift, scale].map(contiguous);
        Self { x, weight, bias, shift, scale, epsilon }
    }

    fn params(&self) -> NormParams<'_> {
        NormParams {
            weight: self.weight.storage(),
            bias: self.bias.storage(),
            shift: self.shift.storage(),
            scale: self.scale.storage(),
            epsilon: self.epsilon as f32,
        }
    }

    fn dims(&self) -> NormDims {
        norm_dims(self.x.layout().shape())
    }

    /// The output and the per-token statistics.
    fn forward(&self) -> (FlexTensor, FlexTensor) {
        let d = self.dims();
        let (h, stats) = profile::time(Region::NormForward, || norm::forward(self.x.storage(), self.params(), d));
        (flex_tensor(h, vec![d.batch, d.seq, d.width]), flex_tensor(stats, vec![d.batch, d.seq, 2]))
    }
}

fn residual_forward(x: &FlexTensor, gate: &FlexTensor, y: &FlexTensor) -> FlexTensor {
    let (x, gate, y) = (contiguous(x), contiguous(gate), contiguous(y));
    let d = norm_dims(x.layout().shape());
    let out = profile::time(Region::ResidualForward, || residual::forward(x.storage(), gate.storage(), y.storage(), d));
    flex_tensor(out, vec![d.batch, d.seq, d.width])
}

/// The operands of a fused Linear, contiguous, with the sizes.
#[derive(Debug, Clone)]
struct LinearInputs {
    x: FlexTensor,
    weight: FlexTensor,
    bias: FlexTensor,
    activation: Activation,
    dims: LinearDims,
    out_shape: Vec<usize>,
}

impl LinearInputs {
    fn new(x: &FlexTensor, weight: &FlexTensor, bias: &FlexTensor, activation: Activation) -> Self {
        let shape = x.layout().shape().to_vec();
        let [input, output] =
            <[usize; 2]>::try_from(weight.layout().shape().to_vec()).expect("linear weight is [in, out]");
        assert_eq!(
            shape.last(),
            Some(&input),
            "linear: input width {shape:?} does not match the weight [{input}, {output}]"
        );
        let rows = shape[..shape.len() - 1].iter().product();
        let mut out_shape = shape;
        *out_shape.last_mut().expect("rank ≥ 1") = output;
        Self {
            x: contiguous(x),
            weight: contiguous(weight),
            bias: contiguous(bias),
            activation,
            dims: LinearDims { rows, input, output },
            out_shape,
        }
    }

    /// The output and, when `keep` and the activation's backward needs it, the pre-activation.
    fn forward(&self, keep: bool) -> (FlexTensor, Option<FlexTensor>) {
        let (y, z) = profile::time(Region::LinearForward, || {
            linear::forward(
                self.x.storage(),
                self.weight.storage(),
                self.bias.storage(),
                self.dims,
                self.activation,
                keep,
            )
        });
        (flex_tensor(y, self.out_shape.clone()), z.map(|z| flex_tensor(z, self.out_shape.clone())))
    }
}

/// Registers each computed gradient (values and shape) with its parent, for the parents that
/// track one.
fn register_grads<P>(
    parents: impl IntoIterator<Item = Option<P>>,
    id: impl Fn(&P) -> NodeId,
    grads: &mut Gradients,
    results: impl IntoIterator<Item = (Vec<f32>, Vec<usize>)>,
) {
    for (parent, (grad, shape)) in parents.into_iter().zip(results) {
        if let Some(parent) = parent {
            grads.register::<Flex>(id(&parent), flex_tensor(grad, shape));
        }
    }
}

impl DitKernels for Flex {
    fn packed_attention(qkv: FloatTensor<Self>, heads: usize, scale: f64) -> FloatTensor<Self> {
        attention_forward(&qkv, heads, scale, false).0
    }

    fn folded_attention(qv: FloatTensor<Self>, keys: FloatTensor<Self>, heads: usize, scale: f64) -> FloatTensor<Self> {
        folded_attention_forward(&contiguous(&qv), &contiguous(&keys), heads, scale, false).0
    }

    fn modulated_layer_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        NormInputs::new(&x, &weight, &bias, &shift, &scale, epsilon).forward().0
    }

    fn gated_residual(x: FloatTensor<Self>, gate: FloatTensor<Self>, y: FloatTensor<Self>) -> FloatTensor<Self> {
        residual_forward(&x, &gate, &y)
    }

    fn fused_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        activation: Activation,
    ) -> FloatTensor<Self> {
        LinearInputs::new(&x, &weight, &bias, activation).forward(false).0
    }

    fn exchange(x: FloatTensor<Self>, plan: Exchange) -> FloatTensor<Self> {
        plan.apply(&x)
    }
}

impl<C: CheckpointStrategy> DitKernels for Autodiff<Flex, C> {
    fn exchange(x: FloatTensor<Self>, plan: Exchange) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct ExchangeOp;

        impl Backward<Flex, 1> for ExchangeOp {
            type State = Exchange;

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
                let [parent] = ops.parents;
                let grad_out = grads.consume::<Flex>(&ops.node);
                // Every rank runs the backward of every exchange, in the same order: the
                // autodiff graph is the same on all ranks.
                let grad = ops.state.reversed().apply(&grad_out);
                if let Some(parent) = parent {
                    grads.register::<Flex>(parent.id, grad);
                }
            }
        }

        let (x, node) = x.into_parts();
        let out = plan.apply(&x);
        match ExchangeOp.prepare::<C>([node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(plan, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn folded_attention(qv: FloatTensor<Self>, keys: FloatTensor<Self>, heads: usize, scale: f64) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct FoldedAttention;

        impl Backward<Flex, 2> for FoldedAttention {
            /// The inputs, the probabilities, the head count and the scale.
            type State = (FlexTensor, FlexTensor, FlexTensor, usize, f64);

            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
                let grad_out = grads.consume::<Flex>(&ops.node);
                let (qv, keys, probs, heads, scale) = ops.state;
                let d = folded_dims(&qv, &keys, heads);
                let grad_out = contiguous(&grad_out);
                let (grad_qv, grad_keys) = profile::time(Region::AttentionBackward, || {
                    attention::folded_backward(
                        qv.storage::<f32>(),
                        keys.storage::<f32>(),
                        probs.storage::<f32>(),
                        grad_out.storage::<f32>(),
                        d,
                        scale as f32,
                        attention::Engine::best(),
                    )
                });
                let shapes = [vec![d.batch, d.seq, d.row()], vec![d.batch, d.seq, d.width]];
                register_grads(ops.parents, |p| p.id, grads, [grad_qv, grad_keys].into_iter().zip(shapes));
            }
        }

        let ((qv, qv_node), (keys, keys_node)) = (qv.into_parts(), keys.into_parts());
        let (qv, keys) = (contiguous(&qv), contiguous(&keys));
        match FoldedAttention.prepare::<C>([qv_node, keys_node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (out, probs) = folded_attention_forward(&qv, &keys, heads, scale, true);
                prep.finish((qv, keys, probs.expect("kept"), heads, scale), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(folded_attention_forward(&qv, &keys, heads, scale, false).0),
        }
    }

    fn packed_attention(qkv: FloatTensor<Self>, heads: usize, scale: f64) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct PackedAttention;

        impl Backward<Flex, 1> for PackedAttention {
            /// The input, the probabilities, the head count and the scale.
            type State = (FlexTensor, FlexTensor, usize, f64);

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
                let [parent] = ops.parents;
                let grad_out = grads.consume::<Flex>(&ops.node);
                let (qkv, probs, heads, scale) = ops.state;
                if let Some(parent) = parent {
                    let d = attn_dims(qkv.layout().shape(), heads);
                    let grad_out = contiguous(&grad_out);
                    let grad = profile::time(Region::AttentionBackward, || {
                        attention::backward(
                            qkv.storage::<f32>(),
                            probs.storage::<f32>(),
                            grad_out.storage::<f32>(),
                            d,
                            scale as f32,
                            attention::Engine::best(),
                        )
                    });
                    grads.register::<Flex>(parent.id, flex_tensor(grad, vec![d.batch, d.seq, d.row()]));
                }
            }
        }

        let (x, node) = qkv.into_parts();
        match PackedAttention.prepare::<C>([node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let x = contiguous(&x);
                let (out, probs) = attention_forward(&x, heads, scale, true);
                prep.finish((x, probs.expect("kept"), heads, scale), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(attention_forward(&x, heads, scale, false).0),
        }
    }

    fn modulated_layer_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct ModulatedLayerNorm;

        impl Backward<Flex, 5> for ModulatedLayerNorm {
            /// The inputs and the per-token statistics of the forward pass.
            type State = (NormInputs, FlexTensor);

            fn backward(self, ops: Ops<Self::State, 5>, grads: &mut Gradients, _: &mut Checkpointer) {
                let grad_out = contiguous(&grads.consume::<Flex>(&ops.node));
                let (inputs, stats) = ops.state;
                let d = inputs.dims();
                let g = profile::time(Region::NormBackward, || {
                    norm::backward(inputs.x.storage(), grad_out.storage(), stats.storage(), inputs.params(), d)
                });
                let (bw, w) = (vec![d.batch, d.width], vec![d.width]);
                let results = [
                    (g.x, vec![d.batch, d.seq, d.width]),
                    (g.weight, w.clone()),
                    (g.bias, w),
                    (g.shift, bw.clone()),
                    (g.scale, bw),
                ];
                register_grads(ops.parents, |p| p.id, grads, results);
            }
        }

        let (x, nx) = x.into_parts();
        let (weight, nw) = weight.into_parts();
        let (bias, nb) = bias.into_parts();
        let (shift, nshift) = shift.into_parts();
        let (scale, nscale) = scale.into_parts();
        let inputs = NormInputs::new(&x, &weight, &bias, &shift, &scale, epsilon);
        match ModulatedLayerNorm.prepare::<C>([nx, nw, nb, nshift, nscale]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (h, stats) = inputs.forward();
                prep.finish((inputs, stats), h)
            }
            OpsKind::UnTracked(prep) => prep.finish(inputs.forward().0),
        }
    }

    fn gated_residual(x: FloatTensor<Self>, gate: FloatTensor<Self>, y: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct GatedResidual;

        impl Backward<Flex, 3> for GatedResidual {
            /// The gate and the gated branch.
            type State = (FlexTensor, FlexTensor);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
                let grad_out = contiguous(&grads.consume::<Flex>(&ops.node));
                let (gate, y) = ops.state;
                let d = norm_dims(grad_out.layout().shape());
                let [px, pgate, py] = ops.parents;
                if pgate.is_some() || py.is_some() {
                    let (dy, dgate) = profile::time(Region::ResidualBackward, || {
                        residual::backward(grad_out.storage(), gate.storage(), y.storage(), d)
                    });
                    if let Some(p) = pgate {
                        grads.register::<Flex>(p.id, flex_tensor(dgate, vec![d.batch, d.width]));
                    }
                    if let Some(p) = py {
                        grads.register::<Flex>(p.id, flex_tensor(dy, vec![d.batch, d.seq, d.width]));
                    }
                }
                if let Some(p) = px {
                    grads.register::<Flex>(p.id, grad_out);
                }
            }
        }

        let (x, nx) = x.into_parts();
        let (gate, ngate) = gate.into_parts();
        let (y, ny) = y.into_parts();
        match GatedResidual.prepare::<C>([nx, ngate, ny]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = residual_forward(&x, &gate, &y);
                prep.finish((contiguous(&gate), contiguous(&y)), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(residual_forward(&x, &gate, &y)),
        }
    }

    fn fused_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        activation: Activation,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct FusedLinear;

        impl Backward<Flex, 3> for FusedLinear {
            /// The operands and what the activation's derivative reads (the output for ReLU,
            /// the pre-activation for GELU).
            type State = (LinearInputs, Option<FlexTensor>);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
                let grad_out = grads.consume::<Flex>(&ops.node);
                // A buffer of our own to turn dy into dz in place (no copy when unshared).
                let mut dz = grad_out.to_contiguous();
                drop(grad_out);
                let (inputs, saved) = ops.state;
                let saved = saved.as_ref().map(|t| t.storage::<f32>()).unwrap_or(&[]);
                let d = inputs.dims;
                let g = profile::time(Region::LinearBackward, || {
                    linear::backward(
                        inputs.x.storage(),
                        inputs.weight.storage(),
                        saved,
                        dz.storage_mut(),
                        d,
                        inputs.activation,
                    )
                });
                let in_shape = inputs.x.layout().shape().to_vec();
                let results = [(g.x, in_shape), (g.weight, vec![d.input, d.output]), (g.bias, vec![d.output])];
                register_grads(ops.parents, |p| p.id, grads, results);
            }
        }

        let (x, nx) = x.into_parts();
        let (weight, nw) = weight.into_parts();
        let (bias, nb) = bias.into_parts();
        let inputs = LinearInputs::new(&x, &weight, &bias, activation);
        match FusedLinear.prepare::<C>([nx, nw, nb]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (y, z) = inputs.forward(true);
                let saved = match activation {
                    Activation::Identity => None,
                    Activation::Relu => Some(y.clone()),
                    Activation::GeluTanh => z,
                };
                prep.finish((inputs, saved), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(inputs.forward(false).0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// Seeded random inputs: each draw seeds burn's generator under the process-wide lock
    /// (see [`crate::rng::with_device_seed`]), so the tests are reproducible and never shift
    /// the draws of a model initialisation running in a parallel test.
    struct Draws {
        device: Device,
        next_seed: std::cell::Cell<u64>,
    }

    impl Draws {
        fn new(device: &Device, seed: u64) -> Self {
            Self { device: device.clone(), next_seed: std::cell::Cell::new(seed << 32) }
        }

        fn normal(&self, shape: [usize; 3], mean: f64, std: f64) -> Tensor<3> {
            let seed = self.next_seed.replace(self.next_seed.get() + 1);
            crate::rng::with_device_seed(&self.device, seed, || {
                Tensor::<3>::random(shape, Distribution::Normal(mean, std), &self.device)
            })
        }
    }

    fn max_rel_diff(a: Tensor<3>, b: Tensor<3>) -> f32 {
        let scale = b.clone().abs().max().into_scalar::<f32>().max(1e-6);
        (a - b).abs().max().into_scalar::<f32>() / scale
    }

    /// Values and gradients of the kernel equal the composed operations (1e-5 relative).
    fn check_attention(batch: usize, seq: usize, heads: usize, head_dim: usize) {
        let draws = Draws::new(&Device::flex().autodiff(), (batch * 1000 + seq) as u64);
        let x = draws.normal([batch, seq, 3 * heads * head_dim], 0.0, 1.0);
        let upstream = draws.normal([batch, seq, heads * head_dim], 0.0, 1.0);
        let scale = 1.0 / (head_dim as f64).sqrt();

        let grad_of = |f: &dyn Fn(Tensor<3>) -> Tensor<3>| {
            let x = x.clone().require_grad();
            let y = f(x.clone());
            let grads = (y.clone() * upstream.clone()).sum().backward();
            (y.detach(), x.grad(&grads).expect("gradient"))
        };
        let (y_kernel, g_kernel) = grad_of(&|x| packed_attention(x, heads, scale));
        let (y_ref, g_ref) = grad_of(&|x| packed_attention_composed(x, heads, scale));
        let y_kernel = y_kernel.inner();
        let (dy, dg) = (max_rel_diff(y_kernel.clone(), y_ref.inner()), max_rel_diff(g_kernel, g_ref));
        assert!(dy < 1e-5, "forward differs by {dy}");
        assert!(dg < 1e-5, "gradient differs by {dg}");

        // The no-grad path (sampling) gives the same values.
        let y_plain = packed_attention(x.clone().inner(), heads, scale);
        assert!(max_rel_diff(y_plain, y_kernel) < 1e-6);
    }

    /// Values and every input's gradient of `kernel` equal those of `composed` (1e-5 relative).
    fn check_against_composed<const N: usize>(
        inputs: [Tensor<3>; N],
        kernel: impl Fn([Tensor<3>; N]) -> Tensor<3>,
        composed: impl Fn([Tensor<3>; N]) -> Tensor<3>,
    ) {
        let dims = composed(inputs.clone()).dims();
        let upstream = Draws::new(&inputs[0].device(), 99).normal(dims, 0.0, 1.0);
        let run = |f: &dyn Fn([Tensor<3>; N]) -> Tensor<3>| {
            let xs = inputs.clone().map(|x| x.require_grad());
            let y = f(xs.clone());
            let grads = (y.clone() * upstream.clone()).sum().backward();
            (y.detach().inner(), xs.map(|x| x.grad(&grads).expect("gradient")))
        };
        let (y_k, g_k) = run(&kernel);
        let (y_c, g_c) = run(&composed);
        let dy = max_rel_diff(y_k, y_c);
        assert!(dy < 1e-5, "forward differs by {dy}");
        for (i, (a, b)) in g_k.into_iter().zip(g_c).enumerate() {
            let d = max_rel_diff(a, b);
            assert!(d < 1e-5, "gradient of input {i} differs by {d}");
        }
    }

    /// `[B,1,W]`-shaped stand-ins for `[B,W]` and `[W]` inputs, so that all inputs share one type.
    fn as_2d(t: Tensor<3>) -> Tensor<2> {
        t.squeeze_dim(1)
    }

    #[test]
    fn modulated_layer_norm_matches_composed() {
        let device = Device::flex().autodiff();
        assert!(on_flex(&device));
        let (b, s, w) = (3, 49, 64);
        let draws = Draws::new(&device, 1);
        let r = |shape: [usize; 3], std: f64| draws.normal(shape, 0.5, std);
        let inputs = [r([b, s, w], 2.0), r([1, 1, w], 1.0), r([1, 1, w], 1.0), r([b, 1, w], 1.0), r([b, 1, w], 1.0)];
        let call = |f: fn(Tensor<3>, Tensor<1>, Tensor<1>, Tensor<2>, Tensor<2>, f64) -> Tensor<3>| {
            move |[x, wt, bs, sh, sc]: [Tensor<3>; 5]| {
                f(x, as_2d(wt).squeeze_dim(0), as_2d(bs).squeeze_dim(0), as_2d(sh), as_2d(sc), 1e-5)
            }
        };
        check_against_composed(inputs, call(modulated_layer_norm), call(modulated_layer_norm_composed));
    }

    #[test]
    fn gated_residual_matches_composed() {
        let draws = Draws::new(&Device::flex().autodiff(), 2);
        let (b, s, w) = (3, 49, 64);
        let r = |shape: [usize; 3]| draws.normal(shape, 0.0, 1.0);
        let inputs = [r([b, s, w]), r([b, 1, w]), r([b, s, w])];
        check_against_composed(
            inputs,
            |[x, g, y]| gated_residual(x, as_2d(g), y),
            |[x, g, y]| gated_residual_composed(x, as_2d(g), y),
        );
    }

    fn check_linear(rows: usize, input: usize, output: usize, activation: Activation) {
        let draws = Draws::new(&Device::flex().autodiff(), 3 + rows as u64);
        let r = |shape: [usize; 3]| draws.normal(shape, 0.0, 1.0);
        // Rows not a multiple of the block size, spread over two leading axes.
        let inputs = [r([2, rows, input]), r([1, input, output]), r([1, 1, output])];
        let call = |f: fn(Tensor<3>, Tensor<2>, Tensor<1>, Activation) -> Tensor<3>| {
            move |[x, w, b]: [Tensor<3>; 3]| f(x, w.squeeze_dim(0), as_2d(b).squeeze_dim(0), activation)
        };
        check_against_composed(inputs, call(fused_linear), call(fused_linear_composed));
    }

    #[test]
    fn fused_linear_matches_composed() {
        for activation in [Activation::Identity, Activation::Relu, Activation::GeluTanh] {
            check_linear(300, 64, 96, activation);
            check_linear(5, 3, 7, activation);
        }
    }

    #[test]
    fn attention_matches_composed_mnist_dits_shape() {
        check_attention(3, 49, 4, 64);
    }

    #[test]
    fn attention_matches_composed_odd_shape() {
        check_attention(2, 7, 3, 5);
    }
}
