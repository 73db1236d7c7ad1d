//! adaLN: a LayerNorm whose output is modulated per image, `h = LN(x)·(1 + scale) + shift`,
//! forward and backward in one pass over the tokens each.
//!
//! Composed from burn operations this is a mean, a subtraction, a variance, a square root, a
//! division, the affine weight and bias, then the modulation's multiply and add: ten passes
//! over `[B, S, W]` forward, more than twenty backward, each writing a fresh tensor. Here one
//! read of `x` gives `h`, and the backward reads `x` and `dh` once to produce every gradient.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::buffer::uninit_filled;

use super::simd::{dot, fold_lanes, lanes};

/// Sizes: `batch` images of `seq` tokens of `width` features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormDims {
    pub batch: usize,
    pub seq: usize,
    pub width: usize,
}

/// The LayerNorm's own parameters and the per-image modulation.
#[derive(Debug, Clone, Copy)]
pub struct NormParams<'a> {
    /// LayerNorm weight and bias, `[W]` each.
    pub weight: &'a [f32],
    pub bias: &'a [f32],
    /// Modulation, `[B, W]` each.
    pub shift: &'a [f32],
    pub scale: &'a [f32],
    pub epsilon: f32,
}

/// Gradients of everything [`forward`] read.
#[derive(Debug, Clone)]
pub struct NormGrads {
    pub x: Vec<f32>,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub shift: Vec<f32>,
    pub scale: Vec<f32>,
}

/// Mean and 1/σ of one row.
#[inline(always)]
fn row_stats(row: &[f32], epsilon: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = lanes(row, 0.0, |a, b| a + b) / n;
    let var = fold_lanes(row, 0.0, |v| (v - mean) * (v - mean), |a, b| a + b) / n;
    (mean, 1.0 / (var + epsilon).sqrt())
}

/// [`row_stats`] with AVX2 for rows of whole 16-value chunks: the same sums in the same order
/// (16 lanes as two 8-lane registers, then the same tree), so the same bits; but the lanes stay
/// in registers, where the portable code, compiled for any width, split them into scalars for
/// the tree (a 64-wide row's statistics took most of the LayerNorm's time).
///
/// # Safety
/// AVX2 must be present; `row.len()` must be a multiple of 16.
#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
#[target_feature(enable = "avx2")]
unsafe fn row_stats_avx2(row: &[f32], epsilon: f32) -> (f32, f32) {
    use std::arch::x86_64::*;
    /// `lanes`' tree: `a8[i] = acc[i] + acc[i+8]`, `a4[i] = a8[i] + a8[i+4]`, then
    /// `(a4[0] + a4[2]) + (a4[1] + a4[3])`.
    #[target_feature(enable = "avx2")]
    fn tree(low: __m256, high: __m256) -> f32 {
        let a8 = _mm256_add_ps(low, high);
        let a4 = _mm_add_ps(_mm256_castps256_ps128(a8), _mm256_extractf128_ps::<1>(a8));
        let a2 = _mm_add_ps(a4, _mm_movehl_ps(a4, a4));
        _mm_cvtss_f32(_mm_add_ss(a2, _mm_movehdup_ps(a2)))
    }
    debug_assert!(row.len().is_multiple_of(16));
    let n = row.len() as f32;
    // SAFETY: every load is inside `row` (whole chunks of 16).
    let load = |i: usize| unsafe { _mm256_loadu_ps(row.as_ptr().add(i)) };
    let (mut low, mut high) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for i in (0..row.len()).step_by(16) {
        low = _mm256_add_ps(low, load(i));
        high = _mm256_add_ps(high, load(i + 8));
    }
    let mean = tree(low, high) / n;
    let m = _mm256_set1_ps(mean);
    let squared = |i: usize| {
        let d = _mm256_sub_ps(load(i), m);
        _mm256_mul_ps(d, d)
    };
    let (mut low, mut high) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for i in (0..row.len()).step_by(16) {
        low = _mm256_add_ps(low, squared(i));
        high = _mm256_add_ps(high, squared(i + 8));
    }
    let var = tree(low, high) / n;
    (mean, 1.0 / (var + epsilon).sqrt())
}

/// [`row_stats`], on AVX2 where the row is whole chunks of 16 (the same results).
#[inline(always)]
fn row_stats_fast(row: &[f32], epsilon: f32, avx2: bool) -> (f32, f32) {
    #[cfg(all(target_arch = "x86_64", not(fuzzing)))]
    if avx2 {
        // SAFETY: the caller checked AVX2 ([`super::isa::active`]) and the row's length.
        return unsafe { row_stats_avx2(row, epsilon) };
    }
    let _ = avx2;
    row_stats(row, epsilon)
}

/// One image: `h = (x − μ)·rstd·a + c` with `a = w·(1+scale)`, `c = b·(1+scale) + shift`
/// folded per image. `stats` gets (μ, rstd) per token.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_image_impl(
    x: &[f32],
    h: &mut [MaybeUninit<f32>],
    stats: &mut [MaybeUninit<f32>],
    weight: &[f32],
    bias: &[f32],
    shift: &[f32],
    scale: &[f32],
    epsilon: f32,
    a: &mut [f32],
    c: &mut [f32],
) {
    let w = weight.len();
    let (a, c, bias, shift, scale) = (&mut a[..w], &mut c[..w], &bias[..w], &shift[..w], &scale[..w]);
    for j in 0..w {
        a[j] = weight[j] * (1.0 + scale[j]);
        c[j] = bias[j] * (1.0 + scale[j]) + shift[j];
    }
    // Every row's statistics first, then every row's output: a row's statistics are a chain
    // of dependent reductions, and with nothing else in the loop the core overlaps several
    // rows' chains (one row at a time, the output's stores waited on them).
    let avx2 = w.is_multiple_of(16) && super::isa::active() >= super::isa::Isa::Avx2;
    for (xr, st) in x.chunks_exact(w).zip(stats.chunks_exact_mut(2)) {
        let (mean, rstd) = row_stats_fast(xr, epsilon, avx2);
        st[0] = MaybeUninit::new(mean);
        st[1] = MaybeUninit::new(rstd);
    }
    for ((xr, hr), st) in x.chunks_exact(w).zip(h.chunks_exact_mut(w)).zip(stats.chunks_exact(2)) {
        // SAFETY: the loop above wrote both statistics of every row.
        let (mean, rstd) = unsafe { (st[0].assume_init(), st[1].assume_init()) };
        for (((h, &x), &a), &c) in hr.iter_mut().zip(xr).zip(a.iter()).zip(c.iter()) {
            *h = MaybeUninit::new((x - mean) * rstd * a + c);
        }
    }
}

multiversion!(pub(super) forward_image(x: &[f32], h: &mut [MaybeUninit<f32>], stats: &mut [MaybeUninit<f32>], weight: &[f32], bias: &[f32], shift: &[f32], scale: &[f32], epsilon: f32, a: &mut [f32], c: &mut [f32]) => forward_image_impl);

/// Forward pass: `h` `[B, S, W]` and the per-token (μ, rstd) `[B, S, 2]` the backward reuses.
pub fn forward(x: &[f32], p: NormParams, d: NormDims) -> (Vec<f32>, Vec<f32>) {
    let NormDims { batch, seq, width: w } = d;
    assert_eq!(x.len(), batch * seq * w, "modulated layer norm: x has the wrong length");
    assert!(p.weight.len() == w && p.bias.len() == w, "modulated layer norm: weight/bias must have {w} elements");
    assert!(
        p.shift.len() == batch * w && p.scale.len() == batch * w,
        "modulated layer norm: shift/scale must be [{batch}, {w}]"
    );
    let mut stats = Vec::new();
    // SAFETY: `forward_image` writes every token's row of `h` and its two statistics.
    let h = unsafe {
        uninit_filled(x.len(), |h| {
            stats = uninit_filled(batch * seq * 2, |stats| {
                h.par_chunks_mut(seq * w).zip(stats.par_chunks_mut(seq * 2)).enumerate().for_each_init(
                    || (vec![0.0f32; w], vec![0.0f32; w]),
                    |(a, c), (bi, (h, st))| {
                        let x = &x[bi * seq * w..(bi + 1) * seq * w];
                        let (shift, scale) = (&p.shift[bi * w..(bi + 1) * w], &p.scale[bi * w..(bi + 1) * w]);
                        forward_image(x, h, st, p.weight, p.bias, shift, scale, p.epsilon, a, c);
                    },
                );
            })
        })
    };
    (h, stats)
}

/// One image's backward. Writes `dx`; accumulates this image's `dshift`, `dscale` and its share
/// of `dweight`, `dbias` (summed over images later, in a fixed order).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_image_impl(
    x: &[f32],
    dh: &[f32],
    stats: &[f32],
    weight: &[f32],
    bias: &[f32],
    scale: &[f32],
    dx: &mut [MaybeUninit<f32>],
    partial: &mut [f32],
    dxhat: &mut [f32],
    xhat: &mut [f32],
) {
    let w = weight.len();
    partial.fill(0.0);
    let (dshift, rest) = partial.split_at_mut(w);
    let (dscale, rest) = rest.split_at_mut(w);
    let (dweight, dbias) = rest.split_at_mut(w);
    // Slices of exactly `w` elements: with the bounds known, the loops below vectorise.
    let (dshift, dscale, dweight, dbias) = (&mut dshift[..w], &mut dscale[..w], &mut dweight[..w], &mut dbias[..w]);
    let (dxhat, xhat, bias, scale) = (&mut dxhat[..w], &mut xhat[..w], &bias[..w], &scale[..w]);
    for (((xr, gr), st), dxr) in
        x.chunks_exact(w).zip(dh.chunks_exact(w)).zip(stats.chunks_exact(2)).zip(dx.chunks_exact_mut(w))
    {
        let (mean, rstd) = (st[0], st[1]);
        let (xr, gr, dxr) = (&xr[..w], &gr[..w], &mut dxr[..w]);
        for j in 0..w {
            xhat[j] = (xr[j] - mean) * rstd;
            let y = xhat[j] * weight[j] + bias[j];
            dshift[j] += gr[j];
            dscale[j] += gr[j] * y;
            let dy = gr[j] * (1.0 + scale[j]);
            dweight[j] += dy * xhat[j];
            dbias[j] += dy;
            dxhat[j] = dy * weight[j];
        }
        let m1 = lanes(dxhat, 0.0, |a, b| a + b) / w as f32;
        let m2 = dot(dxhat, xhat) / w as f32;
        for j in 0..w {
            dxr[j] = MaybeUninit::new(rstd * (dxhat[j] - m1 - xhat[j] * m2));
        }
    }
}

multiversion!(backward_image(x: &[f32], dh: &[f32], stats: &[f32], weight: &[f32], bias: &[f32], scale: &[f32], dx: &mut [MaybeUninit<f32>], partial: &mut [f32], dxhat: &mut [f32], xhat: &mut [f32]) => backward_image_impl);

/// Backward pass from `dh` and the forward's `stats`.
pub fn backward(x: &[f32], dh: &[f32], stats: &[f32], p: NormParams, d: NormDims) -> NormGrads {
    let NormDims { batch, width: w, .. } = d;
    assert_eq!(dh.len(), x.len(), "modulated layer norm backward: gradient has the wrong length");
    // Per image: dshift, dscale, dweight share, dbias share.
    let mut partial = vec![0.0f32; batch * 4 * w];
    // SAFETY: `backward_image` writes every token's row of dx.
    let dx = unsafe { uninit_filled(x.len(), |dx| backward_images(dx, &mut partial, x, dh, stats, p, d)) };
    let (mut shift, mut scale) = (Vec::with_capacity(batch * w), Vec::with_capacity(batch * w));
    let (mut weight, mut bias) = (vec![0.0f32; w], vec![0.0f32; w]);
    for part in partial.chunks_exact(4 * w) {
        shift.extend_from_slice(&part[..w]);
        scale.extend_from_slice(&part[w..2 * w]);
        weight.iter_mut().zip(&part[2 * w..3 * w]).for_each(|(a, b)| *a += b);
        bias.iter_mut().zip(&part[3 * w..]).for_each(|(a, b)| *a += b);
    }
    NormGrads { x: dx, weight, bias, shift, scale }
}

fn backward_images(
    dx: &mut [MaybeUninit<f32>],
    partial: &mut [f32],
    x: &[f32],
    dh: &[f32],
    stats: &[f32],
    p: NormParams,
    d: NormDims,
) {
    let NormDims { seq, width: w, .. } = d;
    dx.par_chunks_mut(seq * w).zip(partial.par_chunks_mut(4 * w)).enumerate().for_each_init(
        || (vec![0.0f32; w], vec![0.0f32; w]),
        |(dxhat, xhat), (bi, (dx, part))| {
            let rows = bi * seq * w..(bi + 1) * seq * w;
            let scale = &p.scale[bi * w..(bi + 1) * w];
            let st = &stats[bi * seq * 2..(bi + 1) * seq * 2];
            backward_image(&x[rows.clone()], &dh[rows], st, p.weight, p.bias, scale, dx, part, dxhat, xhat);
        },
    );
}

#[cfg(all(test, target_arch = "x86_64", not(fuzzing)))]
mod tests {
    use super::*;

    /// The AVX2 statistics are the portable ones bit for bit (rows of 16, 64 and 256 values,
    /// large offsets included, where a different order of the sums would show).
    #[test]
    fn avx2_row_stats_equal_the_portable_ones() {
        if super::super::isa::active() < super::super::isa::Isa::Avx2 {
            eprintln!("no AVX2: the portable statistics are the only ones here");
            return;
        }
        let mut rng = crate::rng::stream(13, crate::rng::Purpose::Bench, 0);
        for width in [16, 64, 256] {
            for offset in [0.0f32, 1e3, -3e4] {
                let row: Vec<f32> =
                    crate::rng::standard_normal(&mut rng, width).into_iter().map(|v| v * 7.0 + offset).collect();
                let want = row_stats(&row, 1e-5);
                // SAFETY: AVX2 is active (checked above); the row is whole chunks of 16.
                let got = unsafe { row_stats_avx2(&row, 1e-5) };
                assert_eq!(
                    (got.0.to_bits(), got.1.to_bits()),
                    (want.0.to_bits(), want.1.to_bits()),
                    "{width} at {offset}"
                );
            }
        }
    }
}
