//! Folded attention with its projection inside, on AVX2 and AVX-512: image by image,
//! `qv = h·weight + bias` is consumed while it is still in L2, instead of a `[B, S, 2·H·W]`
//! tensor that a chunk of images writes out to L3 and reads back. For sampling `qv` goes into a
//! buffer of this thread; for training into the tensor the backward pass reads
//! ([`projected_folded_forward_kept`]), written once and read back only then.
//!
//! The projection writes each head's folded queries and folded values as a block of their own
//! ([`Panels::product_in_groups`]): the values are then read in place, where the two-step path
//! gathers each head's rows out of the wide `qv` rows first, and the query transposes read
//! `S × W` blocks instead of rows 2·H·W floats apart. The rest is
//! [`attention::folded_forward`]'s computation, in its order: the results are the same bit for
//! bit as [`linear::forward`] followed by it (on the engine both use).

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::attention::{Engine, FoldedDims, FoldedImage, FoldedScratch, QvLayout};
use super::buffer::{assume_init, scratch, uninit_filled};
use super::linear::{Activation, activation_backward, sum_in_order};
use super::panels::Panels;
use super::simd::softmax_columns;
use super::tile::Strided;
use super::transpose::transpose;
use super::weight_gradient::WeightGradient;

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

/// [`projected_folded_forward`] keeping what [`attention::folded_backward`] reads: returns the
/// output `[B, S, W]`, `qv` in blocks ([`QvLayout::Groups`], `[B, 2·H, S, W]`) and the
/// probabilities `[B, S(key), H·S(query)]`.
///
/// # Panics
/// As [`projected_folded_forward`].
pub fn projected_folded_forward_kept(
    h: &[f32],
    weight: &Panels,
    bias: &[f32],
    d: FoldedDims,
    scale: f32,
    engine: Engine,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let FoldedDims { batch, seq: s, width: w, heads } = d;
    assert_eq!(h.len(), batch * s * w, "projected attention: h has the wrong length");
    let image = ProjectedImage { weight, bias, d, scale, engine };
    let (qv_len, probs_len) = (s * d.row(), s * heads * s);
    let (mut qv, mut probs) = (None, None);
    // SAFETY: `attend_keeping` writes every element of an image's output rows, of its `qv`
    // blocks and of its probabilities.
    let out = unsafe {
        uninit_filled(batch * s * w, |out| {
            qv = Some(uninit_filled(batch * qv_len, |qv| {
                probs = Some(uninit_filled(batch * probs_len, |probs| {
                    out.par_chunks_mut(s * w)
                        .zip(qv.par_chunks_mut(qv_len))
                        .zip(probs.par_chunks_mut(probs_len))
                        .enumerate()
                        .for_each_init(
                            || ProjectedScratch::new(d),
                            |sc, (bi, ((o, qv), p))| image.attend_keeping(&h[bi * s * w..][..s * w], o, qv, p, sc),
                        );
                }));
            }));
        })
    };
    (out, qv.expect("filled above"), probs.expect("filled above"))
}

/// Images per task of [`projected_folded_backward`]: about a Linear backward span's rows. The
/// weight and bias gradients are summed task by task, so this, not the thread count, fixes
/// their order of summation.
const SPAN_IMAGES: usize = 10;

/// The gradients of [`projected_folded_forward_kept`] from that of its output: of `h` (as the
/// projection's input and as the keys), of the folded weight `[W, 2·H·W]` (row-major, unpacked)
/// and of its bias. Image by image, the attention's backward writes the image's `qv` gradient
/// to a buffer of the thread, and the projection's backward consumes it while it is in L2: the
/// input gradient on the panels of `weightᵀ`, the weight gradient on [`WeightGradient`]'s tiles
/// (summed in image order within a span of [`SPAN_IMAGES`], the spans in order), the bias
/// gradient row by row.
///
/// # Panics
/// If the sizes disagree, or the panel products cannot run here ([`super::panels::available`]).
#[allow(clippy::too_many_arguments)]
pub fn projected_folded_backward(
    h: &[f32],
    weight: &[f32],
    qv: &[f32],
    probs: &[f32],
    grad_out: &[f32],
    d: FoldedDims,
    scale: f32,
    engine: Engine,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let FoldedDims { batch, seq: s, heads, width: w } = d;
    let (row, hs) = (d.row(), heads * s);
    assert_eq!(h.len(), batch * s * w, "projected attention backward: h has the wrong length");
    assert_eq!(weight.len(), w * row, "projected attention backward: weight must be [W, 2·H·W]");
    assert_eq!(qv.len(), batch * s * row, "projected attention backward: qv has the wrong length");
    assert_eq!(probs.len(), batch * s * hs, "projected attention backward: probs have the wrong length");
    assert_eq!(grad_out.len(), batch * s * w, "projected attention backward: gradient has the wrong length");
    // dx = dqv · weightᵀ: the panels of weightᵀ, `2·H·W` deep.
    let transposed = Panels::pack(weight, row, w, 1, row);
    let mut spans: Vec<(Vec<f32>, Vec<f32>)> = Vec::new();
    // SAFETY: each image's key gradient is written whole (head 0's product) before its input
    // gradient is added to it.
    let grad_h = unsafe {
        uninit_filled(batch * s * w, |grad_h| {
            spans = grad_h
                .par_chunks_mut(SPAN_IMAGES * s * w)
                .enumerate()
                .map_init(
                    || (FoldedScratch::new(d), scratch(s * row), scratch(s * w)),
                    |(folded, gqv, dx), (si, grad_h)| {
                        let mut dw = WeightGradient::new(w, row);
                        let mut db = vec![0.0f32; row];
                        for (i, gh) in grad_h.chunks_mut(s * w).enumerate() {
                            let bi = si * SPAN_IMAGES + i;
                            let image = FoldedImage {
                                qv: &qv[bi * s * row..][..s * row],
                                layout: QvLayout::Groups,
                                keys: &h[bi * s * w..][..s * w],
                                probs: &probs[bi * s * hs..][..s * hs],
                                grad_out: &grad_out[bi * s * w..][..s * w],
                            };
                            image.backward(gqv, gh, d, scale, engine, folded);
                            // SAFETY: the image's backward wrote all of both.
                            let (dz, gh) = (assume_init(gqv), assume_init(gh));
                            activation_backward(dz, &[], &mut db, Activation::Identity);
                            transposed.product(dz, dx, |_, _| {});
                            let x = &h[bi * s * w..][..s * w];
                            dw.add(x, dz);
                            // `h` is both the projection's input and the keys.
                            gh.iter_mut().zip(assume_init(dx).iter()).for_each(|(g, &x)| *g += x);
                        }
                        (dw.finish(), db)
                    },
                )
                .collect();
        })
    };
    let grad_w = sum_in_order(spans.iter().map(|(dw, _)| dw.as_slice()), w * row);
    let grad_b = sum_in_order(spans.iter().map(|(_, db)| db.as_slice()), row);
    (grad_h, grad_w, grad_b)
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
        let ProjectedScratch { qv, queries, probs, columns } = sc;
        self.attend_into(keys, o, qv, probs, queries, columns);
    }

    /// [`Self::attend`] writing the image's `qv` blocks (`2·H × S × W`) and probabilities
    /// (`S × H·S`) into `qv` and `probs`, for the backward pass.
    fn attend_keeping(
        &self,
        keys: &[f32],
        o: &mut [MaybeUninit<f32>],
        qv: &mut [MaybeUninit<f32>],
        probs: &mut [MaybeUninit<f32>],
        sc: &mut ProjectedScratch,
    ) {
        self.attend_into(keys, o, qv, probs, &mut sc.queries, &mut sc.columns);
    }

    fn attend_into(
        &self,
        keys: &[f32],
        o: &mut [MaybeUninit<f32>],
        qv: &mut [MaybeUninit<f32>],
        probs: &mut [MaybeUninit<f32>],
        queries: &mut [f32],
        columns: &mut [f32],
    ) {
        let FoldedDims { seq: s, heads, width: w, .. } = self.d;
        let hs = heads * s;
        assert!(s > 0 && w > 0 && heads > 0, "projected attention: empty sequence, width or heads");
        assert!(keys.len() == s * w && o.len() == s * w, "projected attention: an image is {s} × {w}");
        assert!(qv.len() == s * self.d.row() && probs.len() == s * hs, "projected attention: buffers too small");
        // Block g (S × W) holds column block g of qv: the folded queries of head g < H, then
        // the folded values of head g − H.
        self.weight.product_in_groups(keys, self.bias, w, qv);
        // SAFETY: the product wrote all of qv.
        let qv = unsafe { assume_init(qv) }.as_ptr();
        let block = |g: usize| unsafe { qv.add(g * s * w) };
        for head in 0..heads {
            // SAFETY: head h's S × W query block into W rows of H·S values, at columns h·S.
            unsafe { transpose(queries[head * s..].as_mut_ptr(), hs, block(head), w, s, w) };
        }
        let o: *mut f32 = o.as_mut_ptr().cast();
        let p: *mut f32 = probs.as_mut_ptr().cast();
        let keys = Strided { ptr: keys.as_ptr(), row_stride: w, x_stride: 1 };
        let engine = self.engine;
        // SAFETY (products): operands are this image's keys or this thread's buffers; the
        // destinations (the scores, this image's output rows) overlap none of them.
        unsafe { engine.product(s, hs, w, p, hs, keys, queries.as_ptr(), hs, false) };
        // SAFETY: the product wrote all S·H·S scores.
        let probs = unsafe { assume_init(probs) };
        softmax_columns(probs, hs, self.scale, columns);
        for head in 0..heads {
            let probs = Strided { ptr: probs[head * s..].as_ptr(), row_stride: 1, x_stride: hs };
            // Head 0 writes every output element of the image, later heads add to them.
            unsafe { engine.product(s, w, s, o, w, probs, block(heads + head), w, head > 0) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::attention::{QvLayout, folded_backward, folded_forward};
    use crate::kernels::linear::{self, Activation, LinearDims};
    use crate::kernels::panels;

    /// Training's fused forward gives the same bits as the Linear followed by the folded
    /// attention: the output, the probabilities and `qv` (in blocks); and the backward pass
    /// reading that `qv` in blocks gives the same gradients as reading the Linear's rows.
    #[test]
    fn kept_forward_and_its_backward_match_the_two_steps() {
        if !panels::available() {
            eprintln!("no panel products on this CPU: the projected attention does not run");
            return;
        }
        let mut rng = crate::rng::stream(17, crate::rng::Purpose::Bench, 0);
        for d in [
            FoldedDims { batch: 3, seq: 49, heads: 4, width: 64 },
            FoldedDims { batch: 2, seq: 7, heads: 2, width: 32 },
        ] {
            let (s, w, row) = (d.seq, d.width, d.row());
            let h = crate::rng::standard_normal(&mut rng, d.batch * s * w);
            let weight: Vec<f32> = crate::rng::standard_normal(&mut rng, w * row).iter().map(|v| v * 0.2).collect();
            let bias = crate::rng::standard_normal(&mut rng, row);
            let grad_out = crate::rng::standard_normal(&mut rng, d.batch * s * w);
            let engine = Engine::best();
            let lin = LinearDims { rows: d.batch * s, input: w, output: row };
            let (qv_rows, _) = linear::forward(&h, &weight, &bias, lin, Activation::Identity, false);
            let (out, probs) = folded_forward(&qv_rows, &h, d, 0.3, true, engine);
            let probs = probs.expect("kept");

            let panels = Panels::pack(&weight, w, row, row, 1);
            let (kept_out, qv_groups, kept_probs) = projected_folded_forward_kept(&h, &panels, &bias, d, 0.3, engine);
            assert_eq!(kept_out, out, "{d:?}: outputs");
            assert_eq!(kept_probs, probs, "{d:?}: probabilities");
            assert_eq!(projected_folded_forward(&h, &panels, &bias, d, 0.3, engine), out, "{d:?}: unkept output");
            for (b, r, g) in every_index(d.batch, s, 2 * d.heads) {
                let rows = &qv_rows[(b * s + r) * row + g * w..][..w];
                let block = &qv_groups[b * s * row + (g * s + r) * w..][..w];
                assert_eq!(rows, block, "{d:?}: qv image {b} row {r} block {g}");
            }

            let by_rows = folded_backward(&qv_rows, QvLayout::Rows, &h, &probs, &grad_out, d, 0.3, engine);
            let by_groups = folded_backward(&qv_groups, QvLayout::Groups, &h, &probs, &grad_out, d, 0.3, engine);
            assert_eq!(by_groups, by_rows, "{d:?}: gradients");
        }
    }

    /// The fused backward's gradients are the same bits on one thread and on several: the
    /// spans of images, not the threads, fix the order of every sum.
    #[test]
    fn backward_does_not_depend_on_the_thread_count() {
        if !panels::available() {
            return;
        }
        let mut rng = crate::rng::stream(19, crate::rng::Purpose::Bench, 0);
        let d = FoldedDims { batch: 25, seq: 9, heads: 2, width: 32 };
        let (s, w, row) = (d.seq, d.width, d.row());
        let h = crate::rng::standard_normal(&mut rng, d.batch * s * w);
        let weight: Vec<f32> = crate::rng::standard_normal(&mut rng, w * row).iter().map(|v| v * 0.2).collect();
        let bias = crate::rng::standard_normal(&mut rng, row);
        let grad_out = crate::rng::standard_normal(&mut rng, d.batch * s * w);
        let (engine, panels) = (Engine::best(), Panels::pack(&weight, w, row, row, 1));
        let (_, qv, probs) = projected_folded_forward_kept(&h, &panels, &bias, d, 0.3, engine);
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
            pool.install(|| projected_folded_backward(&h, &weight, &qv, &probs, &grad_out, d, 0.3, engine))
        };
        let bits = |g: &(Vec<f32>, Vec<f32>, Vec<f32>)| {
            [&g.0, &g.1, &g.2].map(|v| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>())
        };
        let one = bits(&on(1));
        for threads in [2, 3] {
            assert!(bits(&on(threads)) == one, "{threads} threads");
        }
    }

    /// Every (image, row, block) index.
    fn every_index(a: usize, b: usize, c: usize) -> impl Iterator<Item = (usize, usize, usize)> {
        (0..a).flat_map(move |i| (0..b).flat_map(move |j| (0..c).map(move |k| (i, j, k))))
    }
}
