//! The `dits` command line: argument parsing and dispatch, nothing else.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use dits::device::{DeviceKind, init_threads};
use dits::diffusion::SamplerKind;
use dits::distributed::data_parallel::DEFAULT_BUCKET_MIB;
use dits::distributed::world::{DistKind, WorldSpec};
use dits::train::recipe::{ModelOverrides, TrainOverrides};
use dits::train::run_dir::DEFAULT_RUN_DIR;
use dits::train::{self, Interrupted, ResumeFlags, Start, TrainOptions};

#[derive(Parser)]
#[command(name = "dits", version, about = "Train, sample and benchmark class-conditional Diffusion Transformers")]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a DiT (flow matching or DDPM) on MNIST-style IDX files, an image folder, a CSV of
    /// files and labels or CIFAR-10 batches; ends with samples in RUN_DIR/final/.
    #[command(after_help = "Examples:\n  \
        dits train --out runs/mnist                        # 10 minutes on the shipped MNIST\n  \
        dits train --data ../shared/data/fashion-mnist --out runs/fashion --minutes 30\n  \
        dits train --resume runs/mnist --steps 40000       # continue a run, longer")]
    Train(Box<TrainArgs>),
    /// Generate images with a trained model.
    #[command(after_help = "Examples:\n  \
        dits sample --checkpoint runs/mnist --out samples\n  \
        dits sample --checkpoint runs/mnist --out sevens --classes 7 --per-class 64 --seed 1")]
    Sample(SampleArgs),
    /// Score samples: accuracy of the intended class and FID-CNN, with a classifier trained
    /// on the real data.
    #[command(after_help = "Examples:\n  \
        dits eval runs/mnist                               # draw 2,000 images and score them\n  \
        dits eval samples                                  # score a folder dits sample wrote")]
    Eval(EvalArgs),
    /// Measure training and sampling throughput.
    #[command(after_help = "Examples:\n  \
        dits bench                                         # mnist-dits, batch 256\n  \
        dits bench --model dit-s4 --batch 64 --profile 20  # where a step's time goes")]
    Bench(BenchArgs),
    /// Serve a trained model over HTTP: a page to draw from, `GET /sample` for PNGs, `GET /health`.
    #[command(after_help = "Examples:\n  \
        dits serve --checkpoint runs/mnist                 # http://127.0.0.1:8000/\n  \
        curl -o sevens.png 'http://127.0.0.1:8000/sample?class=7&n=16&seed=1&steps=20&cfg=1.5'\n  \
        dits serve --checkpoint runs/mnist --host 0.0.0.0 --port 8080 --max-images 16")]
    Serve(ServeArgs),
    /// Show a run or checkpoint: recipe, step, loss, data and its checksum, grids, evaluations.
    #[command(after_help = "Examples:\n  \
        dits info runs/mnist\n  \
        dits info runs/mnist/checkpoints/step-00001000 --json")]
    Info(InfoArgs),
    /// Print a shell completion script.
    #[command(after_help = "Examples:\n  \
        dits completions bash > ~/.local/share/bash-completion/completions/dits\n  \
        dits completions zsh > ~/.zfunc/_dits")]
    Completions(CompletionsArgs),
}

#[derive(Args)]
struct InfoArgs {
    /// A run directory or one of its checkpoints.
    run: PathBuf,
    /// Print the information as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct CompletionsArgs {
    /// The shell: bash, elvish, fish, powershell or zsh.
    shell: clap_complete::Shell,
}

#[derive(Args)]
struct EvalArgs {
    /// Directory of samples named <class>_<index>.png (other files are ignored), or a run or
    /// checkpoint directory: then --per-class images per class are drawn with the default
    /// sampler first (into a temporary directory) and scored.
    samples: PathBuf,
    /// Images per class drawn from a checkpoint (N = 2,000 for ten classes).
    #[arg(long, default_value_t = 200)]
    per_class: usize,
    /// The data set the samples imitate [default: a checkpoint's own data, or the data named
    /// in the samples.json `dits sample` wrote, else the shipped MNIST].
    #[command(flatten)]
    data: dits::data::DataArgs,
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
    /// Compute device: auto picks a GPU backend compiled into this build whose device answers,
    /// else the CPU, and says which.
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceKind,
    /// burn's composed operations instead of the fused CPU kernels: the path of bf16/fp16 and of
    /// the GPU backends, to compare a GPU run with the CPU or measure what the kernels save.
    #[arg(long)]
    composed: bool,
}

impl Common {
    /// Sizes the thread pool and chooses the kernels; returns the thread count.
    fn apply(&self) -> anyhow::Result<usize> {
        dits::kernels::set_fused(!self.composed);
        init_threads(self.threads)
    }
}

#[derive(Args, Clone)]
struct TrainArgs {
    #[command(flatten)]
    data: dits::data::DataArgs,
    #[command(flatten)]
    loader: dits::data::loader::LoaderArgs,
    /// Run directory for checkpoints, metrics.jsonl and loss.png.
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
    /// At the end of the run, do not draw its samples (10 per class, as `dits sample`) into
    /// RUN_DIR/final/.
    #[arg(long)]
    no_final_samples: bool,
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
    #[arg(long, value_enum, default_value_t = DistKind::None)]
    dist: DistKind,
    /// Ranks of `--dist devices`.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
    ranks: Option<u64>,
    /// Tensor parallelism (Megatron-LM): split every block's heads and MLP columns over groups of
    /// T consecutive ranks (with --dist mpi); the other factor of the world is data-parallel.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    tp: u64,
    /// Sequence parallelism (DeepSpeed-Ulysses): split every image's tokens over groups of S
    /// ranks (with --dist mpi); S must divide the token and head counts.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    sp: u64,
    /// Pipeline parallelism (GPipe/1F1B): split the blocks into P stages of consecutive blocks
    /// over groups of P ranks (with --dist mpi; embeddings with the first stage, final layer with
    /// the last); --micro-batches M cuts each rank's batch into the micro-batches that flow
    /// through them. The other factor of the world is data-parallel.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pp: u64,
    /// ZeRO stage (DeepSpeed): 0 (every rank keeps everything), 1 (each keeps its shard of the
    /// optimizer state), 2 (and of the gradients), 3 (and of the weights, gathered block by block).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=3))]
    zero: u8,
    /// Gradient all-reduce bucket size in MiB.
    #[arg(long, default_value_t = DEFAULT_BUCKET_MIB, value_parser = clap::value_parser!(u64).range(1..=4096))]
    bucket_mb: u64,
}

#[derive(Args)]
struct SampleArgs {
    /// A run directory, checkpoint directory, .safetensors file, or mnist-dits PyTorch .pth.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Output directory for <class>_<index>.png, grid.png and process.png.
    #[arg(long)]
    out: PathBuf,
    /// Comma-separated classes, by id or by name (as the data set names them) [default: all].
    #[arg(long, value_delimiter = ',')]
    classes: Option<Vec<String>>,
    /// Images per class.
    #[arg(long, default_value_t = 10)]
    per_class: usize,
    /// Sampler: ddpm (ancestral), ddim (with --eta), euler (= ddim, η 0), accelerated
    /// (γ 2, μ 0), gen (smalldiffusion's generalised sampler, --gamma and --mu), dpmpp-2m
    /// (DPM-Solver++(2M), second order, one model call a step), heun (second order, two calls a
    /// step: 10 Heun steps cost 19 calls).
    #[arg(long, value_enum, default_value_t = dits::sample::DEFAULT_SAMPLER)]
    sampler: SamplerKind,
    /// Denoising steps, on trailing levels (ddpm 1000 with --clip xt = mnist-dits).
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
    /// (needs a model trained with --label-dropout; models without a null label: 1).
    #[arg(long)]
    cfg_scale: Option<f64>,
    /// Guide only at noise levels with σ (noise/signal) in LO,HI; 0,inf guides every step.
    #[arg(long, value_name = "LO,HI", value_parser = dits::diffusion::guidance::parse_interval)]
    cfg_interval: Option<(f64, f64)>,
    /// Images denoised together.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Model preset for weight files without a config (PyTorch .pth).
    #[arg(long, default_value = ModelOverrides::DEFAULT_PRESET)]
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
struct ServeArgs {
    /// A run directory, checkpoint directory, .safetensors file, or mnist-dits PyTorch .pth.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Address to listen on (0.0.0.0: every interface).
    #[arg(long)]
    host: Option<String>,
    /// Port (0: any free one; the address is printed).
    #[arg(long)]
    port: Option<u16>,
    /// Images one request may ask for (n).
    #[arg(long)]
    max_images: Option<usize>,
    /// Sampling steps one request may ask for (at most the schedule's levels).
    #[arg(long)]
    max_steps: Option<usize>,
    /// Images drawn together in one chain: requests of several clients share it.
    #[arg(long)]
    max_batch: Option<usize>,
    /// Images that may wait; requests beyond it are answered 503 (busy).
    #[arg(long, value_name = "IMAGES")]
    queue: Option<usize>,
    /// Seconds a request may wait for its images before it is answered 503.
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<f64>,
    /// Open connections at most (more clients wait to be accepted).
    #[arg(long)]
    max_connections: Option<usize>,
    /// Model preset for weight files without a config (PyTorch .pth).
    #[arg(long, default_value = ModelOverrides::DEFAULT_PRESET)]
    model: String,
    /// Weights of a checkpoint to use: the moving average or the raw weights.
    #[arg(long, value_enum, default_value = "ema")]
    weights: dits::sample::WeightsKind,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct BenchArgs {
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Micro-batches of a training step, computed in parallel [default: as `dits train` cuts
    /// the batch: 2, or about 64 images each from batch 192 on].
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
    /// Precision of the training step (the forward is timed in fp32).
    #[arg(long, value_enum, default_value = "fp32")]
    precision: dits::train::precision::Precision,
    /// Then profile this many training steps: thread time per phase and per fused kernel.
    #[arg(long, value_name = "STEPS", num_args = 0..=1, default_missing_value = "10")]
    profile: Option<usize>,
    #[command(flatten)]
    common: Common,
}

fn main() -> ExitCode {
    dits::device::prepare_environment();
    dits::memory::keep_freed_memory();
    if let Err(e) = dits::kernels::isa::requested() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
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
    let cli = Cli::from_arg_matches(&with_defaults(Cli::command()).get_matches()).unwrap_or_else(|e| e.exit());
    let result = match cli.command {
        Command::Train(a) => train_cmd(*a),
        Command::Sample(a) => sample_cmd(a),
        Command::Eval(a) => eval_cmd(a),
        Command::Bench(a) => bench_cmd(a),
        Command::Serve(a) => serve_cmd(a),
        Command::Info(a) => dits::info::describe(&a.run, true).and_then(|i| {
            if a.json {
                println!("{}", serde_json::to_string_pretty(&i)?);
            } else {
                print!("{i}");
            }
            Ok(())
        }),
        Command::Completions(a) => {
            clap_complete::generate(a.shell, &mut with_defaults(Cli::command()), "dits", &mut std::io::stdout());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<dits::collective::Reported>().is_some() => ExitCode::FAILURE,
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

/// The command line with the defaults that live in the library shown in `--help`: the
/// recipe's, the run directory's and the sampler's.
fn with_defaults(cmd: clap::Command) -> clap::Command {
    let show = |mut c: clap::Command, defaults: Vec<(&'static str, String)>| {
        for (id, value) in defaults {
            c = c.mut_arg(id, |a| {
                let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
                a.help(format!("{help} [default: {value}]"))
            });
        }
        c
    };
    let mut train = TrainOverrides::defaults();
    train.extend([("out", DEFAULT_RUN_DIR.to_string()), ("preset", ModelOverrides::DEFAULT_PRESET.to_string())]);
    let (lo, hi) = dits::sample::DEFAULT_CFG_INTERVAL;
    let sample = vec![
        ("steps", dits::sample::DEFAULT_STEPS.to_string()),
        ("cfg_scale", format!("{} with a null label", dits::sample::DEFAULT_CFG_SCALE)),
        ("cfg_interval", format!("{lo},{hi}")),
    ];
    let d = dits::serve::ServeOptions::new(PathBuf::new(), burn::prelude::Device::flex());
    let serve = vec![
        ("host", d.host),
        ("port", d.port.to_string()),
        ("max_images", d.max_images.to_string()),
        ("max_steps", d.max_steps.to_string()),
        ("max_batch", d.max_batch.to_string()),
        ("queue", d.queue.to_string()),
        ("timeout", d.timeout.as_secs_f64().to_string()),
        ("max_connections", d.max_connections.to_string()),
    ];
    cmd.mut_subcommand("train", |c| show(c, train))
        .mut_subcommand("sample", |c| show(c, sample))
        .mut_subcommand("serve", |c| show(c, serve))
}

fn train_cmd(a: TrainArgs) -> anyhow::Result<()> {
    let threads = a.common.apply()?;
    anyhow::ensure!(a.loader.decode_threads > 0, "--decode-threads must be at least 1");
    let spec = WorldSpec {
        dist: a.dist.dist,
        ranks: a.dist.ranks,
        zero: a.dist.zero,
        tp: a.dist.tp as usize,
        sp: a.dist.sp as usize,
        pp: a.dist.pp as usize,
        bucket_mib: a.dist.bucket_mb,
        device: a.common.device,
    };
    let world = spec.build()?;
    let run_dir = a.resume.clone().or(a.out.clone()).unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_DIR));
    let start = match a.resume {
        Some(_) => Start::Resume(ResumeFlags { out: a.out, data: a.data, model: a.model, train: a.train }),
        None => Start::new_run(a.data, a.config.as_deref(), a.model, a.train)?,
    };
    let progress = !a.no_progress && std::io::stderr().is_terminal();
    // `--eval-every`: the judge is made ready (trained once per data set, if not cached) before
    // the run starts, so that no evaluation stops the run for minutes.
    // Only the lead rank evaluates (and may be the only one that sees the run directory).
    let is_lead = match &world {
        dits::distributed::world::World::Process(grid, _) => grid.is_lead(),
        dits::distributed::world::World::Threads(_) => true,
    };
    let judged = match &start {
        _ if !is_lead => None,
        Start::New { data, train, .. } => (train.eval_every > 0).then(|| data.clone()),
        Start::Resume(flags) => {
            let state = dits::train::checkpoint::read_state(&dits::train::checkpoint::resolve(&run_dir)?)?;
            let every = flags.train.eval_every.unwrap_or(state.train.eval_every);
            (every > 0).then(|| state.data_source())
        }
    };
    // Where the lead rank samples and judges: its training device.
    let eval_device = match &world {
        dits::distributed::world::World::Process(_, device) => device.clone(),
        dits::distributed::world::World::Threads(ranks) => ranks[0].1.clone(),
    };
    // Prepared once: its features of the real images are most of an evaluation's work.
    let judge = match &judged {
        Some(data) => {
            let opts = dits::eval::EvalOptions {
                samples: PathBuf::new(),
                data: data.clone(),
                cache_dir: dits::eval::default_cache_dir(),
                seed: 0,
                progress,
                device: eval_device.clone(),
            };
            Some(std::sync::Arc::new(dits::eval::Judge::prepare(&opts)?))
        }
        None => None,
    };
    let spent = std::sync::Arc::new(std::sync::Mutex::new((0usize, 0f64)));
    let hook_spent = spent.clone();
    let hook_device = eval_device.clone();
    let hook = train::CheckpointHook(std::sync::Arc::new(move |e: &train::CheckpointEvent| {
        if e.evaluate {
            // The hook evaluates on the lead rank, which prepared the judge above.
            let judge =
                judge.as_deref().ok_or_else(|| anyhow::anyhow!("an evaluation on a rank without the run's judge"))?;
            let seconds = evaluate_checkpoint(e, &hook_device, judge)?;
            let mut spent = hook_spent.lock().expect("eval time");
            spent.0 += 1;
            spent.1 += seconds;
        }
        dits::report::write(e.run_dir).map(drop)
    }));
    let s = train::launch(world, |grid, device| TrainOptions {
        run_dir: run_dir.clone(),
        start: start.clone(),
        stop_after: a.stop_after,
        keep: a.keep,
        progress,
        device,
        grid,
        detect_anomaly: a.detect_anomaly,
        loader: a.loader,
        on_checkpoint: Some(hook.clone()),
    })?;
    if s.rank == 0 {
        let ranks = if s.ranks > 1 { format!("{} ranks × ", s.ranks) } else { String::new() };
        println!(
            "trained to step {} in {:.1}s ({:.1} samples/s, {ranks}{threads} threads), final loss {:.4}; checkpoint {}",
            s.steps,
            s.elapsed_s,
            s.samples_per_s,
            s.final_loss,
            s.checkpoint.display()
        );
        let (evals, seconds) = *spent.lock().expect("eval time");
        if evals > 0 {
            println!(
                "judged the moving average {evals} times in {seconds:.1} s ({:.1}% of the run's {:.1} s); figures in {}",
                100.0 * seconds / s.elapsed_s.max(1e-9),
                s.elapsed_s,
                run_dir.join(dits::eval::record::EVALS_FILE).display()
            );
        }
        if s.steps == s.total_steps && !a.no_final_samples {
            final_samples(&run_dir, eval_device, progress)?;
        }
        println!("report: {}", dits::report::write(&run_dir)?.display());
    }
    Ok(())
}

/// Samples drawn and judged per evaluation during a run (divided among the classes).
const IN_RUN_EVAL_SAMPLES: usize = 500;

/// `--eval-every`: the checkpoint's moving average judged on a small sample set, recorded in
/// metrics.jsonl and evals.jsonl; returns the seconds it took.
fn evaluate_checkpoint(
    e: &train::CheckpointEvent,
    device: &burn::prelude::Device,
    judge: &dits::eval::Judge,
) -> anyhow::Result<f64> {
    let began = std::time::Instant::now();
    let state = dits::train::checkpoint::read_state(e.checkpoint)?;
    let per_class = (IN_RUN_EVAL_SAMPLES / state.model.classes.max(1)).max(1);
    let dir = std::env::temp_dir().join(format!("dits-eval-{}-{}", std::process::id(), e.step));
    let _drawn = TempDir(dir.clone());
    let opts = dits::sample::SampleOptions {
        per_class,
        force: true,
        ..dits::sample::SampleOptions::new(e.checkpoint.to_path_buf(), dir.clone(), device.clone())
    };
    dits::sample::run(opts)?;
    let r = judge.score_dir(&dir)?;
    let seconds = began.elapsed().as_secs_f64();
    let figures = dits::train::metrics::EvalFigures {
        samples: r.samples,
        accuracy: r.accuracy,
        min_class_accuracy: r.min_class_accuracy,
        fid: r.fid,
        fid_floor: r.fid_floor,
        fid_ratio: r.fid_ratio,
        seconds,
    };
    dits::train::metrics::append_eval(e.run_dir, &dits::train::metrics::EvalLine { step: e.step, eval: figures })?;
    let record =
        dits::eval::record::RunEval { step: e.step, checkpoint: e.checkpoint.to_path_buf(), report: r.clone() };
    dits::eval::record::append(e.run_dir, &record)?;
    tracing::info!(
        "step {}: {} samples judged in {seconds:.1} s: accuracy {:.4} (lowest class {:.4}), FID-CNN {:.3} ({:.2}× the floor)",
        e.step,
        r.samples,
        r.accuracy,
        r.min_class_accuracy,
        r.fid,
        r.fid_ratio
    );
    Ok(seconds)
}

/// The finished run's samples as `dits sample` draws them by default, in RUN_DIR/final/.
fn final_samples(run_dir: &std::path::Path, device: burn::prelude::Device, progress: bool) -> anyhow::Result<()> {
    let out = run_dir.join("final");
    let opts = dits::sample::SampleOptions {
        // The run's own folder: a resumed run's end replaces what an earlier end drew.
        force: true,
        progress,
        ..dits::sample::SampleOptions::new(run_dir.to_path_buf(), out.clone(), device)
    };
    let s = dits::sample::run(opts)?;
    println!(
        "samples: {} ({} images and process.png beside it; `dits eval {}` scores the model)",
        out.join("grid.png").display(),
        s.images,
        run_dir.display()
    );
    Ok(())
}

fn sample_cmd(a: SampleArgs) -> anyhow::Result<()> {
    a.common.apply()?;
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
        device: dits::device::device(a.common.device)?,
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

fn serve_cmd(a: ServeArgs) -> anyhow::Result<()> {
    a.common.apply()?;
    let d = dits::serve::ServeOptions::new(a.checkpoint, dits::device::device(a.common.device)?);
    let timeout = match a.timeout {
        None => d.timeout,
        Some(s) => std::time::Duration::try_from_secs_f64(s)
            .ok()
            .filter(|t| !t.is_zero())
            .ok_or_else(|| anyhow::anyhow!("--timeout must be a positive number of seconds, got {s}"))?,
    };
    let opts = dits::serve::ServeOptions {
        weights: a.weights,
        preset: a.model,
        host: a.host.unwrap_or(d.host.clone()),
        port: a.port.unwrap_or(d.port),
        max_images: a.max_images.unwrap_or(d.max_images),
        max_steps: a.max_steps.unwrap_or(d.max_steps),
        max_batch: a.max_batch.unwrap_or(d.max_batch),
        queue: a.queue.unwrap_or(d.queue),
        timeout,
        max_connections: a.max_connections.unwrap_or(d.max_connections),
        ..d
    };
    let s = dits::serve::run(opts, |addr| {
        // The first line of stdout: scripts and tests read the address (and the port, with --port 0) here.
        println!("listening on http://{addr}/ (GET /sample?class=0&n=16, /health; SIGTERM or Ctrl-C stops)");
    })?;
    let c = s.counters;
    println!(
        "stopped after {:.1} s: served {} requests ({} images in {} batches), {} busy, {} abandoned, {} failed",
        s.seconds, c.served, c.images, c.batches, c.busy, c.abandoned, c.failed
    );
    Ok(())
}

/// A run or checkpoint directory (rather than a directory of samples).
fn is_checkpoint(path: &std::path::Path) -> bool {
    path.join("state.json").is_file() || path.join("checkpoints").is_dir()
}

fn eval_cmd(a: EvalArgs) -> anyhow::Result<()> {
    a.common.apply()?;
    let progress = !a.no_progress && std::io::stderr().is_terminal();
    let device = dits::device::device(a.common.device)?;
    // A checkpoint is sampled first, with `dits sample`'s defaults, into a directory removed after.
    let mut drawn = None;
    // The run and step of a checkpoint evaluated, where its figures are recorded.
    let mut judged = None;
    let mut data = if a.data.data.is_some() || a.data.has_options() { Some(a.data.source()?) } else { None };
    let samples = if is_checkpoint(&a.samples) {
        let ckpt = dits::train::checkpoint::resolve(&a.samples)?;
        let state: dits::train::RunState = serde_json::from_slice(&std::fs::read(ckpt.join("state.json"))?)?;
        data = data.or_else(|| Some(state.data_source()));
        let run_dir =
            ckpt.parent().filter(|p| p.ends_with(dits::train::checkpoint::CHECKPOINTS_DIR)).and_then(|p| p.parent());
        judged = run_dir.map(|r| (r.to_path_buf(), ckpt.clone(), state.step));
        let dir = std::env::temp_dir().join(format!("dits-eval-{}", std::process::id()));
        let opts = dits::sample::SampleOptions {
            per_class: a.per_class,
            seed: a.seed,
            force: true,
            progress,
            ..dits::sample::SampleOptions::new(a.samples.clone(), dir.clone(), device.clone())
        };
        let s = dits::sample::run(opts)?;
        eprintln!("drew {} images from {} ({:.1} images/s)", s.images, ckpt.display(), s.images_per_s);
        drawn = Some(TempDir(dir.clone()));
        dir
    } else {
        // Samples of `dits sample` name their model's data.
        if data.is_none() {
            data = dits::sample::SamplesRecord::read(&a.samples)?.and_then(|r| r.data);
        }
        a.samples.clone()
    };
    let opts = dits::eval::EvalOptions {
        samples,
        data: match data {
            Some(d) => d,
            None => a.data.source()?,
        },
        cache_dir: a.cache.unwrap_or_else(dits::eval::default_cache_dir),
        seed: a.seed,
        progress,
        device,
    };
    let r = dits::eval::run(&opts)?;
    drop(drawn);
    if let Some((run_dir, checkpoint, step)) = judged {
        let record = dits::eval::record::RunEval { step, checkpoint, report: r.clone() };
        dits::eval::record::append(&run_dir, &record)?;
        dits::report::write(&run_dir)?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "{} samples: accuracy {:.4} (lowest class {:.4}), mean confidence {:.4}",
        r.samples, r.accuracy, r.min_class_accuracy, r.mean_confidence
    );
    println!(
        "FID-CNN {:.3}  (floor {:.3}: {} real training images vs the test split; {:.2}× the floor)",
        r.fid, r.fid_floor, r.samples, r.fid_ratio
    );
    println!("class  count  accuracy  FID-CNN  floor   ×floor");
    for c in &r.per_class {
        println!(
            "{:>5}  {:>5}  {:>8.4}  {:>7.3}  {:>6.3}  {:>6.2}",
            c.class,
            c.count,
            c.accuracy,
            c.fid,
            c.fid_floor,
            c.fid / c.fid_floor.max(1e-12)
        );
    }
    let m = &r.memorisation;
    println!(
        "near-copies of training images: {:.1}% of samples (real test images: {:.1}%; threshold {:.3} in the judge's features)",
        100.0 * m.share,
        100.0 * m.reference_share,
        m.threshold
    );
    println!("classifier: test accuracy {:.4}, {}", r.classifier_test_accuracy, r.classifier.display());
    Ok(())
}

/// A directory removed when dropped (the samples `dits eval` drew from a checkpoint).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn bench_cmd(a: BenchArgs) -> anyhow::Result<()> {
    let threads = a.common.apply()?;
    let model = a.model.resolve()?;
    let name = a.model.preset.clone().unwrap_or_else(|| ModelOverrides::DEFAULT_PRESET.into());
    let kind = dits::device::resolve(a.common.device)?;
    let opts = dits::bench::BenchOptions {
        model,
        batch: a.batch,
        micro_batches: a.micro_batches,
        warmup: a.warmup,
        iters: a.iters,
        profile_steps: a.profile.unwrap_or(0),
        device: dits::device::device(kind)?,
        precision: a.precision,
    };
    let r = dits::bench::run(&opts)?;
    println!(
        "model={name} params={} batch={} micro_batches={} threads={threads} device={kind} precision={} kernels={}",
        r.params,
        a.batch,
        r.micro_batches,
        dits::train::recipe::value_name(a.precision),
        if a.common.composed || kind != DeviceKind::Cpu { "composed" } else { "fused" }
    );
    let line = |what: &str, s: dits::bench::Stats| {
        println!("{what}: median {:.2} ms (min {:.2}, max {:.2}) over {} iterations", s.median, s.min, s.max, a.iters)
    };
    line("train step (forward+backward+adam)", r.train_step_ms);
    line("sampling forward (no grad)", r.forward_ms);
    let f = r.achieved;
    let folded = if f.executed_flops < f.written_flops {
        format!(" as executed, attention folded; {:.1} as written", f.written_flops / 1e6)
    } else {
        String::new()
    };
    println!(
        "achieved: train {:.1} GFLOP/s, sampling {:.1} GFLOP/s ({:.1} MFLOP per image forward{folded}, matmuls only); peak RSS {}",
        f.train_gflops,
        f.sample_gflops,
        f.executed_flops / 1e6,
        dits::memory::peak_rss_bytes().map_or("unknown".into(), |b| format!("{} MiB", b >> 20))
    );
    if let Some(probed) = r.peak {
        let peak = probed.peak;
        let moved = if probed.host_moved() {
            format!(
                "; highest of {} probes, the lowest {:.1}: the host's speed moved, so the shares are rough",
                probed.probes, probed.lowest_gflops
            )
        } else {
            String::new()
        };
        println!(
            "cpu: {}, L2 {} per core; {}; FMA peak {:.1} GFLOP/s measured ({} threads, {}{moved}): train {:.0}%, sampling {:.0}% of it",
            dits::bench::cpu_model(),
            dits::kernels::cache::l2_bytes().map_or("unknown".into(), |b| format!("{} KiB", b >> 10)),
            dits::kernels::isa::describe(),
            peak.gflops,
            peak.threads,
            peak.isa.label(),
            100.0 * f.train_gflops / peak.gflops,
            100.0 * f.sample_gflops / peak.gflops
        );
    }
    fn by_engine<E: std::fmt::Debug>(what: &str, rates: &[dits::bench::EngineRate<E>]) {
        if !rates.is_empty() {
            let rates: Vec<String> = rates
                .iter()
                .map(|e| format!("{:?} {:.1}{}", e.engine, e.gflops, if e.chosen { " (used)" } else { "" }))
                .collect();
            println!("{what}, GFLOP/s by engine: {}", rates.join(", "));
        }
    }
    by_engine("attention products, forward+backward", &r.attention);
    by_engine("MLP Linears, backward", &r.linear_backward);
    if let Some(p) = &r.profile {
        print!("{p}");
    }
    println!("train_samples_per_s={:.1}", r.train_samples_per_s);
    println!("sample_images_per_s={:.1}", r.sample_images_per_s);
    Ok(())
}
