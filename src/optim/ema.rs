//! Exponential moving average of the weights, the weights diffusion models sample with: the
//! raw weights of a short, high-learning-rate run jitter from step to step, and their average
//! denoises markedly better.

use rayon::prelude::*;

/// The decay at `step` (updates so far): `min(decay, (1 + step) / (10 + step))`, so early
/// averages are not dominated by the random initialisation.
pub fn decay_at(decay: f64, step: u64) -> f64 {
    decay.min((1.0 + step as f64) / (10.0 + step as f64))
}

/// `ema ← d·ema + (1-d)·params`, element by element (on every thread: the other core would
/// otherwise wait for it at the end of each step).
pub fn update(ema: &mut [f32], params: &[f32], decay: f64) {
    assert_eq!(ema.len(), params.len(), "ema: the average and the weights differ in length");
    let (d, w) = (decay as f32, (1.0 - decay) as f32);
    ema.par_chunks_mut(super::CHUNK).zip(params.par_chunks(super::CHUNK)).for_each(|(ema, params)| {
        for (e, &p) in ema.iter_mut().zip(params) {
            *e = d * *e + w * p;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_up_then_fixed_decay() {
        assert!((decay_at(0.999, 0) - 0.1).abs() < 1e-12);
        assert!((decay_at(0.999, 90) - 0.91).abs() < 1e-12);
        assert_eq!(decay_at(0.999, 1_000_000), 0.999);
    }

    #[test]
    fn tracks_a_constant_and_averages() {
        let mut ema = vec![0.0f32];
        for step in 0..5000 {
            update(&mut ema, &[2.0], decay_at(0.99, step));
        }
        assert!((ema[0] - 2.0).abs() < 1e-4);
        let mut ema = vec![1.0f32];
        update(&mut ema, &[3.0], 0.5);
        assert_eq!(ema[0], 2.0);
    }
}
