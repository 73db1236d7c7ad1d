//! Row-wise softmax and its backward, vectorised.
//!
//! Written by hand because the scalar `expf` of libm was 5% of a training step (perf): the
//! exponential here is a branch-free polynomial that the compiler vectorises, and each function
//! is compiled a second time for AVX-512 (or AVX2 + FMA) and picked at run time, since dits is
//! built for the baseline x86-64 target.

/// `e^x` for `x ≤ 88`, relative error below 3e-7; results underflow to `2^-126`-scaled values
/// for `x < -87` (probabilities that small do not change a softmax row).
#[inline(always)]
fn exp(x: f32) -> f32 {
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
/// associative).
#[inline(always)]
pub(crate) fn lanes(x: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder().iter().fold(init, |a, &v| f(a, v));
    for c in chunks {
        for i in 0..16 {
            acc[i] = f(acc[i], c[i]);
        }
    }
    acc.iter().fold(tail, |a, &v| f(a, v))
}

#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// In place: every row of `x` (`cols` wide) becomes `softmax(scale · row)`.
#[inline(always)]
fn softmax_rows_impl(x: &mut [f32], cols: usize, scale: f32) {
    for row in x.chunks_exact_mut(cols) {
        let max = lanes(row, f32::NEG_INFINITY, f32::max);
        row.iter_mut().for_each(|v| *v = exp((*v - max) * scale));
        let inv = 1.0 / lanes(row, 0.0, |a, b| a + b);
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

/// In place: `dp` (the gradient of the probabilities `p`) becomes the gradient of the
/// pre-softmax scores times `scale`: `scale · p ⊙ (dp − rowsum(dp ⊙ p))`.
#[inline(always)]
fn softmax_backward_rows_impl(p: &[f32], dp: &mut [f32], cols: usize, scale: f32) {
    for (p, dp) in p.chunks_exact(cols).zip(dp.chunks_exact_mut(cols)) {
        let dot = dot(p, dp);
        for (g, &pv) in dp.iter_mut().zip(p) {
            *g = scale * pv * (*g - dot);
        }
    }
}

multiversion!(softmax_rows(x: &mut [f32], cols: usize, scale: f32) => softmax_rows_impl);
multiversion!(softmax_backward_rows(p: &[f32], dp: &mut [f32], cols: usize, scale: f32) => softmax_backward_rows_impl);

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

    #[test]
    fn softmax_rows_match_the_definition() {
        let cols = 7;
        let x: Vec<f32> = (0..3 * cols).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.9).collect();
        let mut y = x.clone();
        softmax_rows(&mut y, cols, 0.5);
        for (row, out) in x.chunks(cols).zip(y.chunks(cols)) {
            let z: f64 = row.iter().map(|&v| (0.5 * v as f64).exp()).sum();
            for (&v, &o) in row.iter().zip(out) {
                let want = (0.5 * v as f64).exp() / z;
                assert!((o as f64 - want).abs() < 1e-6 * want.max(1e-3), "{o} vs {want}");
            }
        }
    }

    #[test]
    fn softmax_backward_matches_finite_differences() {
        let cols = 5;
        let x: Vec<f32> = vec![0.3, -1.2, 2.0, 0.1, -0.4];
        let upstream: Vec<f32> = vec![1.0, -0.5, 0.25, 2.0, -1.5];
        let scale = 0.7;
        let loss = |x: &[f32]| {
            let mut p = x.to_vec();
            softmax_rows(&mut p, cols, scale);
            p.iter().zip(&upstream).map(|(a, b)| (a * b) as f64).sum::<f64>()
        };
        let mut p = x.clone();
        softmax_rows(&mut p, cols, scale);
        let mut g = upstream.clone();
        softmax_backward_rows(&p, &mut g, cols, scale);
        for i in 0..cols {
            let (mut hi, mut lo) = (x.clone(), x.clone());
            hi[i] += 1e-3;
            lo[i] -= 1e-3;
            let numeric = (loss(&hi) - loss(&lo)) / 2e-3;
            assert!((numeric - g[i] as f64).abs() < 1e-3, "d/dx{i}: {numeric} vs {}", g[i]);
        }
    }
}
