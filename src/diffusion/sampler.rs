//! Reverse diffusion: from noise to images, every sampler as one step rule in σ.
//!
//! In the rescaled variable `x̃ = x/a = x̂_0 + σ·ε̂` (see [`super::schedule`]) one step from σ to
//! the next level σ' is smalldiffusion's generalised update
//!
//! ```text
//! ε̄  = γ·ε̂ + (1 − γ)·ε̂_prev                (γ = 1: this step's prediction only)
//! x̃' = x̃ − (σ − σ_p)·ε̄ + η·z,   η² = σ'² − σ_p²
//! ```
//!
//! where σ_p ≤ σ' is the noise level the deterministic part reaches and fresh noise z tops it
//! up to σ'. Each named sampler is a choice of (γ, σ_p):
//!
//! - DDPM ancestral: γ = 1, σ_p = σ'²/σ (smalldiffusion's μ = 0.5; the posterior
//!   q(x_{t'} | x_t, x̂_0) of the respaced chain, identical to DDIM with η = 1);
//! - DDIM(η): γ = 1, η_step = η·σ'·sqrt(1 − σ'²/σ²) (η = 0: deterministic; this is also the
//!   Euler step of the probability-flow ODE, so for flow matching it is exactly Euler on the
//!   velocity field);
//! - generalised (γ, μ): σ_p = (σ'/σ^μ)^(1/(1−μ)); accelerated = (2, 0).
//!
//! Two second-order solvers of the probability-flow ODE `dx̃/dσ = ε̂(x̃, σ)` sit beside them:
//!
//! - DPM-Solver++(2M) (Lu et al. 2022, k-diffusion's `sample_dpmpp_2m`): multistep in the data
//!   prediction with λ = −log σ, one model call per step: D = x̂_0 + c·(x̂_0 − x̂_0,prev) with
//!   c = h/(2·h_prev), h = log(σ/σ'), and `x̃' = x̂_0 + σ'·ε̂ + c·(1 − σ'/σ)·(x̂_0 − x̂_0,prev)`
//!   (first order at the first and the last step, as k-diffusion);
//! - Heun (Karras et al. 2022, EDM's deterministic sampler): an Euler step, then the model at
//!   the level it reached, and the average slope: `x̃' = x̃_Euler + (σ' − σ)/2·(ε̂' − ε̂)`; two
//!   model calls per step except from (nearly) pure noise and to clean data, which stay Euler.
//!
//! Steps run on the "trailing" subsequence of levels (Lin et al. 2024, table 2), which always
//! starts at the last level, and end at clean data (σ' = 0).

use anyhow::ensure;
use burn::prelude::*;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::schedule::{Level, NoiseSchedule};
use crate::images::FloatImage;
use crate::rng::{Purpose, standard_normal, stream};

/// The named samplers of `--sampler`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SamplerKind {
    /// Ancestral DDPM (stochastic); 1000 steps with `--clip xt` reproduce mnist-dits.
    Ddpm,
    /// DDIM with `--eta` (0: deterministic).
    Ddim,
    /// DDIM with η = 0 under its ODE name: Euler steps, e.g. for flow matching.
    Euler,
    /// smalldiffusion's accelerated sampler (γ = 2, μ = 0): deterministic, averages this
    /// step's prediction with the last one's.
    Accelerated,
    /// smalldiffusion's generalised sampler with `--gamma` and `--mu`.
    Gen,
    /// DPM-Solver++(2M): deterministic, second order, one model call per step.
    #[value(name = "dpmpp-2m")]
    #[serde(rename = "dpmpp-2m")]
    DpmPp2m,
    /// Heun's second-order method (EDM): deterministic, two model calls per step.
    Heun,
}

/// The order of the ODE solver a rule uses on top of its (γ, churn).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Solver {
    /// One model call, the (γ, churn) update.
    First,
    /// DPM-Solver++(2M)'s multistep correction from the last step's x̂_0.
    DpmPp2m,
    /// Heun's correction from a second model call at the next level.
    Heun,
}

/// How much fresh noise a step adds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Churn {
    /// smalldiffusion's μ in [0, 1): σ_p = (σ'/σ^μ)^(1/(1−μ)).
    Mu(f64),
    /// DDIM's η in [0, 1]: the fresh noise is η times the DDPM posterior's.
    Eta(f64),
}

/// A step rule: (γ, churn).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepRule {
    pub gamma: f64,
    pub churn: Churn,
    pub solver: Solver,
}

impl StepRule {
    /// The rule of a named sampler; `eta`, `gamma` and `mu` are read where the sampler has them.
    pub fn of(kind: SamplerKind, eta: f64, gamma: f64, mu: f64) -> anyhow::Result<Self> {
        let first = |gamma, churn| StepRule { gamma, churn, solver: Solver::First };
        let ode = |solver| StepRule { gamma: 1.0, churn: Churn::Eta(0.0), solver };
        let rule = match kind {
            SamplerKind::Ddpm => first(1.0, Churn::Mu(0.5)),
            SamplerKind::Ddim => first(1.0, Churn::Eta(eta)),
            SamplerKind::Euler => first(1.0, Churn::Eta(0.0)),
            SamplerKind::Accelerated => first(2.0, Churn::Mu(0.0)),
            SamplerKind::Gen => first(gamma, Churn::Mu(mu)),
            SamplerKind::DpmPp2m => ode(Solver::DpmPp2m),
            SamplerKind::Heun => ode(Solver::Heun),
        };
        rule.validate()?;
        Ok(rule)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(self.gamma.is_finite() && self.gamma > 0.0, "--gamma must be a positive number, got {}", self.gamma);
        match self.churn {
            Churn::Mu(mu) => ensure!((0.0..1.0).contains(&mu), "--mu must be in [0, 1), got {mu}"),
            Churn::Eta(eta) => ensure!((0.0..=1.0).contains(&eta), "--eta must be in [0, 1], got {eta}"),
        }
        Ok(())
    }

    /// (σ_p, η) for a step from σ to σ' < σ (σ may be ∞, σ' may be 0).
    pub fn noise_split(&self, sigma: f64, sigma_next: f64) -> (f64, f64) {
        if sigma_next == 0.0 {
            return (0.0, 0.0);
        }
        match self.churn {
            Churn::Mu(mu) => {
                let sigma_p = (sigma_next / sigma.powf(mu)).powf(1.0 / (1.0 - mu));
                (sigma_p, (sigma_next * sigma_next - sigma_p * sigma_p).max(0.0).sqrt())
            }
            Churn::Eta(eta) => {
                let ratio = sigma_next / sigma;
                let fresh = eta * sigma_next * (1.0 - ratio * ratio).max(0.0).sqrt();
                ((sigma_next * sigma_next - fresh * fresh).max(0.0).sqrt(), fresh)
            }
        }
    }
}

/// What is kept inside the data range [-1, 1] during sampling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Clip {
    /// The prediction of the clean image x̂_0 at every step (diffusers' `clip_sample`).
    X0,
    /// The noisy image itself after every step, as mnist-dits does.
    Xt,
    /// Nothing.
    None,
}

/// `steps` level indices from T-1 down, evenly spaced, trailing.
pub fn timestep_sequence(timesteps: usize, steps: usize) -> anyhow::Result<Vec<usize>> {
    ensure!(steps >= 1, "the number of sampling steps must be at least 1");
    ensure!(steps <= timesteps, "cannot sample with {steps} steps: the schedule has {timesteps}");
    let stride = timesteps as f64 / steps as f64;
    // Ties to even, as numpy's `round` in diffusers and smalldiffusion (1000/16 steps hits x.5).
    Ok((0..steps).map(|i| (timesteps as f64 - i as f64 * stride).round_ties_even() as usize - 1).collect())
}

/// The network's raw output (ε̂ or velocity, see [`super::schedule::Prediction`]) for `x` at
/// level indices `t` and labels `y`.
pub trait Denoiser {
    fn predict(&self, x: Tensor<4>, t: Tensor<1, Int>, y: Tensor<1, Int>) -> Tensor<4>;
}

impl Denoiser for crate::model::DitNet {
    fn predict(&self, x: Tensor<4>, t: Tensor<1, Int>, y: Tensor<1, Int>) -> Tensor<4> {
        self.infer(x, t, y)
    }
}

/// What samplers should use: the weights are prepared (folded) once for the whole chain.
impl Denoiser for crate::model::net::Inference<'_> {
    fn predict(&self, x: Tensor<4>, t: Tensor<1, Int>, y: Tensor<1, Int>) -> Tensor<4> {
        self.infer(x, t, y)
    }
}

/// One chain: the levels it visits and how it steps.
#[derive(Debug, Clone)]
pub struct Chain {
    /// Level indices the model is called at, descending.
    pub indices: Vec<usize>,
    /// Where the last step lands: `None` = clean data (σ' = 0), `Some(i)` = level i
    /// (smalldiffusion's convention of ending at the smallest σ, for comparisons).
    pub end: Option<usize>,
    pub rule: StepRule,
    pub clip: Clip,
}

impl Chain {
    /// `steps` trailing steps over the whole schedule, ending at clean data.
    pub fn trailing(schedule: &NoiseSchedule, steps: usize, rule: StepRule, clip: Clip) -> anyhow::Result<Self> {
        Ok(Self { indices: timestep_sequence(schedule.timesteps(), steps)?, end: None, rule, clip })
    }
}

/// Gaussian noise for the chain: `noise(k, len)` gives the starting image x ~ N(0, I) (k = 0)
/// and the fresh noise of step k (k = 1..=K, drawn only when the step adds noise).
pub trait NoiseSource {
    fn noise(&mut self, k: usize, len: usize) -> Vec<f32>;
}

/// The sampling stream of a batch: (seed, batch index) fixes every number.
pub struct SeededNoise(rand_chacha::ChaCha8Rng);

impl SeededNoise {
    pub fn new(seed: u64, batch_index: u64) -> Self {
        Self(stream(seed, Purpose::Sampling, batch_index))
    }
}

impl NoiseSource for SeededNoise {
    fn noise(&mut self, _k: usize, len: usize) -> Vec<f32> {
        standard_normal(&mut self.0, len)
    }
}

/// One stream per image, keyed by (seed, class, index within the class): an image comes out
/// the same whatever batch it is denoised in, so `--batch` and the thread count do not change
/// the samples.
pub struct ImageNoise(Vec<rand_chacha::ChaCha8Rng>);

impl ImageNoise {
    pub fn new(seed: u64, images: impl IntoIterator<Item = (usize, usize)>) -> Self {
        Self::seeded(images.into_iter().map(|(c, i)| (seed, c, i)))
    }

    /// Images of several seeds in one batch, each `(seed, class, index)`: the noise each would
    /// get in a batch of its own seed (requests of several clients batched together).
    pub fn seeded(images: impl IntoIterator<Item = (u64, usize, usize)>) -> Self {
        Self(
            images
                .into_iter()
                .map(|(seed, c, i)| stream(seed, Purpose::Sampling, ((c as u64) << 32) | i as u64))
                .collect(),
        )
    }
}

impl NoiseSource for ImageNoise {
    fn noise(&mut self, _k: usize, len: usize) -> Vec<f32> {
        let per_image = len / self.0.len();
        let mut out = Vec::with_capacity(len);
        for rng in &mut self.0 {
            out.extend(standard_normal(rng, per_image));
        }
        out
    }
}

/// Draws `images`, each `(seed, class, index)` of `shape`, through `chain`: one batch per core
/// (burn-flex's kernels alone barely use a second core at these sizes). Each image's noise is its
/// own stream, so neither the cut nor the company an image is drawn in changes it.
pub fn sample_images(
    model: &(impl Denoiser + Sync),
    schedule: &NoiseSchedule,
    chain: &Chain,
    images: &[(u64, usize, usize)],
    shape: [usize; 3],
    device: &Device,
) -> anyhow::Result<Vec<FloatImage>> {
    let image_len: usize = shape.iter().product();
    let size = images.len().div_ceil(rayon::current_num_threads()).max(1);
    let parts = images
        .par_chunks(size)
        .map(|part| -> anyhow::Result<Vec<FloatImage>> {
            let labels: Vec<u8> = part.iter().map(|&(_, c, _)| c as u8).collect();
            let mut noise = ImageNoise::seeded(part.iter().copied());
            let x = sample_batch(model, schedule, chain, &labels, shape, &mut noise, device, |_, _| {})?;
            let data = x.into_data().try_to_vec::<f32>().map_err(|e| anyhow::anyhow!("reading samples: {e:?}"))?;
            Ok(data
                .chunks_exact(image_len)
                .map(|d| FloatImage { channels: shape[0], height: shape[1], width: shape[2], data: d.to_vec() })
                .collect())
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(parts.into_iter().flatten().collect())
}

/// Heun corrects only steps starting below this σ (EDM's σ_max is 80; DDPM's top level is 157).
const HEUN_MAX_SIGMA: f64 = 1000.0;

/// Run `chain` on one batch of `labels`. `observe(k, x)` sees the starting noise (k = 0) and
/// the image after each of the K steps (k = 1..=K), in the model's coordinates.
#[allow(clippy::too_many_arguments)]
pub fn sample_batch(
    model: &impl Denoiser,
    schedule: &NoiseSchedule,
    chain: &Chain,
    labels: &[u8],
    shape: [usize; 3],
    noise: &mut impl NoiseSource,
    device: &Device,
    mut observe: impl FnMut(usize, &Tensor<4>),
) -> anyhow::Result<Tensor<4>> {
    ensure!(!chain.indices.is_empty(), "a sampling chain needs at least one step");
    ensure!(
        chain.indices.iter().all(|&i| i < schedule.timesteps()) && chain.indices.windows(2).all(|w| w[1] < w[0]),
        "sampling levels must be distinct, descending and inside the schedule"
    );
    let prediction = schedule.prediction();
    let b = labels.len();
    let dims = [b, shape[0], shape[1], shape[2]];
    let n = dims.iter().product();
    // x ~ N(0, I), as DDPM and mnist-dits start (the first level is pure noise, or nearly).
    let mut x = Tensor::<4>::from_data(TensorData::new(noise.noise(0, n), dims), device);
    let y =
        Tensor::<1, Int>::from_data(TensorData::new(labels.iter().map(|&l| l as i64).collect::<Vec<_>>(), [b]), device);
    observe(0, &x);
    let mut eps_prev: Option<Tensor<4>> = None;
    // DPM-Solver++(2M)'s memory: the last step's x̂_0 and its h = log(σ/σ').
    let mut data_prev: Option<(Tensor<4>, f64)> = None;
    let levels_of = |t: usize| Tensor::<1, Int>::from_data(TensorData::new(vec![t as i64; b], [b]), device);
    for (k, &t) in chain.indices.iter().enumerate() {
        let level = schedule.levels[t];
        let next_index = chain.indices.get(k + 1).copied().or(chain.end);
        let next = next_index.map_or(Level::CLEAN, |i| schedule.levels[i]);
        let out = model.predict(x.clone(), levels_of(t), y.clone());
        let (x0, eps) = data_and_noise(level, prediction, x, out, chain.clip);

        let (sigma, sigma_next) = (level.sigma(), next.sigma());
        let (sigma_p, eta) = chain.rule.noise_split(sigma, sigma_next);
        let gamma = chain.rule.gamma;
        // DPM-Solver++(2M) steps with x̂_0 + c·(1 − σ'/σ)·(x̂_0 − x̂_0,prev) in place of x̂_0; h_prev = ∞
        // (the step from σ = ∞) gives c = 0, and the last step (σ' = 0) stays first order.
        let x0 = if chain.rule.solver == Solver::DpmPp2m {
            let step = match &data_prev {
                Some((prev, h_prev)) if sigma_next > 0.0 => {
                    let c = (sigma / sigma_next).ln() / (2.0 * h_prev) * (1.0 - sigma_next / sigma);
                    if c != 0.0 { x0.clone() * (1.0 + c) - prev.clone() * c } else { x0.clone() }
                }
                _ => x0.clone(),
            };
            data_prev = Some((x0, (sigma / sigma_next).ln()));
            step
        } else {
            x0
        };
        // x̃' = x̂0 + σ_p·ε̄ + σ(1−γ)(ε̂ − ε̂_prev) + η·z, then x' = a'·x̃'.
        let mut x_next = x0 * next.a;
        let eps_bar = match &eps_prev {
            Some(prev) if gamma != 1.0 => {
                x_next = x_next + (eps.clone() - prev.clone()) * (next.a * sigma * (1.0 - gamma));
                eps.clone() * gamma + prev.clone() * (1.0 - gamma)
            }
            _ => eps.clone(),
        };
        x_next = x_next + eps_bar * (next.a * sigma_p);
        // Heun: the model again at the level reached, and the average slope. From (nearly) pure
        // noise the factor σ' − σ is huge and amplifies the f32 error of ε̂' − ε̂ (the cosine
        // schedule's top σ is ~10⁴): Euler there, and on the last step to clean data.
        if let (Solver::Heun, Some(tn)) = (chain.rule.solver, next_index)
            && sigma < HEUN_MAX_SIGMA
            && sigma_next > 0.0
        {
            let out = model.predict(x_next.clone(), levels_of(tn), y.clone());
            let (_, eps_next) = data_and_noise(next, prediction, x_next.clone(), out, chain.clip);
            x_next = x_next + (eps_next - eps.clone()) * (next.a * (sigma_next - sigma) / 2.0);
        }
        if eta > 0.0 {
            let z = Tensor::<4>::from_data(TensorData::new(noise.noise(k + 1, n), dims), device);
            x_next = x_next + z * (next.a * eta);
        }
        if chain.clip == Clip::Xt {
            x_next = x_next.clamp(-1.0, 1.0);
        }
        x = x_next;
        eps_prev = Some(eps);
        observe(k + 1, &x);
    }
    Ok(x)
}

/// `(x̂_0, ε̂)` from the network output, with x̂_0 clipped (and ε̂ made consistent with it,
/// `x = a·x̂_0 + b·ε̂`) under [`Clip::X0`].
fn data_and_noise(
    level: Level,
    prediction: super::schedule::Prediction,
    x: Tensor<4>,
    out: Tensor<4>,
    clip: Clip,
) -> (Tensor<4>, Tensor<4>) {
    use super::schedule::Prediction;
    let (a, b) = (level.a, level.b);
    let (x0, eps) = match prediction {
        Prediction::Epsilon => ((x.clone() - out.clone() * b) / a, out),
        Prediction::Velocity => (x.clone() - out.clone() * b, x.clone() + out * a),
    };
    if clip != Clip::X0 {
        return (x0, eps);
    }
    let x0 = x0.clamp(-1.0, 1.0);
    let eps = (x - x0.clone() * a) / b;
    (x0, eps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::oracle::GaussianOracle;
    use crate::diffusion::schedule::ScheduleKind;

    #[test]
    fn trailing_sequences() {
        assert_eq!(timestep_sequence(1000, 1000).unwrap(), (0..1000).rev().collect::<Vec<_>>());
        assert_eq!(timestep_sequence(1000, 4).unwrap(), vec![999, 749, 499, 249]);
        assert_eq!(timestep_sequence(10, 3).unwrap(), vec![9, 6, 2]);
        // 1000/16 = 62.5: 812.5 rounds to 812 (ties to even, as numpy).
        assert_eq!(timestep_sequence(1000, 16).unwrap()[3], 811);
        assert!(timestep_sequence(1000, 0).is_err());
        assert!(timestep_sequence(10, 11).is_err());
    }

    #[test]
    fn ddpm_is_ddim_with_eta_one_and_the_posterior() {
        let ddpm = StepRule::of(SamplerKind::Ddpm, 0.0, 1.0, 0.0).unwrap();
        let ddim1 = StepRule::of(SamplerKind::Ddim, 1.0, 1.0, 0.0).unwrap();
        for (s, sn) in [(157.0, 80.0), (2.0, 1.5), (0.3, 0.01), (f64::INFINITY, 3.0)] {
            let (p, e) = ddpm.noise_split(s, sn);
            let (p1, e1) = ddim1.noise_split(s, sn);
            assert!((p - p1).abs() < 1e-12 && (e - e1).abs() < 1e-12, "σ {s} → {sn}");
            assert!((p * p + e * e - sn * sn).abs() < 1e-9);
        }
        // DDIM η = 0 and the accelerated rule add no noise.
        for rule in [
            StepRule::of(SamplerKind::Euler, 0.0, 1.0, 0.0).unwrap(),
            StepRule::of(SamplerKind::Accelerated, 0.0, 1.0, 0.0).unwrap(),
        ] {
            assert_eq!(rule.noise_split(2.0, 1.0), (1.0, 0.0));
        }
        assert!(StepRule::of(SamplerKind::Gen, 0.0, 1.0, 1.0).is_err());
        assert!(StepRule::of(SamplerKind::Ddim, 1.5, 1.0, 0.0).is_err());
    }

    #[test]
    fn every_sampler_reaches_the_data_mean_and_spread_under_an_oracle() {
        let device = Device::flex();
        for sched in [ScheduleKind::default(), ScheduleKind::Cosine, ScheduleKind::Flow] {
            let schedule = NoiseSchedule::new(sched, 1000);
            let oracle = GaussianOracle::new(schedule.clone(), 0.5);
            // (sampler, steps, the spread it must reach, data sd 0.5). With few steps every
            // sampler loses some of the spread (DDIM's contraction per step is
            // (s² + σσ')/(s² + σ²) where the exact flow has sqrt((s² + σ'²)/(s² + σ²)): 0.43 at
            // 20 steps, 0.485 at 100), so the spread is checked where it is nearly exact.
            for (kind, steps, sd_range) in [
                (SamplerKind::Ddpm, 1000, 0.47..0.53),
                (SamplerKind::Ddpm, 100, 0.44..0.53),
                (SamplerKind::Ddim, 100, 0.46..0.53),
                (SamplerKind::Accelerated, 100, 0.46..0.53),
                (SamplerKind::DpmPp2m, 20, 0.47..0.53),
                (SamplerKind::Heun, 20, 0.47..0.53),
            ] {
                let rule = StepRule::of(kind, 0.0, 1.0, 0.0).unwrap();
                let chain = Chain::trailing(&schedule, steps, rule, Clip::None).unwrap();
                let mut seen = 0;
                let labels = [2u8, 7];
                let x = sample_batch(
                    &oracle,
                    &schedule,
                    &chain,
                    &labels,
                    [1, 40, 40],
                    &mut SeededNoise::new(3, 0),
                    &device,
                    |_, _| seen += 1,
                )
                .unwrap();
                assert_eq!(seen, steps + 1);
                let v = x.into_data().try_to_vec::<f32>().unwrap();
                for (row, &l) in labels.iter().enumerate() {
                    let px = &v[row * 1600..(row + 1) * 1600];
                    let mean = px.iter().map(|&p| p as f64).sum::<f64>() / 1600.0;
                    let sd = (px.iter().map(|&p| (p as f64 - mean).powi(2)).sum::<f64>() / 1600.0).sqrt();
                    let want = GaussianOracle::mean_of(l as i64);
                    assert!((mean - want).abs() < 0.05, "{sched:?} {kind:?} {steps}: mean {mean} want {want}");
                    assert!(sd_range.contains(&sd), "{sched:?} {kind:?} {steps}: sd {sd}");
                }
            }
        }
    }

    /// Under the Gaussian oracle the probability-flow ODE is solved exactly by
    /// `x̃(σ') − μ = sqrt((s² + σ'²)/(s² + σ²))·(x̃(σ) − μ)`, so a deterministic chain must map its
    /// starting noise to `μ + s·(x̃_T − μ)/sqrt(s² + σ_T²)`: the second-order solvers must land
    /// far closer than Euler at the same number of model calls.
    #[test]
    fn second_order_solvers_follow_the_exact_flow_closer_than_euler() {
        let device = Device::flex();
        for sched in [ScheduleKind::Flow, ScheduleKind::default()] {
            let schedule = NoiseSchedule::new(sched, 1000);
            let s = 0.5;
            let oracle = GaussianOracle::new(schedule.clone(), s);
            let error = |kind: SamplerKind, steps: usize| {
                let rule = StepRule::of(kind, 0.0, 1.0, 0.0).unwrap();
                let chain = Chain::trailing(&schedule, steps, rule, Clip::None).unwrap();
                let mut start = Vec::new();
                let x = sample_batch(
                    &oracle,
                    &schedule,
                    &chain,
                    &[3],
                    [1, 16, 16],
                    &mut SeededNoise::new(5, 0),
                    &device,
                    |k, x| {
                        if k == 0 {
                            start = x.clone().into_data().try_to_vec::<f32>().unwrap();
                        }
                    },
                )
                .unwrap();
                let top = schedule.levels[chain.indices[0]];
                let mu = GaussianOracle::mean_of(3);
                // In x: x_T = a·μ + sqrt(a²s² + b²)·(standardised), valid at a = 0 too.
                let spread = (top.a * top.a * s * s + top.b * top.b).sqrt();
                let out = x.into_data().try_to_vec::<f32>().unwrap();
                let squared: f64 = out
                    .iter()
                    .zip(&start)
                    .map(|(&o, &z)| (o as f64 - (mu + s * (z as f64 - top.a * mu) / spread)).powi(2))
                    .sum();
                (squared / out.len() as f64).sqrt()
            };
            let euler = error(SamplerKind::Euler, 20);
            let dpm = error(SamplerKind::DpmPp2m, 20);
            // Both converge at second order: 4× the steps, at least 1/4 of the error.
            assert!(error(SamplerKind::DpmPp2m, 80) < dpm / 4.0, "{sched:?}");
            assert!(error(SamplerKind::Heun, 40) < error(SamplerKind::Heun, 10) / 4.0, "{sched:?}");
            if sched == ScheduleKind::Flow {
                // The flow's levels are even in t: 20 DPM-Solver++ steps, or 10 Heun steps (19
                // model calls), land within a quarter of Euler's error.
                let heun = error(SamplerKind::Heun, 10);
                assert!(dpm < euler / 4.0, "{sched:?}: DPM-Solver++(2M) {dpm} vs Euler {euler}");
                assert!(heun < euler / 4.0, "{sched:?}: Heun {heun} vs Euler {euler}");
            } else {
                // DDPM's linear schedule: its trailing levels leave a large last (Euler) step
                // from σ ≈ 0.3 to clean data, so Heun needs 20 steps to beat Euler's 40.
                assert!(dpm < euler / 2.5, "{sched:?}: DPM-Solver++(2M) {dpm} vs Euler {euler}");
                let (heun, euler40) = (error(SamplerKind::Heun, 20), error(SamplerKind::Euler, 40));
                assert!(heun < euler40 / 1.5, "{sched:?}: Heun {heun} vs Euler {euler40}");
            }
        }
    }

    #[test]
    fn sampling_is_seeded() {
        let device = Device::flex();
        let schedule = NoiseSchedule::ddpm();
        let oracle = GaussianOracle::new(schedule.clone(), 0.5);
        let rule = StepRule::of(SamplerKind::Ddpm, 0.0, 1.0, 0.0).unwrap();
        let chain = Chain::trailing(&schedule, 10, rule, Clip::X0).unwrap();
        let run = |seed| {
            sample_batch(
                &oracle,
                &schedule,
                &chain,
                &[0],
                [1, 2, 2],
                &mut SeededNoise::new(seed, 0),
                &device,
                |_, _| {},
            )
            .unwrap()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }
}
