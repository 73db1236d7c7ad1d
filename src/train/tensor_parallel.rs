//! A trainer on a tensor-parallel group: from the full parameters every rank received, this
//! rank keeps its shard (weights, moving average, Adam's moments) and a model of that shard;
//! at a checkpoint the shards are gathered back into the full layout.

use super::step::Trainer;
use super::tp_layout::TpLayout;
use crate::kernels::TensorParallel;
use crate::model::{DitNet, tensor_parallel};
use crate::optim::AdamState;

impl Trainer {
    /// Split the blocks over the ranks of `tp`: keep this rank's shard of every vector. Every
    /// rank must hold the same full trainer when this is called, and call it before
    /// [`Trainer::with_data_parallel`] (which shards the optimizer state further).
    pub fn with_tensor_parallel(mut self, tp: TensorParallel) -> anyhow::Result<Self> {
        if tp.size() == 1 {
            return Ok(self);
        }
        tensor_parallel::check(&self.state.model, tp.size())?;
        let layout = TpLayout::new(&self.table, self.state.model.family, tp.rank(), tp.size());
        self.params = layout.slice(&self.params);
        self.ema = layout.slice(&self.ema);
        self.adam = AdamState { m: layout.slice(&self.adam.m), v: layout.slice(&self.adam.v), step: self.adam.step };
        self.model = layout.local.write_values(self.model, &self.params);
        self.table = layout.local.clone();
        (self.tp, self.layout) = (tp, Some(layout));
        Ok(self)
    }

    /// The full model, moving average and optimizer state (`adam`: this rank's, gathered over
    /// its data-parallel group) on the group's first rank, `None` on the others. Every rank of
    /// the tensor-parallel group must call this.
    pub(super) fn gather_shards(&self, adam: AdamState) -> Option<(DitNet, Vec<f32>, AdamState)> {
        let (Some(layout), Some(comm)) = (&self.layout, self.tp.comm()) else {
            return Some((self.model.clone(), self.ema.clone(), adam));
        };
        let gather = |v: &[f32]| comm.gather_to_root(v).map(|all| layout.assemble(&all));
        let (params, ema, m, v) = (gather(&self.params), gather(&self.ema), gather(&adam.m), gather(&adam.v));
        let model = layout.full.write_values(self.model.clone(), &params?);
        Some((model, ema?, AdamState { m: m?, v: v?, step: adam.step }))
    }
}
