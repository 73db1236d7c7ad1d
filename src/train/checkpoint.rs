//! Checkpoints: a directory per saved step holding the weights (`model.safetensors`, PyTorch
//! names), the optimizer moments (`optimizer.safetensors`) and `state.json` (configs, counters,
//! the RNG scheme, SHA-256 of each file). A checkpoint is written into a temporary directory and
//! renamed into place, then `latest` is switched to it atomically, so a crash at any moment
//! leaves the previous checkpoint intact and loadable.
//!
//! ```text
//! RUN_DIR/checkpoints/step-00001000/{model,ema,optimizer}.safetensors, state.json
//! RUN_DIR/checkpoints/latest          (the name of the newest complete checkpoint)
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use super::state::{FORMAT_VERSION, RunState};
use crate::fsutil::{exchange_dirs, sha256_hex, sync_dir, write_atomic};
use crate::optim::adam::AdamState;

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The moving average of the weights (same format as [`MODEL_FILE`]); sampling uses it.
pub const EMA_FILE: &str = "ema.safetensors";
pub const STATE_FILE: &str = "state.json";
const LATEST: &str = "latest";
/// The bytes of a checkpoint, ready to write or just read and verified.
pub struct Checkpoint {
    pub state: RunState,
    pub model_bytes: Vec<u8>,
    pub ema_bytes: Vec<u8>,
    pub adam: AdamState,
}

/// The folder of a run's checkpoints.
pub const CHECKPOINTS_DIR: &str = "checkpoints";

pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join(CHECKPOINTS_DIR)
}

/// The run directory a checkpoint directory sits in, if it sits in one.
pub fn run_dir_of(checkpoint: &Path) -> Option<PathBuf> {
    checkpoint.parent().filter(|p| p.ends_with(CHECKPOINTS_DIR)).and_then(Path::parent).map(Path::to_path_buf)
}

/// The network of the checkpoint in `dir` with the weights of `file` ([`MODEL_FILE`] or
/// [`EMA_FILE`]), verified against the recorded checksum, and the checkpoint's state.
pub fn load_model(
    dir: &Path,
    file: &str,
    device: &burn::prelude::Device,
) -> anyhow::Result<(crate::model::DitNet, RunState)> {
    let state = read_state(dir)?;
    let bytes = read_verified(dir, &state, file)?;
    let mut model = crate::model::DitNet::new(&state.model, device, 0);
    crate::model::weights::load_safetensors_bytes(&mut model, bytes, &dir.join(file))?;
    Ok((model, state))
}

/// Where the checkpoint of `step` lives under `run_dir`.
pub fn checkpoint_dir(run_dir: &Path, step: u64) -> PathBuf {
    checkpoints_dir(run_dir).join(checkpoint_name(step))
}

fn checkpoint_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Serialise Adam's moments as two flat f32 tensors.
fn adam_to_bytes(adam: &AdamState) -> anyhow::Result<Vec<u8>> {
    let as_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let (m, v) = (as_bytes(&adam.m), as_bytes(&adam.v));
    let n = adam.m.len();
    let views = [("m", TensorView::new(Dtype::F32, vec![n], &m)?), ("v", TensorView::new(Dtype::F32, vec![n], &v)?)];
    let meta = std::collections::HashMap::from([("step".to_string(), adam.step.to_string())]);
    Ok(safetensors::serialize(views, Some(meta))?)
}

fn adam_from_bytes(bytes: &[u8], expected_len: usize, origin: &Path) -> anyhow::Result<AdamState> {
    let name = origin.display();
    let st = SafeTensors::deserialize(bytes).with_context(|| format!("{name}: not a safetensors file"))?;
    let (_, meta) = SafeTensors::read_metadata(bytes)?;
    let step = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("step"))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{name}: no optimizer step count in the metadata"))?;
    let read = |key: &str| -> anyhow::Result<Vec<f32>> {
        let t = st.tensor(key).with_context(|| format!("{name}: no tensor '{key}'"))?;
        ensure!(t.dtype() == Dtype::F32, "{name}: tensor '{key}' is {:?}, expected F32", t.dtype());
        ensure!(
            t.shape() == [expected_len],
            "{name}: tensor '{key}' has shape {:?}, the model has {expected_len} parameters",
            t.shape()
        );
        Ok(t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    };
    Ok(AdamState { m: read("m")?, v: read("v")?, step })
}

/// Write a checkpoint for `state.step` under `run_dir`, switch `latest` to it and keep only
/// the newest `keep` checkpoints. Returns its directory.
pub fn save(
    run_dir: &Path,
    mut state: RunState,
    model_bytes: &[u8],
    ema_bytes: &[u8],
    adam: &AdamState,
    keep: usize,
) -> anyhow::Result<PathBuf> {
    let root = checkpoints_dir(run_dir);
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let name = checkpoint_name(state.step);
    let tmp = root.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;

    let optimizer_bytes = adam_to_bytes(adam)?;
    state.sha256 = BTreeMap::from([
        (MODEL_FILE.to_string(), sha256_hex(model_bytes)),
        (EMA_FILE.to_string(), sha256_hex(ema_bytes)),
        (OPTIMIZER_FILE.to_string(), sha256_hex(&optimizer_bytes)),
    ]);
    let written = (|| {
        write_atomic(&tmp.join(MODEL_FILE), model_bytes)?;
        write_atomic(&tmp.join(EMA_FILE), ema_bytes)?;
        write_atomic(&tmp.join(OPTIMIZER_FILE), &optimizer_bytes)?;
        write_atomic(&tmp.join(STATE_FILE), serde_json::to_string_pretty(&state)?.as_bytes())?;
        let dest = root.join(&name);
        if dest.exists() {
            // Same step saved before a crash: the new copy is complete and takes the old one's
            // place in one exchange (removing the old one first could be cut short by a crash,
            // leaving a checkpoint directory without its files); the old copy, now under the
            // temporary name, goes below.
            exchange_dirs(&tmp, &dest)?;
            std::fs::remove_dir_all(&tmp)?;
        } else {
            std::fs::rename(&tmp, &dest)?;
        }
        sync_dir(&root);
        write_atomic(&root.join(LATEST), name.as_bytes())?;
        Ok::<PathBuf, anyhow::Error>(dest)
    })();
    let dest = match written {
        Ok(d) => d,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e.context(format!("saving checkpoint {name} (the previous checkpoint is intact)")));
        }
    };
    prune(&root, keep);
    Ok(dest)
}

/// Remove all but the newest `keep` checkpoints (never the one `latest` names), and what writes
/// cut short by a crash left behind (temporary names start with a dot; the caller holds the run's
/// lock, so no other process is writing them).
fn prune(root: &Path, keep: usize) {
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with('.') && name.contains(".tmp-") {
            let path = entry.path();
            let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        }
    }
    let mut steps = list(root);
    steps.sort();
    let latest = std::fs::read_to_string(root.join(LATEST)).unwrap_or_default();
    let excess = steps.len().saturating_sub(keep.max(1));
    for name in steps.into_iter().take(excess) {
        if name != latest.trim() {
            let _ = std::fs::remove_dir_all(root.join(name));
        }
    }
}

fn list(root: &Path) -> Vec<String> {
    std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .filter(|n| n.starts_with("step-"))
        .collect()
}

/// The checkpoint directory `path` designates: a run directory (its latest checkpoint) or a
/// checkpoint directory itself.
pub fn resolve(path: &Path) -> anyhow::Result<PathBuf> {
    if path.join(STATE_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    let root = checkpoints_dir(path);
    let latest = root.join(LATEST);
    if latest.is_file() {
        let name = std::fs::read_to_string(&latest).with_context(|| format!("reading {}", latest.display()))?;
        let dir = root.join(name.trim());
        ensure!(
            dir.join(STATE_FILE).is_file(),
            "{} names {}, which is not a checkpoint",
            latest.display(),
            dir.display()
        );
        return Ok(dir);
    }
    if !path.exists() {
        bail!("{} does not exist", path.display());
    }
    bail!("{} holds no checkpoint (expected {}/latest or a {STATE_FILE})", path.display(), root.display())
}

/// Read `state.json` of a checkpoint directory.
pub fn read_state(dir: &Path) -> anyhow::Result<RunState> {
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    parse_state(&bytes, &path)
}

/// Parse the bytes of a `state.json` (read from `path`, named in errors).
pub fn parse_state(bytes: &[u8], path: &Path) -> anyhow::Result<RunState> {
    let state: RunState =
        serde_json::from_slice(bytes).with_context(|| format!("{}: not a dits checkpoint state", path.display()))?;
    ensure!(
        state.format_version == FORMAT_VERSION,
        "{}: checkpoint format {} is not supported (this dits reads {FORMAT_VERSION})",
        path.display(),
        state.format_version
    );
    Ok(state)
}

/// Read a file of a checkpoint and check it against the SHA-256 recorded in `state.json`.
pub fn read_verified(dir: &Path, state: &RunState, file: &str) -> anyhow::Result<Vec<u8>> {
    let path = dir.join(file);
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    verify(&bytes, state, dir, file)?;
    Ok(bytes)
}

/// Check `bytes`, the content of `file` in checkpoint `dir`, against its recorded SHA-256.
fn verify(bytes: &[u8], state: &RunState, dir: &Path, file: &str) -> anyhow::Result<()> {
    let expected =
        state.sha256.get(file).with_context(|| format!("{}: no checksum recorded for {file}", dir.display()))?;
    let found = sha256_hex(bytes);
    ensure!(
        &found == expected,
        "{}: checksum mismatch (file is corrupt or was modified: expected sha256 {expected}, found {found})",
        dir.join(file).display()
    );
    Ok(())
}

/// Load and verify a whole checkpoint.
pub fn load(dir: &Path) -> anyhow::Result<Checkpoint> {
    let state = read_state(dir)?;
    let model_bytes = read_verified(dir, &state, MODEL_FILE)?;
    let ema_bytes = read_verified(dir, &state, EMA_FILE)?;
    let opt_bytes = read_verified(dir, &state, OPTIMIZER_FILE)?;
    assemble(dir, state, model_bytes, ema_bytes, &opt_bytes)
}

/// A checkpoint from the bytes of its four files, verified as [`load`] verifies them (`dir`
/// names the checkpoint in errors). For the fuzz targets and property tests, which have no
/// directory.
pub fn from_bytes(
    dir: &Path,
    state: &[u8],
    model: Vec<u8>,
    ema: Vec<u8>,
    optimizer: &[u8],
) -> anyhow::Result<Checkpoint> {
    let state = parse_state(state, &dir.join(STATE_FILE))?;
    verify(&model, &state, dir, MODEL_FILE)?;
    verify(&ema, &state, dir, EMA_FILE)?;
    verify(optimizer, &state, dir, OPTIMIZER_FILE)?;
    assemble(dir, state, model, ema, optimizer)
}

fn assemble(
    dir: &Path,
    state: RunState,
    model_bytes: Vec<u8>,
    ema_bytes: Vec<u8>,
    opt_bytes: &[u8],
) -> anyhow::Result<Checkpoint> {
    let adam = adam_from_bytes(opt_bytes, state.params.total, &dir.join(OPTIMIZER_FILE))?;
    // fp16 steps skipped for an overflow advanced the run, not Adam.
    let skipped = state.loss_scale.as_ref().map_or(0, |s| s.skipped_steps);
    ensure!(
        adam.step + skipped == state.step,
        "{}: optimizer step {} does not match the checkpoint step {} ({skipped} skipped)",
        dir.display(),
        adam.step,
        state.step
    );
    Ok(Checkpoint { state, model_bytes, ema_bytes, adam })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adam_state_round_trips_and_checks_length() {
        let adam = AdamState { m: vec![1.0, -2.5, 3.25], v: vec![0.5, 0.0, 9.0], step: 42 };
        let bytes = adam_to_bytes(&adam).unwrap();
        let back = adam_from_bytes(&bytes, 3, Path::new("x")).unwrap();
        assert_eq!(back, adam);
        let err = adam_from_bytes(&bytes, 4, Path::new("opt.safetensors")).unwrap_err();
        assert!(err.to_string().contains("4 parameters"), "{err}");
        assert!(adam_from_bytes(&bytes[..10], 3, Path::new("x")).is_err());
    }
}
