//! A run's length in minutes (`--minutes`): the run starts with a provisional step count, times
//! its first steps on this machine, and then fixes the total step count from the measured rate,
//! so that the learning-rate schedule (warm-up, cosine decay) spans the budget and ends on time.
//! The count is written in the checkpoint state like any other length, so a resumed run keeps it.
//!
//! The steps timed are counted, not clocked, so every rank of a multi-process run fixes the count
//! at the same step (rank 0's rate decides for all). The whole warm-up is timed (at least 20
//! steps), because warm-up learning rates do not depend on the total: the schedule is then
//! exactly that of `--steps N` with the count found.

use std::time::Instant;

use serde::{Deserialize, Serialize};

/// The count a budgeted run starts with, before its first steps fix the real one; large, so the
/// schedule of those steps is the warm-up (or, without warm-up, the peak rate).
pub const PROVISIONAL_STEPS: u64 = 1 << 40;
/// Steps run before the timing starts (first-touch allocations, cold caches).
pub const UNTIMED: u64 = 3;
/// The fewest steps timed; otherwise the whole warm-up is (its first steps run slower than the
/// rest: timing only 100 of them left runs 3–17% short of their budget).
pub const MIN_TIMED: u64 = 20;
/// The share of the remaining budget the fixed count fills, leaving room for the checkpoints,
/// the log and the final checkpoint, which the timed steps do not include.
const FILL: f64 = 0.98;

/// A run's time budget, as the checkpoint stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeBudget {
    /// Minutes of training over the whole run (resumes included).
    pub minutes: f64,
    /// The step at which the total was fixed (`None`: not yet).
    pub fixed_at: Option<u64>,
}

impl TimeBudget {
    pub fn seconds(&self) -> f64 {
        self.minutes * 60.0
    }
}

/// Times the steps of this session until the count can be fixed.
#[derive(Debug)]
pub struct Calibration {
    start: u64,
    timed: u64,
    timer: Option<(Instant, u64)>,
}

impl Calibration {
    /// Timing from step `start` (the session's first), of a run warming up over `warmup` steps:
    /// the steps of the warm-up left after the untimed ones are timed (at least [`MIN_TIMED`]).
    pub fn new(start: u64, warmup: u64) -> Self {
        let timed = warmup.saturating_sub(start + UNTIMED).max(MIN_TIMED);
        Self { start, timed, timer: None }
    }

    /// The steps after which the count is fixed.
    pub fn steps(&self) -> u64 {
        UNTIMED + self.timed
    }

    /// After step `step` (completed steps): the measured rate in steps per second once enough
    /// steps were timed, else `None`.
    pub fn observe(&mut self, step: u64) -> Option<f64> {
        if step == self.start + UNTIMED {
            self.timer = Some((Instant::now(), step));
        }
        let (t0, s0) = self.timer?;
        (step >= s0 + self.timed).then(|| (step - s0) as f64 / t0.elapsed().as_secs_f64().max(1e-9))
    }
}

/// The run's total step count after `step` steps and `elapsed_s` of its `budget_s` seconds, at
/// `rate` steps per second (at least `step`: an exhausted budget ends the run now).
pub fn fixed_total(step: u64, rate: f64, elapsed_s: f64, budget_s: f64) -> u64 {
    let remaining = (budget_s - elapsed_s).max(0.0);
    step + (remaining * rate * FILL).floor() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_count_fills_the_remaining_budget_at_the_measured_rate() {
        // 10 minutes at 20 steps/s, 30 s gone after 500 steps: 570 s left → 11,172 more steps.
        assert_eq!(fixed_total(500, 20.0, 30.0, 600.0), 500 + (570.0f64 * 20.0 * FILL).floor() as u64);
        assert_eq!(fixed_total(40, 5.0, 700.0, 600.0), 40);
    }

    #[test]
    fn calibration_times_a_fixed_number_of_steps() {
        let mut c = Calibration::new(100, 0);
        assert_eq!(c.steps(), UNTIMED + 20);
        for step in 101..100 + c.steps() {
            assert_eq!(c.observe(step), None, "step {step}");
        }
        let rate = c.observe(100 + c.steps()).expect("fixed after the timed steps");
        assert!(rate > 0.0);
        // The whole warm-up is timed; a short one gives the shortest timing.
        assert_eq!(Calibration::new(0, 200).steps(), 200);
        assert_eq!(Calibration::new(0, 10).steps(), UNTIMED + MIN_TIMED);
    }
}
