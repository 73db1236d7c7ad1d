//! The condition vector: a sinusoidal timestep embedding through a small MLP, plus a learned
//! label embedding (mnist-dits adds the two).

use crate::kernels::cast_like;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::relu;

/// `t -> [sin(t·f), cos(t·f)] -> Linear -> ReLU -> Linear`, PyTorch keys `time_emb.1` and
/// `time_emb.3` (index 0 is the parameter-free sinusoid, 2 the ReLU).
#[derive(Module, Debug)]
pub struct TimeEmbedding {
    pub mlp_in: Linear,
    pub mlp_out: Linear,
    pub width: usize,
}

impl TimeEmbedding {
    pub fn new(width: usize, device: &Device) -> Self {
        Self {
            mlp_in: LinearConfig::new(width, width).init(device),
            mlp_out: LinearConfig::new(width, width).init(device),
            width,
        }
    }

    /// `t`: `[batch]` integer timesteps → `[batch, width]`.
    pub fn forward(&self, t: Tensor<1, Int>) -> Tensor<2> {
        let device = t.device();
        let freqs = Tensor::<1>::from_floats(sinusoid_frequencies(self.width).as_slice(), &device);
        let angles = t.float().unsqueeze_dim::<2>(1) * freqs.unsqueeze_dim::<2>(0); // [B, width/2]
        // The angles in f32 (up to 1000 rad); the features in the weights' type.
        let sinusoid = cast_like(Tensor::cat(vec![angles.clone().sin(), angles.cos()], 1), &self.mlp_in.weight.val()); // [B, width]
        self.mlp_out.forward(relu(self.mlp_in.forward(sinusoid)))
    }
}

/// `exp(-ln(10000) · i / (half - 1))` for `i < half`, in f32 as PyTorch computes it.
pub fn sinusoid_frequencies(width: usize) -> Vec<f32> {
    let half = width / 2;
    let step = (-(10000f64.ln()) / (half as f64 - 1.0)) as f32;
    (0..half).map(|i| (i as f32 * step).exp()).collect()
}

/// Learned class embedding, one row per label id.
pub fn label_embedding(rows: usize, width: usize, device: &Device) -> Embedding {
    EmbeddingConfig::new(rows, width).init(device)
}

/// `y`: `[batch]` labels → `[batch, width]`.
pub fn embed_labels(emb: &Embedding, y: Tensor<1, Int>) -> Tensor<2> {
    let [batch] = y.dims();
    let width = emb.weight.dims()[1];
    emb.forward(y.unsqueeze_dim::<2>(1)).reshape([batch, width]) // [B,1,W] -> [B,W]
}
