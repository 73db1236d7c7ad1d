//! Images to patch tokens and back, `[B, C, H, W]` ↔ `[B, gh·gw, p²·C]`: the layout change of
//! every DiT's patchify and unpatchify, as a differentiable operation whose backward is the
//! other direction.
//!
//! Composed, it is a reshape to six axes, a permute and a reshape, which burn-flex turns into a
//! strided copy moving one element at a time (README, "Speed"); here each patch row is one run of
//! `p` values, images in parallel.

use std::mem::MaybeUninit;

use burn::backend::flex::FlexTensor;
use rayon::prelude::*;

use super::buffer::uninit_filled;
use super::flex::{contiguous, flex_tensor};

/// How a token orders its patch's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchOrder {
    /// `(C, p, p)`: a convolution's weight layout (both families' patch embedding, mnist-dits'
    /// output).
    ChannelsFirst,
    /// `(p, p, C)`: the DiT paper's final layer.
    ChannelsLast,
}

/// Which way a [`Patches`] moves data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchDirection {
    /// `[B, C, H, W]` → `[B, gh·gw, p²·C]`.
    ToTokens,
    /// `[B, gh·gw, p²·C]` → `[B, C, H, W]`.
    ToImage,
}

/// The patch layout change of images with `channels` channels of `height × width` pixels cut
/// into `patch × patch` patches, tokens in row-major patch order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Patches {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub patch: usize,
    pub order: PatchOrder,
    pub direction: PatchDirection,
}

impl super::Adjoint for Patches {
    fn forward(&self, x: &FlexTensor) -> FlexTensor {
        self.apply(x)
    }

    fn backward(&self, grad: &FlexTensor) -> FlexTensor {
        self.reversed().apply(grad)
    }
}

impl Patches {
    /// The operation whose backward this one is.
    pub fn reversed(&self) -> Self {
        let direction = match self.direction {
            PatchDirection::ToTokens => PatchDirection::ToImage,
            PatchDirection::ToImage => PatchDirection::ToTokens,
        };
        Self { direction, ..*self }
    }

    /// Tokens per image and values per token.
    pub fn token_shape(&self) -> (usize, usize) {
        let p = self.patch;
        ((self.height / p) * (self.width / p), p * p * self.channels)
    }

    fn apply(&self, x: &FlexTensor) -> FlexTensor {
        let x = contiguous(x);
        let shape = x.layout().shape().to_vec();
        let (tokens, values) = self.token_shape();
        let (c, h, w) = (self.channels, self.height, self.width);
        let batch = shape.first().copied().unwrap_or(0);
        let (want, out_shape) = match self.direction {
            PatchDirection::ToTokens => (vec![batch, c, h, w], vec![batch, tokens, values]),
            PatchDirection::ToImage => (vec![batch, tokens, values], vec![batch, c, h, w]),
        };
        assert_eq!(shape, want, "patches: expected {want:?}");
        let out = match self.direction {
            PatchDirection::ToTokens => self.to_tokens(x.storage::<f32>()),
            PatchDirection::ToImage => self.to_image(x.storage::<f32>()),
        };
        flex_tensor(out, out_shape)
    }

    /// `[B, C, H, W]` → `[B, gh·gw, p²·C]`.
    pub fn to_tokens(&self, image: &[f32]) -> Vec<f32> {
        let (n, per_image) = (self.patch, self.per_image());
        assert!(image.len().is_multiple_of(per_image), "patches: not whole images");
        // SAFETY: the runs of an image cover each of its token values once.
        unsafe {
            uninit_filled(image.len(), |tokens| {
                let pairs = tokens.par_chunks_mut(per_image).zip(image.par_chunks(per_image));
                pairs.with_min_len(images_per_task(per_image)).for_each(|(tok, img)| {
                    self.runs(|pixel, value, stride| copy_run(&mut tok[value..], stride, &img[pixel..], 1, n));
                })
            })
        }
    }

    /// `[B, gh·gw, p²·C]` → `[B, C, H, W]`.
    pub fn to_image(&self, tokens: &[f32]) -> Vec<f32> {
        let (n, per_image) = (self.patch, self.per_image());
        assert!(tokens.len().is_multiple_of(per_image), "patches: not whole images");
        // SAFETY: the runs of an image cover each of its pixels once.
        unsafe {
            uninit_filled(tokens.len(), |image| {
                let pairs = image.par_chunks_mut(per_image).zip(tokens.par_chunks(per_image));
                pairs.with_min_len(images_per_task(per_image)).for_each(|(img, tok)| {
                    self.runs(|pixel, value, stride| copy_run(&mut img[pixel..], 1, &tok[value..], stride, n));
                })
            })
        }
    }

    /// Values per image, checking that the patches tile the image.
    fn per_image(&self) -> usize {
        let (c, h, w, p) = (self.channels, self.height, self.width, self.patch);
        assert!(
            c > 0 && p > 0 && h.is_multiple_of(p) && w.is_multiple_of(p),
            "patches: {h}×{w} is not whole {p}×{p} patches"
        );
        c * h * w
    }

    /// `run(pixel, value, stride)` for every patch row of one image: its `p` pixels start at
    /// `pixel` in the image (one apart) and at `value` in the tokens (`stride` apart).
    #[inline(always)]
    fn runs(&self, mut run: impl FnMut(usize, usize, usize)) {
        let (c, h, w, p) = (self.channels, self.height, self.width, self.patch);
        let gw = w / p;
        for ch in 0..c {
            for y in 0..h {
                let (i, py) = (y / p, y % p);
                let (value, stride) = match self.order {
                    PatchOrder::ChannelsFirst => ((ch * p + py) * p, 1),
                    PatchOrder::ChannelsLast => (py * p * c + ch, c),
                };
                for j in 0..gw {
                    run((ch * h + y) * w + j * p, (i * gw + j) * p * p * c + value, stride);
                }
            }
        }
    }
}

/// Images per parallel task: a copy of one small image is shorter than handing it to another
/// thread.
fn images_per_task(per_image: usize) -> usize {
    (1 << 16) / per_image.max(1) + 1
}

/// `dst[k·dst_stride] = src[k·src_stride]` for `k < n`.
#[inline(always)]
fn copy_run(dst: &mut [MaybeUninit<f32>], dst_stride: usize, src: &[f32], src_stride: usize, n: usize) {
    /// A fixed-size copy, a few vector moves (a slice copy of a run this short is a call to
    /// memmove, which cost more than the copy).
    fn fixed<const N: usize>(dst: &mut [MaybeUninit<f32>], src: &[f32]) {
        let src: &[f32; N] = src[..N].try_into().expect("N values");
        let dst: &mut [MaybeUninit<f32>; N] = (&mut dst[..N]).try_into().expect("N values");
        *dst = src.map(MaybeUninit::new);
    }
    if dst_stride == 1 && src_stride == 1 && matches!(n, 2 | 4 | 8) {
        match n {
            2 => fixed::<2>(dst, src),
            4 => fixed::<4>(dst, src),
            _ => fixed::<8>(dst, src),
        }
    } else {
        for k in 0..n {
            dst[k * dst_stride] = MaybeUninit::new(src[k * src_stride]);
        }
    }
}
