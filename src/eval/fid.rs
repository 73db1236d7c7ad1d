//! Fréchet distance between Gaussians fitted to two feature sets (the "F" of FID):
//! `d² = |μa − μb|² + tr Σa + tr Σb − 2 tr (Σa^½ Σb Σa^½)^½`.
//!
//! The matrix square roots come from eigen-decompositions of symmetric PSD matrices in f64
//! (nalgebra), with eigenvalues that rounding pushed below zero clamped to zero; the
//! symmetric form `Σa^½ Σb Σa^½` avoids the non-symmetric product `Σa Σb` that scipy's
//! `sqrtm` has to handle with complex arithmetic.

use anyhow::ensure;
use nalgebra::{DMatrix, DVector};

/// Mean and covariance of a feature set.
#[derive(Debug, Clone)]
pub struct FeatureStats {
    pub mean: DVector<f64>,
    /// Unbiased (divides by n − 1), as numpy's `np.cov` in the reference FID code.
    pub cov: DMatrix<f64>,
    pub n: usize,
}

impl FeatureStats {
    /// Fit to `features`: `n` rows of `dim` values.
    pub fn fit(features: &[f32], dim: usize) -> anyhow::Result<Self> {
        ensure!(dim > 0 && features.len().is_multiple_of(dim), "features are not rows of {dim} values");
        let n = features.len() / dim;
        ensure!(n >= 2, "a covariance needs at least 2 samples, got {n}");
        let x = DMatrix::from_row_iterator(n, dim, features.iter().map(|&v| v as f64));
        let mean = x.row_mean().transpose();
        let centred = DMatrix::from_fn(n, dim, |i, j| x[(i, j)] - mean[j]);
        let cov = centred.transpose() * &centred / (n as f64 - 1.0);
        Ok(Self { mean, cov, n })
    }
}

/// The square root of a symmetric positive semi-definite matrix.
pub fn psd_sqrt(m: &DMatrix<f64>) -> DMatrix<f64> {
    let eig = symmetric(m).symmetric_eigen();
    let roots = eig.eigenvalues.map(|l| l.max(0.0).sqrt());
    &eig.eigenvectors * DMatrix::from_diagonal(&roots) * eig.eigenvectors.transpose()
}

/// `(m + mᵀ)/2`: removes the asymmetry rounding leaves in products of symmetric matrices.
fn symmetric(m: &DMatrix<f64>) -> DMatrix<f64> {
    (m + m.transpose()) * 0.5
}

/// The Fréchet distance d² between `a` and `b` (≥ 0 up to rounding).
pub fn frechet_distance(a: &FeatureStats, b: &FeatureStats) -> f64 {
    let a_half = psd_sqrt(&a.cov);
    let middle = symmetric(&(&a_half * &b.cov * &a_half));
    let trace_sqrt: f64 = middle.symmetric_eigenvalues().iter().map(|l| l.max(0.0).sqrt()).sum();
    let diff = &a.mean - &b.mean;
    (diff.dot(&diff) + a.cov.trace() + b.cov.trace() - 2.0 * trace_sqrt).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(mean: Vec<f64>, cov: DMatrix<f64>) -> FeatureStats {
        FeatureStats { mean: DVector::from_vec(mean), cov, n: 0 }
    }

    /// A random symmetric positive definite matrix `AAᵀ + I/10`.
    fn spd(dim: usize, seed: u64) -> DMatrix<f64> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let a = DMatrix::from_fn(dim, dim, |_, _| rng.random_range(-1.0..1.0));
        &a * a.transpose() + DMatrix::identity(dim, dim) * 0.1
    }

    #[test]
    fn square_root_squares_back() {
        let s = spd(12, 1);
        let r = psd_sqrt(&s);
        assert!((&r * &r - &s).abs().max() < 1e-10);
        assert!((&r - r.transpose()).abs().max() < 1e-12, "the root is symmetric");
    }

    #[test]
    fn diagonal_covariances_match_the_closed_form() {
        // d² = |μa − μb|² + Σ (√a_i − √b_i)².
        let (da, db) = ([4.0, 1.0, 0.25], [1.0, 9.0, 0.25]);
        let a = stats(vec![0.0, 1.0, 2.0], DMatrix::from_diagonal(&DVector::from_row_slice(&da)));
        let b = stats(vec![1.0, 1.0, 0.0], DMatrix::from_diagonal(&DVector::from_row_slice(&db)));
        let want = 1.0 + 4.0 + (2.0 - 1.0f64).powi(2) + (1.0 - 3.0f64).powi(2);
        assert!((frechet_distance(&a, &b) - want).abs() < 1e-10);
    }

    #[test]
    fn identical_gaussians_are_at_zero_and_distance_is_symmetric_and_rotation_invariant() {
        let (sa, sb) = (spd(8, 2), spd(8, 3));
        let a = stats(vec![0.5; 8], sa.clone());
        let b = stats(vec![-0.5; 8], sb.clone());
        assert!(frechet_distance(&a, &a) < 1e-9);
        let d = frechet_distance(&a, &b);
        assert!((d - frechet_distance(&b, &a)).abs() < 1e-9 * d);
        // Rotate both: the distance does not change.
        let q = spd(8, 4).symmetric_eigen().eigenvectors;
        let ra = stats((&q * &a.mean).as_slice().to_vec(), &q * &sa * q.transpose());
        let rb = stats((&q * &b.mean).as_slice().to_vec(), &q * &sb * q.transpose());
        assert!((frechet_distance(&ra, &rb) - d).abs() < 1e-9 * d);
    }

    #[test]
    fn commuting_covariances_match_the_closed_form() {
        // Σa = Q diag(a) Qᵀ, Σb = Q diag(b) Qᵀ: tr(Σa^½ Σb Σa^½)^½ = Σ √(a_i b_i).
        let q = spd(4, 5).symmetric_eigen().eigenvectors;
        let (da, db) = ([1.0, 2.0, 3.0, 4.0], [4.0, 0.5, 3.0, 0.0]);
        let cov = |d: &[f64]| &q * DMatrix::from_diagonal(&DVector::from_row_slice(d)) * q.transpose();
        let a = stats(vec![0.0; 4], cov(&da));
        let b = stats(vec![0.0; 4], cov(&db));
        let want: f64 = da.iter().zip(&db).map(|(x, y)| (x.sqrt() - y.sqrt()).powi(2)).sum();
        assert!((frechet_distance(&a, &b) - want).abs() < 1e-9);
    }

    #[test]
    fn fit_gives_the_unbiased_covariance() {
        let g = FeatureStats::fit(&[1.0, 0.0, 3.0, 2.0, 5.0, 4.0], 2).unwrap();
        assert_eq!(g.n, 3);
        assert_eq!(g.mean.as_slice(), &[3.0, 2.0]);
        assert_eq!(g.cov, DMatrix::from_row_slice(2, 2, &[4.0, 4.0, 4.0, 4.0]));
        assert!(FeatureStats::fit(&[1.0, 2.0], 2).is_err());
        assert!(FeatureStats::fit(&[1.0, 2.0, 3.0], 2).is_err());
    }
}
