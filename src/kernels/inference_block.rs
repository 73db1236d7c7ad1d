//! A whole mnist-dits block for sampling on CPUs with AVX2 + FMA or AVX-512, one image at a
//! time: adaLN, the folded attention with its projection, the gated residual, adaLN, the ReLU
//! feed-forward and its gated residual, all on one image's rows (49 × 64 floats, its hidden
//! layer 49 × 256) while they sit in L1 and L2, with the weights packed once.
//!
//! Why: run as separate kernels over a chunk of images, each step writes the chunk's tokens out
//! and the next reads them back (the feed-forward's hidden layer alone is 1.6 MB for 32 images,
//! beyond a Zen 3's 512 KiB of L2 and a Xeon's 1–2 MiB), every call allocates its output, and every Linear call
//! packs its weight again. Here an image's intermediates live in buffers of its thread, reused
//! image after image.
//!
//! Each step is the per-image code of the kernel it replaces ([`norm::forward_image`],
//! [`ProjectedImage::attend`], [`residual::forward_image`], [`Panels::product_biased`]), whose
//! results do not depend on how images and rows are grouped, so the output equals the kernels
//! run one after the other bit for bit (a test).

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::attention::{Engine, FoldedDims};
use super::buffer::{assume_init, scratch, uninit_filled};
use super::norm;
use super::panels::{self, Panels};
use super::projected_attention::{ProjectedImage, ProjectedScratch};
use super::residual;

/// A block's parameters as [`PackedBlock::pack`] takes them, row-major `[in, out]` weights.
#[derive(Debug, Clone, Copy)]
pub struct BlockWeights<'a> {
    /// The two LayerNorms' weights and biases, `[W]` each, and their ε.
    pub norms: [(&'a [f32], &'a [f32]); 2],
    pub epsilon: f32,
    /// The folded attention: `[W, 2·H·W]` and `[2·H·W]` (see `model::mnist_dits::folded`).
    pub attention: (&'a [f32], &'a [f32]),
    pub heads: usize,
    pub scale: f32,
    /// The feed-forward network: `[W, M]`, `[M]`, then `[M, W]`, `[W]`.
    pub expand: (&'a [f32], &'a [f32]),
    pub contract: (&'a [f32], &'a [f32]),
}

/// A block packed for [`PackedBlock::forward`].
#[derive(Debug, Clone)]
pub struct PackedBlock {
    norms: [(Vec<f32>, Vec<f32>); 2],
    epsilon: f32,
    attention: (Panels, Vec<f32>),
    heads: usize,
    scale: f32,
    expand: (Panels, Vec<f32>),
    contract: (Panels, Vec<f32>),
    width: usize,
    hidden: usize,
}

impl PackedBlock {
    /// Whether the fused block runs here for tokens of `width`: the panel products need AVX2 or
    /// AVX-512, and the attention's head blocks whole panels ([`panels::width`] columns).
    pub fn available(width: usize) -> bool {
        panels::available() && width > 0 && width.is_multiple_of(panels::width())
    }

    /// Packs the weights.
    ///
    /// # Panics
    /// If the shapes disagree or [`Self::available`] is false for this width.
    pub fn pack(p: BlockWeights) -> Self {
        let width = p.norms[0].0.len();
        assert!(
            Self::available(width),
            "inference block: needs the panel products and a width that is a multiple of their panels"
        );
        let row = 2 * p.heads * width;
        let hidden = p.expand.1.len();
        for (weight, bias) in p.norms {
            assert!(
                weight.len() == width && bias.len() == width,
                "inference block: LayerNorm parameters must be [{width}]"
            );
        }
        assert!(p.heads > 0 && hidden > 0, "inference block: no heads or no hidden units");
        let panels = |(weight, bias): (&[f32], &[f32]), k: usize, n: usize| {
            assert!(weight.len() == k * n && bias.len() == n, "inference block: a weight is not [{k}, {n}]");
            (Panels::pack(weight, k, n, n, 1), bias.to_vec())
        };
        Self {
            norms: p.norms.map(|(w, b)| (w.to_vec(), b.to_vec())),
            epsilon: p.epsilon,
            attention: panels(p.attention, width, row),
            heads: p.heads,
            scale: p.scale,
            expand: panels(p.expand, width, hidden),
            contract: panels(p.contract, hidden, width),
            width,
            hidden,
        }
    }

    /// The block on `x` `[B, S, W]` with the per-image modulation `[B, 6·W]` (γ₁ β₁ α₁ γ₂ β₂ α₂,
    /// as the block's six modulation Linears give it): `x₁ = x + α₁·Attn(LN₁(x)·(1+γ₁)+β₁)`,
    /// then `x₁ + α₂·FFN(LN₂(x₁)·(1+γ₂)+β₂)`.
    pub fn forward(&self, x: &[f32], modulation: &[f32], seq: usize) -> Vec<f32> {
        let w = self.width;
        let image = seq * w;
        assert!(seq > 0 && x.len().is_multiple_of(image), "inference block: x is not whole images of {seq} × {w}");
        let batch = x.len() / image;
        assert_eq!(modulation.len(), batch * 6 * w, "inference block: modulation must be [{batch}, {}]", 6 * w);
        let d = FoldedDims { batch: 1, seq, heads: self.heads, width: w };
        let (weight, bias) = &self.attention;
        let attention = ProjectedImage { weight, bias, d, scale: self.scale, engine: Engine::best() };
        // SAFETY: `image` writes every element of each image's rows.
        unsafe {
            uninit_filled(x.len(), |out| {
                out.par_chunks_mut(image).enumerate().for_each_init(
                    || Scratch::new(d, self.hidden),
                    |sc, (bi, o)| {
                        let m = &modulation[bi * 6 * w..][..6 * w];
                        self.image(&x[bi * image..][..image], m, o, &attention, sc);
                    },
                );
            })
        }
    }

    /// One image through the block, written into `out`.
    fn image(
        &self,
        x: &[f32],
        modulation: &[f32],
        out: &mut [MaybeUninit<f32>],
        attention: &ProjectedImage,
        sc: &mut Scratch,
    ) {
        let w = self.width;
        let part = |k: usize| &modulation[k * w..(k + 1) * w];
        let (scale1, shift1, gate1, scale2, shift2, gate2) = (part(0), part(1), part(2), part(3), part(4), part(5));
        let [(w1, b1), (w2, b2)] = &self.norms;
        let eps = self.epsilon;

        norm::forward_image(x, &mut sc.h, &mut sc.stats, w1, b1, shift1, scale1, eps, &mut sc.a, &mut sc.c);
        // SAFETY (each `assume_init` below): the step before wrote the whole buffer.
        let h = unsafe { assume_init(&mut sc.h) };
        attention.attend(h, &mut sc.branch, &mut sc.projected);
        residual::forward_image(x, gate1, unsafe { assume_init(&mut sc.branch) }, &mut sc.x1);
        let x1 = unsafe { assume_init(&mut sc.x1) };

        norm::forward_image(x1, &mut sc.h, &mut sc.stats, w2, b2, shift2, scale2, eps, &mut sc.a, &mut sc.c);
        let h = unsafe { assume_init(&mut sc.h) };
        let (expand, expand_bias) = &self.expand;
        expand.product_biased(h, expand_bias, true, &mut sc.hidden);
        let (contract, contract_bias) = &self.contract;
        let hidden = unsafe { assume_init(&mut sc.hidden) };
        contract.product_biased(hidden, contract_bias, false, &mut sc.branch);
        residual::forward_image(x1, gate2, unsafe { assume_init(&mut sc.branch) }, out);
    }
}

/// One thread's buffers for an image: the normalised tokens, their statistics (written, not
/// read: the LayerNorm's per-image code keeps them for a backward pass), a branch's output,
/// the tokens after the attention, the hidden layer, the LayerNorm's folded affine, and the
/// attention's own buffers.
struct Scratch {
    h: Vec<MaybeUninit<f32>>,
    stats: Vec<MaybeUninit<f32>>,
    branch: Vec<MaybeUninit<f32>>,
    x1: Vec<MaybeUninit<f32>>,
    hidden: Vec<MaybeUninit<f32>>,
    a: Vec<f32>,
    c: Vec<f32>,
    projected: ProjectedScratch,
}

impl Scratch {
    fn new(d: FoldedDims, hidden: usize) -> Self {
        let tokens = d.seq * d.width;
        Self {
            h: scratch(tokens),
            stats: scratch(2 * d.seq),
            branch: scratch(tokens),
            x1: scratch(tokens),
            hidden: scratch(d.seq * hidden),
            a: vec![0.0; d.width],
            c: vec![0.0; d.width],
            projected: ProjectedScratch::new(d),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::linear::{self, Activation, LinearDims};
    use crate::kernels::norm::{NormDims, NormParams};
    use crate::kernels::projected_attention::projected_folded_forward;

    /// The fused block against its kernels run one after the other over the whole batch:
    /// equal bit for bit, at mnist-dits' shape and at one where nothing divides evenly (a
    /// partial hidden panel, 10 tokens, 3 heads, an odd batch).
    #[test]
    fn equals_the_kernels_one_by_one() {
        if !PackedBlock::available(64) {
            eprintln!("the kernels run neither AVX2 nor AVX-512: the fused inference block is not used here");
            return;
        }
        let mut rng = crate::rng::stream(17, crate::rng::Purpose::Bench, 0);
        for (batch, seq, width, heads, hidden) in [(5, 49, 64, 4, 256), (3, 10, 32, 3, 40)] {
            let mut normal = |n: usize, scale: f32| -> Vec<f32> {
                crate::rng::standard_normal(&mut rng, n).into_iter().map(|v| v * scale).collect()
            };
            let row = 2 * heads * width;
            let x = normal(batch * seq * width, 1.0);
            let modulation = normal(batch * 6 * width, 0.3);
            let norms = [(normal(width, 0.2), normal(width, 0.2)), (normal(width, 0.2), normal(width, 0.2))];
            let attention = (normal(width * row, 0.15), normal(row, 0.1));
            let expand = (normal(width * hidden, 0.15), normal(hidden, 0.1));
            let contract = (normal(hidden * width, 0.1), normal(width, 0.1));
            let (epsilon, scale) = (1e-5, 0.37);
            let block = PackedBlock::pack(BlockWeights {
                norms: [(&norms[0].0, &norms[0].1), (&norms[1].0, &norms[1].1)],
                epsilon,
                attention: (&attention.0, &attention.1),
                heads,
                scale,
                expand: (&expand.0, &expand.1),
                contract: (&contract.0, &contract.1),
            });
            let fused = block.forward(&x, &modulation, seq);

            // γ₁ β₁ α₁ γ₂ β₂ α₂ of every image, each [B, W].
            let part = |k: usize| -> Vec<f32> {
                modulation.chunks_exact(6 * width).flat_map(|m| m[k * width..(k + 1) * width].to_vec()).collect()
            };
            let d = NormDims { batch, seq, width };
            let adaln = |x: &[f32], (weight, bias): &(Vec<f32>, Vec<f32>), shift: &[f32], scale: &[f32]| {
                norm::forward(x, NormParams { weight, bias, shift, scale, epsilon }, d).0
            };
            let h = adaln(&x, &norms[0], &part(1), &part(0));
            let panels = Panels::pack(&attention.0, width, row, row, 1);
            let folded = FoldedDims { batch, seq, heads, width };
            let attended = projected_folded_forward(&h, &panels, &attention.1, folded, scale, Engine::best());
            let x1 = residual::forward(&x, &part(2), &attended, d);
            let h = adaln(&x1, &norms[1], &part(4), &part(3));
            let rows = batch * seq;
            let linear = |x: &[f32], (weight, bias): &(Vec<f32>, Vec<f32>), input, output, act| {
                linear::forward(x, weight, bias, LinearDims { rows, input, output }, act, false).0
            };
            let z = linear(&h, &expand, width, hidden, Activation::Relu);
            let f = linear(&z, &contract, hidden, width, Activation::Identity);
            let want = residual::forward(&x1, &part(5), &f, d);

            assert_eq!(fused.len(), want.len());
            let differ = fused.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            assert_eq!(differ, 0, "{batch}×{seq}×{width}, {heads} heads: {differ} of {} values differ", want.len());
        }
    }
}
