//! The ranks of a run, from the `--dist`, `--ranks`, `--tp`, `--sp`, `--pp`, `--zero` and `--bucket-mb`
//! settings: one process, one MPI process per rank (in a grid), or one thread per device in
//! this process.

use std::sync::Arc;

use anyhow::{Context, ensure};
use burn::prelude::*;

use super::Collective;
use super::data_parallel::{DEFAULT_BUCKET_MIB, DataParallel, ZeroStage, bucket_elements};
use super::devices::DeviceWorld;
use super::grid::Grid;
use crate::collective::{Local, on_every_rank};
use crate::device::{DeviceKind, device, devices, resolve};
use crate::kernels::TensorParallel;

/// How the ranks of a run are laid out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DistKind {
    /// One process.
    #[default]
    None,
    /// MPI (OpenMPI, MPICH), launched by mpirun.
    Mpi,
    /// Threads of this process, one device each.
    Devices,
}

/// The settings a world is built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorldSpec {
    pub dist: DistKind,
    /// Ranks of [`DistKind::Devices`] (mpirun sets those of [`DistKind::Mpi`]).
    pub ranks: Option<u64>,
    /// ZeRO stage: 0 to 3.
    pub zero: u8,
    /// Ranks of each tensor-parallel group (`--tp`).
    pub tp: usize,
    /// Ranks of each sequence-parallel group (`--sp`).
    pub sp: usize,
    /// Pipeline stages (`--pp`).
    pub pp: usize,
    pub bucket_mib: u64,
    pub device: DeviceKind,
}

impl Default for WorldSpec {
    fn default() -> Self {
        Self {
            dist: DistKind::None,
            ranks: None,
            zero: 0,
            tp: 1,
            sp: 1,
            pp: 1,
            bucket_mib: DEFAULT_BUCKET_MIB,
            device: DeviceKind::Cpu,
        }
    }
}

/// The ranks this process runs, each with its device.
pub enum World {
    /// One rank in this thread: a single process, or this process's rank of an MPI world.
    Process(Grid, Device),
    /// One thread per rank (`--dist devices`).
    Threads(Vec<(Grid, Device)>),
}

impl WorldSpec {
    /// The world these settings describe (for MPI: joins it).
    pub fn build(&self) -> anyhow::Result<World> {
        ensure!(
            self.ranks.is_none() || self.dist == DistKind::Devices,
            "--ranks is for --dist devices (mpirun sets the ranks of --dist mpi)"
        );
        let zero = ZeroStage::of(self.zero)?;
        ensure!(
            !zero.shards_gradients() || (self.tp == 1 && self.sp == 1),
            "--zero {} shards over data-parallel ranks only: it does not combine with --tp or --sp (use --zero 1)",
            self.zero
        );
        ensure!(
            self.pp == 1 || !zero.shards_gradients(),
            "--zero {} does not combine with --pp: a stage already keeps only its own pieces' state (use --zero 1 over the data-parallel ranks)",
            self.zero
        );
        ensure!(
            self.pp == 1 || self.dist == DistKind::Mpi,
            "--pp passes activations between stages with point-to-point messages: it needs --dist mpi (under mpirun)"
        );
        let bucket = bucket_elements(self.bucket_mib);
        let ranked = |comm: Arc<dyn Collective>| DataParallel { comm, zero, bucket, batch_part: None };
        ensure!(
            (self.tp == 1 && self.sp == 1) || self.dist == DistKind::Mpi,
            "--tp and --sp split the model over MPI ranks: they need --dist mpi (under mpirun)"
        );
        let comm: Arc<dyn Collective> = match self.dist {
            DistKind::None => {
                ensure!(
                    self.zero == 0,
                    "--zero {} shards the training state over ranks: it needs --dist mpi or devices",
                    self.zero
                );
                Arc::new(Local)
            }
            DistKind::Devices => {
                let ranks = self.ranks.context("--dist devices needs --ranks N")? as usize;
                // burn's collective all-reduce (NCCL) sums CUDA ranks on their GPUs; CPU ranks,
                // and wgpu ranks sharing one adapter, sum in this process's memory.
                let kind = resolve(self.device)?;
                let on_devices = kind == DeviceKind::Cuda;
                let world = DeviceWorld::world(devices(kind, ranks)?, on_devices);
                return Ok(World::Threads(
                    world
                        .into_iter()
                        .map(|w| {
                            let device = w.device().clone();
                            let comm: Arc<dyn Collective> = Arc::new(w);
                            let grid = Grid {
                                world: comm.clone(),
                                dp: ranked(comm),
                                tp: TensorParallel::single(),
                                sp: None,
                                pp: None,
                            };
                            (grid, device)
                        })
                        .collect(),
                ));
            }
            #[cfg(feature = "mpi")]
            DistKind::Mpi => Arc::new(super::mpi::MpiWorld::init()?),
            #[cfg(not(feature = "mpi"))]
            DistKind::Mpi => anyhow::bail!(
                "this dits was built without MPI support: install MPI and libclang \
                 (apt-get install openmpi-bin libopenmpi-dev libclang-dev), then `cargo build --release --features mpi`"
            ),
        };
        // Every rank finds a grid that does not fit alike, and says so.
        let grid =
            on_every_rank(comm.as_ref(), Grid::new(comm.clone(), self.tp, self.sp, self.pp, ranked(comm.clone())))?;
        Ok(World::Process(grid, device(self.device)?))
    }
}
