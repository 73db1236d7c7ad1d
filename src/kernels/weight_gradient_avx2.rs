//! The Linear layers' weight gradient on CPUs with AVX2 and FMA but no AVX-512:
//! `dW[i, j] = Σ_r x[r, i] · dz[r, j]`, a sum over thousands of token rows of a small
//! `[input, output]` product, taken block by block while the backward pass has each block of
//! `dz` in cache (see `linear::backward`).
//!
//! Why not gemm, which the AVX-512 path keeps: called once over all rows, after the input
//! gradient, it finds `dz` gone from L2 and, reading the activations in place at a row stride
//! of 256 B or more, finds its own operand evicted from L1 between uses (the rows of a panel
//! fall into a sixteenth of L1's sets or fewer). On Zen 3 its micro-kernel then ran far below
//! the rate of the panels' products (README, "Speed", has the profile). Here each
//! block of rows is copied into tile order (`rows × (input + output)` floats, beside
//! `rows × input × output` FMAs), and a register tile of six inputs by sixteen outputs (12
//! accumulators, as in [`super::panels`]) passes over it: six broadcasts of an `x` row and
//! sixteen values of `dz` per row.
//!
//! The sum of one [`WeightGradient`] runs in row order, one FMA per row onto the running sum,
//! whatever the blocks; the caller fixes which rows each one sums (never by thread count), so
//! the result is the same on any number of threads.

#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
use std::arch::x86_64::*;
use std::cell::RefCell;

/// Output columns per register tile: two 8-lane registers.
const PANEL: usize = 16;
/// Inputs per register tile.
const TILE_INPUTS: usize = 6;
/// Rows per packed block: its `x` and `dz` (at most 64 × (256 + 512) floats, 192 KiB) stay in
/// L2 beside the gradient while every tile reads them, and a tile's six `x` columns (1.5 KiB)
/// stay in L1 while it passes over the output panels.
const BLOCK_ROWS: usize = 64;

/// Whether [`WeightGradient`] runs: the kernels use exactly AVX2 + FMA
/// ([`super::isa::active`]; on AVX-512 the Linear backward keeps gemm's 512-bit kernels).
pub fn available() -> bool {
    super::isa::active() == super::isa::Isa::Avx2
}

/// `xᵀ·dz` summed over the blocks of rows given to [`WeightGradient::add`], in order.
pub struct WeightGradient {
    input: usize,
    output: usize,
    /// The running sum; uninitialised (empty) until the first block writes all of it.
    sum: Vec<f32>,
}

thread_local! {
    /// Each thread's packing buffers, kept between calls: a fresh pair per span of rows would be
    /// zeroed each time.
    static PACKED: RefCell<Packed> = RefCell::default();
}

impl WeightGradient {
    /// A zero `[input, output]` gradient.
    pub fn new(input: usize, output: usize) -> Self {
        assert!(available(), "weight gradient: the AVX2 kernel needs AVX2 + FMA");
        assert!(input > 0 && output > 0, "weight gradient: zero-sized layer");
        Self { input, output, sum: Vec::new() }
    }

    /// Adds `xᵀ·dz` for `x` `[rows, input]` and `dz` `[rows, output]`, both row-major.
    pub fn add(&mut self, x: &[f32], dz: &[f32]) {
        let (input, output) = (self.input, self.output);
        let rows = x.len() / input;
        assert_eq!(x.len(), rows * input, "weight gradient: x is not whole rows of {input}");
        assert_eq!(dz.len(), rows * output, "weight gradient: dz is not [{rows}, {output}]");
        PACKED.with_borrow_mut(|packed| {
            for (x, dz) in x.chunks(BLOCK_ROWS * input).zip(dz.chunks(BLOCK_ROWS * output)) {
                if self.sum.is_empty() {
                    let mut sum = Vec::with_capacity(input * output);
                    let spare = &mut sum.spare_capacity_mut()[..input * output];
                    // SAFETY: `Start::Zero` writes every element of the sum.
                    unsafe {
                        accumulate_block(x, dz, input, output, packed, spare.as_mut_ptr().cast(), Start::Zero);
                        sum.set_len(input * output);
                    }
                    self.sum = sum;
                } else {
                    // SAFETY: the sum holds input × output floats.
                    unsafe { accumulate_block(x, dz, input, output, packed, self.sum.as_mut_ptr(), Start::Sum) };
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

/// Reusable buffers for the blocks, in the order the tiles read them.
#[derive(Default)]
struct Packed {
    /// The block's `x`, tile by tile of inputs: tile `t` as `rows × 6` floats from
    /// `t · rows · 6` (a narrower last tile leaves its spare lanes unread).
    x: Vec<f32>,
    /// The block's `dz`, panel by panel: `rows × 16` floats each, zero past the last column.
    dz: Vec<f32>,
}

/// `dw (+)= xᵀ·dz` over one block of rows, both copied into tile order first.
///
/// # Safety
/// `dw` covers `input × output` floats, initialised unless `from` is [`Start::Zero`].
unsafe fn accumulate_block(
    x: &[f32],
    dz: &[f32],
    input: usize,
    output: usize,
    packed: &mut Packed,
    dw: *mut f32,
    from: Start,
) {
    let rows = x.len() / input;
    let tiles = input.div_ceil(TILE_INPUTS);
    // Grown, never shrunk: zeroed once, and every lane read below is written first.
    let grow = |v: &mut Vec<f32>, len: usize| {
        if v.len() < len {
            v.resize(len, 0.0);
        }
    };
    grow(&mut packed.x, tiles * rows * TILE_INPUTS);
    grow(&mut packed.dz, output.div_ceil(PANEL) * rows * PANEL);
    // x row by row (a stream the prefetcher follows), each row's inputs to their tiles.
    for (r, src) in x.chunks_exact(input).enumerate() {
        let mut first = 0;
        for (t, count) in tile_inputs(input).enumerate() {
            let dst = &mut packed.x[(t * rows + r) * TILE_INPUTS..][..TILE_INPUTS];
            if first + TILE_INPUTS <= input {
                // A fixed-size copy: a slice copy of a few floats is a call to memcpy.
                let src: &[f32; TILE_INPUTS] = src[first..first + TILE_INPUTS].try_into().expect("6 floats");
                *<&mut [f32; TILE_INPUTS]>::try_from(dst).expect("6 floats") = *src;
            } else {
                dst[..count].copy_from_slice(&src[first..first + count]);
            }
            first += count;
        }
    }
    let panels = output.div_ceil(PANEL);
    for (p, panel) in packed.dz[..panels * rows * PANEL].chunks_exact_mut(rows * PANEL).enumerate() {
        let (col, cols) = (p * PANEL, (output - p * PANEL).min(PANEL));
        for (dst, src) in panel.chunks_exact_mut(PANEL).zip(dz.chunks_exact(output)) {
            if cols == PANEL {
                let src: &[f32; PANEL] = src[col..col + PANEL].try_into().expect("16 floats");
                *<&mut [f32; PANEL]>::try_from(dst).expect("16 floats") = *src;
            } else {
                dst[..cols].copy_from_slice(&src[col..col + cols]);
                dst[cols..].fill(0.0);
            }
        }
    }
    #[cfg(all(target_arch = "x86_64", not(fuzzing)))]
    {
        // A partial panel goes through a whole one here.
        let mut spare = [0.0f32; TILE_INPUTS * PANEL];
        let mut first = 0;
        for (t, count) in tile_inputs(input).enumerate() {
            let x = packed.x[t * rows * TILE_INPUTS..][..rows * TILE_INPUTS].as_ptr();
            for (p, panel) in packed.dz[..panels * rows * PANEL].chunks_exact(rows * PANEL).enumerate() {
                let (col, cols) = (p * PANEL, (output - p * PANEL).min(PANEL));
                // SAFETY: rows first.. of dw, inside its input × output floats.
                let at = unsafe { dw.add(first * output + col) };
                let (dst, stride) = if cols == PANEL { (at, output) } else { (spare.as_mut_ptr(), PANEL) };
                if cols < PANEL && from == Start::Sum {
                    for (i, s) in spare.chunks_exact_mut(PANEL).take(count).enumerate() {
                        // SAFETY: row i of the tile, cols of its initialised sums.
                        unsafe { std::ptr::copy_nonoverlapping(at.add(i * output), s.as_mut_ptr(), cols) };
                    }
                }
                let zero = from == Start::Zero;
                // SAFETY: AVX2 + FMA are present (`WeightGradient::new`); the packed tile holds
                // `rows × 6` floats, the panel `rows × 16`, and `dst` `count` rows of 16 at
                // `stride` (rows `first..first + count` of dw, or the spare panel).
                unsafe {
                    match count {
                        1 => accumulate_tile::<1>(x, panel.as_ptr(), rows, dst, stride, zero),
                        2 => accumulate_tile::<2>(x, panel.as_ptr(), rows, dst, stride, zero),
                        3 => accumulate_tile::<3>(x, panel.as_ptr(), rows, dst, stride, zero),
                        4 => accumulate_tile::<4>(x, panel.as_ptr(), rows, dst, stride, zero),
                        5 => accumulate_tile::<5>(x, panel.as_ptr(), rows, dst, stride, zero),
                        _ => accumulate_tile::<6>(x, panel.as_ptr(), rows, dst, stride, zero),
                    }
                }
                if cols < PANEL {
                    for (i, s) in spare.chunks_exact(PANEL).take(count).enumerate() {
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
        let _ = (dw, from);
        unreachable!("weight gradient: AVX2 kernel off x86-64")
    }
}

/// The input tiles: at most six inputs each, as even as possible.
fn tile_inputs(input: usize) -> impl Iterator<Item = usize> {
    super::tile::row_tiles(input, TILE_INPUTS)
}

/// `dw[t, 0..16] += Σ_r x[r, t] · dz[r, 0..16]` for `t < R` (`=` with `zero`), the sum in
/// registers from `dw`'s value (or zero) on, row after row; `x` packed `rows × 6`, `dz`
/// `rows × 16`, `dw`'s rows `stride` apart.
///
/// # Safety
/// AVX2 + FMA; the pointers cover those ranges, and `dw`'s are initialised unless `zero`.
#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
#[target_feature(enable = "avx2,fma")]
unsafe fn accumulate_tile<const R: usize>(
    x: *const f32,
    dz: *const f32,
    rows: usize,
    dw: *mut f32,
    stride: usize,
    zero: bool,
) {
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
            xr = xr.add(TILE_INPUTS);
            dr = dr.add(PANEL);
        }
        for (t, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(dw.add(t * stride), a[0]);
            _mm256_storeu_ps(dw.add(t * stride + 8), a[1]);
        }
    }
}

#[cfg(all(test, target_arch = "x86_64", not(fuzzing)))]
mod tests {
    use super::*;

    /// Every shape class (full and partial panels, every remainder of the input tile, blocks
    /// added whole, in pieces and partial) against the definition in f64.
    #[test]
    fn matches_the_definition() {
        if !available() {
            eprintln!("the kernels do not run AVX2 exactly: the weight-gradient kernel is not used here");
            return;
        }
        let mut rng = crate::rng::stream(11, crate::rng::Purpose::Bench, 0);
        for (rows, input, output, piece) in [
            (300, 64, 192, 256),
            (2500, 7, 21, 1000),
            (1, 1, 1, 1),
            (129, 13, 16, 50),
            (0, 3, 4, 8),
            (700, 16, 40, 700),
        ] {
            let x = crate::rng::standard_normal(&mut rng, rows * input);
            let dz = crate::rng::standard_normal(&mut rng, rows * output);
            let mut dw = WeightGradient::new(input, output);
            for (x, dz) in x.chunks(piece * input).zip(dz.chunks(piece * output)) {
                dw.add(x, dz);
            }
            let dw = dw.finish();
            for i in 0..input {
                for j in 0..output {
                    let want: f64 = (0..rows).map(|r| x[r * input + i] as f64 * dz[r * output + j] as f64).sum();
                    let got = dw[i * output + j] as f64;
                    let scale = (rows as f64).sqrt();
                    assert!((got - want).abs() <= 1e-5 * (scale + want.abs()), "{rows}×{input}×{output} [{i},{j}]");
                }
            }
        }
    }
}
