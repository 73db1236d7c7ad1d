//! Running a run on every rank of this process's [`World`]: in this thread, or one thread per
//! device. An error on one rank stops all of them, since the others would wait for it forever.

use burn::prelude::*;

use super::run::{Interrupted, TrainOptions, TrainSummary, run};
use crate::collective::Reported;
use crate::distributed::grid::Grid;
use crate::distributed::world::World;

/// Runs `dits train` on the ranks of `world`, each with the options `options` gives it; returns
/// rank 0's summary (this process's rank's, under MPI). A run stopped by a signal is an
/// [`Interrupted`] error.
pub fn launch(world: World, options: impl Fn(Grid, Device) -> TrainOptions + Sync) -> anyhow::Result<TrainSummary> {
    match world {
        World::Process(grid, device) => run_rank(options(grid, device)),
        World::Threads(ranks) => std::thread::scope(|s| {
            let options = &options;
            let handles: Vec<_> =
                ranks.into_iter().map(|(grid, device)| s.spawn(move || run_rank(options(grid, device)))).collect();
            let results: Vec<_> =
                handles.into_iter().map(|h| h.join().map_err(|_| anyhow::anyhow!("a rank panicked"))).collect();
            // Every rank stopped at the same step; rank 0 reports it.
            results.into_iter().next().expect("at least one rank")?
        }),
    }
}

/// One rank's run; on an error other than an interruption, the whole world is stopped.
fn run_rank(opts: TrainOptions) -> anyhow::Result<TrainSummary> {
    let comm = opts.grid.world.clone();
    let result = run(opts).and_then(TrainSummary::finished);
    if let Err(e) = &result
        && comm.size() > 1
        && e.downcast_ref::<Interrupted>().is_none()
        && e.downcast_ref::<Reported>().is_none()
    {
        eprintln!("error (rank {}): {e:#}", comm.rank());
        comm.abort(1);
    }
    result
}
