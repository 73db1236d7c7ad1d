//! Noise schedules: how much signal and noise each of the T noise levels holds.
//!
//! Every schedule here is one table over levels i = 0..T (the index is what the model is
//! conditioned on): `x_i = a_i·x_0 + b_i·ε`. The one quantity the samplers need is
//! σ_i = b_i / a_i, the noise-to-signal ratio (smalldiffusion's parameterisation): in the
//! rescaled variable `x̃ = x/a = x_0 + σ·ε` every schedule is the same process, so one sampler
//! serves them all. Variance-preserving schedules (DDPM and friends) have a² + b² = 1, i.e.
//! a = sqrt(ᾱ); flow matching has a + b = 1 (a straight line from data to noise).

use serde::{Deserialize, Serialize};

/// How the levels are spaced. Serialised in checkpoints (`{"linear": {"start": …}}`, `"cosine"`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum ScheduleKind {
    /// DDPM (Ho et al. 2020): β linear from `start` to `end` (1e-4 → 0.02), ᾱ = ∏(1 − β).
    Linear { start: f64, end: f64 },
    /// Improved DDPM (Nichol & Dhariwal 2021): ᾱ(t) ∝ cos²((t + 0.008)/1.008 · π/2), β ≤ 0.999.
    Cosine,
    /// GeoDiff: β = sigmoid(linspace(−6, 6)) scaled to [start, end].
    Sigmoid { start: f64, end: f64 },
    /// σ spaced evenly in log from `sigma_min` to `sigma_max` (smalldiffusion's default),
    /// variance preserving.
    LogLinear { sigma_min: f64, sigma_max: f64 },
    /// Flow matching (rectified flow): x_t = (1 − t)·x_0 + t·ε, t = (i + 1)/T; the model
    /// predicts the velocity ε − x_0.
    Flow,
}

impl Default for ScheduleKind {
    fn default() -> Self {
        ScheduleKind::Linear { start: 1e-4, end: 0.02 }
    }
}

/// Names for `--schedule`, each with its default parameters.
pub const SCHEDULE_NAMES: &[&str] = &["linear", "cosine", "sigmoid", "log-linear", "flow"];

impl ScheduleKind {
    pub fn from_name(name: &str) -> anyhow::Result<Self> {
        Ok(match name {
            "linear" => ScheduleKind::default(),
            "cosine" => ScheduleKind::Cosine,
            "sigmoid" => ScheduleKind::Sigmoid { start: 1e-4, end: 0.02 },
            "log-linear" => ScheduleKind::LogLinear { sigma_min: 0.02, sigma_max: 10.0 },
            "flow" => ScheduleKind::Flow,
            other => anyhow::bail!("unknown schedule '{other}' (known: {})", SCHEDULE_NAMES.join(", ")),
        })
    }

    /// The `--schedule` name of this kind.
    pub fn name(&self) -> &'static str {
        match self {
            ScheduleKind::Linear { .. } => "linear",
            ScheduleKind::Cosine => "cosine",
            ScheduleKind::Sigmoid { .. } => "sigmoid",
            ScheduleKind::LogLinear { .. } => "log-linear",
            ScheduleKind::Flow => "flow",
        }
    }

    /// What the network is trained to output under this schedule.
    pub fn prediction(&self) -> Prediction {
        match self {
            ScheduleKind::Flow => Prediction::Velocity,
            _ => Prediction::Epsilon,
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let ok = match *self {
            ScheduleKind::Linear { start, end } | ScheduleKind::Sigmoid { start, end } => {
                0.0 < start && start <= end && end < 1.0
            }
            ScheduleKind::LogLinear { sigma_min, sigma_max } => 0.0 < sigma_min && sigma_min <= sigma_max,
            ScheduleKind::Cosine | ScheduleKind::Flow => true,
        };
        anyhow::ensure!(ok, "invalid noise schedule {self:?}: β must satisfy 0 < start ≤ end < 1, σ 0 < min ≤ max");
        Ok(())
    }
}

/// The network's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Prediction {
    /// The noise ε (DDPM).
    Epsilon,
    /// The flow-matching velocity ε − x_0 (the time derivative of x_t = (1 − t)x_0 + tε).
    Velocity,
}

/// One noise level: `x = a·x_0 + b·ε`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Level {
    pub a: f64,
    pub b: f64,
}

impl Level {
    /// Clean data: the end of every sampling chain.
    pub const CLEAN: Level = Level { a: 1.0, b: 0.0 };

    /// σ = b/a: the noise-to-signal ratio (∞ for pure noise).
    pub fn sigma(&self) -> f64 {
        self.b / self.a
    }

    /// A network output as the prediction of the data and of the noise, consistent
    /// with `x = a·x̂_0 + b·ε̂`. Values are `(x̂_0, ε̂)` per element.
    pub fn data_and_noise(&self, prediction: Prediction, x: f32, out: f32) -> (f32, f32) {
        let (a, b) = (self.a as f32, self.b as f32);
        match prediction {
            // x̂_0 = (x − b·ε̂)/a
            Prediction::Epsilon => ((x - b * out) / a, out),
            // With a + b = 1: x̂_0 = x − b·v, ε̂ = x + a·v.
            Prediction::Velocity => (x - b * out, x + a * out),
        }
    }
}

/// The tables of a schedule over `T` levels, in f64 (cumulative products lose precision in f32).
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    pub kind: ScheduleKind,
    pub levels: Vec<Level>,
}

impl NoiseSchedule {
    pub fn new(kind: ScheduleKind, timesteps: usize) -> Self {
        let n = timesteps;
        let frac = |i: usize| if n == 1 { 0.0 } else { i as f64 / (n - 1) as f64 };
        let levels =
            match kind {
                ScheduleKind::Linear { start, end } => from_betas((0..n).map(|i| start + (end - start) * frac(i))),
                ScheduleKind::Sigmoid { start, end } => {
                    let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
                    from_betas((0..n).map(|i| sigmoid(-6.0 + 12.0 * frac(i)) * (end - start) + start))
                }
                ScheduleKind::Cosine => {
                    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2).cos().powi(2);
                    from_betas((0..n).map(|i| {
                        (1.0 - alpha_bar((i + 1) as f64 / n as f64) / alpha_bar(i as f64 / n as f64)).min(0.999)
                    }))
                }
                ScheduleKind::LogLinear { sigma_min, sigma_max } => (0..n)
                    .map(|i| {
                        let sigma = 10f64.powf(sigma_min.log10() + (sigma_max.log10() - sigma_min.log10()) * frac(i));
                        let a = 1.0 / (1.0 + sigma * sigma).sqrt();
                        Level { a, b: sigma * a }
                    })
                    .collect(),
                ScheduleKind::Flow => (0..n)
                    .map(|i| {
                        let t = (i + 1) as f64 / n as f64;
                        Level { a: 1.0 - t, b: t }
                    })
                    .collect(),
            };
        Self { kind, levels }
    }

    /// DDPM as in mnist-dits: linear β from 1e-4 to 0.02 over 1000 steps.
    pub fn ddpm() -> Self {
        Self::new(ScheduleKind::default(), 1000)
    }

    pub fn timesteps(&self) -> usize {
        self.levels.len()
    }

    pub fn prediction(&self) -> Prediction {
        self.kind.prediction()
    }

    /// σ of every level.
    pub fn sigmas(&self) -> Vec<f64> {
        self.levels.iter().map(Level::sigma).collect()
    }

    /// ᾱ_i = a_i² for a variance-preserving schedule.
    pub fn alpha_bar(&self, i: usize) -> f64 {
        self.levels[i].a * self.levels[i].a
    }

    /// Noise `x0` (`[batch, n]` flattened, row per image) to levels `t` with noise `eps`,
    /// writing x_t into `out`.
    pub fn add_noise(&self, x0: &[f32], t: &[usize], eps: &[f32], out: &mut [f32]) {
        let n = x0.len() / t.len();
        for (i, &ti) in t.iter().enumerate() {
            let Level { a, b } = self.levels[ti];
            let (a, b) = (a as f32, b as f32);
            let row = i * n..(i + 1) * n;
            for ((o, &x), &e) in out[row.clone()].iter_mut().zip(&x0[row.clone()]).zip(&eps[row]) {
                *o = a * x + b * e;
            }
        }
    }

    /// The regression target of the network for data `x0` and noise `eps` (row per image),
    /// written into `out`.
    pub fn target(&self, x0: &[f32], eps: &[f32], out: &mut [f32]) {
        match self.prediction() {
            Prediction::Epsilon => out.copy_from_slice(eps),
            Prediction::Velocity => {
                for ((o, &x), &e) in out.iter_mut().zip(x0).zip(eps) {
                    *o = e - x;
                }
            }
        }
    }
}

/// Variance-preserving levels from β: ᾱ_i = ∏_{s ≤ i}(1 − β_s), a = sqrt(ᾱ), b = sqrt(1 − ᾱ).
fn from_betas(betas: impl Iterator<Item = f64>) -> Vec<Level> {
    betas
        .scan(1.0, |alpha_bar: &mut f64, beta| {
            *alpha_bar *= 1.0 - beta;
            Some(Level { a: alpha_bar.sqrt(), b: (1.0 - *alpha_bar).sqrt() })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddpm_linear_table_values() {
        let s = NoiseSchedule::ddpm();
        assert_eq!(s.timesteps(), 1000);
        // Reference values (Python float64: running product of 1 - β over the linear β).
        assert!((s.alpha_bar(0) - 0.9999).abs() < 1e-12);
        assert!((s.alpha_bar(99) - 0.897_018_145_674_96).abs() < 1e-12, "{}", s.alpha_bar(99));
        assert!((s.alpha_bar(999) - 4.035_829_765_375_675e-5).abs() < 1e-13, "{}", s.alpha_bar(999));
        // σ increases strictly; the levels are variance preserving.
        let sig = s.sigmas();
        assert!(sig.windows(2).all(|w| w[1] > w[0] && w[0] > 0.0));
        assert!(s.levels.iter().all(|l| (l.a * l.a + l.b * l.b - 1.0).abs() < 1e-12));
    }

    #[test]
    fn every_schedule_goes_from_nearly_clean_to_nearly_pure_noise() {
        for name in SCHEDULE_NAMES {
            let s = NoiseSchedule::new(ScheduleKind::from_name(name).unwrap(), 1000);
            let sig = s.sigmas();
            assert!(sig.windows(2).all(|w| w[1] > w[0]), "{name}: σ not increasing");
            assert!(sig[0] < 0.03, "{name}: first σ {}", sig[0]);
            assert!(sig[999] >= 10.0, "{name}: last σ {}", sig[999]);
        }
        let flow = NoiseSchedule::new(ScheduleKind::Flow, 1000);
        assert_eq!(flow.levels[999], Level { a: 0.0, b: 1.0 });
        assert_eq!(flow.sigmas()[999], f64::INFINITY);
        assert!((flow.levels[0].b - 0.001).abs() < 1e-15);
    }

    #[test]
    fn data_and_noise_inverts_the_forward_process() {
        let (x0, eps) = (0.3f32, -1.2f32);
        for (level, pred) in [
            (Level { a: 0.8, b: 0.6 }, Prediction::Epsilon),
            (Level { a: 0.25, b: 0.75 }, Prediction::Velocity),
            (Level { a: 0.0, b: 1.0 }, Prediction::Velocity),
        ] {
            let x = level.a as f32 * x0 + level.b as f32 * eps;
            let out = match pred {
                Prediction::Epsilon => eps,
                Prediction::Velocity => eps - x0,
            };
            let (x0_hat, eps_hat) = level.data_and_noise(pred, x, out);
            assert!((x0_hat - x0).abs() < 1e-6 && (eps_hat - eps).abs() < 1e-6, "{level:?}");
        }
    }

    #[test]
    fn forward_noising_and_targets() {
        let s = NoiseSchedule::ddpm();
        let x0 = [1.0f32, -1.0, 0.5, 0.0];
        let eps = [0.1f32, 0.2, -0.3, 2.0];
        let mut out = [0f32; 4];
        s.add_noise(&x0, &[0, 999], &eps, &mut out);
        let (a0, s0) = (0.9999f64.sqrt(), 1e-4f64.sqrt());
        assert!((out[0] as f64 - (a0 * 1.0 + s0 * 0.1)).abs() < 1e-6);
        assert!((out[3] as f64 - (1.0 - s.alpha_bar(999)).sqrt() * 2.0).abs() < 1e-5);
        s.target(&x0, &eps, &mut out);
        assert_eq!(out, eps);
        let f = NoiseSchedule::new(ScheduleKind::Flow, 10);
        f.add_noise(&x0, &[4, 9], &eps, &mut out);
        assert!((out[0] - (0.5 * 1.0 + 0.5 * 0.1)).abs() < 1e-6 && out[3] == 2.0);
        f.target(&x0, &eps, &mut out);
        assert_eq!(out, [0.1 - 1.0, 0.2 + 1.0, -0.3 - 0.5, 2.0]);
    }

    #[test]
    fn names_and_validation() {
        assert!(ScheduleKind::from_name("quadratic").is_err());
        assert!(ScheduleKind::Linear { start: 0.02, end: 1e-4 }.validate().is_err());
        assert!(ScheduleKind::LogLinear { sigma_min: 0.0, sigma_max: 1.0 }.validate().is_err());
        // The checkpoint format of the linear schedule is unchanged.
        assert_eq!(
            serde_json::to_string(&ScheduleKind::default()).unwrap(),
            r#"{"linear":{"start":0.0001,"end":0.02}}"#
        );
        assert_eq!(serde_json::to_string(&ScheduleKind::Cosine).unwrap(), r#""cosine""#);
    }
}
