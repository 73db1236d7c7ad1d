//! Model weights on disk: safetensors with PyTorch's names and layouts (so the files load in
//! PyTorch with `load_state_dict`), and PyTorch `state_dict` files (`.pth`) of the original
//! mnist-dits code. Loading is strict: a missing, unexpected or mis-shaped tensor is an error
//! naming the file and the tensor.
//!
//! Burn names differ from PyTorch's only where PyTorch uses positions inside `nn.Sequential`:
//! `time_emb.{1,3}` (our `time_emb.mlp_{in,out}`) and `ff.{0,2}` (our `ff.{expand,contract}`).
//! burn-store's PyTorch adapters transpose `Linear` weights and rename LayerNorm γ/β.

use std::path::Path;

use anyhow::{Context, bail};
use burn::store::{
    ApplyResult, BurnToPyTorchAdapter, ModuleSnapshot, PyTorchToBurnAdapter, PytorchStore, SafetensorsStore,
};

use super::dit::Dit;

/// (burn pattern, PyTorch replacement) applied when saving.
const TO_PYTORCH: &[(&str, &str)] = &[
    (r"^time_emb\.mlp_in\.", "time_emb.1."),
    (r"^time_emb\.mlp_out\.", "time_emb.3."),
    (r"\.ff\.expand\.", ".ff.0."),
    (r"\.ff\.contract\.", ".ff.2."),
];

/// (PyTorch pattern, burn replacement) applied when loading.
const FROM_PYTORCH: &[(&str, &str)] = &[
    (r"^time_emb\.1\.", "time_emb.mlp_in."),
    (r"^time_emb\.3\.", "time_emb.mlp_out."),
    (r"\.ff\.0\.", ".ff.expand."),
    (r"\.ff\.2\.", ".ff.contract."),
];

/// mnist-dits registers the sinusoid frequencies as a buffer; they are a function of the
/// width, recomputed here, so the key is accepted (and checked) but not loaded.
const FREQUENCY_BUFFER: &str = "time_emb.0.half_emb";

/// Serialise the weights as safetensors bytes with PyTorch names.
pub fn to_safetensors_bytes(model: &Dit) -> anyhow::Result<Vec<u8>> {
    // One metadata key only: burn's defaults live in a HashMap, whose order (and so the file's
    // bytes and checksum) would change from run to run.
    let mut store = SafetensorsStore::from_bytes(None)
        .with_to_adapter(BurnToPyTorchAdapter)
        .clear_metadata()
        .metadata("format", "pt");
    for (from, to) in TO_PYTORCH {
        store = store.with_key_remapping(*from, *to);
    }
    model.save_into(&mut store).context("collecting the model weights")?;
    store.get_bytes().context("serialising the model weights")
}

/// Load safetensors bytes (as written by [`to_safetensors_bytes`]) into `model`.
pub fn load_safetensors_bytes(model: &mut Dit, bytes: Vec<u8>, origin: &Path) -> anyhow::Result<()> {
    let mut store = SafetensorsStore::from_bytes(Some(bytes))
        .with_from_adapter(PyTorchToBurnAdapter)
        .allow_partial(true)
        .validate(true);
    for (from, to) in FROM_PYTORCH {
        store = store.with_key_remapping(*from, *to);
    }
    let result = model
        .load_from(&mut store)
        .map_err(|e| anyhow::anyhow!("{}: not a readable safetensors file: {e}", origin.display()))?;
    check_complete(&result, origin)
}

/// Load a PyTorch `state_dict` (`torch.save(model.state_dict(), path)`) of mnist-dits. The
/// pickle is parsed, never executed.
pub fn load_pytorch(model: &mut Dit, path: &Path) -> anyhow::Result<()> {
    let mut store = PytorchStore::from_file(path).allow_partial(true).validate(true);
    for (from, to) in FROM_PYTORCH {
        store = store.with_key_remapping(*from, *to);
    }
    let result = model
        .load_from(&mut store)
        .map_err(|e| anyhow::anyhow!("{}: not a readable PyTorch checkpoint: {e}", path.display()))?;
    check_complete(&result, path)
}

fn check_complete(result: &ApplyResult, origin: &Path) -> anyhow::Result<()> {
    let name = origin.display();
    if let Some(e) = result.errors.first() {
        bail!("{name}: {e}");
    }
    if let Some((missing, _)) = result.missing.first() {
        bail!("{name}: tensor '{}' is missing ({} missing in all)", to_pytorch_name(missing), result.missing.len());
    }
    let unexpected: Vec<&String> = result.unused.iter().filter(|k| k.as_str() != FREQUENCY_BUFFER).collect();
    if let Some(k) = unexpected.first() {
        bail!(
            "{name}: unexpected tensor '{k}' ({} unexpected in all): is this a checkpoint of another model?",
            unexpected.len()
        );
    }
    Ok(())
}

/// The PyTorch key for a burn parameter path (for messages and tests).
pub fn to_pytorch_name(path: &str) -> String {
    let mut name = path.to_string();
    for (from, to) in TO_PYTORCH {
        name = regex::Regex::new(from).expect("static pattern").replace(&name, *to).into_owned();
    }
    // LayerNorm: burn's gamma/beta are PyTorch's weight/bias.
    let re = regex::Regex::new(r"(^|\.)(ln\d*)\.(gamma|beta)$").expect("static pattern");
    re.replace(&name, |c: &regex::Captures| {
        let leaf = if &c[3] == "gamma" { "weight" } else { "bias" };
        format!("{}{}.{leaf}", &c[1], &c[2])
    })
    .into_owned()
}

/// Write the weights of `model` to `path` (atomically: temp file + rename).
pub fn save_safetensors(model: &Dit, path: &Path) -> anyhow::Result<()> {
    crate::fsutil::write_atomic(path, &to_safetensors_bytes(model)?)
}

/// Read weights from a file written by [`save_safetensors`].
pub fn load_safetensors(model: &mut Dit, path: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    load_safetensors_bytes(model, bytes, path)
}

/// Load a model from a weights file of either kind, chosen by its extension.
pub fn load_weights_file(model: &mut Dit, path: &Path) -> anyhow::Result<()> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("pth" | "pt" | "bin") => load_pytorch(model, path),
        _ => load_safetensors(model, path),
    }
}
