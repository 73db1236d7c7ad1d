//! The collective operations dits needs, behind one trait, so that neither the trainer nor the
//! kernels know which engine moves the bytes: MPI processes, threads of one process, or
//! [`Local`], the world of one process.
//!
//! The engines live in the distributed layer; the trait sits on this lower floor because the
//! differentiable collectives of the kernel extension (Ulysses' exchange) call it too.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The collective operations of data-parallel training, on `f32` buffers and bytes. Every rank
/// must call the same operations in the same order with buffers of the same length.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Element-wise sum over the ranks, in place.
    fn all_reduce_sum(&self, buf: &mut [f32]);
    /// `send` holds `size` equal blocks; rank `r` receives the element-wise sum of block `r`
    /// over the ranks, added in rank order (so the result does not depend on the engine).
    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]);
    /// Every rank's `send` (equal lengths), concatenated in rank order, on every rank.
    fn all_gather(&self, send: &[f32], recv: &mut [f32]);
    /// Every rank's `send` (equal lengths), concatenated in rank order, on rank 0 (`None`
    /// elsewhere).
    fn gather_to_root(&self, send: &[f32]) -> Option<Vec<f32>>;
    /// Rank 0's `buf` on every rank.
    fn broadcast(&self, buf: &mut [f32]);
    /// Rank 0's bytes on every rank (the length travels first).
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>);
    /// `send` holds `size` equal blocks; block `j` goes to rank `j`, and `recv`'s block `i` comes
    /// from rank `i`.
    fn all_to_all(&self, send: &[f32], recv: &mut [f32]);
    /// Stop every rank (after an error on one of them, the others would wait forever).
    fn abort(&self, code: i32) -> !;
    /// What has been communicated so far.
    fn stats(&self) -> CommStats;
    /// Point-to-point messages (pipeline parallelism): send `send` to rank `to` and/or fill
    /// `recv` from rank `from`, both in one call (MPI's `Sendrecv`), so that two ranks sending to
    /// each other cannot both wait for the other to receive. The peer must make the mirror call.
    fn exchange(&self, send: Option<(&[f32], usize)>, recv: Option<(&mut [f32], usize)>) {
        let _ = (send, recv);
        panic!("this engine has no point-to-point messages (pipeline parallelism needs --dist mpi)")
    }
    /// A sub-group: every rank calls this, and the ranks that pass the same `colour` form a new
    /// world, ranked by `key` (MPI's `MPI_Comm_split`).
    fn split(&self, colour: usize, key: usize) -> anyhow::Result<Arc<dyn Collective>> {
        let _ = (colour, key);
        anyhow::bail!("this engine cannot form sub-groups of its ranks (tensor parallelism needs --dist mpi)")
    }
}

/// Calls, bytes sent by this rank and wall time spent inside collective operations.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CommStats {
    pub calls: u64,
    pub bytes: u64,
    pub time: Duration,
}

/// Accumulates [`CommStats`] for an implementation.
#[derive(Debug, Default)]
pub struct StatsRecorder(Mutex<CommStats>);

impl StatsRecorder {
    /// Runs `op`, counting one call that sends `bytes`.
    pub fn record<T>(&self, bytes: usize, op: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = op();
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        s.calls += 1;
        s.bytes += bytes as u64;
        s.time += start.elapsed();
        out
    }

    pub fn get(&self) -> CommStats {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A world of one process: every collective is the identity.
#[derive(Debug, Default)]
pub struct Local;

impl Collective for Local {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &mut [f32]) {}
    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) {
        recv.copy_from_slice(send);
    }
    fn all_gather(&self, send: &[f32], recv: &mut [f32]) {
        recv.copy_from_slice(send);
    }
    fn gather_to_root(&self, send: &[f32]) -> Option<Vec<f32>> {
        Some(send.to_vec())
    }
    fn broadcast(&self, _: &mut [f32]) {}
    fn broadcast_bytes(&self, _: &mut Vec<u8>) {}
    fn all_to_all(&self, send: &[f32], recv: &mut [f32]) {
        recv.copy_from_slice(send);
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
    fn stats(&self) -> CommStats {
        CommStats::default()
    }
    fn split(&self, _: usize, _: usize) -> anyhow::Result<Arc<dyn Collective>> {
        Ok(Arc::new(Local))
    }
}

/// An error that every rank of a world found alike and has already printed: the CLI exits
/// without printing it again.
#[derive(Debug)]
pub struct Reported;

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the error was reported on every rank")
    }
}

impl std::error::Error for Reported {}

/// `result`, computed alike on every rank of `world`: an error is printed by each rank (one
/// `error:` line) and returned as [`Reported`] once every rank has printed its line, so that
/// no rank's exit stops another before its line is out (`mpirun` stops the rest of a job when
/// one rank fails). A world of one leaves the error to the caller.
pub fn on_every_rank<T>(world: &dyn Collective, result: anyhow::Result<T>) -> anyhow::Result<T> {
    if world.size() == 1 {
        return result;
    }
    let mut failed = [f32::from(u8::from(result.is_err()))];
    if let Err(e) = &result {
        eprintln!("error: {e:#}");
    }
    world.all_reduce_sum(&mut failed);
    match result {
        Err(_) => Err(Reported.into()),
        Ok(_) if failed[0] > 0.0 => anyhow::bail!("another rank could not start the run (its error says why)"),
        ok => ok,
    }
}
