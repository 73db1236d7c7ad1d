//! `dits info RUN`: what a run or checkpoint is, from what it wrote: its recipe, where it
//! stands, its data (with the checksum the judge keys on), its grids and its evaluations.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::data::Split;
use crate::eval::record::{self as evals, RunEval};
use crate::train::{checkpoint, metrics, preview};

/// What `dits info` shows (`--json` prints it as it is).
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    /// The run directory, when the path is one or a checkpoint inside one.
    pub run_dir: Option<PathBuf>,
    pub checkpoint: PathBuf,
    pub step: u64,
    pub total_steps: u64,
    pub epoch: u64,
    pub elapsed_s: f64,
    pub parameters: usize,
    pub model: serde_json::Value,
    pub train: serde_json::Value,
    /// The last logged interval: its mean loss and samples/s.
    pub loss: Option<f64>,
    pub samples_per_s: Option<f64>,
    pub data: DataInfo,
    /// SHA-256 of each checkpoint file, as recorded and verified when loaded.
    pub files: std::collections::BTreeMap<String, String>,
    /// The grids drawn while training (by step), and the samples drawn at its end.
    pub grids: Vec<(u64, PathBuf)>,
    pub final_grid: Option<PathBuf>,
    pub evals: Vec<RunEval>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DataInfo {
    pub path: PathBuf,
    pub format: String,
    pub images: Option<usize>,
    /// Of the training split's pixels and labels (when asked for); `unreadable` says why not
    /// where the data cannot be read.
    pub sha256: Option<String>,
    pub unreadable: Option<String>,
}

/// Reads the run or checkpoint at `path`; `checksum`: also reads its training data, for the
/// checksum.
pub fn describe(path: &Path, checksum: bool) -> anyhow::Result<RunInfo> {
    let dir = checkpoint::resolve(path)?;
    let state = checkpoint::read_state(&dir)?;
    let run_dir = checkpoint::run_dir_of(&dir);
    let last = run_dir.as_deref().map(metrics::read).and_then(|m| m.into_iter().rev().find(|r| r.step <= state.step));
    let source = state.data_source();
    let mut data = DataInfo {
        path: source.path.clone(),
        format: crate::train::recipe::value_name(source.format),
        images: None,
        sha256: None,
        unreadable: None,
    };
    if checksum {
        match source.load(Split::Train) {
            Ok(d) => (data.images, data.sha256) = (Some(d.len()), Some(d.checksum())),
            Err(e) => data.unreadable = Some(format!("{e:#}")),
        }
    }
    let grids = run_dir.as_deref().map(preview::grids).unwrap_or_default();
    let final_grid = run_dir.as_ref().map(|r| r.join("final/grid.png")).filter(|p| p.is_file());
    let evals = run_dir.as_deref().map(evals::read).unwrap_or_default();
    Ok(RunInfo {
        checkpoint: dir,
        step: state.step,
        total_steps: state.train.total_steps,
        epoch: state.epoch,
        elapsed_s: state.elapsed_s,
        parameters: state.params.total,
        model: serde_json::to_value(&state.model)?,
        train: serde_json::to_value(&state.train)?,
        loss: last.as_ref().map(|r| r.loss),
        samples_per_s: last.as_ref().map(|r| r.samples_per_s),
        data,
        files: state.sha256.clone(),
        grids,
        final_grid,
        evals,
        run_dir,
    })
}

/// `key = value` lines of a JSON object, nested objects inline.
fn table(f: &mut fmt::Formatter<'_>, name: &str, v: &serde_json::Value) -> fmt::Result {
    writeln!(f, "[{name}]")?;
    if let Some(map) = v.as_object() {
        for (k, v) in map {
            writeln!(f, "  {k} = {v}")?;
        }
    }
    Ok(())
}

impl fmt::Display for RunInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(r) = &self.run_dir {
            writeln!(f, "run:        {}", r.display())?;
        }
        writeln!(f, "checkpoint: {}", self.checkpoint.display())?;
        let done = if self.step == self.total_steps { "complete" } else { "can be resumed" };
        writeln!(
            f,
            "step:       {} of {} ({done}), epoch {}, {:.1} min of training",
            self.step,
            self.total_steps,
            self.epoch,
            self.elapsed_s / 60.0
        )?;
        if let (Some(loss), Some(rate)) = (self.loss, self.samples_per_s) {
            writeln!(f, "loss:       {loss:.4} (last logged interval, {rate:.0} samples/s)")?;
        }
        writeln!(f, "parameters: {}", self.parameters)?;
        let d = &self.data;
        match (&d.sha256, &d.unreadable) {
            (Some(sha), _) => writeln!(
                f,
                "data:       {} ({}, {} training images, sha256 {sha})",
                d.path.display(),
                d.format,
                d.images.unwrap_or(0)
            )?,
            (None, Some(why)) => {
                writeln!(f, "data:       {} ({}; not readable here: {why})", d.path.display(), d.format)?
            }
            (None, None) => writeln!(f, "data:       {} ({})", d.path.display(), d.format)?,
        }
        if let Some((_, last)) = self.grids.last() {
            writeln!(f, "grids:      {} drawn while training, the last {}", self.grids.len(), last.display())?;
        }
        if let Some(g) = &self.final_grid {
            writeln!(f, "samples:    {}", g.display())?;
        }
        if self.evals.is_empty() {
            writeln!(f, "evals:      none (`dits eval RUN` judges the latest checkpoint and records it)")?;
        }
        for e in &self.evals {
            let r = &e.report;
            writeln!(
                f,
                "eval:       step {}: {} samples, accuracy {:.4} (lowest class {:.4}), FID-CNN {:.3} ({:.2}× the floor {:.3})",
                e.step, r.samples, r.accuracy, r.min_class_accuracy, r.fid, r.fid_ratio, r.fid_floor
            )?;
        }
        table(f, "model", &self.model)?;
        table(f, "train", &self.train)?;
        writeln!(f, "[files]")?;
        for (name, sha) in &self.files {
            writeln!(f, "  {name} = {sha}")?;
        }
        Ok(())
    }
}
