//! What a run is at a step, besides its tensors: the state every checkpoint stores.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::budget::TimeBudget;
use super::config::TrainConfig;
use super::params::ParamTable;
use super::precision::LossScale;
use crate::data::DataSource;
use crate::model::DitConfig;

/// The version of `state.json` this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// How every random number of the run is derived (see [`crate::rng`]); stored so a reader knows
/// that (seed, step, epoch) is the complete generator state.
pub const RNG_SCHEME: &str = "chacha8: stream(seed, purpose, index); data order index = epoch, \
                              training noise index = step";

/// A run at a step: its model and recipe, its counters, where its data is, and the layout of
/// its flat parameter vectors. The trainer carries it live; a checkpoint stores it as
/// `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunState {
    pub format_version: u32,
    pub model: DitConfig,
    pub train: TrainConfig,
    /// Optimizer steps completed.
    pub step: u64,
    /// The epoch and batch the next step reads.
    pub epoch: u64,
    pub batch_in_epoch: u64,
    pub rng_seed: u64,
    pub rng_scheme: String,
    /// Training wall-clock seconds so far (for throughput across resumes).
    pub elapsed_s: f64,
    pub data_dir: String,
    /// The data set in full (format, resize, hold-out); `None` in checkpoints written before
    /// dits read other formats, which trained on IDX files in `data_dir`.
    #[serde(default)]
    pub data: Option<DataSource>,
    /// The classes' names, index = label (empty in older checkpoints: the label ids).
    #[serde(default)]
    pub class_names: Vec<String>,
    /// Parameter layout of the flat optimizer vectors.
    pub params: ParamTable,
    /// The run's time budget (`--minutes`), `None` for a length in steps or epochs.
    #[serde(default)]
    pub budget: Option<TimeBudget>,
    /// fp16's dynamic loss scale (`None` in other precisions).
    #[serde(default)]
    pub loss_scale: Option<LossScale>,
    /// SHA-256 of each file beside this one.
    pub sha256: BTreeMap<String, String>,
}

impl RunState {
    /// The run's data set.
    pub fn data_source(&self) -> DataSource {
        self.data.clone().unwrap_or_else(|| DataSource::idx(std::path::Path::new(&self.data_dir)))
    }

    /// The name of each class (the ids where the checkpoint has none).
    pub fn class_names(&self) -> Vec<String> {
        if self.class_names.len() == self.model.classes {
            self.class_names.clone()
        } else {
            (0..self.model.classes).map(|i| i.to_string()).collect()
        }
    }

    pub fn new(model: DitConfig, train: TrainConfig, params: ParamTable, data: DataSource) -> Self {
        let rng_seed = train.seed;
        let loss_scale = train.precision.scales_loss().then(|| LossScale::new(train.loss_scale_power));
        Self {
            format_version: FORMAT_VERSION,
            model,
            train,
            step: 0,
            epoch: 0,
            batch_in_epoch: 0,
            rng_seed,
            rng_scheme: RNG_SCHEME.to_string(),
            elapsed_s: 0.0,
            data_dir: data.path.display().to_string(),
            class_names: Vec::new(),
            data: Some(data),
            params,
            loss_scale,
            budget: None,
            sha256: BTreeMap::new(),
        }
    }
}
