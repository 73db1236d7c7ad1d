//! The `dits` command line: argument parsing and dispatch, nothing else.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail, ensure};
use clap::{Args, Parser, Subcommand};

use dits::data::default_data_dir;
use dits::device::{DeviceKind, device, init_threads};
use dits::diffusion::SamplerKind;
use dits::distributed::data_parallel::{DataParallel, ZeroStage};
use dits::distributed::devices::DeviceWorld;
use dits::distributed::{Collective, Local};
use dits::train::recipe::{ModelOverrides, RecipeFile, TrainOverrides};
use dits::train::{self, Length, TrainOptions, checkpoint, default_train_config};
use std::sync::Arc;

#[derive(Parser)]
#[command(name = "dits", version, about = "Train, sample and benchmark class-conditional Diffusion Transformers")]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a DiT (DDPM ε-prediction or flow matching) on an IDX image data set.
    Train(Box<TrainArgs>),
    /// Generate images with a trained model.
    Sample(SampleArgs),
    /// Score samples: accuracy of the intended class and FID-CNN, with a classifier trained
    /// on the real data.
    Eval(EvalArgs),
    /// Measure training and sampling throughput.
    Bench(BenchArgs),
}

#[derive(Args)]
struct EvalArgs {
    /// Directory of samples named <class>_<index>.png (other files are ignored).
    samples: PathBuf,
    /// Data set the samples imitate (MNIST layout) [default: the shipped MNIST].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Where the trained classifier is cached [default: $XDG_CACHE_HOME/dits or ~/.cache/dits].
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Seed of the classifier's training and of the real subset for the floor.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    #[arg(long)]
    no_progress: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Clone)]
struct Common {
    /// CPU threads (default: RAYON_NUM_THREADS, else all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Compute device.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceKind,
}

#[derive(Args, Clone)]
struct TrainArgs {
    /// Data set directory in the MNIST layout [default: the shipped MNIST].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Run directory for checkpoints, metrics.jsonl and loss.png [default: runs/dits].
    #[arg(long)]
    out: Option<PathBuf>,
    /// A TOML recipe: [model] and [train] tables whose keys are this command's flags
    /// (flags given here override it).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    model: ModelOverrides,
    #[command(flatten)]
    train: TrainOverrides,
    /// Stop at this step with a checkpoint; the run and its learning-rate schedule keep the
    /// length of --steps/--epochs, and --resume continues it.
    #[arg(long, value_name = "STEP")]
    stop_after: Option<u64>,
    /// Checkpoints kept on disk (older ones are deleted).
    #[arg(long, default_value_t = 2)]
    keep: usize,
    /// Continue the run in RUN_DIR from its latest checkpoint.
    #[arg(long, value_name = "RUN_DIR", conflicts_with = "config")]
    resume: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
    /// Check every step's loss and gradients for NaN/Inf, and stop naming the first parameter
    /// affected (a pass over the gradient per step).
    #[arg(long)]
    detect_anomaly: bool,
    #[command(flatten)]
    dist: DistArgs,
    #[command(flatten)]
    common: Common,
}

/// Training on several ranks.
#[derive(Args, Clone)]
struct DistArgs {
    /// Several ranks: `mpi`, one process per rank launched by `mpirun -np N` (needs a build
    /// with `--features mpi`); `devices`, --ranks threads of this process, one device each (with
    /// `--device cuda`: GPUs 0..N, gradients summed by NCCL). --batch stays the global batch.
    #[arg(long, value_enum, default_value = "none")]
    dist: Dist,
    /// Ranks of `--dist devices`.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
    ranks: Option<u64>,
    /// ZeRO stage: 0 (every rank keeps the whole optimizer state) or 1 (each keeps its shard).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    zero: u8,
    /// Gradient all-reduce bucket size in MiB.
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..=4096))]
    bucket_mb: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Dist {
    /// One process.
    None,
    /// MPI (OpenMPI, MPICH), launched by mpirun.
    Mpi,
    /// Threads of this process, one device each.
    Devices,
}

impl DistArgs {
    fn sharding(&self) -> ZeroStage {
        if self.zero == 1 { ZeroStage::One } else { ZeroStage::Off }
    }

    fn bucket(&self) -> usize {
        (self.bucket_mb as usize) << 18
    }

    /// The ranks of `--dist devices`, one per device.
    fn device_world(&self, kind: DeviceKind) -> anyhow::Result<Vec<(DataParallel, burn::prelude::Device)>> {
        let ranks = self.ranks.context("--dist devices needs --ranks N")? as usize;
        let devices = dits::device::devices(kind, ranks)?;
        // burn's collective all-reduce runs on GPU backends; CPU ranks sum in shared memory.
        let on_devices = kind != DeviceKind::Cpu;
        Ok(DeviceWorld::world(devices, on_devices)
            .into_iter()
            .map(|w| {
                let device = w.device().clone();
                let comm: Arc<dyn Collective> = Arc::new(w);
                (DataParallel { comm, zero: self.sharding(), bucket: self.bucket() }, device)
            })
            .collect())
    }

    fn data_parallel(&self) -> anyhow::Result<DataParallel> {
        ensure!(
            self.ranks.is_none() || self.dist == Dist::Devices,
            "--ranks is for --dist devices (mpirun sets the ranks of --dist mpi)"
        );
        let comm: Arc<dyn Collective> = match self.dist {
            Dist::None => {
                ensure!(
                    self.zero == 0,
                    "--zero 1 shards the optimizer state over ranks: it needs --dist mpi or devices"
                );
                Arc::new(Local)
            }
            Dist::Devices => unreachable!("--dist devices starts its ranks in train_cmd"),
            #[cfg(feature = "mpi")]
            Dist::Mpi => Arc::new(dits::distributed::mpi::MpiWorld::init()?),
            #[cfg(not(feature = "mpi"))]
            Dist::Mpi => bail!(
                "this dits was built without MPI support: install MPI and libclang \
                 (apt-get install openmpi-bin libopenmpi-dev libclang-dev), then `cargo build --release --features mpi`"
            ),
        };
        Ok(DataParallel { comm, zero: self.sharding(), bucket: self.bucket() })
    }
}

#[derive(Args)]
struct SampleArgs {
    /// A run directory, checkpoint directory, .safetensors file, or mnist-dits PyTorch .pth.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Output directory for <class>_<index>.png, grid.png and process.png.
    #[arg(long)]
    out: PathBuf,
    /// Comma-separated classes [default: all].
    #[arg(long, value_delimiter = ',')]
    classes: Option<Vec<usize>>,
    /// Images per class.
    #[arg(long, default_value_t = 10)]
    per_class: usize,
    /// Sampler: ddpm (ancestral), ddim (with --eta), euler (= ddim, η 0), accelerated
    /// (γ 2, μ 0), gen (smalldiffusion's generalised sampler, --gamma and --mu).
    #[arg(long, value_enum, default_value = "euler")]
    sampler: SamplerKind,
    /// Denoising steps, on trailing levels [default: 20; ddpm 1000 with --clip xt = mnist-dits].
    #[arg(long)]
    steps: Option<usize>,
    /// DDIM's η: 0 deterministic, 1 as much fresh noise as DDPM.
    #[arg(long, default_value_t = 0.0)]
    eta: f64,
    /// Generalised sampler's γ (1: this step's prediction; 2: extrapolate from the last one).
    #[arg(long, default_value_t = 1.0)]
    gamma: f64,
    /// Generalised sampler's μ in [0, 1) (0: deterministic; 0.5: DDPM).
    #[arg(long, default_value_t = 0.0)]
    mu: f64,
    /// Keep the predicted clean image (x0) or the noisy image itself (xt, as mnist-dits) in [-1, 1].
    #[arg(long, value_enum, default_value = "x0")]
    clip: dits::diffusion::sampler::Clip,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Classifier-free guidance scale: 1 = conditional only, 0 = unconditional, > 1 guided
    /// (needs a model trained with --label-dropout) [default: 1.5 for such models, else 1].
    #[arg(long)]
    cfg_scale: Option<f64>,
    /// Guide only at noise levels with σ (noise/signal) in LO,HI; 0,inf guides every step
    /// [default: 0.3,5].
    #[arg(long, value_name = "LO,HI", value_parser = dits::diffusion::guidance::parse_interval)]
    cfg_interval: Option<(f64, f64)>,
    /// Images denoised together.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Model preset for weight files without a config (PyTorch .pth).
    #[arg(long, default_value = "mnist-dits")]
    model: String,
    /// Weights of a checkpoint to use: the moving average or the raw weights.
    #[arg(long, value_enum, default_value = "ema")]
    weights: dits::sample::WeightsKind,
    /// Write into a non-empty --out directory.
    #[arg(long)]
    force: bool,
    #[arg(long)]
    no_progress: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct BenchArgs {
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Micro-batches of a training step, computed in parallel [default: the recipe's, 2].
    #[arg(long)]
    micro_batches: Option<usize>,
    #[command(flatten)]
    model: ModelOverrides,
    /// Untimed iterations first.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Timed iterations (the median is reported).
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Then profile this many training steps: thread time per phase and per fused kernel.
    #[arg(long, value_name = "STEPS", num_args = 0..=1, default_missing_value = "10")]
    profile: Option<usize>,
    #[command(flatten)]
    common: Common,
}

fn main() -> ExitCode {
    dits::memory::keep_freed_memory();
    // Under mpirun only rank 0 reports progress: the other ranks log warnings and errors.
    let rank_env = ["OMPI_COMM_WORLD_RANK", "PMI_RANK"].iter().find_map(|v| std::env::var(v).ok());
    let default_filter = if rank_env.is_some_and(|r| r != "0") { "warn" } else { "info" };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .without_time()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DITS_LOG").unwrap_or_else(|_| default_filter.into()),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(a) => train_cmd(*a),
        Command::Sample(a) => sample_cmd(a),
        Command::Eval(a) => eval_cmd(a),
        Command::Bench(a) => bench_cmd(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<Interrupted>().is_some() => {
            if !e.to_string().is_empty() {
                eprintln!("{e}");
            }
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn train_cmd(a: TrainArgs) -> anyhow::Result<()> {
    if a.dist.dist == Dist::Devices {
        return train_on_devices(a);
    }
    let dp = a.dist.data_parallel()?;
    let comm = dp.comm.clone();
    let dev = device(a.common.device)?;
    let result = train_ranked(a, dp, dev);
    if let Err(e) = &result
        && comm.size() > 1
        && e.downcast_ref::<Interrupted>().is_none()
    {
        // The other ranks would wait for this one forever: stop them all.
        eprintln!("error (rank {}): {e:#}", comm.rank());
        comm.abort(1);
    }
    result
}

/// `--dist devices`: one thread per rank; an error on any rank ends the process.
fn train_on_devices(a: TrainArgs) -> anyhow::Result<()> {
    let ranks = a.dist.device_world(a.common.device)?;
    std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|(dp, dev)| {
                let a = a.clone();
                s.spawn(move || {
                    let comm = dp.comm.clone();
                    let result = train_ranked(a, dp, dev);
                    if let Err(e) = &result
                        && e.downcast_ref::<Interrupted>().is_none()
                    {
                        eprintln!("error (rank {}): {e:#}", comm.rank());
                        comm.abort(1);
                    }
                    result
                })
            })
            .collect();
        let results: Vec<_> =
            handles.into_iter().map(|h| h.join().map_err(|_| anyhow::anyhow!("a rank panicked"))).collect();
        // Every rank stopped at the same step; rank 0 reports it.
        results.into_iter().next().expect("at least one rank")?
    })
}

fn train_ranked(a: TrainArgs, dp: DataParallel, dev: burn::prelude::Device) -> anyhow::Result<()> {
    let threads = init_threads(a.common.threads)?;
    let progress = !a.no_progress && std::io::stderr().is_terminal();
    if let Some(run_dir) = a.resume {
        let detect = a.detect_anomaly;
        return resume_cmd(
            run_dir,
            a.out,
            a.data,
            a.model,
            a.train,
            a.stop_after,
            a.keep,
            progress,
            dev,
            threads,
            dp,
            detect,
        );
    }
    let file = match &a.config {
        Some(path) => RecipeFile::read(path)?,
        None => RecipeFile::default(),
    };
    let overrides = a.train.or(file.train);
    let length = length_of(&overrides)?;
    let train = overrides.apply(default_train_config())?;
    train.validate()?;
    let mut model = a.model.or(file.model).resolve()?;
    model.null_class = train.label_dropout > 0.0;
    let opts = TrainOptions {
        data_dir: a.data.unwrap_or_else(default_data_dir),
        run_dir: a.out.unwrap_or_else(|| PathBuf::from("runs/dits")),
        model,
        train,
        length: Some(length.unwrap_or(Length::Epochs(train::DEFAULT_EPOCHS))),
        resume: false,
        stop_after: a.stop_after,
        keep: a.keep,
        progress,
        device: dev,
        dp,
        detect_anomaly: a.detect_anomaly,
    };
    report_train(train::trainer::run(opts)?, threads)
}

/// The run length the flags or file give, if any.
fn length_of(t: &TrainOverrides) -> anyhow::Result<Option<Length>> {
    let length = match (t.steps, t.epochs) {
        (Some(s), _) => Some(Length::Steps(s)),
        (_, Some(e)) => Some(Length::Epochs(e)),
        _ => None,
    };
    if let Some(Length::Steps(0) | Length::Epochs(0)) = length {
        bail!("--steps/--epochs must be at least 1");
    }
    Ok(length)
}

/// `dits train --resume RUN_DIR`: the run's own settings, where only its length and logging
/// may change.
#[allow(clippy::too_many_arguments)]
fn resume_cmd(
    run_dir: PathBuf,
    out: Option<PathBuf>,
    data: Option<PathBuf>,
    model: ModelOverrides,
    overrides: TrainOverrides,
    stop_after: Option<u64>,
    keep: usize,
    progress: bool,
    dev: burn::prelude::Device,
    threads: usize,
    dp: DataParallel,
    detect_anomaly: bool,
) -> anyhow::Result<()> {
    let length = length_of(&overrides)?;
    // Rank 0 reads and checks the run and sends it over: other ranks may not see the files.
    let (data_dir, model, train) = if dp.is_lead() {
        resume_settings(&run_dir, out.as_ref(), data.as_ref(), &model, &overrides)?
    } else {
        (PathBuf::new(), dits::model::DitConfig::mnist_dits(), default_train_config())
    };
    let opts = TrainOptions {
        data_dir,
        run_dir,
        model,
        length,
        train,
        resume: true,
        stop_after,
        keep,
        progress,
        device: dev,
        dp,
        detect_anomaly,
    };
    report_train(train::trainer::run(opts)?, threads)
}

/// The data directory, model and training settings of the run in `run_dir`, after checking
/// that the flags change only what a resumed run may change.
fn resume_settings(
    run_dir: &Path,
    out: Option<&PathBuf>,
    data: Option<&PathBuf>,
    model: &ModelOverrides,
    overrides: &TrainOverrides,
) -> anyhow::Result<(PathBuf, dits::model::DitConfig, train::TrainConfig)> {
    let saved = checkpoint::read_state(&checkpoint::resolve(run_dir)?)?;
    ensure!(model.is_empty(), "a resumed run keeps its model: drop --model and the size flags");
    if let Some(out) = out {
        ensure!(out == run_dir, "--out {} differs from --resume {}", out.display(), run_dir.display());
    }
    if data.is_some_and(|d| d.display().to_string() != saved.data_dir) {
        bail!("--data differs from the run being resumed ({}); a resumed run keeps its data", saved.data_dir);
    }
    // Everything but the length and the logging intervals must stay as the run has it.
    let fixed =
        TrainOverrides { epochs: None, steps: None, checkpoint_every: None, log_every: None, ..overrides.clone() };
    let mut train = fixed.apply(saved.train.clone())?;
    if train != saved.train {
        bail!(
            "a resumed run keeps its settings (only --steps/--epochs, --checkpoint-every and --log-every may change): \
             a flag differs from the run in {}",
            run_dir.display()
        );
    }
    train.checkpoint_every = overrides.checkpoint_every.unwrap_or(train.checkpoint_every);
    train.log_every = overrides.log_every.unwrap_or(train.log_every);
    Ok((PathBuf::from(&saved.data_dir), saved.model, train))
}

fn report_train(s: train::TrainSummary, threads: usize) -> anyhow::Result<()> {
    if s.rank != 0 {
        return if s.interrupted { Err(Interrupted(String::new()).into()) } else { Ok(()) };
    }
    if s.interrupted {
        let run_dir = s.checkpoint.parent().and_then(|c| c.parent()).unwrap_or(&s.checkpoint);
        return Err(Interrupted(format!(
            "interrupted at step {}: checkpoint {} written; `dits train --resume {}` continues the run",
            s.steps,
            s.checkpoint.display(),
            run_dir.display()
        ))
        .into());
    }
    let ranks = if s.ranks > 1 { format!("{} ranks × ", s.ranks) } else { String::new() };
    println!(
        "trained to step {} in {:.1}s ({:.1} samples/s, {ranks}{threads} threads), final loss {:.4}; checkpoint {}",
        s.steps,
        s.elapsed_s,
        s.samples_per_s,
        s.final_loss,
        s.checkpoint.display()
    );
    Ok(())
}

/// A run stopped by a signal after its checkpoint: reported without `error:`, exit status 130
/// (the shell's convention for Ctrl-C).
#[derive(Debug)]
struct Interrupted(String);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Interrupted {}

fn sample_cmd(a: SampleArgs) -> anyhow::Result<()> {
    init_threads(a.common.threads)?;
    let opts = dits::sample::SampleOptions {
        checkpoint: a.checkpoint,
        out: a.out,
        classes: a.classes,
        per_class: a.per_class,
        sampler: a.sampler,
        eta: a.eta,
        gamma: a.gamma,
        mu: a.mu,
        clip: a.clip,
        steps: a.steps,
        seed: a.seed,
        cfg_scale: a.cfg_scale,
        cfg_interval: a.cfg_interval,
        batch: a.batch,
        preset: a.model,
        weights: a.weights,
        force: a.force,
        progress: !a.no_progress && std::io::stderr().is_terminal(),
        device: device(a.common.device)?,
    };
    let s = dits::sample::run(opts)?;
    println!(
        "wrote {} images ({:.1} images/s) and grid.png, process.png to {}",
        s.images,
        s.images_per_s,
        s.out.display()
    );
    Ok(())
}

fn eval_cmd(a: EvalArgs) -> anyhow::Result<()> {
    init_threads(a.common.threads)?;
    let opts = dits::eval::EvalOptions {
        samples: a.samples,
        data_dir: a.data.unwrap_or_else(default_data_dir),
        cache_dir: a.cache.unwrap_or_else(dits::eval::default_cache_dir),
        seed: a.seed,
        progress: !a.no_progress && std::io::stderr().is_terminal(),
        device: device(a.common.device)?,
    };
    let r = dits::eval::run(&opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!("{} samples: accuracy {:.4}, mean confidence {:.4}", r.samples, r.accuracy, r.mean_confidence);
    let per: Vec<String> = r.per_class.iter().map(|c| format!("{}:{:.2}", c.class, c.accuracy)).collect();
    println!("per class: {}", per.join(" "));
    println!("FID-CNN {:.3}  (floor {:.3}: {} real training images vs the test split)", r.fid, r.fid_floor, r.samples);
    println!("classifier: test accuracy {:.4}, {}", r.classifier_test_accuracy, r.classifier.display());
    Ok(())
}

fn bench_cmd(a: BenchArgs) -> anyhow::Result<()> {
    let threads = init_threads(a.common.threads)?;
    let model = a.model.resolve()?;
    let name = a.model.preset.clone().unwrap_or_else(|| "mnist-dits".into());
    let opts = dits::bench::BenchOptions {
        model,
        batch: a.batch,
        micro_batches: a.micro_batches,
        warmup: a.warmup,
        iters: a.iters,
        profile_steps: a.profile.unwrap_or(0),
        device: device(a.common.device)?,
    };
    let r = dits::bench::run(&opts)?;
    println!(
        "model={name} params={} batch={} micro_batches={} threads={threads} device={:?}",
        r.params, a.batch, r.micro_batches, a.common.device
    );
    let line = |what: &str, s: dits::bench::Stats| {
        println!("{what}: median {:.2} ms (min {:.2}, max {:.2}) over {} iterations", s.median, s.min, s.max, a.iters)
    };
    line("train step (forward+backward+adam)", r.train_step_ms);
    line("sampling forward (no grad)", r.forward_ms);
    let (flops, model_flops) = (opts.model.executed_forward_flops(), opts.model.forward_flops());
    let folded = if flops < model_flops {
        format!(" as executed, attention folded; {:.1} as written", model_flops / 1e6)
    } else {
        String::new()
    };
    println!(
        "achieved: train {:.1} GFLOP/s, sampling {:.1} GFLOP/s ({:.1} MFLOP per image forward{folded}, matmuls only); peak RSS {}",
        3.0 * flops * r.train_samples_per_s / 1e9,
        flops * r.sample_images_per_s / 1e9,
        flops / 1e6,
        dits::memory::peak_rss_bytes().map_or("unknown".into(), |b| format!("{} MiB", b >> 20))
    );
    if let Some(p) = &r.profile {
        print!("{p}");
    }
    println!("train_samples_per_s={:.1}", r.train_samples_per_s);
    println!("sample_images_per_s={:.1}", r.sample_images_per_s);
    Ok(())
}
