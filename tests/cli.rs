//! The `dits` binary end to end in a temporary directory: train a few steps, resume, sample;
//! and bad input gives one `error:` line and a non-zero exit.

mod common;

use common::{dits, fails_with, ok};

use std::path::Path;

#[test]
fn train_resume_sample_on_the_shipped_mnist() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let common =
        ["--batch", "16", "--checkpoint-every", "2", "--threads", "2", "--log-every", "1", "--label-dropout", "0.1"];
    let mut args = vec!["train", "--out", "run", "--steps", "2"];
    args.extend(common);
    let text = ok(&dits(&args, dir));
    assert!(text.contains("trained to step 2"), "{text}");

    let text = ok(&dits(&["train", "--resume", "run", "--steps", "4", "--threads", "2"], dir));
    assert!(text.contains("trained to step 4"), "{text}");
    assert!(dir.join("run/metrics.jsonl").is_file());
    assert!(dir.join("run/loss.png").is_file());

    let text = ok(&dits(
        &["sample", "--checkpoint", "run", "--out", "samples", "--classes", "3,7", "--per-class", "2", "--steps", "40"],
        dir,
    ));
    assert!(text.contains("wrote 4 images"), "{text}");
    for name in ["3_00000.png", "3_00001.png", "7_00000.png", "7_00001.png", "grid.png", "process.png"] {
        assert!(dir.join("samples").join(name).is_file(), "missing {name}");
    }
    let img = image::open(dir.join("samples/7_00001.png")).unwrap();
    assert_eq!((img.width(), img.height()), (28, 28));
    let process = image::open(dir.join("samples/process.png")).unwrap();
    assert_eq!(process.height(), 2 * 30 + 2, "a row per class");
    // 20 columns from noise to image, after a margin holding the rows' class names.
    let margin = process.width() as i64 - (20 * 30 + 2);
    assert!((10..30).contains(&margin), "width {}: 20 columns and a name margin", process.width());

    // Each image has its own noise stream: batching and threads do not change the samples,
    // even with the fresh noise of every DDPM step.
    for (out, extra) in [("ddpm-a", ["--threads", "2"]), ("ddpm-b", ["--batch", "1"])] {
        let mut args = vec!["sample", "--checkpoint", "run", "--out", out, "--classes", "3,7", "--per-class", "2"];
        args.extend(["--sampler", "ddpm", "--steps", "5"]);
        args.extend(extra);
        ok(&dits(&args, dir));
    }
    for name in ["3_00000.png", "3_00001.png", "7_00000.png", "7_00001.png"] {
        let a = std::fs::read(dir.join("ddpm-a").join(name)).unwrap();
        let b = std::fs::read(dir.join("ddpm-b").join(name)).unwrap();
        assert!(a == b, "{name} depends on the batch size");
    }

    // Classifier-free guidance on the run trained with label dropout.
    let text = ok(&dits(
        &[
            "sample",
            "--checkpoint",
            "run",
            "--out",
            "guided",
            "--classes",
            "5",
            "--per-class",
            "3",
            "--sampler",
            "ddim",
            "--steps",
            "5",
            "--cfg-scale",
            "3",
        ],
        dir,
    ));
    assert!(text.contains("wrote 3 images"), "{text}");

    // A non-empty output directory is never overwritten silently.
    fails_with(&dits(&["sample", "--checkpoint", "run", "--out", "samples", "--steps", "2"], dir), "not empty");
}

#[test]
fn bad_input_is_one_error_line_and_a_failure() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    fails_with(&dits(&["train", "--batch", "0", "--out", "r"], dir), "batch");
    fails_with(&dits(&["train", "--lr", "-1", "--out", "r"], dir), "--lr");
    fails_with(&dits(&["train", "--steps", "0", "--out", "r"], dir), "at least 1");
    fails_with(&dits(&["train", "--data", "nowhere", "--out", "r", "--steps", "1"], dir), "nowhere");
    fails_with(&dits(&["train", "--model", "huge", "--out", "r"], dir), "unknown model preset");
    fails_with(&dits(&["train", "--resume", "nothing-here"], dir), "does not exist");
    fails_with(&dits(&["sample", "--checkpoint", "missing.pth", "--out", "s"], dir), "does not exist");
    fails_with(&dits(&["train", "--zero", "1", "--out", "r"], dir), "--dist mpi");
    #[cfg(not(feature = "mpi"))]
    fails_with(&dits(&["train", "--dist", "mpi", "--out", "r"], dir), "--features mpi");
    // A vector-extension cap that is not one, before any work starts.
    let capped = |value: &str| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dits"));
        cmd.args(["train", "--out", "r"]).current_dir(dir).env("DITS_CPU_CAPABILITY", value);
        cmd.output().unwrap()
    };
    fails_with(&capped("avx"), "DITS_CPU_CAPABILITY=\"avx\" is not a capability");
    assert!(!dir.join("r").exists(), "a failed run wrote its run directory");

    // Corrupt data: named file, clear reason.
    let data = dir.join("bad");
    common::write_toy_dataset(&data, 20);
    let images = data.join("train-images-idx3-ubyte");
    let bytes = std::fs::read(&images).unwrap();
    std::fs::write(&images, &bytes[..bytes.len() - 100]).unwrap();
    fails_with(&dits(&["train", "--data", "bad", "--out", "r2", "--steps", "1"], dir), "truncated");
    assert!(!dir.join("r2").exists());

    // A sample request for a class the model does not have.
    let pth = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden_mnist_dits.pth");
    fails_with(
        &dits(&["sample", "--checkpoint", pth.to_str().unwrap(), "--out", "s", "--classes", "12"], dir),
        "class 12",
    );
    // Guidance needs a null label, which the original mnist-dits never learned.
    fails_with(
        &dits(&["sample", "--checkpoint", pth.to_str().unwrap(), "--out", "s", "--cfg-scale", "2"], dir),
        "label dropout",
    );
    fails_with(&dits(&["train", "--label-dropout", "1.5", "--out", "r3"], dir), "--label-dropout");
}

#[test]
fn samples_from_an_original_mnist_dits_pth() {
    let tmp = tempfile::tempdir().unwrap();
    let pth = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden_mnist_dits.pth");
    let text = ok(&dits(
        &[
            "sample",
            "--checkpoint",
            pth.to_str().unwrap(),
            "--out",
            "s",
            "--classes",
            "1",
            "--per-class",
            "1",
            "--steps",
            "3",
        ],
        tmp.path(),
    ));
    assert!(text.contains("wrote 1 images"), "{text}");
}

#[test]
fn a_toml_recipe_trains_the_dit_family_with_flow_matching() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    common::write_toy_dataset(&dir.join("data"), 20);
    std::fs::write(
        dir.join("run.toml"),
        "[model]\nmodel = \"dit-s4\"\ndepth = 1\nheads = 2\n\n[train]\nschedule = \"flow\"\n\
         timestep-sampling = \"logit-normal\"\nsteps = 3\nbatch = 4\nlog-every = 1\n",
    )
    .unwrap();
    // A flag overrides the file: 2 steps, not 3.
    let text = ok(&dits(&["train", "--config", "run.toml", "--data", "data", "--out", "run", "--steps", "2"], dir));
    assert!(text.contains("trained to step 2"), "{text}");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("run/checkpoints/step-00000002/state.json")).unwrap()).unwrap();
    assert_eq!(state["model"]["family"], "dit");
    assert_eq!(state["model"]["width"], 64);
    assert_eq!(state["train"]["schedule"], "flow");

    // Every sampler runs on it; the flow model samples with Euler steps.
    for sampler in [
        &["--sampler", "euler"][..],
        &["--sampler", "accelerated"],
        &["--sampler", "gen", "--gamma", "1.6", "--mu", "0.3"],
        &["--sampler", "dpmpp-2m"],
        &["--sampler", "heun"],
    ] {
        let out = format!("s-{}", sampler[1]);
        let mut args =
            vec!["sample", "--checkpoint", "run", "--out", &out, "--classes", "1", "--per-class", "2", "--steps", "4"];
        args.extend(sampler);
        assert!(ok(&dits(&args, dir)).contains("wrote 2 images"));
    }

    // A resumed run keeps its recipe.
    fails_with(&dits(&["train", "--resume", "run", "--steps", "4", "--schedule", "linear"], dir), "keeps its settings");
    fails_with(&dits(&["train", "--resume", "run", "--steps", "4", "--depth", "2"], dir), "keeps its model");
    ok(&dits(&["train", "--resume", "run", "--steps", "3"], dir));
}

#[test]
fn bad_recipes_and_sampler_settings_are_one_error_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("typo.toml"), "[train]\nlearning-rate = 0.1\n").unwrap();
    fails_with(&dits(&["train", "--config", "typo.toml", "--out", "r"], dir), "learning-rate");
    fails_with(&dits(&["train", "--config", "absent.toml", "--out", "r"], dir), "absent.toml");
    fails_with(&dits(&["train", "--schedule", "quadratic", "--out", "r"], dir), "unknown schedule");
    fails_with(&dits(&["train", "--patch", "5", "--out", "r"], dir), "does not divide");
    fails_with(
        &dits(&["train", "--model", "dit-s4", "--heads", "5", "--width", "64", "--out", "r"], dir),
        "does not divide",
    );
    assert!(!dir.join("r").exists(), "a failed run wrote its run directory");
    let pth = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden_mnist_dits.pth");
    let pth = pth.to_str().unwrap();
    fails_with(&dits(&["sample", "--checkpoint", pth, "--out", "s", "--sampler", "gen", "--mu", "1"], dir), "--mu");
    fails_with(&dits(&["sample", "--checkpoint", pth, "--out", "s", "--sampler", "ddim", "--eta", "2"], dir), "--eta");
    fails_with(&dits(&["sample", "--checkpoint", pth, "--out", "s", "--steps", "0"], dir), "at least 1");
}

/// `dits bench` ends with the two figures the comparison script reads, and `--profile` adds the
/// per-region table whose phases and kernels are all present; it names the CPU, its measured
/// FMA peak and the attention engines' rates.
#[test]
fn bench_prints_figures_and_a_step_profile() {
    let tmp = tempfile::tempdir().unwrap();
    let out = dits(
        &["bench", "--batch", "4", "--warmup", "0", "--iters", "1", "--profile", "1", "--threads", "2"],
        tmp.path(),
    );
    let text = ok(&out);
    for needle in [
        "training step profile",
        "forward + loss",
        "backward",
        "attention kernel",
        "adaLN LayerNorm kernel",
        "gated residual kernel",
        "fused Linear kernel",
        "Adam + EMA",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    for needle in ["cpu: ", "FMA peak", "attention products, forward+backward, GFLOP/s by engine: ", "Gemm"] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last: Vec<&str> = stdout.lines().rev().take(2).collect();
    assert!(last[1].starts_with("train_samples_per_s=") && last[0].starts_with("sample_images_per_s="), "{stdout}");
}

/// `--dist devices` on the CPU (ranks as threads): two ranks, with and without ZeRO-1, write the
/// checkpoint files of one rank whose batch is split the same way, byte for byte; a run of
/// two ranks resumes on three.
#[test]
fn threaded_ranks_equal_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    common::write_toy_dataset(&dir.join("data"), 30);
    let run = |out: &str, extra: &[&str]| {
        let recipe = ["--steps", "3", "--batch", "7", "--label-dropout", "0", "--warmup-steps", "0"];
        let args =
            common::train_args(out, &[&recipe[..], &["--threads", "1", "--checkpoint-every", "3"], extra].concat());
        ok(&dits(&args.iter().map(String::as_str).collect::<Vec<_>>(), dir))
    };
    run("one", &["--micro-batches", "2"]);
    let text = run("two", &["--micro-batches", "1", "--dist", "devices", "--ranks", "2"]);
    assert!(text.contains("2 ranks"), "{text}");
    assert_eq!(text.matches("trained to step 3").count(), 1, "only rank 0 reports:\n{text}");
    run("two-zero1", &["--micro-batches", "1", "--dist", "devices", "--ranks", "2", "--zero", "1"]);
    for file in ["model", "ema", "optimizer"] {
        let read = |run: &str| {
            std::fs::read(dir.join(run).join(format!("checkpoints/step-00000003/{file}.safetensors"))).unwrap()
        };
        assert!(read("one") == read("two"), "{file}: two ranks differ from one");
        assert!(read("one") == read("two-zero1"), "{file}: two ranks with ZeRO-1 differ from one");
    }
    let text = ok(&dits(&["train", "--resume", "two", "--steps", "5", "--dist", "devices", "--ranks", "3"], dir));
    assert!(text.contains("trained to step 5"), "{text}");
    fails_with(&dits(&["train", "--ranks", "2", "--out", "x"], dir), "--dist devices");
    fails_with(&dits(&["train", "--dist", "devices", "--out", "x"], dir), "--ranks");
}
