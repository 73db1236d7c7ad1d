//! Folded attention with its projection inside, for sampling on AVX2 and AVX-512: image by image,
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
use super::panels::Panels;
use super::simd::softmax_columns;
use super::tile::Strided;
use super::transpose::transpose;

/// `Σₕ softmax(scale · Q'ₕ Kᵀ) V'ₕ` with `[Q'₀ … | V'₀ …] = h·weight + bias` and the keys `h`
/// itself `[B, S, W]`; `weight` is the folded `[W, 2·H·W]` packed as panels. Returns `[B, S, W]`.
///
/// # Panics
/// If the shapes disagree, or the panel products cannot run here ([`super::panels::available`]).
pub fn projected_folded_forward(
    h: &[f32],
    weight: &Panels,
    bias: &[f32],
    d: FoldedDims,
    scale: f32,
    engine: Engine,
) -> Vec<f32> {
    let FoldedDims { batch, seq: s, width: w, .. } = d;
    assert_eq!(h.len(), batch * s * w, "projected attention: h has the wrong length");
    let image = ProjectedImage { weight, bias, d, scale, engine };
    // SAFETY: `attend` writes every element of an image's rows.
    unsafe {
        uninit_filled(batch * s * w, |out| {
            out.par_chunks_mut(s * w).enumerate().for_each_init(
                || ProjectedScratch::new(d),
                |sc, (bi, o)| image.attend(&h[bi * s * w..][..s * w], o, sc),
            );
        })
    }
}

/// The projection and the folded attention for one image at a time: what
/// [`projected_folded_forward`] runs per image, and the fused inference block too.
#[derive(Clone, Copy)]
pub(super) struct ProjectedImage<'a> {
    pub(super) weight: &'a Panels,
    pub(super) bias: &'a [f32],
    /// `batch` is not read: one image at a time.
    pub(super) d: FoldedDims,
    pub(super) scale: f32,
    pub(super) engine: Engine,
}

/// Per-thread buffers of [`ProjectedImage::attend`].
pub(super) struct ProjectedScratch {
    qv: Vec<MaybeUninit<f32>>,
    queries: Vec<f32>,
    probs: Vec<MaybeUninit<f32>>,
    columns: Vec<f32>,
}

impl ProjectedScratch {
    pub(super) fn new(d: FoldedDims) -> Self {
        let hs = d.heads * d.seq;
        Self {
            qv: scratch(d.seq * d.row()),
            queries: vec![0.0; d.width * hs],
            probs: scratch(d.seq * hs),
            columns: vec![0.0; 2 * hs],
        }
    }
}

impl ProjectedImage<'_> {
    /// One image: `keys` (its `S × W` tokens) to its attention output, every element of `o`
    /// written.
    pub(super) fn attend(&self, keys: &[f32], o: &mut [MaybeUninit<f32>], sc: &mut ProjectedScratch) {
        let FoldedDims { seq: s, heads, width: w, .. } = self.d;
        let hs = heads * s;
        assert!(s > 0 && w > 0 && heads > 0, "projected attention: empty sequence, width or heads");
        assert!(keys.len() == s * w && o.len() == s * w, "projected attention: an image is {s} × {w}");
        // Block g (S × W) holds column block g of qv: the folded queries of head g < H, then
        // the folded values of head g − H.
        self.weight.product_in_groups(keys, self.bias, w, &mut sc.qv);
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
        let engine = self.engine;
        // SAFETY (products): operands are this image's keys or this thread's buffers; the
        // destinations (the scores, this image's output rows) overlap none of them.
        unsafe { engine.product(s, hs, w, p, hs, keys, sc.queries.as_ptr(), hs, false) };
        // SAFETY: the product wrote all S·H·S scores.
        let probs = unsafe { assume_init(&mut sc.probs) };
        softmax_columns(probs, hs, self.scale, &mut sc.columns);
        for head in 0..heads {
            let probs = Strided { ptr: probs[head * s..].as_ptr(), row_stride: 1, x_stride: hs };
            // Head 0 writes every output element of the image, later heads add to them.
            unsafe { engine.product(s, w, s, o, w, probs, block(heads + head), w, head > 0) };
        }
    }
}
