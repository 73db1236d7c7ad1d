//! A tensor-parallel rank's share of the flat parameter vector: the layout of the parameters
//! it holds (the model's own table, with the split tensors narrowed, see
//! [`crate::model::tensor_parallel`]) and the runs that copy them out of the full vector and
//! back. Checkpoints and the start of a run use the full vector, so a run resumes on any grid.

use std::ops::Range;

use super::params::{ParamSlot, ParamTable};
use crate::model::Family;
use crate::model::tensor_parallel::{Split, split_of};

/// Consecutive values shared by the full and a local vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    full: usize,
    local: usize,
    len: usize,
    /// Of a parameter every rank holds whole.
    whole: bool,
}

/// Rank `rank`'s share of the parameters of `full`, split over `ranks`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpLayout {
    pub full: ParamTable,
    pub local: ParamTable,
    family: Family,
    ranks: usize,
    runs: Vec<Run>,
}

impl TpLayout {
    pub fn new(full: &ParamTable, family: Family, rank: usize, ranks: usize) -> Self {
        let (mut slots, mut runs, mut offset) = (Vec::new(), Vec::new(), 0);
        for slot in &full.slots {
            let split = split_of(family, &slot.name);
            let (shape, pieces) = share(slot, split, rank, ranks);
            let mut local = offset;
            for piece in pieces {
                runs.push(Run { full: piece.start, local, len: piece.len(), whole: split == Split::Whole });
                local += piece.len();
            }
            slots.push(ParamSlot { name: slot.name.clone(), shape, offset });
            offset = local;
        }
        Self { full: full.clone(), local: ParamTable { slots, total: offset }, family, ranks, runs }
    }

    /// This rank's values of a full vector.
    pub fn slice(&self, full: &[f32]) -> Vec<f32> {
        assert_eq!(full.len(), self.full.total, "a full parameter vector of the wrong length");
        let mut out = vec![0f32; self.local.total];
        for r in &self.runs {
            out[r.local..r.local + r.len].copy_from_slice(&full[r.full..r.full + r.len]);
        }
        out
    }

    /// The full vector from every rank's local vector, concatenated in rank order (the
    /// group's gather); the whole parameters are taken from rank 0.
    pub fn assemble(&self, locals: &[f32]) -> Vec<f32> {
        assert_eq!(locals.len(), self.local.total * self.ranks, "one local vector per rank");
        let mut full = vec![0f32; self.full.total];
        for (rank, local) in locals.chunks_exact(self.local.total).enumerate() {
            let layout = Self::new(&self.full, self.family, rank, self.ranks);
            for r in layout.runs.iter().filter(|r| rank == 0 || !r.whole) {
                full[r.full..r.full + r.len].copy_from_slice(&local[r.local..r.local + r.len]);
            }
        }
        full
    }
}

/// The local shape of `slot` under `split`, and the ranges of the full vector that make it up.
fn share(slot: &ParamSlot, split: Split, rank: usize, ranks: usize) -> (Vec<usize>, Vec<Range<usize>>) {
    let mut shape = slot.shape.clone();
    match split {
        Split::Whole => (shape, std::iter::once(slot.range()).collect()),
        Split::Columns { chunks } => {
            let cols = *shape.last().expect("a tensor has an axis");
            let (chunk, part) = (cols / chunks, cols / chunks / ranks);
            let rows = slot.len() / cols;
            *shape.last_mut().expect("a tensor has an axis") = cols / ranks;
            let pieces = (0..rows)
                .flat_map(|i| (0..chunks).map(move |k| i * cols + k * chunk + rank * part))
                .map(|start| slot.offset + start..slot.offset + start + part)
                .collect();
            (shape, pieces)
        }
        Split::Rows => {
            let rows = shape[0] / ranks;
            let row_len = slot.len() / shape[0];
            shape[0] = rows;
            let start = slot.offset + rank * rows * row_len;
            (shape, std::iter::once(start..start + rows * row_len).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DitConfig, DitNet};
    use burn::prelude::*;

    /// Every rule of the split names a parameter of the model (no rule silently misses), and
    /// slicing then assembling over the ranks returns the full vector.
    #[test]
    fn slices_assemble_to_the_full_vector_for_both_families() {
        // Per block: mnist-dits' wq, wk, wv, ff.expand (weights and biases), lv and ff.contract
        // (weights); DiT's qkv and fc1 (both), proj and fc2 (weights).
        for (cfg, per_block) in [(DitConfig::mnist_dits(), 10), (DitConfig::preset("dit-s4").unwrap(), 6)] {
            let split_params = per_block * cfg.depth;
            let full = ParamTable::of(&DitNet::new(&cfg, &Device::flex(), 1));
            let split = full.slots.iter().filter(|s| split_of(cfg.family, &s.name) != Split::Whole).count();
            assert_eq!(split, split_params, "{:?}: split parameters", cfg.family);
            let values: Vec<f32> = (0..full.total).map(|i| i as f32).collect();
            for ranks in [1, 2, 4] {
                let layouts: Vec<TpLayout> = (0..ranks).map(|r| TpLayout::new(&full, cfg.family, r, ranks)).collect();
                let locals: Vec<f32> = layouts.iter().flat_map(|l| l.slice(&values)).collect();
                assert_eq!(layouts[0].assemble(&locals), values, "{ranks} ranks");
                let whole: usize =
                    full.slots.iter().filter(|s| split_of(cfg.family, &s.name) == Split::Whole).map(|s| s.len()).sum();
                assert_eq!(layouts[0].local.total, whole + (full.total - whole) / ranks);
            }
        }
    }

    #[test]
    fn a_packed_qkv_keeps_each_ranks_heads_of_q_k_and_v() {
        let slot = ParamSlot { name: "blocks.0.attn.qkv.bias".into(), shape: vec![12], offset: 100 };
        let (shape, pieces) = share(&slot, Split::Columns { chunks: 3 }, 1, 2);
        assert_eq!(shape, vec![6]);
        assert_eq!(pieces, vec![102..104, 106..108, 110..112]);
        let weight = ParamSlot { name: "w".into(), shape: vec![4, 3], offset: 0 };
        assert_eq!(share(&weight, Split::Rows, 1, 2), (vec![2, 3], std::iter::once(6..12).collect()));
    }
}
