//! The kernels on burn-flex's tensors: the glue between `FlexTensor`s and the slices the
//! engines work on, and the forward-only [`DitKernels`] implementation for `Flex` (sampling).

use burn::backend::Flex;
use burn::backend::flex::{FlexTensor, Layout};
use burn::backend::tensor::FloatTensor;
use burn::prelude::*;
use burn::tensor::{Bytes, DType};

use super::attention::{self, AttnDims};
use super::inference_block::PackedBlock;
use super::linear::{self, Activation, LinearDims};
use super::norm::{self, NormDims, NormParams};
use super::panels::{self, Panels};
use super::patches::Patches;
use super::projected_attention::{projected_folded_forward, projected_folded_forward_kept};
use super::{Adjoint, DitKernels, Exchange, GroupSum, TokenShards, feed_forward, fold, residual};
use crate::profile::{self, Region};

pub(super) fn norm_dims(shape: &[usize]) -> NormDims {
    let [batch, seq, width] = <[usize; 3]>::try_from(shape).expect("expected [B, S, W]");
    NormDims { batch, seq, width }
}

pub(super) fn attn_dims(shape: &[usize], heads: usize) -> AttnDims {
    let [batch, seq, w3] = <[usize; 3]>::try_from(shape).expect("packed attention takes [B, S, 3·H·D]");
    assert!(w3 % (3 * heads) == 0, "packed attention: width {w3} is not 3 × a multiple of {heads} heads");
    AttnDims { batch, seq, heads, head_dim: w3 / 3 / heads }
}

/// The f32 elements of a CPU tensor in row-major order (copied only if it was strided).
pub(super) fn contiguous(t: &FlexTensor) -> FlexTensor {
    t.to_contiguous()
}

pub(super) fn flex_tensor(data: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::new(Bytes::from_elems(data), Layout::contiguous(Shape::from(shape)), DType::F32)
}

pub(super) fn attention_forward(
    qkv: &FlexTensor,
    heads: usize,
    scale: f64,
    keep_probs: bool,
) -> (FlexTensor, Option<FlexTensor>) {
    let d = attn_dims(qkv.layout().shape(), heads);
    let x = contiguous(qkv);
    let (out, probs) = profile::time(Region::AttentionForward, || {
        attention::forward(x.storage::<f32>(), d, scale as f32, keep_probs, attention::Engine::best())
    });
    let out = flex_tensor(out, vec![d.batch, d.seq, d.inner()]);
    (out, probs.map(|p| flex_tensor(p, vec![d.batch, d.heads, d.seq, d.seq])))
}

pub(super) fn folded_dims(qv: &FlexTensor, keys: &FlexTensor, heads: usize) -> attention::FoldedDims {
    let [batch, seq, width] = <[usize; 3]>::try_from(keys.layout().shape().as_ref()).expect("keys are [B, S, W]");
    let d = attention::FoldedDims { batch, seq, heads, width };
    assert_eq!(qv.layout().shape().as_ref(), [batch, seq, d.row()], "folded attention: qv must be [B, S, 2·H·W]");
    d
}

/// Folded attention on contiguous inputs: the output and, when `keep_probs`, the probabilities.
pub(super) fn folded_attention_forward(
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

/// Whether [`projected_attention_forward`] runs for the normalised tokens `h` `[B, S, W]`: with
/// the panel products, each head's block a whole number of panels
/// ([`Panels::product_in_groups`]).
pub(super) fn projected_attention_runs(h: &FlexTensor) -> bool {
    panels::available() && h.layout().shape().last().is_some_and(|w| w.is_multiple_of(panels::width()))
}

/// The sizes of a projected attention over `h` `[B, S, W]` with the folded weight `[W, 2·H·W]`.
fn projected_dims(h: &FlexTensor, weight: &FlexTensor, heads: usize) -> attention::FoldedDims {
    let [batch, seq, width] = <[usize; 3]>::try_from(h.layout().shape().as_ref()).expect("h is [B, S, W]");
    let d = attention::FoldedDims { batch, seq, heads, width };
    assert_eq!(weight.layout().shape().as_ref(), [width, d.row()], "projected attention: weight must be [W, 2·H·W]");
    d
}

/// What a tracked projected attention keeps for its backward pass: `qv` in blocks
/// ([`attention::QvLayout::Groups`]), the probabilities, and the sizes.
pub(super) type ProjectedKept = (Vec<f32>, Vec<f32>, attention::FoldedDims);

/// The folded attention of `h` with its projection inside (contiguous operands; see
/// [`projected_attention_runs`]): `[B, S, W]`, and with `keep` what the backward pass reads.
pub(super) fn projected_attention_forward(
    h: &FlexTensor,
    weight: &FlexTensor,
    bias: &FlexTensor,
    heads: usize,
    scale: f64,
    keep: bool,
) -> (FlexTensor, Option<ProjectedKept>) {
    let d = projected_dims(h, weight, heads);
    let (out, kept) = profile::time(Region::AttentionForward, || {
        let panels = Panels::pack(weight.storage::<f32>(), d.width, d.row(), d.row(), 1);
        let (h, bias, engine) = (h.storage::<f32>(), bias.storage::<f32>(), attention::Engine::best());
        if keep {
            let (out, qv, probs) = projected_folded_forward_kept(h, &panels, bias, d, scale as f32, engine);
            (out, Some((qv, probs, d)))
        } else {
            (projected_folded_forward(h, &panels, bias, d, scale as f32, engine), None)
        }
    });
    (flex_tensor(out, vec![d.batch, d.seq, d.width]), kept)
}

/// The operands of a feed-forward kernel, contiguous: the input, both layers' weights and
/// biases.
#[derive(Debug, Clone)]
pub(super) struct FeedForwardInputs {
    pub(super) x: FlexTensor,
    pub(super) w1: FlexTensor,
    pub(super) b1: FlexTensor,
    pub(super) w2: FlexTensor,
    pub(super) b2: FlexTensor,
    pub(super) activation: Activation,
    pub(super) dims: feed_forward::FeedForwardDims,
}

impl FeedForwardInputs {
    pub(super) fn new(x: &FlexTensor, [w1, b1, w2, b2]: [&FlexTensor; 4], activation: Activation) -> Self {
        let shape = x.layout().shape().to_vec();
        let [width, hidden] = <[usize; 2]>::try_from(w1.layout().shape().to_vec()).expect("W1 is [in, hidden]");
        assert_eq!(
            shape.last(),
            Some(&width),
            "feed-forward: input width {shape:?} does not match W1 [{width}, {hidden}]"
        );
        let rows = shape[..shape.len() - 1].iter().product();
        Self {
            x: contiguous(x),
            w1: contiguous(w1),
            b1: contiguous(b1),
            w2: contiguous(w2),
            b2: contiguous(b2),
            activation,
            dims: feed_forward::FeedForwardDims { rows, width, hidden },
        }
    }

    /// The output (shaped as the input) and the hidden layer's output.
    pub(super) fn forward(&self) -> (FlexTensor, Vec<f32>) {
        let (y, hidden) = profile::time(Region::LinearForward, || {
            feed_forward::forward(
                self.x.storage(),
                (self.w1.storage(), self.b1.storage()),
                (self.w2.storage(), self.b2.storage()),
                self.dims,
                self.activation,
            )
        });
        (flex_tensor(y, self.x.layout().shape().to_vec()), hidden)
    }
}

/// The parameters of an attention fold, contiguous, in [`fold::FoldParams`]' order.
#[derive(Debug, Clone)]
pub(super) struct FoldInputs {
    pub(super) params: [FlexTensor; 7],
    pub(super) dims: fold::FoldDims,
}

impl FoldInputs {
    pub(super) fn new(params: [&FlexTensor; 7], heads: usize) -> Self {
        let [width, inner] = <[usize; 2]>::try_from(params[0].layout().shape().to_vec()).expect("Wq is [W, H·D]");
        assert!(heads > 0 && inner % heads == 0, "fold: {inner} projection columns are not {heads} heads");
        Self { params: params.map(contiguous), dims: fold::FoldDims { width, heads, head_dim: inner / heads } }
    }

    pub(super) fn params(&self) -> fold::FoldParams<'_> {
        let [wq, bq, wk, wv, bv, lv, b_out] = self.params.each_ref().map(|t| t.storage::<f32>());
        fold::FoldParams { wq, bq, wk, wv, bv, lv, b_out }
    }

    /// The fold, `[W + 1, 2·H·W]`.
    pub(super) fn forward(&self) -> FlexTensor {
        let d = self.dims;
        flex_tensor(fold::forward(&self.params(), d), vec![d.width + 1, d.columns()])
    }
}

/// The inputs of a modulated LayerNorm, contiguous.
#[derive(Debug, Clone)]
pub(super) struct NormInputs {
    pub(super) x: FlexTensor,
    pub(super) weight: FlexTensor,
    pub(super) bias: FlexTensor,
    pub(super) shift: FlexTensor,
    pub(super) scale: FlexTensor,
    pub(super) epsilon: f64,
}

impl NormInputs {
    pub(super) fn new(
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

    pub(super) fn params(&self) -> NormParams<'_> {
        NormParams {
            weight: self.weight.storage(),
            bias: self.bias.storage(),
            shift: self.shift.storage(),
            scale: self.scale.storage(),
            epsilon: self.epsilon as f32,
        }
    }

    pub(super) fn dims(&self) -> NormDims {
        norm_dims(self.x.layout().shape())
    }

    /// The output and the per-token statistics.
    pub(super) fn forward(&self) -> (FlexTensor, FlexTensor) {
        let d = self.dims();
        let (h, stats) = profile::time(Region::NormForward, || norm::forward(self.x.storage(), self.params(), d));
        (flex_tensor(h, vec![d.batch, d.seq, d.width]), flex_tensor(stats, vec![d.batch, d.seq, 2]))
    }
}

pub(super) fn residual_forward(x: &FlexTensor, gate: &FlexTensor, y: &FlexTensor) -> FlexTensor {
    let (x, gate, y) = (contiguous(x), contiguous(gate), contiguous(y));
    let d = norm_dims(x.layout().shape());
    let out = profile::time(Region::ResidualForward, || residual::forward(x.storage(), gate.storage(), y.storage(), d));
    flex_tensor(out, vec![d.batch, d.seq, d.width])
}

/// [`PackedBlock::forward`] on CPU tensors: `x` `[B, S, W]`, `modulation` `[B, 6·W]`.
pub(super) fn packed_block_forward(x: &FlexTensor, modulation: &FlexTensor, block: &PackedBlock) -> FlexTensor {
    let (x, modulation) = (contiguous(x), contiguous(modulation));
    let d = norm_dims(x.layout().shape());
    let out = block.forward(x.storage::<f32>(), modulation.storage::<f32>(), d.seq);
    flex_tensor(out, vec![d.batch, d.seq, d.width])
}

/// The operands of a fused Linear, contiguous, with the sizes.
#[derive(Debug, Clone)]
pub(super) struct LinearInputs {
    pub(super) x: FlexTensor,
    pub(super) weight: FlexTensor,
    pub(super) bias: FlexTensor,
    pub(super) activation: Activation,
    pub(super) dims: LinearDims,
    pub(super) out_shape: Vec<usize>,
}

impl LinearInputs {
    pub(super) fn new(x: &FlexTensor, weight: &FlexTensor, bias: &FlexTensor, activation: Activation) -> Self {
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
    pub(super) fn forward(&self, keep: bool) -> (FlexTensor, Option<FlexTensor>) {
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

impl DitKernels for Flex {
    fn packed_attention(qkv: FloatTensor<Self>, heads: usize, scale: f64) -> FloatTensor<Self> {
        attention_forward(&qkv, heads, scale, false).0
    }

    fn folded_attention(qv: FloatTensor<Self>, keys: FloatTensor<Self>, heads: usize, scale: f64) -> FloatTensor<Self> {
        folded_attention_forward(&contiguous(&qv), &contiguous(&keys), heads, scale, false).0
    }

    fn projected_folded_attention(
        h: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        heads: usize,
        scale: f64,
    ) -> FloatTensor<Self> {
        if !projected_attention_runs(&h) {
            let qv = Self::fused_linear(h.clone(), weight, bias, Activation::Identity);
            return Self::folded_attention(qv, h, heads, scale);
        }
        projected_attention_forward(&contiguous(&h), &contiguous(&weight), &contiguous(&bias), heads, scale, false).0
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

    fn feed_forward(
        x: FloatTensor<Self>,
        w1: FloatTensor<Self>,
        b1: FloatTensor<Self>,
        w2: FloatTensor<Self>,
        b2: FloatTensor<Self>,
        activation: Activation,
    ) -> FloatTensor<Self> {
        if !feed_forward::runs(activation) {
            let hidden = Self::fused_linear(x, w1, b1, activation);
            return Self::fused_linear(hidden, w2, b2, Activation::Identity);
        }
        FeedForwardInputs::new(&x, [&w1, &b1, &w2, &b2], activation).forward().0
    }

    fn fold_attention(
        wq: FloatTensor<Self>,
        bq: FloatTensor<Self>,
        wk: FloatTensor<Self>,
        wv: FloatTensor<Self>,
        bv: FloatTensor<Self>,
        lv: FloatTensor<Self>,
        b_out: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self> {
        FoldInputs::new([&wq, &bq, &wk, &wv, &bv, &lv, &b_out], heads).forward()
    }

    fn exchange(x: FloatTensor<Self>, plan: Exchange) -> FloatTensor<Self> {
        plan.forward(&x)
    }

    fn token_shards(x: FloatTensor<Self>, op: TokenShards) -> FloatTensor<Self> {
        op.forward(&x)
    }

    fn patches(x: FloatTensor<Self>, op: Patches) -> FloatTensor<Self> {
        op.forward(&x)
    }

    fn group_sum(x: FloatTensor<Self>, op: GroupSum) -> FloatTensor<Self> {
        op.forward(&x)
    }
}
