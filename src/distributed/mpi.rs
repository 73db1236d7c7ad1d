//! The collectives on MPI (the `mpi` crate over the system's MPI library, e.g. OpenMPI).
//!
//! Launched by `mpirun`, each process calls [`MpiWorld::init`] once; MPI is finalised when the
//! world is dropped.

use std::sync::{Arc, Mutex};

use mpi::Threading;
use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use mpi::environment::Universe;
use mpi::point_to_point::{Destination, Source, send_receive_into};
use mpi::topology::{Color, Communicator, SimpleCommunicator};

use super::{Collective, CommStats, StatsRecorder};

/// MPI's world communicator, or a sub-group of it ([`Collective::split`]).
pub struct MpiWorld {
    comm: Comm,
    rank: usize,
    size: usize,
    stats: StatsRecorder,
    // Dropped after `comm`: the last communicator to go finalises MPI.
    universe: Arc<Finalizer>,
}

/// MPI's universe, finalised when dropped.
struct Finalizer(#[allow(dead_code)] Universe);

// SAFETY: as for `Comm`: the universe is only dropped, once, by the last communicator.
unsafe impl Send for Finalizer {}
unsafe impl Sync for Finalizer {}

/// A communicator handle, movable between threads.
struct Comm(SimpleCommunicator);

// SAFETY: MPI is initialised with `Threading::Serialized` (checked in `init`): any thread may
// call MPI as long as no two calls overlap, on any communicator, which the one process-wide
// lock around every use guarantees.
unsafe impl Send for Comm {}
unsafe impl Sync for Comm {}

/// Held around every MPI call of this process.
static MPI_CALL: Mutex<()> = Mutex::new(());

impl MpiWorld {
    /// Initialises MPI, or says why it cannot.
    pub fn init() -> anyhow::Result<Self> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| anyhow::anyhow!("MPI was already initialised in this process"))?;
        anyhow::ensure!(
            threading >= Threading::Serialized,
            "the MPI library offers thread level {threading:?}; dits needs Serialized"
        );
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        let universe = Arc::new(Finalizer(universe));
        Ok(Self { comm: Comm(world), rank, size, stats: StatsRecorder::default(), universe })
    }

    fn with<T>(&self, bytes: usize, op: impl FnOnce(&SimpleCommunicator) -> T) -> T {
        let _lock = MPI_CALL.lock().unwrap_or_else(|p| p.into_inner());
        self.stats.record(bytes, || op(&self.comm.0))
    }
}

fn bytes_of(n: usize) -> usize {
    n * std::mem::size_of::<f32>()
}

impl Collective for MpiWorld {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) {
        let send = buf.to_vec();
        self.with(bytes_of(buf.len()), |c| c.all_reduce_into(&send[..], buf, SystemOperation::sum()));
    }

    /// An all-to-all, then the sum in rank order here: `MPI_Reduce_scatter_block` may add the
    /// blocks in any order (OpenMPI's does not follow the ranks for three), and float addition
    /// is not associative. In rank order the sum is the one a single process computes over its
    /// micro-batches, so ZeRO-1 reproduces a one-process run bit for bit. Each rank moves the
    /// same bytes as in a pairwise reduce-scatter.
    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) {
        assert_eq!(send.len(), recv.len() * self.size, "reduce-scatter: send must hold one block per rank");
        let block = recv.len();
        let mut blocks = vec![0f32; send.len()];
        self.with(bytes_of(send.len() - block), |c| c.all_to_all_into(send, &mut blocks[..]));
        recv.fill(0.0);
        for from in blocks.chunks_exact(block) {
            recv.iter_mut().zip(from).for_each(|(r, &v)| *r += v);
        }
    }

    fn all_gather(&self, send: &[f32], recv: &mut [f32]) {
        assert_eq!(recv.len(), send.len() * self.size, "all-gather: recv must hold one block per rank");
        self.with(bytes_of(send.len()), |c| c.all_gather_into(send, recv));
    }

    fn gather_to_root(&self, send: &[f32]) -> Option<Vec<f32>> {
        self.with(bytes_of(send.len()), |c| {
            let root = c.process_at_rank(0);
            if self.rank == 0 {
                let mut all = vec![0f32; send.len() * self.size];
                root.gather_into_root(send, &mut all[..]);
                Some(all)
            } else {
                root.gather_into(send);
                None
            }
        })
    }

    fn broadcast(&self, buf: &mut [f32]) {
        let bytes = if self.rank == 0 { bytes_of(buf.len()) } else { 0 };
        self.with(bytes, |c| c.process_at_rank(0).broadcast_into(buf));
    }

    fn broadcast_bytes(&self, bytes: &mut Vec<u8>) {
        let mut len = bytes.len() as u64;
        let sent = if self.rank == 0 { bytes.len() + 8 } else { 0 };
        self.with(sent, |c| {
            let root = c.process_at_rank(0);
            root.broadcast_into(&mut len);
            bytes.resize(len as usize, 0);
            root.broadcast_into(&mut bytes[..]);
        });
    }

    fn all_to_all(&self, send: &[f32], recv: &mut [f32]) {
        assert_eq!(send.len(), recv.len(), "all-to-all: send and recv differ in length");
        assert_eq!(send.len() % self.size, 0, "all-to-all: send must hold one block per rank");
        let block = send.len() / self.size;
        self.with(bytes_of(send.len() - block), |c| c.all_to_all_into(send, recv));
    }

    fn exchange(&self, send: Option<(&[f32], usize)>, recv: Option<(&mut [f32], usize)>) {
        let bytes = send.as_ref().map_or(0, |(s, _)| bytes_of(s.len()));
        self.with(bytes, |c| match (send, recv) {
            (Some((s, to)), Some((r, from))) => {
                send_receive_into(s, &c.process_at_rank(to as i32), r, &c.process_at_rank(from as i32));
            }
            (Some((s, to)), None) => c.process_at_rank(to as i32).send(s),
            (None, Some((r, from))) => {
                c.process_at_rank(from as i32).receive_into(r);
            }
            (None, None) => {}
        });
    }

    fn abort(&self, code: i32) -> ! {
        // Not through the lock: the error may have struck while another thread held it.
        let world = mpi::topology::SimpleCommunicator::world();
        world.abort(code)
    }

    fn stats(&self) -> CommStats {
        self.stats.get()
    }

    fn split(&self, colour: usize, key: usize) -> anyhow::Result<Arc<dyn Collective>> {
        let group = self
            .with(0, |c| c.split_by_color_with_key(Color::with_value(colour as i32), key as i32))
            .ok_or_else(|| anyhow::anyhow!("MPI could not form the sub-group of colour {colour}"))?;
        let (rank, size) = (group.rank() as usize, group.size() as usize);
        let universe = self.universe.clone();
        Ok(Arc::new(MpiWorld { comm: Comm(group), rank, size, stats: StatsRecorder::default(), universe }))
    }
}
