//! One strided call into the `gemm` crate (the GEMM burn-flex uses) for the kernels.

/// How to hand a product to gemm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// `C = A·B` as written.
    AsIs,
    /// As `Cᵀ = Bᵀ·Aᵀ`. gemm vectorises along the rows of its left operand and packs that
    /// operand into column panels unless its rows are unit-stride and a multiple of 16: our
    /// activations are row-major, and attention's row count (49 tokens) pads to 64. Transposing
    /// puts the weight, or the 64-wide head features, on the left: no packing, no padding.
    Transposed,
}

/// `dst = lhs · rhs` (with `accumulate`, `dst += lhs · rhs`), `m×k` times `k×n`, with `dst`
/// row-major (row stride `dst_rs`) and the operands' strides given as `(row, column)` in
/// elements.
///
/// # Safety
/// The pointers must cover the strided ranges, and `dst` must not overlap the operands. `dst`
/// is only written (every element of it, when `k > 0`) unless `accumulate`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn product(
    order: Order,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    lhs: *const f32,
    lhs_s: (usize, usize),
    rhs: *const f32,
    rhs_s: (usize, usize),
    parallelism: gemm::Parallelism,
    accumulate: bool,
) {
    // gemm's signature: (m, n, k, dst, dst_cs, dst_rs, read_dst, lhs, lhs_cs, lhs_rs, rhs, rhs_cs,
    // rhs_rs, alpha, beta, conj_dst, conj_lhs, conj_rhs, parallelism);
    // dst = alpha·dst + beta·lhs·rhs, where dst is read only if read_dst.
    let (m, n, dst_cs, dst_rs, lhs, lhs_s, rhs, rhs_s) = match order {
        Order::AsIs => (m, n, 1, dst_rs, lhs, lhs_s, rhs, rhs_s),
        Order::Transposed => (n, m, dst_rs, 1, rhs, (rhs_s.1, rhs_s.0), lhs, (lhs_s.1, lhs_s.0)),
    };
    // SAFETY: the caller's contract above.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs,
            lhs_s.1 as isize,
            lhs_s.0 as isize,
            rhs,
            rhs_s.1 as isize,
            rhs_s.0 as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}
