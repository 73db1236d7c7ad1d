//! Row-wise softmax and its backward, vectorised.
//!
//! Written by hand because the scalar `expf` of libm was 5% of a training step (perf): the
//! exponential here is a branch-free polynomial that the compiler vectorises, and each function
//! is compiled a second time for AVX-512 (or AVX2 + FMA) and picked at run time, since dits is
//! built for the baseline x86-64 target.

/// `e^x` for `x ≤ 88`, relative error below 3e-7; results underflow to `2^-126`-scaled values
/// for `x < -87` (probabilities that small do not change a softmax row).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that `x - n·ln 2` is exact for |n| ≤ 128.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5·2²³: adding and subtracting it rounds to the nearest integer without a branch.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUND; // holds n = round(x·log2 e) in its low mantissa bits
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO; // |r| ≤ ln2/2
    // Taylor series of e^r to degree 7: truncation error below 1e-8 on |r| ≤ 0.35.
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^n from n's bits: (n + 127) << 23, in integer lanes.
    let two_n = (t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127)) << 23;
    p * f32::from_bits(two_n)
}

/// Sums and maxima through 16 independent lanes, which the compiler keeps in one vector
/// register (a single running total would force a scalar loop: float addition is not
/// associative), folded at the end as a tree (a sequential fold of the lanes is a 16-long
/// dependency chain, which cost more than the vector work for 49- or 64-wide rows).
#[inline(always)]
pub(crate) fn lanes(x: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    fold_lanes(x, init, |v| v, f)
}

/// [`lanes`] over `map(x)`.
#[inline(always)]
pub(crate) fn fold_lanes(x: &[f32], init: f32, map: impl Fn(f32) -> f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            acc[i] = f(acc[i], map(c[i]));
        }
    }
    for (i, &v) in tail.iter().enumerate() {
        acc[i] = f(acc[i], map(v));
    }
    tree(acc, f)
}

/// Folds 16 lanes pairwise: 8, 4, 2, 1.
#[inline(always)]
fn tree(mut acc: [f32; 16], f: impl Fn(f32, f32) -> f32) -> f32 {
    for half in [8, 4, 2, 1] {
        for i in 0..half {
            acc[i] = f(acc[i], acc[i + half]);
        }
    }
    acc[0]
}

#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    for i in 0..ta.len() {
        acc[i] += ta[i] * tb[i];
    }
    tree(acc, |a, b| a + b)
}

/// In place: every *column* of `x` (rows of `cols` elements) becomes `softmax(scale · column)`.
///
/// Column-wise because the attention kernel stores its scores transposed: then the max, the
/// exponentials and the sums all run along rows of contiguous memory, 16 columns per vector,
/// with no horizontal reduction (a 49-wide row softmax spent most of its time in those).
/// `scratch` holds at least `2·cols` floats.
#[inline(always)]
fn softmax_columns_impl(x: &mut [f32], cols: usize, scale: f32, scratch: &mut [f32]) {
    let (max, sum) = scratch[..2 * cols].split_at_mut(cols);
    max.fill(f32::NEG_INFINITY);
    sum.fill(0.0);
    for row in x.chunks_exact(cols) {
        max.iter_mut().zip(row).for_each(|(m, &v)| *m = m.max(v));
    }
    for row in x.chunks_exact_mut(cols) {
        for ((v, &m), s) in row.iter_mut().zip(max.iter()).zip(sum.iter_mut()) {
            *v = exp((*v - m) * scale);
            *s += *v;
        }
    }
    sum.iter_mut().for_each(|s| *s = 1.0 / *s);
    for row in x.chunks_exact_mut(cols) {
        row.iter_mut().zip(sum.iter()).for_each(|(v, &inv)| *v *= inv);
    }
}

/// In place, column-wise like [`softmax_columns`]: `dp` (the gradient of the probabilities `p`)
/// becomes the gradient of the pre-softmax scores times `scale`,
/// `scale · p ⊙ (dp − colsum(dp ⊙ p))`. `scratch` holds at least `cols` floats.
#[inline(always)]
fn softmax_columns_backward_impl(p: &[f32], dp: &mut [f32], cols: usize, scale: f32, scratch: &mut [f32]) {
    let dot = &mut scratch[..cols];
    dot.fill(0.0);
    for (p, dp) in p.chunks_exact(cols).zip(dp.chunks_exact(cols)) {
        for ((d, &a), &b) in dot.iter_mut().zip(p).zip(dp) {
            *d += a * b;
        }
    }
    for (p, dp) in p.chunks_exact(cols).zip(dp.chunks_exact_mut(cols)) {
        for ((g, &pv), &d) in dp.iter_mut().zip(p).zip(dot.iter()) {
            *g = scale * pv * (*g - d);
        }
    }
}

multiversion!(softmax_columns(x: &mut [f32], cols: usize, scale: f32, scratch: &mut [f32]) => softmax_columns_impl);
multiversion!(softmax_columns_backward(p: &[f32], dp: &mut [f32], cols: usize, scale: f32, scratch: &mut [f32]) => softmax_columns_backward_impl);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm_over_the_softmax_range() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 88.0 * i as f32 / 200_000.0;
            let rel = ((exp(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
    }

    /// `rows × cols` values and their transpose.
    fn sample(rows: usize, cols: usize) -> (Vec<f32>, Vec<f32>) {
        let x: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.9).collect();
        let t = (0..cols * rows).map(|k| x[(k % rows) * cols + k / rows]).collect();
        (x, t)
    }

    #[test]
    fn softmax_columns_match_the_definition() {
        // Each row of `x` is one softmax; the kernel gets the transpose (one per column).
        let (rows, cols) = (3, 21);
        let (x, mut t) = sample(rows, cols);
        softmax_columns(&mut t, rows, 0.5, &mut [0.0; 6]);
        for (r, row) in x.chunks(cols).enumerate() {
            let z: f64 = row.iter().map(|&v| (0.5 * v as f64).exp()).sum();
            for (c, &v) in row.iter().enumerate() {
                let (want, got) = ((0.5 * v as f64).exp() / z, t[c * rows + r] as f64);
                assert!((got - want).abs() < 1e-6 * want.max(1e-3), "{got} vs {want}");
            }
        }
    }

    #[test]
    fn softmax_backward_matches_finite_differences() {
        // One softmax over 5 values, stored as a column.
        let x: Vec<f32> = vec![0.3, -1.2, 2.0, 0.1, -0.4];
        let upstream: Vec<f32> = vec![1.0, -0.5, 0.25, 2.0, -1.5];
        let scale = 0.7;
        let loss = |x: &[f32]| {
            let mut p = x.to_vec();
            softmax_columns(&mut p, 1, scale, &mut [0.0; 2]);
            p.iter().zip(&upstream).map(|(a, b)| (a * b) as f64).sum::<f64>()
        };
        let mut p = x.clone();
        softmax_columns(&mut p, 1, scale, &mut [0.0; 2]);
        let mut g = upstream.clone();
        softmax_columns_backward(&p, &mut g, 1, scale, &mut [0.0; 1]);
        for i in 0..x.len() {
            let (mut hi, mut lo) = (x.clone(), x.clone());
            hi[i] += 1e-3;
            lo[i] -= 1e-3;
            let numeric = (loss(&hi) - loss(&lo)) / 2e-3;
            assert!((numeric - g[i] as f64).abs() < 1e-3, "d/dx{i}: {numeric} vs {}", g[i]);
        }
    }
}
