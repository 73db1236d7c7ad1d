//! Mixed-precision training (`--precision`), as DeepSpeed and PyTorch AMP do it: the forward
//! and backward run on a bf16 or fp16 copy of the weights, made from the fp32 master weights
//! at every step; the gradients come back to fp32 for the all-reduce (a sum over ranks, where
//! half precision would lose small contributions), Adam's moments, the master weights and their
//! moving average stay fp32. Inside the low-precision forward the loss, LayerNorm's statistics,
//! the softmax and the time-embedding angles run in fp32 (`kernels::ops`).
//!
//! fp16's range ends at 65504 and its smallest normal is 6e-5, so small gradients vanish:
//! DeepSpeed's dynamic loss scaling multiplies the loss by a scale S before the backward and
//! divides the gradients by S after it; a gradient that overflowed (Inf/NaN) skips the step and
//! halves S, and a run of clean steps doubles it ([`LossScale`]). bf16 keeps fp32's range and
//! needs no scale.

use burn::tensor::DType;
use serde::{Deserialize, Serialize};

/// The float type of the forward and backward.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    Fp32,
    /// bfloat16 forward and backward (8 exponent bits: no loss scaling).
    Bf16,
    /// IEEE half forward and backward, with dynamic loss scaling.
    Fp16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Precision::Fp32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::Fp16 => DType::F16,
        }
    }

    pub fn is_mixed(self) -> bool {
        self != Precision::Fp32
    }

    /// Whether the loss is scaled (fp16).
    pub fn scales_loss(self) -> bool {
        self == Precision::Fp16
    }
}

/// DeepSpeed's default initial loss scale, 2^16 (`initial_scale_power`).
pub const DEFAULT_SCALE_POWER: u32 = 16;

/// The dynamic loss scale of an fp16 run, checkpointed with the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    pub scale: f32,
    /// Steps since the last overflow (or the last doubling).
    pub clean_steps: u64,
    /// Steps skipped for an overflow over the whole run.
    pub skipped_steps: u64,
}

impl LossScale {
    /// Clean steps before the scale doubles (DeepSpeed's `loss_scale_window`).
    pub const WINDOW: u64 = 1000;
    /// The scale never falls below this (DeepSpeed's `min_loss_scale`).
    pub const MIN: f32 = 1.0;

    /// A scale of 2^`power`.
    pub fn new(power: u32) -> Self {
        Self { scale: 2f32.powi(power as i32), clean_steps: 0, skipped_steps: 0 }
    }

    /// After a step: on an overflow the step was skipped and the scale halves; after
    /// [`Self::WINDOW`] clean steps it doubles.
    pub fn update(&mut self, overflow: bool) {
        if overflow {
            self.scale = (self.scale / 2.0).max(Self::MIN);
            self.clean_steps = 0;
            self.skipped_steps += 1;
        } else {
            self.clean_steps += 1;
            if self.clean_steps == Self::WINDOW {
                self.scale *= 2.0;
                self.clean_steps = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scale_halves_on_overflow_and_doubles_after_a_clean_window() {
        let mut s = LossScale::new(DEFAULT_SCALE_POWER);
        assert_eq!(s.scale, 65536.0);
        s.update(true);
        assert_eq!((s.scale, s.skipped_steps), (32768.0, 1));
        for _ in 0..LossScale::WINDOW - 1 {
            s.update(false);
        }
        assert_eq!(s.scale, 32768.0);
        s.update(false);
        assert_eq!((s.scale, s.clean_steps), (65536.0, 0));
        let mut tiny = LossScale::new(0);
        tiny.update(true);
        assert_eq!(tiny.scale, LossScale::MIN);
    }
}
