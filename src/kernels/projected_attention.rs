//! Folded attention with its projection inside, for sampling on AVX2: image by image,
//! `qv = h·weight + bias` goes into a buffer of this thread, consumed while it is still in L2,
//! instead of a `[B, S, 2·H·W]` tensor that a chunk of images writes out to L3 and reads back.
//!
//! The projection writes each head's folded queries and folded values as a block of their own
//! ([`Panels::product_in_groups`]): the values are then read in place, where the two-step path
//! gathers each head's rows out of the wide `qv` rows first. The rest is
//! [`attention::folded_forward`]'s computation, in its order: the results are the same bit for
//! bit as [`linear::forward`] followed by it (on the engine both use).

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::attention::{Engine, FoldedDims};
use super::buffer::{assume_init, scratch, uninit_filled};
use super::panels_avx2::Panels;
use super::simd::softmax_columns;
use super::tile::Strided;
use super::transpose::transpose;

/// `Σₕ softmax(scale · Q'ₕ Kᵀ) V'ₕ` with `[Q'₀ … | V'₀ …] = h·weight + bias` and the keys `h`
/// itself `[B, S, W]`; `weight` is the folded `[W, 2·H·W]` packed as panels. Returns `[B, S, W]`.
///
/// # Panics
/// If the shapes disagree, or the panel products cannot run here ([`super::panels_avx2::available`]).
pub fn projected_folded_forward(
    h: &[f32],
    weight: &Panels,
    bias: &[f32],
    d: FoldedDims,
    scale: f32,
    engine: Engine,
) -> Vec<f32> {
    let FoldedDims { batch, seq: s, heads, width: w } = d;
    let hs = heads * s;
    assert_eq!(h.len(), batch * s * w, "projected attention: h has the wrong length");
    assert!(s > 0 && w > 0 && heads > 0, "projected attention: empty sequence, width or heads");
    struct Scratch {
        qv: Vec<MaybeUninit<f32>>,
        queries: Vec<f32>,
        probs: Vec<MaybeUninit<f32>>,
        columns: Vec<f32>,
    }
    let new_scratch = || Scratch {
        qv: scratch(s * d.row()),
        queries: vec![0.0; w * hs],
        probs: scratch(s * hs),
        columns: vec![0.0; 2 * hs],
    };
    let one_image = |bi: usize, o: &mut [MaybeUninit<f32>], sc: &mut Scratch| {
        let keys = &h[bi * s * w..][..s * w];
        // Block g (S × W) holds column block g of qv: the folded queries of head g < H, then
        // the folded values of head g − H.
        weight.product_in_groups(keys, bias, w, &mut sc.qv);
        // SAFETY: the product wrote all of qv.
        let qv = unsafe { assume_init(&mut sc.qv) }.as_ptr();
        let block = |g: usize| unsafe { qv.add(g * s * w) };
        for head in 0..heads {
            // SAFETY: head h's S × W query block into W rows of H·S values, at columns h·S.
            unsafe { transpose(sc.queries[head * s..].as_mut_ptr(), hs, block(head), w, s, w) };
        }
        let o: *mut f32 = o.as_mut_ptr().cast();
        let p: *mut f32 = sc.probs.as_mut_ptr().cast();
        let keys = Strided { ptr: keys.as_ptr(), row_stride: w, x_stride: 1 };
        // SAFETY (products): operands are this image's keys or this thread's buffers; the
        // destinations (the scores, this image's output rows) overlap none of them.
        unsafe { engine.product(s, hs, w, p, hs, keys, sc.queries.as_ptr(), hs, false) };
        // SAFETY: the product wrote all S·H·S scores.
        let probs = unsafe { assume_init(&mut sc.probs) };
        softmax_columns(probs, hs, scale, &mut sc.columns);
        for head in 0..heads {
            let probs = Strided { ptr: probs[head * s..].as_ptr(), row_stride: 1, x_stride: hs };
            // Head 0 writes every output element of the image, later heads add to them.
            unsafe { engine.product(s, w, s, o, w, probs, block(heads + head), w, head > 0) };
        }
    };
    // SAFETY: head 0's output product writes every element of an image's rows.
    unsafe {
        uninit_filled(batch * s * w, |out| {
            out.par_chunks_mut(s * w).enumerate().for_each_init(new_scratch, |sc, (bi, o)| one_image(bi, o, sc));
        })
    }
}
