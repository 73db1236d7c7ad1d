//! The small products of attention (49–196 tokens × 64-wide heads), as AVX-512 register tiles.
//!
//! gemm is built for large matrices: at 49×49×64 it spends its time packing operands, padding
//! 49 rows to its 48+16 micro-kernel edge, and in call overhead, and ran attention at under a
//! third of the FMA peak while the Linear layers ran at the peak. Every attention product, in
//! the forward and the backward pass, has the form
//!
//! `C[r, 0..n] = Σₓ L(r, x) · R[x, 0..n]`
//!
//! with `R` row-major and `L` read one scalar at a time through arbitrary strides (so `L` may be
//! a transposed view: no copies). Here `n ≤ 64` columns sit in four 16-lane registers, six rows
//! of `C` in 24 accumulators, and each step of `x` loads one row of `R` and broadcasts six
//! scalars of `L`: nothing is packed or padded (a 49-row product is eight tiles and one row).

#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
use std::arch::x86_64::*;

/// Rows of `C` per register tile: 24 accumulators + 4 row registers + 1 broadcast fit AVX-512's
/// 32 registers. (Seven rows, 28 + 4 + 1 = 33, make LLVM spill an accumulator to the stack in
/// the inner loop: slower, README "Speed".)
#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
const TILE_ROWS: usize = 6;
/// Columns of `C` per tile: four 16-lane registers.
#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
const TILE_COLS: usize = 64;

/// Whether [`broadcast_product`] runs: the kernels use AVX-512 or wider ([`super::isa::active`],
/// which is the portable code in fuzz builds and off x86-64).
pub fn available() -> bool {
    super::isa::active() >= super::isa::Isa::Avx512
}

/// Operand `L` of [`broadcast_product`]: element `(r, x)` at `ptr[r·row_stride + x·x_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct Strided {
    pub ptr: *const f32,
    pub row_stride: usize,
    pub x_stride: usize,
}

/// `dst[r·dst_rs + j] = Σ_{x<xs} L(r, x) · rhs[x·rhs_rs + j]` for `r < rows`, `j < n`; with
/// `accumulate`, `dst += …` instead.
///
/// # Safety
/// [`available`] must be true; the pointers must cover the strided ranges (only the `n` columns
/// of `rhs` and `dst` are touched: the last partial register is loaded and stored masked), and
/// `dst` must not overlap the operands.
#[allow(clippy::too_many_arguments)]
#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
#[target_feature(enable = "avx512f")]
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
            let registers = width.div_ceil(16);
            let rem = width - 16 * (registers - 1);
            let mask: __mmask16 = if rem == 16 { 0xffff } else { (1u16 << rem) - 1 };
            let mut row = 0;
            for tile_rows in row_tiles(rows, TILE_ROWS) {
                let l = Strided { ptr: lhs.ptr.add(row * lhs.row_stride), ..lhs };
                let (c, r) = (dst.add(row * dst_rs + col), rhs.add(col));
                match (tile_rows, registers) {
                    (6, 4) => tile::<6, 4>(xs, c, dst_rs, l, r, rhs_rs, mask, accumulate),
                    (t, v) => dispatch(t, v, xs, c, dst_rs, l, r, rhs_rs, mask, accumulate),
                }
                row += tile_rows;
            }
            col += width;
        }
    }
}

/// The heights of the row tiles of a `rows`-row product: as many tiles as `tallest`-row tiles
/// would need, their heights differing by at most one. 49 rows as 8 × 6 + 1 would end with a
/// one-row tile whose few accumulators wait on the FMA latency; as 4 × 6 + 5 × 5 every tile
/// keeps enough FMAs in flight to run at the ports' pace.
pub(crate) fn row_tiles(rows: usize, tallest: usize) -> impl Iterator<Item = usize> {
    let tiles = rows.div_ceil(tallest);
    let (base, taller) = (rows / tiles.max(1), rows % tiles.max(1));
    (0..tiles).map(move |t| base + usize::from(t < taller))
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
    unreachable!("tiled products need AVX-512 (tile::available() is false)")
}

/// The less common tile shapes (a last partial row tile, narrow heads).
#[allow(clippy::too_many_arguments)]
#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
#[target_feature(enable = "avx512f")]
unsafe fn dispatch(
    tile_rows: usize,
    registers: usize,
    xs: usize,
    c: *mut f32,
    c_rs: usize,
    l: Strided,
    r: *const f32,
    r_rs: usize,
    mask: __mmask16,
    accumulate: bool,
) {
    macro_rules! by_rows {
        ($v:literal) => {
            match tile_rows {
                1 => tile::<1, $v>(xs, c, c_rs, l, r, r_rs, mask, accumulate),
                2 => tile::<2, $v>(xs, c, c_rs, l, r, r_rs, mask, accumulate),
                3 => tile::<3, $v>(xs, c, c_rs, l, r, r_rs, mask, accumulate),
                4 => tile::<4, $v>(xs, c, c_rs, l, r, r_rs, mask, accumulate),
                5 => tile::<5, $v>(xs, c, c_rs, l, r, r_rs, mask, accumulate),
                _ => tile::<6, $v>(xs, c, c_rs, l, r, r_rs, mask, accumulate),
            }
        };
    }
    // SAFETY: forwarded from `broadcast_product`.
    unsafe {
        match registers {
            1 => by_rows!(1),
            2 => by_rows!(2),
            3 => by_rows!(3),
            _ => by_rows!(4),
        }
    }
}

/// One `ROWS × 16·V` tile of `C` over the whole `x` range, in registers.
#[allow(clippy::too_many_arguments)]
#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile<const ROWS: usize, const V: usize>(
    xs: usize,
    c: *mut f32,
    c_rs: usize,
    l: Strided,
    r: *const f32,
    r_rs: usize,
    last_mask: __mmask16,
    accumulate: bool,
) {
    // SAFETY: forwarded from `broadcast_product`; masked lanes are neither read nor written.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); V]; ROWS];
        if accumulate {
            for (i, acc_row) in acc.iter_mut().enumerate() {
                for (v, a) in acc_row.iter_mut().enumerate() {
                    let mask = if v + 1 == V { last_mask } else { 0xffff };
                    *a = _mm512_maskz_loadu_ps(mask, c.add(i * c_rs + 16 * v));
                }
            }
        }
        for x in 0..xs {
            let r_row = r.add(x * r_rs);
            let mut rv = [_mm512_setzero_ps(); V];
            for (v, reg) in rv.iter_mut().enumerate() {
                *reg = if v + 1 == V {
                    _mm512_maskz_loadu_ps(last_mask, r_row.add(16 * v))
                } else {
                    _mm512_loadu_ps(r_row.add(16 * v))
                };
            }
            let l_x = l.ptr.add(x * l.x_stride);
            for (i, acc_row) in acc.iter_mut().enumerate() {
                let b = _mm512_set1_ps(*l_x.add(i * l.row_stride));
                for v in 0..V {
                    acc_row[v] = _mm512_fmadd_ps(b, rv[v], acc_row[v]);
                }
            }
        }
        for (i, acc_row) in acc.iter().enumerate() {
            for (v, &a) in acc_row.iter().enumerate() {
                let p = c.add(i * c_rs + 16 * v);
                if v + 1 == V { _mm512_mask_storeu_ps(p, last_mask, a) } else { _mm512_storeu_ps(p, a) }
            }
        }
    }
}

/// A register-tiled product with [`broadcast_product`]'s contract (for the shared test).
#[cfg(all(test, target_arch = "x86_64", not(fuzzing)))]
pub(crate) type Product = unsafe fn(usize, usize, usize, *mut f32, usize, Strided, *const f32, usize, bool);

/// Every tile shape (full and partial row tiles, each register count, masked columns, more
/// columns than one tile) of `product` against a plain triple loop, with a transposed (strided)
/// left operand, writing and then accumulating.
#[cfg(all(test, target_arch = "x86_64", not(fuzzing)))]
pub(crate) fn assert_matches_the_definition(product: Product) {
    for &(rows, n, xs) in &[(49, 49, 64), (49, 64, 49), (9, 100, 5), (3, 7, 1), (15, 33, 17), (7, 8, 3), (6, 196, 9)] {
        let value = |i: usize| ((i * 7919) % 101) as f32 / 50.0 - 1.0;
        // L stored transposed: element (r, x) at x·rows + r.
        let l: Vec<f32> = (0..xs * rows).map(value).collect();
        let rhs_rs = n + 3;
        let rhs: Vec<f32> = (0..xs * rhs_rs).map(|i| value(i + 13)).collect();
        let dst_rs = n + 5;
        let mut dst = vec![f32::NAN; rows * dst_rs];
        let lhs = Strided { ptr: l.as_ptr(), row_stride: 1, x_stride: rows };
        // SAFETY: the operands cover the strided ranges; `dst` is a buffer of its own.
        unsafe { product(rows, n, xs, dst.as_mut_ptr(), dst_rs, lhs, rhs.as_ptr(), rhs_rs, false) };
        let want = |r: usize, j: usize| -> f32 { (0..xs).map(|x| l[x * rows + r] * rhs[x * rhs_rs + j]).sum() };
        let check = |dst: &[f32], times: f32| {
            for r in 0..rows {
                for j in 0..n {
                    let (got, want) = (dst[r * dst_rs + j], times * want(r, j));
                    assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "({rows},{n},{xs}) at ({r},{j})");
                }
                // Columns past n are untouched.
                assert!(dst[r * dst_rs + n..(r + 1) * dst_rs].iter().all(|v| v.is_nan()));
            }
        };
        check(&dst, 1.0);
        // Accumulating the same product again doubles it.
        // SAFETY: as above.
        unsafe { product(rows, n, xs, dst.as_mut_ptr(), dst_rs, lhs, rhs.as_ptr(), rhs_rs, true) };
        check(&dst, 2.0);
    }
}

#[cfg(all(test, target_arch = "x86_64", not(fuzzing)))]
mod tests {
    #[test]
    fn row_tiles_cover_the_rows_in_as_few_even_tiles_as_the_tallest_allows() {
        for tallest in 1..8 {
            for rows in 0..100 {
                let tiles: Vec<usize> = super::row_tiles(rows, tallest).collect();
                assert_eq!(tiles.iter().sum::<usize>(), rows, "{rows} rows: {tiles:?}");
                assert_eq!(tiles.len(), rows.div_ceil(tallest), "{rows} rows: {tiles:?}");
                let (lo, hi) = (tiles.iter().min().copied(), tiles.iter().max().copied());
                assert!(hi <= Some(tallest) && hi.zip(lo).is_none_or(|(h, l)| h - l <= 1), "{rows}: {tiles:?}");
            }
        }
        assert_eq!(super::row_tiles(49, 6).collect::<Vec<_>>(), [6, 6, 6, 6, 5, 5, 5, 5, 5]);
    }

    #[test]
    fn matches_the_definition() {
        if !super::available() {
            eprintln!("no AVX-512: the tiled products are not used on this CPU");
            return;
        }
        super::assert_matches_the_definition(super::broadcast_product);
    }
}
