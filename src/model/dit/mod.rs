//! The DiT of Peebles & Xie (2023), "Scalable Diffusion Models with Transformers", as
//! facebookresearch/DiT `models.py` builds it: patch embedding + fixed 2-D sin-cos positions →
//! adaLN-Zero blocks → final layer → unpatchify. Parameter names follow its `state_dict`.

pub mod block;
pub mod embed;

use crate::kernels::cast_like;
use burn::prelude::*;

use super::config::DitConfig;
use crate::kernels::patches::PatchOrder;
use crate::kernels::{SequenceParallel, TensorParallel, patchify, unpatchify};
use block::{DitBlock, FinalLayer};
use embed::{LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_2d};

#[derive(Module, Debug)]
pub struct Dit {
    pub x_embedder: PatchEmbed,
    /// `[1, tokens, width]`, fixed: a constant of the module, not a parameter.
    pub pos_embed: Tensor<3>,
    pub t_embedder: TimestepEmbedder,
    pub y_embedder: LabelEmbedder,
    pub blocks: Vec<DitBlock>,
    pub final_layer: FinalLayer,
    pub channels: usize,
    pub patch: usize,
}

impl Dit {
    /// A freshly initialised model (seed the device first for reproducible weights).
    pub fn new(cfg: &DitConfig, device: &Device) -> Self {
        let pos = sincos_2d(cfg.width, cfg.grid());
        Self {
            x_embedder: PatchEmbed::new(cfg.channels, cfg.patch, cfg.width, device),
            pos_embed: Tensor::from_data(TensorData::new(pos, [1, cfg.tokens(), cfg.width]), device),
            t_embedder: TimestepEmbedder::new(cfg.width, device),
            y_embedder: LabelEmbedder::new(cfg.label_rows(), cfg.width, device),
            blocks: (0..cfg.depth).map(|_| DitBlock::new(cfg, device)).collect(),
            final_layer: FinalLayer::new(cfg.width, cfg.patch_values(), device),
            channels: cfg.channels,
            patch: cfg.patch,
        }
    }

    /// `x` `[B, C, H, W]`, `t` `[B]` level indices, `y` `[B]` labels → `[B, C, H, W]`.
    pub fn forward(&self, x: Tensor<4>, t: Tensor<1, Int>, y: Tensor<1, Int>) -> Tensor<4> {
        self.forward_parallel(x, t, y, &TensorParallel::single())
    }

    /// [`Self::forward`] with every block split over the ranks of `tp` (this model holds this
    /// rank's shard of the blocks' weights).
    pub fn forward_parallel(
        &self,
        x: Tensor<4>,
        t: Tensor<1, Int>,
        y: Tensor<1, Int>,
        tp: &TensorParallel,
    ) -> Tensor<4> {
        let [_, c, height, width] = x.dims();
        let x = self.forward_tokens(x, t, y, tp, None); // [B, S, p·p·C]
        // Token (i, j) holds rows i·p.., columns j·p.., values ordered (p, q, C).
        unpatchify(x, c, [height, width], self.patch, PatchOrder::ChannelsLast)
    }

    /// The prediction for this rank's tokens of `sp` (all tokens without it), `[B, S/P, p·p·C]`:
    /// patch embedding, positions, every block and the final layer on the token shard.
    pub fn forward_tokens(
        &self,
        x: Tensor<4>,
        t: Tensor<1, Int>,
        y: Tensor<1, Int>,
        tp: &TensorParallel,
        sp: Option<&SequenceParallel>,
    ) -> Tensor<3> {
        let mut x = match sp {
            None => {
                let tokens = self.x_embedder.forward(x);
                let pos = cast_like(self.pos_embed.clone(), &tokens);
                tokens + pos // [B, S, W]
            }
            Some(sp) => {
                sp.embed_shard(x, self.patch, |band| self.x_embedder.forward(band))
                    + sp.shard_of(self.pos_embed.clone())
            }
        };
        let cond = self.t_embedder.forward(t) + self.y_embedder.forward(y); // [B, W]
        for block in &self.blocks {
            x = block.forward(x, cond.clone(), tp, sp);
        }
        self.final_layer.forward(x, cond)
    }

    /// An image `[B, C, H, W]` in the token layout of [`Self::forward_tokens`]'s output,
    /// `[B, S, p·p·C]` (the inverse of the unpatchify in [`Self::forward_parallel`]).
    pub fn patchify(&self, image: Tensor<4>) -> Tensor<3> {
        patchify(image, self.patch, PatchOrder::ChannelsLast)
    }
}
