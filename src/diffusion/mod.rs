//! Diffusion: the noise schedule, forward noising, and the reverse samplers.

pub mod sampler;
pub mod schedule;

pub use sampler::SamplerKind;
pub use schedule::NoiseSchedule;
