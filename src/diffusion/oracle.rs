//! The exact denoiser of Gaussian data: what a perfectly trained network would predict when
//! every pixel of class y is N(μ_y, s²). It makes samplers testable (their output must have
//! mean μ_y and spread s) and is the toy model of the golden sampler fixtures.
//!
//! With `x = a·x_0 + b·ε`: `E[ε | x] = b(x − aμ)/(a²s² + b²)` and
//! `E[x_0 | x] = μ + a·s²(x − aμ)/(a²s² + b²)`, defined at every level, pure noise (a = 0)
//! included.

use burn::prelude::*;

use super::sampler::Denoiser;
use super::schedule::{Level, NoiseSchedule, Prediction};

pub struct GaussianOracle {
    pub schedule: NoiseSchedule,
    /// Per-pixel standard deviation of the data.
    pub s: f64,
}

impl GaussianOracle {
    pub fn new(schedule: NoiseSchedule, s: f64) -> Self {
        Self { schedule, s }
    }

    /// μ_y = 0.1·y − 0.4 (the null label of a 10-class model, 10, has its own mean 0.6).
    pub fn mean_of(label: i64) -> f64 {
        0.1 * label as f64 - 0.4
    }

    /// The network output (ε̂ or the velocity ε̂ − x̂_0) for one value.
    pub fn predict_value(&self, level: Level, x: f64, label: i64) -> f64 {
        let Level { a, b } = level;
        let mu = Self::mean_of(label);
        let denom = a * a * self.s * self.s + b * b;
        let eps = b * (x - a * mu) / denom;
        match self.schedule.prediction() {
            Prediction::Epsilon => eps,
            Prediction::Velocity => eps - (mu + a * self.s * self.s * (x - a * mu) / denom),
        }
    }
}

impl Denoiser for GaussianOracle {
    fn predict(&self, x: Tensor<4>, t: Tensor<1, Int>, y: Tensor<1, Int>) -> Tensor<4> {
        let ts: Vec<i64> = t.into_data().iter::<i64>().collect();
        let ys: Vec<i64> = y.into_data().iter::<i64>().collect();
        let dims = x.dims();
        let per = dims[1] * dims[2] * dims[3];
        let device = x.device();
        let mut v: Vec<f32> = x.into_data().iter::<f32>().collect();
        for (i, row) in v.chunks_mut(per).enumerate() {
            let level = self.schedule.levels[ts[i] as usize];
            for value in row {
                *value = self.predict_value(level, *value as f64, ys[i]) as f32;
            }
        }
        Tensor::from_data(TensorData::new(v, dims), &device)
    }
}
