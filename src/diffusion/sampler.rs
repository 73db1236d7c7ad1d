//! Reverse diffusion: from Gaussian noise to images, with the model's noise prediction.
//!
//! Both samplers walk a descending subsequence of timesteps τ_K > … > τ_1 ("trailing" spacing:
//! it always starts at T-1). With ᾱ' = ᾱ of the next timestep (1 after the last):
//!
//! - DDPM (ancestral): the posterior step of the respaced chain, β' = 1 - ᾱ/ᾱ',
//!   `x ← (x - β'/sqrt(1-ᾱ)·ε̂)/sqrt(1-β') + sqrt(β'(1-ᾱ')/(1-ᾱ))·z`, then x clamped to [-1, 1]
//!   as mnist-dits does. With K = T this is exactly mnist-dits' `backward_denoise`.
//! - DDIM (η = 0): `x̂₀ = (x - sqrt(1-ᾱ)ε̂)/sqrt(ᾱ)` clamped, `x ← sqrt(ᾱ')x̂₀ + sqrt(1-ᾱ')ε̂`.

use anyhow::ensure;
use burn::prelude::*;
use rand_distr::{Distribution, StandardNormal};

use super::schedule::NoiseSchedule;
use crate::rng::{Purpose, stream};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SamplerKind {
    /// Ancestral DDPM (stochastic); 1000 steps reproduce mnist-dits.
    Ddpm,
    /// Deterministic DDIM (η = 0); good with 20–50 steps.
    Ddim,
}

/// `steps` timesteps from T-1 down to 0 (or near it), evenly spaced, trailing.
pub fn timestep_sequence(timesteps: usize, steps: usize) -> anyhow::Result<Vec<usize>> {
    ensure!(steps >= 1, "the number of sampling steps must be at least 1");
    ensure!(steps <= timesteps, "cannot sample with {steps} steps: the schedule has {timesteps}");
    let stride = timesteps as f64 / steps as f64;
    Ok((0..steps).map(|i| (timesteps as f64 - i as f64 * stride).round() as usize - 1).collect())
}

/// A prediction of the noise in `x` at timestep `t` for labels `y`.
pub trait Denoiser {
    fn predict_noise(&self, x: Tensor<4>, t: Tensor<1, Int>, y: Tensor<1, Int>) -> Tensor<4>;
}

impl Denoiser for crate::model::Dit {
    fn predict_noise(&self, x: Tensor<4>, t: Tensor<1, Int>, y: Tensor<1, Int>) -> Tensor<4> {
        self.forward(x, t, y)
    }
}

/// Standard normal noise of `len` values from the sampling stream `index` (host-generated so
/// every backend draws the same numbers for the same seed).
pub fn gaussian(rng: &mut impl rand::Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| StandardNormal.sample(rng)).collect()
}

/// Run the sampler on one batch. `observe(k, x)` is called with the starting noise (k = 0)
/// and after each of the K steps (k = 1..=K).
#[allow(clippy::too_many_arguments)]
pub fn sample_batch(
    model: &impl Denoiser,
    schedule: &NoiseSchedule,
    kind: SamplerKind,
    steps: usize,
    labels: &[u8],
    shape: [usize; 3],
    seed: u64,
    batch_index: u64,
    device: &Device,
    mut observe: impl FnMut(usize, &Tensor<4>),
) -> anyhow::Result<Tensor<4>> {
    let ts = timestep_sequence(schedule.timesteps(), steps)?;
    let b = labels.len();
    let dims = [b, shape[0], shape[1], shape[2]];
    let n = dims.iter().product();
    let mut rng = stream(seed, Purpose::Sampling, batch_index);
    let mut x = Tensor::<4>::from_data(TensorData::new(gaussian(&mut rng, n), dims), device);
    let y =
        Tensor::<1, Int>::from_data(TensorData::new(labels.iter().map(|&l| l as i64).collect::<Vec<_>>(), [b]), device);
    observe(0, &x);
    for (k, &t) in ts.iter().enumerate() {
        let ab = schedule.alpha_bar[t];
        let ab_prev = ts.get(k + 1).map_or(1.0, |&tp| schedule.alpha_bar[tp]);
        let tt = Tensor::<1, Int>::from_data(TensorData::new(vec![t as i64; b], [b]), device);
        let eps = model.predict_noise(x.clone(), tt, y.clone());
        x = match kind {
            SamplerKind::Ddpm => {
                let beta = 1.0 - ab / ab_prev;
                let mean = (x - eps * (beta / (1.0 - ab).sqrt())) / (1.0 - beta).sqrt();
                let last = k + 1 == ts.len();
                let x = if last {
                    mean
                } else {
                    let sigma = (beta * (1.0 - ab_prev) / (1.0 - ab)).sqrt();
                    let z = Tensor::<4>::from_data(TensorData::new(gaussian(&mut rng, n), dims), device);
                    mean + z * sigma
                };
                x.clamp(-1.0, 1.0)
            }
            SamplerKind::Ddim => {
                let x0 = ((x - eps.clone() * (1.0 - ab).sqrt()) / ab.sqrt()).clamp(-1.0, 1.0);
                let x = x0 * ab_prev.sqrt() + eps * (1.0 - ab_prev).sqrt();
                if k + 1 == ts.len() { x.clamp(-1.0, 1.0) } else { x }
            }
        };
        observe(k + 1, &x);
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_sequences() {
        assert_eq!(timestep_sequence(1000, 1000).unwrap(), (0..1000).rev().collect::<Vec<_>>());
        assert_eq!(timestep_sequence(1000, 4).unwrap(), vec![999, 749, 499, 249]);
        assert_eq!(timestep_sequence(10, 3).unwrap(), vec![9, 6, 2]);
        assert!(timestep_sequence(1000, 0).is_err());
        assert!(timestep_sequence(10, 11).is_err());
    }

    /// A "model" that knows the data is the constant image `c`: ε̂ = (x - sqrt(ᾱ)c)/sqrt(1-ᾱ).
    struct Oracle {
        c: f32,
        schedule: NoiseSchedule,
    }

    impl Denoiser for Oracle {
        fn predict_noise(&self, x: Tensor<4>, t: Tensor<1, Int>, _y: Tensor<1, Int>) -> Tensor<4> {
            let t = t.into_data().iter::<i64>().next().unwrap() as usize;
            let ab = self.schedule.alpha_bar[t];
            (x - self.c * ab.sqrt() as f32) / (1.0 - ab).sqrt()
        }
    }

    #[test]
    fn both_samplers_recover_the_data_under_an_oracle() {
        let device = Device::flex();
        let schedule = NoiseSchedule::ddpm();
        let oracle = Oracle { c: 0.25, schedule: schedule.clone() };
        for (kind, steps) in [(SamplerKind::Ddpm, 1000), (SamplerKind::Ddpm, 50), (SamplerKind::Ddim, 20)] {
            let mut seen = 0;
            let x = sample_batch(&oracle, &schedule, kind, steps, &[0, 1], [1, 2, 2], 3, 0, &device, |_, _| seen += 1)
                .unwrap();
            assert_eq!(seen, steps + 1);
            let v = x.into_data().try_to_vec::<f32>().unwrap();
            assert!(v.iter().all(|&p| (p - 0.25).abs() < 1e-3), "{kind:?} {steps}: {v:?}");
        }
    }

    #[test]
    fn sampling_is_seeded() {
        let device = Device::flex();
        let schedule = NoiseSchedule::ddpm();
        let oracle = Oracle { c: 0.0, schedule: schedule.clone() };
        let run = |seed| {
            let mut first = None;
            sample_batch(&oracle, &schedule, SamplerKind::Ddpm, 10, &[0], [1, 2, 2], seed, 0, &device, |k, x| {
                if k == 0 {
                    first = Some(x.to_data().try_to_vec::<f32>().unwrap());
                }
            })
            .unwrap();
            first.unwrap()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }
}
