//! `dits sample`: images for chosen classes to `<class>_<index>.png`, a grid (a row per class,
//! named) and the denoising process (a row per class, columns from noise to image), with a record
//! of the model and its data for `dits eval`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use burn::prelude::*;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::DataSource;
use crate::diffusion::guidance::Guided;
use crate::diffusion::sampler::{Chain, Clip, ImageNoise, SamplerKind, StepRule, sample_batch};
use crate::diffusion::schedule::NoiseSchedule;
use crate::images::{FloatImage, grid, label_rows};
use crate::model::{DitConfig, DitNet, weights};
use crate::train::checkpoint;

pub use crate::diffusion::defaults::{DEFAULT_CFG_INTERVAL, DEFAULT_CFG_SCALE, DEFAULT_SAMPLER, DEFAULT_STEPS};

/// What one batch contributes to the figures: grid images and process rows, each with the
/// position of its class in the figure.
type BatchFigures = (Vec<(usize, FloatImage)>, Vec<(usize, Vec<FloatImage>)>);

/// Columns of the denoising-process figure.
const PROCESS_COLUMNS: usize = 20;

/// A model ready for inference, and where it came from.
pub struct LoadedModel {
    pub model: DitNet,
    pub config: DitConfig,
    pub schedule: NoiseSchedule,
    pub description: String,
    /// The classes' names, index = label (the ids where the file carries none).
    pub class_names: Vec<String>,
    /// The data the model was trained on, where its checkpoint says.
    pub data: Option<DataSource>,
}

/// What `dits sample` records beside its images, so that `dits eval DIR` judges them against
/// the data their model learned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplesRecord {
    pub model: String,
    pub data: Option<DataSource>,
    pub class_names: Vec<String>,
}

/// The record's file name in a samples directory.
pub const RECORD_FILE: &str = "samples.json";

impl SamplesRecord {
    /// The record of the samples in `dir`, if `dits sample` wrote one there.
    pub fn read(dir: &Path) -> anyhow::Result<Option<Self>> {
        let path = dir.join(RECORD_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes).map(Some).with_context(|| format!("{}: not a samples record", path.display()))
    }
}

/// Which weights of a checkpoint to sample with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WeightsKind {
    /// The moving average of the weights (the better sampler).
    Ema,
    /// The weights as the optimizer left them.
    Raw,
}

/// Load weights from a run directory, a checkpoint directory (`which` picks EMA or raw), a
/// `.safetensors` file (its `state.json` beside it gives the config, else `preset`) or a
/// PyTorch `.pth` of mnist-dits (config from `preset`).
pub fn load_model(path: &Path, which: WeightsKind, preset: &str, device: &Device) -> anyhow::Result<LoadedModel> {
    if path.is_dir() {
        let dir = checkpoint::resolve(path)?;
        let file = match which {
            WeightsKind::Ema => checkpoint::EMA_FILE,
            WeightsKind::Raw => checkpoint::MODEL_FILE,
        };
        let (model, state) = checkpoint::load_model(&dir, file, device)?;
        return Ok(LoadedModel {
            model,
            schedule: NoiseSchedule::new(state.train.schedule, state.train.timesteps),
            description: format!("{} (step {}, {file})", dir.display(), state.step),
            class_names: state.class_names(),
            data: Some(state.data_source()),
            config: state.model,
        });
    }
    if !path.is_file() {
        bail!("checkpoint {} does not exist", path.display());
    }
    let beside = path.parent().map(|p| p.join(checkpoint::STATE_FILE));
    let state = match beside {
        Some(s) if s.is_file() && path.extension().is_some_and(|e| e == "safetensors") => {
            Some(checkpoint::read_state(s.parent().unwrap())?)
        }
        _ => None,
    };
    let (config, schedule) = match &state {
        Some(s) => (s.model.clone(), NoiseSchedule::new(s.train.schedule, s.train.timesteps)),
        None => (DitConfig::preset(preset)?, NoiseSchedule::ddpm()),
    };
    let class_names = match &state {
        Some(s) => s.class_names(),
        None => (0..config.classes).map(|i| i.to_string()).collect(),
    };
    let mut model = DitNet::new(&config, device, 0);
    weights::load_weights_file(&mut model, path)?;
    let data = state.as_ref().map(|s| s.data_source());
    Ok(LoadedModel { model, config, schedule, description: path.display().to_string(), class_names, data })
}

/// The label of `class`, given by name or by id.
pub fn class_id(class: &str, names: &[String]) -> anyhow::Result<usize> {
    if let Some(i) = names.iter().position(|n| n == class) {
        return Ok(i);
    }
    match class.parse::<usize>() {
        Ok(i) if i < names.len() => Ok(i),
        Ok(i) => bail!("class {i} is outside the model's {} classes (0..{})", names.len(), names.len() - 1),
        Err(_) => {
            let shown: Vec<&str> = names.iter().take(12).map(String::as_str).collect();
            let more = if names.len() > shown.len() { ", …" } else { "" };
            bail!("unknown class {class:?}: the model's classes are {}{more}", shown.join(", "))
        }
    }
}

#[derive(Debug, Clone)]
pub struct SampleOptions {
    pub checkpoint: PathBuf,
    pub out: PathBuf,
    /// None: every class.
    /// Class ids or names (as the checkpoint names them); `None` for all.
    pub classes: Option<Vec<String>>,
    pub per_class: usize,
    pub sampler: SamplerKind,
    /// DDIM's η, the generalised sampler's γ and μ.
    pub eta: f64,
    pub gamma: f64,
    pub mu: f64,
    pub clip: Clip,
    /// None: [`DEFAULT_STEPS`] (at most the schedule's length).
    pub steps: Option<usize>,
    pub seed: u64,
    /// Classifier-free guidance scale (1: conditional only; see [`Guided`]). None:
    /// [`DEFAULT_CFG_SCALE`] if the model has a null label, else 1.
    pub cfg_scale: Option<f64>,
    /// Guide only where σ is in `[lo, hi]` (None: [`DEFAULT_CFG_INTERVAL`]; `(0, ∞)`: every step).
    pub cfg_interval: Option<(f64, f64)>,
    pub batch: usize,
    /// Model preset for weight files that carry no config (PyTorch `.pth`).
    pub preset: String,
    pub weights: WeightsKind,
    /// Write into a directory that already holds files.
    pub force: bool,
    pub progress: bool,
    pub device: Device,
}

impl SampleOptions {
    /// `dits sample`'s defaults: 10 images of every class from the moving average of
    /// `checkpoint`, seed 0, into `out`.
    pub fn new(checkpoint: PathBuf, out: PathBuf, device: Device) -> Self {
        Self {
            checkpoint,
            out,
            classes: None,
            per_class: 10,
            sampler: DEFAULT_SAMPLER,
            eta: 0.0,
            gamma: 1.0,
            mu: 0.0,
            clip: Clip::X0,
            steps: None,
            seed: 0,
            cfg_scale: None,
            cfg_interval: None,
            batch: 256,
            preset: crate::train::recipe::ModelOverrides::DEFAULT_PRESET.to_string(),
            weights: WeightsKind::Ema,
            force: false,
            progress: false,
            device,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SampleSummary {
    pub images: usize,
    pub images_per_s: f64,
    pub out: PathBuf,
}

/// `dits sample`.
pub fn run(opts: SampleOptions) -> anyhow::Result<SampleSummary> {
    ensure!(opts.per_class > 0, "--per-class must be at least 1");
    ensure!(opts.batch > 0, "--batch must be at least 1");
    let loaded = load_model(&opts.checkpoint, opts.weights, &opts.preset, &opts.device)?;
    let cfg = &loaded.config;
    let prepared = loaded.model.prepare_inference();
    let denoiser =
        Guided::as_sampled(&prepared, cfg.null_label(), &loaded.schedule.sigmas(), opts.cfg_scale, opts.cfg_interval)?;
    let classes = match &opts.classes {
        Some(c) => c.iter().map(|c| class_id(c, &loaded.class_names)).collect::<anyhow::Result<Vec<_>>>()?,
        None => (0..cfg.classes).collect(),
    };
    ensure!(!classes.is_empty(), "--classes is empty");
    let steps = opts.steps.unwrap_or(DEFAULT_STEPS.min(loaded.schedule.timesteps()));
    let rule = StepRule::of(opts.sampler, opts.eta, opts.gamma, opts.mu)?;
    let chain = Chain::trailing(&loaded.schedule, steps, rule, opts.clip)?;
    prepare_out_dir(&opts.out, opts.force)?;

    // (class, index within class) for every image, class-major.
    let jobs: Vec<(usize, usize)> = classes.iter().flat_map(|&c| (0..opts.per_class).map(move |i| (c, i))).collect();
    // Batches run in parallel, one per core (burn-flex's kernels alone barely use a second
    // core at these sizes), so a small job is split into at least one batch per thread.
    let size = opts.batch.min(jobs.len().div_ceil(rayon::current_num_threads())).max(1);
    let batches: Vec<&[(usize, usize)]> = jobs.chunks(size).collect();
    let snapshot_at = process_columns(steps);
    let shape = [cfg.channels, cfg.image_size, cfg.image_size];
    let image_len: usize = shape.iter().product();
    let to_image =
        |data: &[f32]| FloatImage { channels: shape[0], height: shape[1], width: shape[2], data: data.to_vec() };

    let bar = ProgressBar::with_draw_target(
        Some((batches.len() * steps) as u64),
        if opts.progress { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() },
    );
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30.cyan/blue}] {pos}/{len} steps, ETA {eta}")
            .expect("static template"),
    );
    let start = std::time::Instant::now();
    // Per batch: the grid's images (the first 10 of each class) and the process rows (the
    // trajectory of each class's first image).
    let per_batch = batches
        .par_iter()
        .map(|batch| -> anyhow::Result<BatchFigures> {
            let labels: Vec<u8> = batch.iter().map(|&(c, _)| c as u8).collect();
            let position = |c: usize| classes.iter().position(|&k| k == c).unwrap();
            let firsts: Vec<(usize, usize)> = batch
                .iter()
                .enumerate()
                .filter(|(_, (_, i))| *i == 0)
                .map(|(row, &(c, _))| (row, position(c)))
                .collect();
            let mut process: Vec<(usize, Vec<FloatImage>)> = firsts.iter().map(|&(_, ci)| (ci, Vec::new())).collect();
            let x = sample_batch(
                &denoiser,
                &loaded.schedule,
                &chain,
                &labels,
                shape,
                &mut ImageNoise::new(opts.seed, batch.iter().copied()),
                &opts.device,
                |k, x| {
                    if k > 0 {
                        bar.inc(1);
                    }
                    if firsts.is_empty() || !snapshot_at.contains(&k) {
                        return;
                    }
                    let data = x.to_data().try_to_vec::<f32>().expect("f32 samples");
                    for (&(row, _), (_, frames)) in firsts.iter().zip(&mut process) {
                        frames.push(to_image(&data[row * image_len..(row + 1) * image_len]));
                    }
                },
            )?;
            let data = x.into_data().try_to_vec::<f32>().map_err(|e| anyhow::anyhow!("reading samples: {e:?}"))?;
            let mut shown = Vec::new();
            for (row, &(c, i)) in batch.iter().enumerate() {
                let img = to_image(&data[row * image_len..(row + 1) * image_len]);
                img.save_png(&opts.out.join(format!("{c}_{i:05}.png")))?;
                if i < 10 {
                    shown.push((position(c), img));
                }
            }
            Ok((shown, process))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut finals: Vec<Vec<FloatImage>> = vec![Vec::new(); classes.len()];
    let mut process: Vec<Vec<FloatImage>> = vec![Vec::new(); classes.len()];
    for (shown, rows) in per_batch {
        for (ci, img) in shown {
            finals[ci].push(img);
        }
        for (ci, frames) in rows {
            process[ci] = frames;
        }
    }
    bar.finish_and_clear();
    let elapsed = start.elapsed().as_secs_f64();
    // Rows named after their classes (the ids where the data has no names).
    let names: Vec<String> =
        classes.iter().map(|&c| loaded.class_names.get(c).cloned().unwrap_or_else(|| c.to_string())).collect();
    let pitch = shape[1] + 2;
    label_rows(&grid(&finals, 2)?, &names, pitch, 2).save_png(&opts.out.join("grid.png"))?;
    label_rows(&grid(&process, 2)?, &names, pitch, 2).save_png(&opts.out.join("process.png"))?;
    let record = SamplesRecord {
        model: loaded.description.clone(),
        data: loaded.data.clone(),
        class_names: loaded.class_names.clone(),
    };
    let json = serde_json::to_vec_pretty(&record).expect("a record serialises");
    crate::fsutil::write_atomic(&opts.out.join(RECORD_FILE), &json)?;
    Ok(SampleSummary { images: jobs.len(), images_per_s: jobs.len() as f64 / elapsed.max(1e-9), out: opts.out })
}

/// The sampler steps shown in process.png: evenly spaced from the noise (0) to the image
/// (`steps`), at most [`PROCESS_COLUMNS`] of them.
pub fn process_columns(steps: usize) -> Vec<usize> {
    let cols = PROCESS_COLUMNS.min(steps + 1);
    (0..cols).map(|j| (j * steps + (cols - 1) / 2) / (cols - 1).max(1)).collect()
}

fn prepare_out_dir(out: &Path, force: bool) -> anyhow::Result<()> {
    if out.exists() {
        ensure!(out.is_dir(), "--out {} exists and is not a directory", out.display());
        let non_empty = std::fs::read_dir(out).with_context(|| format!("reading {}", out.display()))?.next().is_some();
        ensure!(
            !non_empty || force,
            "--out {} is not empty: choose a new directory, or pass --force to overwrite samples there",
            out.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_columns_span_noise_to_image_without_repeats() {
        assert_eq!(process_columns(1000).len(), 20);
        assert_eq!(process_columns(1000)[0], 0);
        assert_eq!(*process_columns(1000).last().unwrap(), 1000);
        assert_eq!(process_columns(3), vec![0, 1, 2, 3]);
        let c = process_columns(25);
        assert!(c.windows(2).all(|w| w[0] < w[1]) && c.len() == 20 && c[19] == 25);
    }
}
