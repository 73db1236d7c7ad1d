//! What the DiT paper feeds its blocks: patches projected to tokens plus fixed 2-D sin-cos
//! positions, and a condition vector `c = TimestepEmbedder(t) + LabelEmbedder(y)`.
//! Layouts and initialisations follow facebookresearch/DiT `models.py`.

use crate::kernels::cast_like;
use crate::model::patchify::patch_tokens;
use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::silu;

/// Width of the sinusoidal timestep features before the MLP (DiT's `frequency_embedding_size`).
pub const FREQUENCY_EMBEDDING_SIZE: usize = 256;

/// A Linear with Xavier-uniform weights and zero bias (DiT's `_basic_init`).
pub fn xavier_linear(d_in: usize, d_out: usize, device: &Device) -> Linear {
    zero_bias(LinearConfig::new(d_in, d_out).with_initializer(Initializer::XavierUniform { gain: 1.0 }).init(device))
}

/// A Linear whose weights and bias start at zero (adaLN-Zero's modulation, the output layer).
pub fn zero_linear(d_in: usize, d_out: usize, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out).with_initializer(Initializer::Zeros).init(device)
}

fn zero_bias(mut linear: Linear) -> Linear {
    linear.bias = linear.bias.map(|b| b.map(|t| t.zeros_like()));
    linear
}

/// `Conv2d(C → width, kernel p, stride p)` initialised like a Linear on the flattened patch:
/// Xavier-uniform with fan-in `C·p²` and fan-out `width` (a convolution's own fan-out would
/// count `width·p²`), zero bias. PyTorch key `x_embedder.proj`.
#[derive(Module, Debug)]
pub struct PatchEmbed {
    pub proj: Conv2d,
}

impl PatchEmbed {
    pub fn new(channels: usize, patch: usize, width: usize, device: &Device) -> Self {
        let mut proj = Conv2dConfig::new([channels, width], [patch, patch]).with_stride([patch, patch]).init(device);
        let bound = (6.0 / (channels * patch * patch + width) as f64).sqrt();
        proj.weight = Param::from_tensor(Tensor::random(
            [width, channels, patch, patch],
            Distribution::Uniform(-bound, bound),
            device,
        ));
        proj.bias = proj.bias.map(|b| b.map(|t| t.zeros_like()));
        Self { proj }
    }

    /// `[B, C, H, W]` → `[B, tokens, width]`, tokens in row-major patch order.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<3> {
        let patch = self.proj.weight.dims()[2];
        patch_tokens(&self.proj, x, patch) // [B, S, W]
    }
}

/// Fixed 2-D sin-cos position embedding, `[grid², width]` row-major: the first half of each
/// row encodes the patch's column, the second half its row, each as `[sin(pos·ω), cos(pos·ω)]`
/// with ω_k = 10000^(−k/(width/4)) (MAE's `get_2d_sincos_pos_embed`, as DiT uses it).
pub fn sincos_2d(width: usize, grid: usize) -> Vec<f32> {
    let quarter = width / 4;
    let omega: Vec<f64> = (0..quarter).map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64)).collect();
    let mut out = Vec::with_capacity(grid * grid * width);
    for row in 0..grid {
        for col in 0..grid {
            for pos in [col, row] {
                out.extend(omega.iter().map(|w| (pos as f64 * w).sin() as f32));
                out.extend(omega.iter().map(|w| (pos as f64 * w).cos() as f32));
            }
        }
    }
    out
}

/// `t → [cos(t·f), sin(t·f)] (256 features) → Linear → SiLU → Linear`, weights N(0, 0.02²).
/// PyTorch keys `t_embedder.mlp.0` and `t_embedder.mlp.2`.
#[derive(Module, Debug)]
pub struct TimestepEmbedder {
    pub mlp_in: Linear,
    pub mlp_out: Linear,
}

impl TimestepEmbedder {
    pub fn new(width: usize, device: &Device) -> Self {
        let normal = |i, o| {
            zero_bias(
                LinearConfig::new(i, o).with_initializer(Initializer::Normal { mean: 0.0, std: 0.02 }).init(device),
            )
        };
        Self { mlp_in: normal(FREQUENCY_EMBEDDING_SIZE, width), mlp_out: normal(width, width) }
    }

    /// `t`: `[B]` level indices → `[B, width]`.
    pub fn forward(&self, t: Tensor<1, Int>) -> Tensor<2> {
        let device = t.device();
        let half = FREQUENCY_EMBEDDING_SIZE / 2;
        let freqs: Vec<f32> = (0..half).map(|i| (-(10000f64.ln()) * i as f64 / half as f64).exp() as f32).collect();
        let freqs = Tensor::<1>::from_floats(freqs.as_slice(), &device);
        let args = t.float().unsqueeze_dim::<2>(1) * freqs.unsqueeze_dim::<2>(0); // [B, 128]
        // The arguments in f32 (up to 1000 rad); the features in the weights' type.
        let features = cast_like(Tensor::cat(vec![args.clone().cos(), args.sin()], 1), &self.mlp_in.weight.val()); // [B, 256]
        self.mlp_out.forward(silu(self.mlp_in.forward(features)))
    }
}

/// One learned row per label id (the last one is "no label" when the model has it),
/// N(0, 0.02²). PyTorch key `y_embedder.embedding_table`.
#[derive(Module, Debug)]
pub struct LabelEmbedder {
    pub embedding_table: Embedding,
}

impl LabelEmbedder {
    pub fn new(rows: usize, width: usize, device: &Device) -> Self {
        Self {
            embedding_table: EmbeddingConfig::new(rows, width)
                .with_initializer(Initializer::Normal { mean: 0.0, std: 0.02 })
                .init(device),
        }
    }

    /// `[B]` labels → `[B, width]`.
    pub fn forward(&self, y: Tensor<1, Int>) -> Tensor<2> {
        let [b] = y.dims();
        let width = self.embedding_table.weight.dims()[1];
        self.embedding_table.forward(y.unsqueeze_dim::<2>(1)).reshape([b, width])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sincos_2d_matches_mae() {
        // Values from MAE's get_2d_sincos_pos_embed(8, 3) (numpy): width 8 → 2 frequencies,
        // ω = [1, 0.01].
        let e = sincos_2d(8, 3);
        assert_eq!(e.len(), 9 * 8);
        // Token 0 (row 0, col 0): sin 0 = 0, cos 0 = 1.
        assert_eq!(&e[0..8], &[0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]);
        // Token 5 = row 1, col 2: column half first.
        let t5 = &e[5 * 8..6 * 8];
        let want = [
            2f64.sin(),
            0.02f64.sin(),
            2f64.cos(),
            0.02f64.cos(),
            1f64.sin(),
            0.01f64.sin(),
            1f64.cos(),
            0.01f64.cos(),
        ];
        for (g, w) in t5.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-7, "{t5:?}");
        }
    }
}
