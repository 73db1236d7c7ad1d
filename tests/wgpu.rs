//! The wgpu backend executed, on whatever Vulkan device is present: in CI Mesa's lavapipe, a
//! software GPU (`.ci/run` installs it and sets `DITS_REQUIRE_WGPU`, so that a missing device
//! fails these tests instead of skipping them).
//!
//! A GPU run composes burn's operations (the fused kernels are CPU code), so its reference is the
//! CPU run with `--composed`: the same operations in the same order. The two still differ by
//! rounding: a GPU's reductions (sums, means, matmuls) group their terms in other ways. Built
//! with `--features wgpu` only.
#![cfg(feature = "wgpu")]

mod common;

use std::path::Path;

use ::dits::data::Batch;
use ::dits::device::{DeviceKind, resolve};
use ::dits::model::DitConfig;
use ::dits::train::{TrainConfig, Trainer};
use burn::prelude::*;
use common::{dits, ok};

/// Whether wgpu has a device here. Without one the test says so and passes, except where
/// `DITS_REQUIRE_WGPU` is set (CI), where it fails.
fn wgpu_present() -> bool {
    match resolve(DeviceKind::Wgpu) {
        Ok(_) => true,
        Err(e) => {
            assert!(std::env::var_os("DITS_REQUIRE_WGPU").is_none(), "DITS_REQUIRE_WGPU is set, but: {e}");
            eprintln!("skipped: {e} (Mesa's lavapipe: apt-get install mesa-vulkan-drivers libvulkan1)");
            false
        }
    }
}

fn wgpu() -> Device {
    Device::wgpu(Default::default())
}

/// A small network, so that a software GPU trains it in seconds.
fn small_model() -> DitConfig {
    let mut cfg = DitConfig::mnist_dits();
    cfg.depth = 1;
    cfg
}

/// A batch of toy images, the same every call.
fn toy_batch(b: usize) -> Batch {
    let (pixels, labels) = common::toy_images(b as u32, "train");
    Batch { images: pixels.iter().map(|&p| p as f32 / 127.5 - 1.0).collect(), labels, epoch: 0, index: 0 }
}

fn trainer(device: &Device) -> Trainer {
    let train =
        TrainConfig { batch: 8, micro_batches: 1, label_dropout: 0.0, warmup_steps: 0, lr: 1e-4, ..Default::default() };
    Trainer::new(small_model(), train, ::dits::data::DataSource::idx(Path::new("")), device).unwrap()
}

/// The weights a trainer's model holds, read back from its device.
fn weights(t: &Trainer) -> Vec<f32> {
    t.table().read_values(t.model())
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

/// A seed starts the same network on every device (drawn on the CPU, then moved), and 20
/// training steps on wgpu follow the CPU's composed run: the losses step for step within 1e-3
/// relative, the weights within 1e-3. Both bounds are rounding, not approximation: the GPU's
/// reductions group their terms otherwise (relative differences near 1e-6 per operation), and
/// Adam, whose step is `lr·m̂/(√v̂ + ε)`, turns such a difference in a gradient near ε into up to
/// lr (1e-4 here) per step on a few elements; 20 steps of 1e-4 are 2e-3 at the very worst.
#[test]
fn a_seed_starts_and_trains_the_same_network_on_wgpu_and_the_cpu() {
    if !wgpu_present() {
        return;
    }
    ::dits::kernels::set_fused(false);
    let (mut cpu, mut gpu) = (trainer(&Device::flex()), trainer(&wgpu()));
    assert_eq!(weights(&cpu), weights(&gpu), "the initial weights differ between the devices");
    let batch = toy_batch(8);
    let mut worst_loss = 0f32;
    for step in 1..=20 {
        let (a, b) = (cpu.step(&batch).loss, gpu.step(&batch).loss);
        let rel = (a - b).abs() / a.abs().max(1e-6);
        assert!(rel <= 1e-3, "step {step}: loss {a} on the CPU, {b} on wgpu");
        worst_loss = worst_loss.max(rel);
    }
    let d = max_abs_diff(&weights(&cpu), &weights(&gpu));
    eprintln!("wgpu vs CPU (composed), 20 steps: losses within {worst_loss:e} relative, weights within {d:e}");
    assert!(d <= 1e-3, "weights after 20 steps differ by {d}");
}

/// The CLI on wgpu: a run trains there and samples a 20-step chain there; the images match the
/// CPU's composed chain to within two grey levels (the chain's rounding, amplified through 20
/// network calls, then quantised to 8 bits); the checkpoint samples on the CPU and resumes on
/// wgpu from a CPU checkpoint; `--dist devices --ranks 2 --device wgpu` trains; and no line of
/// the Vulkan stack's own reaches stderr as an `error:` line.
#[test]
fn the_cli_trains_samples_and_resumes_across_devices() {
    if !wgpu_present() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    common::write_toy_dataset(&dir.join("data"), 16);
    let run = |args: &[&str]| {
        let args = common::without_pictures(args);
        let out = dits(&args.iter().map(String::as_str).collect::<Vec<_>>(), dir);
        let text = ok(&out);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.lines().any(|l| l.starts_with("error:")), "an error line from a run that worked:\n{stderr}");
        text
    };
    let size = ["--model", "mnist-dits", "--depth", "1"];
    let recipe = ["--steps", "4", "--batch", "8", "--micro-batches", "1", "--no-progress", "--checkpoint-every", "2"];
    let train = |out: &str, device: &str, extra: &[&str]| {
        let args: Vec<&str> =
            [&["train", "--data", "data", "--out", out, "--device", device][..], &size, &recipe, extra].concat();
        run(&args)
    };
    train("gpu", "wgpu", &[]);
    train("cpu", "cpu", &["--composed", "--stop-after", "2"]);
    let sample = |out: &str, device: &str, checkpoint: &str, extra: &[&str]| {
        let args = [
            &["sample", "--checkpoint", checkpoint, "--out", out, "--device", device, "--steps", "20"][..],
            &["--per-class", "1", "--seed", "3", "--no-progress"],
            extra,
        ]
        .concat();
        run(&args)
    };
    sample("s-gpu", "wgpu", "gpu", &[]);
    sample("s-cpu", "cpu", "gpu", &["--composed"]);
    let (a, b) = (pixels(&dir.join("s-gpu")), pixels(&dir.join("s-cpu")));
    assert_eq!(a.len(), b.len());
    let worst = a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
    let mean = a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y) as f64).sum::<f64>() / a.len() as f64;
    eprintln!("20-step chain, wgpu vs CPU: {worst} grey levels at most, {mean:.4} on average");
    assert!(worst <= 2, "samples differ by {worst} grey levels");
    // `dits serve` on wgpu draws what `dits sample` draws there.
    let server = common::server::Server::start(&dir.join("gpu"), &["--device", "wgpu"]);
    let (status, _, png) = common::server::get(&server.url("/sample?class=0&n=1&seed=3&steps=20"));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&png));
    let served = image::load_from_memory(&png).unwrap().to_luma8().into_raw();
    let drawn = image::open(dir.join("s-gpu/0_00000.png")).unwrap().to_luma8().into_raw();
    let worst = served.iter().zip(&drawn).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
    assert!(served.len() == drawn.len() && worst <= 2, "served on wgpu: {worst} grey levels from dits sample's");
    drop(server);
    // The CPU's checkpoint continues on wgpu.
    run(&["train", "--resume", "cpu", "--device", "wgpu", "--no-progress"]);
    assert!(dir.join("cpu/checkpoints/step-00000004/model.safetensors").is_file());
    // Ranks as threads sharing the adapter.
    let text = train("ranks", "wgpu", &["--dist", "devices", "--ranks", "2"]);
    assert!(text.contains("2 ranks"), "{text}");
}

/// Every sample PNG under `dir` (sorted by name), as its 8-bit pixels.
fn pixels(dir: &Path) -> Vec<u8> {
    let mut files: Vec<_> = walk(dir).into_iter().filter(|p| p.extension().is_some_and(|e| e == "png")).collect();
    files.retain(|p| !p.file_name().unwrap().to_string_lossy().starts_with("grid") && !p.ends_with("process.png"));
    files.sort();
    assert!(!files.is_empty(), "no samples in {}", dir.display());
    files.iter().flat_map(|p| image::open(p).unwrap().to_luma8().into_raw()).collect()
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() { out.extend(walk(&path)) } else { out.push(path) }
    }
    out
}
