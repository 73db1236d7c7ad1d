//! The `dits` command line: argument parsing and dispatch, nothing else.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, ensure};
use clap::{Args, Parser, Subcommand};

use dits::data::default_data_dir;
use dits::device::{DeviceKind, device, init_threads};
use dits::diffusion::SamplerKind;
use dits::model::DitConfig;
use dits::train::{self, Length, LossKind, LrDecay, TrainOptions, checkpoint, default_train_config};

#[derive(Parser)]
#[command(name = "dits", version, about = "Train, sample and benchmark class-conditional Diffusion Transformers")]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a DiT with DDPM (ε-prediction) on an IDX image data set.
    Train(TrainArgs),
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

#[derive(Args)]
struct Common {
    /// CPU threads (default: RAYON_NUM_THREADS, else all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Compute device.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceKind,
}

#[derive(Args)]
struct TrainArgs {
    /// Data set directory in the MNIST layout [default: the shipped MNIST].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Run directory for checkpoints, metrics.jsonl and loss.png [default: runs/dits].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Total epochs of the run [default: 6].
    #[arg(long, conflicts_with = "steps")]
    epochs: Option<u64>,
    /// Total optimizer steps of the run (instead of --epochs).
    #[arg(long)]
    steps: Option<u64>,
    /// Batch size [default: 64].
    #[arg(long)]
    batch: Option<usize>,
    /// Peak Adam learning rate [default: 0.002].
    #[arg(long, allow_negative_numbers = true)]
    lr: Option<f64>,
    /// Seed of every random number in the run [default: 0].
    #[arg(long)]
    seed: Option<u64>,
    /// Loss between predicted and true noise [default: mse].
    #[arg(long, value_enum)]
    loss: Option<LossKind>,
    /// Model preset.
    #[arg(long)]
    model: Option<String>,
    /// Save a checkpoint every N steps (and always at the end).
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Log metrics every N steps.
    #[arg(long)]
    log_every: Option<u64>,
    /// Linear learning-rate warm-up over the first N steps [default: 200].
    #[arg(long)]
    warmup_steps: Option<u64>,
    /// Probability of training on the null label instead of the image's label, which enables
    /// classifier-free guidance at sampling time [default: 0.1].
    #[arg(long)]
    label_dropout: Option<f64>,
    /// Learning-rate decay after warm-up, over the run's total steps [default: cosine].
    #[arg(long, value_enum)]
    lr_decay: Option<LrDecay>,
    /// Decay of the weights' moving average used for sampling [default: 0.999].
    #[arg(long)]
    ema_decay: Option<f64>,
    /// Stop at this step with a checkpoint; the run and its learning-rate schedule keep the
    /// length of --steps/--epochs, and --resume continues it.
    #[arg(long, value_name = "STEP")]
    stop_after: Option<u64>,
    /// Checkpoints kept on disk (older ones are deleted).
    #[arg(long, default_value_t = 2)]
    keep: usize,
    /// Continue the run in RUN_DIR from its latest checkpoint.
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
    #[command(flatten)]
    common: Common,
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
    #[arg(long, value_enum, default_value = "ddpm")]
    sampler: SamplerKind,
    /// Denoising steps [default: 100 for ddpm, 50 for ddim; ddpm 1000 = mnist-dits].
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Classifier-free guidance scale: 1 = conditional only, 0 = unconditional, > 1 guided
    /// (needs a model trained with --label-dropout) [default: 3 for such models, else 1].
    #[arg(long)]
    cfg_scale: Option<f64>,
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
    #[arg(long, default_value = "mnist-dits")]
    model: String,
    /// Untimed iterations first.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Timed iterations (the median is reported).
    #[arg(long, default_value_t = 20)]
    iters: usize,
    #[command(flatten)]
    common: Common,
}

fn main() -> ExitCode {
    dits::memory::keep_freed_memory();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .without_time()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("DITS_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(a) => train_cmd(a),
        Command::Sample(a) => sample_cmd(a),
        Command::Eval(a) => eval_cmd(a),
        Command::Bench(a) => bench_cmd(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn train_cmd(a: TrainArgs) -> anyhow::Result<()> {
    let threads = init_threads(a.common.threads)?;
    let dev = device(a.common.device)?;
    let progress = !a.no_progress && std::io::stderr().is_terminal();
    let length_arg = match (a.steps, a.epochs) {
        (Some(s), _) => Some(Length::Steps(s)),
        (_, Some(e)) => Some(Length::Epochs(e)),
        _ => None,
    };
    if let Some(Length::Steps(0) | Length::Epochs(0)) = length_arg {
        bail!("--steps/--epochs must be at least 1");
    }
    if let Some(run_dir) = a.resume {
        let saved = checkpoint::read_state(&checkpoint::resolve(&run_dir)?)?;
        let t = &saved.train;
        let fixed: [(&str, bool); 10] = [
            ("--label-dropout", a.label_dropout.is_some_and(|v| v != t.label_dropout)),
            ("--lr-decay", a.lr_decay.is_some_and(|v| v != t.lr_decay)),
            ("--warmup-steps", a.warmup_steps.is_some_and(|v| v != t.warmup_steps)),
            ("--ema-decay", a.ema_decay.is_some_and(|v| v != t.ema_decay)),
            ("--batch", a.batch.is_some_and(|v| v != t.batch)),
            ("--lr", a.lr.is_some_and(|v| v != t.lr)),
            ("--seed", a.seed.is_some_and(|v| v != t.seed)),
            ("--loss", a.loss.is_some_and(|v| v != t.loss)),
            (
                "--model",
                a.model.as_ref().is_some_and(|m| {
                    let preset =
                        DitConfig::preset(m).ok().map(|p| DitConfig { null_class: saved.model.null_class, ..p });
                    preset.as_ref() != Some(&saved.model)
                }),
            ),
            ("--data", a.data.as_ref().is_some_and(|d| d.display().to_string() != saved.data_dir)),
        ];
        if let Some((flag, _)) = fixed.iter().find(|(_, differs)| *differs) {
            bail!(
                "{flag} differs from the run being resumed; a resumed run keeps its settings (only --steps/--epochs may grow)"
            );
        }
        if let Some(out) = &a.out {
            ensure!(out == &run_dir, "--out {} differs from --resume {}", out.display(), run_dir.display());
        }
        let mut train = saved.train.clone();
        if let Some(e) = a.checkpoint_every {
            train.checkpoint_every = e;
        }
        if let Some(l) = a.log_every {
            train.log_every = l;
        }
        let opts = TrainOptions {
            data_dir: PathBuf::from(&saved.data_dir),
            run_dir,
            model: saved.model.clone(),
            length: length_arg.unwrap_or(Length::Steps(saved.train.total_steps)),
            train,
            resume: true,
            stop_after: a.stop_after,
            keep: a.keep,
            progress,
            device: dev,
        };
        return report_train(train::trainer::run(opts)?, threads);
    }

    let mut train = default_train_config();
    train.batch = a.batch.unwrap_or(train.batch);
    train.lr = a.lr.unwrap_or(train.lr);
    train.seed = a.seed.unwrap_or(train.seed);
    train.loss = a.loss.unwrap_or(train.loss);
    train.checkpoint_every = a.checkpoint_every.unwrap_or(train.checkpoint_every);
    train.log_every = a.log_every.unwrap_or(train.log_every);
    train.ema_decay = a.ema_decay.unwrap_or(train.ema_decay);
    train.warmup_steps = a.warmup_steps.unwrap_or(train.warmup_steps);
    train.lr_decay = a.lr_decay.unwrap_or(train.lr_decay);
    train.label_dropout = a.label_dropout.unwrap_or(train.label_dropout);
    train.validate()?;
    let mut model = DitConfig::preset(a.model.as_deref().unwrap_or("mnist-dits"))?;
    model.null_class = train.label_dropout > 0.0;
    let data_dir = a.data.unwrap_or_else(default_data_dir);
    let opts = TrainOptions {
        data_dir,
        run_dir: a.out.unwrap_or_else(|| PathBuf::from("runs/dits")),
        model,
        train,
        length: length_arg.unwrap_or(Length::Epochs(train::DEFAULT_EPOCHS)),
        resume: false,
        stop_after: a.stop_after,
        keep: a.keep,
        progress,
        device: dev,
    };
    report_train(train::trainer::run(opts)?, threads)
}

fn report_train(s: train::TrainSummary, threads: usize) -> anyhow::Result<()> {
    println!(
        "trained to step {} in {:.1}s ({:.1} samples/s, {threads} threads), final loss {:.4}; checkpoint {}",
        s.steps,
        s.elapsed_s,
        s.samples_per_s,
        s.final_loss,
        s.checkpoint.display()
    );
    Ok(())
}

fn sample_cmd(a: SampleArgs) -> anyhow::Result<()> {
    init_threads(a.common.threads)?;
    let opts = dits::sample::SampleOptions {
        checkpoint: a.checkpoint,
        out: a.out,
        classes: a.classes,
        per_class: a.per_class,
        sampler: a.sampler,
        steps: a.steps,
        seed: a.seed,
        cfg_scale: a.cfg_scale,
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
    let opts = dits::bench::BenchOptions {
        model: DitConfig::preset(&a.model)?,
        batch: a.batch,
        warmup: a.warmup,
        iters: a.iters,
        device: device(a.common.device)?,
    };
    let r = dits::bench::run(&opts)?;
    println!("model={} params={} batch={} threads={threads} device={:?}", a.model, r.params, a.batch, a.common.device);
    let line = |what: &str, s: dits::bench::Stats| {
        println!("{what}: median {:.2} ms (min {:.2}, max {:.2}) over {} iterations", s.median, s.min, s.max, a.iters)
    };
    line("train step (forward+backward+adam)", r.train_step_ms);
    line("sampling forward (no grad)", r.forward_ms);
    println!("train_samples_per_s={:.1}", r.train_samples_per_s);
    println!("sample_images_per_s={:.1}", r.sample_images_per_s);
    Ok(())
}
