//! A time budget (`--minutes`) fixes the run's step count from its first steps, keeps it across
//! a resume, and trains exactly the run of `--steps` with that count.

use std::path::Path;
use std::process::Command;

fn dits<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(dir: &Path, args: &[S]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_dits")).args(args).current_dir(dir).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "dits {args:?} failed:\n{text}");
    text
}

fn state(dir: &Path, run: &str, step: u64) -> serde_json::Value {
    let path = dir.join(run).join(format!("checkpoints/step-{step:08}/state.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The count is fixed after the timed steps (the 200-step warm-up), written in the
/// checkpoint, and a run paused before its end and resumed reaches it; its files equal a fresh
/// `--steps N` run's bit for bit, because the warm-up's learning rates do not depend on the total.
#[test]
fn a_time_budget_is_a_step_count_fixed_early_and_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = format!("{}/data/mnist", env!("CARGO_MANIFEST_DIR"));
    let recipe = ["--data", &data, "--batch", "16", "--micro-batches", "1", "--depth", "1", "--no-progress"];
    let args = |out: &str, extra: &[&str]| -> Vec<String> {
        [&["train", "--out", out][..], &recipe, extra].concat().iter().map(|s| s.to_string()).collect()
    };
    let log = dits(dir, &args("budget", &["--minutes", "0.3", "--stop-after", "250"]));
    assert!(log.contains("the count fixed after 200 steps"), "{log}");
    let paused = state(dir, "budget", 250);
    let total = paused["train"]["total_steps"].as_u64().unwrap();
    assert_eq!(paused["budget"]["fixed_at"].as_u64(), Some(200));
    assert!(total > 250 && total < 1_000_000, "an 18-second budget fixed at {total} steps");
    dits(dir, &["train", "--resume", "budget", "--no-progress"]);
    assert_eq!(state(dir, "budget", total)["train"]["total_steps"].as_u64(), Some(total));

    let steps = total.to_string();
    dits(dir, &args("steps", &["--steps", &steps]));
    for file in ["model", "ema", "optimizer"] {
        let read =
            |run: &str| std::fs::read(dir.join(run).join(format!("checkpoints/step-{total:08}/{file}.safetensors")));
        assert!(
            read("budget").unwrap() == read("steps").unwrap(),
            "{file}: the budgeted run differs from --steps {total}"
        );
    }
    // A budget conflicts with a step count, and must be positive.
    let out = Command::new(env!("CARGO_BIN_EXE_dits"))
        .args(args("bad", &["--minutes", "0"]))
        .current_dir(dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--minutes must be a positive number"), "{err}");
}
