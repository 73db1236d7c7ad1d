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
//!   the replicated run's bit for bit. Each rank still holds its whole local gradient.
//! - **ZeRO-2** and **ZeRO-3** shard per piece of the network ([`Partition`]): the trainer
//!   reduce-scatters each piece's gradient as its backward produces it, so a rank only ever
//!   keeps its shard of the reduced gradient; ZeRO-3 also keeps only its shard of the weights,
//!   all-gathering a piece's just before it runs (`train::zero`).

use std::ops::Range;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::partition::Partition;
use super::{Collective, Local};
use crate::optim::adam::{AdamConfig, AdamState};

/// How the ranks share the optimizer step (`--zero`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
pub enum ZeroStage {
    /// Every rank holds the whole optimizer state (DDP).
    #[default]
    Off,
    /// Each rank holds only its shard of Adam's moments.
    One,
    /// ... and of the summed gradients.
    Two,
    /// ... and of the weights.
    Three,
}

impl ZeroStage {
    /// The stage of `--zero N`.
    pub fn of(n: u8) -> anyhow::Result<Self> {
        Ok(match n {
            0 => Self::Off,
            1 => Self::One,
            2 => Self::Two,
            3 => Self::Three,
            _ => anyhow::bail!("--zero {n}: the ZeRO stages are 0, 1, 2 and 3"),
        })
    }

    pub fn number(self) -> u8 {
        self as u8
    }

    /// Whether the gradients are reduced piece by piece into each rank's shard (ZeRO-2, -3).
    pub fn shards_gradients(self) -> bool {
        self >= Self::Two
    }
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

    /// How the optimizer state of `total` parameters is split over the ranks; `pieces` are the
    /// network's segments ([`Partition`]), used from ZeRO-2 on.
    pub fn partition(&self, total: usize, pieces: &[Range<usize>]) -> Partition {
        match self.zero {
            ZeroStage::Off => Partition::replicated(total),
            ZeroStage::One => Partition::whole(total, self.rank(), self.world()),
            ZeroStage::Two | ZeroStage::Three => Partition::new(pieces.to_vec(), self.rank(), self.world()),
        }
    }

    /// This rank's share of a full optimizer state.
    pub fn shard_of(&self, full: &AdamState, part: &Partition) -> AdamState {
        AdamState { m: part.take(&full.m), v: part.take(&full.v), step: full.step }
    }

    /// The whole optimizer state on rank 0 (`None` elsewhere), from every rank's shard.
    pub fn gather_optimizer(&self, mine: &AdamState, part: &Partition) -> Option<AdamState> {
        if self.zero == ZeroStage::Off {
            return self.is_lead().then(|| mine.clone());
        }
        let comm = self.comm.as_ref();
        let (m, v) = (part.gather_to_root(comm, &mine.m), part.gather_to_root(comm, &mine.v));
        Some(AdamState { m: m?, v: v?, step: mine.step })
    }

    /// One optimizer step from this rank's mean gradient `grad` and loss over its `rows` of a
    /// global batch of `batch`; `params` (every rank's full copy) come out updated on every
    /// rank. Returns the loss of the whole batch, and whether the step was taken.
    ///
    /// With `loss_scale` (fp16), `grad` is the gradient of the loss times the scale: it is
    /// divided by it, and if any reduced gradient is not finite (an fp16 overflow) no rank
    /// updates anything.
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
        loss_scale: Option<f32>,
    ) -> (f32, bool) {
        let total = params.len();
        assert_eq!(grad.len(), total, "gradient and parameters differ in length");
        let weight = rows as f32 / batch as f32;
        let unscale = weight / loss_scale.unwrap_or(1.0);
        if unscale != 1.0 {
            grad.iter_mut().for_each(|g| *g *= unscale);
        }
        let loss = loss * weight;
        match self.zero {
            ZeroStage::Off => {
                // The loss rides in the last bucket: one call fewer.
                grad.push(loss);
                for bucket in grad.chunks_mut(self.bucket.max(1)) {
                    self.comm.all_reduce_sum(bucket);
                }
                let loss = grad.pop().expect("the loss was pushed");
                // Every rank holds the same sum: they agree on an overflow without a message.
                if loss_scale.is_some() && !grad.iter().all(|g| g.is_finite()) {
                    return (loss, false);
                }
                adam.update(cfg, lr, params, &grad);
                (loss, true)
            }
            ZeroStage::One => {
                let part = Partition::whole(total, self.rank(), self.world());
                let mut mine = vec![0f32; part.len()];
                part.reduce_scatter_add(self.comm.as_ref(), 0, &grad, &mut mine);
                drop(grad);
                // Each rank sees its shard only: an overflow flag travels with the loss's sum.
                let overflow = loss_scale.is_some() && !mine.iter().all(|g| g.is_finite());
                let mut sums = [loss, f32::from(u8::from(overflow))];
                self.comm.all_reduce_sum(&mut sums);
                if sums[1] > 0.0 {
                    return (sums[0], false);
                }
                let shard = part.mine().next().expect("one segment");
                adam.update(cfg, lr, &mut params[shard.clone()], &mine);
                let all = part.all_gather(self.comm.as_ref(), 0, &params[shard]);
                params.copy_from_slice(&all);
                (sums[0], true)
            }
            ZeroStage::Two | ZeroStage::Three => {
                panic!("ZeRO-{} reduces the gradient piece by piece (train::zero)", self.zero.number())
            }
        }
    }

    /// The loss summed over the ranks.
    pub fn sum_loss(&self, loss: f32) -> f32 {
        let mut loss = [loss];
        self.comm.all_reduce_sum(&mut loss);
        loss[0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rank_shards_are_the_whole_vector() {
        for zero in [ZeroStage::One, ZeroStage::Two] {
            let dp = DataParallel { zero, ..DataParallel::default() };
            assert_eq!(dp.partition(10, &[0..4, 4..10]).len(), 10);
        }
        assert_eq!(DataParallel::default().my_rows(7), 0..7);
    }

    #[test]
    fn zero_stages_parse() {
        assert_eq!(ZeroStage::of(3).unwrap(), ZeroStage::Three);
        assert!(ZeroStage::of(4).unwrap_err().to_string().contains("0, 1, 2 and 3"));
        assert!(ZeroStage::Two.shards_gradients() && !ZeroStage::One.shards_gradients());
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
            let (loss, taken) = dp.step(grad.clone(), 0.25, 4, 4, &mut adam, &cfg, 0.1, &mut params, None);
            assert!(taken);
            assert_eq!((loss, &params), (0.25, &want));
            // A scaled gradient is unscaled; an overflowed one takes no step.
            let (mut p, mut a) = (vec![1.0f32, 2.0, 3.0], AdamState::new(3));
            let scaled: Vec<f32> = grad.iter().map(|g| g * 1024.0).collect();
            dp.step(scaled, 0.25, 4, 4, &mut a, &cfg, 0.1, &mut p, Some(1024.0));
            assert_eq!(p, want);
            let (mut p, mut a) = (vec![1.0f32, 2.0, 3.0], AdamState::new(3));
            let (_, taken) = dp.step(vec![f32::INFINITY, 0.0, 0.0], 0.25, 4, 4, &mut a, &cfg, 0.1, &mut p, Some(2.0));
            assert!(!taken);
            assert_eq!((p, a.step), (vec![1.0, 2.0, 3.0], 0));
        }
    }
}
