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
use super::tile::{self, Strided};
use super::tile_avx2;
use super::transpose::transpose;

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

/// What computes the per-head products: register tiles for AVX-512 or for AVX2 + FMA, where the
/// CPU has them, otherwise gemm (also the reference the tiles are tested against).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Tiles,
    Avx2Tiles,
    Gemm,
}

impl Engine {
    /// The fastest engine this CPU runs.
    pub fn best() -> Self {
        if tile::available() {
            Engine::Tiles
        } else if tile_avx2::available() {
            Engine::Avx2Tiles
        } else {
            Engine::Gemm
        }
    }

    /// Every engine this CPU runs, fastest first.
    pub fn available() -> Vec<Self> {
        let mut engines = Vec::new();
        if tile::available() {
            engines.push(Engine::Tiles);
        }
        if tile_avx2::available() {
            engines.push(Engine::Avx2Tiles);
        }
        engines.push(Engine::Gemm);
        engines
    }

    /// `dst[r, j] (+)= Σₓ L(r, x) · rhs[x, j]` for one head (see [`tile::broadcast_product`]).
    ///
    /// # Safety
    /// As for [`tile::broadcast_product`].
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn product(
        self,
        rows: usize,
        n: usize,
        xs: usize,
        dst: *mut f32,
        dst_rs: usize,
        lhs: Strided,
        rhs: *const f32,
        rhs_rs: usize,
        accumulate: bool,
    ) {
        // SAFETY: the caller's contract; the tiles are only chosen when available.
        unsafe {
            match self {
                Engine::Tiles => tile::broadcast_product(rows, n, xs, dst, dst_rs, lhs, rhs, rhs_rs, accumulate),
                Engine::Avx2Tiles => {
                    tile_avx2::broadcast_product(rows, n, xs, dst, dst_rs, lhs, rhs, rhs_rs, accumulate)
                }
                Engine::Gemm => {
                    // Head-dim-wide results go to gemm transposed: their left operand is then
                    // unit-stride and 16-aligned, and is neither packed nor padded.
                    let order = if n.is_multiple_of(16) { Order::Transposed } else { Order::AsIs };
                    let l = (lhs.row_stride, lhs.x_stride);
                    product(order, rows, n, xs, dst, dst_rs, lhs.ptr, l, rhs, (rhs_rs, 1), ONE_THREAD, accumulate)
                }
            }
        }
    }

    /// A head's `rows × cols` block of a wide buffer (rows `src_rs` apart) as this engine reads
    /// it best: in place, or, for the AVX2 tiles, copied into `buf` (sized on first use) with its
    /// rows packed. Returns the block's pointer and row stride.
    ///
    /// At the row stride of `qv` (2·H·W floats, 2 KiB for mnist-dits) a head's rows fall into a
    /// few L1 sets and evict each other; the AVX2 tiles, which read every row once per 16-column
    /// block, then find them gone (README, "Speed"). The AVX-512 tiles read each row once, and
    /// in the backward pass, where the blocks are read fewer times, the copy costs more than
    /// it saves.
    ///
    /// # Safety
    /// `src` covers `rows` rows of `cols` values at stride `src_rs`; the pointer returned is
    /// valid while `buf` and `src` are.
    unsafe fn head_rows(
        self,
        buf: &mut Vec<f32>,
        src: *const f32,
        src_rs: usize,
        rows: usize,
        cols: usize,
    ) -> (*const f32, usize) {
        if self != Engine::Avx2Tiles {
            return (src, src_rs);
        }
        buf.resize(rows * cols, 0.0);
        for (r, d) in buf.chunks_exact_mut(cols).enumerate() {
            // SAFETY: row r < rows of the caller's block.
            d.copy_from_slice(unsafe { std::slice::from_raw_parts(src.add(r * src_rs), cols) });
        }
        (buf.as_ptr(), cols)
    }
}

/// `dst[c·rows + r] = src[r·src_rs + c]`: a head's `rows × cols` block transposed, so that a
/// score product can stream it as its row-major right operand.
fn transpose_into(dst: &mut [f32], src: *const f32, src_rs: usize, rows: usize, cols: usize) {
    assert!(dst.len() >= rows * cols, "attention: transpose scratch too small");
    // SAFETY: `dst` holds `cols` rows of `rows` values (checked), and `src` covers `rows` rows of
    // `cols` values (the caller's head block).
    unsafe { transpose(dst.as_mut_ptr(), rows, src, src_rs, rows, cols) }
}

/// Forward pass. Returns the output `[B, S, H·D]` and, when `keep_probs`, the attention
/// probabilities, stored transposed per head (`[B, H, S(key), S(query)]`), which the backward
/// pass needs.
pub fn forward(qkv: &[f32], d: AttnDims, scale: f32, keep_probs: bool, engine: Engine) -> (Vec<f32>, Option<Vec<f32>>) {
    let AttnDims { batch, seq: s, heads, head_dim: dh } = d;
    let (hd, row) = (d.inner(), d.row());
    assert_eq!(qkv.len(), batch * s * row, "attention: qkv has the wrong length");
    assert!(s > 0 && dh > 0, "attention: empty sequence or heads");
    let one_image = |bi: usize, o: &mut [MaybeUninit<f32>], p: &mut [MaybeUninit<f32>], scratch: &mut Scratch| {
        let x = qkv[bi * s * row..(bi + 1) * s * row].as_ptr();
        for h in 0..heads {
            // SAFETY (pointer offsets): all within this image's `s·row` block of `qkv`.
            let (q, k, v) = unsafe { (x.add(h * dh), x.add(hd + h * dh), x.add(2 * hd + h * dh)) };
            let pt = &mut p[h * s * s..(h + 1) * s * s];
            // Scores transposed, Sᵀ = K Qᵀ: row j holds key j against every query, so that the
            // softmax over keys runs down the columns (see `softmax_columns`).
            transpose_into(&mut scratch.transposed, q, row, s, dh);
            // SAFETY (products here and below): every operand is an s×dh head block inside this
            // image's rows or an s×s buffer of its own, and no destination overlaps an operand.
            let keys = Strided { ptr: k, row_stride: row, x_stride: 1 };
            unsafe { engine.product(s, s, dh, pt.as_mut_ptr().cast(), s, keys, scratch.transposed.as_ptr(), s, false) };
            // SAFETY: the product wrote all s·s scores.
            let pt = unsafe { assume_init(pt) };
            softmax_columns(pt, s, scale, &mut scratch.columns);
            // out_h = P V, with P read through its transpose, written straight into this
            // head's output columns (all heads together write every element of the image's rows).
            let probs = Strided { ptr: pt.as_ptr(), row_stride: 1, x_stride: s };
            unsafe { engine.product(s, dh, s, o[h * dh..].as_mut_ptr().cast(), hd, probs, v, row, false) };
        }
    };

    let mut probs = None;
    let scratch = || Scratch::new(d);
    // SAFETY: every image's rows are written by its heads' output products, and, when kept,
    // every probability by the score products.
    let out = unsafe {
        uninit_filled(batch * s * hd, |out| {
            if keep_probs {
                probs = Some(uninit_filled(batch * heads * s * s, |p| {
                    out.par_chunks_mut(s * hd)
                        .zip(p.par_chunks_mut(heads * s * s))
                        .enumerate()
                        .for_each_init(scratch, |scratch, (bi, (o, p))| one_image(bi, o, p, scratch));
                }));
            } else {
                out.par_chunks_mut(s * hd).enumerate().for_each_init(
                    || (buffer::scratch(heads * s * s), scratch()),
                    |(p, scratch), (bi, o)| one_image(bi, o, p, scratch),
                );
            }
        })
    };
    (out, probs)
}

/// Sizes of one [`folded_forward`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FoldedDims {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    /// The token width `W`: keys, folded queries and folded values are all `W` wide.
    pub width: usize,
}

impl FoldedDims {
    /// Width of one `qv` row, `2·H·W`.
    pub fn row(&self) -> usize {
        2 * self.heads * self.width
    }
}

/// How a `qv` tensor `[B, S, 2·H·W]` lays out each image's folded queries and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QvLayout {
    /// As a Linear layer writes it: row `i` holds token `i`'s `2·H·W` values, head `h`'s
    /// queries at columns `h·W..`, its values at `(H + h)·W..`.
    Rows,
    /// As [`super::projected_attention`] writes it: block `g` of `S × W` holds column block `g`
    /// of the rows (the queries of head `g < H`, then the values of head `g − H`).
    Groups,
}

impl QvLayout {
    /// Offset of column block `g` (of `W` columns) in an image's `qv`, and its row stride.
    fn block(self, g: usize, d: FoldedDims) -> (usize, usize) {
        match self {
            QvLayout::Rows => (g * d.width, d.row()),
            QvLayout::Groups => (g * d.seq * d.width, d.width),
        }
    }
}

/// Attention with the key, value and output projections folded into the weights (see
/// `model::mnist_dits::folded`): `out = Σₕ softmax(scale · Q'ₕ Kᵀ) V'ₕ`, where the keys `K`
/// `[B, S, W]` are the block's normalised input itself, shared by every head, and `qv`
/// `[B, S, 2·H·W]` holds the folded queries `Q'ₕ` then the folded values `V'ₕ`. Returns the
/// output `[B, S, W]` (the heads' outputs summed by accumulating products, so the output
/// projection is already applied) and, when `keep_probs`, the probabilities for
/// [`folded_backward`], `[B, S(key), H·S(query)]`.
///
/// Because the heads share their keys, one product scores every head: its right operand is all
/// heads' queries transposed side by side, `H·S` columns (196 for mnist-dits: 94% of the
/// vector lanes busy, against 77% for 49 columns per head), and one softmax pass covers them.
pub fn folded_forward(
    qv: &[f32],
    keys: &[f32],
    d: FoldedDims,
    scale: f32,
    keep_probs: bool,
    engine: Engine,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let FoldedDims { batch, seq: s, heads, width: w } = d;
    let (row, hs) = (d.row(), heads * s);
    assert_eq!(qv.len(), batch * s * row, "folded attention: qv has the wrong length");
    assert_eq!(keys.len(), batch * s * w, "folded attention: keys have the wrong length");
    assert!(s > 0 && w > 0 && heads > 0, "folded attention: empty sequence, width or heads");
    let one_image = |bi: usize, o: &mut [MaybeUninit<f32>], p: &mut [MaybeUninit<f32>], scratch: &mut FoldedScratch| {
        let (x, k) = (qv[bi * s * row..].as_ptr(), keys[bi * s * w..].as_ptr());
        let o: *mut f32 = o.as_mut_ptr().cast();
        for h in 0..heads {
            // Head h's queries, transposed, at columns h·S.. of a W × H·S block.
            // SAFETY: the source is head h's S × W block of this image's rows of `qv`; the
            // destination block holds W rows of H·S values.
            unsafe { transpose(scratch.queries[h * s..].as_mut_ptr(), hs, x.add(h * w), row, s, w) };
        }
        // SAFETY (products): operands are this image's blocks of `qv` and `keys`, or this
        // thread's buffers; no destination overlaps an operand.
        let keys = Strided { ptr: k, row_stride: w, x_stride: 1 };
        unsafe { engine.product(s, hs, w, p.as_mut_ptr().cast(), hs, keys, scratch.queries.as_ptr(), hs, false) };
        // SAFETY: the product wrote all S·H·S scores.
        let p = unsafe { assume_init(p) };
        softmax_columns(p, hs, scale, &mut scratch.columns);
        for h in 0..heads {
            // SAFETY: head h's value block, S rows of W inside this image's rows of `qv`.
            let (values, values_rs) =
                unsafe { engine.head_rows(&mut scratch.values, x.add((heads + h) * w), row, s, w) };
            // Head 0 writes every output element of the image, later heads add to them.
            let probs = Strided { ptr: p[h * s..].as_ptr(), row_stride: 1, x_stride: hs };
            unsafe { engine.product(s, w, s, o, w, probs, values, values_rs, h > 0) };
        }
    };
    let scratch = || FoldedScratch::new(d);
    let mut probs = None;
    // SAFETY: head 0's product writes every element of an image's rows and, when kept, the
    // score product writes every probability.
    let out = unsafe {
        uninit_filled(batch * s * w, |out| {
            if keep_probs {
                probs = Some(uninit_filled(batch * s * hs, |p| {
                    out.par_chunks_mut(s * w)
                        .zip(p.par_chunks_mut(s * hs))
                        .enumerate()
                        .for_each_init(scratch, |scratch, (bi, (o, p))| one_image(bi, o, p, scratch));
                }));
            } else {
                out.par_chunks_mut(s * w).enumerate().for_each_init(
                    || (buffer::scratch(s * hs), scratch()),
                    |(p, scratch), (bi, o)| one_image(bi, o, p, scratch),
                );
            }
        })
    };
    (out, probs)
}

/// Per-thread buffers of the folded attention: the transposed queries of every head (or, in
/// the backward pass, the transposed output gradient), a head's packed values (AVX2 tiles only,
/// see [`Engine::head_rows`]), the score gradients, and the softmax's column statistics.
pub(super) struct FoldedScratch {
    queries: Vec<f32>,
    values: Vec<f32>,
    scores: Vec<f32>,
    columns: Vec<f32>,
}

impl FoldedScratch {
    pub(super) fn new(d: FoldedDims) -> Self {
        let hs = d.heads * d.seq;
        Self {
            queries: vec![0.0; d.width * hs],
            values: Vec::new(),
            scores: vec![0.0; d.seq * hs],
            columns: vec![0.0; 2 * hs],
        }
    }
}

/// Backward pass of [`folded_forward`]: the gradients of `qv` (`[B, S, 2·H·W]`, in rows) and of
/// the keys (`[B, S, W]`, summed over the heads) from that of the output; `qv` is read in
/// `layout`.
#[allow(clippy::too_many_arguments)]
pub fn folded_backward(
    qv: &[f32],
    layout: QvLayout,
    keys: &[f32],
    probs: &[f32],
    grad_out: &[f32],
    d: FoldedDims,
    scale: f32,
    engine: Engine,
) -> (Vec<f32>, Vec<f32>) {
    let FoldedDims { batch, seq: s, heads, width: w } = d;
    let (row, hs) = (d.row(), heads * s);
    assert_eq!(qv.len(), batch * s * row, "folded attention backward: qv has the wrong length");
    assert_eq!(keys.len(), batch * s * w, "folded attention backward: keys have the wrong length");
    assert_eq!(probs.len(), batch * s * hs, "folded attention backward: probs have the wrong length");
    assert_eq!(grad_out.len(), batch * s * w, "folded attention backward: gradient has the wrong length");
    let one_image =
        |bi: usize, gqv: &mut [MaybeUninit<f32>], gk: &mut [MaybeUninit<f32>], scratch: &mut FoldedScratch| {
            let image = FoldedImage {
                qv: &qv[bi * s * row..][..s * row],
                layout,
                keys: &keys[bi * s * w..][..s * w],
                probs: &probs[bi * s * hs..][..s * hs],
                grad_out: &grad_out[bi * s * w..][..s * w],
            };
            image.backward(gqv, gk, d, scale, engine, scratch);
        };
    let mut grad_keys = None;
    // SAFETY: `FoldedImage::backward` writes every element of an image's gradients.
    let grad_qv = unsafe {
        uninit_filled(batch * s * row, |gqv| {
            grad_keys = Some(uninit_filled(batch * s * w, |gk| {
                gqv.par_chunks_mut(s * row).zip(gk.par_chunks_mut(s * w)).enumerate().for_each_init(
                    || FoldedScratch::new(d),
                    |scratch, (bi, (gqv, gk))| one_image(bi, gqv, gk, scratch),
                );
            }));
        })
    };
    (grad_qv, grad_keys.expect("filled above"))
}

/// One image's operands of [`folded_backward`].
pub(super) struct FoldedImage<'a> {
    /// `S × 2·H·W` values in `layout`.
    pub(super) qv: &'a [f32],
    pub(super) layout: QvLayout,
    /// `S × W`.
    pub(super) keys: &'a [f32],
    /// `S × H·S`.
    pub(super) probs: &'a [f32],
    /// `S × W`.
    pub(super) grad_out: &'a [f32],
}

impl FoldedImage<'_> {
    /// The image's `qv` gradient (`S × 2·H·W`, in rows) into `gqv` and its key gradient
    /// (`S × W`) into `gk`, every element of both written.
    pub(super) fn backward(
        &self,
        gqv: &mut [MaybeUninit<f32>],
        gk: &mut [MaybeUninit<f32>],
        d: FoldedDims,
        scale: f32,
        engine: Engine,
        scratch: &mut FoldedScratch,
    ) {
        let FoldedDims { seq: s, heads, width: w, .. } = d;
        let (row, hs) = (d.row(), heads * s);
        assert!(
            self.qv.len() == s * row
                && self.keys.len() == s * w
                && self.probs.len() == s * hs
                && self.grad_out.len() == s * w
                && gqv.len() == s * row
                && gk.len() == s * w,
            "folded attention backward: an image's operands have the wrong sizes"
        );
        let (x, k, go, p) = (self.qv.as_ptr(), self.keys.as_ptr(), self.grad_out.as_ptr(), self.probs);
        let (gqv, gk): (*mut f32, *mut f32) = (gqv.as_mut_ptr().cast(), gk.as_mut_ptr().cast());
        // SAFETY (block offsets): inside the image's `s·row` values of `qv`.
        let block = |g: usize| {
            let (at, stride) = self.layout.block(g, d);
            (unsafe { x.add(at) }, stride)
        };
        // dO is shared by the heads: transposed once per image.
        // SAFETY: dO's S × W block into W rows of S values of the scratch.
        unsafe { transpose(scratch.queries.as_mut_ptr(), s, go, w, s, w) };
        // SAFETY (offsets and products): blocks of the image's `qv` and its gradient, its keys
        // and their gradient, or this thread's buffers (sizes checked above); no destination
        // overlaps an operand.
        unsafe {
            for h in 0..heads {
                let ((v, v_rs), dv, ph) = (block(heads + h), gqv.add((heads + h) * w), p[h * s..].as_ptr());
                // dV'ₕ = Pₕᵀ dO
                engine.product(s, w, s, dv, row, Strided { ptr: ph, row_stride: hs, x_stride: 1 }, go, w, false);
                // dPₕᵀ = V'ₕ dOᵀ, at columns h·S.. of the score gradients.
                let values = Strided { ptr: v, row_stride: v_rs, x_stride: 1 };
                let dst = scratch.scores[h * s..].as_mut_ptr();
                engine.product(s, s, w, dst, hs, values, scratch.queries.as_ptr(), s, false);
            }
        }
        // The softmax backward (times the scale) of every head at once: dSᵀ.
        softmax_columns_backward(p, &mut scratch.scores, hs, scale, &mut scratch.columns[..hs]);
        let ds = scratch.scores.as_ptr();
        // SAFETY: as above.
        unsafe {
            for h in 0..heads {
                let ((q, q_rs), dq, dsh) = (block(h), gqv.add(h * w), ds.add(h * s));
                // dQ'ₕ = dSₕ K, dK += dSₕᵀ Q'ₕ (head 0 writes every key gradient).
                engine.product(s, w, s, dq, row, Strided { ptr: dsh, row_stride: 1, x_stride: hs }, k, w, false);
                engine.product(s, w, s, gk, w, Strided { ptr: dsh, row_stride: hs, x_stride: 1 }, q, q_rs, h > 0);
            }
        }
    }
}

/// Per-thread buffers: a transposed head block, the softmax's column statistics, and (in the
/// backward pass) the score gradients.
struct Scratch {
    transposed: Vec<f32>,
    columns: Vec<f32>,
    scores: Vec<f32>,
}

impl Scratch {
    fn new(d: AttnDims) -> Self {
        let s = d.seq;
        Self { transposed: vec![0.0; s * d.head_dim], columns: vec![0.0; 2 * s], scores: vec![0.0; s * s] }
    }
}

/// Backward pass: the gradient of `qkv` (`[B, S, 3·H·D]`) from that of the output, with the
/// transposed probabilities of [`forward`].
pub fn backward(qkv: &[f32], probs: &[f32], grad_out: &[f32], d: AttnDims, scale: f32, engine: Engine) -> Vec<f32> {
    let AttnDims { batch, seq: s, heads, .. } = d;
    let (hd, row) = (d.inner(), d.row());
    assert_eq!(qkv.len(), batch * s * row, "attention backward: qkv has the wrong length");
    assert_eq!(probs.len(), batch * heads * s * s, "attention backward: probs have the wrong length");
    assert_eq!(grad_out.len(), batch * s * hd, "attention backward: gradient has the wrong length");
    // SAFETY: for every image and head the products below write that head's columns of dQ, dK
    // and dV, which together cover every element.
    unsafe { uninit_filled(batch * s * row, |grad| backward_into(grad, qkv, probs, grad_out, d, scale, engine)) }
}

fn backward_into(
    grad: &mut [MaybeUninit<f32>],
    qkv: &[f32],
    probs: &[f32],
    grad_out: &[f32],
    d: AttnDims,
    scale: f32,
    engine: Engine,
) {
    let AttnDims { seq: s, heads, head_dim: dh, .. } = d;
    let (hd, row) = (d.inner(), d.row());
    grad.par_chunks_mut(s * row).enumerate().for_each_init(
        || Scratch::new(d),
        |scratch, (bi, g)| {
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
                let probs = Strided { ptr: pt.as_ptr(), row_stride: s, x_stride: 1 };
                unsafe { engine.product(s, dh, s, dv, row, probs, doh, hd, false) };
                // dPᵀ = V dOᵀ, then the softmax backward (times the scale) in place: dSᵀ.
                transpose_into(&mut scratch.transposed, doh, hd, s, dh);
                let values = Strided { ptr: v, row_stride: row, x_stride: 1 };
                let dst = scratch.scores.as_mut_ptr();
                unsafe { engine.product(s, s, dh, dst, s, values, scratch.transposed.as_ptr(), s, false) };
                softmax_columns_backward(pt, &mut scratch.scores, s, scale, &mut scratch.columns[..s]);
                // dQ = dS K (dS read through its transpose), dK = dSᵀ Q
                let ds = scratch.scores.as_ptr();
                unsafe {
                    engine.product(s, dh, s, dq, row, Strided { ptr: ds, row_stride: 1, x_stride: s }, k, row, false)
                };
                unsafe {
                    engine.product(s, dh, s, dk, row, Strided { ptr: ds, row_stride: s, x_stride: 1 }, q, row, false)
                };
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The register-tile engines this CPU runs (each is compared with gemm).
    fn tile_engines() -> Vec<Engine> {
        let engines: Vec<Engine> = Engine::available().into_iter().filter(|&e| e != Engine::Gemm).collect();
        if engines.is_empty() {
            eprintln!("neither AVX-512 nor AVX2 + FMA: only the gemm engine runs on this CPU");
        }
        engines
    }

    fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / scale
    }

    /// The register tiles compute what gemm computes, forward and backward (the composed-op
    /// test in `kernels` covers whichever engine the CPU picks; this one covers every engine).
    #[test]
    fn tiles_and_gemm_agree() {
        for d in [
            AttnDims { batch: 2, seq: 49, heads: 4, head_dim: 64 },
            AttnDims { batch: 3, seq: 10, heads: 3, head_dim: 20 },
            AttnDims { batch: 1, seq: 65, heads: 2, head_dim: 80 },
        ] {
            let value = |i: usize| ((i * 7919) % 1009) as f32 / 300.0 - 1.6;
            let qkv: Vec<f32> = (0..d.batch * d.seq * d.row()).map(value).collect();
            let grad_out: Vec<f32> = (0..d.batch * d.seq * d.inner()).map(|i| value(i + 5)).collect();
            let run = |engine| {
                let (out, probs) = forward(&qkv, d, 0.3, true, engine);
                let probs = probs.unwrap();
                let grad = backward(&qkv, &probs, &grad_out, d, 0.3, engine);
                (out, probs, grad)
            };
            let gemm = run(Engine::Gemm);
            for engine in tile_engines() {
                let tiles = run(engine);
                assert!(max_rel_diff(&tiles.0, &gemm.0) < 1e-5, "{engine:?} {d:?}: outputs differ");
                assert!(max_rel_diff(&tiles.1, &gemm.1) < 1e-5, "{engine:?} {d:?}: probabilities differ");
                assert!(max_rel_diff(&tiles.2, &gemm.2) < 1e-5, "{engine:?} {d:?}: gradients differ");
            }
        }
    }

    /// The same for the folded attention, whose products also accumulate (gemm with `read_dst`).
    #[test]
    fn folded_tiles_and_gemm_agree() {
        for d in [
            FoldedDims { batch: 2, seq: 49, heads: 4, width: 64 },
            FoldedDims { batch: 3, seq: 10, heads: 3, width: 20 },
        ] {
            let value = |i: usize| ((i * 7919) % 1009) as f32 / 300.0 - 1.6;
            let qv: Vec<f32> = (0..d.batch * d.seq * d.row()).map(value).collect();
            let keys: Vec<f32> = (0..d.batch * d.seq * d.width).map(|i| value(i + 3)).collect();
            let grad_out: Vec<f32> = (0..d.batch * d.seq * d.width).map(|i| value(i + 5)).collect();
            let run = |engine| {
                let (out, probs) = folded_forward(&qv, &keys, d, 0.3, true, engine);
                let probs = probs.unwrap();
                let (gqv, gk) = folded_backward(&qv, QvLayout::Rows, &keys, &probs, &grad_out, d, 0.3, engine);
                (out, probs, gqv, gk)
            };
            let gemm = run(Engine::Gemm);
            for engine in tile_engines() {
                let tiles = run(engine);
                assert!(max_rel_diff(&tiles.0, &gemm.0) < 1e-5, "{engine:?} {d:?}: outputs differ");
                assert!(max_rel_diff(&tiles.1, &gemm.1) < 1e-5, "{engine:?} {d:?}: probabilities differ");
                assert!(max_rel_diff(&tiles.2, &gemm.2) < 1e-5, "{engine:?} {d:?}: qv gradients differ");
                assert!(max_rel_diff(&tiles.3, &gemm.3) < 1e-5, "{engine:?} {d:?}: key gradients differ");
                // Without kept probabilities the output is the same.
                assert_eq!(folded_forward(&qv, &keys, d, 0.3, false, engine).0, tiles.0);
            }
        }
    }
}
