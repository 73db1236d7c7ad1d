//! owenliang/mnist-dits, layer for layer: patchify → blocks → final norm and projection →
//! unpatchify.

pub mod block;
pub mod embed;
pub mod folded;
pub mod prepared;

use crate::kernels::cast_like;
use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Embedding, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::Distribution;

use super::config::DitConfig;
use crate::kernels::patches::PatchOrder;
use crate::kernels::{Activation, SequenceParallel, TensorParallel, linear_act, patchify, unpatchify};
use crate::model::patchify::patch_tokens;
use block::MnistDitsBlock;
use embed::{TimeEmbedding, embed_labels, label_embedding};
use prepared::PreparedBlock;

/// Field names follow the PyTorch `state_dict` of owenliang/mnist-dits (see
/// [`super::weights`] for the few that differ).
#[derive(Module, Debug)]
pub struct MnistDits {
    /// Patchify: `Conv2d(C → C·p², kernel p, stride p)`.
    pub conv: Conv2d,
    pub patch_emb: Linear,
    /// Learned position embedding, `[1, tokens, width]`, initialised U[0, 1) as in mnist-dits.
    pub patch_pos_emb: Param<Tensor<3>>,
    pub time_emb: TimeEmbedding,
    pub label_emb: Embedding,
    pub dits: Vec<MnistDitsBlock>,
    pub ln: LayerNorm,
    pub linear: Linear,
    pub channels: usize,
    pub patch: usize,
}

impl MnistDits {
    /// A freshly initialised model (PyTorch's default initialisations; seed the device first
    /// for reproducible weights).
    pub fn new(cfg: &DitConfig, device: &Device) -> Self {
        let pv = cfg.patch_values();
        Self {
            conv: Conv2dConfig::new([cfg.channels, pv], [cfg.patch, cfg.patch])
                .with_stride([cfg.patch, cfg.patch])
                .init(device),
            patch_emb: LinearConfig::new(pv, cfg.width).init(device),
            patch_pos_emb: Param::from_tensor(Tensor::random(
                [1, cfg.tokens(), cfg.width],
                Distribution::Uniform(0.0, 1.0),
                device,
            )),
            time_emb: TimeEmbedding::new(cfg.width, device),
            label_emb: label_embedding(cfg.label_rows(), cfg.width, device),
            dits: (0..cfg.depth).map(|_| MnistDitsBlock::new(cfg, device)).collect(),
            ln: LayerNormConfig::new(cfg.width).init(device),
            linear: LinearConfig::new(cfg.width, pv).init(device),
            channels: cfg.channels,
            patch: cfg.patch,
        }
    }

    /// Predict the noise: `x` `[B, C, H, W]`, `t` `[B]` timesteps, `y` `[B]` labels →
    /// `[B, C, H, W]`.
    pub fn forward(&self, x: Tensor<4>, t: Tensor<1, Int>, y: Tensor<1, Int>) -> Tensor<4> {
        self.forward_blocks(x, t, y, None, &TensorParallel::single())
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
        self.forward_blocks(x, t, y, None, tp)
    }

    /// The blocks prepared for inference (their attention folded; with `pack`, packed for the
    /// fused block kernel where it runs), or `None` where folding would not pay.
    pub fn prepare(&self, pack: bool) -> Option<Vec<PreparedBlock>> {
        let tokens = self.patch_pos_emb.dims()[1];
        self.dits.iter().map(|block| PreparedBlock::new(block, tokens, pack)).collect()
    }

    /// [`Self::forward`] with the blocks prepared by [`Self::prepare`]: inference only.
    pub fn forward_folded(
        &self,
        x: Tensor<4>,
        t: Tensor<1, Int>,
        y: Tensor<1, Int>,
        folded: &[PreparedBlock],
    ) -> Tensor<4> {
        self.forward_blocks(x, t, y, Some(folded), &TensorParallel::single())
    }

    fn forward_blocks(
        &self,
        x: Tensor<4>,
        t: Tensor<1, Int>,
        y: Tensor<1, Int>,
        folded: Option<&[PreparedBlock]>,
        tp: &TensorParallel,
    ) -> Tensor<4> {
        let [_, c, height, width] = x.dims();
        let (mut x, cond) = self.embed(x, t, y);
        for (i, block) in self.dits.iter().enumerate() {
            x = match folded {
                Some(prepared) => prepared[i].forward(block, x, cond.clone()),
                None => block.forward(x, cond.clone(), tp),
            };
        }
        let x = self.head(x); // [B, S, C·p²]
        // Token (i, j) holds patch rows i·p.., columns j·p.., channel-major.
        unpatchify(x, c, [height, width], self.patch, PatchOrder::ChannelsFirst)
    }

    /// The prediction for this rank's tokens of `sp`, `[B, S/P, C·p²]`: every block on the
    /// token shard (their attention exchanged over the group), then the final layer.
    pub fn forward_tokens(
        &self,
        x: Tensor<4>,
        t: Tensor<1, Int>,
        y: Tensor<1, Int>,
        tp: &TensorParallel,
        sp: &SequenceParallel,
    ) -> Tensor<3> {
        let cond = self.condition(t, y);
        let tokens = sp.embed_shard(x, self.patch, |band| self.patch_tokens(band)); // [B, S/P, W]
        let mut x = tokens + sp.shard_of(self.patch_pos_emb.val());
        for block in &self.dits {
            x = block.forward_sequence_shard(x, cond.clone(), tp, sp);
        }
        self.head(x)
    }

    /// An image `[B, C, H, W]` in the token layout of [`Self::forward_tokens`]'s output,
    /// `[B, S, C·p²]` (the inverse of the unpatchify in [`Self::forward`]).
    pub fn patchify(&self, image: Tensor<4>) -> Tensor<3> {
        patchify(image, self.patch, PatchOrder::ChannelsFirst)
    }

    /// Patch tokens with their positions `[B, S, W]`, and the condition `[B, W]`.
    pub(crate) fn embed(&self, x: Tensor<4>, t: Tensor<1, Int>, y: Tensor<1, Int>) -> (Tensor<3>, Tensor<2>) {
        let cond = self.condition(t, y);
        (self.patch_tokens(x) + self.patch_pos_emb.val(), cond) // [B, S, W]
    }

    /// The condition of each image: time and label embeddings, `[B, W]`.
    fn condition(&self, t: Tensor<1, Int>, y: Tensor<1, Int>) -> Tensor<2> {
        self.time_emb.forward(t) + embed_labels(&self.label_emb, y)
    }

    /// The patches of `x` (any band of whole patch rows) as tokens `[B, rows·gw, W]`, without
    /// positions.
    fn patch_tokens(&self, x: Tensor<4>) -> Tensor<3> {
        let x = patch_tokens(&self.conv, x, self.patch); // [B, S, C·p²]
        linear_act(&self.patch_emb, x, Activation::Identity)
    }

    /// The final LayerNorm and Linear: tokens `[B, S, W]` → patch values `[B, S, C·p²]`.
    pub(crate) fn head(&self, x: Tensor<3>) -> Tensor<3> {
        // The final LayerNorm through the fused kernel too (no modulation: shift = scale = 0).
        let none = cast_like(Tensor::<2>::zeros([x.dims()[0], self.ln.gamma.dims()[0]], &x.device()), &x);
        linear_act(&self.linear, block::adaln(&self.ln, x, none.clone(), none), Activation::Identity)
    }
}
