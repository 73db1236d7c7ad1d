//! A network cut into the pieces that run one at a time: the *shell* (patch, time and label
//! embeddings with the final layer: the network at depth 0) and each block on its own. ZeRO-3
//! gathers one piece's weights at a time, and a pipeline stage runs a run of consecutive
//! pieces, so neither needs the whole network in one module.
//!
//! Between pieces travels the *carry*: the tokens `[B, S, W]` and the condition `[B, W]`
//! (time and label embedding), which every block and the final layer read.

use burn::prelude::*;

use super::config::Family;
use super::dit::block::DitBlock;
use super::mnist_dits::block::MnistDitsBlock;
use super::net::DitNet;
use crate::kernels::TensorParallel;

/// One transformer block of either family.
#[allow(clippy::large_enum_variant)] // a handful of blocks, moved rarely
#[derive(Module, Debug)]
pub enum Block {
    MnistDits(MnistDitsBlock),
    Dit(DitBlock),
}

impl Block {
    /// `x` `[B, S, W]`, `cond` `[B, W]` → `[B, S, W]`.
    pub fn forward(&self, x: Tensor<3>, cond: Tensor<2>, tp: &TensorParallel) -> Tensor<3> {
        match self {
            Block::MnistDits(b) => b.forward(x, cond, tp),
            Block::Dit(b) => b.forward(x, cond, tp, None),
        }
    }
}

/// Where a parameter lives among the pieces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// The embeddings before the blocks.
    Embed,
    Block(usize),
    /// The final layer after the blocks.
    Head,
}

impl Piece {
    /// The piece of the parameter named `name` (a path of the `state_dict`) in `family`.
    pub fn of(family: Family, name: &str) -> Piece {
        let (blocks, head): (&str, &[&str]) = match family {
            Family::MnistDits => ("dits.", &["ln.", "linear."]),
            Family::Dit => ("blocks.", &["final_layer."]),
        };
        if let Some(rest) = name.strip_prefix(blocks) {
            let index = rest.split('.').next().and_then(|i| i.parse().ok());
            return Piece::Block(index.expect("a block parameter's path starts with its index"));
        }
        if head.iter().any(|h| name.starts_with(h)) { Piece::Head } else { Piece::Embed }
    }
}

impl DitNet {
    /// How many blocks the network has.
    pub fn depth(&self) -> usize {
        match self {
            DitNet::MnistDits(m) => m.dits.len(),
            DitNet::Dit(m) => m.blocks.len(),
        }
    }

    /// The network without its blocks (shares the tensors, copies nothing).
    pub fn shell(&self) -> DitNet {
        let mut shell = self.clone();
        match &mut shell {
            DitNet::MnistDits(m) => m.dits.clear(),
            DitNet::Dit(m) => m.blocks.clear(),
        }
        shell
    }

    /// Block `i` as a module of its own (shares the tensors).
    pub fn block(&self, i: usize) -> Block {
        match self {
            DitNet::MnistDits(m) => Block::MnistDits(m.dits[i].clone()),
            DitNet::Dit(m) => Block::Dit(m.blocks[i].clone()),
        }
    }

    /// The embeddings: the image `[B, C, H, W]`, levels and labels → the carry (tokens with
    /// positions `[B, S, W]`, condition `[B, W]`).
    pub fn embed(&self, x: Tensor<4>, t: Tensor<1, Int>, y: Tensor<1, Int>) -> (Tensor<3>, Tensor<2>) {
        match self {
            DitNet::MnistDits(m) => m.embed(x, t, y),
            DitNet::Dit(m) => {
                let tokens = m.x_embedder.forward(x) + m.pos_embed.clone();
                (tokens, m.t_embedder.forward(t) + m.y_embedder.forward(y))
            }
        }
    }

    /// The final layer: the carry → the prediction in the token layout of [`DitNet::patchify`],
    /// `[B, S, C·p²]`.
    pub fn head(&self, x: Tensor<3>, cond: Tensor<2>) -> Tensor<3> {
        match self {
            DitNet::MnistDits(m) => m.head(x),
            DitNet::Dit(m) => m.final_layer.forward(x, cond),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DitConfig;

    /// Shell, blocks and head in turn compute the network's forward.
    #[test]
    fn the_pieces_in_turn_are_the_network() {
        let device = Device::flex();
        for cfg in [DitConfig::mnist_dits(), DitConfig::dit(4, 2, 2, 16)] {
            let net = DitNet::new(&cfg, &device, 5);
            let b = 3;
            let n = cfg.channels * cfg.image_size * cfg.image_size;
            let mut rng = crate::rng::stream(5, crate::rng::Purpose::Bench, 0);
            let dims = [b, cfg.channels, cfg.image_size, cfg.image_size];
            let x =
                Tensor::<4>::from_data(TensorData::new(crate::rng::standard_normal(&mut rng, b * n), dims), &device);
            let t = Tensor::<1, Int>::from_data(TensorData::new(vec![3i64, 500, 999], [b]), &device);
            let y = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 4, 9], [b]), &device);
            let whole = net.patchify(net.forward(x.clone(), t.clone(), y.clone()));
            let shell = net.shell();
            let (mut tokens, cond) = shell.embed(x, t, y);
            for i in 0..net.depth() {
                tokens = net.block(i).forward(tokens, cond.clone(), &TensorParallel::single());
            }
            let pieces = shell.head(tokens, cond);
            let (a, b) =
                (whole.into_data().try_to_vec::<f32>().unwrap(), pieces.into_data().try_to_vec::<f32>().unwrap());
            let worst = a.iter().zip(&b).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
            assert_eq!(worst, 0.0, "{:?}: the pieces differ by {worst}", cfg.family);
        }
    }

    #[test]
    fn parameters_map_to_their_pieces() {
        assert_eq!(Piece::of(Family::MnistDits, "dits.3.wq.weight"), Piece::Block(3));
        assert_eq!(Piece::of(Family::MnistDits, "linear.bias"), Piece::Head);
        assert_eq!(Piece::of(Family::MnistDits, "label_emb.weight"), Piece::Embed);
        assert_eq!(Piece::of(Family::Dit, "blocks.11.mlp.fc1.weight"), Piece::Block(11));
        assert_eq!(Piece::of(Family::Dit, "final_layer.linear.weight"), Piece::Head);
        assert_eq!(Piece::of(Family::Dit, "y_embedder.embedding_table.weight"), Piece::Embed);
    }
}
