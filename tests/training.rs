//! Training behaviour: the model can learn (overfitting one batch), checkpoints round-trip,
//! and a resumed run ends bit-identical to an uninterrupted one.

mod common;

use std::path::Path;

use burn::prelude::*;
use dits::model::DitConfig;
use dits::train::recipe::TrainOverrides;
use dits::train::{self as trainer, Length, ResumeFlags, Start, TrainConfig, TrainOptions, Trainer};
use dits::train::{checkpoint, metrics};

fn options(data: &Path, run: &Path, steps: u64, resume: bool) -> TrainOptions {
    options_stopping(data, run, steps, None, resume)
}

fn options_stopping(data: &Path, run: &Path, steps: u64, stop_after: Option<u64>, resume: bool) -> TrainOptions {
    let train = TrainConfig { batch: 8, checkpoint_every: 2, log_every: 1, seed: 5, ..Default::default() };
    let start = if resume {
        let steps = TrainOverrides { steps: Some(steps), ..Default::default() };
        Start::Resume(ResumeFlags { train: steps, ..Default::default() })
    } else {
        Start::New {
            data: dits::data::DataSource::idx(data),
            // The default recipe: label dropout (hence a null label) and a decaying learning rate.
            model: DitConfig { null_class: true, ..DitConfig::mnist_dits() },
            train,
            length: Length::Steps(steps),
        }
    };
    TrainOptions {
        run_dir: run.to_path_buf(),
        start,
        stop_after,
        keep: 2,
        progress: false,
        device: Device::flex(),
        grid: Default::default(),
        detect_anomaly: false,
        loader: Default::default(),
        on_checkpoint: None,
    }
}

#[test]
fn overfits_one_small_batch() {
    let mut train = TrainConfig::default();
    train.batch = 16;
    // A constant rate from the first step: the test is whether the model can learn at all.
    train.warmup_steps = 0;
    train.lr_decay = dits::train::LrDecay::None;
    train.label_dropout = 0.0;
    train.lr = 1e-3;
    let mut trainer =
        Trainer::new(DitConfig::mnist_dits(), train, dits::data::DataSource::idx(Path::new("")), &Device::flex())
            .unwrap();
    use rand::Rng;
    let mut rng = dits::rng::stream(1, dits::rng::Purpose::Bench, 0);
    let x0: Vec<f32> = (0..16 * 784).map(|_| rng.random_range(-1.0..1.0)).collect();
    let labels: Vec<u8> = (0..16).map(|i| i % 10).collect();
    let t: Vec<usize> = (0..16).map(|_| rng.random_range(0..1000)).collect();
    let eps = dits::rng::standard_normal(&mut rng, 16 * 784);
    let losses: Vec<f32> = (0..120).map(|_| trainer.step_on(&x0, &labels, &t, eps.clone()).loss).collect();
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(first / last >= 5.0, "loss fell only from {first} to {last}");
}

#[test]
fn resumed_run_equals_uninterrupted_run_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::write_toy_dataset(&data, 40);

    let straight = tmp.path().join("straight");
    let s = trainer::run(options(&data, &straight, 7, false)).unwrap();
    assert_eq!(s.steps, 7);

    let split = tmp.path().join("split");
    // Interrupted at step 3 of 7: the learning-rate schedule still spans 7 steps.
    let first = trainer::run(options_stopping(&data, &split, 7, Some(3), false)).unwrap();
    assert_eq!(first.steps, 3);
    // Crossing an epoch boundary (40 images / batch 8 = 5 steps per epoch) after the resume.
    let r = trainer::run(options(&data, &split, 7, true)).unwrap();
    assert_eq!(r.steps, 7);

    let a = checkpoint::load(&checkpoint::resolve(&straight).unwrap()).unwrap();
    let b = checkpoint::load(&checkpoint::resolve(&split).unwrap()).unwrap();
    assert_eq!(a.state.step, 7);
    assert!(a.model_bytes == b.model_bytes, "weights differ after resume");
    assert!(a.adam == b.adam, "optimizer state differs after resume");
    assert!(a.ema_bytes == b.ema_bytes, "weight average differs after resume");
    assert!(a.ema_bytes != a.model_bytes, "the average is not the raw weights");
    assert_eq!((b.state.epoch, b.state.batch_in_epoch), (1, 2));

    // The metrics log has one record per step, none duplicated by the resume.
    let steps: Vec<u64> = metrics::read(&split).iter().map(|r| r.step).collect();
    assert_eq!(steps, (1..=7).collect::<Vec<_>>());
    assert!(split.join(metrics::LOSS_PLOT).is_file());
    // Only the newest two checkpoints are kept.
    let kept = std::fs::read_dir(checkpoint::checkpoints_dir(&split)).unwrap().count();
    assert_eq!(kept, 3, "two checkpoints and `latest`");
}

#[test]
fn checkpoint_round_trip_restores_weights_and_rejects_corruption() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::write_toy_dataset(&data, 16);
    let run = tmp.path().join("run");
    trainer::run(options(&data, &run, 2, false)).unwrap();
    let dir = checkpoint::resolve(&run).unwrap();
    let ckpt = checkpoint::load(&dir).unwrap();
    let params_before = ckpt.state.params.clone();
    let t = Trainer::from_checkpoint(ckpt, &dir, &Device::flex()).unwrap();
    assert_eq!(t.state.step, 2);
    assert_eq!(t.table(), &params_before);
    // Saved weights reproduce exactly.
    let again = dits::model::weights::to_safetensors_bytes(t.model()).unwrap();
    assert_eq!(again, std::fs::read(dir.join(checkpoint::MODEL_FILE)).unwrap());

    // Flip one byte of the weights: loading names the file and the problem.
    let path = dir.join(checkpoint::MODEL_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    let err = format!("{:#}", checkpoint::load(&dir).err().unwrap());
    assert!(err.contains("model.safetensors") && err.contains("checksum"), "{err}");
    // And resuming refuses without touching the run.
    let before = std::fs::read(&path).unwrap();
    assert!(trainer::run(options(&data, &run, 4, true)).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn a_new_run_refuses_to_overwrite_an_existing_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::write_toy_dataset(&data, 16);
    let run = tmp.path().join("run");
    trainer::run(options(&data, &run, 1, false)).unwrap();
    let err = trainer::run(options(&data, &run, 2, false)).unwrap_err().to_string();
    assert!(err.contains("--resume"), "{err}");
}

/// Micro-batches change how a step is computed, not what it computes: three steps with the
/// batch of 11 split 1, 2 and 3 ways (uneven parts) give the same weights up to float rounding.
#[test]
fn micro_batched_steps_equal_whole_batch_steps() {
    use rand::Rng;
    let mut rng = dits::rng::stream(2, dits::rng::Purpose::Bench, 0);
    let b = 11;
    let x0: Vec<f32> = (0..b * 784).map(|_| rng.random_range(-1.0..1.0)).collect();
    let labels: Vec<u8> = (0..b).map(|i| (i % 11) as u8).collect();
    let t: Vec<usize> = (0..b).map(|_| rng.random_range(0..1000)).collect();
    let eps = dits::rng::standard_normal(&mut rng, b * 784);
    let weights_after = |parts: usize| {
        let mut train = TrainConfig { batch: b, micro_batches: parts, warmup_steps: 0, ..Default::default() };
        // Adam divides by √v: on a weight whose gradient is nearly zero, rounding alone can
        // flip the step's sign. An ε far above √v makes the step proportional to the gradient,
        // so the comparison measures the gradients' agreement.
        train.adam.eps = 1.0;
        train.lr = 0.1;
        let cfg = DitConfig { null_class: true, ..DitConfig::mnist_dits() };
        let mut trainer =
            Trainer::new(cfg, train, dits::data::DataSource::idx(Path::new("")), &Device::flex()).unwrap();
        let losses: Vec<f32> = (0..3).map(|_| trainer.step_on(&x0, &labels, &t, eps.clone()).loss).collect();
        (losses, trainer.params().to_vec())
    };
    let (loss1, w1) = weights_after(1);
    for parts in [2, 3] {
        let (loss, w) = weights_after(parts);
        for (a, b) in loss1.iter().zip(&loss) {
            assert!((a - b).abs() <= 1e-5 * a.abs(), "{parts} parts: loss {loss:?} vs {loss1:?}");
        }
        let max_diff = w1.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(max_diff <= 1e-5, "{parts} parts: weights differ by {max_diff}");
        assert!(w1 != w || parts == 1, "{parts} parts: bit-identical weights; was the batch split at all?");
    }
}
