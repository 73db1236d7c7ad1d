//! The Linear layers' products on CPUs with AVX2 and FMA but no AVX-512: `Y = X·B` with `B`
//! (the weight, or its transpose) packed once per call into panels of 16 columns, and each
//! finished group of rows handed back while it is still in L1 (for the bias and activation).
//!
//! Why not gemm, which the AVX-512 path keeps: for these shapes (a few hundred rows per block,
//! 64 or 256 inputs) gemm repacks the activations for every block, and its output then goes out
//! to L2 before the epilogue reads it back; here the rows are read in place, the weight's packed
//! panels (at most 256 × 16 floats each) stream from L2 in order, and the epilogue runs on six
//! rows at a time. The register tile is gemm's own shape: six rows by two 8-lane registers,
//! 12 accumulators, 2 registers for the panel's row and 1 for the broadcast input.
//!
//! Each output is `Σₖ x[r, k]·B[k, j]` accumulated by FMAs in `k` order from zero, as gemm's
//! kernel does for one `k` block, so the result does not depend on how the rows are split.

#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::buffer::assume_init;
#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
use super::tile::row_tiles;

/// Columns per panel: two 8-lane registers.
const PANEL: usize = 16;
/// Rows per register tile.
#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
const TILE_ROWS: usize = 6;

/// Whether [`Panels::product`] runs: the kernels use exactly AVX2 + FMA ([`super::isa::active`];
/// on AVX-512 the Linear layers keep gemm's 512-bit kernels).
pub fn available() -> bool {
    super::isa::active() == super::isa::Isa::Avx2
}

/// What the tiles apply to their accumulators before storing them: the bias, then ReLU if
/// `relu`.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(all(target_arch = "x86_64", not(fuzzing))), allow(dead_code))]
struct InRegisters<'a> {
    bias: &'a [f32],
    relu: bool,
}

/// `B` `[k, n]` as `⌈n/16⌉` panels of `k × 16` floats, the last one padded with zeros.
#[derive(Debug, Clone)]
pub struct Panels {
    data: Vec<f32>,
    k: usize,
    n: usize,
}

impl Panels {
    /// Packs `B[k, j] = b[k·k_stride + j·n_stride]`, `k` and `n` at least 1.
    pub fn pack(b: &[f32], k: usize, n: usize, k_stride: usize, n_stride: usize) -> Self {
        assert!(k > 0 && n > 0, "panels: empty B");
        assert!(
            (k - 1) * k_stride + (n - 1) * n_stride < b.len(),
            "panels: B does not cover [{k}, {n}] with strides ({k_stride}, {n_stride})"
        );
        let panels = n.div_ceil(PANEL);
        let mut data = Vec::with_capacity(panels * k * PANEL);
        let spare = &mut data.spare_capacity_mut()[..panels * k * PANEL];
        for (p, panel) in spare.chunks_exact_mut(k * PANEL).enumerate() {
            let (col, cols) = (p * PANEL, (n - p * PANEL).min(PANEL));
            if cols < PANEL {
                panel.fill(MaybeUninit::new(0.0));
            }
            if n_stride == 1 && cols == PANEL {
                // Row by row of B, 16 consecutive floats each: a fixed-size copy, two vector
                // moves, where a slice copy of this length is a call to memcpy.
                for (kk, row) in panel.chunks_exact_mut(PANEL).enumerate() {
                    let src: &[f32; PANEL] = b[kk * k_stride + col..][..PANEL].try_into().expect("16 floats");
                    let row: &mut [MaybeUninit<f32>; PANEL] = row.try_into().expect("16 floats");
                    *row = src.map(MaybeUninit::new);
                }
            } else if n_stride == 1 {
                for (kk, row) in panel.chunks_exact_mut(PANEL).enumerate() {
                    let src = &b[kk * k_stride + col..][..cols];
                    row[..cols].iter_mut().zip(src).for_each(|(d, &s)| *d = MaybeUninit::new(s));
                }
            } else {
                // Column by column of B, reading each along k (a row of the weight when B is
                // its transpose).
                for j in 0..cols {
                    let src = &b[(col + j) * n_stride..];
                    for kk in 0..k {
                        panel[kk * PANEL + j] = MaybeUninit::new(src[kk * k_stride]);
                    }
                }
            }
        }
        // SAFETY: every panel was written whole: its columns from B, its padding with zeros.
        unsafe { data.set_len(panels * k * PANEL) };
        Panels { data, k, n }
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
        self.tiles(x, rows, None, at, |first, count| {
            let done = &mut dst[first * n..(first + count) * n];
            // SAFETY: the tile wrote every element of its rows.
            finish(first, unsafe { assume_init(done) });
        });
    }

    /// `x · B + bias` with the output's columns in blocks of `group` (a multiple of 16 that
    /// divides `n`), each block's rows together: element `(r, j)` at
    /// `dst[(j / group)·rows·group + r·group + j % group]`, all of `dst` written. For
    /// attention, whose heads each read a block: contiguous rows, no copy to gather them.
    pub fn product_in_groups(&self, x: &[f32], bias: &[f32], group: usize, dst: &mut [MaybeUninit<f32>]) {
        assert!(group > 0 && group.is_multiple_of(PANEL) && self.n.is_multiple_of(group), "panels: bad group");
        assert_eq!(bias.len(), self.n, "panels: bias must have {} elements", self.n);
        let rows = self.rows_of(x, dst.len());
        let base: *mut f32 = dst.as_mut_ptr().cast();
        // SAFETY: panel p's columns of rows first.. inside its group's block of `dst`.
        let at = |first: usize, col: usize| {
            (unsafe { base.add((col / group) * rows * group + first * group + col % group) }, group)
        };
        self.tiles(x, rows, Some(InRegisters { bias, relu: false }), at, |_, _| {});
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
        self.tiles(x, rows, Some(InRegisters { bias, relu }), at, |_, _| {});
    }

    /// Rows of `x`, checking that `x` and an output of `dst_len` values agree.
    fn rows_of(&self, x: &[f32], dst_len: usize) -> usize {
        assert!(available(), "panels: the AVX2 products need AVX2 + FMA");
        let (k, n) = (self.k, self.n);
        let rows = x.len() / k;
        assert_eq!(x.len(), rows * k, "panels: x is not whole rows");
        assert_eq!(dst_len, rows * n, "panels: the output does not match x");
        rows
    }

    /// Every row tile in order, each stored through `at(first row, first column)` (the panel's
    /// first output and the stride between its rows), then `finished(first row, rows)`.
    fn tiles(
        &self,
        x: &[f32],
        rows: usize,
        bias: Option<InRegisters>,
        at: impl Fn(usize, usize) -> (*mut f32, usize),
        mut finished: impl FnMut(usize, usize),
    ) {
        #[cfg(all(target_arch = "x86_64", not(fuzzing)))]
        {
            let k = self.k;
            let mut first = 0;
            // Even tiles: 49 rows as 4 × 6 + 5 × 5, not 8 × 6 and a latency-bound single row.
            for count in row_tiles(rows, TILE_ROWS) {
                let xp = x[first * k..].as_ptr();
                let at = |col: usize| at(first, col);
                // SAFETY: AVX2 + FMA are present (`rows_of`); the tile's rows of x are in
                // bounds, and `at` gives in-bounds outputs for them (the callers' layouts).
                unsafe {
                    match count {
                        1 => self.row_tile::<1>(xp, bias, at),
                        2 => self.row_tile::<2>(xp, bias, at),
                        3 => self.row_tile::<3>(xp, bias, at),
                        4 => self.row_tile::<4>(xp, bias, at),
                        5 => self.row_tile::<5>(xp, bias, at),
                        _ => self.row_tile::<6>(xp, bias, at),
                    }
                }
                finished(first, count);
                first += count;
            }
        }
        #[cfg(not(all(target_arch = "x86_64", not(fuzzing))))]
        {
            let _ = (&self.data, x, rows, bias, at, &mut finished);
            unreachable!("panels: AVX2 products off x86-64")
        }
    }

    /// `R` rows of the output, panel by panel, plus the bias when given (after the products, as
    /// the Linear epilogue adds it), then ReLU if asked.
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
    ) {
        let (k, n) = (self.k, self.n);
        // SAFETY: the caller's contract; each panel holds k × 16 floats.
        unsafe {
            for (p, panel) in self.data.chunks_exact(k * PANEL).enumerate() {
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
}

#[cfg(all(test, target_arch = "x86_64", not(fuzzing)))]
mod tests {
    use super::*;
    use crate::kernels::linear::{Activation, epilogue};

    /// Every shape class (full and partial panels, every remainder of the row tile, k of 1) and
    /// both packings, against the definition in f64; `finish` sees every row once, in order.
    #[test]
    fn matches_the_definition() {
        if !available() {
            eprintln!("the kernels do not run AVX2 exactly: the panel products are not used here");
            return;
        }
        let mut rng = crate::rng::stream(9, crate::rng::Purpose::Bench, 0);
        for (rows, k, n) in [(13, 64, 512), (6, 256, 64), (7, 5, 21), (1, 1, 1), (11, 64, 16), (0, 3, 4)] {
            let x = crate::rng::standard_normal(&mut rng, rows * k);
            let w = crate::rng::standard_normal(&mut rng, k * n);
            for transposed in [false, true] {
                let panels = if transposed { Panels::pack(&w, k, n, 1, k) } else { Panels::pack(&w, k, n, n, 1) };
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
                        assert!((got - want).abs() <= 1e-4 * (1.0 + want.abs()), "{rows}×{k}×{n} [{r},{j}]");
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
        for (rows, k, n) in [(49, 64, 256), (13, 5, 21), (1, 256, 64)] {
            let x = crate::rng::standard_normal(&mut rng, rows * k);
            let w = crate::rng::standard_normal(&mut rng, k * n);
            let bias = crate::rng::standard_normal(&mut rng, n);
            let panels = Panels::pack(&w, k, n, n, 1);
            for act in [Activation::Identity, Activation::Relu] {
                let mut plain = vec![MaybeUninit::new(0.0); rows * n];
                panels.product(&x, &mut plain, |_, done| epilogue(done, &mut [], &bias, act));
                let mut biased = vec![MaybeUninit::new(f32::NAN); rows * n];
                panels.product_biased(&x, &bias, act == Activation::Relu, &mut biased);
                // SAFETY: both were initialised.
                let (plain, biased) = unsafe { (assume_init(&mut plain), assume_init(&mut biased)) };
                let differ = plain.iter().zip(biased.iter()).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
                assert_eq!(differ, 0, "{rows}×{k}×{n} {act:?}: {differ} values differ");
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
        for (rows, k, n, group) in [(49, 64, 512, 64), (7, 3, 32, 16), (1, 8, 64, 32)] {
            let x = crate::rng::standard_normal(&mut rng, rows * k);
            let w = crate::rng::standard_normal(&mut rng, k * n);
            let bias = crate::rng::standard_normal(&mut rng, n);
            let panels = Panels::pack(&w, k, n, n, 1);
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
                    assert_eq!(got.to_bits(), plain[r * n + j].to_bits(), "{rows}×{k}×{n}/{group} [{r},{j}]");
                }
            }
        }
    }
}
