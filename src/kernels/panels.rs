//! The Linear layers' products on dits' own register tiles: `Y = X·B` with `B` (the weight, or
//! its transpose) packed once per call into panels of two vector registers' width (16 columns
//! with AVX2, 32 with AVX-512), and each finished group of rows handed back while it is still
//! in L1 (for the bias and activation).
//!
//! Why not gemm: for these shapes (a few hundred rows per block, 64 or 256 inputs) gemm repacks
//! the activations for every block, and its output then goes out to L2 before the epilogue
//! reads it back; here the rows are read in place, the weight's packed panels (at most
//! 256 × 32 floats each) stream from L2 in order, and the epilogue runs on a tile's rows at a
//! time. The register tile is two registers wide: six rows with AVX2's 16 registers (12
//! accumulators, 2 for the panel's row, 1 for the broadcast input, gemm's own AVX2 shape),
//! twelve rows with AVX-512's 32 (24 + 2 + 1).
//!
//! Each output is `Σₖ x[r, k]·B[k, j]` accumulated by FMAs in `k` order from zero, as gemm's
//! kernel does for one `k` block, so the result does not depend on how the rows are split, nor
//! on the register width: both widths give the same bits.

#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::buffer::assume_init;
use super::isa::{self, Isa};
#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
use super::tile::row_tiles;

/// Rows per register tile with AVX2: 12 accumulators, 2 panel registers, 1 broadcast of 16.
const TILE_ROWS: usize = 6;
/// Rows per register tile with AVX-512: 24 accumulators, 2 panel registers, 1 broadcast of 32.
const WIDE_TILE_ROWS: usize = 12;
/// The weight's share of L1 in one pass of the row tiles: two 64-input AVX-512 panels, beside
/// an image's 49 × 64 inputs (8, 16 and 32 KiB measured within the noise of each other, all
/// faster than one pass over all panels; README, "Speed").
#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
const L1_PANEL_BYTES: usize = 16 << 10;

/// Whether the panel products run: the kernels use AVX2 + FMA or AVX-512 ([`isa::active`]).
pub fn available() -> bool {
    isa::active() >= Isa::Avx2
}

/// Columns per panel for the kernels' vector extension: two registers.
pub fn width() -> usize {
    width_for(isa::active())
}

fn width_for(isa: Isa) -> usize {
    register_tile(isa).1
}

/// The register tile two vector registers wide, as `(rows, columns)`, for `isa`: what fills
/// its registers. The weight gradient's tiles (inputs by outputs) have the same shape.
pub(super) fn register_tile(isa: Isa) -> (usize, usize) {
    if isa >= Isa::Avx512 { (WIDE_TILE_ROWS, 32) } else { (TILE_ROWS, 16) }
}

/// What the tiles apply to their accumulators before storing them: the bias, then ReLU if
/// `relu`.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(all(target_arch = "x86_64", not(fuzzing))), allow(dead_code))]
struct InRegisters<'a> {
    bias: &'a [f32],
    relu: bool,
}

/// `B` `[k, n]` as `⌈n/width⌉` panels of `k × width` floats, the last one padded with zeros.
#[derive(Debug, Clone)]
pub struct Panels {
    data: Vec<f32>,
    k: usize,
    n: usize,
    /// Columns per panel, [`width`] when packed.
    width: usize,
}

impl Panels {
    /// Packs `B[k, j] = b[k·k_stride + j·n_stride]`, `k` and `n` at least 1, for the tiles of
    /// the kernels' vector extension.
    pub fn pack(b: &[f32], k: usize, n: usize, k_stride: usize, n_stride: usize) -> Self {
        Self::pack_for(isa::active(), b, k, n, k_stride, n_stride)
    }

    /// [`Self::pack`] for the tiles of `isa`.
    fn pack_for(isa: Isa, b: &[f32], k: usize, n: usize, k_stride: usize, n_stride: usize) -> Self {
        let width = width_for(isa);
        assert!(k > 0 && n > 0, "panels: empty B");
        assert!(
            (k - 1) * k_stride + (n - 1) * n_stride < b.len(),
            "panels: B does not cover [{k}, {n}] with strides ({k_stride}, {n_stride})"
        );
        let panels = n.div_ceil(width);
        let mut data = Vec::with_capacity(panels * k * width);
        let spare = &mut data.spare_capacity_mut()[..panels * k * width];
        for (p, panel) in spare.chunks_exact_mut(k * width).enumerate() {
            let (col, cols) = (p * width, (n - p * width).min(width));
            if cols < width {
                panel.fill(MaybeUninit::new(0.0));
            }
            if n_stride == 1 && cols == width {
                // Row by row of B, in fixed-size copies of 16 consecutive floats (vector moves,
                // where a slice copy of this length is a call to memcpy).
                for (kk, row) in panel.chunks_exact_mut(width).enumerate() {
                    let src = &b[kk * k_stride + col..][..width];
                    for (d, s) in row.chunks_exact_mut(16).zip(src.chunks_exact(16)) {
                        let s: &[f32; 16] = s.try_into().expect("16 floats");
                        let d: &mut [MaybeUninit<f32>; 16] = d.try_into().expect("16 floats");
                        *d = s.map(MaybeUninit::new);
                    }
                }
            } else if n_stride == 1 {
                for (kk, row) in panel.chunks_exact_mut(width).enumerate() {
                    let src = &b[kk * k_stride + col..][..cols];
                    row[..cols].iter_mut().zip(src).for_each(|(d, &s)| *d = MaybeUninit::new(s));
                }
            } else {
                // Column by column of B, reading each along k (a row of the weight when B is
                // its transpose).
                for j in 0..cols {
                    let src = &b[(col + j) * n_stride..];
                    for kk in 0..k {
                        panel[kk * width + j] = MaybeUninit::new(src[kk * k_stride]);
                    }
                }
            }
        }
        // SAFETY: every panel was written whole: its columns from B, its padding with zeros.
        unsafe { data.set_len(panels * k * width) };
        Panels { data, k, n, width }
    }

    /// `dst[r·n .. r·n + n] = x[r·k .. r·k + k] · B` for every row of `x` (row-major, `k`
    /// wide), writing all of `dst`; after each group of rows, `finish(first, rows)` with the
    /// index of the group's first row and its finished output rows, in order.
    pub fn product(&self, x: &[f32], dst: &mut [MaybeUninit<f32>], mut finish: impl FnMut(usize, &mut [f32])) {
        let n = self.n;
        let rows = self.rows_of(x, dst.len());
        let base: *mut f32 = dst.as_mut_ptr().cast();
        // SAFETY: panel p's columns of rows first.. of the row-major `dst`.
        let at = |first: usize, col: usize| (unsafe { base.add(first * n + col) }, n);
        self.tiles(x, rows, None, at, true, |first, count| {
            let done = &mut dst[first * n..(first + count) * n];
            // SAFETY: the tile wrote every element of its rows.
            finish(first, unsafe { assume_init(done) });
        });
    }

    /// `x · B + bias` with the output's columns in blocks of `group` (a multiple of the panel
    /// width that divides `n`), each block's rows together: element `(r, j)` at
    /// `dst[(j / group)·rows·group + r·group + j % group]`, all of `dst` written. For
    /// attention, whose heads each read a block: contiguous rows, no copy to gather them.
    pub fn product_in_groups(&self, x: &[f32], bias: &[f32], group: usize, dst: &mut [MaybeUninit<f32>]) {
        assert!(group > 0 && group.is_multiple_of(self.width) && self.n.is_multiple_of(group), "panels: bad group");
        assert_eq!(bias.len(), self.n, "panels: bias must have {} elements", self.n);
        let rows = self.rows_of(x, dst.len());
        let base: *mut f32 = dst.as_mut_ptr().cast();
        // SAFETY: panel p's columns of rows first.. inside its group's block of `dst`.
        let at = |first: usize, col: usize| {
            (unsafe { base.add((col / group) * rows * group + first * group + col % group) }, group)
        };
        self.tiles(x, rows, Some(InRegisters { bias, relu: false }), at, false, |_, _| {});
    }

    /// `act(x · B + bias)` into all of `dst` (row-major, like [`Self::product`]), with `act` the
    /// identity or, with `relu`, ReLU, both applied to the accumulators before they are stored:
    /// the same values as [`Self::product`] followed by the Linear epilogue, with no second pass
    /// over the rows.
    pub fn product_biased(&self, x: &[f32], bias: &[f32], relu: bool, dst: &mut [MaybeUninit<f32>]) {
        assert_eq!(bias.len(), self.n, "panels: bias must have {} elements", self.n);
        let n = self.n;
        let rows = self.rows_of(x, dst.len());
        let base: *mut f32 = dst.as_mut_ptr().cast();
        // SAFETY: panel p's columns of rows first.. of the row-major `dst`.
        let at = |first: usize, col: usize| (unsafe { base.add(first * n + col) }, n);
        self.tiles(x, rows, Some(InRegisters { bias, relu }), at, false, |_, _| {});
    }

    /// Panels per pass of the row tiles over `x`. All of them where each tile's rows are handed
    /// back finished; else, with AVX-512's panels, as many as fit in [`L1_PANEL_BYTES`] (at
    /// least one), so that every row tile after the first reads the pass's panels from L1,
    /// where a tile's pass over all panels streamed the whole weight from L2 again for each
    /// tile. AVX2's narrower panels measured no different (README, "Speed") and keep one pass.
    #[cfg(all(target_arch = "x86_64", not(fuzzing)))]
    fn panels_per_pass(&self, hand_back: bool) -> usize {
        let panels = self.n.div_ceil(self.width);
        if hand_back || self.width < 32 {
            return panels;
        }
        (L1_PANEL_BYTES / (self.k * self.width * size_of::<f32>())).clamp(1, panels)
    }

    /// Rows of `x`, checking that `x` and an output of `dst_len` values agree.
    fn rows_of(&self, x: &[f32], dst_len: usize) -> usize {
        assert!(
            isa::active() >= if self.width == 32 { Isa::Avx512 } else { Isa::Avx2 },
            "panels: {} columns per panel need a wider vector extension than the kernels use",
            self.width
        );
        let (k, n) = (self.k, self.n);
        let rows = x.len() / k;
        assert_eq!(x.len(), rows * k, "panels: x is not whole rows");
        assert_eq!(dst_len, rows * n, "panels: the output does not match x");
        rows
    }

    /// Every row tile over every panel, each stored through `at(first row, first column)` (the
    /// panel's first output and the stride between its rows); with `hand_back`, each row tile
    /// over all panels in turn, then `finished(first row, rows)`.
    fn tiles(
        &self,
        x: &[f32],
        rows: usize,
        bias: Option<InRegisters>,
        at: impl Fn(usize, usize) -> (*mut f32, usize),
        hand_back: bool,
        mut finished: impl FnMut(usize, usize),
    ) {
        #[cfg(all(target_arch = "x86_64", not(fuzzing)))]
        {
            let k = self.k;
            let wide = self.width == 32;
            let panels = self.n.div_ceil(self.width);
            let per_pass = self.panels_per_pass(hand_back);
            let mut start = 0;
            while start < panels {
                let pass = start..(start + per_pass).min(panels);
                start = pass.end;
                let mut first = 0;
                // Even tiles, not full ones and a latency-bound single row: 49 rows as 4 × 6 + 5 × 5
                // with AVX2, as 4 × 10 + 9 with AVX-512.
                for count in row_tiles(rows, if wide { WIDE_TILE_ROWS } else { TILE_ROWS }) {
                    let xp = x[first * k..].as_ptr();
                    let at = |col: usize| at(first, col);
                    let r = pass.clone();
                    // SAFETY: the extension of this width is present (`rows_of`); the tile's rows
                    // of x are in bounds, `at` gives in-bounds outputs for them (the callers'
                    // layouts), and the pass's panels are the weight's.
                    unsafe {
                        if wide {
                            match count {
                                1 => self.wide_tile::<1>(xp, bias, at, r),
                                2 => self.wide_tile::<2>(xp, bias, at, r),
                                3 => self.wide_tile::<3>(xp, bias, at, r),
                                4 => self.wide_tile::<4>(xp, bias, at, r),
                                5 => self.wide_tile::<5>(xp, bias, at, r),
                                6 => self.wide_tile::<6>(xp, bias, at, r),
                                7 => self.wide_tile::<7>(xp, bias, at, r),
                                8 => self.wide_tile::<8>(xp, bias, at, r),
                                9 => self.wide_tile::<9>(xp, bias, at, r),
                                10 => self.wide_tile::<10>(xp, bias, at, r),
                                11 => self.wide_tile::<11>(xp, bias, at, r),
                                _ => self.wide_tile::<12>(xp, bias, at, r),
                            }
                        } else {
                            match count {
                                1 => self.row_tile::<1>(xp, bias, at, r),
                                2 => self.row_tile::<2>(xp, bias, at, r),
                                3 => self.row_tile::<3>(xp, bias, at, r),
                                4 => self.row_tile::<4>(xp, bias, at, r),
                                5 => self.row_tile::<5>(xp, bias, at, r),
                                _ => self.row_tile::<6>(xp, bias, at, r),
                            }
                        }
                    }
                    if pass.end == panels {
                        finished(first, count);
                    }
                    first += count;
                }
            }
        }
        #[cfg(not(all(target_arch = "x86_64", not(fuzzing))))]
        {
            let _ = (&self.data, x, rows, bias, at, hand_back, &mut finished);
            unreachable!("panels: x86-64 tiles off x86-64")
        }
    }

    /// `R` rows of the output for the panels in `panels` (16 columns each, in two 8-lane
    /// registers), plus the bias when given (after the products, as the Linear epilogue adds
    /// it), then ReLU if asked.
    ///
    /// # Safety
    /// AVX2 + FMA; `x` covers `R` rows of `k`; `at(col)` covers `R` rows of the panel's columns.
    #[cfg(all(target_arch = "x86_64", not(fuzzing)))]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn row_tile<const R: usize>(
        &self,
        x: *const f32,
        bias: Option<InRegisters>,
        at: impl Fn(usize) -> (*mut f32, usize),
        panels: std::ops::Range<usize>,
    ) {
        const PANEL: usize = 16;
        let (k, n) = (self.k, self.n);
        // SAFETY: the caller's contract; each panel holds k × 16 floats.
        unsafe {
            for (p, panel) in self.data.chunks_exact(k * PANEL).enumerate().skip(panels.start).take(panels.len()) {
                let mut acc = [[_mm256_setzero_ps(); 2]; R];
                let mut w = panel.as_ptr();
                for kk in 0..k {
                    let (b0, b1) = (_mm256_loadu_ps(w), _mm256_loadu_ps(w.add(8)));
                    for (i, a) in acc.iter_mut().enumerate() {
                        let xi = _mm256_broadcast_ss(&*x.add(i * k + kk));
                        a[0] = _mm256_fmadd_ps(xi, b0, a[0]);
                        a[1] = _mm256_fmadd_ps(xi, b1, a[1]);
                    }
                    w = w.add(PANEL);
                }
                let col = p * PANEL;
                let cols = (n - col).min(PANEL);
                if let Some(InRegisters { bias, relu }) = bias {
                    // A partial last panel's bias, padded with zeros (its padding lanes are not stored).
                    let mut padded = [0.0f32; PANEL];
                    let b = if cols == PANEL {
                        bias[col..].as_ptr()
                    } else {
                        padded[..cols].copy_from_slice(&bias[col..col + cols]);
                        padded.as_ptr()
                    };
                    let (b0, b1) = (_mm256_loadu_ps(b), _mm256_loadu_ps(b.add(8)));
                    for a in acc.iter_mut() {
                        a[0] = _mm256_add_ps(a[0], b0);
                        a[1] = _mm256_add_ps(a[1], b1);
                    }
                    if relu {
                        // `vmaxps` with zero second: NaN becomes 0, as `f32::max(NaN, 0.0)` does.
                        let zero = _mm256_setzero_ps();
                        for a in acc.iter_mut() {
                            a[0] = _mm256_max_ps(a[0], zero);
                            a[1] = _mm256_max_ps(a[1], zero);
                        }
                    }
                }
                let (out, stride) = at(col);
                for (i, a) in acc.iter().enumerate() {
                    let out = out.add(i * stride);
                    if cols == PANEL {
                        _mm256_storeu_ps(out, a[0]);
                        _mm256_storeu_ps(out.add(8), a[1]);
                    } else {
                        let mut spill = [0.0f32; PANEL];
                        _mm256_storeu_ps(spill.as_mut_ptr(), a[0]);
                        _mm256_storeu_ps(spill.as_mut_ptr().add(8), a[1]);
                        std::ptr::copy_nonoverlapping(spill.as_ptr(), out, cols);
                    }
                }
            }
        }
    }

    /// [`Self::row_tile`] with AVX-512: 32 columns in two 16-lane registers, up to twelve rows;
    /// the partial last panel's bias is loaded and its outputs stored through lane masks.
    ///
    /// # Safety
    /// AVX-512F; `x` covers `R` rows of `k`; `at(col)` covers `R` rows of the panel's columns.
    #[cfg(all(target_arch = "x86_64", not(fuzzing)))]
    #[target_feature(enable = "avx512f")]
    unsafe fn wide_tile<const R: usize>(
        &self,
        x: *const f32,
        bias: Option<InRegisters>,
        at: impl Fn(usize) -> (*mut f32, usize),
        panels: std::ops::Range<usize>,
    ) {
        const PANEL: usize = 32;
        let (k, n) = (self.k, self.n);
        // SAFETY: the caller's contract; each panel holds k × 32 floats; masked lanes are
        // neither read nor written.
        unsafe {
            for (p, panel) in self.data.chunks_exact(k * PANEL).enumerate().skip(panels.start).take(panels.len()) {
                let mut acc = [[_mm512_setzero_ps(); 2]; R];
                let mut w = panel.as_ptr();
                for kk in 0..k {
                    let (b0, b1) = (_mm512_loadu_ps(w), _mm512_loadu_ps(w.add(16)));
                    for (i, a) in acc.iter_mut().enumerate() {
                        let xi = _mm512_set1_ps(*x.add(i * k + kk));
                        a[0] = _mm512_fmadd_ps(xi, b0, a[0]);
                        a[1] = _mm512_fmadd_ps(xi, b1, a[1]);
                    }
                    w = w.add(PANEL);
                }
                let col = p * PANEL;
                let cols = (n - col).min(PANEL);
                let lanes = |from: usize| -> __mmask16 {
                    let c = cols.saturating_sub(from).min(16);
                    if c == 16 { 0xffff } else { (1u16 << c) - 1 }
                };
                let (m0, m1) = (lanes(0), lanes(16));
                if let Some(InRegisters { bias, relu }) = bias {
                    let b = bias[col..].as_ptr();
                    let (b0, b1) = (_mm512_maskz_loadu_ps(m0, b), _mm512_maskz_loadu_ps(m1, b.add(16)));
                    for a in acc.iter_mut() {
                        a[0] = _mm512_add_ps(a[0], b0);
                        a[1] = _mm512_add_ps(a[1], b1);
                    }
                    if relu {
                        // `vmaxps` with zero second: NaN becomes 0, as `f32::max(NaN, 0.0)` does.
                        let zero = _mm512_setzero_ps();
                        for a in acc.iter_mut() {
                            a[0] = _mm512_max_ps(a[0], zero);
                            a[1] = _mm512_max_ps(a[1], zero);
                        }
                    }
                }
                let (out, stride) = at(col);
                for (i, a) in acc.iter().enumerate() {
                    let out = out.add(i * stride);
                    if cols == PANEL {
                        _mm512_storeu_ps(out, a[0]);
                        _mm512_storeu_ps(out.add(16), a[1]);
                    } else {
                        _mm512_mask_storeu_ps(out, m0, a[0]);
                        if m1 != 0 {
                            _mm512_mask_storeu_ps(out.add(16), m1, a[1]);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64", not(fuzzing)))]
mod tests {
    use super::*;
    use crate::kernels::isa::tile_extensions;
    use crate::kernels::linear::{Activation, epilogue};

    /// Every shape class (full and partial panels, every remainder of the row tile, k of 1) and
    /// both packings, against the definition in f64; `finish` sees every row once, in order.
    #[test]
    fn matches_the_definition() {
        if !available() {
            eprintln!("the kernels do not run AVX2 or AVX-512: the panel products are not used here");
            return;
        }
        let mut rng = crate::rng::stream(9, crate::rng::Purpose::Bench, 0);
        let shapes = [(13, 64, 512), (6, 256, 64), (7, 5, 21), (1, 1, 1), (11, 64, 16), (0, 3, 4), (25, 7, 45)];
        for ((rows, k, n), isa) in shapes.into_iter().flat_map(|s| tile_extensions().into_iter().map(move |e| (s, e))) {
            let x = crate::rng::standard_normal(&mut rng, rows * k);
            let w = crate::rng::standard_normal(&mut rng, k * n);
            for transposed in [false, true] {
                let panels = if transposed {
                    Panels::pack_for(isa, &w, k, n, 1, k)
                } else {
                    Panels::pack_for(isa, &w, k, n, n, 1)
                };
                let b = |kk: usize, j: usize| if transposed { w[j * k + kk] } else { w[kk * n + j] };
                let mut dst = vec![MaybeUninit::new(f32::NAN); rows * n];
                let mut seen = 0;
                panels.product(&x, &mut dst, |first, done| {
                    assert_eq!(first, seen, "rows finished out of order");
                    seen += done.len() / n;
                });
                // SAFETY: `product` writes all of dst (and it was initialised anyway).
                let dst = unsafe { assume_init(&mut dst) };
                assert_eq!(seen, rows);
                for r in 0..rows {
                    for j in 0..n {
                        let want: f64 = (0..k).map(|kk| x[r * k + kk] as f64 * b(kk, j) as f64).sum();
                        let got = dst[r * n + j] as f64;
                        assert!((got - want).abs() <= 1e-4 * (1.0 + want.abs()), "{isa:?} {rows}×{k}×{n} [{r},{j}]");
                    }
                }
            }
        }
    }

    /// The bias and ReLU applied in registers: the same bits as the product followed by the
    /// Linear epilogue, partial last panel included.
    #[test]
    fn biased_equals_the_product_then_the_epilogue() {
        if !available() {
            return;
        }
        let mut rng = crate::rng::stream(12, crate::rng::Purpose::Bench, 0);
        // With AVX-512 the biased product makes passes of two panels (the first), of one panel
        // (256 inputs), and of two, two and a partial one (the last), where `product` makes one.
        let shapes = [(49, 64, 256), (13, 5, 21), (1, 256, 64), (25, 9, 40), (30, 64, 135)];
        for ((rows, k, n), isa) in shapes.into_iter().flat_map(|s| tile_extensions().into_iter().map(move |e| (s, e))) {
            let x = crate::rng::standard_normal(&mut rng, rows * k);
            let w = crate::rng::standard_normal(&mut rng, k * n);
            let bias = crate::rng::standard_normal(&mut rng, n);
            let panels = Panels::pack_for(isa, &w, k, n, n, 1);
            for act in [Activation::Identity, Activation::Relu] {
                let mut plain = vec![MaybeUninit::new(0.0); rows * n];
                panels.product(&x, &mut plain, |_, done| epilogue(done, &mut [], &bias, act));
                let mut biased = vec![MaybeUninit::new(f32::NAN); rows * n];
                panels.product_biased(&x, &bias, act == Activation::Relu, &mut biased);
                // SAFETY: both were initialised.
                let (plain, biased) = unsafe { (assume_init(&mut plain), assume_init(&mut biased)) };
                let differ = plain.iter().zip(biased.iter()).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
                assert_eq!(differ, 0, "{isa:?} {rows}×{k}×{n} {act:?}: {differ} values differ");
            }
        }
    }

    /// Grouped outputs with the bias: each element where the layout puts it, equal bit for bit
    /// to the row-major product plus the bias.
    #[test]
    fn groups_hold_the_row_major_product_plus_bias() {
        if !available() {
            return;
        }
        let mut rng = crate::rng::stream(10, crate::rng::Purpose::Bench, 0);
        let cases: [(usize, usize, usize, usize); 4] =
            [(49, 64, 512, 64), (7, 3, 32, 16), (1, 8, 64, 32), (13, 5, 96, 32)];
        for ((rows, k, n, group), isa) in
            cases.into_iter().flat_map(|s| tile_extensions().into_iter().map(move |e| (s, e)))
        {
            if !group.is_multiple_of(width_for(isa)) {
                continue;
            }
            let x = crate::rng::standard_normal(&mut rng, rows * k);
            let w = crate::rng::standard_normal(&mut rng, k * n);
            let bias = crate::rng::standard_normal(&mut rng, n);
            let panels = Panels::pack_for(isa, &w, k, n, n, 1);
            let mut plain = vec![MaybeUninit::new(0.0); rows * n];
            panels.product(&x, &mut plain, |_, done| {
                for row in done.chunks_exact_mut(n) {
                    row.iter_mut().zip(&bias).for_each(|(y, b)| *y += b);
                }
            });
            let mut grouped = vec![MaybeUninit::new(f32::NAN); rows * n];
            panels.product_in_groups(&x, &bias, group, &mut grouped);
            // SAFETY: both were initialised.
            let (plain, grouped) = unsafe { (assume_init(&mut plain), assume_init(&mut grouped)) };
            for r in 0..rows {
                for j in 0..n {
                    let got = grouped[(j / group) * rows * group + r * group + j % group];
                    assert_eq!(got.to_bits(), plain[r * n + j].to_bits(), "{isa:?} {rows}×{k}×{n}/{group} [{r},{j}]");
                }
            }
        }
    }

    /// Both register widths sum each output in the same order: the same bits, so a model's
    /// results do not depend on which extension the machine has.
    #[test]
    fn both_widths_give_the_same_bits() {
        if isa::active() < Isa::Avx512 {
            return;
        }
        let mut rng = crate::rng::stream(13, crate::rng::Purpose::Bench, 0);
        for (rows, k, n) in [(49, 64, 512), (50, 256, 64), (13, 7, 45)] {
            let x = crate::rng::standard_normal(&mut rng, rows * k);
            let w = crate::rng::standard_normal(&mut rng, k * n);
            let bias = crate::rng::standard_normal(&mut rng, n);
            let run = |isa| {
                let mut dst = vec![MaybeUninit::new(f32::NAN); rows * n];
                Panels::pack_for(isa, &w, k, n, n, 1).product_biased(&x, &bias, true, &mut dst);
                // SAFETY: `product_biased` writes all of dst (and it was initialised anyway).
                unsafe { assume_init(&mut dst) }.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            assert_eq!(run(Isa::Avx2), run(Isa::Avx512), "{rows}×{k}×{n}");
        }
    }
}
