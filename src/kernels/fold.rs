//! Folding a block's attention projections into one weight and bias (the algebra is in
//! `model::mnist_dits::folded`), forward and backward, on the parameters' buffers.
//!
//! Per head `h` (columns `h·D..` of the `[W, H·D]` projections, rows `h·D..` of `Lv`):
//!
//! - queries: `Aₕ = WqₕWkₕᵀ` and `uₕ = bqₕWkₕᵀ`, at columns `h·W..` of the fold;
//! - values: `WvₕLvₕ` and `bvₕLvₕ`, at columns `(H + h)·W..`, plus the output bias for head 0.
//!
//! The result is `[W + 1, 2·H·W]`: the folded weight in rows `0..W`, its bias in row `W`.
//! Composed from burn's operations this is some forty recorded operations per block (slices,
//! transposes, 64×64 products, concatenations), each a graph node and an allocation, for every
//! micro-batch of every training step; here it is one operation whose backward is sixteen
//! strided products.

use super::gemm::{Order, product};

/// Sizes of one block's fold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FoldDims {
    /// The token width `W`.
    pub width: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl FoldDims {
    /// Width of the projections, `H·D`.
    pub fn inner(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Columns of the fold, `2·H·W`.
    pub fn columns(&self) -> usize {
        2 * self.heads * self.width
    }

    /// Values of the fold, weight and bias row.
    pub fn values(&self) -> usize {
        (self.width + 1) * self.columns()
    }
}

/// The parameters a fold reads, row-major: `wq`, `wk`, `wv` `[W, H·D]`, `bq`, `bv` `[H·D]`,
/// `lv` `[H·D, W]`, `b_out` `[W]` (zeros for a shard that adds the bias after its sum).
#[derive(Debug, Clone, Copy)]
pub struct FoldParams<'a> {
    pub wq: &'a [f32],
    pub bq: &'a [f32],
    pub wk: &'a [f32],
    pub wv: &'a [f32],
    pub bv: &'a [f32],
    pub lv: &'a [f32],
    pub b_out: &'a [f32],
}

impl FoldParams<'_> {
    fn check(&self, d: FoldDims) {
        let (w, inner) = (d.width, d.inner());
        assert!(w > 0 && inner > 0, "fold: empty projections");
        for (name, len, want) in [
            ("wq", self.wq.len(), w * inner),
            ("bq", self.bq.len(), inner),
            ("wk", self.wk.len(), w * inner),
            ("wv", self.wv.len(), w * inner),
            ("bv", self.bv.len(), inner),
            ("lv", self.lv.len(), inner * w),
            ("b_out", self.b_out.len(), w),
        ] {
            assert_eq!(len, want, "fold: {name} has {len} values, not {want}");
        }
    }
}

/// One single-threaded gemm call: the fold's products are 64×64 and there are a few per block.
///
/// # Safety
/// As for [`product`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    lhs: *const f32,
    lhs_s: (usize, usize),
    rhs: *const f32,
    rhs_s: (usize, usize),
    accumulate: bool,
) {
    // SAFETY: the caller's contract.
    unsafe { product(Order::AsIs, m, n, k, dst, dst_rs, lhs, lhs_s, rhs, rhs_s, gemm::Parallelism::None, accumulate) }
}

/// The fold `[W + 1, 2·H·W]`: weight rows, then the bias row.
pub fn forward(p: &FoldParams, d: FoldDims) -> Vec<f32> {
    p.check(d);
    let FoldDims { width: w, heads, head_dim: dh } = d;
    let (inner, cols) = (d.inner(), d.columns());
    let mut out = vec![0.0f32; d.values()];
    let o = out.as_mut_ptr();
    // SAFETY (every product): each operand is a head's block of a parameter checked above, read
    // through its strides, and each destination a block of `out` ([W + 1, cols]).
    unsafe {
        for h in 0..heads {
            let (q, v) = (h * w, (heads + h) * w);
            // Wkₕᵀ, [D, W]: element (d, j) at wk[j·inner + h·D + d].
            let wk_t = (p.wk[h * dh..].as_ptr(), (1, inner));
            gemm((w, w, dh), o.add(q), cols, p.wq[h * dh..].as_ptr(), (inner, 1), wk_t.0, wk_t.1, false);
            gemm((1, w, dh), o.add(w * cols + q), cols, p.bq[h * dh..].as_ptr(), (dh, 1), wk_t.0, wk_t.1, false);
            // Lvₕ, [D, W]: rows h·D.. of lv.
            let lv = (p.lv[h * dh * w..].as_ptr(), (w, 1));
            gemm((w, w, dh), o.add(v), cols, p.wv[h * dh..].as_ptr(), (inner, 1), lv.0, lv.1, false);
            gemm((1, w, dh), o.add(w * cols + v), cols, p.bv[h * dh..].as_ptr(), (dh, 1), lv.0, lv.1, false);
        }
    }
    // Every row of a head's probabilities sums to one, so the output bias rides on head 0's
    // value bias.
    for (o, b) in out[w * cols + heads * w..][..w].iter_mut().zip(p.b_out) {
        *o += b;
    }
    out
}

/// Gradients of the fold's parameters, shaped as [`FoldParams`].
#[derive(Debug, Clone, PartialEq)]
pub struct FoldGrads {
    pub wq: Vec<f32>,
    pub bq: Vec<f32>,
    pub wk: Vec<f32>,
    pub wv: Vec<f32>,
    pub bv: Vec<f32>,
    pub lv: Vec<f32>,
    pub b_out: Vec<f32>,
}

/// The parameters' gradients from the fold's, `grad` `[W + 1, 2·H·W]`.
pub fn backward(p: &FoldParams, grad: &[f32], d: FoldDims) -> FoldGrads {
    p.check(d);
    assert_eq!(grad.len(), d.values(), "fold backward: the gradient has the wrong length");
    let FoldDims { width: w, heads, head_dim: dh } = d;
    let (inner, cols) = (d.inner(), d.columns());
    let zeros = |n: usize| vec![0.0f32; n];
    let mut g = FoldGrads {
        wq: zeros(w * inner),
        bq: zeros(inner),
        wk: zeros(w * inner),
        wv: zeros(w * inner),
        bv: zeros(inner),
        lv: zeros(inner * w),
        b_out: grad[w * cols + heads * w..][..w].to_vec(),
    };
    let gp = grad.as_ptr();
    // SAFETY (every product): operands are blocks of `grad` ([W + 1, cols], checked) or of the
    // parameters (checked), read through their strides; destinations are a head's block of a
    // gradient buffer, sized as its parameter.
    unsafe {
        for h in 0..heads {
            // The gradient's blocks of head h: weight rows (W × W) and bias row (1 × W).
            let (q, v) = (h * w, (heads + h) * w);
            let (gq, gq_bias, gv, gv_bias) = (gp.add(q), gp.add(w * cols + q), gp.add(v), gp.add(w * cols + v));
            let wk = p.wk[h * dh..].as_ptr();
            // Aₕ = WqₕWkₕᵀ, uₕ = bqₕWkₕᵀ: dWqₕ = dAₕWkₕ, dbqₕ = duₕWkₕ, dWkₕ = dAₕᵀWqₕ + duₕᵀbqₕ.
            gemm((w, dh, w), g.wq[h * dh..].as_mut_ptr(), inner, gq, (cols, 1), wk, (inner, 1), false);
            gemm((1, dh, w), g.bq[h * dh..].as_mut_ptr(), dh, gq_bias, (cols, 1), wk, (inner, 1), false);
            let dwk = g.wk[h * dh..].as_mut_ptr();
            gemm((w, dh, w), dwk, inner, gq, (1, cols), p.wq[h * dh..].as_ptr(), (inner, 1), false);
            gemm((w, dh, 1), dwk, inner, gq_bias, (1, 1), p.bq[h * dh..].as_ptr(), (dh, 1), true);
            // Bₕ = WvₕLvₕ, cₕ = bvₕLvₕ: dWvₕ = dBₕLvₕᵀ, dbvₕ = dcₕLvₕᵀ, dLvₕ = WvₕᵀdBₕ + bvₕᵀdcₕ.
            let lv_t = (p.lv[h * dh * w..].as_ptr(), (1, w)); // Lvₕᵀ, [W, D]
            gemm((w, dh, w), g.wv[h * dh..].as_mut_ptr(), inner, gv, (cols, 1), lv_t.0, lv_t.1, false);
            gemm((1, dh, w), g.bv[h * dh..].as_mut_ptr(), dh, gv_bias, (cols, 1), lv_t.0, lv_t.1, false);
            let dlv = g.lv[h * dh * w..].as_mut_ptr();
            gemm((dh, w, w), dlv, w, p.wv[h * dh..].as_ptr(), (1, inner), gv, (cols, 1), false);
            gemm((dh, w, 1), dlv, w, p.bv[h * dh..].as_ptr(), (1, 1), gv_bias, (cols, 1), true);
        }
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fold and its gradients against plain loops over the definitions.
    #[test]
    fn fold_and_gradients_match_the_definition() {
        for d in [FoldDims { width: 6, heads: 3, head_dim: 4 }, FoldDims { width: 5, heads: 1, head_dim: 7 }] {
            let (w, dh, inner, cols) = (d.width, d.head_dim, d.inner(), d.columns());
            let value = |seed: usize| move |i: usize| (((i + seed) * 7919) % 1009) as f32 / 500.0 - 1.0;
            let make = |n: usize, seed: usize| (0..n).map(value(seed)).collect::<Vec<f32>>();
            let (wq, bq, wk, wv, bv, lv, b_out) = (
                make(w * inner, 1),
                make(inner, 2),
                make(w * inner, 3),
                make(w * inner, 4),
                make(inner, 5),
                make(inner * w, 6),
                make(w, 7),
            );
            let p = FoldParams { wq: &wq, bq: &bq, wk: &wk, wv: &wv, bv: &bv, lv: &lv, b_out: &b_out };
            // Row r < W of Q̃ₕ is wq's, row W bq's; likewise for the values.
            let q_tilde =
                |r: usize, h: usize, k: usize| if r < w { wq[r * inner + h * dh + k] } else { bq[h * dh + k] };
            let v_tilde =
                |r: usize, h: usize, k: usize| if r < w { wv[r * inner + h * dh + k] } else { bv[h * dh + k] };
            let fold = forward(&p, d);
            for r in 0..=w {
                for h in 0..d.heads {
                    for j in 0..w {
                        let q: f32 = (0..dh).map(|k| q_tilde(r, h, k) * wk[j * inner + h * dh + k]).sum();
                        let mut v: f32 = (0..dh).map(|k| v_tilde(r, h, k) * lv[(h * dh + k) * w + j]).sum();
                        if r == w && h == 0 {
                            v += b_out[j];
                        }
                        for (got, want) in
                            [(fold[r * cols + h * w + j], q), (fold[r * cols + (d.heads + h) * w + j], v)]
                        {
                            assert!((got - want).abs() < 1e-5 * (1.0 + want.abs()), "{d:?} fold ({r}, {h}, {j})");
                        }
                    }
                }
            }
            // The gradients of Σ fold·G, for a fixed G, by the chain rule written out.
            let grad = make(d.values(), 8);
            let g = backward(&p, &grad, d);
            let gq = |r: usize, h: usize, j: usize| grad[r * cols + h * w + j];
            let gv = |r: usize, h: usize, j: usize| grad[r * cols + (d.heads + h) * w + j];
            let close = |got: f32, want: f32, what: &str| {
                assert!((got - want).abs() < 1e-4 * (1.0 + want.abs()), "{d:?} {what}: {got} vs {want}");
            };
            for h in 0..d.heads {
                for k in 0..dh {
                    let c = h * dh + k;
                    for r in 0..=w {
                        let dq: f32 = (0..w).map(|j| gq(r, h, j) * wk[j * inner + c]).sum();
                        let dv: f32 = (0..w).map(|j| gv(r, h, j) * lv[c * w + j]).sum();
                        if r < w {
                            close(g.wq[r * inner + c], dq, "wq");
                            close(g.wv[r * inner + c], dv, "wv");
                        } else {
                            close(g.bq[c], dq, "bq");
                            close(g.bv[c], dv, "bv");
                        }
                    }
                    for j in 0..w {
                        let dk: f32 = (0..=w).map(|r| gq(r, h, j) * q_tilde(r, h, k)).sum();
                        close(g.wk[j * inner + c], dk, "wk");
                        let dl: f32 = (0..=w).map(|r| gv(r, h, j) * v_tilde(r, h, k)).sum();
                        close(g.lv[c * w + j], dl, "lv");
                    }
                }
            }
            for j in 0..w {
                close(g.b_out[j], gv(w, 0, j), "b_out");
            }
        }
    }
}
