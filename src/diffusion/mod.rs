//! Diffusion: the noise schedule, forward noising, the reverse samplers and guidance.

pub mod defaults;
pub mod guidance;
pub mod oracle;
pub mod sampler;
pub mod schedule;

pub use sampler::SamplerKind;
pub use schedule::NoiseSchedule;
