//! Where a training step's time goes: opt-in counters of thread time per region (`dits bench
//! --profile`).
//!
//! Regions nest (a kernel runs inside the forward or backward pass), and the micro-batches run
//! on several threads at once, so the figures are thread time: they add up to at most the wall
//! time times the thread count, and the rest is time a thread spent waiting. Disabled, a region
//! costs one relaxed atomic load.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// A timed region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Region {
    /// Building `x_t` and the regression target from the batch.
    Noising,
    /// The model and the loss (inside: the forward kernels).
    Forward,
    /// burn's backward pass (inside: the kernels' backwards).
    Backward,
    /// Reading the gradients out of the autodiff graph into the flat vector, and averaging the
    /// micro-batches.
    Gradients,
    /// Adam and the EMA over the flat parameter vector.
    Optimizer,
    /// Writing the updated parameters back into the model.
    WriteBack,
    AttentionForward,
    AttentionBackward,
    NormForward,
    NormBackward,
    ResidualForward,
    ResidualBackward,
    LinearForward,
    LinearBackward,
}

impl Region {
    pub const ALL: [Region; 14] = [
        Region::Noising,
        Region::Forward,
        Region::Backward,
        Region::Gradients,
        Region::Optimizer,
        Region::WriteBack,
        Region::AttentionForward,
        Region::AttentionBackward,
        Region::NormForward,
        Region::NormBackward,
        Region::ResidualForward,
        Region::ResidualBackward,
        Region::LinearForward,
        Region::LinearBackward,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Region::Noising => "noising (x_t, target)",
            Region::Forward => "forward + loss",
            Region::Backward => "backward",
            Region::Gradients => "gradients to flat vector, micro-batch mean",
            Region::Optimizer => "Adam + EMA",
            Region::WriteBack => "parameters back into the model",
            Region::AttentionForward | Region::AttentionBackward => "attention kernel (+ fused projection)",
            Region::NormForward | Region::NormBackward => "adaLN LayerNorm kernel",
            Region::ResidualForward | Region::ResidualBackward => "gated residual kernel",
            Region::LinearForward | Region::LinearBackward => "fused Linear kernel",
        }
    }

    /// The phase a kernel region runs inside, if it is one.
    pub fn parent(self) -> Option<Region> {
        match self {
            Region::AttentionForward | Region::NormForward | Region::ResidualForward | Region::LinearForward => {
                Some(Region::Forward)
            }
            Region::AttentionBackward | Region::NormBackward | Region::ResidualBackward | Region::LinearBackward => {
                Some(Region::Backward)
            }
            _ => None,
        }
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; Region::ALL.len()] = [const { AtomicU64::new(0) }; Region::ALL.len()];

/// Turns the counters on (and clears them) or off.
pub fn enable(on: bool) {
    for n in &NANOS {
        n.store(0, Ordering::Relaxed);
    }
    ENABLED.store(on, Ordering::Relaxed);
}

/// Runs `f`, adding its duration to `region` when profiling is on.
#[inline]
pub fn time<T>(region: Region, f: impl FnOnce() -> T) -> T {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    let start = Instant::now();
    let out = f();
    NANOS[region as usize].fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    out
}

/// Seconds of thread time per region so far.
pub fn totals() -> Vec<(Region, f64)> {
    Region::ALL.iter().map(|&r| (r, NANOS[r as usize].load(Ordering::Relaxed) as f64 * 1e-9)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_count_only_while_enabled() {
        // One test touches the global counters, so that tests running in parallel do not race.
        enable(false);
        time(Region::Noising, || std::thread::sleep(std::time::Duration::from_millis(2)));
        assert_eq!(totals()[0].1, 0.0);
        enable(true);
        time(Region::Noising, || std::thread::sleep(std::time::Duration::from_millis(2)));
        let noising = totals()[0].1;
        enable(false);
        assert!(noising >= 0.002, "{noising}");
        assert_eq!(Region::LinearBackward.parent(), Some(Region::Backward));
        assert_eq!(Region::ALL.iter().filter(|r| r.parent().is_none()).count(), 6);
    }
}
