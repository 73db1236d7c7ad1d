//! Every kernel against the composed burn operations it replaces: values and every input's
//! gradient.

use burn::prelude::*;
use burn::tensor::Distribution;

use super::Activation;
use super::ops::*;

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

/// The feed-forward kernel (mnist-dits's 64 → 256 → 64, and odd widths the panels take in part)
/// against the two composed Linear layers, values and every gradient, for ReLU and the identity
/// inside; GELU takes the two Linear kernels.
#[test]
fn feed_forward_matches_composed() {
    for (rows, width, hidden) in [(300, 64, 256), (5, 3, 7)] {
        for activation in [Activation::Relu, Activation::Identity, Activation::GeluTanh] {
            let draws = Draws::new(&Device::flex().autodiff(), 7 + rows as u64);
            let r = |shape: [usize; 3]| draws.normal(shape, 0.0, 1.0);
            let inputs = [
                r([2, rows, width]),
                r([1, width, hidden]),
                r([1, 1, hidden]),
                r([1, hidden, width]),
                r([1, 1, width]),
            ];
            type FeedForward = fn(Tensor<3>, (Tensor<2>, Tensor<1>), (Tensor<2>, Tensor<1>), Activation) -> Tensor<3>;
            let call = |f: FeedForward| {
                move |[x, w1, b1, w2, b2]: [Tensor<3>; 5]| {
                    let layer = |w: Tensor<3>, b: Tensor<3>| (w.squeeze_dim(0), as_2d(b).squeeze_dim(0));
                    f(x, layer(w1, b1), layer(w2, b2), activation)
                }
            };
            check_against_composed(inputs, call(feed_forward), call(feed_forward_composed));
        }
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

/// The folded attention with its projection inside equals the projection then the folded
/// attention: bit for bit without gradients (the sampling path, one kernel or the two, in the
/// same order of operations), and the composed operations with them (1e-5 relative), for a
/// width the AVX2 panels take whole (64) and one they do not (20).
#[test]
fn projected_folded_attention_is_the_projection_then_the_attention() {
    for (batch, seq, heads, width) in [(3, 49, 4, 64), (2, 10, 3, 20)] {
        let device = Device::flex();
        let draws = Draws::new(&device, (batch * 100 + width) as u64);
        let h = draws.normal([batch, seq, width], 0.0, 1.0);
        let weight = draws.normal([1, width, 2 * heads * width], 0.0, 0.2).reshape([width, 2 * heads * width]);
        let bias = draws.normal([1, 1, 2 * heads * width], 0.0, 0.2).reshape([2 * heads * width]);
        let projected = projected_folded_attention(h.clone(), weight.clone(), bias.clone(), heads, 0.3);
        let qv = fused_linear(h.clone(), weight.clone(), bias.clone(), Activation::Identity);
        let two_steps = folded_attention(qv, h.clone(), heads, 0.3);
        let (a, b) = (
            projected.clone().into_data().try_to_vec::<f32>().unwrap(),
            two_steps.into_data().try_to_vec::<f32>().unwrap(),
        );
        let differ = a.iter().zip(&b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
        assert_eq!(differ, 0, "{batch}×{seq}×{heads}×{width}: {differ} of {} values differ", a.len());
        let composed = folded_attention_composed(
            fused_linear_composed(h.clone(), weight, bias, Activation::Identity),
            h,
            heads,
            0.3,
        );
        let d = max_rel_diff(projected, composed);
        assert!(d < 1e-5, "{batch}×{seq}×{heads}×{width}: projected vs composed differ by {d}");
    }
}

/// Under autodiff the fused projection and attention (one recorded operation) give the same
/// bits as the two recorded operations: the output and the gradient of `h` (the projection's
/// input and the keys) always; the weight's and bias's too while the batch is one span of the
/// fused backward (they are summed span by span, in image order, where the Linear's backward
/// sums spans of rows: beyond one span they differ by rounding, bounded here).
#[test]
fn projected_folded_attention_gradients_are_the_two_steps() {
    for (batch, seq, heads, width) in [(3, 49, 4, 64), (23, 49, 4, 64), (2, 10, 3, 20)] {
        let device = Device::flex().autodiff();
        let draws = Draws::new(&device, (batch * 200 + width) as u64);
        let h = draws.normal([batch, seq, width], 0.0, 1.0);
        let weight = draws.normal([1, width, 2 * heads * width], 0.0, 0.2).reshape([width, 2 * heads * width]);
        let bias = draws.normal([1, 1, 2 * heads * width], 0.0, 0.2).reshape([2 * heads * width]);
        let upstream = draws.normal([batch, seq, width], 0.0, 1.0);
        let values = |t: Tensor<3>| t.into_data().try_to_vec::<f32>().unwrap();
        let run = |fused: bool| {
            let (h, weight, bias) =
                (h.clone().require_grad(), weight.clone().require_grad(), bias.clone().require_grad());
            let out = if fused {
                projected_folded_attention(h.clone(), weight.clone(), bias.clone(), heads, 0.3)
            } else {
                let qv = fused_linear(h.clone(), weight.clone(), bias.clone(), Activation::Identity);
                folded_attention(qv, h.clone(), heads, 0.3)
            };
            let grads = (out.clone() * upstream.clone()).sum().backward();
            (
                values(out.detach().inner()),
                values(h.grad(&grads).expect("h gradient")),
                weight.grad(&grads).expect("weight gradient").into_data().try_to_vec::<f32>().unwrap(),
                bias.grad(&grads).expect("bias gradient").into_data().try_to_vec::<f32>().unwrap(),
            )
        };
        let (fused, two) = (run(true), run(false));
        let case = format!("{batch}×{seq}×{heads}×{width}");
        assert_eq!(fused.0, two.0, "{case}: outputs");
        assert_eq!(fused.1, two.1, "{case}: h gradients");
        let rel = |a: &[f32], b: &[f32]| {
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
            a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
        };
        if batch <= 10 {
            assert_eq!(fused.2, two.2, "{case}: weight gradients");
            assert_eq!(fused.3, two.3, "{case}: bias gradients");
        } else {
            assert!(rel(&fused.2, &two.2) < 1e-5, "{case}: weight gradients differ by {}", rel(&fused.2, &two.2));
            assert!(rel(&fused.3, &two.3) < 1e-5, "{case}: bias gradients differ by {}", rel(&fused.3, &two.3));
        }
    }
}

/// The patch layout change, both ways and in both value orders, equals burn's reshape and
/// permute exactly, and so do its gradients (the other direction applied to the upstream
/// gradient).
#[test]
fn patches_match_composed() {
    use super::patches::PatchOrder;
    let device = Device::flex().autodiff();
    for (b, c, [h, w], p) in [(2, 1, [28, 28], 4), (3, 3, [6, 10], 2), (1, 2, [4, 4], 1)] {
        let tokens = (h / p) * (w / p);
        let draws = Draws::new(&device, (c * 100 + p) as u64);
        let image = draws.normal([b * c, h, w], 0.0, 1.0).reshape([b, c, h, w]);
        let up_tokens = draws.normal([b, tokens, p * p * c], 0.0, 1.0);
        let up_image = draws.normal([b * c, h, w], 0.0, 1.0).reshape([b, c, h, w]);
        let bits = |t: Tensor<3>| t.inner().into_data().try_to_vec::<f32>().unwrap();
        let bits4 = |t: Tensor<4>| t.inner().into_data().try_to_vec::<f32>().unwrap();
        for order in [PatchOrder::ChannelsFirst, PatchOrder::ChannelsLast] {
            let to_tokens = |f: fn(Tensor<4>, usize, PatchOrder) -> Tensor<3>| {
                let x = image.clone().require_grad();
                let y = f(x.clone(), p, order);
                let grads = (y.clone() * up_tokens.clone()).sum().backward();
                (bits(y.detach()), bits4(x.grad(&grads).expect("gradient")))
            };
            let (kernel, composed) = (to_tokens(patchify), to_tokens(patchify_composed));
            assert_eq!(kernel, composed, "patchify {b}×{c}×{h}×{w}/{p} {order:?}");

            let tokens_in = up_tokens.clone();
            let to_image = |f: fn(Tensor<3>, usize, [usize; 2], usize, PatchOrder) -> Tensor<4>| {
                let x = tokens_in.clone().require_grad();
                let y = f(x.clone(), c, [h, w], p, order);
                let grads = (y.clone() * up_image.clone()).sum().backward();
                (bits4(y.detach()), bits(x.grad(&grads).expect("gradient")))
            };
            let (kernel, composed) = (to_image(unpatchify), to_image(unpatchify_composed));
            assert_eq!(kernel, composed, "unpatchify {b}×{c}×{h}×{w}/{p} {order:?}");
        }
    }
}

/// The attention fold as one operation equals burn's composed fold: the weight and bias, and
/// the gradients of every projection parameter (1e-5 relative), for mnist-dits' shape and an
/// odd one.
#[test]
fn fold_attention_matches_composed() {
    for (width, heads, head_dim) in [(64, 4, 64), (6, 3, 5)] {
        let draws = Draws::new(&Device::flex().autodiff(), (width * 10 + heads) as u64);
        let inner = heads * head_dim;
        let inputs = [
            draws.normal([1, width, inner], 0.0, 0.2),
            draws.normal([1, 1, inner], 0.0, 0.2),
            draws.normal([1, width, inner], 0.0, 0.2),
            draws.normal([1, width, inner], 0.0, 0.2),
            draws.normal([1, 1, inner], 0.0, 0.2),
            draws.normal([1, inner, width], 0.0, 0.2),
            draws.normal([1, 1, width], 0.0, 0.2),
        ];
        type Fold = fn(AttentionProjections, usize) -> (Tensor<2>, Tensor<1>);
        let call = |f: Fold| {
            move |[wq, bq, wk, wv, bv, lv, b_out]: [Tensor<3>; 7]| {
                let [wq, wk, wv, lv] = [wq, wk, wv, lv].map(|t| t.squeeze_dim::<2>(0));
                let [bq, bv, b_out] = [bq, bv, b_out].map(|t| as_2d(t).squeeze_dim::<1>(0));
                let (weight, bias) = f(AttentionProjections { wq, bq, wk, wv, bv, lv, b_out }, heads);
                Tensor::cat(vec![weight, bias.unsqueeze()], 0).unsqueeze::<3>()
            }
        };
        check_against_composed(inputs, call(fold_attention), call(fold_attention_composed));
    }
}
