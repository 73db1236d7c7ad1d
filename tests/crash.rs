//! Crash safety of `dits train`: SIGKILL at random moments (checkpoint writes included),
//! resumed each time, loses at most one checkpoint interval, never leaves a checkpoint that
//! does not load, and ends with the weights of an uninterrupted run, bit for bit; SIGINT stops
//! cleanly after a checkpoint.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dits::train::{checkpoint, metrics};
use rand::{Rng, SeedableRng};

const STEPS: u64 = 60;
const EVERY: u64 = 3;

fn train_args(out: &str) -> Vec<String> {
    let (steps, every) = (STEPS.to_string(), EVERY.to_string());
    let flags = ["--steps", &steps, "--batch", "8", "--checkpoint-every", &every, "--log-every", "1"];
    let rest = ["--threads", "1", "--no-progress", "--keep", "3"];
    common::train_args(out, &[&flags[..], &rest].concat())
}

fn resume_args(out: &str) -> Vec<String> {
    ["train", "--resume", out, "--threads", "1", "--no-progress"].iter().map(|s| s.to_string()).collect()
}

fn spawn(dir: &Path, args: &[String]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_dits"))
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting dits")
}

fn finish(child: Child) {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "dits failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// The step of the newest complete checkpoint of `run`, if any.
fn latest_step(run: &Path) -> Option<u64> {
    let dir = checkpoint::resolve(run).ok()?;
    Some(checkpoint::read_state(&dir).ok()?.step)
}

/// Every checkpoint on disk loads (checksums, shapes, optimizer state); returns their steps.
fn all_checkpoints_load(run: &Path) -> Vec<u64> {
    let root = checkpoint::checkpoints_dir(run);
    let mut steps = Vec::new();
    for entry in std::fs::read_dir(&root).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with("step-") {
            let ckpt = checkpoint::load(&entry.path()).unwrap_or_else(|e| panic!("{name} does not load: {e:#}"));
            steps.push(ckpt.state.step);
        }
    }
    steps.sort();
    steps
}

/// Leftovers of an interrupted write (temporary names start with a dot).
fn partial_writes(run: &Path) -> usize {
    std::fs::read_dir(checkpoint::checkpoints_dir(run))
        .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with('.')).count())
        .unwrap_or(0)
}

fn same_files(dir: &Path, a: &str, b: &str, step: u64) {
    for file in ["model", "ema", "optimizer"] {
        let read = |run: &str| {
            std::fs::read(dir.join(run).join(format!("checkpoints/step-{step:08}/{file}.safetensors"))).unwrap()
        };
        assert!(read(a) == read(b), "{file}.safetensors of {a} and {b} differ at step {step}");
    }
}

#[test]
fn sigkill_at_random_moments_loses_at_most_one_interval_and_ends_bit_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    common::write_toy_dataset(&dir.join("data"), 64);
    finish(spawn(dir, &train_args("reference")));

    let run = dir.join("killed");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let (mut kills, mut during_writes) = (0, 0);
    let mut child = spawn(dir, &train_args("killed"));
    let deadline = Instant::now() + Duration::from_secs(240);
    while kills < 10 && Instant::now() < deadline {
        // Let the run reach a checkpoint past the one it started from, then kill it: every
        // other time at a random moment of the next few steps, otherwise as soon as the next
        // checkpoint write has begun (its temporary directory exists).
        let start = latest_step(&run);
        while latest_step(&run) == start && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(5));
        }
        if kills % 2 == 0 {
            std::thread::sleep(Duration::from_millis(rng.random_range(0..120)));
        } else {
            while partial_writes(&run) == 0 && child.try_wait().unwrap().is_none() {
                std::thread::sleep(Duration::from_micros(200));
            }
            std::thread::sleep(Duration::from_micros(rng.random_range(0..8000)));
        }
        if child.try_wait().unwrap().is_some() {
            break; // finished before the kill
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        during_writes += usize::from(partial_writes(&run) > 0);

        let steps = all_checkpoints_load(&run);
        let saved = *steps.last().expect("a checkpoint");
        assert_eq!(latest_step(&run), Some(saved), "latest must name the newest complete checkpoint");
        let logged = metrics::read(&run).iter().map(|r| r.step).max().unwrap_or(0);
        assert!(logged - saved <= EVERY, "kill {kills}: step {logged} reached, newest checkpoint {saved}");
        child = spawn(dir, &resume_args("killed"));
    }
    finish(child);
    eprintln!("{kills} kills survived, {during_writes} of them during a checkpoint write");
    assert!(kills >= 5, "only {kills} kills before the run finished");
    assert!(during_writes >= 2, "only {during_writes} kills landed in a checkpoint write");
    assert_eq!(partial_writes(&run), 0, "a later checkpoint removes what killed writes left");
    all_checkpoints_load(&run);
    same_files(dir, "reference", "killed", STEPS);
}

#[test]
fn sigint_stops_after_a_checkpoint_and_the_run_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    common::write_toy_dataset(&dir.join("data"), 64);
    finish(spawn(dir, &train_args("reference")));

    let run = dir.join("stopped");
    let child = spawn(dir, &train_args("stopped"));
    while latest_step(&run).is_none() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted at step") && err.contains("--resume"), "{err}");
    // The stop wrote a checkpoint at the step it reached.
    let logged = metrics::read(&run).iter().map(|r| r.step).max().unwrap();
    assert_eq!(latest_step(&run), Some(logged));
    assert!(logged < STEPS, "the run finished before the signal");
    finish(spawn(dir, &resume_args("stopped")));
    same_files(dir, "reference", "stopped", STEPS);
}

/// Two processes never train in one run directory at once.
#[test]
fn a_second_process_on_the_same_run_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    common::write_toy_dataset(&dir.join("data"), 64);
    let run = dir.join("busy");
    let mut first = spawn(dir, &train_args("busy"));
    while latest_step(&run).is_none() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let second = Command::new(env!("CARGO_BIN_EXE_dits")).args(resume_args("busy")).current_dir(dir).output().unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success() && err.contains("another dits process"), "{err}");
    first.kill().unwrap();
    first.wait().unwrap();
}
