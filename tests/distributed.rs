//! Multi-process training under `mpirun` (OpenMPI, over loopback on this machine): data
//! parallelism and ZeRO-1 give the weights of a one-process run with the same global batch.
//!
//! Built with `--features mpi` only; `mpirun` must be on the PATH (`.ci/run` installs OpenMPI).
#![cfg(feature = "mpi")]

mod common;

use std::path::Path;
use std::process::{Command, Output};

use safetensors::SafeTensors;

/// The run under test: 4 steps of a global batch of 7 (split 4 + 3 over two ranks, 3 + 2 + 2
/// over three), no label dropout, full learning rate from the first step (no warm-up), so that
/// the weights move well beyond the tolerance (up to 5e-4 a step).
/// The learning rate of [`train_args`].
const LR: f32 = 5e-4;

fn train_args(out: &str, steps: u64) -> Vec<String> {
    let steps = steps.to_string();
    let recipe = ["--steps", &steps, "--batch", "7", "--checkpoint-every", "2", "--label-dropout", "0"];
    let rest = ["--warmup-steps", "0", "--lr", &LR.to_string(), "--threads", "1", "--no-progress", "--log-every", "1"];
    common::train_args(out, &[&recipe[..], &rest].concat())
}

fn run(cmd: &mut Command) -> String {
    let out: Output = cmd.output().expect("starting the command (is OpenMPI's mpirun installed?)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "command failed:\n{text}");
    text
}

fn dits(dir: &Path, args: &[String]) -> String {
    run(Command::new(env!("CARGO_BIN_EXE_dits")).args(common::without_pictures(args)).current_dir(dir))
}

/// `mpirun -np N dits ARGS --dist mpi`, every rank on this machine, over shared memory.
fn mpirun(dir: &Path, ranks: usize, args: &[String]) -> String {
    mpirun_over(dir, ranks, args, "self,vader")
}

/// [`mpirun`] with the byte transport `btl`: `self,vader` (shared memory, no network probing)
/// or `tcp,self` (what runs between machines; here over the loopback interface).
fn mpirun_over(dir: &Path, ranks: usize, args: &[String], btl: &str) -> String {
    let mut cmd = Command::new("mpirun");
    // Root in CI containers; oversubscription: more ranks than the two cores.
    cmd.args(["--allow-run-as-root", "--oversubscribe", "-np", &ranks.to_string()]);
    cmd.arg(env!("CARGO_BIN_EXE_dits")).args(common::without_pictures(args)).args(["--dist", "mpi"]).current_dir(dir);
    cmd.env("OMPI_MCA_btl", btl).env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
    cmd.env("OMPI_MCA_btl_tcp_if_include", "lo").env("OMPI_MCA_oob_tcp_if_include", "lo");
    run(&mut cmd)
}

fn with(mut args: Vec<String>, extra: &[&str]) -> Vec<String> {
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// The tensors of a safetensors file, by name, as floats.
fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = file.names().into_iter().map(str::to_string).collect();
    names.sort();
    let floats = |t: safetensors::tensor::TensorView| -> Vec<f32> {
        t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    };
    names.into_iter().map(|n| (n.clone(), floats(file.tensor(&n).unwrap()))).collect()
}

/// The element-wise differences of two files with the same tensors, with each tensor's values
/// in `a`.
fn differences(a: &Path, b: &Path) -> Vec<(String, Vec<f32>, Vec<f32>)> {
    let (a, b) = (tensors(a), tensors(b));
    let names = |t: &[(String, Vec<f32>)]| t.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&a), names(&b), "different tensors");
    a.into_iter()
        .zip(b)
        .map(|((name, x), (_, y))| {
            assert_eq!(x.len(), y.len(), "{name}: different sizes");
            let d = x.iter().zip(&y).map(|(p, q)| (p - q).abs()).collect();
            (name, d, x)
        })
        .collect()
}

fn max_of(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

fn checkpoint_file(dir: &Path, run: &str, step: u64, file: &str) -> std::path::PathBuf {
    dir.join(run).join(format!("checkpoints/step-{step:08}/{file}.safetensors"))
}

/// Two runs that compute the same sums in the same order: their checkpoints at `step` (weights,
/// moving average and Adam's moments) are equal within 1e-5. Returns the largest difference.
fn assert_same_checkpoint(dir: &Path, a: &str, b: &str, step: u64) -> f32 {
    let mut worst = 0f32;
    for file in ["model", "ema", "optimizer"] {
        let diffs = differences(&checkpoint_file(dir, a, step, file), &checkpoint_file(dir, b, step, file));
        let d = diffs.iter().map(|(_, d, _)| max_of(d)).fold(0f32, f32::max);
        assert!(d <= 1e-5, "{a} vs {b}, {file}: max |Δ| = {d}");
        worst = worst.max(d);
    }
    worst
}

/// Two runs of the same steps whose sums are grouped differently (split over tensor or sequence
/// ranks, computed piece by piece, the batch cut another way): equal up to float rounding.
///
/// Adam's moments carry the gradients themselves, so they must agree to rounding: within 1e-5 of
/// each tensor's largest value. The weights must agree within 1e-5 too, except where Adam
/// amplifies the rounding: its step is `lr·m̂/(√v̂ + ε)`, and an element whose gradient happens to
/// be near ε = 1e-8 turns a rounding difference of 1e-10 in it into a difference of a good part
/// of `lr` in the step (seen on 5 of 16,384 elements of a query projection after one step). Those
/// may be at most one element in a thousand, and each within the 2·lr a step can move it.
/// Returns the largest difference of the moments relative to their scale.
fn assert_equivalent_checkpoint(dir: &Path, a: &str, b: &str, step: u64) -> f32 {
    let path = |run: &str, file: &str| checkpoint_file(dir, run, step, file);
    let mut worst = 0f32;
    for (name, d, values) in differences(&path(a, "optimizer"), &path(b, "optimizer")) {
        let rel = max_of(&d) / max_of(&values).max(f32::MIN_POSITIVE);
        assert!(rel <= 1e-5, "{a} vs {b}, Adam's {name}: max |Δ| = {rel} of its largest value");
        worst = worst.max(rel);
    }
    let moved_bound = 2.0 * LR * step as f32;
    for file in ["model", "ema"] {
        let diffs = differences(&path(a, file), &path(b, file));
        let total: usize = diffs.iter().map(|(_, d, _)| d.len()).sum();
        let apart = diffs.iter().map(|(_, d, _)| d.iter().filter(|&&x| x > 1e-5).count()).sum::<usize>();
        let (largest, at) = diffs
            .iter()
            .map(|(n, d, _)| (max_of(d), n))
            .fold((0f32, ""), |m, (d, n)| if d > m.0 { (d, n.as_str()) } else { m });
        assert!(
            apart * 1000 <= total && largest <= moved_bound,
            "{a} vs {b}, {file}: {apart} of {total} elements differ by more than 1e-5, the most {largest} ({at})"
        );
    }
    worst
}

/// Both families, small: mnist-dits as shipped, and the DiT-paper family at depth 2.
const FAMILIES: [(&str, &[&str]); 2] =
    [("mnist-dits", &["--model", "mnist-dits"]), ("dit-s4", &["--model", "dit-s4", "--depth", "2"])];

/// [`train_args`] of 4 steps for `model`, the batch cut into `parts` micro-batches.
fn family_args(name: &str, model: &[&str], parts: &str) -> Vec<String> {
    with(with(train_args(name, 4), model), &["--micro-batches", parts])
}

fn toy_data(dir: &Path) {
    common::write_toy_dataset(&dir.join("data"), 40);
}

/// One rank whose batch is split in the same parts as the ranks' shards computes the same sums
/// in the same order: DDP and ZeRO-1 must give its weights (here, bit for bit).
#[test]
fn two_and_three_ranks_equal_one_rank_with_the_same_global_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    toy_data(dir);
    for (ranks, parts) in [(2, "2"), (3, "3")] {
        let reference = format!("one-rank-{parts}-parts");
        dits(dir, &with(train_args(&reference, 4), &["--micro-batches", parts]));
        let ddp = format!("ddp-{ranks}");
        let text = mpirun(dir, ranks, &with(train_args(&ddp, 4), &["--micro-batches", "1"]));
        assert!(text.contains(&format!("{ranks} ranks")), "{text}");
        let zero = format!("zero1-{ranks}");
        mpirun(dir, ranks, &with(train_args(&zero, 4), &["--micro-batches", "1", "--zero", "1"]));
        for step in [2, 4] {
            let d = assert_same_checkpoint(dir, &reference, &ddp, step);
            eprintln!("{ranks} ranks, DDP, step {step}: max |Δ| = {d}");
            let d = assert_same_checkpoint(dir, &reference, &zero, step);
            eprintln!("{ranks} ranks, ZeRO-1, step {step}: max |Δ| = {d}");
        }
        // Only rank 0 wrote: one metrics line per step, not one per rank.
        let metrics = std::fs::read_to_string(dir.join(&ddp).join("metrics.jsonl")).unwrap();
        assert_eq!(metrics.lines().count(), 4, "{metrics}");
    }
}

/// ZeRO-2 (gradients reduce-scattered piece by piece) and ZeRO-3 (weights gathered block by
/// block, blocks recomputed in the backward) on two and three ranks give the weights, moving
/// average and optimizer state of the same stage on one process with the same micro-batches,
/// for both families, and the one-process run of the whole graph up to rounding (burn orders a
/// backward by each node's depth from the graph's leaves, and a piece's inputs are leaves of
/// its own graph, so a gradient with several terms may sum them in another order); a ZeRO-3
/// checkpoint resumes on one process and a one-process checkpoint on ZeRO-2 ranks.
#[test]
fn zero_two_and_three_equal_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    toy_data(dir);
    for (family, model) in FAMILIES {
        let args = |name: &str, parts: &str| family_args(name, model, parts);
        for (ranks, parts) in [(2, "2"), (3, "3")] {
            let whole = format!("{family}-one-{parts}");
            dits(dir, &args(&whole, parts));
            for zero in ["2", "3"] {
                let one = format!("{family}-zero{zero}-one-{parts}");
                mpirun(dir, 1, &with(args(&one, parts), &["--zero", zero]));
                let name = format!("{family}-zero{zero}-{ranks}");
                let text = mpirun(dir, ranks, &with(args(&name, "1"), &["--zero", zero]));
                assert!(text.contains(&format!("ZeRO-{zero}")), "{text}");
                for step in [2, 4] {
                    let d = assert_same_checkpoint(dir, &one, &name, step);
                    eprintln!("{family}, {ranks} ranks, ZeRO-{zero}, step {step}: max |Δ| = {d}");
                    let d = assert_equivalent_checkpoint(dir, &whole, &name, step);
                    eprintln!("{family}, {ranks} ranks, ZeRO-{zero} vs the whole graph, step {step}: moments {d:e}");
                }
            }
        }
    }
    // Across layouts: ZeRO-3 on three ranks, then one process; one process, then ZeRO-2 on two.
    let resume = |name: &str| vec!["train".into(), "--resume".into(), name.into(), "--threads".into(), "1".into()];
    let mnist = |name: &str| with(train_args(name, 4), &["--micro-batches", "1"]);
    dits(dir, &mnist("uninterrupted"));
    mpirun(dir, 3, &with(mnist("zero3-then-one"), &["--zero", "3", "--stop-after", "2"]));
    dits(dir, &resume("zero3-then-one"));
    dits(dir, &with(mnist("one-then-zero2"), &["--stop-after", "2"]));
    mpirun(dir, 2, &with(resume("one-then-zero2"), &["--zero", "2"]));
    let d = assert_equivalent_checkpoint(dir, "uninterrupted", "zero3-then-one", 4);
    eprintln!("ZeRO-3 on 3 ranks → one process: moments within {d:e}");
    let d = assert_equivalent_checkpoint(dir, "uninterrupted", "one-then-zero2", 4);
    eprintln!("one process → ZeRO-2 on 2 ranks: moments within {d:e}");
    // Not with tensor or sequence parallelism: one error line per rank.
    let err = mpirun_fails(dir, 2, &with(mnist("zero3-tp"), &["--zero", "3", "--tp", "2"]));
    assert!(err.contains("does not combine with --tp or --sp"), "{err}");
}

/// Pipeline parallelism (1F1B): 2 and 3 stages, and 2 data-parallel × 2 stages with ZeRO-1,
/// give the one-process weights, moving average and optimizer state with the same micro-batch
/// split, for both families (depth 4 for dit-s4, so three stages get blocks); a pipeline
/// checkpoint resumes on one process and the reverse; impossible layouts are one error.
#[test]
fn pipeline_stages_equal_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    toy_data(dir);
    let families: [(&str, &[&str]); 2] =
        [("mnist-dits", &["--model", "mnist-dits"]), ("dit-s4", &["--model", "dit-s4", "--depth", "4"])];
    for (family, model) in families {
        // (ranks, stages, extra flags, micro-batches of the run, of the one-process reference)
        let layouts: [(usize, &str, &[&str], &str, &str); 3] =
            [(2, "2", &[], "3", "3"), (3, "3", &[], "2", "2"), (4, "2", &["--zero", "1"], "2", "4")];
        for (ranks, stages, extra, parts, reference_parts) in layouts {
            let reference = format!("{family}-one-{reference_parts}");
            if !dir.join(&reference).exists() {
                dits(dir, &family_args(&reference, model, reference_parts));
            }
            let name = format!("{family}-pp{stages}-{ranks}");
            let args = with(with(family_args(&name, model, parts), &["--pp", stages]), extra);
            let text = mpirun(dir, ranks, &args);
            assert!(text.contains(&format!("{stages} pipeline stages")), "{text}");
            assert!(text.contains("(P−1)/(M+P−1)"), "{text}");
            for step in [2, 4] {
                let d = assert_equivalent_checkpoint(dir, &reference, &name, step);
                eprintln!("{family}, {ranks} ranks, --pp {stages} {extra:?}, step {step}: moments within {d:e}");
            }
        }
    }
    let resume = |name: &str| vec!["train".into(), "--resume".into(), name.into(), "--threads".into(), "1".into()];
    let mnist = |name: &str| with(train_args(name, 4), &["--micro-batches", "2"]);
    dits(dir, &mnist("uninterrupted"));
    mpirun(dir, 2, &with(mnist("pp-then-one"), &["--pp", "2", "--stop-after", "2"]));
    dits(dir, &resume("pp-then-one"));
    dits(dir, &with(mnist("one-then-pp"), &["--stop-after", "2"]));
    mpirun(dir, 3, &with(resume("one-then-pp"), &["--pp", "3"]));
    for run in ["pp-then-one", "one-then-pp"] {
        let d = assert_equivalent_checkpoint(dir, "uninterrupted", run, 4);
        eprintln!("{run}: moments within {d:e}");
    }
    // More stages than blocks (mnist-dits has 3), and layouts a pipeline does not combine with.
    let err = mpirun_fails(dir, 4, &with(mnist("pp4"), &["--pp", "4"]));
    assert!(err.contains("the model has 3 blocks"), "{err}");
    let err = mpirun_fails(dir, 2, &with(mnist("pp-zero2"), &["--pp", "2", "--zero", "2"]));
    assert!(err.contains("does not combine with --pp"), "{err}");
    let err = mpirun_fails(dir, 4, &with(mnist("pp-tp"), &["--pp", "2", "--tp", "2"]));
    assert!(err.contains("--pp combines with data parallelism only"), "{err}");
    let err = mpirun_fails(dir, 2, &with(mnist("pp-bf16"), &["--pp", "2", "--precision", "bf16"]));
    assert!(err.contains("not yet with --pp"), "{err}");
}

/// bf16 and fp16 (with its loss scale) on two data-parallel ranks, DDP and ZeRO-1, give the
/// one-process run of the same precision and micro-batch split.
#[test]
fn mixed_precision_data_parallel_equals_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    toy_data(dir);
    for precision in ["bf16", "fp16"] {
        let args =
            |name: &str, parts: &str| with(train_args(name, 4), &["--micro-batches", parts, "--precision", precision]);
        let reference = format!("{precision}-one");
        dits(dir, &args(&reference, "2"));
        for zero in ["0", "1"] {
            let name = format!("{precision}-zero{zero}");
            mpirun(dir, 2, &with(args(&name, "1"), &["--zero", zero]));
            let d = assert_same_checkpoint(dir, &reference, &name, 4);
            eprintln!("{precision}, 2 ranks, ZeRO-{zero}: max |Δ| = {d}");
        }
    }
}

/// A run checkpointed by two ranks resumes on two ranks with ZeRO-1 (the full optimizer state
/// is split on load), on one rank, and on three.
#[test]
fn resume_works_for_any_world_size() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    toy_data(dir);
    dits(dir, &with(train_args("reference", 4), &["--micro-batches", "2"]));
    for (name, ranks_after) in [("to-two-zero1", 2), ("to-one", 1), ("to-three", 3)] {
        mpirun(dir, 2, &with(train_args(name, 4), &["--micro-batches", "1", "--stop-after", "2"]));
        let resume = vec!["train".into(), "--resume".into(), name.into(), "--threads".into(), "1".into()];
        match ranks_after {
            1 => dits(dir, &resume),
            2 => mpirun(dir, 2, &with(resume, &["--zero", "1"])),
            n => mpirun(dir, n, &resume),
        };
        // Two ranks again: the same shards, bit for bit. One or three ranks split the later
        // batches differently, which changes the rounding of the sums only.
        let d = if ranks_after == 2 {
            assert_same_checkpoint(dir, "reference", name, 4)
        } else {
            assert_equivalent_checkpoint(dir, "reference", name, 4)
        };
        eprintln!("resumed {name}: max |Δ| = {d}");
    }
}

/// Errors on one rank stop every rank with the message, instead of leaving the others waiting.
#[test]
fn a_batch_smaller_than_the_world_is_an_error_on_every_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    toy_data(dir);
    let mut args = train_args("tiny", 2);
    let at = args.iter().position(|a| a == "7").unwrap();
    args[at] = "2".into();
    let mut cmd = Command::new("mpirun");
    cmd.args(["--allow-run-as-root", "--oversubscribe", "-np", "3", env!("CARGO_BIN_EXE_dits")]);
    cmd.args(&args).args(["--dist", "mpi"]).current_dir(dir);
    cmd.env("OMPI_MCA_btl", "self,vader").env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("smaller than the number of ranks"), "{err}");
    assert!(!dir.join("tiny/checkpoints").exists());
}

/// `mpirun` that must fail within a minute (no rank may hang); returns stderr.
fn mpirun_fails(dir: &Path, ranks: usize, args: &[String]) -> String {
    let mut cmd = Command::new("timeout");
    cmd.args(["60", "mpirun", "--allow-run-as-root", "--oversubscribe", "-np", &ranks.to_string()]);
    cmd.arg(env!("CARGO_BIN_EXE_dits")).args(args).args(["--dist", "mpi"]).current_dir(dir);
    cmd.env("OMPI_MCA_btl", "self,vader").env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "expected a failure:\n{err}");
    assert_ne!(out.status.code(), Some(124), "a rank hung:\n{err}");
    err
}

/// Megatron tensor parallelism, for both families (mnist-dits' folded attention split by heads,
/// and the DiT paper's packed qkv): TP=2, DP=2 × TP=2 and ZeRO-1 over DP with TP=2 give the
/// one-process weights, moving average and Adam state up to rounding ([`assert_equivalent_checkpoint`]).
#[test]
fn tensor_parallel_grids_equal_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    toy_data(dir);
    for (family, model) in FAMILIES {
        let args = |name: &str, parts: &str| family_args(name, model, parts);
        let (one, halves) = (format!("{family}-one"), format!("{family}-one-halves"));
        dits(dir, &args(&one, "1"));
        dits(dir, &args(&halves, "2"));
        let tp2 = format!("{family}-tp2");
        let text = mpirun(dir, 2, &with(args(&tp2, "1"), &["--tp", "2"]));
        assert!(text.contains("1 data-parallel × 1 sequence-parallel × 2 tensor-parallel"), "{text}");
        let grid = format!("{family}-dp2-tp2");
        mpirun(dir, 4, &with(args(&grid, "1"), &["--tp", "2"]));
        let zero = format!("{family}-dp2-tp2-zero1");
        mpirun(dir, 4, &with(args(&zero, "1"), &["--tp", "2", "--zero", "1"]));
        for step in [2, 4] {
            let d = assert_equivalent_checkpoint(dir, &one, &tp2, step);
            eprintln!("{family}, TP=2, step {step}: moments within {d:e}");
            // DP=2 splits the batch 4 + 3, as two micro-batches of one process do.
            let d = assert_equivalent_checkpoint(dir, &halves, &grid, step);
            eprintln!("{family}, DP=2 × TP=2, step {step}: moments within {d:e}");
            let d = assert_equivalent_checkpoint(dir, &halves, &zero, step);
            eprintln!("{family}, DP=2 × TP=2, ZeRO-1, step {step}: moments within {d:e}");
        }
    }
}

/// The same grid over TCP (the transport between machines): DP=2 × TP=2 equals one process.
#[test]
fn a_grid_over_tcp_equals_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    toy_data(dir);
    dits(dir, &with(train_args("halves", 4), &["--micro-batches", "2"]));
    let tcp = with(train_args("tcp", 4), &["--micro-batches", "1", "--tp", "2"]);
    mpirun_over(dir, 4, &tcp, "tcp,self");
    let d = assert_equivalent_checkpoint(dir, "halves", "tcp", 4);
    eprintln!("DP=2 × TP=2 over TCP: moments within {d:e}");
}

/// Checkpoints are always in the one-process layout: a TP=2 run continues on one process, and
/// a one-process run continues on DP=2 × TP=2 with its batches cut as before.
#[test]
fn tensor_parallel_runs_resume_on_another_grid() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    toy_data(dir);
    let args = |name: &str, parts: &str| with(train_args(name, 4), &["--micro-batches", parts]);
    dits(dir, &args("reference", "2"));
    let resume = |name: &str| vec!["train".into(), "--resume".into(), name.into(), "--threads".into(), "1".into()];
    mpirun(dir, 2, &with(args("tp2-then-one", "2"), &["--tp", "2", "--stop-after", "2"]));
    dits(dir, &resume("tp2-then-one"));
    let d = assert_equivalent_checkpoint(dir, "reference", "tp2-then-one", 4);
    eprintln!("TP=2 → one process: moments within {d:e}");
    // The same cut of every batch as the reference: two micro-batches on one process, then one
    // per data-parallel rank (--micro-batches may change on resume).
    dits(dir, &with(args("one-then-grid", "2"), &["--stop-after", "2"]));
    mpirun(dir, 4, &with(resume("one-then-grid"), &["--tp", "2", "--micro-batches", "1"]));
    let d = assert_equivalent_checkpoint(dir, "reference", "one-then-grid", 4);
    eprintln!("one process → DP=2 × TP=2: moments within {d:e}");
}

/// A tensor-parallel group that does not divide the world, or the model's heads, is one error
/// line on every rank, and no rank hangs.
#[test]
fn a_wrong_tensor_parallel_size_is_an_error_on_every_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    toy_data(dir);
    let err = mpirun_fails(dir, 3, &with(train_args("bad-world", 2), &["--tp", "2"]));
    assert_eq!(err.matches("--tp 2 must divide the number of ranks (3)").count(), 3, "{err}");
    let err = mpirun_fails(dir, 3, &with(train_args("bad-heads", 2), &["--tp", "3"]));
    assert_eq!(err.matches("--tp 3 must divide the head count").count(), 3, "{err}");
    assert!(err.contains("4 heads"), "{err}");
    assert!(!dir.join("bad-world").exists() && !dir.join("bad-heads/checkpoints").exists());
}

/// DeepSpeed-Ulysses in training (dit-s2: 196 tokens and 6 heads, over 2 ranks): SP=2,
/// DP=2 × SP=2 and TP=2 × SP=2 give the one-process weights, moving average and Adam state
/// up to rounding, and so does mnist-dits with 196 tokens; an SP=2 run resumes on one process; a group that does not divide the tokens
/// and heads is an error on every rank that names them.
#[test]
fn sequence_parallel_grids_equal_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    toy_data(dir);
    let model = ["--model", "dit-s2", "--depth", "1"];
    let args = |name: &str, parts: &str| with(with(train_args(name, 4), &model), &["--micro-batches", parts]);
    dits(dir, &args("one", "1"));
    dits(dir, &args("halves", "2"));
    let text = mpirun(dir, 2, &with(args("sp2", "1"), &["--sp", "2"]));
    assert!(text.contains("1 data-parallel × 2 sequence-parallel"), "{text}");
    mpirun(dir, 4, &with(args("dp2-sp2", "1"), &["--sp", "2"]));
    // Resumed across grids, against the same run resumed on one process: a resumed DiT-family
    // run differs from an uninterrupted one by rounding that Adam amplifies on the parameters
    // whose gradients are still near zero (its adaLN-Zero gates), with or without the grid.
    let resume = |name: &str| vec!["train".into(), "--resume".into(), name.into(), "--threads".into(), "1".into()];
    dits(dir, &with(args("one-then-one", "1"), &["--stop-after", "2"]));
    dits(dir, &resume("one-then-one"));
    mpirun(dir, 2, &with(args("sp2-then-one", "1"), &["--sp", "2", "--stop-after", "2"]));
    dits(dir, &resume("sp2-then-one"));
    for step in [2, 4] {
        let d = assert_equivalent_checkpoint(dir, "one", "sp2", step);
        eprintln!("SP=2, step {step}: moments within {d:e}");
        let d = assert_equivalent_checkpoint(dir, "halves", "dp2-sp2", step);
        eprintln!("DP=2 × SP=2, step {step}: moments within {d:e}");
    }
    let d = assert_equivalent_checkpoint(dir, "one-then-one", "sp2-then-one", 4);
    eprintln!("SP=2 → one process: moments within {d:e}");
    // TP=2 × SP=2 on 4 ranks, with 4 heads (2 per tensor-parallel rank, exchanged over 2).
    let four_heads = |name: &str| with(args(name, "1"), &["--heads", "4"]);
    dits(dir, &four_heads("one-4-heads"));
    let text = mpirun(dir, 4, &with(four_heads("tp2-sp2"), &["--tp", "2", "--sp", "2"]));
    assert!(text.contains("1 data-parallel × 2 sequence-parallel × 2 tensor-parallel"), "{text}");
    let d = assert_equivalent_checkpoint(dir, "one-4-heads", "tp2-sp2", 4);
    eprintln!("TP=2 × SP=2: moments within {d:e}");
    // mnist-dits with patches of 2 (196 tokens, 4 heads): its blocks run unfolded on the shard.
    let mnist = |name: &str| with(train_args(name, 4), &["--patch", "2", "--micro-batches", "1"]);
    dits(dir, &mnist("mnist-one"));
    mpirun(dir, 2, &with(mnist("mnist-sp2"), &["--sp", "2"]));
    let d = assert_equivalent_checkpoint(dir, "mnist-one", "mnist-sp2", 4);
    eprintln!("mnist-dits, patch 2, SP=2: moments within {d:e}");
    // SP=4: 49 tokens a rank, shards that start and end inside a row of 14 patches.
    mpirun(dir, 4, &with(mnist("mnist-sp4"), &["--sp", "4"]));
    let d = assert_equivalent_checkpoint(dir, "mnist-one", "mnist-sp4", 4);
    eprintln!("mnist-dits, patch 2, SP=4: moments within {d:e}");
    mpirun(dir, 4, &with(mnist("mnist-tp2-sp2"), &["--tp", "2", "--sp", "2"]));
    let d = assert_equivalent_checkpoint(dir, "mnist-one", "mnist-tp2-sp2", 4);
    eprintln!("mnist-dits, patch 2, TP=2 × SP=2: moments within {d:e}");
    let bad = with(train_args("bad-tokens", 2), &["--model", "dit-s4", "--depth", "1", "--sp", "2"]);
    let err = mpirun_fails(dir, 2, &bad);
    assert_eq!(err.matches("49 tokens and 6 heads").count(), 2, "{err}");
}

/// DeepSpeed-Ulysses: a DiT block of the DiT-paper family (6 heads of 64, 196 tokens) split over
/// two ranks gives the single-rank block's output, input gradient and parameter gradients.
#[test]
fn ulysses_block_equals_the_single_rank_block() {
    let mut cmd = Command::new("mpirun");
    cmd.args(["--allow-run-as-root", "--oversubscribe", "-np", "2"]);
    cmd.arg(std::env::current_exe().unwrap()).args(["--exact", "ulysses_rank", "--ignored", "--nocapture"]);
    cmd.env("OMPI_MCA_btl", "self,vader").env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
    let text = run(&mut cmd);
    assert_eq!(text.matches("ulysses rank ok").count(), 2, "{text}");
}

/// One rank of [`ulysses_block_equals_the_single_rank_block`] (started by it under mpirun).
#[test]
#[ignore = "runs under mpirun, started by ulysses_block_equals_the_single_rank_block"]
fn ulysses_rank() {
    use std::sync::Arc;

    use burn::prelude::*;
    use dits::distributed::Collective;
    use dits::distributed::mpi::MpiWorld;
    use dits::kernels::SequenceParallel;
    use dits::model::DitConfig;
    use dits::model::dit::block::DitBlock;
    use dits::rng::{Purpose, stream, with_device_seed};
    use dits::train::params::ParamTable;

    let comm: Arc<dyn Collective> = Arc::new(MpiWorld::init().unwrap());
    assert_eq!(comm.size(), 2, "start with mpirun -np 2");
    let cfg = DitConfig::dit(2, 1, 6, 64);
    let (batch, seq, width) = (2, cfg.tokens(), cfg.width);
    let device = Device::flex().autodiff();
    let block = with_device_seed(&device, 3, || DitBlock::new(&cfg, &device));
    // adaLN-Zero starts with zero gates, which would hide attention from the output: give every
    // parameter seeded random values (the same on both ranks).
    let table = ParamTable::of(&block);
    let mut rng = stream(3, Purpose::Bench, 0);
    let values: Vec<f32> = dits::rng::standard_normal(&mut rng, table.total).iter().map(|v| 0.05 * v).collect();
    let block = table.write_values(block, &values);
    let tensor = |len: usize, dims: [usize; 3], rng: &mut rand_chacha::ChaCha8Rng| {
        Tensor::<3>::from_data(TensorData::new(dits::rng::standard_normal(rng, len), dims), &device)
    };
    let x = tensor(batch * seq * width, [batch, seq, width], &mut rng);
    let c = tensor(batch * width, [batch, 1, width], &mut rng).squeeze_dim::<2>(1);
    let upstream = tensor(batch * seq * width, [batch, seq, width], &mut rng);

    // The whole sequence on this rank alone.
    let x_full = x.clone().require_grad();
    let y_full = block.forward(x_full.clone(), c.clone(), &dits::kernels::TensorParallel::single(), None);
    let grads = (y_full.clone() * upstream.clone()).sum().backward();
    let (dx_full, dparams_full) = (x_full.grad(&grads).unwrap(), table.read_grads(&block, &grads));

    // This rank's tokens, attention across both ranks.
    let sp = SequenceParallel::new(comm.clone(), seq, cfg.heads).unwrap();
    let mine = sp.my_tokens();
    let x_mine = x.slice([0..batch, mine.clone(), 0..width]).require_grad();
    let y_mine = block.forward_sequence_parallel(x_mine.clone(), c, &sp);
    let grads = (y_mine.clone() * upstream.slice([0..batch, mine.clone(), 0..width])).sum().backward();
    let dx_mine = x_mine.grad(&grads).unwrap();
    // Parameter gradients are partial sums over each rank's tokens.
    let mut dparams = table.read_grads(&block, &grads);
    comm.all_reduce_sum(&mut dparams);

    let rel = |a: Vec<f32>, b: Vec<f32>| {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        a.iter().zip(&b).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max) / scale
    };
    let rows = |t: Tensor<3>| t.slice([0..batch, mine.clone(), 0..width]).into_data().try_to_vec::<f32>().unwrap();
    let flat = |t: Tensor<3>| t.into_data().try_to_vec::<f32>().unwrap();
    let dy = rel(flat(y_mine.inner()), rows(y_full.inner()));
    let dx = rel(flat(dx_mine), rows(dx_full));
    let dp = rel(dparams, dparams_full);
    eprintln!(
        "rank {}: relative max |Δ| output {dy:e}, input gradient {dx:e}, parameter gradients {dp:e}",
        comm.rank()
    );
    assert!(dy <= 1e-5 && dx <= 1e-5 && dp <= 1e-5, "Ulysses block differs from the single-rank block");
    println!("ulysses rank ok");
}

/// An image folder, streamed from its files on every rank and mirrored by `--hflip`, trains on
/// two ranks what it trains on one, and the run resumes on one process.
#[test]
fn a_streamed_image_folder_on_two_ranks_equals_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    common::write_toy_folder(&dir.join("data"), 40);
    let streamed = ["--hflip", "--data-memory", "0", "--decode-threads", "2"];
    dits(dir, &with(train_args("one", 4), &[&streamed[..], &["--micro-batches", "2"]].concat()));
    let text = mpirun(dir, 2, &with(train_args("two", 4), &[&streamed[..], &["--micro-batches", "1"]].concat()));
    assert!(text.contains("2 ranks") && text.contains("40 image files streamed"), "{text}");
    for step in [2, 4] {
        let d = assert_same_checkpoint(dir, "one", "two", step);
        eprintln!("folder, 2 ranks, step {step}: max |Δ| = {d}");
    }
    dits(dir, &["train".into(), "--resume".into(), "two".into(), "--steps".into(), "6".into(), "--no-progress".into()]);
    assert!(dir.join("two/checkpoints/step-00000006/model.safetensors").is_file());
}
