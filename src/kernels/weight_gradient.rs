//! The Linear layers' weight gradient on dits' own register tiles:
//! `dW[i, j] = Σ_r x[r, i] · dz[r, j]`, a sum over thousands of token rows of a small
//! `[input, output]` product, taken block by block while the backward pass has each block of
//! `dz` in cache (see `linear::backward`).
//!
//! Why not gemm: called once over all rows, after the input gradient, it finds `dz` gone from
//! L2 and, reading the activations in place at a row stride of 256 B or more, finds its own
//! operand evicted from L1 between uses (the rows of a panel fall into a sixteenth of L1's sets
//! or fewer). On Zen 3 its micro-kernel then ran far below the rate of the panels' products
//! (README, "Speed", has the profile). Here each block of rows is copied into tile order
//! (`rows × (input + output)` floats, beside `rows × input × output` FMAs), and a register tile
//! two registers wide passes over it, as in [`super::panels`]: six inputs by sixteen outputs
//! with AVX2 (12 accumulators), twelve by thirty-two with AVX-512 (24), one broadcast of an `x`
//! value per input and two loads of `dz` per row.
//!
//! The sum of one [`WeightGradient`] runs in row order, one FMA per row onto the running sum,
//! whatever the blocks and whatever the register width (both widths give the same bits); the
//! caller fixes which rows each one sums (never by thread count), so the result is the same on
//! any number of threads.

#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
use std::arch::x86_64::*;
use std::cell::RefCell;

use super::isa::{self, Isa};

/// Rows per packed block: its `x` and `dz` (at most 64 × (256 + 512) floats, 192 KiB) stay in
/// L2 beside the gradient while every tile reads them, and a tile's `x` columns (at most
/// 3 KiB) stay in L1 while it passes over the output panels.
const BLOCK_ROWS: usize = 64;

/// A register tile: inputs (rows of `dW`) by output columns (two vector registers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tile {
    inputs: usize,
    panel: usize,
}

impl Tile {
    fn for_isa(isa: Isa) -> Self {
        let (inputs, panel) = super::panels::register_tile(isa);
        Tile { inputs, panel }
    }
}

/// Whether [`WeightGradient`] runs: the kernels use AVX2 + FMA or AVX-512 ([`isa::active`]).
pub fn available() -> bool {
    isa::active() >= Isa::Avx2
}

/// `xᵀ·dz` summed over the blocks of rows given to [`WeightGradient::add`], in order.
pub struct WeightGradient {
    input: usize,
    output: usize,
    tile: Tile,
    /// The running sum; uninitialised (empty) until the first block writes all of it.
    sum: Vec<f32>,
}

thread_local! {
    /// Each thread's packing buffers, kept between calls: a fresh pair per span of rows would be
    /// zeroed each time.
    static PACKED: RefCell<Packed> = RefCell::default();
}

impl WeightGradient {
    /// A zero `[input, output]` gradient, summed on the tiles of the kernels' vector extension.
    pub fn new(input: usize, output: usize) -> Self {
        Self::new_for(isa::active(), input, output)
    }

    /// [`Self::new`] on the tiles of `isa`.
    fn new_for(isa: Isa, input: usize, output: usize) -> Self {
        assert!(
            isa >= Isa::Avx2 && isa::active() >= isa,
            "weight gradient: the tiles need AVX2 + FMA or AVX-512, and the kernels run {}",
            isa::active().label()
        );
        assert!(input > 0 && output > 0, "weight gradient: zero-sized layer");
        Self { input, output, tile: Tile::for_isa(isa), sum: Vec::new() }
    }

    /// Adds `xᵀ·dz` for `x` `[rows, input]` and `dz` `[rows, output]`, both row-major.
    pub fn add(&mut self, x: &[f32], dz: &[f32]) {
        let (input, output, tile) = (self.input, self.output, self.tile);
        let rows = x.len() / input;
        assert_eq!(x.len(), rows * input, "weight gradient: x is not whole rows of {input}");
        assert_eq!(dz.len(), rows * output, "weight gradient: dz is not [{rows}, {output}]");
        PACKED.with_borrow_mut(|packed| {
            for (x, dz) in x.chunks(BLOCK_ROWS * input).zip(dz.chunks(BLOCK_ROWS * output)) {
                packed.fill(x, dz, input, output, tile);
                if self.sum.is_empty() {
                    let mut sum = Vec::with_capacity(input * output);
                    let spare = &mut sum.spare_capacity_mut()[..input * output];
                    // SAFETY: `Start::Zero` writes every element of the sum.
                    unsafe {
                        packed.accumulate(input, output, tile, spare.as_mut_ptr().cast(), Start::Zero);
                        sum.set_len(input * output);
                    }
                    self.sum = sum;
                } else {
                    // SAFETY: the sum holds input × output floats.
                    unsafe { packed.accumulate(input, output, tile, self.sum.as_mut_ptr(), Start::Sum) };
                }
            }
        });
    }

    /// The `[input, output]` gradient, row-major.
    pub fn finish(self) -> Vec<f32> {
        if self.sum.is_empty() { vec![0.0; self.input * self.output] } else { self.sum }
    }
}

/// Where a block's sums start.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Start {
    /// From zero: the block writes every element of the gradient.
    Zero,
    /// From the gradient's current value.
    Sum,
}

/// Reusable buffers for one block of rows, in the order the tiles read them.
#[derive(Default)]
struct Packed {
    /// Rows in the block.
    rows: usize,
    /// The block's `x`, tile by tile of inputs: tile `t` as `rows × tile.inputs` floats from
    /// `t · rows · tile.inputs` (a narrower last tile leaves its spare lanes unread).
    x: Vec<f32>,
    /// The block's `dz`, panel by panel: `rows × tile.panel` floats each, zero past the last
    /// column.
    dz: Vec<f32>,
}

/// `dst = src` for `N` floats as one fixed-size copy: a slice copy of a few floats is a call to
/// memcpy.
#[inline(always)]
fn copy_fixed<const N: usize>(dst: &mut [f32], src: &[f32]) {
    let src: &[f32; N] = src[..N].try_into().expect("N floats");
    *<&mut [f32; N]>::try_from(&mut dst[..N]).expect("N floats") = *src;
}

/// `dst[..count] = src[..count]` for `count < 32` as at most five fixed-size copies, for the
/// same reason.
#[inline(always)]
fn copy_short(dst: &mut [f32], src: &[f32], count: usize) {
    debug_assert!(count < 32);
    let mut at = 0;
    if count & 16 != 0 {
        copy_fixed::<16>(&mut dst[at..], &src[at..]);
        at += 16;
    }
    if count & 8 != 0 {
        copy_fixed::<8>(&mut dst[at..], &src[at..]);
        at += 8;
    }
    if count & 4 != 0 {
        copy_fixed::<4>(&mut dst[at..], &src[at..]);
        at += 4;
    }
    if count & 2 != 0 {
        copy_fixed::<2>(&mut dst[at..], &src[at..]);
        at += 2;
    }
    if count & 1 != 0 {
        dst[at] = src[at];
    }
}

/// `x` and `dz` of one block into tile order (see [`Packed`]), compiled for the kernels' vector
/// extension: the fixed-size copies become one or two vector moves each.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn pack_block_impl(
    x: &[f32],
    dz: &[f32],
    px: &mut [f32],
    pdz: &mut [f32],
    input: usize,
    output: usize,
    inputs: usize,
    panel: usize,
) {
    let rows = x.len() / input;
    // x row by row (a stream the prefetcher follows), each row's inputs to their tiles.
    for (r, src) in x.chunks_exact(input).enumerate() {
        let mut first = 0;
        for (t, count) in super::tile::row_tiles(input, inputs).enumerate() {
            let dst = &mut px[(t * rows + r) * inputs..][..inputs];
            let src = &src[first..];
            // A whole tile's width where the row has it (the lanes past `count` go unread),
            // so that the even tiles of 64 inputs (six of 10 or 11) copy as fixed blocks too.
            match (src.len() >= inputs, inputs) {
                (true, 6) => copy_fixed::<6>(dst, src),
                (true, 12) => copy_fixed::<12>(dst, src),
                _ => copy_short(dst, src, count),
            }
            first += count;
        }
    }
    let panels = output.div_ceil(panel);
    for (p, packed) in pdz[..panels * rows * panel].chunks_exact_mut(rows * panel).enumerate() {
        let (col, cols) = (p * panel, (output - p * panel).min(panel));
        for (dst, src) in packed.chunks_exact_mut(panel).zip(dz.chunks_exact(output)) {
            let src = &src[col..];
            match (cols == panel, panel) {
                (true, 16) => copy_fixed::<16>(dst, src),
                (true, 32) => copy_fixed::<32>(dst, src),
                _ => {
                    copy_short(dst, src, cols);
                    dst[cols..].fill(0.0);
                }
            }
        }
    }
}

multiversion!(pack_block(x: &[f32], dz: &[f32], px: &mut [f32], pdz: &mut [f32], input: usize, output: usize, inputs: usize, panel: usize) => pack_block_impl);

impl Packed {
    /// Copies one block of `x` and `dz` into tile order.
    fn fill(&mut self, x: &[f32], dz: &[f32], input: usize, output: usize, tile: Tile) {
        let rows = x.len() / input;
        let Tile { inputs, panel } = tile;
        self.rows = rows;
        // Grown, never shrunk: zeroed once, and every lane read below is written first.
        let grow = |v: &mut Vec<f32>, len: usize| {
            if v.len() < len {
                v.resize(len, 0.0);
            }
        };
        grow(&mut self.x, input.div_ceil(inputs) * rows * inputs);
        grow(&mut self.dz, output.div_ceil(panel) * rows * panel);
        let (px, pdz) = (&mut self.x[..], &mut self.dz[..]);
        pack_block(x, dz, px, pdz, input, output, inputs, panel);
    }

    /// `dw (+)= xᵀ·dz` over the packed block.
    ///
    /// # Safety
    /// `dw` covers `input × output` floats, initialised unless `from` is [`Start::Zero`]; the
    /// block was packed by [`Self::fill`] for these sizes and this tile, whose extension the CPU
    /// has.
    unsafe fn accumulate(&self, input: usize, output: usize, tile: Tile, dw: *mut f32, from: Start) {
        #[cfg(all(target_arch = "x86_64", not(fuzzing)))]
        {
            let (rows, Tile { inputs, panel }) = (self.rows, tile);
            let panels = output.div_ceil(panel);
            // A partial panel goes through a whole one here (at most 12 rows of 32).
            let mut spare = [0.0f32; 12 * 32];
            let mut first = 0;
            // The input tiles: at most `inputs` each, as even as possible (as the packing cut them).
            for (t, count) in super::tile::row_tiles(input, inputs).enumerate() {
                let x = self.x[t * rows * inputs..][..rows * inputs].as_ptr();
                for (p, packed) in self.dz[..panels * rows * panel].chunks_exact(rows * panel).enumerate() {
                    let (col, cols) = (p * panel, (output - p * panel).min(panel));
                    // SAFETY: rows first.. of dw, inside its input × output floats.
                    let at = unsafe { dw.add(first * output + col) };
                    let (dst, stride) = if cols == panel { (at, output) } else { (spare.as_mut_ptr(), panel) };
                    if cols < panel && from == Start::Sum {
                        for (i, s) in spare.chunks_exact_mut(panel).take(count).enumerate() {
                            // SAFETY: row i of the tile, cols of its initialised sums.
                            unsafe { std::ptr::copy_nonoverlapping(at.add(i * output), s.as_mut_ptr(), cols) };
                        }
                    }
                    let zero = from == Start::Zero;
                    let dz = packed.as_ptr();
                    // SAFETY: the tile's extension is present (the caller's contract); the
                    // packed tile holds `rows × inputs` floats, the panel `rows × panel`, and
                    // `dst` `count` rows of `panel` at `stride` (rows `first..first + count` of
                    // dw, or the spare panel).
                    unsafe {
                        if panel == 32 {
                            match count {
                                1 => wide_tile::<1>(x, dz, rows, dst, stride, zero),
                                2 => wide_tile::<2>(x, dz, rows, dst, stride, zero),
                                3 => wide_tile::<3>(x, dz, rows, dst, stride, zero),
                                4 => wide_tile::<4>(x, dz, rows, dst, stride, zero),
                                5 => wide_tile::<5>(x, dz, rows, dst, stride, zero),
                                6 => wide_tile::<6>(x, dz, rows, dst, stride, zero),
                                7 => wide_tile::<7>(x, dz, rows, dst, stride, zero),
                                8 => wide_tile::<8>(x, dz, rows, dst, stride, zero),
                                9 => wide_tile::<9>(x, dz, rows, dst, stride, zero),
                                10 => wide_tile::<10>(x, dz, rows, dst, stride, zero),
                                11 => wide_tile::<11>(x, dz, rows, dst, stride, zero),
                                _ => wide_tile::<12>(x, dz, rows, dst, stride, zero),
                            }
                        } else {
                            match count {
                                1 => row_tile::<1>(x, dz, rows, dst, stride, zero),
                                2 => row_tile::<2>(x, dz, rows, dst, stride, zero),
                                3 => row_tile::<3>(x, dz, rows, dst, stride, zero),
                                4 => row_tile::<4>(x, dz, rows, dst, stride, zero),
                                5 => row_tile::<5>(x, dz, rows, dst, stride, zero),
                                _ => row_tile::<6>(x, dz, rows, dst, stride, zero),
                            }
                        }
                    }
                    if cols < panel {
                        for (i, s) in spare.chunks_exact(panel).take(count).enumerate() {
                            // SAFETY: as above.
                            unsafe { std::ptr::copy_nonoverlapping(s.as_ptr(), at.add(i * output), cols) };
                        }
                    }
                }
                first += count;
            }
        }
        #[cfg(not(all(target_arch = "x86_64", not(fuzzing))))]
        {
            let _ = (input, output, tile, dw, from);
            unreachable!("weight gradient: x86-64 tiles off x86-64")
        }
    }
}

/// `dw[t, 0..16] += Σ_r x[r, t] · dz[r, 0..16]` for `t < R` (`=` with `zero`), the sum in
/// registers from `dw`'s value (or zero) on, row after row; `x` packed `rows × 6`, `dz`
/// `rows × 16`, `dw`'s rows `stride` apart.
///
/// # Safety
/// AVX2 + FMA; the pointers cover those ranges, and `dw`'s are initialised unless `zero`.
#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_tile<const R: usize>(
    x: *const f32,
    dz: *const f32,
    rows: usize,
    dw: *mut f32,
    stride: usize,
    zero: bool,
) {
    const INPUTS: usize = 6;
    const PANEL: usize = 16;
    // SAFETY: the caller's contract.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        if !zero {
            for (t, a) in acc.iter_mut().enumerate() {
                *a = [_mm256_loadu_ps(dw.add(t * stride)), _mm256_loadu_ps(dw.add(t * stride + 8))];
            }
        }
        let (mut xr, mut dr) = (x, dz);
        for _ in 0..rows {
            let (b0, b1) = (_mm256_loadu_ps(dr), _mm256_loadu_ps(dr.add(8)));
            for (t, a) in acc.iter_mut().enumerate() {
                let xt = _mm256_broadcast_ss(&*xr.add(t));
                a[0] = _mm256_fmadd_ps(xt, b0, a[0]);
                a[1] = _mm256_fmadd_ps(xt, b1, a[1]);
            }
            xr = xr.add(INPUTS);
            dr = dr.add(PANEL);
        }
        for (t, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(dw.add(t * stride), a[0]);
            _mm256_storeu_ps(dw.add(t * stride + 8), a[1]);
        }
    }
}

/// [`row_tile`] with AVX-512: `dw[t, 0..32]` for `t < R ≤ 12`, `x` packed `rows × 12`, `dz`
/// `rows × 32`.
///
/// # Safety
/// AVX-512F; the pointers cover those ranges, and `dw`'s are initialised unless `zero`.
#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
#[target_feature(enable = "avx512f")]
unsafe fn wide_tile<const R: usize>(
    x: *const f32,
    dz: *const f32,
    rows: usize,
    dw: *mut f32,
    stride: usize,
    zero: bool,
) {
    const INPUTS: usize = 12;
    const PANEL: usize = 32;
    // SAFETY: the caller's contract.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        if !zero {
            for (t, a) in acc.iter_mut().enumerate() {
                *a = [_mm512_loadu_ps(dw.add(t * stride)), _mm512_loadu_ps(dw.add(t * stride + 16))];
            }
        }
        let (mut xr, mut dr) = (x, dz);
        for _ in 0..rows {
            let (b0, b1) = (_mm512_loadu_ps(dr), _mm512_loadu_ps(dr.add(16)));
            for (t, a) in acc.iter_mut().enumerate() {
                let xt = _mm512_set1_ps(*xr.add(t));
                a[0] = _mm512_fmadd_ps(xt, b0, a[0]);
                a[1] = _mm512_fmadd_ps(xt, b1, a[1]);
            }
            xr = xr.add(INPUTS);
            dr = dr.add(PANEL);
        }
        for (t, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(dw.add(t * stride), a[0]);
            _mm512_storeu_ps(dw.add(t * stride + 16), a[1]);
        }
    }
}

#[cfg(all(test, target_arch = "x86_64", not(fuzzing)))]
mod tests {
    use super::*;
    use crate::kernels::isa::tile_extensions;

    /// `xᵀ·dz` on the tiles of `isa`, added `piece` rows at a time.
    fn gradient(isa: Isa, x: &[f32], dz: &[f32], input: usize, output: usize, piece: usize) -> Vec<f32> {
        let mut dw = WeightGradient::new_for(isa, input, output);
        for (x, dz) in x.chunks(piece * input).zip(dz.chunks(piece * output)) {
            dw.add(x, dz);
        }
        dw.finish()
    }

    /// Every shape class (full and partial panels of both widths, every remainder of the input
    /// tile, blocks added whole, in pieces and partial) against the definition in f64.
    #[test]
    fn matches_the_definition() {
        if !available() {
            eprintln!("the kernels do not run AVX2 or AVX-512: the weight-gradient tiles are not used here");
            return;
        }
        let mut rng = crate::rng::stream(11, crate::rng::Purpose::Bench, 0);
        for isa in tile_extensions() {
            for (rows, input, output, piece) in [
                (300, 64, 192, 256),
                (2500, 7, 21, 1000),
                (1, 1, 1, 1),
                (129, 13, 16, 50),
                (0, 3, 4, 8),
                (700, 16, 40, 700),
                (200, 25, 48, 64),
                (90, 11, 33, 30),
            ] {
                let x = crate::rng::standard_normal(&mut rng, rows * input);
                let dz = crate::rng::standard_normal(&mut rng, rows * output);
                let dw = gradient(isa, &x, &dz, input, output, piece);
                for i in 0..input {
                    for j in 0..output {
                        let want: f64 = (0..rows).map(|r| x[r * input + i] as f64 * dz[r * output + j] as f64).sum();
                        let got = dw[i * output + j] as f64;
                        let scale = (rows as f64).sqrt();
                        assert!(
                            (got - want).abs() <= 1e-5 * (scale + want.abs()),
                            "{isa:?} {rows}×{input}×{output} [{i},{j}]"
                        );
                    }
                }
            }
        }
    }

    /// Both register widths sum each element in row order: the same bits, so a model trains the
    /// same on either kind of machine.
    #[test]
    fn both_widths_give_the_same_bits() {
        if isa::active() < Isa::Avx512 {
            return;
        }
        let mut rng = crate::rng::stream(17, crate::rng::Purpose::Bench, 0);
        for (rows, input, output, piece) in [(512, 64, 256, 64), (300, 256, 64, 100), (77, 13, 45, 20)] {
            let x = crate::rng::standard_normal(&mut rng, rows * input);
            let dz = crate::rng::standard_normal(&mut rng, rows * output);
            let bits =
                |isa| gradient(isa, &x, &dz, input, output, piece).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(Isa::Avx2), bits(Isa::Avx512), "{rows}×{input}×{output}");
        }
    }
}
