//! The process grid: world = DP × SP × TP ranks, laid out with the tensor-parallel group
//! innermost (world rank = (dp · SP + sp) · TP + tp), so that a TP group is consecutive ranks,
//! which `mpirun` places on one machine: tensor parallelism talks in every layer, sequence
//! parallelism twice per block, data parallelism once a step. Each group is a
//! sub-communicator of the world (MPI's split by colour). The ranks holding the same shard of
//! the model (same TP rank: DP × SP of them) sum their gradients: the SP ranks of a DP rank
//! share its rows of the batch, each with its tokens.
//!
//! Pipeline parallelism takes the outermost place instead (world rank = stage · DP + dp, as
//! Megatron-LM puts its pipeline stages across machines: they talk least, once per micro-batch
//! and direction); it combines with data parallelism (and ZeRO-1) only.

use std::sync::Arc;

use anyhow::ensure;

use super::data_parallel::DataParallel;
use super::pipeline::Pipeline;
use super::{Collective, CommStats};
use crate::collective::Local;
use crate::kernels::TensorParallel;

/// The groups a rank belongs to.
#[derive(Clone)]
pub struct Grid {
    /// Every rank: rank 0 leads (files, progress), stop requests and a run's start go to all.
    pub world: Arc<dyn Collective>,
    /// The ranks holding the same shard of the model, each with its rows (and tokens) of the
    /// batch.
    pub dp: DataParallel,
    /// The ranks splitting each block's heads and MLP columns.
    pub tp: TensorParallel,
    /// The ranks splitting each image's tokens (`None`: one rank holds them all).
    pub sp: Option<Arc<dyn Collective>>,
    /// The ranks running the stages of this rank's pipeline (`None`: no pipeline).
    pub pp: Option<Pipeline>,
}

impl Default for Grid {
    fn default() -> Self {
        Self { world: Arc::new(Local), dp: DataParallel::default(), tp: TensorParallel::single(), sp: None, pp: None }
    }
}

impl std::fmt::Debug for Grid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Grid(rank {} of {}: {:?}, {:?})", self.world.rank(), self.world.size(), self.dp, self.tp)
    }
}

impl Grid {
    /// The grid of `world` with tensor-parallel groups of `tp` ranks, sequence-parallel groups
    /// of `sp` and pipelines of `pp` stages; `dp` (its `comm` unset) says how the gradients are
    /// summed.
    pub fn new(world: Arc<dyn Collective>, tp: usize, sp: usize, pp: usize, dp: DataParallel) -> anyhow::Result<Self> {
        let (rank, size) = (world.rank(), world.size());
        if pp > 1 {
            ensure!(tp == 1 && sp == 1, "--pp combines with data parallelism only: not with --tp or --sp");
            ensure!(
                size.is_multiple_of(pp),
                "--pp {pp} must divide the number of ranks ({size}): the world is data-parallel × pipeline stages"
            );
            let dp_size = size / pp;
            let (stage, dp_rank) = (rank / dp_size, rank % dp_size);
            let dp_group = world.split(stage, dp_rank)?;
            let pipeline = world.split(dp_rank, stage)?;
            return Ok(Self {
                world,
                dp: DataParallel { comm: dp_group, ..dp },
                tp: TensorParallel::single(),
                sp: None,
                pp: Some(Pipeline { comm: pipeline }),
            });
        }
        let flags = match (tp, sp) {
            (_, 1) => format!("--tp {tp}"),
            (1, _) => format!("--sp {sp}"),
            _ => format!("--tp {tp} × --sp {sp}"),
        };
        ensure!(
            tp >= 1 && sp >= 1 && size.is_multiple_of(tp * sp),
            "{flags} must divide the number of ranks ({size}): the world is data-parallel × sequence-parallel × tensor-parallel"
        );
        if tp * sp == 1 {
            let dp = DataParallel { comm: world.clone(), ..dp };
            return Ok(Self { dp, world, tp: TensorParallel::single(), sp: None, pp: None });
        }
        let (tp_rank, sp_rank, dp_rank) = (rank % tp, rank / tp % sp, rank / (tp * sp));
        let tp_group = world.split(rank / tp, tp_rank)?;
        let sp_group = world.split(dp_rank * tp + tp_rank, sp_rank)?;
        let shard_group = world.split(tp_rank, rank / tp)?;
        let batch_part = Some((dp_rank, size / (tp * sp)));
        Ok(Self {
            world,
            dp: DataParallel { comm: shard_group, batch_part, ..dp },
            tp: TensorParallel::over(tp_group),
            sp: (sp > 1).then_some(sp_group),
            pp: None,
        })
    }

    /// What this rank has communicated so far, over all its groups.
    pub fn comm_stats(&self) -> CommStats {
        let mut groups: Vec<&Arc<dyn Collective>> = vec![&self.world, &self.dp.comm];
        groups.extend(self.tp.comm());
        groups.extend(self.sp.as_ref());
        groups.extend(self.pp.as_ref().map(|p| &p.comm));
        let mut unique: Vec<&Arc<dyn Collective>> = Vec::new();
        for g in groups {
            if !unique.iter().any(|u| Arc::ptr_eq(u, g)) {
                unique.push(g);
            }
        }
        unique.iter().map(|g| g.stats()).fold(CommStats::default(), |a, b| CommStats {
            calls: a.calls + b.calls,
            bytes: a.bytes + b.bytes,
            time: a.time + b.time,
        })
    }

    /// Whether this rank writes files and shows progress (world rank 0).
    pub fn is_lead(&self) -> bool {
        self.world.rank() == 0
    }
}
