//! Transposing a head's `tokens × head_dim` block, in 16×16 (AVX-512) or 8×8 (AVX2) register
//! blocks.
//!
//! The attention kernel transposes one block per head and image (queries in the forward pass,
//! the output gradient in the backward pass) so that a score product can stream it row-major.
//! Element by element that is one load and one store per value, a visible share of the
//! attention forward pass; sixteen rows loaded as vectors and transposed with shuffles move
//! sixteen values per instruction.

#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
use std::arch::x86_64::*;

#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
use super::tile_avx2::Lanes;

/// `dst[c·dst_rs + r] = src[r·src_rs + c]` for `r < rows`, `c < cols`.
///
/// # Safety
/// `src` must cover `rows` rows of `cols` values at stride `src_rs`, and `dst` must cover `cols`
/// rows of `rows` values at stride `dst_rs` (no other element is touched); they must not
/// overlap.
pub unsafe fn transpose(dst: *mut f32, dst_rs: usize, src: *const f32, src_rs: usize, rows: usize, cols: usize) {
    #[cfg(all(target_arch = "x86_64", not(fuzzing)))]
    {
        type Blocks = unsafe fn(*mut f32, usize, *const f32, usize, usize, usize);
        let vector: Option<(usize, Blocks)> = if super::tile::available() {
            Some((16, transpose_avx512))
        } else if super::tile_avx2::available() {
            Some((8, transpose_avx2))
        } else {
            None
        };
        if let Some((block, blocks)) = vector {
            // The last one or two rows (of 49, say) go element by element: a register transpose
            // would shuffle a whole block for them.
            let thin = if rows % block <= 2 { rows % block } else { 0 };
            let vector_rows = rows - thin;
            // SAFETY: the extension `blocks` needs is present; rows `..vector_rows` and the rest
            // are both inside the caller's ranges.
            unsafe {
                blocks(dst, dst_rs, src, src_rs, vector_rows, cols);
                transpose_scalar(dst.add(vector_rows), dst_rs, src.add(vector_rows * src_rs), src_rs, thin, cols);
            }
            return;
        }
    }
    // SAFETY: as promised by the caller.
    unsafe { transpose_scalar(dst, dst_rs, src, src_rs, rows, cols) }
}

/// Column by column: the writes are contiguous and the `rows` source lines stay in L1.
unsafe fn transpose_scalar(dst: *mut f32, dst_rs: usize, src: *const f32, src_rs: usize, rows: usize, cols: usize) {
    for c in 0..cols {
        for r in 0..rows {
            // SAFETY: inside both ranges (the caller's contract).
            unsafe { *dst.add(c * dst_rs + r) = *src.add(r * src_rs + c) };
        }
    }
}

/// Blocks of up to 16×16: partial blocks load and store masked lanes, so nothing outside the
/// two ranges is read or written.
#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_avx512(dst: *mut f32, dst_rs: usize, src: *const f32, src_rs: usize, rows: usize, cols: usize) {
    let mask = |n: usize| -> __mmask16 { if n >= 16 { 0xffff } else { (1u16 << n) - 1 } };
    // Whole blocks a strip of 16 columns at a time: the strip's 16 destination rows are
    // finished while they are in L1.
    for c0 in (0..cols / 16 * 16).step_by(16) {
        for r0 in (0..rows / 16 * 16).step_by(16) {
            // SAFETY: a whole 16 × 16 block inside both ranges.
            unsafe { full_block_16(dst.add(c0 * dst_rs + r0), dst_rs, src.add(r0 * src_rs + c0), src_rs) };
        }
    }
    // The partial blocks at the edges, through lane masks.
    for r0 in (0..rows).step_by(16) {
        let nr = (rows - r0).min(16);
        for c0 in (0..cols).step_by(16) {
            let nc = (cols - c0).min(16);
            if nr == 16 && nc == 16 {
                continue;
            }
            let mut block = [_mm512_setzero_ps(); 16];
            for (r, row) in block.iter_mut().enumerate().take(nr) {
                // SAFETY: row r0 + r < rows, columns c0..c0 + nc < cols (masked).
                *row = unsafe { _mm512_maskz_loadu_ps(mask(nc), src.add((r0 + r) * src_rs + c0)) };
            }
            let block = transpose_16x16(block);
            for (c, column) in block.iter().enumerate().take(nc) {
                // SAFETY: row c0 + c < cols of `dst`, lanes r0..r0 + nr < rows (masked).
                unsafe { _mm512_mask_storeu_ps(dst.add((c0 + c) * dst_rs + r0), mask(nr), *column) };
            }
        }
    }
}

/// One whole 16 × 16 block with constant indices throughout, so that its sixteen rows stay in
/// registers from the loads to the stores (the general loop, with its run-time row and column
/// counts, keeps the block on the stack).
///
/// # Safety
/// AVX-512F; `src` covers 16 rows of 16 values at stride `src_rs`, `dst` 16 rows of 16 at `dst_rs`.
#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn full_block_16(dst: *mut f32, dst_rs: usize, src: *const f32, src_rs: usize) {
    // SAFETY: the caller's contract.
    unsafe {
        let mut s = src;
        let rows: [__m512; 16] = std::array::from_fn(|_| {
            let row = _mm512_loadu_ps(s);
            s = s.add(src_rs);
            row
        });
        let columns = transpose_16x16(rows);
        let mut d = dst;
        for column in columns {
            _mm512_storeu_ps(d, column);
            d = d.add(dst_rs);
        }
    }
}

/// The classic four shuffle stages: 32-bit interleaves, 64-bit interleaves, then two rounds of
/// 128-bit lane shuffles; 64 shuffles for 256 values.
#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
#[target_feature(enable = "avx512f")]
#[inline]
fn transpose_16x16(r: [__m512; 16]) -> [__m512; 16] {
    let (pd, ps) = (_mm512_castps_pd, _mm512_castpd_ps);
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    let mut u = [_mm512_setzero_ps(); 16];
    for q in 0..4 {
        let b = 4 * q;
        u[b] = ps(_mm512_unpacklo_pd(pd(t[b]), pd(t[b + 2])));
        u[b + 1] = ps(_mm512_unpackhi_pd(pd(t[b]), pd(t[b + 2])));
        u[b + 2] = ps(_mm512_unpacklo_pd(pd(t[b + 1]), pd(t[b + 3])));
        u[b + 3] = ps(_mm512_unpackhi_pd(pd(t[b + 1]), pd(t[b + 3])));
    }
    for half in 0..2 {
        let b = 8 * half;
        for i in 0..4 {
            t[b + i] = _mm512_shuffle_f32x4::<0x88>(u[b + i], u[b + i + 4]);
            t[b + i + 4] = _mm512_shuffle_f32x4::<0xdd>(u[b + i], u[b + i + 4]);
        }
    }
    let mut out = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        out[i] = _mm512_shuffle_f32x4::<0x88>(t[i], t[i + 8]);
        out[i + 8] = _mm512_shuffle_f32x4::<0xdd>(t[i], t[i + 8]);
    }
    out
}

/// Blocks of up to 8×8 for AVX2, partial ones through lane masks (`vmaskmovps`), as
/// [`transpose_avx512`]; full rows and columns go through plain loads and stores, since AMD
/// runs `vmaskmovps` stores as microcode, many times slower.
#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
#[target_feature(enable = "avx2")]
unsafe fn transpose_avx2(dst: *mut f32, dst_rs: usize, src: *const f32, src_rs: usize, rows: usize, cols: usize) {
    for r0 in (0..rows).step_by(8) {
        let nr = (rows - r0).min(8);
        let row_lanes = Lanes::new(nr);
        for c0 in (0..cols).step_by(8) {
            let nc = (cols - c0).min(8);
            let col_lanes = Lanes::new(nc);
            let mut block = [_mm256_setzero_ps(); 8];
            for (r, row) in block.iter_mut().enumerate().take(nr) {
                // SAFETY: row r0 + r < rows, columns c0..c0 + nc < cols (masked when partial).
                *row = unsafe { col_lanes.read(src.add((r0 + r) * src_rs + c0)) };
            }
            let block = transpose_8x8(block);
            for (c, &column) in block.iter().enumerate().take(nc) {
                // SAFETY: row c0 + c < cols of `dst`, lanes r0..r0 + nr < rows (masked when partial).
                unsafe { row_lanes.write(dst.add((c0 + c) * dst_rs + r0), column) };
            }
        }
    }
}

/// 32-bit interleaves, 64-bit shuffles, then 128-bit lane swaps: 24 shuffles for 64 values.
#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
#[target_feature(enable = "avx2")]
fn transpose_8x8(r: [__m256; 8]) -> [__m256; 8] {
    let mut t = [_mm256_setzero_ps(); 8];
    for i in 0..4 {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    let mut u = [_mm256_setzero_ps(); 8];
    for q in 0..2 {
        let b = 4 * q;
        u[b] = _mm256_shuffle_ps::<0x44>(t[b], t[b + 2]);
        u[b + 1] = _mm256_shuffle_ps::<0xee>(t[b], t[b + 2]);
        u[b + 2] = _mm256_shuffle_ps::<0x44>(t[b + 1], t[b + 3]);
        u[b + 3] = _mm256_shuffle_ps::<0xee>(t[b + 1], t[b + 3]);
    }
    let mut out = [_mm256_setzero_ps(); 8];
    for i in 0..4 {
        out[i] = _mm256_permute2f128_ps::<0x20>(u[i], u[i + 4]);
        out[i + 4] = _mm256_permute2f128_ps::<0x31>(u[i], u[i + 4]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every block shape (full, partial rows, partial columns, both) against the definition,
    /// with strides wider than the blocks, and nothing outside the destination range written.
    #[test]
    fn matches_the_definition() {
        for &(rows, cols) in &[
            (49, 64),
            (16, 16),
            (8, 8),
            (1, 1),
            (17, 33),
            (5, 20),
            (64, 49),
            (196, 72),
            (9, 7),
            (2, 40),
            (18, 10),
            (34, 17),
        ] {
            let (src_rs, dst_rs) = (cols + 3, rows + 2);
            let src: Vec<f32> = (0..rows * src_rs).map(|i| i as f32).collect();
            let mut dst = vec![f32::NAN; cols * dst_rs];
            unsafe { transpose(dst.as_mut_ptr(), dst_rs, src.as_ptr(), src_rs, rows, cols) };
            let mut scalar = vec![f32::NAN; cols * dst_rs];
            unsafe { transpose_scalar(scalar.as_mut_ptr(), dst_rs, src.as_ptr(), src_rs, rows, cols) };
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&dst), bits(&scalar), "({rows}×{cols}): vector and scalar versions differ");
            #[cfg(all(target_arch = "x86_64", not(fuzzing)))]
            if crate::kernels::tile_avx2::available() {
                let mut avx2 = vec![f32::NAN; cols * dst_rs];
                unsafe { transpose_avx2(avx2.as_mut_ptr(), dst_rs, src.as_ptr(), src_rs, rows, cols) };
                assert_eq!(bits(&avx2), bits(&scalar), "({rows}×{cols}): AVX2 and scalar versions differ");
            }
            for c in 0..cols {
                for r in 0..rows {
                    assert_eq!(dst[c * dst_rs + r], src[r * src_rs + c], "({rows}×{cols}) at ({r}, {c})");
                }
                assert!(dst[c * dst_rs + rows..(c + 1) * dst_rs].iter().all(|v| v.is_nan()), "wrote past a row");
            }
        }
    }
}
