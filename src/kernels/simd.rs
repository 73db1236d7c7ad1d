//! Row-wise softmax and its backward, vectorised.
//!
//! Written by hand because the scalar `expf` of libm showed in the training profile: the
//! exponential here is a branch-free polynomial that the compiler vectorises, and each function
//! is compiled a second time for AVX-512 (or AVX2 + FMA) and picked at run time, since dits is
//! built for the baseline x86-64 target.

/// `e^x` for `x ≤ 88`, relative error below 3e-7; results underflow to `2^-126`-scaled values
/// for `x < -87` (the activations' `e^-x` terms that small change nothing).
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

/// The softmax's exponential, in base 2: the score scale and `log2 e` fold into one factor, so
/// each value costs one multiply-add before the power, and splitting `y = n + f` needs no
/// `ln 2` correction terms. Then `2^f` on `|f| ≤ 1/2` is a degree-5 minimax polynomial (its
/// error 7.5e-8, against 1e-8 for the degree-7 Taylor series of [`exp`], which float rounding
/// hides anyway): 13 vector operations per value in all, against 19 through [`exp`].
///
/// `2^y` for `y ≤ 0` (scores minus their column's maximum), relative error below 3e-7; below
/// −125 it gives about `2^-125` (kept normal: probabilities that small do not change a softmax
/// column). NaN stays NaN.
#[inline(always)]
pub(crate) fn pow2(y: f32) -> f32 {
    // 1.5·2²³: adding and subtracting it rounds to the nearest integer without a branch.
    const ROUND: f32 = 12_582_912.0;
    let y = if y < POW2_MIN { POW2_MIN } else { y }; // not `f32::max`, which drops a NaN
    let t = y + ROUND; // holds n = round(y) in its low mantissa bits
    let f = y - (t - ROUND);
    let p = POW2[0] + f * (POW2[1] + f * (POW2[2] + f * (POW2[3] + f * (POW2[4] + f * POW2[5]))));
    p * f32::from_bits((t.to_bits() << 23).wrapping_add(POW2_BIAS))
}

/// The lower clamp of [`pow2`].
const POW2_MIN: f32 = -125.0;
/// Minimax coefficients of `2^f` on `[-1/2, 1/2]`, by relative error (Remez exchange), lowest
/// power first.
const POW2: [f32; 6] = [1.000_000_1, 0.693_146_94, 0.240_221_2, 0.055_507_13, 0.009_675_541, 0.001_327_647_2];
/// `2^n`'s bits from `t = n + 1.5·2²³`: `(n + 127) << 23` is `(t's bits << 23) + POW2_BIAS`
/// (shifts distribute over wrapping addition), one integer operation fewer.
const POW2_BIAS: u32 = 127u32.wrapping_sub(12_582_912f32.to_bits()) << 23;

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

/// Folds 16 lanes pairwise: 8, 4, 2, 1. Spelled out in fixed-size halves: written as a loop
/// over the four widths, LLVM kept the lanes on the stack and folded them one scalar at a time
/// (the LayerNorm's rows waited on it).
#[inline(always)]
fn tree(acc: [f32; 16], f: impl Fn(f32, f32) -> f32) -> f32 {
    let a8: [f32; 8] = std::array::from_fn(|i| f(acc[i], acc[i + 8]));
    let a4: [f32; 4] = std::array::from_fn(|i| f(a8[i], a8[i + 4]));
    f(f(a4[0], a4[2]), f(a4[1], a4[3]))
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

/// [`softmax_columns`] in portable Rust (CPUs without AVX-512 or AVX2).
#[inline(always)]
fn softmax_columns_impl(x: &mut [f32], cols: usize, scale: f32, scratch: &mut [f32]) {
    let (max, sum) = scratch[..2 * cols].split_at_mut(cols);
    max.fill(f32::NEG_INFINITY);
    sum.fill(0.0);
    for row in x.chunks_exact(cols) {
        max.iter_mut().zip(row).for_each(|(m, &v)| *m = m.max(v));
    }
    let scale = scale * std::f32::consts::LOG2_E;
    for row in x.chunks_exact_mut(cols) {
        for ((v, &m), s) in row.iter_mut().zip(max.iter()).zip(sum.iter_mut()) {
            *v = pow2((*v - m) * scale);
            *s += *v;
        }
    }
    sum.iter_mut().for_each(|s| *s = 1.0 / *s);
    for row in x.chunks_exact_mut(cols) {
        row.iter_mut().zip(sum.iter()).for_each(|(v, &inv)| *v *= inv);
    }
}

/// [`softmax_columns_backward`] in portable Rust.
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

multiversion!(softmax_columns_portable(x: &mut [f32], cols: usize, scale: f32, scratch: &mut [f32]) => softmax_columns_impl);
multiversion!(softmax_columns_backward_portable(p: &[f32], dp: &mut [f32], cols: usize, scale: f32, scratch: &mut [f32]) => softmax_columns_backward_impl);

/// In place: every *column* of `x` (rows of `cols` elements) becomes `softmax(scale · column)`.
///
/// Column-wise because the attention kernel stores its scores transposed: then the max, the
/// exponentials and the sums all run along rows of contiguous memory, 16 columns per vector,
/// with no horizontal reduction (a 49-wide row softmax spent most of its time in those).
/// `scratch` holds at least `2·cols` floats.
pub fn softmax_columns(x: &mut [f32], cols: usize, scale: f32, scratch: &mut [f32]) {
    #[cfg(all(target_arch = "x86_64", not(fuzzing)))]
    if super::tile::available() {
        assert!(x.len().is_multiple_of(cols), "softmax: ragged rows");
        // SAFETY: AVX-512 is present; `x` is whole rows of `cols` values.
        return unsafe { avx512::softmax_columns(x, cols, scale) };
    }
    #[cfg(all(target_arch = "x86_64", not(fuzzing)))]
    if super::tile_avx2::available() {
        assert!(x.len().is_multiple_of(cols), "softmax: ragged rows");
        // SAFETY: AVX2 and FMA are present; `x` is whole rows of `cols` values.
        return unsafe { avx2::softmax_columns(x, cols, scale) };
    }
    softmax_columns_portable(x, cols, scale, scratch)
}

/// In place, column-wise like [`softmax_columns`]: `dp` (the gradient of the probabilities `p`)
/// becomes the gradient of the pre-softmax scores times `scale`,
/// `scale · p ⊙ (dp − colsum(dp ⊙ p))`. `scratch` holds at least `cols` floats.
pub fn softmax_columns_backward(p: &[f32], dp: &mut [f32], cols: usize, scale: f32, scratch: &mut [f32]) {
    #[cfg(all(target_arch = "x86_64", not(fuzzing)))]
    if super::tile::available() {
        assert!(p.len() == dp.len() && p.len().is_multiple_of(cols), "softmax backward: ragged rows");
        // SAFETY: AVX-512 is present; both are whole rows of `cols` values, of equal length.
        return unsafe { avx512::softmax_columns_backward(p, dp, cols, scale) };
    }
    #[cfg(all(target_arch = "x86_64", not(fuzzing)))]
    if super::tile_avx2::available() {
        assert!(p.len() == dp.len() && p.len().is_multiple_of(cols), "softmax backward: ragged rows");
        // SAFETY: AVX2 and FMA are present; both are whole rows of `cols` values, of equal length.
        return unsafe { avx2::softmax_columns_backward(p, dp, cols, scale) };
    }
    softmax_columns_backward_portable(p, dp, cols, scale, scratch)
}

/// The softmax with explicit AVX-512 and masked tails, one 16-column strip at a time.
///
/// Written with intrinsics because the compiler's vectorisation of the portable version runs
/// 49-wide rows (the mnist-dits sequence) almost entirely in its scalar remainder loop: its
/// vector loop wants 64 elements per iteration (README, "Speed", has the profile that showed
/// it); a masked last register costs one vector.
#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
mod avx512 {
    use std::arch::x86_64::*;

    /// [`super::pow2`] on 16 lanes, with fused multiply-adds, so its results can differ from
    /// the portable version's in the last bit. NaN stays NaN through the clamp (`vmaxps`
    /// returns its second operand when either is NaN).
    #[target_feature(enable = "avx512f")]
    fn pow2(y: __m512) -> __m512 {
        let c = _mm512_set1_ps;
        let y = _mm512_max_ps(c(super::POW2_MIN), y);
        let t = _mm512_add_ps(y, c(12_582_912.0));
        let f = _mm512_sub_ps(y, _mm512_sub_ps(t, c(12_582_912.0)));
        let mut p = c(super::POW2[5]);
        for &k in super::POW2[..5].iter().rev() {
            p = _mm512_fmadd_ps(f, p, c(k));
        }
        let bits = _mm512_add_epi32(
            _mm512_slli_epi32::<23>(_mm512_castps_si512(t)),
            _mm512_set1_epi32(super::POW2_BIAS as i32),
        );
        _mm512_mul_ps(p, _mm512_castsi512_ps(bits))
    }

    /// Lanes `< n` of a 16-lane strip.
    pub(super) fn mask(n: usize) -> __mmask16 {
        if n >= 16 { 0xffff } else { (1u16 << n) - 1 }
    }

    /// Whole strips taken together by [`softmax_columns`]: four chains of maxima and of sums in
    /// flight where one strip's would each wait on their own latency. Each column still sums its
    /// rows in order, so the values are those of one strip at a time (a test).
    const GROUP: usize = 4;

    /// # Safety
    /// AVX-512F must be present; `x.len()` must be a multiple of `cols`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn softmax_columns(x: &mut [f32], cols: usize, scale: f32) {
        let rows = x.len() / cols;
        let base = x.as_mut_ptr();
        let whole = cols / 16;
        let mut strip = 0;
        while strip + GROUP <= whole {
            // SAFETY: GROUP whole strips of every row, inside `x`.
            unsafe { strips::<GROUP>(base.add(16 * strip), rows, cols, 0xffff, scale) };
            strip += GROUP;
        }
        while strip < whole {
            // SAFETY: a whole strip of every row, inside `x`.
            unsafe { strips::<1>(base.add(16 * strip), rows, cols, 0xffff, scale) };
            strip += 1;
        }
        if !cols.is_multiple_of(16) {
            // SAFETY: the last strip's lanes, masked to the row's end.
            unsafe { strips::<1>(base.add(16 * whole), rows, cols, mask(cols % 16), scale) };
        }
    }

    /// `G` adjacent 16-column strips of [`softmax_columns`] from `base` (rows `cols` apart),
    /// each through the lane mask `m`.
    ///
    /// # Safety
    /// `base` covers `rows` rows of `G` strips' lanes under `m`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn strips<const G: usize>(base: *mut f32, rows: usize, cols: usize, m: __mmask16, scale: f32) {
        // SAFETY (every access below): row r < rows, strip g < G, lanes under `m`.
        let at = |r: usize, g: usize| unsafe { base.add(r * cols + 16 * g) };
        let mut max = [_mm512_set1_ps(f32::NEG_INFINITY); G];
        for r in 0..rows {
            for (g, max) in max.iter_mut().enumerate() {
                *max = _mm512_max_ps(*max, unsafe { _mm512_maskz_loadu_ps(m, at(r, g)) });
            }
        }
        // y = (v − max)·scale·log2 e as one multiply-add; the rounding of max·scale·log2 e
        // is the same for the whole column, so the normalisation cancels it.
        let scale = _mm512_set1_ps(scale * std::f32::consts::LOG2_E);
        let offset = max.map(|max| _mm512_mul_ps(max, scale));
        let mut sum = [_mm512_setzero_ps(); G];
        for r in 0..rows {
            for (g, sum) in sum.iter_mut().enumerate() {
                let v = unsafe { _mm512_maskz_loadu_ps(m, at(r, g)) };
                let e = pow2(_mm512_fmsub_ps(v, scale, offset[g]));
                *sum = _mm512_add_ps(*sum, e);
                unsafe { _mm512_mask_storeu_ps(at(r, g), m, e) };
            }
        }
        let inv = sum.map(|sum| _mm512_div_ps(_mm512_set1_ps(1.0), sum));
        for r in 0..rows {
            for (g, &inv) in inv.iter().enumerate() {
                let v = unsafe { _mm512_maskz_loadu_ps(m, at(r, g)) };
                unsafe { _mm512_mask_storeu_ps(at(r, g), m, _mm512_mul_ps(v, inv)) };
            }
        }
    }

    /// # Safety
    /// AVX-512F must be present; `p` and `dp` must have the same length, a multiple of `cols`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn softmax_columns_backward(p: &[f32], dp: &mut [f32], cols: usize, scale: f32) {
        let rows = p.len() / cols;
        let (p, dp) = (p.as_ptr(), dp.as_mut_ptr());
        for c0 in (0..cols).step_by(16) {
            let m = mask(cols - c0);
            // SAFETY (every access below): row r < rows, lanes c0.. masked to the row's end.
            let (p_at, dp_at) = unsafe { (|r: usize| p.add(r * cols + c0), |r: usize| dp.add(r * cols + c0)) };
            let mut dot = _mm512_setzero_ps();
            for r in 0..rows {
                let (a, b) = unsafe { (_mm512_maskz_loadu_ps(m, p_at(r)), _mm512_maskz_loadu_ps(m, dp_at(r))) };
                dot = _mm512_add_ps(dot, _mm512_mul_ps(a, b));
            }
            let scale = _mm512_set1_ps(scale);
            for r in 0..rows {
                let (a, b) = unsafe { (_mm512_maskz_loadu_ps(m, p_at(r)), _mm512_maskz_loadu_ps(m, dp_at(r))) };
                let g = _mm512_mul_ps(_mm512_mul_ps(scale, a), _mm512_sub_ps(b, dot));
                unsafe { _mm512_mask_storeu_ps(dp_at(r), m, g) };
            }
        }
    }
}

/// The AVX-512 softmax for AVX2 + FMA: 8-column strips, the last one through a lane mask
/// (`vmaskmovps`), the same power of two.
#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
mod avx2 {
    use std::arch::x86_64::*;

    use crate::kernels::tile_avx2::Lanes;

    /// [`super::pow2`] on 8 lanes, as `avx512::pow2`.
    #[target_feature(enable = "avx2,fma")]
    fn pow2(y: __m256) -> __m256 {
        let c = _mm256_set1_ps;
        let y = _mm256_max_ps(c(super::POW2_MIN), y);
        let t = _mm256_add_ps(y, c(12_582_912.0));
        let f = _mm256_sub_ps(y, _mm256_sub_ps(t, c(12_582_912.0)));
        let mut p = c(super::POW2[5]);
        for &k in super::POW2[..5].iter().rev() {
            p = _mm256_fmadd_ps(f, p, c(k));
        }
        let bits = _mm256_add_epi32(
            _mm256_slli_epi32::<23>(_mm256_castps_si256(t)),
            _mm256_set1_epi32(super::POW2_BIAS as i32),
        );
        _mm256_mul_ps(p, _mm256_castsi256_ps(bits))
    }

    /// # Safety
    /// AVX2 and FMA must be present; `x.len()` must be a multiple of `cols`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn softmax_columns(x: &mut [f32], cols: usize, scale: f32) {
        let rows = x.len() / cols;
        let base = x.as_mut_ptr();
        let whole = cols / 8;
        let all = Lanes::new(8);
        let mut strip = 0;
        while strip + GROUP <= whole {
            // SAFETY: GROUP whole strips of every row, inside `x`.
            unsafe { strips::<GROUP, true>(base.add(8 * strip), rows, cols, all, scale) };
            strip += GROUP;
        }
        while strip < whole {
            // SAFETY: a whole strip of every row, inside `x`.
            unsafe { strips::<1, true>(base.add(8 * strip), rows, cols, all, scale) };
            strip += 1;
        }
        if !cols.is_multiple_of(8) {
            // SAFETY: the last strip's lanes, masked to the row's end.
            unsafe { strips::<1, false>(base.add(8 * whole), rows, cols, Lanes::new(cols % 8), scale) };
        }
    }

    /// Whole strips taken together, as in the AVX-512 version.
    const GROUP: usize = 4;

    /// `G` adjacent 8-column strips of [`softmax_columns`] from `base` (rows `cols` apart),
    /// each through `lanes`.
    ///
    /// # Safety
    /// `base` covers `rows` rows of `G` strips' lanes; `FULL` is `lanes.full`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn strips<const G: usize, const FULL: bool>(
        base: *mut f32,
        rows: usize,
        cols: usize,
        lanes: Lanes,
        scale: f32,
    ) {
        // SAFETY (every access below): row r < rows, strip g < G, lanes as the caller promises.
        let at = |r: usize, g: usize| unsafe { base.add(r * cols + 8 * g) };
        let mut max = [_mm256_set1_ps(f32::NEG_INFINITY); G];
        for r in 0..rows {
            for (g, max) in max.iter_mut().enumerate() {
                *max = _mm256_max_ps(*max, unsafe { lanes.load::<FULL>(at(r, g)) });
            }
        }
        // As the AVX-512 version: one multiply-add per value before the power.
        let scale = _mm256_set1_ps(scale * std::f32::consts::LOG2_E);
        let offset = max.map(|max| _mm256_mul_ps(max, scale));
        let mut sum = [_mm256_setzero_ps(); G];
        for r in 0..rows {
            for (g, sum) in sum.iter_mut().enumerate() {
                let v = unsafe { lanes.load::<FULL>(at(r, g)) };
                let e = pow2(_mm256_fmsub_ps(v, scale, offset[g]));
                *sum = _mm256_add_ps(*sum, e);
                unsafe { lanes.store::<FULL>(at(r, g), e) };
            }
        }
        let inv = sum.map(|sum| _mm256_div_ps(_mm256_set1_ps(1.0), sum));
        for r in 0..rows {
            for (g, &inv) in inv.iter().enumerate() {
                let v = unsafe { lanes.load::<FULL>(at(r, g)) };
                unsafe { lanes.store::<FULL>(at(r, g), _mm256_mul_ps(v, inv)) };
            }
        }
    }

    /// # Safety
    /// AVX2 and FMA must be present; `p` and `dp` must have the same length, a multiple of `cols`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn softmax_columns_backward(p: &[f32], dp: &mut [f32], cols: usize, scale: f32) {
        let rows = p.len() / cols;
        for c0 in (0..cols).step_by(8) {
            // SAFETY: the strip's lanes c0.. of every row are inside both (masked to the row's end).
            unsafe {
                let (p, dp) = (p.as_ptr().add(c0), dp.as_mut_ptr().add(c0));
                let lanes = Lanes::new(cols - c0);
                if lanes.full {
                    backward_strip::<true>(p, dp, rows, cols, lanes, scale)
                } else {
                    backward_strip::<false>(p, dp, rows, cols, lanes, scale)
                }
            }
        }
    }

    /// One 8-column strip of [`softmax_columns_backward`].
    ///
    /// # Safety
    /// `p` and `dp` cover `rows` rows of `lanes`; `FULL` is `lanes.full`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn backward_strip<const FULL: bool>(
        p: *const f32,
        dp: *mut f32,
        rows: usize,
        cols: usize,
        lanes: Lanes,
        scale: f32,
    ) {
        // SAFETY (every access below): row r < rows, lanes masked as the caller promises.
        let (p_at, dp_at) = unsafe { (|r: usize| p.add(r * cols), |r: usize| dp.add(r * cols)) };
        let mut dot = _mm256_setzero_ps();
        for r in 0..rows {
            let (a, b) = unsafe { (lanes.load::<FULL>(p_at(r)), lanes.load::<FULL>(dp_at(r))) };
            dot = _mm256_add_ps(dot, _mm256_mul_ps(a, b));
        }
        let scale = _mm256_set1_ps(scale);
        for r in 0..rows {
            let (a, b) = unsafe { (lanes.load::<FULL>(p_at(r)), lanes.load::<FULL>(dp_at(r))) };
            let g = _mm256_mul_ps(_mm256_mul_ps(scale, a), _mm256_sub_ps(b, dot));
            unsafe { lanes.store::<FULL>(dp_at(r), g) };
        }
    }
}

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
    fn pow2_matches_libm_over_the_softmax_range() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let y = -125.0 + 125.5 * i as f32 / 200_000.0;
            let want = (y as f64).exp2();
            worst = worst.max(((pow2(y) as f64 - want) / want).abs());
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(pow2(-1000.0), pow2(POW2_MIN), "the clamp");
        assert!(pow2(f32::NAN).is_nan());
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

    type Forward = fn(&mut [f32], usize, f32, &mut [f32]);
    type Backward = fn(&[f32], &mut [f32], usize, f32, &mut [f32]);

    /// The vector versions this CPU runs: the dispatched one, and the AVX2 one where AVX-512
    /// would otherwise hide it.
    fn vector_versions() -> Vec<(&'static str, Forward, Backward)> {
        #[cfg_attr(not(all(target_arch = "x86_64", not(fuzzing))), allow(unused_mut))]
        let mut versions: Vec<(&'static str, Forward, Backward)> =
            vec![("dispatched", softmax_columns, softmax_columns_backward)];
        #[cfg(all(target_arch = "x86_64", not(fuzzing)))]
        if crate::kernels::tile_avx2::available() {
            // SAFETY (both): AVX2 and FMA are present (checked); the tests pass whole rows.
            let fwd: Forward = |x, cols, scale, _| unsafe { avx2::softmax_columns(x, cols, scale) };
            let bwd: Backward = |p, dp, cols, scale, _| unsafe { avx2::softmax_columns_backward(p, dp, cols, scale) };
            versions.push(("AVX2", fwd, bwd));
        }
        versions
    }

    /// The vector versions agree with the portable versions to float rounding (widths with and
    /// without a masked last strip, very negative scores), and all propagate a NaN.
    #[test]
    fn vector_and_portable_versions_agree() {
        for (name, forward, backward) in vector_versions() {
            for &(rows, cols) in &[(49, 49), (7, 16), (3, 33), (196, 196), (5, 1), (4, 8), (2, 12)] {
                let (mut x, _) = sample(rows, cols);
                x[rows * cols / 2] = -500.0;
                let mut nan = x.clone();
                nan[0] = f32::NAN; // poisons column 0 only
                for input in [x, nan] {
                    let (mut fast, mut portable) = (input.clone(), input.clone());
                    forward(&mut fast, cols, 0.37, &mut vec![0.0; 2 * cols]);
                    softmax_columns_portable(&mut portable, cols, 0.37, &mut vec![0.0; 2 * cols]);
                    let close = |a: &[f32], b: &[f32]| {
                        a.iter()
                            .zip(b)
                            .all(|(x, y)| (x.is_nan() && y.is_nan()) || (x - y).abs() <= 1e-6 * (1.0 + y.abs()))
                    };
                    assert!(close(&fast, &portable), "{name} forward {rows}×{cols}");
                    let upstream: Vec<f32> = (0..rows * cols).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.2).collect();
                    let (mut g_fast, mut g_portable) = (upstream.clone(), upstream);
                    backward(&portable, &mut g_fast, cols, 0.37, &mut vec![0.0; cols]);
                    softmax_columns_backward_portable(&portable, &mut g_portable, cols, 0.37, &mut vec![0.0; cols]);
                    assert!(close(&g_fast, &g_portable), "{name} backward {rows}×{cols}");
                }
            }
        }
    }

    /// The vector softmax takes whole strips several at a time; each column must still come
    /// out as its strip alone gives it, bit for bit (a NaN column as NaN: the compiler may
    /// commute an addition's operands, which changes which NaN comes out), at widths with a
    /// masked last strip and with whole strips left over after the groups.
    #[cfg(all(target_arch = "x86_64", not(fuzzing)))]
    #[test]
    fn grouped_strips_equal_one_strip_at_a_time() {
        let bits = |v: &[f32]| v.iter().map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() }).collect::<Vec<_>>();
        for &(rows, cols) in &[(49, 196), (7, 133), (3, 40), (5, 64), (2, 8)] {
            let (mut x, _) = sample(rows, cols);
            x[cols + 3] = f32::NAN;
            x[rows * cols / 2] = -500.0;
            if crate::kernels::tile::available() {
                let mut grouped = x.clone();
                let mut alone = x.clone();
                // SAFETY: AVX-512 is present; whole rows, and each strip inside them (masked).
                unsafe {
                    avx512::softmax_columns(&mut grouped, cols, 0.37);
                    for c0 in (0..cols).step_by(16) {
                        let m = avx512::mask(cols - c0);
                        avx512::strips::<1>(alone.as_mut_ptr().add(c0), rows, cols, m, 0.37);
                    }
                }
                assert_eq!(bits(&grouped), bits(&alone), "AVX-512 {rows}×{cols}");
            }
            if crate::kernels::tile_avx2::available() {
                use crate::kernels::tile_avx2::Lanes;
                let mut grouped = x.clone();
                let mut alone = x.clone();
                // SAFETY: AVX2 and FMA are present; whole rows, and each strip inside them.
                unsafe {
                    avx2::softmax_columns(&mut grouped, cols, 0.37);
                    for c0 in (0..cols).step_by(8) {
                        let (lanes, strip) = (Lanes::new(cols - c0), alone.as_mut_ptr().add(c0));
                        if lanes.full {
                            avx2::strips::<1, true>(strip, rows, cols, lanes, 0.37);
                        } else {
                            avx2::strips::<1, false>(strip, rows, cols, lanes, 0.37);
                        }
                    }
                }
                assert_eq!(bits(&grouped), bits(&alone), "AVX2 {rows}×{cols}");
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
