//! The DDPM noise schedule and the closed-form forward process
//! `x_t = sqrt(ᾱ_t)·x_0 + sqrt(1-ᾱ_t)·ε`.

use serde::{Deserialize, Serialize};

/// How β grows with t.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum BetaSchedule {
    /// β linear from `start` to `end` (DDPM: 1e-4 → 0.02).
    Linear { start: f64, end: f64 },
}

impl Default for BetaSchedule {
    fn default() -> Self {
        BetaSchedule::Linear { start: 1e-4, end: 0.02 }
    }
}

/// Tables over t = 0..T, in f64 (cumulative products lose precision in f32).
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    pub betas: Vec<f64>,
    pub alphas: Vec<f64>,
    /// ᾱ_t = ∏_{s ≤ t} α_s.
    pub alpha_bar: Vec<f64>,
}

impl NoiseSchedule {
    pub fn new(kind: BetaSchedule, timesteps: usize) -> Self {
        let betas: Vec<f64> = match kind {
            BetaSchedule::Linear { start, end } => (0..timesteps)
                .map(|i| {
                    let frac = if timesteps == 1 { 0.0 } else { i as f64 / (timesteps - 1) as f64 };
                    start + (end - start) * frac
                })
                .collect(),
        };
        let alphas: Vec<f64> = betas.iter().map(|b| 1.0 - b).collect();
        let alpha_bar = alphas
            .iter()
            .scan(1.0, |acc, a| {
                *acc *= a;
                Some(*acc)
            })
            .collect();
        Self { betas, alphas, alpha_bar }
    }

    /// DDPM as in mnist-dits: linear β from 1e-4 to 0.02 over 1000 steps.
    pub fn ddpm() -> Self {
        Self::new(BetaSchedule::default(), 1000)
    }

    pub fn timesteps(&self) -> usize {
        self.betas.len()
    }

    /// ᾱ before step t (1 for t = 0).
    pub fn alpha_bar_prev(&self, t: usize) -> f64 {
        if t == 0 { 1.0 } else { self.alpha_bar[t - 1] }
    }

    /// Variance of the DDPM posterior q(x_{t-1} | x_t, x_0): β_t (1-ᾱ_{t-1}) / (1-ᾱ_t).
    pub fn posterior_variance(&self, t: usize) -> f64 {
        self.betas[t] * (1.0 - self.alpha_bar_prev(t)) / (1.0 - self.alpha_bar[t])
    }

    /// Noise `x0` (`[batch, n]` flattened, row per image) to timesteps `t` with noise `eps`,
    /// writing x_t into `out`.
    pub fn add_noise(&self, x0: &[f32], t: &[usize], eps: &[f32], out: &mut [f32]) {
        let n = x0.len() / t.len();
        for (i, &ti) in t.iter().enumerate() {
            let (a, s) = (self.alpha_bar[ti].sqrt() as f32, (1.0 - self.alpha_bar[ti]).sqrt() as f32);
            let row = i * n..(i + 1) * n;
            for ((o, &x), &e) in out[row.clone()].iter_mut().zip(&x0[row.clone()]).zip(&eps[row]) {
                *o = a * x + s * e;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddpm_linear_table_values() {
        let s = NoiseSchedule::ddpm();
        assert_eq!(s.timesteps(), 1000);
        assert!((s.betas[0] - 1e-4).abs() < 1e-15);
        assert!((s.betas[999] - 0.02).abs() < 1e-15);
        assert!((s.betas[500] - (1e-4 + 0.0199 * 500.0 / 999.0)).abs() < 1e-15);
        // Reference values (Python float64: running product of 1 - β over the linear β).
        assert!((s.alpha_bar[0] - 0.9999).abs() < 1e-12);
        assert!((s.alpha_bar[99] - 0.897_018_145_674_96).abs() < 1e-12, "{}", s.alpha_bar[99]);
        assert!((s.alpha_bar[999] - 4.035_829_765_375_675e-5).abs() < 1e-13, "{}", s.alpha_bar[999]);
        // Monotone decreasing, in (0, 1).
        assert!(s.alpha_bar.windows(2).all(|w| w[1] < w[0] && w[1] > 0.0));
        assert_eq!(s.posterior_variance(0), 0.0);
        assert!(s.posterior_variance(999) < s.betas[999]);
    }

    #[test]
    fn forward_noising_is_the_closed_form() {
        let s = NoiseSchedule::ddpm();
        let x0 = [1.0f32, -1.0, 0.5, 0.0];
        let eps = [0.1f32, 0.2, -0.3, 2.0];
        let mut out = [0f32; 4];
        s.add_noise(&x0, &[0, 999], &eps, &mut out);
        let (a0, s0) = (0.9999f64.sqrt(), 1e-4f64.sqrt());
        assert!((out[0] as f64 - (a0 * 1.0 + s0 * 0.1)).abs() < 1e-6);
        let a = s.alpha_bar[999];
        assert!((out[3] as f64 - (0.0 + (1.0 - a).sqrt() * 2.0)).abs() < 1e-5);
    }
}
