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
    for ((xr, hr), st) in x.chunks_exact(w).zip(h.chunks_exact_mut(w)).zip(stats.chunks_exact_mut(2)) {
        let (mean, rstd) = row_stats(xr, epsilon);
        st[0] = MaybeUninit::new(mean);
        st[1] = MaybeUninit::new(rstd);
        for (((h, &x), &a), &c) in hr.iter_mut().zip(xr).zip(a.iter()).zip(c.iter()) {
            *h = MaybeUninit::new((x - mean) * rstd * a + c);
        }
    }
}

multiversion!(forward_image(x: &[f32], h: &mut [MaybeUninit<f32>], stats: &mut [MaybeUninit<f32>], weight: &[f32], bias: &[f32], shift: &[f32], scale: &[f32], epsilon: f32, a: &mut [f32], c: &mut [f32]) => forward_image_impl);

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
