//! Images into patch tokens: the patch convolution of both families (kernel = stride = patch),
//! computed as what it is, a Linear over each patch's values.
//!
//! burn's direct convolution for few input channels cost more in a training step and in
//! sampling than cutting the patches out with one reshaping copy and one product through the
//! fused Linear kernel (README, "Speed"). The parameters stay the convolution's (PyTorch's
//! `Conv2d` weight `[out, C, p, p]` and bias), so checkpoints and golden tests are unchanged.

use burn::nn::conv::Conv2d;
use burn::prelude::*;

use crate::kernels::patches::PatchOrder;
use crate::kernels::{Activation, cast_like, fused_linear, patchify};

/// `conv` (kernel and stride `patch`, no padding) over `x` `[B, C, H, W]` → tokens
/// `[B, (H/p)·(W/p), out]` in row-major patch order.
pub fn patch_tokens(conv: &Conv2d, x: Tensor<4>, patch: usize) -> Tensor<3> {
    let (c, p) = (x.dims()[1], patch);
    // Each token's values in the (channel, row, column) order of the weight's last three axes.
    let patches = patchify(x, patch, PatchOrder::ChannelsFirst); // [B, S, C·p²]
    let kernel = conv.weight.val();
    let out = kernel.dims()[0];
    let weight = kernel.reshape([out, c * p * p]).transpose(); // [C·p², out]
    let bias = match &conv.bias {
        Some(bias) => bias.val(),
        None => cast_like(Tensor::zeros([out], &weight.device()), &weight),
    };
    fused_linear(patches, weight, bias, Activation::Identity)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::Distribution;

    /// The product equals burn's convolution, for several channels, a non-square image and a
    /// convolution without bias.
    #[test]
    fn equals_the_convolution() {
        let device = Device::flex();
        for (channels, out, patch, [h, w], bias) in [(1, 16, 4, [28, 28], true), (3, 8, 2, [6, 10], false)] {
            let conv = Conv2dConfig::new([channels, out], [patch, patch])
                .with_stride([patch, patch])
                .with_bias(bias)
                .init(&device);
            let x = Tensor::<4>::random([2, channels, h, w], Distribution::Normal(0.0, 1.0), &device);
            let [gh, gw] = [h / patch, w / patch];
            let want = conv.forward(x.clone()).reshape([2, out, gh * gw]).swap_dims(1, 2);
            let got = patch_tokens(&conv, x, patch);
            assert_eq!(got.dims(), [2, gh * gw, out]);
            let diff = (got - want).abs().max().into_scalar::<f32>();
            assert!(diff < 1e-5, "{channels} channels, patch {patch}: differs by {diff}");
        }
    }
}
