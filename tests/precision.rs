//! Mixed precision: bf16 and fp16 training follow the fp32 loss curve from the same seed, and
//! fp16's dynamic loss scale skips an overflowed step and halves itself, across a resume.

mod common;

use std::path::Path;
use std::process::Command;

fn dits(dir: &Path, args: &[String]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_dits"))
        .args(common::without_pictures(args))
        .current_dir(dir)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "dits {args:?} failed:\n{text}");
    text
}

fn metrics(dir: &Path, run: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join(run).join("metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// `dits train` on the shipped MNIST: a small model (one block), batch 16, logged every
/// `log_every` steps.
fn run_args(out: &str, steps: u64, precision: &str, log_every: u64, extra: &[&str]) -> Vec<String> {
    let data = format!("{}/data/mnist", env!("CARGO_MANIFEST_DIR"));
    let (steps, log_every) = (steps.to_string(), log_every.to_string());
    let flags = ["train", "--out", out, "--data", &data, "--steps", &steps, "--batch", "16", "--micro-batches", "1"];
    let rest = ["--depth", "1", "--log-every", &log_every, "--no-progress", "--precision", precision];
    [&flags[..], &rest, extra].concat().iter().map(|s| s.to_string()).collect()
}

/// 300 steps from the same seed: every logged loss (a mean over 25 steps) of a bf16 and of an
/// fp16 run stays within 1% of the fp32 run's (measured: within 0.1%), while the curve falls
/// from about 2.2 to 0.5; and the curves are not the fp32 one itself (the run did compute in
/// low precision); a resumed bf16 run is bit for bit the uninterrupted one.
#[test]
fn bf16_and_fp16_follow_the_fp32_loss_curve() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for p in ["fp32", "bf16", "fp16"] {
        dits(dir, &run_args(p, 300, p, 25, &[]));
    }
    let loss = |run: &str| -> Vec<f64> { metrics(dir, run).iter().map(|r| r["loss"].as_f64().unwrap()).collect() };
    let reference = loss("fp32");
    assert_eq!(reference.len(), 12);
    assert!(reference[11] < 0.6 * reference[0], "the fp32 run did not learn: {reference:?}");
    for p in ["bf16", "fp16"] {
        let curve = loss(p);
        assert_ne!(curve, reference, "{p} gave the fp32 losses exactly: it did not run in {p}");
        for (i, (a, b)) in reference.iter().zip(&curve).enumerate() {
            let rel = (a - b).abs() / a;
            eprintln!("{p}, steps {}..{}: fp32 {a:.4}, {p} {b:.4}, {:.2}%", 25 * i, 25 * (i + 1), 100.0 * rel);
            assert!(rel < 0.01, "{p} at interval {i}: {b} vs fp32 {a}");
        }
    }
    // fp16 logs its loss scale, and at 2^16 this model never overflows.
    let last = metrics(dir, "fp16").pop().unwrap();
    assert_eq!((last["loss_scale"].as_f64(), last["skipped_steps"].as_u64()), (Some(65536.0), Some(0)));
    assert!(metrics(dir, "bf16")[0].get("loss_scale").is_none());
    // A bf16 run paused half-way and resumed ends with the uninterrupted run's files.
    dits(dir, &run_args("bf16-resumed", 300, "bf16", 25, &["--stop-after", "150"]));
    dits(dir, &["train".into(), "--resume".into(), "bf16-resumed".into(), "--no-progress".into()]);
    for file in ["model", "ema", "optimizer"] {
        let read =
            |run: &str| std::fs::read(dir.join(run).join(format!("checkpoints/step-00000300/{file}.safetensors")));
        assert!(read("bf16").unwrap() == read("bf16-resumed").unwrap(), "resumed bf16 run: {file} differs");
    }
}

/// A loss scale of 2^120 overflows fp16 in every backward: each step is skipped (Adam's
/// moments stay zero) and the scale halves, in the metrics and
/// in the checkpoint, which a resumed run continues from.
#[test]
fn an_fp16_overflow_skips_the_step_and_halves_the_scale() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let overflow = ["--loss-scale-power", "120", "--stop-after", "3", "--checkpoint-every", "1"];
    dits(dir, &run_args("overflow", 5, "fp16", 1, &overflow));
    let records = metrics(dir, "overflow");
    assert_eq!(records.len(), 3);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["skipped_steps"].as_u64(), Some(1), "{r}");
        assert_eq!(r["loss_scale"].as_f64(), Some(2f64.powi(120 - 1 - i as i32)), "{r}");
    }
    let state = |step: u64| -> serde_json::Value {
        let path = dir.join(format!("overflow/checkpoints/step-{step:08}/state.json"));
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    assert_eq!(state(3)["loss_scale"]["skipped_steps"].as_u64(), Some(3));
    // Nothing moved: Adam's moments are zero.
    let optimizer = std::fs::read(dir.join("overflow/checkpoints/step-00000003/optimizer.safetensors")).unwrap();
    let optimizer = safetensors::SafeTensors::deserialize(&optimizer).unwrap();
    for (name, t) in optimizer.tensors() {
        assert!(t.data().iter().all(|&b| b == 0), "{name} is not zero after skipped steps");
    }
    dits(dir, &["train".into(), "--resume".into(), "overflow".into(), "--no-progress".into()]);
    // state.json writes the f32 scale in its shortest form.
    assert_eq!(state(5)["loss_scale"]["scale"].as_f64().map(|s| s as f32), Some(2f32.powi(115)));
    assert_eq!(state(5)["loss_scale"]["skipped_steps"].as_u64(), Some(5));
}
