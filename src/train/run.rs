//! A run's life: started or resumed (rank 0 resolves it, every rank receives it), the run
//! directory locked, then steps until the end, a `--stop-after` step or a stop signal, with
//! metrics, the loss plot and checkpoints along the way.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use burn::prelude::*;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::budget::{self, Calibration, fixed_total};
use super::metrics::{self, MetricsRecord};
use super::preview;
use super::run_dir::lock_run_dir;
use super::start::{self, Resolved, Start};
use super::step::Trainer;
use super::stop::{catch_stop_signals, stop_requested};
use crate::collective::on_every_rank;
use crate::data::loader::{BatchSpec, LoaderArgs, LoaderStats};
use crate::data::{BatchLoader, ImageStore, Position};
use crate::distributed::grid::Grid;

/// Everything a rank needs to take part in a run.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub run_dir: PathBuf,
    pub start: Start,
    /// Stop at this step with a checkpoint, although the run (and so its learning-rate
    /// schedule) keeps its length; `--resume` continues it.
    pub stop_after: Option<u64>,
    /// Checkpoints kept on disk.
    pub keep: usize,
    pub progress: bool,
    pub device: Device,
    /// The ranks of a multi-process run and their groups (one rank by default).
    pub grid: Grid,
    /// Check each step's loss and gradients for NaN/Inf and name the first parameter affected.
    pub detect_anomaly: bool,
    /// Where the training images are held, and how many threads decode streamed ones.
    pub loader: LoaderArgs,
    /// Called on the lead rank after every checkpoint (and its grid): how the layers above
    /// training (the run report, evaluations during the run) follow it.
    pub on_checkpoint: Option<CheckpointHook>,
}

/// A checkpoint just written, as [`TrainOptions::on_checkpoint`] sees it.
#[derive(Debug, Clone)]
pub struct CheckpointEvent<'a> {
    pub run_dir: &'a std::path::Path,
    pub checkpoint: &'a std::path::Path,
    pub step: u64,
    pub total_steps: u64,
    /// An `--eval-every` step (or the end of a run that evaluates).
    pub evaluate: bool,
}

/// See [`TrainOptions::on_checkpoint`]; an error stops the run (its checkpoint is kept).
#[derive(Clone)]
pub struct CheckpointHook(pub Arc<HookFn>);

type HookFn = dyn Fn(&CheckpointEvent) -> anyhow::Result<()> + Send + Sync;

impl std::fmt::Debug for CheckpointHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CheckpointHook")
    }
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub steps: u64,
    /// The run's length: `steps` equals it once the run is complete.
    pub total_steps: u64,
    pub final_loss: f64,
    pub samples_per_s: f64,
    pub elapsed_s: f64,
    pub checkpoint: PathBuf,
    /// This process's rank, and the number of ranks (1 without `--dist`).
    pub rank: usize,
    pub ranks: usize,
    /// Stopped early by a signal (Ctrl-C), after a checkpoint.
    pub interrupted: bool,
}

impl TrainSummary {
    /// A finished run as it is, an interrupted one as [`Interrupted`] (rank 0 says how to go on).
    pub fn finished(self) -> anyhow::Result<Self> {
        if !self.interrupted {
            return Ok(self);
        }
        if self.rank != 0 {
            return Err(Interrupted(String::new()).into());
        }
        let run_dir = self.checkpoint.parent().and_then(|c| c.parent()).unwrap_or(&self.checkpoint);
        Err(Interrupted(format!(
            "interrupted at step {}: checkpoint {} written; `dits train --resume {}` continues the run",
            self.steps,
            self.checkpoint.display(),
            run_dir.display()
        ))
        .into())
    }
}

/// A run stopped by a signal after its checkpoint: not a failure, so the CLI reports it without
/// `error:`, with exit status 130 (the shell's convention for Ctrl-C).
#[derive(Debug)]
pub struct Interrupted(pub String);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Interrupted {}

/// The training split and how many steps make an epoch.
struct Epochs {
    data: Arc<ImageStore>,
    per_epoch: u64,
}

/// `dits train` on one rank. With several ranks (`opts.dp`), every rank calls this: rank 0
/// resolves the start and hands the trainer to the others, and alone writes checkpoints,
/// metrics and progress.
pub fn run(opts: TrainOptions) -> anyhow::Result<TrainSummary> {
    let (run_dir, grid) = (&opts.run_dir, &opts.grid);
    let resuming = matches!(opts.start, Start::Resume(_));
    // Held until the run returns: one process at a time trains in a run directory. A resumed
    // run is locked before rank 0 reads it; a new one once every check has passed.
    let mut run_lock = None;
    let mut lead_data = None;
    let lead = grid.is_lead().then(|| {
        if resuming && run_dir.is_dir() {
            run_lock = Some(lock_run_dir(run_dir)?);
        }
        let Resolved { trainer, data } =
            start::resolve(&opts.start, run_dir, &opts.device, opts.progress, opts.loader.memory_limit())?;
        lead_data = Some(data);
        Ok(trainer)
    });
    let trainer = Trainer::broadcast_from_lead(lead, grid.world.as_ref(), &opts.device)?;
    // Checked on every rank from the state they all hold: all of them fail or none does, and
    // they agree on it, so that each reports the error itself.
    let checked = check_start(&trainer.state, grid, opts.stop_after);
    let stop = on_every_rank(grid.world.as_ref(), checked)?;
    let state = &trainer.state;
    let (data, per_epoch) = match lead_data {
        Some(data) => data,
        None => start::open_data(state, opts.loader.memory_limit())?,
    };
    let _run_lock = match (grid.is_lead(), run_lock) {
        (false, _) => None,
        (true, Some(held)) => Some(held),
        (true, None) => {
            std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
            Some(lock_run_dir(run_dir)?)
        }
    };
    let trainer = trainer.with_tensor_parallel(grid.tp.clone())?.with_sequence_parallel(grid.sp.clone())?;
    let trainer = trainer.with_pipeline(grid.pp.clone())?;
    let mut trainer = trainer.with_data_parallel(grid.dp.clone())?;
    trainer.detect_anomaly = opts.detect_anomaly;
    train_loop(trainer, &opts, Epochs { data, per_epoch }, stop)
}

/// The step this rank's part of the run stops at, after the checks of a start every rank can
/// make alone.
fn check_start(state: &super::RunState, grid: &Grid, stop_after: Option<u64>) -> anyhow::Result<u64> {
    let dp_ranks = grid.dp.batch_parts();
    ensure!(
        state.train.batch >= dp_ranks,
        "the batch ({}) is smaller than the number of ranks it is split over ({dp_ranks} data-parallel ranks): \
         each needs at least one image",
        state.train.batch
    );
    let total = state.train.total_steps;
    ensure!(
        state.step < total,
        "the run is already at step {} of {total}: pass a larger --steps/--epochs to continue it",
        state.step
    );
    let stop = stop_after.map_or(total, |s| s.min(total));
    ensure!(state.step < stop, "--stop-after {stop} is not past the run's current step {}", state.step);
    crate::model::tensor_parallel::check(&state.model, grid.tp.size())?;
    if let Some(comm) = &grid.sp {
        super::sequence_parallel::split_of(&state.model, comm.clone(), &grid.tp)?;
    }
    if let Some(pp) = &grid.pp {
        crate::distributed::pipeline::check_stages(state.model.depth, pp.stages())?;
    }
    let precision = state.train.precision;
    ensure!(
        !precision.is_mixed()
            || (grid.pp.is_none() && grid.tp.size() == 1 && grid.sp.is_none() && !grid.dp.zero.shards_gradients()),
        "--precision {} runs on one process and on data-parallel ranks (ZeRO 0 or 1): \
         not yet with --pp, --tp, --sp or --zero 2/3",
        super::recipe::value_name(precision)
    );
    Ok(stop)
}

/// Steps from the trainer's step to `stop` (or a stop signal), logging and checkpointing.
fn train_loop(mut trainer: Trainer, opts: &TrainOptions, epochs: Epochs, stop: u64) -> anyhow::Result<TrainSummary> {
    let (run_dir, grid, lead) = (&opts.run_dir, &opts.grid, opts.grid.is_lead());
    let dp = &grid.dp;
    let Epochs { data, per_epoch } = epochs;
    let (batch, mut total) = (trainer.state.train.batch, trainer.state.train.total_steps);
    let mut stop = stop;
    let mut calibration = trainer
        .state
        .budget
        .as_ref()
        .filter(|b| b.fixed_at.is_none())
        .map(|_| Calibration::new(trainer.state.step, trainer.state.train.warmup_steps));
    let start_step = trainer.state.step;
    let position = Position { epoch: start_step / per_epoch, index: start_step % per_epoch };
    let spec = BatchSpec { batch, seed: trainer.state.train.seed, hflip: trainer.state.train.hflip };
    let streamed = data.streams().then(|| data.len());
    let mut loader = BatchLoader::new(data, spec, opts.loader.decode_threads, position);
    let bar = progress_bar(opts.progress && lead, start_step, total);
    let (log_every, ckpt_every) = (trainer.state.train.log_every, trainer.state.train.checkpoint_every);
    let (sample_every, eval_every) = (trainer.state.train.sample_every, trainer.state.train.eval_every);
    let mut previews = (0usize, 0f64);
    let run_start = Instant::now();
    let elapsed_before = trainer.state.elapsed_s;
    let mut interval = (Instant::now(), 0f64, 0u64);
    let mut skipped = 0u64;
    let mut last_loss = f64::NAN;
    let mut last_ckpt = None;
    if lead {
        let to = match (&calibration, &trainer.state.budget) {
            (Some(c), Some(b)) => {
                format!("the end of a {}-minute budget (the count fixed after {} steps)", b.minutes, c.steps())
            }
            _ => total.to_string(),
        };
        tracing::info!(
            "training {} parameters from step {start_step} to {to} ({per_epoch} steps per epoch, batch {batch})",
            trainer.table().total
        );
    }
    if lead && grid.world.size() > 1 {
        tracing::info!(
            "{} ranks ({} data-parallel × {} sequence-parallel × {} tensor-parallel × {} pipeline stages), \
             {} rows of each batch on rank 0, ZeRO-{}: optimizer state {:.2} MiB on rank 0",
            grid.world.size(),
            dp.batch_parts(),
            grid.sp.as_ref().map_or(1, |c| c.size()),
            grid.tp.size(),
            grid.pp.as_ref().map_or(1, |p| p.stages()),
            dp.my_rows(batch).len(),
            dp.zero.number(),
            trainer.optimizer_bytes() as f64 / (1 << 20) as f64
        );
    }
    catch_stop_signals();
    let mut interrupted = false;
    while trainer.state.step < stop && !interrupted {
        let b = match loader.next_batch() {
            Ok(b) => b,
            Err(e) => {
                bar.abandon();
                return Err(e.context(format!(
                    "reading the batch of step {}: training stopped, the last checkpoint is kept",
                    trainer.state.step + 1
                )));
            }
        };
        let out = trainer.step(&b);
        if let Some(anomaly) = &out.anomaly {
            bar.abandon();
            bail!("anomaly at step {}: {anomaly}; training stopped, the last checkpoint is kept", trainer.state.step);
        }
        // fp16: an overflow in the forward is skipped with the step, like one in the backward.
        if !out.loss.is_finite() && !out.skipped {
            bar.abandon();
            bail!(
                "the loss became {} at step {}: training stopped, the last checkpoint is kept. \
                 A learning rate too high for this batch size is the usual cause (try a lower --lr)",
                out.loss,
                trainer.state.step
            );
        }
        let step = trainer.state.step;
        let calibrated_after = calibration.as_ref().map_or(0, |c| c.steps());
        if let Some(rate) = calibration.as_mut().and_then(|c| c.observe(step)) {
            // Rank 0's clock decides for every rank.
            let mut measured = [rate as f32, (elapsed_before + run_start.elapsed().as_secs_f64()) as f32];
            grid.world.broadcast(&mut measured);
            let budget = trainer.state.budget.as_mut().expect("a calibration has a budget");
            total = fixed_total(step, measured[0] as f64, measured[1] as f64, budget.seconds());
            budget.fixed_at = Some(step);
            trainer.state.train.total_steps = total;
            stop = opts.stop_after.map_or(total, |s| s.min(total)).max(step);
            bar.set_length(total);
            if lead {
                bar.suspend(|| {
                    tracing::info!(
                        "time budget {} min: {:.2} steps/s over steps {}..{step}, so the run is {total} steps",
                        budget.minutes,
                        measured[0],
                        step + budget::UNTIMED - calibrated_after,
                    )
                });
            }
            calibration = None;
        }
        interrupted = stop_requested(grid.world.as_ref());
        trainer.state.epoch = step / per_epoch;
        trainer.state.batch_in_epoch = step % per_epoch;
        if out.loss.is_finite() {
            interval.1 += out.loss as f64;
            interval.2 += 1;
        }
        skipped += u64::from(out.skipped);
        bar.set_position(step);
        if step.is_multiple_of(log_every) || step == stop || interrupted {
            let secs = interval.0.elapsed().as_secs_f64();
            let rate = (interval.2 as usize * batch) as f64 / secs.max(1e-9);
            last_loss = interval.1 / interval.2.max(1) as f64;
            bar.set_message(format!("epoch {} | loss {last_loss:.4} | {rate:.0} samples/s", b.epoch));
            if lead {
                let elapsed_s = elapsed_before + run_start.elapsed().as_secs_f64();
                let record = MetricsRecord {
                    step,
                    epoch: b.epoch,
                    loss: last_loss,
                    lr: out.lr,
                    samples_per_s: rate,
                    elapsed_s,
                    skipped_steps: out.loss_scale.map(|_| skipped),
                    loss_scale: trainer.state.loss_scale.as_ref().map(|s| s.scale as f64),
                };
                metrics::append(run_dir, &record)?;
            }
            interval = (Instant::now(), 0.0, 0);
            skipped = 0;
        }
        // A grid is drawn from a checkpoint, so every grid step is one.
        let preview = sample_every > 0 && (step.is_multiple_of(sample_every) || step == total);
        let judged = eval_every > 0 && (step.is_multiple_of(eval_every) || step == total);
        if step.is_multiple_of(ckpt_every) || step == stop || interrupted || preview || judged {
            trainer.state.elapsed_s = elapsed_before + run_start.elapsed().as_secs_f64();
            let dir = trainer.save(run_dir, opts.keep)?;
            if lead {
                if let Err(e) = metrics::plot_loss(run_dir) {
                    tracing::warn!("could not draw the loss plot: {e:#}");
                }
                bar.suspend(|| tracing::info!("step {step}: checkpoint {}", dir.display()));
                if preview {
                    let began = Instant::now();
                    let grid = preview::draw(&dir, run_dir, &opts.device)
                        .with_context(|| format!("drawing the samples of step {step}"))?;
                    previews.0 += 1;
                    previews.1 += began.elapsed().as_secs_f64();
                    tracing::debug!("step {step}: {}", grid.display());
                }
                if let Some(hook) = &opts.on_checkpoint {
                    let event =
                        CheckpointEvent { run_dir, checkpoint: &dir, step, total_steps: total, evaluate: judged };
                    (hook.0)(&event).with_context(|| format!("after the checkpoint of step {step}"))?;
                }
            }
            last_ckpt = Some(dir);
        }
    }
    if interrupted {
        bar.abandon();
    } else {
        bar.finish();
    }
    let elapsed = run_start.elapsed().as_secs_f64();
    let rank = grid.world.rank();
    if lead {
        report_loader(&loader.stats(), batch, elapsed, streamed);
        if previews.0 > 0 {
            tracing::info!(
                "drew {} sample grids in {}/ in {:.1} s, {:.1}% of the run",
                previews.0,
                run_dir.join(preview::PREVIEW_DIR).display(),
                previews.1,
                100.0 * previews.1 / elapsed.max(1e-9)
            );
        }
    }
    if grid.world.size() > 1 {
        let c = grid.comm_stats();
        let steps = (trainer.state.step - start_step).max(1);
        tracing::info!(
            "rank {rank}: {:.1} s of {elapsed:.1} s in communication, {:.2} MB sent per step ({} calls)",
            c.time.as_secs_f64(),
            c.bytes as f64 / steps as f64 / 1e6,
            c.calls
        );
    }
    for line in trainer.pipeline_report(grid.world.as_ref()).unwrap_or_default() {
        tracing::info!("{line}");
    }
    let mib = |bytes: usize| bytes as f64 / (1 << 20) as f64;
    let memory = trainer.memory();
    tracing::info!(
        "rank {rank}: parameters {:.2} MiB, gradients {:.2} MiB, optimizer state {:.2} MiB, peak RSS {}",
        mib(memory.params),
        mib(memory.grads),
        mib(memory.optimizer),
        crate::memory::peak_rss_bytes().map_or("unknown".into(), |b| format!("{} MiB", b >> 20))
    );
    Ok(TrainSummary {
        steps: trainer.state.step,
        total_steps: trainer.state.train.total_steps,
        final_loss: last_loss,
        samples_per_s: ((trainer.state.step - start_step) as usize * batch) as f64 / elapsed.max(1e-9),
        elapsed_s: elapsed,
        checkpoint: last_ckpt.expect("at least one step ran, and the last step always checkpoints"),
        rank: grid.world.rank(),
        ranks: grid.world.size(),
        interrupted,
    })
}

/// Whether the loader kept up: what it can build per second against what training took, and
/// how long training waited for it.
fn report_loader(s: &LoaderStats, batch: usize, elapsed: f64, streamed: Option<usize>) {
    if s.batches == 0 || elapsed <= 0.0 {
        return;
    }
    let images = (s.batches as usize * batch) as f64;
    let source = match streamed {
        Some(n) => format!("{n} image files streamed, decoded on {} threads", s.decode_threads),
        None => "images in memory".to_string(),
    };
    let waited = 100.0 * s.wait_s / elapsed;
    tracing::info!(
        "data ({source}): the loader builds {:.0} images/s, training took {:.0} images/s; training waited {:.1} s \
         for batches ({waited:.1}% of the run)",
        images / s.build_s.max(1e-9),
        images / elapsed,
        s.wait_s
    );
    if waited > 5.0 {
        tracing::warn!(
            "the data loader is the bottleneck: give it more --decode-threads, or a --data-memory large enough \
             to hold the decoded set"
        );
    }
}

fn progress_bar(visible: bool, start: u64, total: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(total),
        if visible { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() },
    );
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30.cyan/blue}] {pos}/{len} steps, ETA {eta} | {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_position(start);
    bar
}
