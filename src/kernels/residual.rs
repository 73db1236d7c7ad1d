//! The gated residual of adaLN blocks, `out = x + gate·y` with a per-image `gate`, forward and
//! backward in one pass each.
//!
//! Composed, the broadcast multiply and the add are two passes forward, and the backward of the
//! broadcast multiply materialises `grad·y` before reducing it over the tokens. Here the
//! gradient of `x` is the incoming gradient itself (no copy), and `dy`, `dgate` come out of one
//! pass.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::buffer::uninit_filled;

/// Sizes: `batch` images of `seq` tokens of `width` features.
pub use super::norm::NormDims as ResidualDims;

#[inline(always)]
fn forward_image_impl(x: &[f32], gate: &[f32], y: &[f32], out: &mut [MaybeUninit<f32>]) {
    let w = gate.len();
    for ((xr, yr), or) in x.chunks_exact(w).zip(y.chunks_exact(w)).zip(out.chunks_exact_mut(w)) {
        for (((o, &x), &g), &y) in or.iter_mut().zip(xr).zip(gate).zip(yr) {
            *o = MaybeUninit::new(x + g * y);
        }
    }
}

multiversion!(pub(super) forward_image(x: &[f32], gate: &[f32], y: &[f32], out: &mut [MaybeUninit<f32>]) => forward_image_impl);

/// `x + gate·y`: `x`, `y` `[B, S, W]`, `gate` `[B, W]`.
pub fn forward(x: &[f32], gate: &[f32], y: &[f32], d: ResidualDims) -> Vec<f32> {
    let ResidualDims { batch, seq, width: w } = d;
    assert!(x.len() == batch * seq * w && y.len() == x.len(), "gated residual: x and y must be [{batch}, {seq}, {w}]");
    assert_eq!(gate.len(), batch * w, "gated residual: gate must be [{batch}, {w}]");
    // SAFETY: `forward_image` writes every element of each image's rows.
    unsafe {
        uninit_filled(x.len(), |out| {
            out.par_chunks_mut(seq * w).enumerate().for_each(|(bi, o)| {
                let rows = bi * seq * w..(bi + 1) * seq * w;
                forward_image(&x[rows.clone()], &gate[bi * w..(bi + 1) * w], &y[rows], o);
            })
        })
    }
}

#[inline(always)]
fn backward_image_impl(grad: &[f32], gate: &[f32], y: &[f32], dy: &mut [MaybeUninit<f32>], dgate: &mut [f32]) {
    let w = gate.len();
    dgate.fill(0.0);
    let dgate = &mut dgate[..w];
    for ((gr, yr), dyr) in grad.chunks_exact(w).zip(y.chunks_exact(w)).zip(dy.chunks_exact_mut(w)) {
        let (gr, yr, dyr) = (&gr[..w], &yr[..w], &mut dyr[..w]);
        for j in 0..w {
            dyr[j] = MaybeUninit::new(gr[j] * gate[j]);
            dgate[j] += gr[j] * yr[j];
        }
    }
}

multiversion!(backward_image(grad: &[f32], gate: &[f32], y: &[f32], dy: &mut [MaybeUninit<f32>], dgate: &mut [f32]) => backward_image_impl);

/// Gradients of `y` and `gate` (that of `x` is `grad` itself).
pub fn backward(grad: &[f32], gate: &[f32], y: &[f32], d: ResidualDims) -> (Vec<f32>, Vec<f32>) {
    let ResidualDims { batch, seq, width: w } = d;
    assert_eq!(grad.len(), batch * seq * w, "gated residual backward: gradient has the wrong length");
    let mut dgate = vec![0.0f32; batch * w];
    // SAFETY: `backward_image` writes every element of each image's rows of dy.
    let dy = unsafe {
        uninit_filled(grad.len(), |dy| {
            dy.par_chunks_mut(seq * w).zip(dgate.par_chunks_mut(w)).enumerate().for_each(|(bi, (dy, dg))| {
                let rows = bi * seq * w..(bi + 1) * seq * w;
                backward_image(&grad[rows.clone()], &gate[bi * w..(bi + 1) * w], &y[rows], dy, dg);
            })
        })
    };
    (dy, dgate)
}
