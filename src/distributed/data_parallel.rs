//! Data parallelism with DDP semantics, and ZeRO-1 sharding of the optimizer state.
//!
//! Every rank draws the same global batch (same seed, same permutation) and computes the
//! gradient of its own contiguous share of its rows ([`crate::ranges::even_ranges`]): the shards of an epoch
//! are disjoint and cover it. Each rank weights its mean gradient by its share of the batch, so
//! the sum over the ranks is the gradient of the whole batch, whatever the world size.
//!
//! - **Replicated** (DDP): the gradient is summed by all-reduce, in buckets of the flat
//!   vector, and every rank applies the same Adam step to its full copy of the weights.
//! - **ZeRO-1**: a reduce-scatter leaves each rank the summed gradient of its shard of the
//!   parameters only; it keeps Adam's moments for that shard alone, updates that shard, and an
//!   all-gather gives every rank the new weights. Adam is element-wise, so the weights equal
//!   the replicated run's bit for bit.

use std::ops::Range;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Collective, Local};
use crate::optim::adam::{AdamConfig, AdamState};

/// How the ranks share the optimizer step (`--zero`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ZeroStage {
    /// Every rank holds the whole optimizer state (DDP).
    #[default]
    Off,
    /// Each rank holds only its shard of Adam's moments.
    One,
}

/// The world a trainer runs in and how it synchronises.
#[derive(Clone)]
pub struct DataParallel {
    pub comm: Arc<dyn Collective>,
    pub zero: ZeroStage,
    /// Elements per all-reduce call.
    pub bucket: usize,
    /// Which part of every batch this rank computes, `(part, parts)`, when that is not its place
    /// in `comm`: the ranks of a sequence-parallel group share their rows (`None`: rank and size).
    pub batch_part: Option<(usize, usize)>,
}

/// PyTorch DDP's default gradient bucket, in MiB.
pub const DEFAULT_BUCKET_MIB: u64 = 25;

/// The f32 elements of a bucket of `mib` MiB.
pub fn bucket_elements(mib: u64) -> usize {
    mib as usize * (1 << 20) / size_of::<f32>()
}

impl Default for DataParallel {
    fn default() -> Self {
        Self {
            comm: Arc::new(Local),
            zero: ZeroStage::Off,
            bucket: bucket_elements(DEFAULT_BUCKET_MIB),
            batch_part: None,
        }
    }
}

impl std::fmt::Debug for DataParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataParallel(rank {} of {}, {:?})", self.comm.rank(), self.comm.size(), self.zero)
    }
}

impl DataParallel {
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn world(&self) -> usize {
        self.comm.size()
    }

    /// Whether this rank writes files and shows progress (rank 0).
    pub fn is_lead(&self) -> bool {
        self.rank() == 0
    }

    /// How many parts every batch is split into (the data-parallel ranks).
    pub fn batch_parts(&self) -> usize {
        self.batch_part.map_or(self.world(), |(_, parts)| parts)
    }

    /// This rank's rows of a global batch of `batch`.
    pub fn my_rows(&self, batch: usize) -> Range<usize> {
        let (part, parts) = self.batch_part.unwrap_or((self.rank(), self.world()));
        crate::ranges::even_ranges(batch, parts)[part].clone()
    }

    /// Length of each rank's block of the parameters under ZeRO-1 (the last ones padded).
    fn block(&self, total: usize) -> usize {
        total.div_ceil(self.world())
    }

    /// The parameters whose optimizer state this rank keeps.
    pub fn shard(&self, total: usize) -> Range<usize> {
        match self.zero {
            ZeroStage::Off => 0..total,
            ZeroStage::One => {
                let block = self.block(total);
                (self.rank() * block).min(total)..((self.rank() + 1) * block).min(total)
            }
        }
    }

    /// This rank's share of a full optimizer state.
    pub fn shard_of(&self, full: &AdamState) -> AdamState {
        let r = self.shard(full.m.len());
        AdamState { m: full.m[r.clone()].to_vec(), v: full.v[r].to_vec(), step: full.step }
    }

    /// The whole optimizer state on rank 0 (`None` elsewhere), from every rank's shard.
    pub fn gather_optimizer(&self, mine: &AdamState, total: usize) -> Option<AdamState> {
        if self.zero == ZeroStage::Off {
            return self.is_lead().then(|| mine.clone());
        }
        let block = self.block(total);
        let gather = |x: &[f32]| {
            let mut padded = x.to_vec();
            padded.resize(block, 0.0);
            self.comm.gather_to_root(&padded).map(|mut all| {
                all.truncate(total);
                all
            })
        };
        let (m, v) = (gather(&mine.m), gather(&mine.v));
        Some(AdamState { m: m?, v: v?, step: mine.step })
    }

    /// One optimizer step from this rank's mean gradient `grad` and loss over its `rows` of a
    /// global batch of `batch`; `params` (every rank's full copy) come out updated on every
    /// rank. Returns the loss of the whole batch.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &self,
        mut grad: Vec<f32>,
        loss: f32,
        rows: usize,
        batch: usize,
        adam: &mut AdamState,
        cfg: &AdamConfig,
        lr: f64,
        params: &mut [f32],
    ) -> f32 {
        let total = params.len();
        assert_eq!(grad.len(), total, "gradient and parameters differ in length");
        let weight = rows as f32 / batch as f32;
        if weight != 1.0 {
            grad.iter_mut().for_each(|g| *g *= weight);
        }
        match self.zero {
            ZeroStage::Off => {
                // The loss rides in the last bucket: one call fewer.
                grad.push(loss * weight);
                for bucket in grad.chunks_mut(self.bucket.max(1)) {
                    self.comm.all_reduce_sum(bucket);
                }
                let loss = grad.pop().expect("the loss was pushed");
                adam.update(cfg, lr, params, &grad);
                loss
            }
            ZeroStage::One => {
                let block = self.block(total);
                grad.resize(block * self.world(), 0.0);
                let mut mine = vec![0f32; block];
                self.comm.reduce_scatter_sum(&grad, &mut mine);
                let shard = self.shard(total);
                adam.update(cfg, lr, &mut params[shard.clone()], &mine[..shard.len()]);
                let mut send = params[shard].to_vec();
                send.resize(block, 0.0);
                let mut all = vec![0f32; block * self.world()];
                self.comm.all_gather(&send, &mut all);
                params.copy_from_slice(&all[..total]);
                let mut loss = [loss * weight];
                self.comm.all_reduce_sum(&mut loss);
                loss[0]
            }
        }
    }

    /// Bytes of optimizer state (Adam's two moments) this rank keeps for `total` parameters.
    pub fn optimizer_bytes(&self, total: usize) -> usize {
        2 * 4 * self.shard(total).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rank_shards_are_the_whole_vector() {
        let dp = DataParallel { zero: ZeroStage::One, ..DataParallel::default() };
        assert_eq!(dp.shard(10), 0..10);
        assert_eq!(dp.my_rows(7), 0..7);
        assert_eq!(dp.optimizer_bytes(10), 80);
    }

    /// On one rank both stages take exactly the plain Adam step.
    #[test]
    fn a_local_step_is_plain_adam() {
        let cfg = AdamConfig::default();
        let grad = vec![0.5f32, -1.0, 2.0];
        let mut want = vec![1.0f32, 2.0, 3.0];
        let mut adam = AdamState::new(3);
        adam.update(&cfg, 0.1, &mut want, &grad);
        for zero in [ZeroStage::Off, ZeroStage::One] {
            let dp = DataParallel { zero, ..DataParallel::default() };
            let (mut params, mut adam) = (vec![1.0f32, 2.0, 3.0], AdamState::new(3));
            let loss = dp.step(grad.clone(), 0.25, 4, 4, &mut adam, &cfg, 0.1, &mut params);
            assert_eq!((loss, &params), (0.25, &want));
        }
    }
}
