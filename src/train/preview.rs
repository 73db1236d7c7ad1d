//! The grids a run draws while it trains: the moving average's samples at a checkpoint, from
//! noise and labels fixed by the run's seed, in `RUN_DIR/samples/step-NNNNNNN.png`. The same
//! noise every time, so the grids over time show the model alone changing; drawn from the
//! checkpoint just written, so a resumed run draws the grids the uninterrupted one would have.

use std::path::{Path, PathBuf};

use anyhow::Context;
use burn::prelude::*;

use super::checkpoint;
use crate::diffusion::defaults::{DEFAULT_SAMPLER, DEFAULT_STEPS};
use crate::diffusion::guidance::Guided;
use crate::diffusion::sampler::{Chain, Clip, StepRule, sample_images};
use crate::diffusion::schedule::NoiseSchedule;
use crate::images::{FloatImage, grid, label_rows};

/// The grids' folder inside the run directory.
pub const PREVIEW_DIR: &str = "samples";
/// Images per class in a grid (a row per class).
pub const PER_CLASS: usize = 4;
/// Classes shown: the first ten of larger label sets.
pub const MAX_CLASSES: usize = 10;

/// Where the grid of `step` goes.
pub fn grid_path(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join(PREVIEW_DIR).join(format!("step-{step:07}.png"))
}

/// Draws the grid of the checkpoint in `ckpt_dir` (its moving-average weights, `dits sample`'s
/// default sampler and guidance, seed = the run's seed) into [`grid_path`]; returns the path.
/// `dits sample --checkpoint CKPT --per-class 4 --seed SEED` draws the same images.
pub fn draw(ckpt_dir: &Path, run_dir: &Path, device: &Device) -> anyhow::Result<PathBuf> {
    let (model, state) = checkpoint::load_model(ckpt_dir, checkpoint::EMA_FILE, device)?;
    let cfg = &state.model;
    let schedule = NoiseSchedule::new(state.train.schedule, state.train.timesteps);
    let prepared = model.prepare_inference();
    let denoiser = Guided::as_sampled(&prepared, cfg.null_label(), &schedule.sigmas(), None, None)?;
    let steps = DEFAULT_STEPS.min(schedule.timesteps());
    let chain = Chain::trailing(&schedule, steps, StepRule::of(DEFAULT_SAMPLER, 0.0, 1.0, 0.0)?, Clip::X0)?;
    let classes = cfg.classes.min(MAX_CLASSES);
    let jobs: Vec<(usize, usize)> = (0..classes).flat_map(|c| (0..PER_CLASS).map(move |i| (c, i))).collect();
    let images: Vec<(u64, usize, usize)> = jobs.iter().map(|&(c, i)| (state.train.seed, c, i)).collect();
    let shape = [cfg.channels, cfg.image_size, cfg.image_size];
    let drawn = sample_images(&denoiser, &schedule, &chain, &images, shape, device)?;
    let mut rows: Vec<Vec<FloatImage>> = vec![Vec::new(); classes];
    for (&(c, _), img) in jobs.iter().zip(drawn) {
        rows[c].push(img);
    }
    let names: Vec<String> = state.class_names().into_iter().take(classes).collect();
    let path = grid_path(run_dir, state.step);
    let dir = path.parent().expect("a grid path has a folder");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    label_rows(&grid(&rows, 2)?, &names, shape[1] + 2, 2).save_png(&path)?;
    Ok(path)
}

/// The grids drawn so far, by step.
pub fn grids(run_dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(run_dir.join(PREVIEW_DIR)) else { return Vec::new() };
    let mut found: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| {
            let path = e.ok()?.path();
            let step = path.file_name()?.to_str()?.strip_prefix("step-")?.strip_suffix(".png")?.parse().ok()?;
            Some((step, path))
        })
        .collect();
    found.sort();
    found
}
