//! A feed-forward network `y = act(x·W₁ + b₁)·W₂ + b₂` (ReLU or the identity) as one kernel,
//! forward and backward, a block of rows at a time so that the hidden layer's values and
//! gradients are used while they are in L2.
//!
//! As two Linear kernels, the expansion writes the hidden rows out (four times the width) and the
//! contraction reads them back; backward, the contraction writes the hidden gradient out and the
//! expansion reads it back, with the hidden values for the activation's derivative. Here each
//! block's hidden rows are written once, to the tensor the backward pass keeps, and read by the
//! contraction at once; backward, each step's hidden gradient lives in a buffer of the thread.
//! The products are [`linear`]'s ([`Panels`] and [`WeightGradient`]), so the output and the
//! input gradient are the same bits as the two Linear kernels; the weight and bias gradients are
//! summed over spans of rows of their own, and differ from those by rounding only.

use rayon::prelude::*;

use super::buffer::{assume_init, scratch, uninit_filled};
use super::linear::{Activation, activation_backward, sum_in_order};
use super::panels::{self, Panels};
use super::weight_gradient::WeightGradient;

/// Rows per forward task: as the Linear kernel's blocks.
const BLOCK_ROWS: usize = 256;
/// Rows per backward task. The weight and bias gradients are summed span by span, so this, not
/// the thread count, fixes their order of summation.
const SPAN_ROWS: usize = 512;
/// Rows a backward task takes through every step at a time: their output gradient (64 wide)
/// and hidden gradient (256 wide) stay in L1 and L2 between the steps.
const STEP_ROWS: usize = 64;

/// Sizes: `rows` tokens of `width` features, `hidden` features inside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedForwardDims {
    pub rows: usize,
    pub width: usize,
    pub hidden: usize,
}

/// Whether the kernel runs for `act`: with the panel products ([`panels::available`]), and an
/// activation whose derivative reads its output (ReLU, the identity).
pub fn runs(act: Activation) -> bool {
    panels::available() && !act.needs_preactivation()
}

/// Checks `x` and both layers' weights (`w1` `[width, hidden]`, `w2` `[hidden, width]`) against
/// `d`, and that the kernel runs for `act`.
fn check(x: &[f32], w1: &[f32], w2: &[f32], d: FeedForwardDims, act: Activation) {
    let FeedForwardDims { rows, width, hidden } = d;
    assert!(runs(act), "feed-forward kernel: needs the panel products and ReLU or the identity");
    assert!(width > 0 && hidden > 0, "feed-forward kernel: zero-sized layer");
    assert_eq!(x.len(), rows * width, "feed-forward kernel: x has the wrong length");
    assert_eq!(w1.len(), width * hidden, "feed-forward kernel: W1 must be [{width}, {hidden}]");
    assert_eq!(w2.len(), hidden * width, "feed-forward kernel: W2 must be [{hidden}, {width}]");
}

/// Forward: the output `[rows, width]` and the hidden layer's output `act(x·W₁ + b₁)`
/// `[rows, hidden]`, which the backward pass reads.
pub fn forward(
    x: &[f32],
    (w1, b1): (&[f32], &[f32]),
    (w2, b2): (&[f32], &[f32]),
    d: FeedForwardDims,
    act: Activation,
) -> (Vec<f32>, Vec<f32>) {
    check(x, w1, w2, d, act);
    let FeedForwardDims { rows, width, hidden } = d;
    assert!(b1.len() == hidden && b2.len() == width, "feed-forward kernel: biases must have {hidden} and {width}");
    let (expand, contract) = (Panels::pack(w1, width, hidden, hidden, 1), Panels::pack(w2, hidden, width, width, 1));
    let relu = act == Activation::Relu;
    let mut kept = Vec::new();
    // SAFETY: each block's products write all of its hidden and output rows.
    let y = unsafe {
        uninit_filled(rows * width, |y| {
            kept = uninit_filled(rows * hidden, |h| {
                y.par_chunks_mut(BLOCK_ROWS * width).zip(h.par_chunks_mut(BLOCK_ROWS * hidden)).enumerate().for_each(
                    |(bi, (y, h))| {
                        let xs = &x[bi * BLOCK_ROWS * width..][..h.len() / hidden * width];
                        expand.product_biased(xs, b1, relu, h);
                        contract.product_biased(assume_init(h), b2, false, y);
                    },
                )
            });
        })
    };
    (y, kept)
}

/// Gradients of the input and of both layers' weights and biases.
#[derive(Debug, Clone)]
pub struct FeedForwardGrads {
    pub x: Vec<f32>,
    pub w1: Vec<f32>,
    pub b1: Vec<f32>,
    pub w2: Vec<f32>,
    pub b2: Vec<f32>,
}

/// Backward from the output gradient `dy`, with the hidden layer's output `hidden` from
/// [`forward`].
pub fn backward(
    x: &[f32],
    w1: &[f32],
    w2: &[f32],
    hidden: &[f32],
    dy: &[f32],
    d: FeedForwardDims,
    act: Activation,
) -> FeedForwardGrads {
    check(x, w1, w2, d, act);
    let FeedForwardDims { rows, width, hidden: wide } = d;
    assert_eq!(hidden.len(), rows * wide, "feed-forward kernel: the hidden rows have the wrong length");
    assert_eq!(dy.len(), rows * width, "feed-forward kernel: the gradient has the wrong length");
    // The input gradients through each layer: dh = dy·W₂ᵀ, dx = dz·W₁ᵀ.
    let (contract_t, expand_t) = (Panels::pack(w2, width, wide, 1, width), Panels::pack(w1, wide, width, 1, wide));
    let mut spans: Vec<[Vec<f32>; 4]> = Vec::new();
    // SAFETY: every step writes all of its rows of dx.
    let dx = unsafe {
        uninit_filled(rows * width, |dx| {
            spans = dx
                .par_chunks_mut(SPAN_ROWS * width)
                .enumerate()
                .map_init(
                    || scratch(STEP_ROWS * wide),
                    |dz, (si, dx)| {
                        let (mut dw1, mut dw2) = (WeightGradient::new(width, wide), WeightGradient::new(wide, width));
                        let (mut db1, mut db2) = (vec![0.0f32; wide], vec![0.0f32; width]);
                        for (i, dx) in dx.chunks_mut(STEP_ROWS * width).enumerate() {
                            let (first, m) = (si * SPAN_ROWS + i * STEP_ROWS, dx.len() / width);
                            let (x, dy) = (&x[first * width..][..m * width], &dy[first * width..][..m * width]);
                            let h = &hidden[first * wide..][..m * wide];
                            for row in dy.chunks_exact(width) {
                                db2.iter_mut().zip(row).for_each(|(b, &g)| *b += g);
                            }
                            dw2.add(h, dy);
                            let dz = &mut dz[..m * wide];
                            contract_t.product(dy, dz, |_, _| {});
                            let dz = assume_init(dz);
                            activation_backward(dz, if act == Activation::Relu { h } else { &[] }, &mut db1, act);
                            expand_t.product(dz, dx, |_, _| {});
                            dw1.add(x, dz);
                        }
                        [dw1.finish(), db1, dw2.finish(), db2]
                    },
                )
                .collect();
        })
    };
    let sum = |part: usize, len: usize| sum_in_order(spans.iter().map(|span| span[part].as_slice()), len);
    FeedForwardGrads { x: dx, w1: sum(0, width * wide), b1: sum(1, wide), w2: sum(2, wide * width), b2: sum(3, width) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::linear::{self, LinearDims};

    struct Case {
        x: Vec<f32>,
        w1: Vec<f32>,
        b1: Vec<f32>,
        w2: Vec<f32>,
        b2: Vec<f32>,
        dy: Vec<f32>,
    }

    fn case(seed: u64, d: FeedForwardDims) -> Case {
        let mut rng = crate::rng::stream(seed, crate::rng::Purpose::Bench, 0);
        let mut draw = |n: usize, scale: f32| -> Vec<f32> {
            crate::rng::standard_normal(&mut rng, n).into_iter().map(|v| v * scale).collect()
        };
        let FeedForwardDims { rows, width, hidden } = d;
        Case {
            x: draw(rows * width, 1.0),
            w1: draw(width * hidden, 0.2),
            b1: draw(hidden, 0.2),
            w2: draw(hidden * width, 0.2),
            b2: draw(width, 0.2),
            dy: draw(rows * width, 1.0),
        }
    }

    fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    /// Against the two Linear kernels: the output, the hidden rows and the input gradient bit for
    /// bit; the weight and bias gradients bit for bit within one bias block of the Linear's
    /// (256 rows), to rounding beyond (summed in other spans).
    #[test]
    fn matches_the_two_linear_kernels() {
        if !runs(Activation::Relu) {
            eprintln!("no panel products on this CPU: the feed-forward kernel does not run");
            return;
        }
        for (rows, width, hidden) in [(200, 64, 256), (1500, 64, 256), (77, 20, 44)] {
            let d = FeedForwardDims { rows, width, hidden };
            let c = case(rows as u64, d);
            for act in [Activation::Relu, Activation::Identity] {
                let (expand, contract) = (
                    LinearDims { rows, input: width, output: hidden },
                    LinearDims { rows, input: hidden, output: width },
                );
                let (h, _) = linear::forward(&c.x, &c.w1, &c.b1, expand, act, false);
                let (y, _) = linear::forward(&h, &c.w2, &c.b2, contract, Activation::Identity, false);
                let (got_y, got_h) = forward(&c.x, (&c.w1, &c.b1), (&c.w2, &c.b2), d, act);
                assert_eq!(got_h, h, "{d:?} {act:?}: hidden");
                assert_eq!(got_y, y, "{d:?} {act:?}: output");

                let mut dh_in = c.dy.clone();
                let g2 = linear::backward(&h, &c.w2, &[], &mut dh_in, contract, Activation::Identity);
                let mut dz = g2.x.clone();
                let g1 = linear::backward(&c.x, &c.w1, &h, &mut dz, expand, act);
                let got = backward(&c.x, &c.w1, &c.w2, &h, &c.dy, d, act);
                assert_eq!(got.x, g1.x, "{d:?} {act:?}: input gradient");
                let pairs = [
                    ("w1", &got.w1, &g1.weight),
                    ("b1", &got.b1, &g1.bias),
                    ("w2", &got.w2, &g2.weight),
                    ("b2", &got.b2, &g2.bias),
                ];
                for (name, got, want) in pairs {
                    if rows <= 256 {
                        assert_eq!(got, want, "{d:?} {act:?}: {name}");
                    } else {
                        let diff = max_rel_diff(got, want);
                        assert!(diff < 1e-5, "{d:?} {act:?}: {name} differs by {diff}");
                    }
                }
            }
        }
    }

    /// The gradients are the same bits on one thread and on several.
    #[test]
    fn backward_does_not_depend_on_the_thread_count() {
        if !runs(Activation::Relu) {
            return;
        }
        let d = FeedForwardDims { rows: 1300, width: 32, hidden: 96 };
        let c = case(3, d);
        let (_, h) = forward(&c.x, (&c.w1, &c.b1), (&c.w2, &c.b2), d, Activation::Relu);
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
            let g = pool.install(|| backward(&c.x, &c.w1, &c.w2, &h, &c.dy, d, Activation::Relu));
            [g.x, g.w1, g.b1, g.w2, g.b2].map(|v| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>())
        };
        let one = on(1);
        for threads in [2, 3] {
            assert!(on(threads) == one, "{threads} threads");
        }
    }
}
