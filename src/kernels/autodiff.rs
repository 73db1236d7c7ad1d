//! The kernels under autodiff: each forward as in [`super::flex`], recorded on burn's graph
//! with a handwritten backward.

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, NodeGuard, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Flex};

use super::flex::*;
use super::linear::{self, Activation};
use super::patches::Patches;
use super::projected_attention::projected_folded_backward;
use super::{Adjoint, DitKernels, Exchange, GroupSum, TokenShards, attention, feed_forward, fold, norm, residual};
use crate::profile::{self, Region};

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

/// Runs an operation of the extension under autodiff: unpacks `inputs` into their primitives
/// and graph guards, and records `op` on the graph. `forward(inputs, tracked)` computes the
/// output and, when `tracked` (a backward will run), the state `op`'s backward reads.
fn record<O, C, const N: usize>(
    op: O,
    inputs: [FloatTensor<Autodiff<Flex, C>>; N],
    forward: impl FnOnce([FlexTensor; N], bool) -> (FlexTensor, Option<O::State>),
) -> FloatTensor<Autodiff<Flex, C>>
where
    O: Backward<Flex, N>,
    O::State: Clone + Send + std::fmt::Debug + 'static,
    C: CheckpointStrategy,
{
    let (tensors, guards): (Vec<FlexTensor>, Vec<NodeGuard>) = inputs.into_iter().map(|x| x.into_parts()).unzip();
    let tensors: [FlexTensor; N] = tensors.try_into().unwrap_or_else(|_| unreachable!("N inputs"));
    let guards: [NodeGuard; N] = guards.try_into().unwrap_or_else(|_| unreachable!("N inputs"));
    match op.prepare::<C>(guards).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let (out, state) = forward(tensors, true);
            prep.finish(state.expect("a tracked forward returns its backward's state"), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(tensors, false).0),
    }
}

/// A data movement's backward (a collective's, the patch layout's): its adjoint.
#[derive(Debug)]
struct AdjointOp<A>(std::marker::PhantomData<A>);

impl<A: Adjoint> Backward<Flex, 1> for AdjointOp<A> {
    type State = A;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let grad_out = grads.consume::<Flex>(&ops.node);
        // Every rank runs the backward of every collective, in the same order (their graphs
        // are the same), so the collectives pair up.
        let grad = ops.state.backward(&grad_out);
        if let Some(parent) = parent {
            grads.register::<Flex>(parent.id, grad);
        }
    }
}

/// Records the data movement `op` on `x`.
fn record_adjoint<A: Adjoint, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<Flex, C>>,
    op: A,
) -> FloatTensor<Autodiff<Flex, C>> {
    record::<_, C, _>(AdjointOp::<A>(std::marker::PhantomData), [x], |[x], tracked| {
        (op.forward(&x), tracked.then_some(op))
    })
}

impl<C: CheckpointStrategy> DitKernels for Autodiff<Flex, C> {
    fn exchange(x: FloatTensor<Self>, plan: Exchange) -> FloatTensor<Self> {
        record_adjoint::<_, C>(x, plan)
    }

    fn token_shards(x: FloatTensor<Self>, op: TokenShards) -> FloatTensor<Self> {
        record_adjoint::<_, C>(x, op)
    }

    fn patches(x: FloatTensor<Self>, op: Patches) -> FloatTensor<Self> {
        record_adjoint::<_, C>(x, op)
    }

    fn group_sum(x: FloatTensor<Self>, op: GroupSum) -> FloatTensor<Self> {
        record_adjoint::<_, C>(x, op)
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
                        attention::QvLayout::Rows,
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

        record::<_, C, _>(FoldedAttention, [qv, keys], |[qv, keys], tracked| {
            let (qv, keys) = (contiguous(&qv), contiguous(&keys));
            let (out, probs) = folded_attention_forward(&qv, &keys, heads, scale, tracked);
            (out, probs.map(|probs| (qv, keys, probs, heads, scale)))
        })
    }

    fn projected_folded_attention(
        h: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        heads: usize,
        scale: f64,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct ProjectedAttention;

        impl Backward<Flex, 3> for ProjectedAttention {
            /// `h`, the weight, `qv` in blocks, the probabilities, the sizes and the scale.
            type State = (FlexTensor, FlexTensor, Vec<f32>, Vec<f32>, attention::FoldedDims, f64);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
                let grad_out = contiguous(&grads.consume::<Flex>(&ops.node));
                let (h, weight, qv, probs, d, scale) = ops.state;
                let (grad_h, grad_w, grad_b) = profile::time(Region::AttentionBackward, || {
                    projected_folded_backward(
                        h.storage::<f32>(),
                        weight.storage::<f32>(),
                        &qv,
                        &probs,
                        grad_out.storage::<f32>(),
                        d,
                        scale as f32,
                        attention::Engine::best(),
                    )
                });
                let results = [
                    (grad_h, vec![d.batch, d.seq, d.width]),
                    (grad_w, vec![d.width, d.row()]),
                    (grad_b, vec![d.row()]),
                ];
                register_grads(ops.parents, |p| p.id, grads, results);
            }
        }

        if !projected_attention_runs(h.primitive()) {
            // The two recorded operations, as on the other devices.
            let qv = Self::fused_linear(h.clone(), weight, bias, Activation::Identity);
            return Self::folded_attention(qv, h, heads, scale);
        }
        record::<_, C, _>(ProjectedAttention, [h, weight, bias], |[h, weight, bias], tracked| {
            let (h, weight, bias) = (contiguous(&h), contiguous(&weight), contiguous(&bias));
            let (out, kept) = projected_attention_forward(&h, &weight, &bias, heads, scale, tracked);
            (out, kept.map(|(qv, probs, d)| (h, weight, qv, probs, d, scale)))
        })
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

        record::<_, C, _>(PackedAttention, [qkv], |[x], tracked| {
            let x = if tracked { contiguous(&x) } else { x };
            let (out, probs) = attention_forward(&x, heads, scale, tracked);
            (out, probs.map(|probs| (x, probs, heads, scale)))
        })
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

        record::<_, C, _>(
            ModulatedLayerNorm,
            [x, weight, bias, shift, scale],
            |[x, weight, bias, shift, scale], tracked| {
                let inputs = NormInputs::new(&x, &weight, &bias, &shift, &scale, epsilon);
                let (h, stats) = inputs.forward();
                (h, tracked.then_some((inputs, stats)))
            },
        )
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

        record::<_, C, _>(GatedResidual, [x, gate, y], |[x, gate, y], tracked| {
            let out = residual_forward(&x, &gate, &y);
            (out, tracked.then(|| (contiguous(&gate), contiguous(&y))))
        })
    }

    fn feed_forward(
        x: FloatTensor<Self>,
        w1: FloatTensor<Self>,
        b1: FloatTensor<Self>,
        w2: FloatTensor<Self>,
        b2: FloatTensor<Self>,
        activation: Activation,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct FeedForward;

        impl Backward<Flex, 5> for FeedForward {
            /// The operands and the hidden layer's output.
            type State = (FeedForwardInputs, Vec<f32>);

            fn backward(self, ops: Ops<Self::State, 5>, grads: &mut Gradients, _: &mut Checkpointer) {
                let grad_out = contiguous(&grads.consume::<Flex>(&ops.node));
                let (inputs, hidden) = ops.state;
                let d = inputs.dims;
                let g = profile::time(Region::LinearBackward, || {
                    feed_forward::backward(
                        inputs.x.storage(),
                        inputs.w1.storage(),
                        inputs.w2.storage(),
                        &hidden,
                        grad_out.storage(),
                        d,
                        inputs.activation,
                    )
                });
                let results = [
                    (g.x, inputs.x.layout().shape().to_vec()),
                    (g.w1, vec![d.width, d.hidden]),
                    (g.b1, vec![d.hidden]),
                    (g.w2, vec![d.hidden, d.width]),
                    (g.b2, vec![d.width]),
                ];
                register_grads(ops.parents, |p| p.id, grads, results);
            }
        }

        if !feed_forward::runs(activation) {
            // The two recorded Linear operations.
            let hidden = Self::fused_linear(x, w1, b1, activation);
            return Self::fused_linear(hidden, w2, b2, Activation::Identity);
        }
        record::<_, C, _>(FeedForward, [x, w1, b1, w2, b2], |[x, w1, b1, w2, b2], tracked| {
            let inputs = FeedForwardInputs::new(&x, [&w1, &b1, &w2, &b2], activation);
            let (y, hidden) = inputs.forward();
            (y, tracked.then_some((inputs, hidden)))
        })
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
        #[derive(Debug)]
        struct Fold;

        impl Backward<Flex, 7> for Fold {
            type State = FoldInputs;

            fn backward(self, ops: Ops<Self::State, 7>, grads: &mut Gradients, _: &mut Checkpointer) {
                let grad_out = contiguous(&grads.consume::<Flex>(&ops.node));
                let inputs = ops.state;
                let g = fold::backward(&inputs.params(), grad_out.storage(), inputs.dims);
                let shapes = inputs.params.each_ref().map(|t| t.layout().shape().to_vec());
                let results = [g.wq, g.bq, g.wk, g.wv, g.bv, g.lv, g.b_out].into_iter().zip(shapes);
                register_grads(ops.parents, |p| p.id, grads, results);
            }
        }

        record::<_, C, _>(Fold, [wq, bq, wk, wv, bv, lv, b_out], |params, tracked| {
            let inputs = FoldInputs::new(params.each_ref(), heads);
            let out = inputs.forward();
            (out, tracked.then_some(inputs))
        })
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

        record::<_, C, _>(FusedLinear, [x, weight, bias], |[x, weight, bias], tracked| {
            let inputs = LinearInputs::new(&x, &weight, &bias, activation);
            let (y, z) = inputs.forward(tracked);
            let state = tracked.then(|| {
                let saved = match activation {
                    Activation::Identity => None,
                    Activation::Relu => Some(y.clone()),
                    Activation::GeluTanh => z,
                };
                (inputs, saved)
            });
            (y, state)
        })
    }
}
