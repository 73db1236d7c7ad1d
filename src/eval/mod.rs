//! `dits eval`: how good are samples? A classifier trained by dits on the real data (cached
//! per data set) gives the accuracy of the intended class, and its features the Fréchet
//! distance to the test split ("FID-CNN"), printed next to the floor that real training
//! images of the same count reach.

pub mod classifier;
pub mod fid;
pub mod samples;

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use burn::prelude::*;
use burn::store::{ModuleSnapshot, SafetensorsStore};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::data::{ImageDataset, Split};
use crate::fsutil::{sha256_hex, write_atomic};
use classifier::{Classifier, ClassifierTraining};
use fid::{FeatureStats, frechet_distance};

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub samples: PathBuf,
    pub data_dir: PathBuf,
    /// Where trained classifiers are kept, one per data set checksum.
    pub cache_dir: PathBuf,
    pub seed: u64,
    pub progress: bool,
    pub device: Device,
}

/// Accuracy of one class.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassScore {
    pub class: usize,
    pub count: usize,
    pub accuracy: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    pub samples: usize,
    /// Fraction classified as their intended class.
    pub accuracy: f64,
    pub per_class: Vec<ClassScore>,
    /// Mean probability the classifier gives the intended class.
    pub mean_confidence: f64,
    /// FID-CNN of the samples against the test split.
    pub fid: f64,
    /// FID-CNN of as many real training images (same classes, same counts) against the test
    /// split: the best a generator can expect at this sample count.
    pub fid_floor: f64,
    pub classifier_test_accuracy: f64,
    pub classifier: PathBuf,
}

/// What is cached beside the classifier's weights.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ClassifierInfo {
    data_sha256: String,
    classes: usize,
    test_accuracy: f64,
}

/// `dits eval`.
pub fn run(opts: &EvalOptions) -> anyhow::Result<EvalReport> {
    let train = ImageDataset::load(&opts.data_dir, Split::Train, 256)?;
    let test = ImageDataset::load(&opts.data_dir, Split::Test, 256)?;
    let classes = train.labels.iter().max().map_or(0, |&m| m as usize + 1);
    let samples = samples::read_dir(&opts.samples, classes, [train.channels, train.height, train.width])?;
    let (model, info, path) = classifier_for(&train, &test, classes, opts)?;
    let dims = [train.channels, train.height, train.width];
    let device = &opts.device;

    let (probs, feats) = classifier::probabilities_and_features(&model, &samples.images, dims, device);
    let n = samples.labels.len();
    let mut per_class: Vec<ClassScore> = Vec::new();
    let (mut correct, mut confidence) = (0usize, 0f64);
    for c in 0..classes {
        let rows: Vec<usize> = (0..n).filter(|&i| samples.labels[i] == c).collect();
        if rows.is_empty() {
            continue;
        }
        let right = rows.iter().filter(|&&i| argmax(&probs[i * classes..(i + 1) * classes]) == c).count();
        correct += right;
        confidence += rows.iter().map(|&i| probs[i * classes + c] as f64).sum::<f64>();
        per_class.push(ClassScore { class: c, count: rows.len(), accuracy: right as f64 / rows.len() as f64 });
    }

    let all_test: Vec<usize> = (0..test.len()).collect();
    let test_stats = feature_stats_of(&model, &test, &all_test, dims, device)?;
    let fid = frechet_distance(&FeatureStats::fit(&feats, classifier::FEATURES)?, &test_stats);
    let floor_rows = matching_real_subset(&train, &samples.labels, opts.seed);
    let fid_floor = frechet_distance(&feature_stats_of(&model, &train, &floor_rows, dims, device)?, &test_stats);

    Ok(EvalReport {
        samples: n,
        accuracy: correct as f64 / n as f64,
        per_class,
        mean_confidence: confidence / n as f64,
        fid,
        fid_floor,
        classifier_test_accuracy: info.test_accuracy,
        classifier: path,
    })
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i)
}

fn feature_stats_of(
    model: &Classifier,
    ds: &ImageDataset,
    rows: &[usize],
    dims: [usize; 3],
    device: &Device,
) -> anyhow::Result<FeatureStats> {
    let len = ds.image_len();
    let mut images = vec![0f32; rows.len() * len];
    for (slot, &i) in rows.iter().enumerate() {
        crate::data::loader::scale_image(ds, i, &mut images[slot * len..(slot + 1) * len]);
    }
    let (_, feats) = classifier::probabilities_and_features(model, &images, dims, device);
    FeatureStats::fit(&feats, classifier::FEATURES)
}

/// Training images with the same class counts as `labels`, chosen by a seeded shuffle.
pub fn matching_real_subset(train: &ImageDataset, labels: &[usize], seed: u64) -> Vec<usize> {
    let order = crate::data::loader::epoch_order(train.len(), seed, 0);
    let classes = labels.iter().max().map_or(0, |&m| m + 1);
    let mut wanted = vec![0usize; classes];
    for &l in labels {
        wanted[l] += 1;
    }
    let mut rows = Vec::with_capacity(labels.len());
    for &i in &order {
        let l = train.labels[i as usize] as usize;
        if l < classes && wanted[l] > 0 {
            wanted[l] -= 1;
            rows.push(i as usize);
        }
    }
    rows
}

/// The cached classifier of this data set, or a newly trained (and cached) one.
fn classifier_for(
    train: &ImageDataset,
    test: &ImageDataset,
    classes: usize,
    opts: &EvalOptions,
) -> anyhow::Result<(Classifier, ClassifierInfo, PathBuf)> {
    let sha = sha256_hex(&[train.pixels.as_slice(), &train.labels].concat());
    let stem = format!("classifier-{}-seed{}", &sha[..16], opts.seed);
    let weights_path = opts.cache_dir.join(format!("{stem}.safetensors"));
    let info_path = opts.cache_dir.join(format!("{stem}.json"));
    let mut model = Classifier::new(train.channels, train.height, classes, &opts.device, 0);
    if weights_path.is_file() && info_path.is_file() {
        let info: ClassifierInfo = serde_json::from_slice(&std::fs::read(&info_path)?)
            .with_context(|| format!("{}: not a classifier record", info_path.display()))?;
        if info.data_sha256 != sha || info.classes != classes {
            bail!("{}: recorded for another data set; delete it to retrain", info_path.display());
        }
        let mut store = SafetensorsStore::from_file(&weights_path).validate(true);
        let result = model
            .load_from(&mut store)
            .map_err(|e| anyhow::anyhow!("{}: unreadable classifier weights: {e}", weights_path.display()))?;
        if !result.errors.is_empty() || !result.missing.is_empty() {
            bail!(
                "{}: classifier weights do not fit the classifier; delete the file to retrain",
                weights_path.display()
            );
        }
        tracing::info!("classifier: {} (test accuracy {:.4})", weights_path.display(), info.test_accuracy);
        return Ok((model, info, weights_path));
    }

    let cfg = ClassifierTraining { seed: opts.seed, ..ClassifierTraining::default() };
    tracing::info!(
        "training the evaluation classifier on {} ({} images, once per data set)",
        opts.data_dir.display(),
        train.len()
    );
    let bar = ProgressBar::with_draw_target(
        Some(classifier::training_steps(train.len(), cfg)),
        if opts.progress { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() },
    );
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30.cyan/blue}] {pos}/{len} classifier steps, ETA {eta}")
            .expect("static template"),
    );
    let model = classifier::train(train, classes, cfg, &opts.device, &bar);
    bar.finish_and_clear();
    let test_accuracy = accuracy(&model, test, classes, &opts.device);
    tracing::info!("classifier test accuracy {test_accuracy:.4}");
    let info = ClassifierInfo { data_sha256: sha, classes, test_accuracy };
    std::fs::create_dir_all(&opts.cache_dir).with_context(|| format!("creating {}", opts.cache_dir.display()))?;
    let mut store = SafetensorsStore::from_bytes(None);
    model.save_into(&mut store).context("collecting the classifier weights")?;
    write_atomic(&weights_path, &store.get_bytes().context("serialising the classifier weights")?)?;
    write_atomic(&info_path, serde_json::to_string_pretty(&info)?.as_bytes())?;
    Ok((model, info, weights_path))
}

/// Test-split accuracy of `model`.
pub fn accuracy(model: &Classifier, test: &ImageDataset, classes: usize, device: &Device) -> f64 {
    let len = test.image_len();
    let mut images = vec![0f32; test.len() * len];
    for i in 0..test.len() {
        crate::data::loader::scale_image(test, i, &mut images[i * len..(i + 1) * len]);
    }
    let (probs, _) =
        classifier::probabilities_and_features(model, &images, [test.channels, test.height, test.width], device);
    let right =
        (0..test.len()).filter(|&i| argmax(&probs[i * classes..(i + 1) * classes]) == test.labels[i] as usize).count();
    right as f64 / test.len() as f64
}

/// Where classifiers are cached by default: `$XDG_CACHE_HOME/dits`, else `~/.cache/dits`.
pub fn default_cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"))
        .join("dits")
}
