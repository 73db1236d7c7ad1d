//! A Linear layer with its bias and activation applied while the output block is still in
//! cache: `y = act(x·W + b)`, forward and backward.
//!
//! burn's `linear` writes `x·W`, then adds the bias in a second pass and applies the activation
//! in a third; its backward reads the gradient again for the activation, again for the bias
//! sum. Here the rows are cut into blocks of a few hundred, each block's GEMM is followed at
//! once by the bias and activation (forward) or preceded by the activation's derivative and
//! the bias sum (backward), all in one pass over memory that the GEMM just touched.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::buffer::{self, assume_init, uninit_filled};

use super::gemm::{Order, product};
use super::panels::{self, Panels};
use super::simd::exp;
use super::weight_gradient::{self, WeightGradient};

/// The activation after the bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Identity,
    Relu,
    /// GELU's tanh approximation, `x·σ(2u)` with `u = √(2/π)(x + 0.044715x³)`.
    GeluTanh,
}

impl Activation {
    /// Whether the backward pass needs the pre-activation `z` (else the output, or nothing).
    pub fn needs_preactivation(self) -> bool {
        self == Activation::GeluTanh
    }
}

/// The blocks already run in parallel; each block's product runs on one thread.
const ONE_THREAD: gemm::Parallelism = gemm::Parallelism::None;

/// Rows per block: enough GEMM work per task to amortise packing the weight, few enough that a
/// block's output stays in L2 and the blocks keep both cores busy.
const BLOCK_ROWS: usize = 256;

const GELU_C: f32 = 0.797_884_6; // √(2/π)
const GELU_A: f32 = 0.044_715;

/// `σ(2u)` and `2u'` of the tanh GELU at `z`.
#[inline(always)]
fn gelu_parts(z: f32) -> (f32, f32) {
    let v = 2.0 * GELU_C * (z + GELU_A * z * z * z);
    let sig = 1.0 / (1.0 + exp(-v));
    (sig, 2.0 * GELU_C * (1.0 + 3.0 * GELU_A * z * z))
}

#[inline(always)]
fn epilogue_impl(y: &mut [f32], z: &mut [MaybeUninit<f32>], bias: &[f32], act: Activation) {
    let n = bias.len();
    match act {
        Activation::Identity => {
            for yr in y.chunks_exact_mut(n) {
                yr[..n].iter_mut().zip(bias).for_each(|(y, &b)| *y += b);
            }
        }
        Activation::Relu => {
            for yr in y.chunks_exact_mut(n) {
                yr[..n].iter_mut().zip(bias).for_each(|(y, &b)| *y = (*y + b).max(0.0));
            }
        }
        Activation::GeluTanh => {
            for (yr, zr) in y.chunks_exact_mut(n).zip(z.chunks_exact_mut(n)) {
                for ((y, z), &b) in yr[..n].iter_mut().zip(zr[..n].iter_mut()).zip(bias) {
                    let pre = *y + b;
                    *z = MaybeUninit::new(pre);
                    *y = pre * gelu_parts(pre).0;
                }
            }
        }
    }
}

multiversion!(pub(super) epilogue(y: &mut [f32], z: &mut [MaybeUninit<f32>], bias: &[f32], act: Activation) => epilogue_impl);

/// `dz = dy ⊙ act'(z)` in place of `dy` (with the output `y` for ReLU, `z` for GELU), and these
/// rows' bias gradient added to `db`, row after row.
#[inline(always)]
fn activation_backward_impl(dy: &mut [f32], saved: &[f32], db: &mut [f32], act: Activation) {
    let n = db.len();
    for (i, g) in dy.chunks_exact_mut(n).enumerate() {
        let g = &mut g[..n];
        match act {
            Activation::Identity => {}
            Activation::Relu => {
                let y = &saved[i * n..(i + 1) * n];
                g.iter_mut().zip(y).for_each(|(g, &y)| *g = if y > 0.0 { *g } else { 0.0 });
            }
            Activation::GeluTanh => {
                let z = &saved[i * n..(i + 1) * n];
                for (g, &z) in g.iter_mut().zip(z) {
                    let (sig, dv) = gelu_parts(z);
                    *g *= sig + z * sig * (1.0 - sig) * dv;
                }
            }
        }
        db.iter_mut().zip(g.iter()).for_each(|(d, &g)| *d += g);
    }
}

multiversion!(pub(super) activation_backward(dy: &mut [f32], saved: &[f32], db: &mut [f32], act: Activation) => activation_backward_impl);

/// Sizes: `rows` inputs of `input` features to `output` features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearDims {
    pub rows: usize,
    pub input: usize,
    pub output: usize,
}

/// Forward: `y = act(x·W + b)` `[rows, output]`, and the pre-activation `z` when the activation's
/// backward needs it.
pub fn forward(
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    d: LinearDims,
    act: Activation,
    keep_z: bool,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let LinearDims { rows, input, output } = d;
    assert_eq!(x.len(), rows * input, "linear: input has the wrong length");
    assert_eq!(weight.len(), input * output, "linear: weight must be [{input}, {output}]");
    assert_eq!(bias.len(), output, "linear: bias must have {output} elements");
    assert!(input > 0 && output > 0, "linear: zero-sized layer");
    let keep_z = keep_z && act.needs_preactivation();
    let block = BLOCK_ROWS * output;
    // With AVX2 or AVX-512 the weight is packed once and the bias and ReLU are applied in the register
    // tiles, GELU's epilogue on each tile's rows while they are in L1 (see [`panels`]);
    // elsewhere gemm writes the block first.
    let panels = panels::available().then(|| Panels::pack(weight, input, output, output, 1));
    let run = |bi: usize, yb: &mut [MaybeUninit<f32>], zb: &mut [MaybeUninit<f32>]| {
        let m = yb.len() / output;
        let xs = &x[bi * BLOCK_ROWS * input..][..m * input];
        if let Some(panels) = &panels {
            if !act.needs_preactivation() {
                // Bias and ReLU on the accumulators, as the epilogue would apply them.
                panels.product_biased(xs, bias, act == Activation::Relu, yb);
                return;
            }
            panels.product(xs, yb, |first, rows| {
                let z = if zb.is_empty() { &mut [][..] } else { &mut zb[first * output..][..rows.len()] };
                epilogue(rows, z, bias, act);
            });
            return;
        }
        // SAFETY: the block's m rows of x and all of the weight are in bounds; yb is its own.
        unsafe {
            product(
                Order::Transposed,
                m,
                output,
                input,
                yb.as_mut_ptr().cast(),
                output,
                xs.as_ptr(),
                (input, 1),
                weight.as_ptr(),
                (output, 1),
                ONE_THREAD,
                false,
            )
        };
        // SAFETY: the GEMM wrote the whole block.
        epilogue(unsafe { assume_init(yb) }, zb, bias, act);
    };
    let mut z = None;
    // SAFETY: each block's GEMM writes all of its outputs; the epilogue writes `z` (GELU only,
    // the one activation for which `keep_z` holds).
    let y = unsafe {
        uninit_filled(rows * output, |y| {
            if keep_z {
                z = Some(uninit_filled(rows * output, |z| {
                    y.par_chunks_mut(block)
                        .zip(z.par_chunks_mut(block))
                        .enumerate()
                        .for_each(|(bi, (yb, zb))| run(bi, yb, zb))
                }));
            } else if act.needs_preactivation() {
                y.par_chunks_mut(block)
                    .enumerate()
                    .for_each_init(|| buffer::scratch(block), |zb, (bi, yb)| run(bi, yb, &mut zb[..yb.len()]));
            } else {
                y.par_chunks_mut(block).enumerate().for_each(|(bi, yb)| run(bi, yb, &mut []));
            }
        })
    };
    (y, z)
}

/// Gradients of the input, weight and bias.
#[derive(Debug, Clone)]
pub struct LinearGrads {
    pub x: Vec<f32>,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

/// How [`backward_on`] computes the input and weight gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackwardEngine {
    /// dits' tiles, a few rows at a time while their `dz` is in cache: [`Panels`] for `dx`,
    /// [`WeightGradient`] for `dW` (AVX2 or AVX-512).
    Spans,
    /// gemm: `dx` block by block, then `dW` over all rows at once.
    Gemm,
}

impl BackwardEngine {
    /// The engine [`backward`] uses on this CPU.
    pub fn best() -> Self {
        if weight_gradient::available() { BackwardEngine::Spans } else { BackwardEngine::Gemm }
    }

    /// Every engine this CPU runs, the one [`backward`] uses first.
    pub fn available() -> Vec<Self> {
        let mut engines = Vec::new();
        if weight_gradient::available() {
            engines.push(BackwardEngine::Spans);
        }
        engines.push(BackwardEngine::Gemm);
        engines
    }
}

/// Backward from `dy` (overwritten: it becomes `dz`). `saved` is the output `y` for ReLU, the
/// pre-activation `z` for GELU, ignored for the identity.
pub fn backward(
    x: &[f32],
    weight: &[f32],
    saved: &[f32],
    dy: &mut [f32],
    d: LinearDims,
    act: Activation,
) -> LinearGrads {
    backward_on(BackwardEngine::best(), x, weight, saved, dy, d, act)
}

/// [`backward`] on a given engine (one this CPU runs: [`BackwardEngine::available`]), so that
/// `dits bench` can compare them.
pub fn backward_on(
    engine: BackwardEngine,
    x: &[f32],
    weight: &[f32],
    saved: &[f32],
    dy: &mut [f32],
    d: LinearDims,
    act: Activation,
) -> LinearGrads {
    let LinearDims { rows, input, output } = d;
    assert_eq!(dy.len(), rows * output, "linear backward: gradient has the wrong length");
    if engine == BackwardEngine::Spans {
        assert!(weight_gradient::available(), "linear backward: the span engine needs AVX2 + FMA or AVX-512");
        return backward_by_spans(x, weight, saved, dy, d, act);
    }
    let block = BLOCK_ROWS * output;
    let blocks = rows.div_ceil(BLOCK_ROWS);
    // dz in place, and one bias-gradient row per block (summed below in a fixed order).
    let mut db_blocks = vec![0.0f32; blocks * output];
    dy.par_chunks_mut(block).zip(db_blocks.par_chunks_mut(output.max(1))).enumerate().for_each(|(bi, (g, db))| {
        let saved = if act == Activation::Identity { &[][..] } else { &saved[bi * block..bi * block + g.len()] };
        activation_backward(g, saved, db, act);
    });
    let bias = sum_in_order(db_blocks.chunks_exact(output.max(1)), output);
    // dx = dz Wᵀ, block by block.
    let dy = &*dy;
    // SAFETY: each block's product writes all of its rows of dx.
    let dx = unsafe {
        uninit_filled(rows * input, |dx| {
            dx.par_chunks_mut(BLOCK_ROWS * input).enumerate().for_each(|(bi, dxb)| {
                let m = dxb.len() / input;
                let dzb = &dy[bi * block..][..m * output];
                // The block's m rows of dz and the weight are in bounds; dxb is its own.
                product(
                    Order::Transposed,
                    m,
                    input,
                    output,
                    dxb.as_mut_ptr().cast(),
                    input,
                    dzb.as_ptr(),
                    (output, 1),
                    weight.as_ptr(),
                    (1, output),
                    ONE_THREAD,
                    false,
                );
            })
        })
    };
    // dW = xᵀ dz over all rows; gemm splits the output tiles across threads (each tile's sum
    // over rows runs in one order, so the result does not depend on the thread count).
    // SAFETY: the GEMM writes all of dW (rows > 0; with no rows the gradient is zero).
    let dw = if rows == 0 {
        vec![0.0f32; input * output]
    } else {
        unsafe {
            uninit_filled(input * output, |dw| {
                let (xp, dzp) = (x.as_ptr(), dy.as_ptr());
                product(
                    Order::AsIs,
                    input,
                    output,
                    rows,
                    dw.as_mut_ptr().cast(),
                    output,
                    xp,
                    (1, input),
                    dzp,
                    (output, 1),
                    gemm::Parallelism::Rayon(0),
                    false,
                )
            })
        }
    };
    LinearGrads { x: dx, weight: dw, bias }
}

/// Rows per task of [`backward_by_spans`]: two blocks. The weight gradient is summed span by
/// span, so this, not the thread count, fixes its order of summation.
const SPAN_ROWS: usize = 2 * BLOCK_ROWS;
/// Rows that [`backward_by_spans`] takes through all three steps at a time: `dz` (at most
/// 64 × 512 floats) is still in L2 when the input and weight gradients read it.
const STEP_ROWS: usize = 64;
const _: () = assert!(BLOCK_ROWS.is_multiple_of(STEP_ROWS), "a step must not straddle two blocks");

/// [`BackwardEngine::Spans`]: `dz`, `dx` and the share of `dW` of each few rows one after another,
/// while those rows are in cache ([`Panels`] for `dx`, [`WeightGradient`] for `dW`), one span of
/// rows per task; the spans' weight gradients and the blocks' bias gradients are then added in
/// order.
fn backward_by_spans(
    x: &[f32],
    weight: &[f32],
    saved: &[f32],
    dy: &mut [f32],
    d: LinearDims,
    act: Activation,
) -> LinearGrads {
    let LinearDims { rows, input, output } = d;
    let panels = Panels::pack(weight, output, input, 1, output);
    let blocks_per_span = SPAN_ROWS / BLOCK_ROWS;
    // One bias-gradient row per block, as in `backward`.
    let mut db_blocks = vec![0.0f32; rows.div_ceil(BLOCK_ROWS) * output];
    let mut spans: Vec<Vec<f32>> = Vec::new();
    // SAFETY: the products write every row of dx.
    let dx = unsafe {
        uninit_filled(rows * input, |dx| {
            spans = dy
                .par_chunks_mut(SPAN_ROWS * output)
                .zip(dx.par_chunks_mut(SPAN_ROWS * input))
                .zip(db_blocks.par_chunks_mut(blocks_per_span * output))
                .enumerate()
                .map(|(si, ((dz, dx), db))| {
                    let mut dw = WeightGradient::new(input, output);
                    let steps = dz.chunks_mut(STEP_ROWS * output).zip(dx.chunks_mut(STEP_ROWS * input));
                    for (i, (dz, dx)) in steps.enumerate() {
                        let (first, m) = (si * SPAN_ROWS + i * STEP_ROWS, dz.len() / output);
                        let saved =
                            if act == Activation::Identity { &[][..] } else { &saved[first * output..][..m * output] };
                        let db = &mut db[(i * STEP_ROWS / BLOCK_ROWS) * output..][..output];
                        activation_backward(dz, saved, db, act);
                        panels.product(dz, dx, |_, _| {});
                        dw.add(&x[first * input..][..m * input], dz);
                    }
                    dw.finish()
                })
                .collect();
        })
    };
    let bias = sum_in_order(db_blocks.chunks_exact(output), output);
    let weight = sum_in_order(spans.iter().map(Vec::as_slice), input * output);
    LinearGrads { x: dx, weight, bias }
}

/// The sum of partial sums of `len` values, added in the order given: a fixed order, so the
/// result does not depend on which thread computed which part.
pub(super) fn sum_in_order<'a>(parts: impl IntoIterator<Item = &'a [f32]>, len: usize) -> Vec<f32> {
    let mut sum = vec![0.0f32; len];
    for part in parts {
        sum.iter_mut().zip(part).for_each(|(a, &b)| *a += b);
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gradients are the same bits on one thread and on several: the blocks and spans, not
    /// the threads, fix the order of every sum.
    #[test]
    fn backward_does_not_depend_on_the_thread_count() {
        let mut rng = crate::rng::stream(13, crate::rng::Purpose::Bench, 0);
        let d = LinearDims { rows: 1500, input: 64, output: 48 };
        let x = crate::rng::standard_normal(&mut rng, d.rows * d.input);
        let weight = crate::rng::standard_normal(&mut rng, d.input * d.output);
        let bias = crate::rng::standard_normal(&mut rng, d.output);
        let dy = crate::rng::standard_normal(&mut rng, d.rows * d.output);
        let (y, _) = forward(&x, &weight, &bias, d, Activation::Relu, false);
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
            pool.install(|| backward(&x, &weight, &y, &mut dy.clone(), d, Activation::Relu))
        };
        let bits =
            |g: &LinearGrads| [&g.x, &g.weight, &g.bias].map(|v| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>());
        let one = bits(&on(1));
        for threads in [2, 3] {
            assert!(bits(&on(threads)) == one, "{threads} threads");
        }
    }
}
