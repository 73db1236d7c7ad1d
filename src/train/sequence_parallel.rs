//! A trainer on a sequence-parallel group (DeepSpeed-Ulysses): every rank holds the whole
//! model and its rows of the batch, and computes the prediction for its share of each image's
//! tokens. Its loss is its tokens' part of the batch's mean, so the gradients summed over the
//! group (with the data-parallel sum) are the whole batch's.

use std::sync::Arc;

use burn::prelude::*;

use super::config::LossKind;
use super::step::Trainer;
use crate::collective::Collective;
use crate::kernels::{SequenceParallel, TensorParallel};
use crate::model::{DitConfig, DitNet};

/// The sequence-parallel split of `cfg` over the ranks of `comm`, on top of `tp`: tokens and
/// (per tensor-parallel rank) heads must divide.
pub fn split_of(cfg: &DitConfig, comm: Arc<dyn Collective>, tp: &TensorParallel) -> anyhow::Result<SequenceParallel> {
    SequenceParallel::new(comm, cfg.tokens(), cfg.heads / tp.size())
}

impl Trainer {
    /// Split each image's tokens over the ranks of `comm` (none: keep them all). Every rank of
    /// the group must hold the same trainer.
    pub fn with_sequence_parallel(mut self, comm: Option<Arc<dyn Collective>>) -> anyhow::Result<Self> {
        if let Some(comm) = comm {
            self.sp = Some(split_of(&self.state.model, comm, &self.tp)?);
        }
        Ok(self)
    }
}

/// The loss of a micro-batch on this rank's tokens of `sp`: its share of the micro-batch's
/// mean (the shares of the group's ranks add up to the mean).
pub(super) fn shard_loss(
    model: &DitNet,
    (xt, t, y, target): (Tensor<4>, Tensor<1, Int>, Tensor<1, Int>, Tensor<4>),
    kind: LossKind,
    tp: &TensorParallel,
    sp: &SequenceParallel,
) -> Tensor<1> {
    let elements = target.dims().iter().product::<usize>() as f64;
    let target = sp.shard_of(model.patchify(target)); // [B, S/P, C·p²]
    let diff = model.forward_tokens(xt, t, y, tp, sp) - target;
    let sum = match kind {
        LossKind::L1 => diff.abs().sum(),
        LossKind::Mse => diff.square().sum(),
    };
    sum / elements
}
