//! The default way to sample, chosen by measurement (README, "Sample quality"), used by
//! `dits sample` and by the grids a run draws while it trains.

use super::SamplerKind;

/// Guidance scale for models trained with label dropout.
pub const DEFAULT_CFG_SCALE: f64 = 2.0;
/// Guidance interval in σ: guiding the noisiest steps costs diversity (FID) without helping the
/// class, guiding the last ones only sharpens noise.
pub const DEFAULT_CFG_INTERVAL: (f64, f64) = (0.3, 5.0);
/// Sampling steps.
pub const DEFAULT_STEPS: usize = 20;
/// Sampler.
pub const DEFAULT_SAMPLER: SamplerKind = SamplerKind::Euler;
