//! Pipeline parallelism (GPipe, PipeDream-Flush / Megatron-LM's "1F1B"): the network's pieces
//! cut into P stages of consecutive pieces, one per rank of a pipeline group, and each batch into
//! M micro-batches that flow through the stages; a stage sends its output carry forward and its
//! input's gradient back with point-to-point messages.
//!
//! This module holds what does not depend on the model: which pieces a stage runs, and the
//! schedule, as the list of actions each stage takes in order ([`one_f_one_b`]). A stage first
//! runs `P − p − 1` forwards (the warm-up), then alternates one forward with one backward, then
//! runs the remaining backwards (the cool-down), so at most `P − p` micro-batches' activations
//! are alive on stage `p`, where GPipe (all forwards, then all backwards) keeps all M. Both leave
//! every stage idle for `P − 1` of the `M + P − 1` slots of a step: the bubble.

use std::ops::Range;
use std::sync::Arc;

use super::Collective;
use crate::ranges::even_ranges;

/// A rank's place in its pipeline group.
#[derive(Clone)]
pub struct Pipeline {
    /// The stages of this rank's pipeline (rank `s` of it runs stage `s`).
    pub comm: Arc<dyn Collective>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pipeline(stage {} of {})", self.stage(), self.stages())
    }
}

impl Pipeline {
    pub fn stage(&self) -> usize {
        self.comm.rank()
    }

    pub fn stages(&self) -> usize {
        self.comm.size()
    }

    pub fn is_first(&self) -> bool {
        self.stage() == 0
    }

    pub fn is_last(&self) -> bool {
        self.stage() + 1 == self.stages()
    }
}

/// The pieces (indices into embeddings, blocks `1..=depth`, final layer `depth + 1`) that stage
/// `stage` of `stages` runs: its share of the blocks (as even as they split, the first stages
/// taking one more), the embeddings with the first stage and the final layer with the last.
pub fn stage_pieces(depth: usize, stages: usize, stage: usize) -> Range<usize> {
    let blocks = even_ranges(depth, stages)[stage].clone();
    let start = if stage == 0 { 0 } else { 1 + blocks.start };
    let end = if stage + 1 == stages { depth + 2 } else { 1 + blocks.end };
    start..end
}

/// Checks that `stages` stages can each get a block of `depth`.
pub fn check_stages(depth: usize, stages: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        stages <= depth,
        "--pp {stages}: the model has {depth} blocks, and every pipeline stage needs at least one \
         (use --pp {depth} or fewer, or a deeper model)"
    );
    Ok(())
}

/// One thing a stage does, on micro-batch indices. The combined sends-and-receives exchange with
/// one neighbour in a single call, so two neighbours sending to each other cannot both wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Receive micro-batch `i`'s input carry from the previous stage.
    RecvForward(usize),
    /// Run the stage's pieces forward on micro-batch `i`.
    Forward(usize),
    /// Send micro-batch `i`'s output carry to the next stage.
    SendForward(usize),
    /// Send output `send` to the next stage, and receive from it the gradient of output `recv`.
    SendForwardRecvBackward { send: usize, recv: usize },
    /// Receive the gradient of micro-batch `i`'s output from the next stage.
    RecvBackward(usize),
    /// Run the stage's pieces backward on micro-batch `i`.
    Backward(usize),
    /// Send the gradient of micro-batch `i`'s input to the previous stage.
    SendBackward(usize),
    /// Send input gradient `send` to the previous stage, and receive from it input `recv`.
    SendBackwardRecvForward { send: usize, recv: usize },
}

/// Stage `stage`'s actions in the non-interleaved 1F1B schedule of `stages` stages and
/// `micro` micro-batches (Megatron-LM's `forward_backward_pipelining_without_interleaving`).
/// The first stage receives no input, the last sends no output: its backward starts from the
/// loss.
pub fn one_f_one_b(stages: usize, stage: usize, micro: usize) -> Vec<Action> {
    use Action::*;
    let (first, last) = (stage == 0, stage + 1 == stages);
    let warmup = (stages - stage - 1).min(micro);
    let steady = micro - warmup;
    let mut ops = Vec::new();
    for i in 0..warmup {
        if !first {
            ops.push(RecvForward(i));
        }
        ops.push(Forward(i));
        if !last {
            ops.push(SendForward(i));
        }
    }
    if steady > 0 && !first {
        ops.push(RecvForward(warmup));
    }
    for i in 0..steady {
        let f = warmup + i;
        ops.push(Forward(f));
        if !last {
            ops.push(SendForwardRecvBackward { send: f, recv: i });
        }
        ops.push(Backward(i));
        if !first {
            ops.push(if i + 1 == steady { SendBackward(i) } else { SendBackwardRecvForward { send: i, recv: f + 1 } });
        }
    }
    for i in steady..micro {
        if !last {
            ops.push(RecvBackward(i));
        }
        ops.push(Backward(i));
        if !first {
            ops.push(SendBackward(i));
        }
    }
    ops
}

/// The bubble of a pipeline of `stages` stages and `micro` micro-batches with equal stages:
/// the share of a step each stage is idle, `(P − 1) / (M + P − 1)`.
pub fn bubble_theory(stages: usize, micro: usize) -> f64 {
    (stages - 1) as f64 / (micro + stages - 1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_cover_the_pieces_in_order() {
        for depth in 1..9 {
            for stages in 1..=depth {
                let parts: Vec<_> = (0..stages).map(|s| stage_pieces(depth, stages, s)).collect();
                assert_eq!(parts[0].start, 0);
                assert_eq!(parts[stages - 1].end, depth + 2);
                assert!(parts.windows(2).all(|w| w[0].end == w[1].start));
                // Every stage runs at least one block.
                assert!(
                    parts.iter().enumerate().all(|(s, r)| r.len() > usize::from(s == 0) + usize::from(s + 1 == stages))
                );
            }
        }
        assert_eq!(stage_pieces(3, 2, 0), 0..3);
        assert_eq!(stage_pieces(3, 2, 1), 3..5);
        assert!(check_stages(3, 4).unwrap_err().to_string().contains("has 3 blocks"));
    }

    /// The messages an action sends to, and expects from, a neighbour: (peer stage, what),
    /// `true` for a forward carry, `false` for a gradient.
    /// (peer stage, forward carry or gradient, micro-batch).
    type Message = (usize, bool, usize);

    fn messages(stage: usize, a: Action) -> (Vec<Message>, Vec<Message>) {
        use Action::*;
        let (prev, next) = (stage.wrapping_sub(1), stage + 1);
        match a {
            RecvForward(i) => (vec![], vec![(prev, true, i)]),
            SendForward(i) => (vec![(next, true, i)], vec![]),
            SendForwardRecvBackward { send, recv } => (vec![(next, true, send)], vec![(next, false, recv)]),
            RecvBackward(i) => (vec![], vec![(next, false, i)]),
            SendBackward(i) => (vec![(prev, false, i)], vec![]),
            SendBackwardRecvForward { send, recv } => (vec![(prev, false, send)], vec![(prev, true, recv)]),
            Forward(_) | Backward(_) => (vec![], vec![]),
        }
    }

    /// Runs every stage's actions with forwards of cost `f` and backwards of cost `b`, under the
    /// strictest message semantics (a send completes only when the receiver's current action
    /// takes exactly that message, and a combined action only when its peer's is the mirror
    /// image): returns each stage's busy time and the step's length, or panics on a deadlock.
    fn simulate(stages: usize, micro: usize, f: f64, b: f64) -> (Vec<f64>, f64) {
        let ops: Vec<Vec<Action>> = (0..stages).map(|s| one_f_one_b(stages, s, micro)).collect();
        let (mut at, mut clock, mut busy) = (vec![0; stages], vec![0f64; stages], vec![0f64; stages]);
        // Forwards done and backwards done per stage, to check the order of the data.
        let mut fwd = vec![vec![false; micro]; stages];
        loop {
            let mut moved = false;
            for s in 0..stages {
                let Some(&a) = ops[s].get(at[s]) else { continue };
                match a {
                    Action::Forward(i) => {
                        assert!(s == 0 || fwd[s - 1][i], "stage {s} runs forward {i} before its input exists");
                        fwd[s][i] = true;
                        (clock[s], busy[s], at[s], moved) = (clock[s] + f, busy[s] + f, at[s] + 1, true);
                    }
                    Action::Backward(i) => {
                        assert!(fwd[s][i]);
                        (clock[s], busy[s], at[s], moved) = (clock[s] + b, busy[s] + b, at[s] + 1, true);
                    }
                    _ => {
                        let (sends, recvs) = messages(s, a);
                        let peer = sends.first().or(recvs.first()).unwrap().0;
                        let Some(&pa) = ops[peer].get(at[peer]) else { continue };
                        let (psends, precvs) = messages(peer, pa);
                        let mirror = |m: &Vec<Message>, p: &Vec<Message>, from: usize| {
                            m.len() == p.len() && m.iter().zip(p).all(|(x, y)| y.0 == from && x.1 == y.1 && x.2 == y.2)
                        };
                        if mirror(&sends, &precvs, s) && mirror(&recvs, &psends, s) {
                            let t = clock[s].max(clock[peer]);
                            (clock[s], clock[peer]) = (t, t);
                            at[s] += 1;
                            at[peer] += 1;
                            moved = true;
                        }
                    }
                }
            }
            if (0..stages).all(|s| at[s] == ops[s].len()) {
                return (busy, clock.iter().copied().fold(0.0, f64::max));
            }
            assert!(moved, "deadlock: stages at {:?} of {:?}", at, ops.iter().map(|o| o.len()).collect::<Vec<_>>());
        }
    }

    #[test]
    fn every_micro_batch_runs_forward_then_backward_once_per_stage() {
        for stages in 1..6 {
            for micro in 1..9 {
                for s in 0..stages {
                    let ops = one_f_one_b(stages, s, micro);
                    let pos = |x: Action| ops.iter().position(|&a| a == x).unwrap();
                    for i in 0..micro {
                        assert_eq!(ops.iter().filter(|&&a| a == Action::Forward(i)).count(), 1);
                        assert!(pos(Action::Forward(i)) < pos(Action::Backward(i)));
                    }
                    // 1F1B's memory bound: at most P − s forwards wait for their backward.
                    let (mut alive, mut peak) = (0i32, 0i32);
                    for a in &ops {
                        match a {
                            Action::Forward(_) => alive += 1,
                            Action::Backward(_) => alive -= 1,
                            _ => {}
                        }
                        peak = peak.max(alive);
                    }
                    assert!(peak as usize <= (stages - s).min(micro), "P {stages} M {micro} stage {s}: {peak}");
                }
            }
        }
    }

    /// Without deadlock under blocking messages, and with equal stages each stage idles
    /// (P − 1)/(M + P − 1) of the step, whatever the forward/backward cost ratio.
    #[test]
    fn the_schedule_never_deadlocks_and_its_bubble_is_the_theory() {
        for stages in 1..6 {
            for micro in 1..10 {
                for (f, b) in [(1.0, 1.0), (1.0, 2.0)] {
                    let (busy, total) = simulate(stages, micro, f, b);
                    for (s, busy) in busy.iter().enumerate() {
                        let idle = 1.0 - busy / total;
                        let theory = bubble_theory(stages, micro);
                        assert!((idle - theory).abs() < 1e-12, "P {stages} M {micro} stage {s}: {idle} vs {theory}");
                    }
                }
            }
        }
    }
}
