//! Multi-head self-attention over short sequences (a DiT's 49–196 tokens), forward and
//! backward, on the CPU.
//!
//! Input is the packed projection `qkv` `[B, S, 3·H·D]` exactly as the Linear layer wrote it
//! (queries, keys, values side by side; head `h` at columns `h·D..`). Each (image, head) is two
//! small strided GEMMs around a softmax, so no head is ever permuted or copied into a
//! `[B, H, S, D]` layout, and the output comes out as `[B, S, H·D]`, ready for the output
//! projection. The composed burn version spent its time in those permute copies, in a scalar
//! `expf`, and in separate scale/softmax passes (see the README's speed section).

use rayon::prelude::*;

use std::mem::MaybeUninit;

use super::buffer::{self, assume_init, uninit_filled};
use super::gemm::{Order, product};
use super::simd::{softmax_columns, softmax_columns_backward};

/// Sizes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnDims {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl AttnDims {
    /// Width of the attention output, `H·D`.
    pub fn inner(&self) -> usize {
        self.heads * self.head_dim
    }
    /// Width of one `qkv` row, `3·H·D`.
    pub fn row(&self) -> usize {
        3 * self.inner()
    }
}

/// Per-head products run single-threaded: the callers parallelise over images instead, which
/// keeps both cores busy at these sizes.
const ONE_THREAD: gemm::Parallelism = gemm::Parallelism::None;

/// Forward pass. Returns the output `[B, S, H·D]` and, when `keep_probs`, the attention
/// probabilities, stored transposed per head (`[B, H, S(key), S(query)]`), which the backward
/// pass needs.
pub fn forward(qkv: &[f32], d: AttnDims, scale: f32, keep_probs: bool) -> (Vec<f32>, Option<Vec<f32>>) {
    let AttnDims { batch, seq: s, heads, head_dim: dh } = d;
    let (hd, row) = (d.inner(), d.row());
    assert_eq!(qkv.len(), batch * s * row, "attention: qkv has the wrong length");
    assert!(s > 0 && dh > 0, "attention: empty sequence or heads");
    let one_image = |bi: usize, o: &mut [MaybeUninit<f32>], p: &mut [MaybeUninit<f32>], scratch: &mut [f32]| {
        let x = qkv[bi * s * row..(bi + 1) * s * row].as_ptr();
        for h in 0..heads {
            // SAFETY (pointer offsets): all within this image's `s·row` block of `qkv`.
            let (q, k, v) = unsafe { (x.add(h * dh), x.add(hd + h * dh), x.add(2 * hd + h * dh)) };
            let pt = &mut p[h * s * s..(h + 1) * s * s];
            // Scores transposed, Sᵀ = K Qᵀ: row j holds key j against every query, so that the
            // softmax over keys runs down the columns (see `softmax_columns`).
            // SAFETY (products here and below): every operand is an s×dh head block inside this
            // image's rows or an s×s buffer of its own, and no destination overlaps an operand.
            unsafe { product(Order::AsIs, s, s, dh, pt.as_mut_ptr().cast(), s, k, (row, 1), q, (1, row), ONE_THREAD) };
            // SAFETY: the GEMM wrote all s·s scores.
            let pt = unsafe { assume_init(pt) };
            softmax_columns(pt, s, scale, scratch);
            // out_h = P V with P = (Pᵀ)ᵀ, written straight into this head's output columns
            // (all heads together write every element of the image's rows).
            unsafe {
                product(
                    Order::Transposed,
                    s,
                    dh,
                    s,
                    o[h * dh..].as_mut_ptr().cast(),
                    hd,
                    pt.as_ptr(),
                    (1, s),
                    v,
                    (row, 1),
                    ONE_THREAD,
                )
            };
        }
    };

    let mut probs = None;
    // SAFETY: every image's rows are written by its heads' output GEMMs, and, when kept, every
    // probability by the score GEMMs.
    let out = unsafe {
        uninit_filled(batch * s * hd, |out| {
            if keep_probs {
                probs = Some(uninit_filled(batch * heads * s * s, |p| {
                    out.par_chunks_mut(s * hd)
                        .zip(p.par_chunks_mut(heads * s * s))
                        .enumerate()
                        .for_each_init(|| vec![0.0f32; 2 * s], |scratch, (bi, (o, p))| one_image(bi, o, p, scratch));
                }));
            } else {
                out.par_chunks_mut(s * hd).enumerate().for_each_init(
                    || (buffer::scratch(heads * s * s), vec![0.0f32; 2 * s]),
                    |(p, scratch), (bi, o)| one_image(bi, o, p, scratch),
                );
            }
        })
    };
    (out, probs)
}

/// Backward pass: the gradient of `qkv` (`[B, S, 3·H·D]`) from that of the output, with the
/// transposed probabilities of [`forward`].
pub fn backward(qkv: &[f32], probs: &[f32], grad_out: &[f32], d: AttnDims, scale: f32) -> Vec<f32> {
    let AttnDims { batch, seq: s, heads, .. } = d;
    let (hd, row) = (d.inner(), d.row());
    assert_eq!(qkv.len(), batch * s * row, "attention backward: qkv has the wrong length");
    assert_eq!(probs.len(), batch * heads * s * s, "attention backward: probs have the wrong length");
    assert_eq!(grad_out.len(), batch * s * hd, "attention backward: gradient has the wrong length");
    // SAFETY: for every image and head the GEMMs below write that head's columns of dQ, dK and
    // dV, which together cover every element.
    unsafe { uninit_filled(batch * s * row, |grad| backward_into(grad, qkv, probs, grad_out, d, scale)) }
}

fn backward_into(grad: &mut [MaybeUninit<f32>], qkv: &[f32], probs: &[f32], grad_out: &[f32], d: AttnDims, scale: f32) {
    let AttnDims { seq: s, heads, head_dim: dh, .. } = d;
    let (hd, row) = (d.inner(), d.row());
    grad.par_chunks_mut(s * row).enumerate().for_each_init(
        || (vec![0.0f32; s * s], vec![0.0f32; s]),
        |(dst, scratch), (bi, g)| {
            let x = qkv[bi * s * row..(bi + 1) * s * row].as_ptr();
            let go = grad_out[bi * s * hd..(bi + 1) * s * hd].as_ptr();
            let g: *mut f32 = g.as_mut_ptr().cast();
            for h in 0..heads {
                let pt = &probs[(bi * heads + h) * s * s..(bi * heads + h + 1) * s * s];
                // SAFETY (pointer offsets): within this image's blocks of `qkv`, `grad_out`, `grad`.
                let (q, k, v, doh) =
                    unsafe { (x.add(h * dh), x.add(hd + h * dh), x.add(2 * hd + h * dh), go.add(h * dh)) };
                let (dq, dk, dv) = unsafe { (g.add(h * dh), g.add(hd + h * dh), g.add(2 * hd + h * dh)) };
                // dV = Pᵀ dO
                // SAFETY (products here and below): operands are s×dh head blocks inside this
                // image's rows or s×s buffers; each destination is a head block of `grad` or the
                // scratch scores, overlapping no operand.
                unsafe { product(Order::Transposed, s, dh, s, dv, row, pt.as_ptr(), (s, 1), doh, (hd, 1), ONE_THREAD) };
                // dPᵀ = V dOᵀ, then the softmax backward (times the scale) in place: dSᵀ.
                unsafe { product(Order::AsIs, s, s, dh, dst.as_mut_ptr(), s, v, (row, 1), doh, (1, hd), ONE_THREAD) };
                softmax_columns_backward(pt, dst, s, scale, scratch);
                // dQ = dS K, dK = dSᵀ Q
                unsafe { product(Order::Transposed, s, dh, s, dq, row, dst.as_ptr(), (1, s), k, (row, 1), ONE_THREAD) };
                unsafe { product(Order::Transposed, s, dh, s, dk, row, dst.as_ptr(), (s, 1), q, (row, 1), ONE_THREAD) };
            }
        },
    );
}
