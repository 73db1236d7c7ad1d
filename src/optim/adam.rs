//! Adam and AdamW on the flat parameter vector, with PyTorch's exact update order.
//!
//! Hand-written rather than burn's `Adam` because the optimizer state must be keyed by stable
//! parameter names (burn keys it by per-process `ParamId`s and silently re-initialises state it
//! cannot match), saved bit-exactly for resume, and sliceable for ZeRO-1 sharding; on a flat
//! vector all three are trivial. The update is ~10 flops per parameter, negligible next to
//! the forward and backward passes.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::CHUNK;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// L2 penalty (Adam) or decoupled decay (AdamW).
    pub weight_decay: f64,
    /// AdamW's decoupled weight decay instead of Adam's L2 term.
    pub decoupled: bool,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, decoupled: false }
    }
}

/// First and second moments over (a slice of) the flat parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamState {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    /// Updates applied so far (for bias correction).
    pub step: u64,
}

impl AdamState {
    pub fn new(len: usize) -> Self {
        Self { m: vec![0.0; len], v: vec![0.0; len], step: 0 }
    }

    /// One update of `params` with `grads` at learning rate `lr`.
    pub fn update(&mut self, cfg: &AdamConfig, lr: f64, params: &mut [f32], grads: &[f32]) {
        assert_eq!(params.len(), self.m.len());
        assert_eq!(grads.len(), self.m.len());
        self.step += 1;
        let (b1, b2) = (cfg.beta1 as f32, cfg.beta2 as f32);
        let bias1 = 1.0 - cfg.beta1.powi(self.step as i32);
        let bias2_sqrt = (1.0 - cfg.beta2.powi(self.step as i32)).sqrt();
        let step_size = (lr / bias1) as f32;
        let (bias2_sqrt, eps) = (bias2_sqrt as f32, cfg.eps as f32);
        let wd = cfg.weight_decay as f32;
        let decay = 1.0 - (lr * cfg.weight_decay) as f32;
        // Element by element, on every thread (the other core would wait for it otherwise).
        let chunks = params.par_chunks_mut(CHUNK).zip(grads.par_chunks(CHUNK));
        chunks.zip(self.m.par_chunks_mut(CHUNK)).zip(self.v.par_chunks_mut(CHUNK)).for_each(
            |(((params, grads), m), v)| {
                for (((p, &g), m), v) in params.iter_mut().zip(grads).zip(m).zip(v) {
                    let g = if wd != 0.0 && !cfg.decoupled { g + wd * *p } else { g };
                    if cfg.decoupled {
                        *p *= decay;
                    }
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    let denom = v.sqrt() / bias2_sqrt + eps;
                    *p -= step_size * *m / denom;
                }
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_moves_each_weight_by_lr_against_the_gradient_sign() {
        let mut p = vec![1.0f32, -2.0, 0.5];
        let mut s = AdamState::new(3);
        s.update(&AdamConfig::default(), 0.1, &mut p, &[3.0, -0.01, 0.0]);
        assert!((p[0] - 0.9).abs() < 1e-6);
        assert!((p[1] - -1.9).abs() < 1e-5);
        assert_eq!(p[2], 0.5);
        assert_eq!(s.step, 1);
    }

    #[test]
    fn minimises_a_quadratic() {
        let mut p = vec![5.0f32, -3.0];
        let mut s = AdamState::new(2);
        for _ in 0..2000 {
            let g: Vec<f32> = p.iter().map(|x| 2.0 * x).collect();
            s.update(&AdamConfig::default(), 0.05, &mut p, &g);
        }
        assert!(p.iter().all(|x| x.abs() < 1e-2), "{p:?}");
    }

    #[test]
    fn adamw_decays_weights_without_gradient() {
        let mut p = vec![1.0f32];
        let mut s = AdamState::new(1);
        let cfg = AdamConfig { weight_decay: 0.1, decoupled: true, ..Default::default() };
        s.update(&cfg, 0.5, &mut p, &[0.0]);
        assert!((p[0] - 0.95).abs() < 1e-7);
    }
}
