//! The process grid: world = DP × TP ranks, laid out with the tensor-parallel group innermost
//! (world rank = dp · TP + tp), so that a TP group is consecutive ranks, which `mpirun` places
//! on one machine: tensor parallelism talks every layer, data parallelism once a step.
//! Each group is a sub-communicator of the world (MPI's split by colour).

use std::sync::Arc;

use anyhow::ensure;

use super::Collective;
use super::data_parallel::DataParallel;
use crate::collective::Local;
use crate::kernels::TensorParallel;

/// The groups a rank belongs to.
#[derive(Clone)]
pub struct Grid {
    /// Every rank: rank 0 leads (files, progress), stop requests and a run's start go to all.
    pub world: Arc<dyn Collective>,
    /// The ranks holding the same shard of the model, each with its rows of the batch.
    pub dp: DataParallel,
    /// The ranks splitting each block's heads and MLP columns.
    pub tp: TensorParallel,
}

impl Default for Grid {
    fn default() -> Self {
        Self { world: Arc::new(Local), dp: DataParallel::default(), tp: TensorParallel::single() }
    }
}

impl std::fmt::Debug for Grid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Grid(rank {} of {}: {:?}, {:?})", self.world.rank(), self.world.size(), self.dp, self.tp)
    }
}

impl Grid {
    /// The grid of `world` with tensor-parallel groups of `tp` ranks; `dp` (its `comm` unset)
    /// says how the data-parallel groups synchronise.
    pub fn new(world: Arc<dyn Collective>, tp: usize, dp: DataParallel) -> anyhow::Result<Self> {
        let (rank, size) = (world.rank(), world.size());
        ensure!(
            tp >= 1 && size.is_multiple_of(tp),
            "--tp {tp} must divide the number of ranks ({size}): the world is data-parallel × tensor-parallel"
        );
        if tp == 1 {
            return Ok(Self { dp: DataParallel { comm: world.clone(), ..dp }, world, tp: TensorParallel::single() });
        }
        let (dp_rank, tp_rank) = (rank / tp, rank % tp);
        let tp_group = world.split(dp_rank, tp_rank)?;
        let dp_group = world.split(tp_rank, dp_rank)?;
        Ok(Self { world, dp: DataParallel { comm: dp_group, ..dp }, tp: TensorParallel::over(tp_group) })
    }

    /// Whether this rank writes files and shows progress (world rank 0).
    pub fn is_lead(&self) -> bool {
        self.world.rank() == 0
    }
}
