//! The run directory: one training process at a time, and a new run never over an old one.

use std::path::Path;

use anyhow::{Context, bail};

use super::{checkpoint, metrics};

/// Where `dits train` writes when no `--out` is given.
pub const DEFAULT_RUN_DIR: &str = "runs/dits";

/// Lock `run_dir` for this process (an advisory lock on `run_dir/.lock`, released by the
/// kernel when the process ends, however it ends).
pub fn lock_run_dir(run_dir: &Path) -> anyhow::Result<std::fs::File> {
    let path = run_dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            bail!("{}: another dits process is training in this run directory", run_dir.display())
        }
        Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {}", path.display())),
    }
}

/// Refuse to start a new run where one already is (its checkpoints or metrics would be mixed).
pub fn ensure_no_run(run_dir: &Path) -> anyhow::Result<()> {
    if checkpoint::checkpoints_dir(run_dir).exists() || run_dir.join(metrics::METRICS_FILE).exists() {
        bail!(
            "{} already holds a training run: pass --resume {} to continue it, or choose another --out",
            run_dir.display(),
            run_dir.display()
        );
    }
    Ok(())
}
