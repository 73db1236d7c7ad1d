//! Your own images, end to end: the same images as IDX files, as an image folder and as a CSV
//! give identical training batches; a coloured set trains, samples in colour and is judged;
//! CIFAR-10 files load to their pixels and train; a set streamed from its files trains what the
//! same set in memory trains, resumes exactly and runs on several processes; hostile data is one
//! `error:` line before anything is written.

mod common;

use common::{dits, error_line, ok};

use std::path::{Path, PathBuf};

use dits::data::ImageStore;
use dits::data::idx::encode_idx;
use dits::data::loader::{Epoch, Position, epoch_order, make_batch};
use dits::data::{DataSource, ImageDataset, Split};
use image::{GrayImage, RgbImage};

const FASHION: [&str; 10] =
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];

/// Fashion-MNIST from `../shared` where it is (CI), else the shipped MNIST: the first `n` images
/// of a split.
fn real_images(split: Split, n: usize) -> ImageDataset {
    let fashion = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/fashion-mnist");
    let dir = if fashion.is_dir() { fashion } else { Path::new(env!("CARGO_MANIFEST_DIR")).join("data/mnist") };
    let ds = DataSource::idx(&dir).load(split).unwrap();
    ds.subset(&(0..n).collect::<Vec<_>>())
}

fn save_gray(ds: &ImageDataset, i: usize, path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    GrayImage::from_raw(28, 28, ds.image(i).to_vec()).unwrap().save(path).unwrap();
}

fn write_idx(dir: &Path, prefix: &str, ds: &ImageDataset) {
    std::fs::create_dir_all(dir).unwrap();
    let n = ds.len() as u32;
    std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), encode_idx(&[n, 28, 28], &ds.pixels)).unwrap();
    std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), encode_idx(&[n], &ds.labels)).unwrap();
}

/// The first batches of two epochs, as the trainer's loader builds them.
fn batches(ds: &ImageDataset, seed: u64) -> Vec<(Vec<f32>, Vec<u8>)> {
    let store = ImageStore::Memory(ds.clone());
    (0..2)
        .flat_map(|epoch| {
            let order = epoch_order(ds.len(), seed, epoch);
            (0..3).map(move |index| (order.clone(), Position { epoch, index }))
        })
        .map(|(order, pos)| {
            let b = make_batch(&store, &Epoch { order, flips: None }, 32, pos).unwrap();
            (b.images, b.labels)
        })
        .collect()
}

#[test]
fn idx_folder_and_csv_copies_of_one_set_train_on_identical_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, test) = (real_images(Split::Train, 300), real_images(Split::Test, 60));
    let idx = tmp.path().join("idx");
    write_idx(&idx, "train", &train);
    write_idx(&idx, "t10k", &test);

    // The CSV names its classes (classes.txt gives their order) and lists the files in IDX order.
    let csv = tmp.path().join("csv");
    for (name, ds) in [("train", &train), ("test", &test)] {
        let mut rows = String::from("file,label\n");
        for i in 0..ds.len() {
            let file = format!("{name}/{i:05}.png");
            save_gray(ds, i, &csv.join(&file));
            rows += &format!("{file},\"{}\"\n", FASHION[ds.labels[i] as usize]);
        }
        std::fs::write(csv.join(format!("{name}.csv")), rows).unwrap();
    }
    std::fs::write(csv.join("classes.txt"), FASHION.join("\n")).unwrap();

    // The folder holds train/<label>/ and test/<label>/: classes in name order, files by name.
    let folder = tmp.path().join("folder");
    for (name, ds) in [("train", &train), ("test", &test)] {
        for i in 0..ds.len() {
            save_gray(ds, i, &folder.join(format!("{name}/{}/{i:05}.png", ds.labels[i])));
        }
    }

    let from = |p: &PathBuf, split| DataSource::new(p, None, None, None).unwrap().load(split).unwrap();
    let (from_idx, from_csv, from_folder) =
        (from(&idx, Split::Train), from(&csv, Split::Train), from(&folder, Split::Train));
    assert_eq!(from_csv.classes, FASHION);
    assert_eq!((&from_csv.pixels, &from_csv.labels), (&from_idx.pixels, &from_idx.labels));
    assert_eq!(batches(&from_csv, 7), batches(&from_idx, 7));
    // ImageFolder's order is class by class: the IDX set in that order trains the same batches.
    let mut by_class: Vec<usize> = (0..from_idx.len()).collect();
    by_class.sort_by_key(|&i| from_idx.labels[i]);
    let idx_by_class = from_idx.subset(&by_class);
    assert_eq!((&from_folder.pixels, &from_folder.labels), (&idx_by_class.pixels, &idx_by_class.labels));
    assert_eq!(batches(&from_folder, 7), batches(&idx_by_class, 7));
    // The test splits too.
    assert_eq!(from(&csv, Split::Test).pixels, from(&idx, Split::Test).pixels);
    assert_eq!(from(&folder, Split::Test).len(), test.len());
}

/// MNIST digits tinted by class (red zeros, green ones, …): a colour set with a real signal.
fn write_colour_set(dir: &Path, per_class_train: usize, per_class_test: usize) {
    const TINTS: [[u16; 3]; 10] = [
        [255, 40, 40],
        [40, 255, 40],
        [40, 40, 255],
        [255, 255, 40],
        [40, 255, 255],
        [255, 40, 255],
        [255, 140, 0],
        [140, 0, 255],
        [0, 140, 255],
        [255, 255, 255],
    ];
    const NAMES: [&str; 10] =
        ["red", "green", "blue", "yellow", "cyan", "magenta", "orange", "violet", "azure", "white"];
    let digits = DataSource::idx(&Path::new(env!("CARGO_MANIFEST_DIR")).join("data/mnist")).load(Split::Train).unwrap();
    let mut count = [0usize; 10];
    for i in 0..digits.len() {
        let c = digits.labels[i] as usize;
        let split = match count[c] {
            k if k < per_class_train => "train",
            k if k < per_class_train + per_class_test => "test",
            _ => continue,
        };
        let rgb = RgbImage::from_fn(28, 28, |x, y| {
            let v = digits.image(i)[(y * 28 + x) as usize] as u16;
            image::Rgb(TINTS[c].map(|t| (v * t / 255) as u8))
        });
        let path = dir.join(format!("{split}/{}/{:04}.png", NAMES[c], count[c]));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        rgb.save(path).unwrap();
        count[c] += 1;
        if count.iter().all(|&k| k >= per_class_train + per_class_test) {
            break;
        }
    }
}

#[test]
fn a_colour_folder_trains_samples_in_colour_by_class_name_and_is_judged() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_colour_set(&dir.join("colour"), 20, 5);
    let text = ok(&dits(
        &[
            "train",
            "--data",
            "colour",
            "--out",
            "run",
            "--steps",
            "4",
            "--batch",
            "16",
            "--threads",
            "2",
            "--no-progress",
        ],
        dir,
    ));
    assert!(text.contains("trained to step 4"), "{text}");
    let state = std::fs::read_to_string(dir.join("run/checkpoints/step-00000004/state.json")).unwrap();
    assert!(state.contains("\"channels\": 3") && state.contains("\"violet\""), "{state}");

    ok(&dits(
        &[
            "sample",
            "--checkpoint",
            "run",
            "--out",
            "s",
            "--classes",
            "violet,red",
            "--per-class",
            "2",
            "--no-progress",
        ],
        dir,
    ));
    // Classes sort by name, and files are named by id.
    let names = ["azure", "blue", "cyan", "green", "magenta", "orange", "red", "violet", "white", "yellow"];
    let violet = names.iter().position(|&n| n == "violet").unwrap();
    let img = image::open(dir.join(format!("s/{violet}_00001.png"))).unwrap();
    assert_eq!(img.color(), image::ColorType::Rgb8);
    assert_eq!((img.width(), img.height()), (28, 28));
    assert_eq!(image::open(dir.join("s/grid.png")).unwrap().color(), image::ColorType::Rgb8);
    let line = error_line(&dits(&["sample", "--checkpoint", "run", "--out", "t", "--classes", "purple"], dir));
    assert!(line.contains("unknown class \"purple\"") && line.contains("azure"), "{line}");

    let text =
        ok(&dits(&["eval", "run", "--per-class", "2", "--cache", "cache", "--no-progress", "--threads", "2"], dir));
    assert!(text.contains("accuracy") && text.contains("FID-CNN"), "{text}");
    // The samples directory records its model's data: judged on the colour set, not MNIST.
    let text = ok(&dits(&["eval", "s", "--cache", "cache", "--no-progress", "--threads", "2"], dir));
    assert!(text.contains("4 samples") && text.contains("FID-CNN"), "{text}");
}

#[test]
fn cifar_batches_load_to_their_pixels_and_train() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cifar");
    std::fs::create_dir(&dir).unwrap();
    let record = |label: u8, seed: usize| -> Vec<u8> {
        std::iter::once(label).chain((0..3072).map(|p| ((p * 7 + seed * 13) % 251) as u8)).collect()
    };
    let train: Vec<u8> = (0..40).flat_map(|i| record((i % 10) as u8, i)).collect();
    std::fs::write(dir.join("data_batch_1.bin"), &train).unwrap();
    std::fs::write(dir.join("test_batch.bin"), (0..10).flat_map(|i| record(i as u8, 100 + i)).collect::<Vec<_>>())
        .unwrap();
    let names = "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n";
    std::fs::write(dir.join("batches.meta.txt"), names).unwrap();
    let ds = DataSource::new(&dir, None, None, None).unwrap().load(Split::Train).unwrap();
    assert_eq!((ds.len(), ds.channels, ds.height, ds.width), (40, 3, 32, 32));
    assert_eq!(ds.image(3), &record(3, 3)[1..]);
    assert_eq!(ds.classes[9], "truck");
    let text = ok(&dits(
        &[
            "train",
            "--data",
            "cifar",
            "--out",
            "run",
            "--steps",
            "2",
            "--batch",
            "8",
            "--threads",
            "2",
            "--no-progress",
        ],
        tmp.path(),
    ));
    assert!(text.contains("trained to step 2"), "{text}");
    ok(&dits(&["sample", "--checkpoint", "run", "--out", "s", "--classes", "cat", "--per-class", "1"], tmp.path()));
    assert_eq!(image::open(tmp.path().join("s/3_00000.png")).unwrap().width(), 32);
}

#[test]
fn hostile_data_is_one_error_line_naming_the_file_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_colour_set(&dir.join("set"), 3, 1);
    let victim = dir.join("set/train/blue/0001.png");
    let bytes = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, &bytes[..bytes.len() / 2]).unwrap();
    let train = |data: &str| dits(&["train", "--data", data, "--out", "run", "--steps", "1", "--batch", "4"], dir);
    let line = error_line(&train("set"));
    assert!(line.contains("blue/0001.png"), "{line}");
    assert!(!dir.join("run").exists(), "a failed start wrote its run directory");

    std::fs::write(&victim, &bytes).unwrap();
    std::fs::create_dir(dir.join("set/train/empty")).unwrap();
    assert!(error_line(&train("set")).contains("holds no .png"));
    std::fs::remove_dir(dir.join("set/train/empty")).unwrap();

    std::fs::write(dir.join("list.csv"), "file,label\nset/train/red/0000.png,red\nset/train/nope.png,red\n").unwrap();
    let line = error_line(&train("list.csv"));
    assert!(line.contains("row 3") && line.contains("nope.png"), "{line}");
    std::fs::write(dir.join("classes.txt"), "a\nb\n").unwrap();
    std::fs::write(dir.join("list.csv"), "set/train/red/0000.png,5\n").unwrap();
    assert!(error_line(&train("list.csv")).contains("label 5 is out of range"));
    std::fs::remove_file(dir.join("classes.txt")).unwrap();

    let gray = dir.join("set/train/red/0002.png");
    GrayImage::new(28, 28).save(&gray).unwrap();
    assert!(error_line(&train("set")).contains("channel"));
    RgbImage::new(30, 30).save(&gray).unwrap();
    assert!(error_line(&train("set")).contains("--image-size"));
    assert!(!dir.join("run").exists());
}

/// The weights and moving average a run wrote at `step`.
fn weights(run: &Path, step: u64) -> (Vec<u8>, Vec<u8>) {
    let at = |f: &str| std::fs::read(run.join(format!("checkpoints/step-{step:08}/{f}.safetensors"))).unwrap();
    (at("model"), at("ema"))
}

#[test]
fn a_streamed_folder_trains_as_in_memory_with_flips_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    common::write_toy_folder(&dir.join("data"), 40);
    let train = |out: &str, extra: &[&str]| {
        let flags = ["--steps", "7", "--batch", "8", "--hflip", "--checkpoint-every", "1", "--threads", "1"];
        let args = common::train_args(out, &[&flags[..], &["--no-progress", "--log-every", "1"], extra].concat());
        ok(&dits(&args.iter().map(String::as_str).collect::<Vec<_>>(), dir))
    };
    let memory = train("memory", &[]);
    assert!(memory.contains("images in memory"), "{memory}");
    let streamed = train("streamed", &["--data-memory", "0", "--decode-threads", "3"]);
    assert!(streamed.contains("40 image files streamed, decoded on 3 threads"), "{streamed}");
    assert_eq!(weights(&dir.join("streamed"), 7), weights(&dir.join("memory"), 7));

    // Stopped within the first epoch (5 batches of 8), resumed with another thread count.
    train("resumed", &["--data-memory", "0", "--decode-threads", "1", "--stop-after", "3"]);
    let resume = ["train", "--resume", "resumed", "--data-memory", "0", "--decode-threads", "2", "--threads", "1"];
    ok(&dits(&[&resume[..], &["--no-progress"]].concat(), dir));
    assert_eq!(weights(&dir.join("resumed"), 7), weights(&dir.join("memory"), 7));

    // The flips are real: without them the run differs.
    let plain = ["train", "--data", "data", "--out", "plain", "--steps", "7", "--batch", "8", "--threads", "1"];
    ok(&dits(&[&plain[..], &["--checkpoint-every", "1", "--no-progress"]].concat(), dir));
    assert_ne!(weights(&dir.join("plain"), 7).0, weights(&dir.join("memory"), 7).0);
}

#[test]
fn a_streamed_file_broken_before_a_resume_is_found_by_its_check_and_the_checkpoint_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    common::write_toy_folder(&dir.join("data"), 16);
    let args = common::train_args("run", &["--steps", "2", "--batch", "16", "--data-memory", "0", "--no-progress"]);
    ok(&dits(&args.iter().map(String::as_str).collect::<Vec<_>>(), dir));
    std::fs::write(dir.join("data/train/3/0003.png"), b"gone").unwrap();
    let resume = dits(&["train", "--resume", "run", "--steps", "4", "--data-memory", "0", "--no-progress"], dir);
    // The resumed run checks every file again before its first step (a file breaking during
    // the run is the loader's unit test).
    let line = error_line(&resume);
    assert!(line.contains("3/0003.png"), "{line}");
    assert!(dir.join("run/checkpoints/step-00000002/model.safetensors").is_file());
    assert!(!dir.join("run/checkpoints/step-00000003").exists());
}
