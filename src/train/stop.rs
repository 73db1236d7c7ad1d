//! A clean stop on Ctrl-C, SIGTERM or SIGHUP: the run finishes its step, writes a checkpoint
//! and returns, on every rank at the same step.

use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::collective::Collective;

/// Set when the process is asked to stop (Ctrl-C, SIGTERM, SIGHUP): the loop finishes its
/// step, writes a checkpoint and returns. A second request exits at once (the last checkpoint
/// on disk is complete either way: checkpoints are written to a temporary name and renamed).
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

/// Install the stop handler (once per process; tests run several trainings in one), and forget
/// any request left from an earlier run of this process.
pub(super) fn catch_stop_signals() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let handler = || {
            if STOP_REQUESTED.swap(true, Ordering::SeqCst) {
                eprintln!("stopping now, without a checkpoint (the last one on disk is intact)");
                std::process::exit(130);
            }
            eprintln!("stopping after this step and its checkpoint (press Ctrl-C again to stop at once)");
        };
        if let Err(e) = ctrlc::set_handler(handler) {
            tracing::warn!("Ctrl-C will not stop training cleanly: {e}");
        }
    });
    STOP_REQUESTED.store(false, Ordering::SeqCst);
}

/// Whether any rank was asked to stop (all ranks then stop at the same step).
pub(super) fn stop_requested(world: &dyn Collective) -> bool {
    let mine = STOP_REQUESTED.load(Ordering::SeqCst);
    if world.size() == 1 {
        return mine;
    }
    let mut flag = [f32::from(u8::from(mine))];
    world.all_reduce_sum(&mut flag);
    flag[0] > 0.0
}
