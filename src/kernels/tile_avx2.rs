//! The register tiles of [`super::tile`] for CPUs with AVX2 and FMA but no AVX-512 (AMD before
//! Zen 4, Intel client CPUs): the same products, `C[r, 0..n] = Σₓ L(r, x) · R[x, 0..n]`, with
//! the same contract, sized for sixteen 8-lane registers.
//!
//! A tile is six rows of `C` by two registers (16 columns): 12 accumulators, 2 registers for the
//! row of `R` and 1 for the broadcast scalar of `L`, 15 of the 16. Each step of `x` is 2 loads of
//! `R`, 6 broadcasts and 12 FMAs, so the two FMA ports, not the loads, set the pace. (Four rows
//! by three registers also fit, 12 + 3 + 1 = 16, but a 64-wide head splits into 24 + 24 + 16
//! columns, the last block a third empty.)

#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
use std::arch::x86_64::*;

use super::tile::Strided;
#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
use super::tile::row_tiles;

/// Rows of `C` per register tile.
#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
const TILE_ROWS: usize = 6;
/// Columns of `C` per tile: two 8-lane registers.
#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
const TILE_COLS: usize = 16;

/// Whether [`broadcast_product`] runs: the kernels use AVX2 + FMA or wider ([`super::isa::active`],
/// which is the portable code in fuzz builds and off x86-64).
pub fn available() -> bool {
    super::isa::active() >= super::isa::Isa::Avx2
}

/// `dst[r·dst_rs + j] = Σ_{x<xs} L(r, x) · rhs[x·rhs_rs + j]` for `r < rows`, `j < n`; with
/// `accumulate`, `dst += …` instead.
///
/// # Safety
/// [`available`] must be true; the pointers must cover the strided ranges (only the `n` columns
/// of `rhs` and `dst` are touched: a last partial register is loaded and stored masked), and
/// `dst` must not overlap the operands.
#[allow(clippy::too_many_arguments)]
#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn broadcast_product(
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
    // SAFETY: the caller's contract; the column blocks and row tiles below stay inside it.
    unsafe {
        let mut col = 0;
        while col < n {
            let width = (n - col).min(TILE_COLS);
            let registers = width.div_ceil(8);
            let last = Lanes::new(width - 8 * (registers - 1));
            let mut row = 0;
            for tile_rows in row_tiles(rows, TILE_ROWS) {
                let l = Strided { ptr: lhs.ptr.add(row * lhs.row_stride), ..lhs };
                let (c, r) = (dst.add(row * dst_rs + col), rhs.add(col));
                // The last register's mask is a compile-time choice, so a full tile's inner loop
                // carries no lane test.
                macro_rules! by_rows {
                    ($v:literal, $full:literal) => {
                        match tile_rows {
                            1 => tile::<1, $v, $full>(xs, c, dst_rs, l, r, rhs_rs, last, accumulate),
                            2 => tile::<2, $v, $full>(xs, c, dst_rs, l, r, rhs_rs, last, accumulate),
                            3 => tile::<3, $v, $full>(xs, c, dst_rs, l, r, rhs_rs, last, accumulate),
                            4 => tile::<4, $v, $full>(xs, c, dst_rs, l, r, rhs_rs, last, accumulate),
                            5 => tile::<5, $v, $full>(xs, c, dst_rs, l, r, rhs_rs, last, accumulate),
                            _ => tile::<6, $v, $full>(xs, c, dst_rs, l, r, rhs_rs, last, accumulate),
                        }
                    };
                }
                match (registers, last.full) {
                    (2, true) => by_rows!(2, true),
                    (2, false) => by_rows!(2, false),
                    (_, true) => by_rows!(1, true),
                    (_, false) => by_rows!(1, false),
                }
                row += tile_rows;
            }
            col += width;
        }
    }
}

/// Off x86-64 [`available`] is false and this is never called.
///
/// # Safety
/// Never to be called.
#[allow(clippy::too_many_arguments)]
#[cfg(not(all(target_arch = "x86_64", not(fuzzing))))]
pub unsafe fn broadcast_product(
    _: usize,
    _: usize,
    _: usize,
    _: *mut f32,
    _: usize,
    _: Strided,
    _: *const f32,
    _: usize,
    _: bool,
) {
    unreachable!("AVX2 tiled products need AVX2 and FMA (tile_avx2::available() is false)")
}

/// The first `n` of an 8-lane register, for the AVX2 code's partial last registers (AVX2 has no
/// mask registers: a lane-mask vector for `vmaskmovps`). Full registers use plain loads and
/// stores instead: AMD runs the `vmaskmovps` store as microcode, many times slower. Shared by
/// the tiles, the softmax and the transposes; the tiles take `full` as a const parameter `FULL`.
#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
#[derive(Clone, Copy)]
pub(super) struct Lanes {
    pub(super) full: bool,
    mask: __m256i,
}

#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
impl Lanes {
    /// The first `n.min(8)` lanes.
    #[target_feature(enable = "avx2")]
    pub(super) fn new(n: usize) -> Self {
        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n.min(8) as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        Lanes { full: n >= 8, mask }
    }

    /// # Safety
    /// `p` covers the lanes in use; `FULL` is `self.full`.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(super) unsafe fn load<const FULL: bool>(self, p: *const f32) -> __m256 {
        // SAFETY: the caller's; masked lanes are not read.
        unsafe { if FULL { _mm256_loadu_ps(p) } else { _mm256_maskload_ps(p, self.mask) } }
    }

    /// # Safety
    /// As [`Lanes::load`].
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(super) unsafe fn store<const FULL: bool>(self, p: *mut f32, v: __m256) {
        // SAFETY: the caller's; masked lanes are not written.
        unsafe { if FULL { _mm256_storeu_ps(p, v) } else { _mm256_maskstore_ps(p, self.mask, v) } }
    }

    /// [`Lanes::load`] with `full` tested at run time.
    ///
    /// # Safety
    /// `p` covers the lanes in use.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(super) unsafe fn read(self, p: *const f32) -> __m256 {
        // SAFETY: the caller's.
        unsafe { if self.full { self.load::<true>(p) } else { self.load::<false>(p) } }
    }

    /// [`Lanes::store`] with `full` tested at run time.
    ///
    /// # Safety
    /// `p` covers the lanes in use.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(super) unsafe fn write(self, p: *mut f32, v: __m256) {
        // SAFETY: the caller's.
        unsafe { if self.full { self.store::<true>(p, v) } else { self.store::<false>(p, v) } }
    }
}

/// One `ROWS × 8·V` tile of `C` over the whole `x` range, in registers.
#[allow(clippy::too_many_arguments)]
#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile<const ROWS: usize, const V: usize, const FULL: bool>(
    xs: usize,
    c: *mut f32,
    c_rs: usize,
    l: Strided,
    r: *const f32,
    r_rs: usize,
    last: Lanes,
    accumulate: bool,
) {
    // SAFETY: forwarded from `broadcast_product`; masked lanes are neither read nor written.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); V]; ROWS];
        if accumulate {
            for (i, acc_row) in acc.iter_mut().enumerate() {
                for (v, a) in acc_row.iter_mut().enumerate() {
                    let p = c.add(i * c_rs + 8 * v);
                    *a = if v + 1 == V { last.load::<FULL>(p) } else { _mm256_loadu_ps(p) };
                }
            }
        }
        for x in 0..xs {
            let r_row = r.add(x * r_rs);
            let mut rv = [_mm256_setzero_ps(); V];
            for (v, reg) in rv.iter_mut().enumerate() {
                let p = r_row.add(8 * v);
                *reg = if v + 1 == V { last.load::<FULL>(p) } else { _mm256_loadu_ps(p) };
            }
            let l_x = l.ptr.add(x * l.x_stride);
            for (i, acc_row) in acc.iter_mut().enumerate() {
                let b = _mm256_set1_ps(*l_x.add(i * l.row_stride));
                for v in 0..V {
                    acc_row[v] = _mm256_fmadd_ps(b, rv[v], acc_row[v]);
                }
            }
        }
        for (i, acc_row) in acc.iter().enumerate() {
            for (v, &a) in acc_row.iter().enumerate() {
                let p = c.add(i * c_rs + 8 * v);
                if v + 1 == V { last.store::<FULL>(p, a) } else { _mm256_storeu_ps(p, a) }
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64", not(fuzzing)))]
mod tests {
    #[test]
    fn matches_the_definition() {
        if !super::available() {
            eprintln!("no AVX2 + FMA: the AVX2 tiled products are not used on this CPU");
            return;
        }
        super::super::tile::assert_matches_the_definition(super::broadcast_product);
    }
}
