//! The evaluations of a run's checkpoints, one JSON line each in `RUN_DIR/evals.jsonl`, so that
//! `dits info` (and a report) can show them later without judging again.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::EvalReport;

/// The file in the run directory.
pub const EVALS_FILE: &str = "evals.jsonl";

/// One evaluation: which checkpoint, at which step, and its figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunEval {
    pub step: u64,
    pub checkpoint: PathBuf,
    pub report: EvalReport,
}

/// Appends `eval` to the run's file.
pub fn append(run_dir: &Path, eval: &RunEval) -> anyhow::Result<()> {
    crate::fsutil::append_json_line(&run_dir.join(EVALS_FILE), eval)
}

/// Every evaluation recorded for the run (lines that do not parse are skipped).
pub fn read(run_dir: &Path) -> Vec<RunEval> {
    crate::fsutil::read_json_lines(&run_dir.join(EVALS_FILE))
}
