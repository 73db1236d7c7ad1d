//! `dits eval` end to end on a toy data set: the classifier is trained once and cached, real
//! images named by their labels score better than the same images misnamed, and bad sample
//! directories give one clear error.

mod common;

use common::dits;

use std::path::Path;
use std::process::Output;

use dits::data::{ImageDataset, Split};

/// Save test image `i` of `ds` as `<name>.png` in `dir`.
fn save(ds: &ImageDataset, i: usize, dir: &Path, name: &str) {
    let img = image::GrayImage::from_raw(28, 28, ds.image(i).to_vec()).unwrap();
    img.save(dir.join(format!("{name}.png"))).unwrap();
}

fn report(out: &Output) -> serde_json::Value {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "dits eval failed:\n{stderr}");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn eval_scores_samples_caches_its_classifier_and_rejects_bad_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    common::write_toy_dataset(&dir.join("data"), 1280);
    let ds = ImageDataset::load(&dir.join("data"), Split::Test, 10).unwrap();
    std::fs::create_dir_all(dir.join("right")).unwrap();
    std::fs::create_dir_all(dir.join("wrong")).unwrap();
    for i in 0..100 {
        let c = ds.labels[i];
        save(&ds, i, &dir.join("right"), &format!("{c}_{i:05}"));
        save(&ds, i, &dir.join("wrong"), &format!("{}_{i:05}", (c + 5) % 10));
    }
    std::fs::write(dir.join("right/notes.txt"), "ignored").unwrap();
    let eval =
        |samples: &str| dits(&["eval", samples, "--data", "data", "--cache", "cache", "--json", "--threads", "2"], dir);

    let right = report(&eval("right"));
    assert_eq!(right["samples"], 100);
    let cached: Vec<_> = std::fs::read_dir(dir.join("cache")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(cached.len(), 2, "weights and record: {cached:?}");
    let out = eval("wrong");
    assert!(String::from_utf8_lossy(&out.stderr).contains("classifier: "), "the cached classifier is reused");
    let wrong = report(&out);

    let acc = |r: &serde_json::Value| r["accuracy"].as_f64().unwrap();
    assert!(acc(&right) > 0.5 && acc(&right) > acc(&wrong) + 0.3, "right {} wrong {}", acc(&right), acc(&wrong));
    assert_eq!(right["per_class"].as_array().unwrap().len(), 10);
    let (fid, floor) = (right["fid"].as_f64().unwrap(), right["fid_floor"].as_f64().unwrap());
    assert!(fid >= 0.0 && floor >= 0.0 && fid.is_finite());
    let wrong_fid = wrong["fid"].as_f64().unwrap();
    assert!((fid - wrong_fid).abs() <= 1e-3 * fid.max(1.0), "FID does not depend on the names: {fid} vs {wrong_fid}");
    // Per class: a FID and its floor; overall: the ratio and the lowest class.
    for c in right["per_class"].as_array().unwrap() {
        assert!(c["fid"].as_f64().unwrap().is_finite() && c["fid_floor"].as_f64().unwrap() >= 0.0, "{c}");
    }
    let lowest =
        right["per_class"].as_array().unwrap().iter().map(|c| c["accuracy"].as_f64().unwrap()).fold(1.0, f64::min);
    assert_eq!(right["min_class_accuracy"].as_f64(), Some(lowest));
    assert!((right["fid_ratio"].as_f64().unwrap() - fid / floor).abs() < 1e-9);
    // Test images are not training images: few of them are "near-copies".
    let right_share = right["memorisation"]["share"].as_f64().unwrap();
    assert!(right_share < 0.3, "{}", right["memorisation"]);

    // Copies of training images are caught as near-copies.
    let train = ImageDataset::load(&dir.join("data"), Split::Train, 10).unwrap();
    std::fs::create_dir_all(dir.join("copies")).unwrap();
    for i in 0..100 {
        save(&train, i, &dir.join("copies"), &format!("{}_{i:05}", train.labels[i]));
    }
    let copies = report(&eval("copies"));
    let share = copies["memorisation"]["share"].as_f64().unwrap();
    assert!(share > 0.5 && share > right_share + 0.3, "training images themselves: {share} near-copies");

    // A run directory is sampled first (here 3 images per class), then judged.
    let run = ["train", "--data", "data", "--out", "run", "--steps", "3", "--depth", "1", "--no-progress"];
    assert!(dits(&run, dir).status.success());
    let drawn = dits(&["eval", "run", "--per-class", "3", "--cache", "cache", "--json", "--no-progress"], dir);
    assert_eq!(report(&drawn)["samples"], 30);

    // Bad inputs: one error line, non-zero exit.
    let fails_with = |args: &[&str], needle: &str| {
        let out = dits(args, dir);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.lines().any(|l| l.starts_with("error:") && l.contains(needle)), "{needle:?} not in:\n{err}");
    };
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    fails_with(&["eval", "empty", "--data", "data", "--cache", "cache"], "at least 2 files");
    fails_with(&["eval", "nowhere", "--data", "data", "--cache", "cache"], "does not exist");
    std::fs::create_dir_all(dir.join("big")).unwrap();
    for i in 0..2 {
        image::GrayImage::new(32, 32).save(dir.join(format!("big/1_{i}.png"))).unwrap();
    }
    fails_with(&["eval", "big", "--data", "data", "--cache", "cache"], "32×32");
    std::fs::create_dir_all(dir.join("class")).unwrap();
    save(&ds, 0, &dir.join("class"), "3_0");
    save(&ds, 1, &dir.join("class"), "10_1");
    fails_with(&["eval", "class", "--data", "data", "--cache", "cache"], "class 10");
    std::fs::write(dir.join("class/10_1.png"), b"not a png").unwrap();
    std::fs::rename(dir.join("class/10_1.png"), dir.join("class/4_1.png")).unwrap();
    fails_with(&["eval", "class", "--data", "data", "--cache", "cache"], "not a readable PNG");
}
