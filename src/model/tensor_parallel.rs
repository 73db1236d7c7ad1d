//! How Megatron-LM splits a DiT block over a tensor-parallel group of `T` ranks, by parameter
//! name: each rank holds `H/T` heads (the query, key and value columns of its heads, the
//! matching rows of the output projection) and `1/T` of the MLP's hidden columns (the first
//! Linear's columns, the second's rows); everything else (embeddings, the adaLN modulation, the
//! final layer, LayerNorms and the row-parallel layers' biases, added after the sum) is whole
//! on every rank. Burn's Linear weights are `[in, out]`.

use anyhow::ensure;

use super::config::{DitConfig, Family};

/// A parameter's share on each rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The whole tensor on every rank.
    Whole,
    /// Along the last axis, in `chunks` equal chunks each split over the ranks (3 for a packed
    /// `q|k|v` projection): a column-parallel weight `[in, out]` or its bias `[out]`.
    Columns { chunks: usize },
    /// Along the first axis: a row-parallel weight `[in, out]`.
    Rows,
}

/// The split of the parameter `name` (a [`crate::model::DitNet`] parameter path) of `family`.
pub fn split_of(family: Family, name: &str) -> Split {
    let Some((_, layer)) = name.split_once('.').and_then(|(blocks, rest)| {
        let is_block = matches!((family, blocks), (Family::Dit, "blocks") | (Family::MnistDits, "dits"));
        is_block.then(|| rest.split_once('.')).flatten()
    }) else {
        return Split::Whole;
    };
    let columns = |chunks| Split::Columns { chunks };
    match (family, layer) {
        (Family::Dit, "attn.qkv.weight" | "attn.qkv.bias") => columns(3),
        (Family::Dit, "mlp.fc1.weight" | "mlp.fc1.bias") => columns(1),
        (Family::Dit, "attn.proj.weight" | "mlp.fc2.weight") => Split::Rows,
        (Family::MnistDits, "wq.weight" | "wq.bias" | "wk.weight" | "wk.bias" | "wv.weight" | "wv.bias") => columns(1),
        (Family::MnistDits, "ff.expand.weight" | "ff.expand.bias") => columns(1),
        (Family::MnistDits, "lv.weight" | "ff.contract.weight") => Split::Rows,
        _ => Split::Whole,
    }
}

/// Whether `cfg`'s blocks split over `ranks`: the heads and the MLP's hidden width must divide.
pub fn check(cfg: &DitConfig, ranks: usize) -> anyhow::Result<()> {
    let hidden = cfg.mlp_ratio * cfg.width;
    ensure!(
        cfg.heads.is_multiple_of(ranks) && hidden.is_multiple_of(ranks),
        "--tp {ranks} must divide the head count and the MLP width: the model has {} heads and an MLP {hidden} wide",
        cfg.heads
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_matrices_split_and_the_rest_stays_whole() {
        let (dit, mnist) = (Family::Dit, Family::MnistDits);
        assert_eq!(split_of(dit, "blocks.3.attn.qkv.weight"), Split::Columns { chunks: 3 });
        assert_eq!(split_of(dit, "blocks.0.attn.proj.weight"), Split::Rows);
        assert_eq!(split_of(dit, "blocks.0.attn.proj.bias"), Split::Whole);
        assert_eq!(split_of(dit, "blocks.0.ada_ln.weight"), Split::Whole);
        assert_eq!(split_of(dit, "final_layer.linear.weight"), Split::Whole);
        assert_eq!(split_of(mnist, "dits.1.wk.bias"), Split::Columns { chunks: 1 });
        assert_eq!(split_of(mnist, "dits.1.ff.contract.weight"), Split::Rows);
        assert_eq!(split_of(mnist, "dits.1.gamma1.weight"), Split::Whole);
        assert_eq!(split_of(mnist, "linear.weight"), Split::Whole);
    }

    #[test]
    fn the_ranks_must_divide_heads_and_mlp_width() {
        let cfg = DitConfig::mnist_dits();
        assert!(check(&cfg, 2).is_ok() && check(&cfg, 4).is_ok());
        let err = check(&cfg, 3).unwrap_err().to_string();
        assert!(err.contains("--tp 3") && err.contains("4 heads"), "{err}");
    }
}
