//! Model weights on disk: safetensors with PyTorch's names and layouts (so the files load in
//! PyTorch with `load_state_dict`), and PyTorch `state_dict` files (`.pth`) of the original
//! code of each family. Loading is strict: a missing, unexpected or mis-shaped tensor is an
//! error naming the file and the tensor.
//!
//! burn names differ from PyTorch's only where PyTorch uses positions inside `nn.Sequential`
//! (mnist-dits: `time_emb.{1,3}`, `ff.{0,2}`; DiT: `t_embedder.mlp.{0,2}`,
//! `adaLN_modulation.1`); burn-store's PyTorch adapters transpose `Linear` weights and rename
//! LayerNorm γ/β. The [`DitNet`] variant name is skipped, so keys are the family's own.

use std::path::Path;

use anyhow::{Context, bail};
use burn::store::{
    ApplyResult, BurnToPyTorchAdapter, ModuleSnapshot, PyTorchToBurnAdapter, PytorchStore, SafetensorsStore,
};

use super::config::Family;
use super::net::DitNet;

/// (burn pattern, PyTorch replacement) applied when saving.
fn to_pytorch(family: Family) -> &'static [(&'static str, &'static str)] {
    match family {
        Family::MnistDits => &[
            (r"^time_emb\.mlp_in\.", "time_emb.1."),
            (r"^time_emb\.mlp_out\.", "time_emb.3."),
            (r"\.ff\.expand\.", ".ff.0."),
            (r"\.ff\.contract\.", ".ff.2."),
        ],
        Family::Dit => &[
            (r"^t_embedder\.mlp_in\.", "t_embedder.mlp.0."),
            (r"^t_embedder\.mlp_out\.", "t_embedder.mlp.2."),
            (r"\.ada_ln\.", ".adaLN_modulation.1."),
        ],
    }
}

/// (PyTorch pattern, burn replacement) applied when loading.
fn from_pytorch(family: Family) -> &'static [(&'static str, &'static str)] {
    match family {
        Family::MnistDits => &[
            (r"^time_emb\.1\.", "time_emb.mlp_in."),
            (r"^time_emb\.3\.", "time_emb.mlp_out."),
            (r"\.ff\.0\.", ".ff.expand."),
            (r"\.ff\.2\.", ".ff.contract."),
        ],
        Family::Dit => &[
            (r"^t_embedder\.mlp\.0\.", "t_embedder.mlp_in."),
            (r"^t_embedder\.mlp\.2\.", "t_embedder.mlp_out."),
            (r"\.adaLN_modulation\.1\.", ".ada_ln."),
        ],
    }
}

/// Buffers of the original code that are functions of the config, recomputed here: their
/// keys are accepted in a `state_dict` but not loaded (mnist-dits' sinusoid frequencies,
/// DiT's fixed sin-cos positions).
const DERIVED_BUFFERS: &[&str] = &["time_emb.0.half_emb", "pos_embed"];

/// Serialise the weights as safetensors bytes with PyTorch names.
pub fn to_safetensors_bytes(model: &DitNet) -> anyhow::Result<Vec<u8>> {
    // One metadata key only: burn's defaults live in a HashMap, whose order (and so the file's
    // bytes and checksum) would change from run to run.
    let mut store = SafetensorsStore::from_bytes(None)
        .with_to_adapter(BurnToPyTorchAdapter)
        .skip_enum_variants(true)
        .clear_metadata()
        .metadata("format", "pt");
    for (from, to) in to_pytorch(model.family()) {
        store = store.with_key_remapping(*from, *to);
    }
    model.save_into(&mut store).context("collecting the model weights")?;
    store.get_bytes().context("serialising the model weights")
}

/// Load safetensors bytes (as written by [`to_safetensors_bytes`]) into `model`.
pub fn load_safetensors_bytes(model: &mut DitNet, bytes: Vec<u8>, origin: &Path) -> anyhow::Result<()> {
    let mut store = SafetensorsStore::from_bytes(Some(bytes))
        .with_from_adapter(PyTorchToBurnAdapter)
        .skip_enum_variants(true)
        .allow_partial(true)
        .validate(true);
    for (from, to) in from_pytorch(model.family()) {
        store = store.with_key_remapping(*from, *to);
    }
    let result = model
        .load_from(&mut store)
        .map_err(|e| anyhow::anyhow!("{}: not a readable safetensors file: {e}", origin.display()))?;
    check_complete(&result, model.family(), origin)
}

/// Load a PyTorch `state_dict` (`torch.save(model.state_dict(), path)`) of mnist-dits or
/// facebookresearch/DiT. The pickle is parsed, never executed.
pub fn load_pytorch(model: &mut DitNet, path: &Path) -> anyhow::Result<()> {
    let mut store = PytorchStore::from_file(path).skip_enum_variants(true).allow_partial(true).validate(true);
    for (from, to) in from_pytorch(model.family()) {
        store = store.with_key_remapping(*from, *to);
    }
    let result = model
        .load_from(&mut store)
        .map_err(|e| anyhow::anyhow!("{}: not a readable PyTorch checkpoint: {e}", path.display()))?;
    check_complete(&result, model.family(), path)
}

fn check_complete(result: &ApplyResult, family: Family, origin: &Path) -> anyhow::Result<()> {
    let name = origin.display();
    if let Some(e) = result.errors.first() {
        bail!("{name}: {e}");
    }
    if let Some((missing, _)) = result.missing.first() {
        bail!(
            "{name}: tensor '{}' is missing ({} missing in all)",
            to_pytorch_name(family, missing),
            result.missing.len()
        );
    }
    let unexpected: Vec<&String> = result.unused.iter().filter(|k| !DERIVED_BUFFERS.contains(&k.as_str())).collect();
    if let Some(k) = unexpected.first() {
        bail!(
            "{name}: unexpected tensor '{k}' ({} unexpected in all): is this a checkpoint of another model?",
            unexpected.len()
        );
    }
    Ok(())
}

/// The PyTorch key for a burn parameter path (for messages).
pub fn to_pytorch_name(family: Family, path: &str) -> String {
    let mut name = path.to_string();
    for (from, to) in to_pytorch(family) {
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
pub fn save_safetensors(model: &DitNet, path: &Path) -> anyhow::Result<()> {
    crate::fsutil::write_atomic(path, &to_safetensors_bytes(model)?)
}

/// Read weights from a file written by [`save_safetensors`].
pub fn load_safetensors(model: &mut DitNet, path: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    load_safetensors_bytes(model, bytes, path)
}

/// Load a model from a weights file of either kind, chosen by its extension.
pub fn load_weights_file(model: &mut DitNet, path: &Path) -> anyhow::Result<()> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("pth" | "pt" | "bin") => load_pytorch(model, path),
        _ => load_safetensors(model, path),
    }
}
