//! `dits eval`: how good are samples? A classifier trained by dits on the real data (cached
//! per data set) gives the accuracy of the intended class, and its features the Fréchet
//! distance to the test split ("FID-CNN"), printed next to the floor that real training
//! images of the same count reach.

pub mod classifier;
pub mod fid;
pub mod record;
pub mod samples;

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use burn::prelude::*;
use burn::store::{ModuleSnapshot, SafetensorsStore};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::data::{ImageDataset, Split};
use crate::fsutil::write_atomic;
use classifier::{Classifier, ClassifierTraining};
use fid::{FeatureStats, frechet_distance};

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub samples: PathBuf,
    pub data: crate::data::DataSource,
    /// Where trained classifiers are kept, one per data set checksum.
    pub cache_dir: PathBuf,
    pub seed: u64,
    pub progress: bool,
    pub device: Device,
}

/// Accuracy and FID-CNN of one class.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassScore {
    pub class: usize,
    pub count: usize,
    pub accuracy: f64,
    /// FID-CNN of the class's samples against the class's test images.
    pub fid: f64,
    /// The same for as many real training images of the class.
    pub fid_floor: f64,
}

/// How many samples are near-copies of training images: closer, in the judge's features, to
/// their nearest training image than all but [`NEAR_COPY_QUANTILE`] of real test images are to
/// theirs. Real unseen images score that quantile; a generator that copies its training set
/// scores far more.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Memorisation {
    /// The distance below which a sample counts as a near-copy.
    pub threshold: f64,
    /// Share of samples below it.
    pub share: f64,
    /// Share of real test images below it (by construction, the quantile).
    pub reference_share: f64,
}

/// The quantile of the test images' nearest-training-image distances that defines a near-copy.
pub const NEAR_COPY_QUANTILE: f64 = 0.05;

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
    /// FID-CNN over the floor: 1 is as close as real images of the same count get.
    pub fid_ratio: f64,
    /// The lowest per-class accuracy.
    pub min_class_accuracy: f64,
    pub memorisation: Memorisation,
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

/// `dits eval`: the samples in `opts.samples` judged (read before the judge is prepared, so a bad
/// folder is an error before minutes of the judge's training).
pub fn run(opts: &EvalOptions) -> anyhow::Result<EvalReport> {
    let train = opts.data.load_with_progress(Split::Train, opts.progress)?;
    let samples = samples::read_dir(&opts.samples, train.classes.len(), [train.channels, train.height, train.width])?;
    Judge::with_training_set(train, opts)?.score(&samples)
}

/// The judge of one data set, ready to score sample sets: its classifier, and its features of
/// every real image. Those features are most of an evaluation's work and the same every time,
/// so a run that judges itself every N steps prepares one judge and scores with it.
pub struct Judge {
    model: Classifier,
    info: ClassifierInfo,
    path: PathBuf,
    train: ImageDataset,
    test: ImageDataset,
    train_feats: Vec<f32>,
    test_feats: Vec<f32>,
    seed: u64,
    device: Device,
}

impl Judge {
    /// The judge of `opts.data` (its classifier trained and cached if it is not yet);
    /// `opts.samples` is not read.
    pub fn prepare(opts: &EvalOptions) -> anyhow::Result<Self> {
        Self::with_training_set(opts.data.load_with_progress(Split::Train, opts.progress)?, opts)
    }

    fn with_training_set(train: ImageDataset, opts: &EvalOptions) -> anyhow::Result<Self> {
        let test = opts.data.load_with_progress(Split::Test, opts.progress)?;
        let (model, info, path) = classifier_for(&train, &test, train.classes.len(), opts)?;
        let device = opts.device.clone();
        let (_, train_feats) = judged(&model, &train, &device);
        let (_, test_feats) = judged(&model, &test, &device);
        Ok(Self { model, info, path, train, test, train_feats, test_feats, seed: opts.seed, device })
    }

    /// The features of rows `rows` of `all` (one row of [`classifier::FEATURES`] per image).
    fn rows_of(all: &[f32], rows: &[usize]) -> Vec<f32> {
        let dim = classifier::FEATURES;
        rows.iter().flat_map(|&i| all[i * dim..(i + 1) * dim].iter().copied()).collect()
    }

    /// [`Judge::score`] of the samples `dits sample` wrote into `dir`.
    pub fn score_dir(&self, dir: &Path) -> anyhow::Result<EvalReport> {
        let t = &self.train;
        self.score(&samples::read_dir(dir, t.classes.len(), [t.channels, t.height, t.width])?)
    }

    /// Accuracy, FID-CNN (overall and per class, each beside its floor) and near-copies of
    /// `samples`.
    pub fn score(&self, samples: &samples::SampleSet) -> anyhow::Result<EvalReport> {
        let (train, test) = (&self.train, &self.test);
        let classes = train.classes.len();
        let dims = [train.channels, train.height, train.width];
        let (probs, feats) = classifier::probabilities_and_features(&self.model, &samples.images, dims, &self.device);
        let n = samples.labels.len();
        let dim = classifier::FEATURES;
        let floor_rows = matching_real_subset(train, &samples.labels, self.seed);
        let floor_feats = Self::rows_of(&self.train_feats, &floor_rows);
        let floor_labels: Vec<usize> = floor_rows.iter().map(|&i| train.labels[i] as usize).collect();
        let test_labels: Vec<usize> = test.labels.iter().map(|&l| l as usize).collect();
        // The rows of `f` (one per label in `labels`) whose label is `c`.
        let of_class = |f: &[f32], labels: &[usize], c: usize| -> Vec<f32> {
            labels
                .iter()
                .enumerate()
                .filter(|&(_, &l)| l == c)
                .flat_map(|(i, _)| f[i * dim..(i + 1) * dim].to_vec())
                .collect()
        };

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
            let test_c = FeatureStats::fit(&of_class(&self.test_feats, &test_labels, c), dim)?;
            let fid_c = |f: &[f32], labels: &[usize]| -> anyhow::Result<f64> {
                Ok(frechet_distance(&FeatureStats::fit(&of_class(f, labels, c), dim)?, &test_c))
            };
            per_class.push(ClassScore {
                class: c,
                count: rows.len(),
                accuracy: right as f64 / rows.len() as f64,
                fid: fid_c(&feats, &samples.labels)?,
                fid_floor: fid_c(&floor_feats, &floor_labels)?,
            });
        }

        let test_stats = FeatureStats::fit(&self.test_feats, dim)?;
        let fid = frechet_distance(&FeatureStats::fit(&feats, dim)?, &test_stats);
        let fid_floor = frechet_distance(&FeatureStats::fit(&floor_feats, dim)?, &test_stats);
        let memorisation = self.memorisation(&feats, n);

        Ok(EvalReport {
            samples: n,
            accuracy: correct as f64 / n as f64,
            min_class_accuracy: per_class.iter().map(|c| c.accuracy).fold(1.0, f64::min),
            per_class,
            mean_confidence: confidence / n as f64,
            fid,
            fid_floor,
            fid_ratio: fid / fid_floor.max(1e-12),
            memorisation,
            classifier_test_accuracy: self.info.test_accuracy,
            classifier: self.path.clone(),
        })
    }

    /// [`Memorisation`] of the samples' features `feats`: the distances to the nearest training
    /// image of the samples and of `n` real test images (a seeded subset).
    fn memorisation(&self, feats: &[f32], n: usize) -> Memorisation {
        let order = crate::data::loader::epoch_order(self.test.len(), self.seed, 1);
        let test_rows: Vec<usize> = order.iter().take(n.min(self.test.len())).map(|&i| i as usize).collect();
        let reference =
            nearest_distances(&Self::rows_of(&self.test_feats, &test_rows), &self.train_feats, &self.device);
        let mut sorted = reference.clone();
        sorted.sort_by(f32::total_cmp);
        let threshold = sorted[((sorted.len() as f64 * NEAR_COPY_QUANTILE) as usize).min(sorted.len() - 1)];
        let share_below = |d: &[f32]| d.iter().filter(|&&v| v < threshold).count() as f64 / d.len().max(1) as f64;
        let samples = nearest_distances(feats, &self.train_feats, &self.device);
        Memorisation {
            threshold: threshold as f64,
            share: share_below(&samples),
            reference_share: share_below(&reference),
        }
    }
}

/// Each query row's distance to its nearest reference row (rows of [`classifier::FEATURES`]).
pub fn nearest_distances(queries: &[f32], reference: &[f32], device: &Device) -> Vec<f32> {
    let dim = classifier::FEATURES;
    let nq = queries.len() / dim;
    let q = Tensor::<2>::from_data(TensorData::new(queries.to_vec(), [nq, dim]), device);
    let q2 = q.clone().square().sum_dim(1); // [nq, 1]
    let mut best = vec![(f32::INFINITY, 0usize); nq];
    // The nearest row by |q − r|² = |q|² + |r|² − 2 q·r, a product per chunk of the reference;
    // the expansion cancels near 0 (an exact copy would read ~1e-2), so the distance to the row
    // found is computed directly after.
    const CHUNK: usize = 8192;
    for (c, chunk) in reference.chunks(CHUNK * dim).enumerate() {
        let m = chunk.len() / dim;
        let r = Tensor::<2>::from_data(TensorData::new(chunk.to_vec(), [m, dim]), device);
        let r2 = r.clone().square().sum_dim(1).reshape([1, m]);
        let d2 = q2.clone() + r2 - q.clone().matmul(r.transpose()) * 2.0;
        let (min, at) = d2.min_dim_with_indices(1);
        let min = min.into_data().iter::<f32>().collect::<Vec<_>>();
        let at = at.into_data().iter::<i64>().collect::<Vec<_>>();
        for (b, (v, i)) in best.iter_mut().zip(min.into_iter().zip(at)) {
            if v < b.0 {
                *b = (v, c * CHUNK + i as usize);
            }
        }
    }
    let row = |v: &[f32], i: usize| v[i * dim..(i + 1) * dim].to_vec();
    best.iter()
        .enumerate()
        .map(|(i, &(_, j))| {
            row(queries, i).iter().zip(row(reference, j)).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt()
        })
        .collect()
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i)
}

/// The judge's class probabilities and features of every image of `ds`.
fn judged(model: &Classifier, ds: &ImageDataset, device: &Device) -> (Vec<f32>, Vec<f32>) {
    let len = ds.image_len();
    let mut images = vec![0f32; ds.len() * len];
    for i in 0..ds.len() {
        crate::data::loader::scale_image(ds, i, &mut images[i * len..(i + 1) * len]);
    }
    classifier::probabilities_and_features(model, &images, [ds.channels, ds.height, ds.width], device)
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
    let sha = train.checksum();
    // The judge's version in the name: a cache of an older judge is never loaded for a new one.
    let stem = format!("classifier-v{}-{}-seed{}", classifier::VERSION, &sha[..16], opts.seed);
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
        opts.data.path.display(),
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
    let (probs, _) = judged(model, test, device);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_distances_match_a_brute_force_search() {
        let dim = classifier::FEATURES;
        let mut rng = crate::rng::stream(1, crate::rng::Purpose::Bench, 0);
        let reference = crate::rng::standard_normal(&mut rng, 300 * dim);
        let mut queries = crate::rng::standard_normal(&mut rng, 7 * dim);
        // Query 0 is reference row 42 itself: distance 0.
        queries[..dim].copy_from_slice(&reference[42 * dim..43 * dim]);
        let got = nearest_distances(&queries, &reference, &Device::flex());
        for (q, d) in queries.chunks(dim).zip(&got) {
            let want = reference
                .chunks(dim)
                .map(|r| r.iter().zip(q).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt())
                .fold(f32::INFINITY, f32::min);
            assert!((d - want).abs() < 1e-4 * want.max(1.0), "{d} vs {want}");
        }
        assert_eq!(got[0], 0.0, "an exact copy");
    }
}
