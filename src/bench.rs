//! `dits bench`: training and sampling throughput at a fixed batch, median over timed
//! iterations after warm-up, on synthetic data (throughput does not depend on pixel values).

use std::time::Instant;

use burn::prelude::*;
use rand::Rng;

use crate::data::Batch;
use crate::kernels::attention::{self, AttnDims, Engine};
use crate::kernels::linear::{self, Activation, BackwardEngine, LinearDims};
use crate::kernels::peak::{PeakSummary, Probes};
use crate::model::{DitConfig, DitNet};
use crate::profile::{self, Region};
use crate::rng::standard_normal;
use crate::rng::{Purpose, stream};
use crate::train::{TrainConfig, Trainer};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub model: DitConfig,
    pub batch: usize,
    /// Micro-batches of a training step (None: the default recipe's).
    pub micro_batches: Option<usize>,
    pub warmup: usize,
    pub iters: usize,
    /// Also profile that many training steps per region (after the timed ones).
    pub profile_steps: usize,
    pub device: Device,
    /// The training step's precision.
    pub precision: crate::train::precision::Precision,
}

#[derive(Debug, Clone)]
pub struct BenchResult {
    pub train_step_ms: Stats,
    pub forward_ms: Stats,
    pub train_samples_per_s: f64,
    pub sample_images_per_s: f64,
    pub params: usize,
    /// Micro-batches of the timed training step.
    pub micro_batches: usize,
    /// Where the profiled training steps spent their time.
    pub profile: Option<StepProfile>,
    /// The throughput as FLOP rates.
    pub achieved: Achieved,
    /// The machine's measured FMA peak (CPU only): the highest of probes taken before, between
    /// and after the timed runs.
    pub peak: Option<PeakSummary>,
    /// The attention products at the model's shapes on each engine this CPU runs (CPU only).
    pub attention: Vec<EngineRate<Engine>>,
    /// The MLP's Linear backward at the model's shapes on each engine this CPU runs (CPU only).
    pub linear_backward: Vec<EngineRate<BackwardEngine>>,
}

/// The CPU's model name (Linux: `/proc/cpuinfo`), so that every figure names its machine.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| format!("unknown {} CPU", std::env::consts::ARCH))
}

/// One kernel engine's rate on the model's shapes.
#[derive(Debug, Clone, Copy)]
pub struct EngineRate<E> {
    pub engine: E,
    pub gflops: f64,
    /// Whether the kernels use this engine on this CPU.
    pub chosen: bool,
}

/// The attention forward and backward of one batch of `cfg` at `batch`, unfolded (the per-head
/// products every attention call is made of), timed on each engine this CPU runs.
fn attention_engines(cfg: &DitConfig, batch: usize, warmup: usize, iters: usize) -> Vec<EngineRate<Engine>> {
    let d = AttnDims { batch, seq: cfg.tokens(), heads: cfg.heads, head_dim: cfg.head_dim };
    let mut rng = stream(0, Purpose::Bench, 1);
    let qkv = standard_normal(&mut rng, d.batch * d.seq * d.row());
    let grad_out = standard_normal(&mut rng, d.batch * d.seq * d.inner());
    // Four products of s·s·d multiply-adds per head and image forward and backward (scores and
    // output; then the gradients of the scores, values, queries and keys: six), two FLOPs each.
    let flops = 2.0 * 6.0 * (d.batch * d.heads * d.seq * d.seq * d.head_dim) as f64;
    let scale = 1.0 / (d.head_dim as f32).sqrt();
    Engine::available()
        .into_iter()
        .map(|engine| {
            let ms = time(warmup, iters, || {
                let (_, probs) = attention::forward(&qkv, d, scale, true, engine);
                std::hint::black_box(attention::backward(&qkv, &probs.unwrap(), &grad_out, d, scale, engine));
            });
            EngineRate { engine, gflops: flops / (ms.median / 1e3) / 1e9, chosen: engine == Engine::best() }
        })
        .collect()
}

/// The backward of the MLP's two Linears (`width → mlp_ratio·width → width`) over one batch's
/// tokens, timed on each engine this CPU runs: the input and weight gradients, two products
/// of `rows·input·output` multiply-adds per Linear.
fn linear_backward_engines(
    cfg: &DitConfig,
    batch: usize,
    warmup: usize,
    iters: usize,
) -> Vec<EngineRate<BackwardEngine>> {
    let rows = batch * cfg.tokens();
    let (width, hidden) = (cfg.width, cfg.width * cfg.mlp_ratio);
    let layers = [LinearDims { rows, input: width, output: hidden }, LinearDims { rows, input: hidden, output: width }];
    let mut rng = stream(0, Purpose::Bench, 2);
    let data: Vec<_> = layers
        .iter()
        .map(|d| {
            let x = standard_normal(&mut rng, d.rows * d.input);
            let w = standard_normal(&mut rng, d.input * d.output);
            let dy = standard_normal(&mut rng, d.rows * d.output);
            (x, w, dy)
        })
        .collect();
    let flops: f64 = layers.iter().map(|d| 2.0 * 2.0 * (d.rows * d.input * d.output) as f64).sum();
    BackwardEngine::available()
        .into_iter()
        .map(|engine| {
            let ms = time(warmup, iters, || {
                for (d, (x, w, dy)) in layers.iter().zip(&data) {
                    let mut dy = dy.clone();
                    std::hint::black_box(linear::backward_on(engine, x, w, &[], &mut dy, *d, Activation::Identity));
                }
            });
            EngineRate { engine, gflops: flops / (ms.median / 1e3) / 1e9, chosen: engine == BackwardEngine::best() }
        })
        .collect()
}

/// Throughput as FLOP rates, counted by the FLOP model ([`crate::model::flops`]): a training
/// step costs three forward passes per image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Achieved {
    /// FLOPs of one image's forward pass as dits executes it (attention folded where it pays).
    pub executed_flops: f64,
    /// The same as the model is written.
    pub written_flops: f64,
    pub train_gflops: f64,
    pub sample_gflops: f64,
}

impl Achieved {
    fn of(model: &DitConfig, train_samples_per_s: f64, sample_images_per_s: f64) -> Self {
        let executed_flops = model.executed_forward_flops();
        Self {
            executed_flops,
            written_flops: model.forward_flops(),
            train_gflops: 3.0 * executed_flops * train_samples_per_s / 1e9,
            sample_gflops: executed_flops * sample_images_per_s / 1e9,
        }
    }
}

/// Thread time per region of a training step (see [`crate::profile`]).
#[derive(Debug, Clone)]
pub struct StepProfile {
    /// Wall seconds per step while profiling.
    pub wall_s: f64,
    pub threads: usize,
    /// Seconds of thread time per step, by region.
    pub regions: Vec<(Region, f64)>,
}

impl std::fmt::Display for StepProfile {
    /// A table: each top-level phase, the kernels inside it, the burn operations around them,
    /// and the thread time not spent in any region (waiting, scheduling).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let budget = self.wall_s * self.threads as f64;
        let ms = |s: f64| s * 1e3;
        let pct = |s: f64| 100.0 * s / budget;
        writeln!(
            f,
            "training step profile: {:.1} ms wall x {} threads = {:.1} thread-ms per step",
            ms(self.wall_s),
            self.threads,
            ms(budget)
        )?;
        writeln!(f, "  {:<46} {:>9} {:>7}", "region", "ms/step", "share")?;
        let mut accounted = 0.0;
        for &(phase, secs) in self.regions.iter().filter(|(r, _)| r.parent().is_none()) {
            accounted += secs;
            writeln!(f, "  {:<46} {:>9.2} {:>6.1}%", phase.label(), ms(secs), pct(secs))?;
            let kernels: Vec<_> = self.regions.iter().filter(|(r, _)| r.parent() == Some(phase)).collect();
            if kernels.is_empty() {
                continue;
            }
            let mut inside = 0.0;
            for &&(k, ks) in &kernels {
                inside += ks;
                writeln!(f, "    {:<44} {:>9.2} {:>6.1}%", k.label(), ms(ks), pct(ks))?;
            }
            let rest = (secs - inside).max(0.0);
            writeln!(f, "    {:<44} {:>9.2} {:>6.1}%", "other (burn operations, autodiff graph)", ms(rest), pct(rest))?;
        }
        let idle = (budget - accounted).max(0.0);
        writeln!(f, "  {:<46} {:>9.2} {:>6.1}%", "outside any region (waiting, scheduling)", ms(idle), pct(idle))
    }
}

/// Median, min and max of timed iterations, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

fn time(warmup: usize, iters: usize, mut f: impl FnMut()) -> Stats {
    for _ in 0..warmup {
        f();
    }
    let mut ms: Vec<f64> = (0..iters.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    Stats { median: ms[ms.len() / 2], min: ms[0], max: ms[ms.len() - 1] }
}

pub fn run(opts: &BenchOptions) -> anyhow::Result<BenchResult> {
    opts.model.validate()?;
    anyhow::ensure!(opts.batch > 0, "--batch must be at least 1");
    let cfg = &opts.model;
    let b = opts.batch;
    let n = cfg.channels * cfg.image_size * cfg.image_size;
    let mut rng = stream(0, Purpose::Bench, 0);
    let images: Vec<f32> = (0..b * n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let labels: Vec<u8> = (0..b).map(|_| rng.random_range(0..cfg.classes) as u8).collect();
    let batch = Batch { images, labels: labels.clone(), epoch: 0, index: 0 };

    let train = TrainConfig {
        batch: b,
        micro_batches: opts.micro_batches.unwrap_or(TrainConfig::micro_batches_for(b)).min(b),
        // Throughput does not depend on the label ids; the preset may have no null label.
        label_dropout: 0.0,
        precision: opts.precision,
        ..TrainConfig::default()
    };
    let step_parts = train.micro_batches;
    let mut trainer =
        Trainer::new(cfg.clone(), train, crate::data::DataSource::idx(std::path::Path::new("")), &opts.device)?;
    let params = trainer.table().total;
    let on_cpu = opts.device == Device::flex();
    let mut probes = Probes::default();
    let mut probe = || {
        if on_cpu {
            probes.take(0.2)
        }
    };
    probe();
    let train_step_ms = time(opts.warmup, opts.iters, || {
        trainer.step(&batch);
    });
    let profile = (opts.profile_steps > 0).then(|| {
        profile::enable(true);
        let start = Instant::now();
        for _ in 0..opts.profile_steps {
            trainer.step(&batch);
        }
        let wall_s = start.elapsed().as_secs_f64() / opts.profile_steps as f64;
        let regions = profile::totals().into_iter().map(|(r, s)| (r, s / opts.profile_steps as f64)).collect();
        profile::enable(false);
        StepProfile { wall_s, threads: rayon::current_num_threads(), regions }
    });

    probe();
    let device = &opts.device;
    let model = DitNet::new(cfg, device, 1);
    let dims = [b, cfg.channels, cfg.image_size, cfg.image_size];
    let x = Tensor::<4>::from_data(TensorData::new(standard_normal(&mut rng, b * n), dims), device);
    let t = Tensor::<1, Int>::from_data(
        TensorData::new((0..b as i64).map(|i| i * 7 % 1000).collect::<Vec<_>>(), [b]),
        device,
    );
    let y =
        Tensor::<1, Int>::from_data(TensorData::new(labels.iter().map(|&l| l as i64).collect::<Vec<_>>(), [b]), device);
    // As `dits sample` runs: the network prepared once, then one inference call over the batch
    // (cache-sized chunks in parallel, folded attention where it pays).
    let prepared = model.prepare_inference();
    let forward_ms = time(opts.warmup, opts.iters, || {
        let out = prepared.infer(x.clone(), t.clone(), y.clone());
        // Reading one value forces the computation on lazy backends.
        let _ = out.slice([0..1, 0..1, 0..1, 0..1]).into_data();
    });
    let train_samples_per_s = b as f64 / (train_step_ms.median / 1e3);
    let sample_images_per_s = b as f64 / (forward_ms.median / 1e3);
    probe();
    let peak = probes.summary();
    let attention = if on_cpu { attention_engines(cfg, b, opts.warmup, opts.iters) } else { Vec::new() };
    let linear_backward = if on_cpu { linear_backward_engines(cfg, b, opts.warmup, opts.iters) } else { Vec::new() };
    Ok(BenchResult {
        peak,
        attention,
        linear_backward,
        achieved: Achieved::of(&opts.model, train_samples_per_s, sample_images_per_s),
        train_samples_per_s,
        sample_images_per_s,
        train_step_ms,
        forward_ms,
        params,
        micro_batches: step_parts,
        profile,
    })
}
