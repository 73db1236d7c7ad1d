//! How a run starts, new or resumed, and the one place that turns that into a trainer: rank 0
//! reads the run directory, checks what a resumed run may change, opens the data and fixes the
//! run's length; the other ranks receive the result (see [`super::snapshot`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, ensure};
use burn::prelude::*;

use super::checkpoint;
use super::config::{Length, TrainConfig};
use super::metrics;
use super::recipe::{ModelOverrides, RecipeFile, TrainOverrides};
use super::run_dir::ensure_no_run;
use super::state::RunState;
use super::step::Trainer;
use crate::data::{BatchLoader, DataArgs, DataSource, ImageStore, Split, loader::batches_per_epoch};
use crate::model::DitConfig;

/// How a run starts.
#[derive(Debug, Clone)]
pub enum Start {
    /// A new run of `model` on `data`; the model's image shape and class count follow the data.
    New { data: DataSource, model: DitConfig, train: TrainConfig, length: Length },
    /// The run in the run directory, continued from its latest checkpoint.
    Resume(ResumeFlags),
}

/// The flags given with `--resume`: a resumed run keeps its data, model and recipe, and may
/// change only its length and logging intervals, so every other flag must agree with the run.
#[derive(Debug, Clone, Default)]
pub struct ResumeFlags {
    /// `--out`, which must name the run being resumed.
    pub out: Option<PathBuf>,
    pub data: DataArgs,
    pub model: ModelOverrides,
    pub train: TrainOverrides,
}

impl Start {
    /// A new run from the recipe's three sources, each overriding the one before: the defaults,
    /// the TOML file `config`, the flags.
    pub fn new_run(
        data: DataArgs,
        config: Option<&Path>,
        model: ModelOverrides,
        train: TrainOverrides,
    ) -> anyhow::Result<Self> {
        let file = match config {
            Some(path) => RecipeFile::read(path)?,
            None => RecipeFile::default(),
        };
        let overrides = train.or(file.train);
        let length =
            Length::from_flags(overrides.steps, overrides.epochs, overrides.minutes)?.unwrap_or(Length::DEFAULT);
        let mut train = overrides.apply(TrainConfig::default())?;
        if overrides.micro_batches.is_none() {
            train.micro_batches = TrainConfig::micro_batches_for(train.batch);
        }
        let mut model = model.or(file.model).resolve()?;
        model.null_class = train.label_dropout > 0.0;
        Ok(Start::New { data: data.source()?, model, train, length })
    }
}

/// A run resolved on rank 0: its trainer, and its data with the steps in an epoch.
pub(super) struct Resolved {
    pub trainer: Trainer,
    pub data: (Arc<ImageStore>, u64),
}

/// Rank 0's side of a start: the trainer of `start` in `run_dir`, checked once; training images
/// beyond `memory_limit` decoded bytes stream from their files.
pub(super) fn resolve(
    start: &Start,
    run_dir: &Path,
    device: &Device,
    progress: bool,
    memory_limit: u64,
) -> anyhow::Result<Resolved> {
    match start {
        Start::New { data: source, model, train, length } => {
            ensure_no_run(run_dir)?;
            let ds = source.open(Split::Train, progress, memory_limit)?;
            let model = fit_to_data(model, &ds, source)?;
            let mut trainer = Trainer::new(model, train.clone(), source.clone(), device)?;
            trainer.state.class_names = ds.classes().to_vec();
            let data = checked_data(ds, &trainer.state)?;
            trainer.state.train.total_steps = length.steps(data.1);
            trainer.state.budget = length.budget();
            Ok(Resolved { trainer, data })
        }
        Start::Resume(flags) => {
            let dir = checkpoint::resolve(run_dir)?;
            let ckpt = checkpoint::load(&dir)?;
            let (train, length) = resumed_settings(&ckpt.state, run_dir, flags)?;
            let mut trainer = Trainer::from_checkpoint(ckpt, &dir, device)?;
            trainer.state.train = train;
            let data = open_data(&trainer.state, memory_limit)?;
            if let Some(length) = length {
                // A new budget counts the run's whole training time, this session's first steps
                // fixing the count anew.
                trainer.state.train.total_steps = match length {
                    Length::Minutes(_) => trainer.state.step + super::budget::PROVISIONAL_STEPS,
                    _ => length.steps(data.1),
                };
                trainer.state.budget = length.budget();
            }
            metrics::truncate_after(run_dir, trainer.state.step)?;
            Ok(Resolved { trainer, data })
        }
    }
}

/// The recipe of a resumed run with the changes its flags may make (length, logging
/// intervals), after checking that no other flag differs from the run.
fn resumed_settings(
    saved: &RunState,
    run_dir: &Path,
    flags: &ResumeFlags,
) -> anyhow::Result<(TrainConfig, Option<Length>)> {
    ensure!(flags.model.is_empty(), "a resumed run keeps its model: drop --model and the size flags");
    if let Some(out) = &flags.out {
        ensure!(out == run_dir, "--out {} differs from --resume {}", out.display(), run_dir.display());
    }
    if flags.data.data.as_ref().is_some_and(|d| d.display().to_string() != saved.data_dir) || flags.data.has_options() {
        bail!(
            "--data and its options differ from the run being resumed ({}); a resumed run keeps its data",
            saved.data_dir
        );
    }
    let o = &flags.train;
    let fixed = TrainOverrides {
        epochs: None,
        steps: None,
        minutes: None,
        checkpoint_every: None,
        log_every: None,
        sample_every: None,
        eval_every: None,
        // How each rank cuts its batch changes the rounding of the sums only, not the step, and
        // a run moved to more or fewer ranks often needs another cut.
        micro_batches: None,
        ..o.clone()
    };
    let mut train = fixed.apply(saved.train.clone())?;
    if train != saved.train {
        bail!(
            "a resumed run keeps its settings (only --steps/--epochs, --micro-batches, --checkpoint-every, --log-every, --sample-every and --eval-every may change): \
             a flag differs from the run in {}",
            run_dir.display()
        );
    }
    train.checkpoint_every = o.checkpoint_every.unwrap_or(train.checkpoint_every);
    train.log_every = o.log_every.unwrap_or(train.log_every);
    train.sample_every = o.sample_every.unwrap_or(train.sample_every);
    train.eval_every = o.eval_every.unwrap_or(train.eval_every);
    train.micro_batches = o.micro_batches.unwrap_or(train.micro_batches);
    train.validate()?;
    Ok((train, Length::from_flags(o.steps, o.epochs, o.minutes)?))
}

/// The training split of a run's data, checked against its model and batch, with the number of
/// steps in an epoch.
pub(super) fn open_data(state: &RunState, memory_limit: u64) -> anyhow::Result<(Arc<ImageStore>, u64)> {
    checked_data(state.data_source().open(Split::Train, false, memory_limit)?, state)
}

/// The model `model` shaped for the data: its channels, image side and class count are the
/// data's (the sizes of the preset and flags stay).
fn fit_to_data(model: &DitConfig, ds: &ImageStore, source: &DataSource) -> anyhow::Result<DitConfig> {
    let (channels, height, width) = ds.shape();
    let fitted = DitConfig { channels, image_size: height, classes: ds.classes().len(), ..model.clone() };
    fitted
        .validate()
        .map_err(|e| anyhow::anyhow!("{}: images are {channels}×{height}×{width}: {e}", source.path.display()))?;
    Ok(fitted)
}

fn checked_data(ds: ImageStore, state: &RunState) -> anyhow::Result<(Arc<ImageStore>, u64)> {
    let (dir, cfg) = (Path::new(&state.data_dir), &state.model);
    ensure!(
        ds.classes().len() <= cfg.classes,
        "{}: {} classes, the model has {}",
        dir.display(),
        ds.classes().len(),
        cfg.classes
    );
    let (channels, height, width) = ds.shape();
    ensure!(
        height == cfg.image_size && width == cfg.image_size && channels == cfg.channels,
        "{}: images are {channels}×{height}×{width}, the model expects {}×{}×{}",
        dir.display(),
        cfg.channels,
        cfg.image_size,
        cfg.image_size
    );
    let batch = state.train.batch;
    BatchLoader::check(ds.len(), batch)?;
    let per_epoch = batches_per_epoch(ds.len(), batch);
    Ok((Arc::new(ds), per_epoch))
}
