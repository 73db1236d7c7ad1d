//! Either network behind one type: the CLI picks the family at run time (from a preset, a
//! config file or a checkpoint), and training, sampling and checkpoints never need to know
//! which it is.

use burn::prelude::*;

use super::config::{DitConfig, Family};
use super::mnist_dits::MnistDits;
use super::paper::PaperDit;

/// burn derives `Module` for the enum: parameters are visited through the active variant.
/// Checkpoint keys skip the variant name (see [`super::weights`]), so files keep the PyTorch
/// `state_dict` names of each family.
#[derive(Module, Debug)]
pub enum DitNet {
    MnistDits(MnistDits),
    Dit(PaperDit),
}

impl DitNet {
    /// A freshly initialised network of `cfg`'s family, its weights a function of `seed` alone.
    ///
    /// The seed is part of the constructor, not left to the caller, because burn draws from
    /// one generator per backend: every construction, including the throw-away weights of a
    /// network about to be loaded from a file, must draw under [`crate::rng::with_device_seed`]'s
    /// lock, or it shifts the draws of a seeded initialisation running on another thread.
    pub fn new(cfg: &DitConfig, device: &Device, seed: u64) -> Self {
        crate::rng::with_device_seed(device, seed, || match cfg.family {
            Family::MnistDits => DitNet::MnistDits(MnistDits::new(cfg, device)),
            Family::Dit => DitNet::Dit(PaperDit::new(cfg, device)),
        })
    }

    /// `x` `[B, C, H, W]`, `t` `[B]` level indices, `y` `[B]` labels → the prediction,
    /// `[B, C, H, W]`.
    pub fn forward(&self, x: Tensor<4>, t: Tensor<1, Int>, y: Tensor<1, Int>) -> Tensor<4> {
        match self {
            DitNet::MnistDits(m) => m.forward(x, t, y),
            DitNet::Dit(m) => m.forward(x, t, y),
        }
    }

    pub fn family(&self) -> Family {
        match self {
            DitNet::MnistDits(_) => Family::MnistDits,
            DitNet::Dit(_) => Family::Dit,
        }
    }
}
