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
    /// A freshly initialised network of `cfg`'s family.
    pub fn new(cfg: &DitConfig, device: &Device) -> Self {
        match cfg.family {
            Family::MnistDits => DitNet::MnistDits(MnistDits::new(cfg, device)),
            Family::Dit => DitNet::Dit(PaperDit::new(cfg, device)),
        }
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
