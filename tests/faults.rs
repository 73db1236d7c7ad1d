//! Faults and hostile input: each is one clear `error:` line and a non-zero exit, nothing is
//! written where a run directory was asked for, and what was saved before stays intact and
//! loadable. (Killed processes: `crash.rs`; corrupted checkpoint bytes: `training.rs`.)

mod common;

use common::{dits, fails_with};

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};

use dits::data::idx::encode_idx;
use dits::train::checkpoint;

fn succeeds(out: &Output) {
    assert!(out.status.success(), "dits failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

fn train(out: &str, steps: &str) -> Vec<String> {
    train_every(out, steps, "2")
}

fn train_every(out: &str, steps: &str, every: &str) -> Vec<String> {
    let flags = ["--steps", steps, "--batch", "4", "--checkpoint-every", every];
    common::train_args(out, &[&flags[..], &["--threads", "1", "--no-progress", "--log-every", "1"]].concat())
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn out_of_range_values_and_bad_recipes_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    common::write_toy_dataset(&dir.join("data"), 16);
    std::fs::write(dir.join("unknown.toml"), "[train]\nlearning-rate = 0.1\n").unwrap();
    std::fs::write(dir.join("mistyped.toml"), "[train]\nbatch = \"ten\"\n").unwrap();
    std::fs::write(dir.join("unknown-table.toml"), "[trian]\nbatch = 8\n").unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--batch", "0"], "batch"),
        (&["--lr", "-1"], "--lr"),
        (&["--lr", "nan"], "--lr"),
        (&["--steps", "0"], "at least 1"),
        (&["--epochs", "0"], "at least 1"),
        (&["--patch", "5"], "does not divide"),
        (&["--model", "dit-s4", "--width", "100", "--heads", "6"], "does not divide"),
        (&["--heads", "0"], "heads"),
        (&["--label-dropout", "2"], "--label-dropout"),
        (&["--batch", "17"], "larger than the data set"),
        (&["--config", "unknown.toml"], "learning-rate"),
        (&["--config", "mistyped.toml"], "batch"),
        (&["--config", "unknown-table.toml"], "trian"),
        (&["--threads", "0"], "--threads"),
    ];
    for (extra, needle) in cases {
        let mut a = vec!["train", "--data", "data", "--out", "run"];
        if !extra.iter().any(|e| *e == "--steps" || *e == "--epochs") {
            a.extend(["--steps", "1"]);
        }
        a.extend_from_slice(extra);
        let line = fails_with(&dits(&a, dir), needle);
        assert!(!dir.join("run").exists(), "{extra:?} ({line}) wrote the run directory");
    }
}

#[test]
fn hostile_idx_files_are_one_error_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let images = encode_idx(&[4, 28, 28], &vec![7u8; 4 * 784]);
    let labels = encode_idx(&[4], &[1, 2, 3, 4]);
    let mut bad_magic = images.clone();
    bad_magic[0] = 0x42;
    let mut huge = encode_idx(&[1, 28, 28], &[0u8; 784]);
    huge[4..8].copy_from_slice(&(1u32 << 31).to_be_bytes()); // 2^31 images promised, 784 bytes held
    let truncated = images[..images.len() - 100].to_vec();
    // The training labels define the classes (0..=max), so a label outside them can only be
    // in the test split, which training does not read: dataset.rs's unit tests cover it.
    let cases: &[(&str, Vec<u8>, Vec<u8>, &str)] = &[
        ("magic", bad_magic, labels.clone(), "bad magic"),
        ("huge", huge, labels.clone(), "limit"),
        ("truncated", truncated, labels.clone(), "truncated"),
        ("count", images.clone(), encode_idx(&[3], &[1, 2, 3]), "labels"),
        ("rank", labels.clone(), labels.clone(), "dimensions"),
    ];
    for (name, img, lab, needle) in cases {
        let data = dir.join(name);
        std::fs::create_dir_all(&data).unwrap();
        for split in ["train", "t10k"] {
            std::fs::write(data.join(format!("{split}-images-idx3-ubyte")), img).unwrap();
            std::fs::write(data.join(format!("{split}-labels-idx1-ubyte")), lab).unwrap();
        }
        let out = dits(&["train", "--data", name, "--out", "run", "--steps", "1", "--batch", "2"], dir);
        let line = fails_with(&out, needle);
        assert!(line.contains(&format!("{name}/")), "{line} does not name the file");
        assert!(!dir.join("run").exists());
    }
}

/// The file-size limit (`ulimit -f`) makes the checkpoint write fail as a full disk would
/// (EFBIG instead of ENOSPC, through the same code path): one error, the previous checkpoint
/// intact and still `latest`, no partial files; the run resumes once space is back.
#[test]
fn a_full_disk_during_a_checkpoint_keeps_the_previous_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    common::write_toy_dataset(&dir.join("data"), 16);
    succeeds(&dits(&args(&train("run", "6")), dir));
    let run = dir.join("run");
    let before = checkpoint::resolve(&run).unwrap();
    assert!(before.ends_with("step-00000006"));

    // Continue to step 10 with at most 512 KiB per file: the weights (1.5 MB) no longer fit.
    let cmd = format!(
        "trap '' XFSZ; ulimit -f 1024; exec {} train --resume run --steps 10 --threads 1 --no-progress",
        env!("CARGO_BIN_EXE_dits")
    );
    let out = Command::new("sh").args(["-c", &cmd]).current_dir(dir).output().unwrap();
    let line = fails_with(&out, "saving checkpoint step-00000008");
    assert!(line.contains("previous checkpoint is intact") && line.contains("File too large"), "{line}");
    assert_eq!(checkpoint::resolve(&run).unwrap(), before, "latest moved off the good checkpoint");
    checkpoint::load(&before).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(checkpoint::checkpoints_dir(&run))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.') || n == "step-00000008")
        .collect();
    assert!(leftovers.is_empty(), "partial checkpoint left: {leftovers:?}");
    succeeds(&dits(&["train", "--resume", "run", "--steps", "10", "--threads", "1"], dir));
    assert!(checkpoint::resolve(&run).unwrap().ends_with("step-00000010"));
}

#[test]
fn an_unwritable_run_directory_is_one_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    common::write_toy_dataset(&dir.join("data"), 16);
    std::fs::write(dir.join("a-file"), "not a directory").unwrap();
    fails_with(&dits(&args(&train("a-file/run", "2")), dir), "a-file/run");
    assert_eq!(std::fs::read_to_string(dir.join("a-file")).unwrap(), "not a directory");
    // Permissions stop everyone but root (CI runs as root, where this part cannot fail).
    if !is_root() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir(dir.join("locked")).unwrap();
        std::fs::set_permissions(dir.join("locked"), std::fs::Permissions::from_mode(0o555)).unwrap();
        fails_with(&dits(&args(&train("locked/run", "2")), dir), "locked/run");
    }
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

#[test]
fn a_nan_loss_stops_with_the_step_and_cause_and_keeps_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    common::write_toy_dataset(&dir.join("data"), 16);
    let mut a = train_every("run", "20", "1");
    a.extend(["--lr", "1e30", "--warmup-steps", "0"].map(String::from));
    let line = fails_with(&dits(&args(&a), dir), "the loss became");
    assert!(line.contains("at step") && line.contains("--lr"), "{line}");
    let kept = checkpoint::resolve(&dir.join("run")).unwrap();
    checkpoint::load(&kept).unwrap();

    // --detect-anomaly names the parameter, before the optimizer uses the gradient.
    a[4] = "run-anomaly".into();
    a.push("--detect-anomaly".into());
    let line = fails_with(&dits(&args(&a), dir), "anomaly at step");
    assert!(line.contains("the loss is") || line.contains("the gradient of"), "{line}");
}

#[test]
fn checkpoints_and_weights_of_another_model_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    common::write_toy_dataset(&dir.join("data"), 16);
    succeeds(&dits(&args(&train("run", "2")), dir));
    let ckpt = checkpoint::resolve(&dir.join("run")).unwrap();

    // The weights file alone, loaded as another preset: the tensor is named.
    std::fs::copy(ckpt.join("model.safetensors"), dir.join("weights.safetensors")).unwrap();
    let line = fails_with(
        &dits(&["sample", "--checkpoint", "weights.safetensors", "--model", "dit-s4", "--out", "s"], dir),
        "weights.safetensors",
    );
    assert!(line.contains("tensor") || line.contains("missing") || line.contains("unexpected"), "{line}");
    // The original mnist-dits `.pth` as the DiT family: unexpected keys, named.
    let pth = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden_mnist_dits.pth");
    let line = fails_with(
        &dits(&["sample", "--checkpoint", pth.to_str().unwrap(), "--model", "dit-s4", "--out", "s"], dir),
        "golden_mnist_dits.pth",
    );
    assert!(line.contains("tensor") || line.contains("missing") || line.contains("unexpected"), "{line}");

    // A state.json that describes another model: resume refuses, the checkpoint untouched.
    let state_path = ckpt.join("state.json");
    let state = std::fs::read_to_string(&state_path).unwrap();
    let edited = state.replacen("\"width\": 64", "\"width\": 32", 1);
    assert_ne!(edited, state);
    std::fs::write(&state_path, &edited).unwrap();
    let files_before: Vec<Vec<u8>> = ["model", "ema", "optimizer"]
        .iter()
        .map(|f| std::fs::read(ckpt.join(format!("{f}.safetensors"))).unwrap())
        .collect();
    fails_with(&dits(&["train", "--resume", "run", "--steps", "4"], dir), "run/checkpoints/step-00000002");
    let files_after: Vec<Vec<u8>> = ["model", "ema", "optimizer"]
        .iter()
        .map(|f| std::fs::read(ckpt.join(format!("{f}.safetensors"))).unwrap())
        .collect();
    assert!(files_before == files_after);
    assert_eq!(std::fs::read_to_string(&state_path).unwrap(), edited);
}

/// A `.pth` is a zip around a pickle, and a pickle can name any Python callable; `torch.load`
/// without `weights_only` calls it. dits reads the pickle as data: this one would run
/// `os.system("touch PWNED")` under Python, and here is only an error.
#[test]
fn a_malicious_pth_is_refused_without_running_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let command = b"touch PWNED";
    let mut pickle = vec![0x80, 0x02]; // PROTO 2
    pickle.extend_from_slice(b"cos\nsystem\n"); // GLOBAL os.system
    pickle.push(b'X'); // BINUNICODE
    pickle.extend_from_slice(&(command.len() as u32).to_le_bytes());
    pickle.extend_from_slice(command);
    pickle.extend_from_slice(&[0x85, b'R', b'.']); // TUPLE1, REDUCE, STOP
    let file = std::fs::File::create(dir.join("evil.pth")).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("evil/data.pkl", opts).unwrap();
    zip.write_all(&pickle).unwrap();
    zip.start_file("evil/version", opts).unwrap();
    zip.write_all(b"3\n").unwrap();
    zip.finish().unwrap();
    fails_with(&dits(&["sample", "--checkpoint", "evil.pth", "--out", "s"], dir), "evil.pth");
    assert!(!dir.join("PWNED").exists());
    assert!(!dir.join("s").exists());
}

mod loader_properties {
    use std::path::{Path, PathBuf};
    use std::sync::OnceLock;

    use burn::prelude::Device;
    use dits::fsutil::sha256_hex;
    use dits::train::Trainer;
    use dits::train::checkpoint::{self, Checkpoint};
    use proptest::prelude::*;

    const FILES: [&str; 4] = ["state.json", "model.safetensors", "ema.safetensors", "optimizer.safetensors"];

    /// The four files of a real 2-step checkpoint, made once.
    fn files() -> &'static [Vec<u8>; 4] {
        static FILES_OF: OnceLock<[Vec<u8>; 4]> = OnceLock::new();
        FILES_OF.get_or_init(|| {
            let dir: PathBuf = tempfile::tempdir().unwrap().keep();
            super::common::write_toy_dataset(&dir.join("data"), 16);
            super::succeeds(&super::dits(&super::args(&super::train("run", "2")), &dir));
            let ckpt = checkpoint::resolve(&dir.join("run")).unwrap();
            let files = FILES.map(|f| std::fs::read(ckpt.join(f)).unwrap());
            let _ = std::fs::remove_dir_all(&dir);
            files
        })
    }

    /// Parse, then build a trainer: either may refuse, neither may panic.
    fn load(files: &[Vec<u8>; 4]) -> anyhow::Result<()> {
        let dir = Path::new("ckpt");
        let ckpt: Checkpoint = checkpoint::from_bytes(dir, &files[0], files[1].clone(), files[2].clone(), &files[3])?;
        Trainer::from_checkpoint(ckpt, dir, &Device::flex()).map(|_| ())
    }

    #[derive(Debug, Clone)]
    enum Damage {
        Flip { at: usize, bit: u8 },
        Truncate { at: usize },
        Append { bytes: Vec<u8> },
    }

    fn damage() -> impl Strategy<Value = Damage> {
        prop_oneof![
            (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Damage::Flip { at, bit }),
            any::<usize>().prop_map(|at| Damage::Truncate { at }),
            proptest::collection::vec(any::<u8>(), 1..16).prop_map(|bytes| Damage::Append { bytes }),
        ]
    }

    fn apply(bytes: &mut Vec<u8>, d: &Damage) {
        match d {
            Damage::Flip { at, bit } => {
                let i = at % bytes.len();
                bytes[i] ^= 1 << bit;
            }
            Damage::Truncate { at } => bytes.truncate(at % bytes.len()),
            Damage::Append { bytes: extra } => bytes.extend_from_slice(extra),
        }
    }

    #[test]
    fn the_intact_checkpoint_loads() {
        load(files()).unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

        /// Any damage to a checksummed file is caught; damage to state.json may parse (a
        /// changed digit of a number) but never panics.
        #[test]
        fn damaged_files_are_errors_not_panics(file in 0usize..4, d in damage()) {
            let mut f = files().clone();
            apply(&mut f[file], &d);
            let result = load(&f);
            if file > 0 {
                let err = format!("{:#}", result.expect_err("damage to a checksummed file was not caught"));
                prop_assert!(err.contains(FILES[file]), "{err}");
            }
        }

        /// Damaged contents behind a *matching* checksum (as a buggy writer would leave): the
        /// safetensors and optimizer parsers refuse or accept, never panic.
        #[test]
        fn damaged_contents_with_matching_checksums_never_panic(file in 1usize..4, d in damage()) {
            let mut f = files().clone();
            apply(&mut f[file], &d);
            let state = String::from_utf8(f[0].clone()).unwrap();
            let old = sha256_hex(&files()[file]);
            f[0] = state.replace(&old, &sha256_hex(&f[file])).into_bytes();
            let _ = load(&f);
        }
    }
}
