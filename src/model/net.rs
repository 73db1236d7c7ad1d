//! Either network behind one type: the CLI picks the family at run time (from a preset, a
//! config file or a checkpoint), and training, sampling and checkpoints never need to know
//! which it is.

use burn::prelude::*;
use rayon::prelude::*;

use super::config::{DitConfig, Family};
use super::dit::Dit;
use super::mnist_dits::MnistDits;
use super::mnist_dits::prepared::PreparedBlock;
use crate::kernels::{SequenceParallel, TensorParallel};

/// burn derives `Module` for the enum: parameters are visited through the active variant.
/// Checkpoint keys skip the variant name (see [`super::weights`]), so files keep the PyTorch
/// `state_dict` names of each family.
// The variants differ by a few hundred bytes of tensor handles, and a process holds one or two
// networks: boxing the larger would only add an indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum DitNet {
    MnistDits(MnistDits),
    Dit(Dit),
}

impl DitNet {
    /// A freshly initialised network of `cfg`'s family, its weights a function of `seed` alone.
    ///
    /// The seed is part of the constructor, not left to the caller, because burn draws from
    /// one generator per backend: every construction, including the throw-away weights of a
    /// network about to be loaded from a file, must draw under [`crate::rng::with_device_seed`]'s
    /// lock, or it shifts the draws of a seeded initialisation running on another thread.
    pub fn new(cfg: &DitConfig, device: &Device, seed: u64) -> Self {
        crate::rng::with_device_seed(device, seed, || {
            let net = match cfg.family {
                Family::MnistDits => DitNet::MnistDits(MnistDits::new(cfg, device)),
                Family::Dit => DitNet::Dit(Dit::new(cfg, device)),
            };
            crate::rng::init_params_now(&net);
            net
        })
    }

    /// `x` `[B, C, H, W]`, `t` `[B]` level indices, `y` `[B]` labels → the prediction,
    /// `[B, C, H, W]`.
    pub fn forward(&self, x: Tensor<4>, t: Tensor<1, Int>, y: Tensor<1, Int>) -> Tensor<4> {
        match self {
            DitNet::MnistDits(m) => m.forward(x, t, y),
            DitNet::Dit(m) => m.forward(x, t, y),
        }
    }

    /// [`Self::forward`] of a tensor-parallel shard: every block's heads and MLP columns split
    /// over the ranks of `tp` (see [`super::tensor_parallel`]), everything else whole.
    pub fn forward_parallel(
        &self,
        x: Tensor<4>,
        t: Tensor<1, Int>,
        y: Tensor<1, Int>,
        tp: &TensorParallel,
    ) -> Tensor<4> {
        match self {
            DitNet::MnistDits(m) => m.forward_parallel(x, t, y, tp),
            DitNet::Dit(m) => m.forward_parallel(x, t, y, tp),
        }
    }

    /// The prediction for this rank's tokens of `sp` (with the blocks also split over `tp`),
    /// `[B, S/P, C·p²]`, in the layout of [`Self::patchify`].
    pub fn forward_tokens(
        &self,
        x: Tensor<4>,
        t: Tensor<1, Int>,
        y: Tensor<1, Int>,
        tp: &TensorParallel,
        sp: &SequenceParallel,
    ) -> Tensor<3> {
        match self {
            DitNet::MnistDits(m) => m.forward_tokens(x, t, y, tp, sp),
            DitNet::Dit(m) => m.forward_tokens(x, t, y, tp, Some(sp)),
        }
    }

    /// An image `[B, C, H, W]` as the network's output tokens `[B, S, C·p²]`.
    pub fn patchify(&self, image: Tensor<4>) -> Tensor<3> {
        match self {
            DitNet::MnistDits(m) => m.patchify(image),
            DitNet::Dit(m) => m.patchify(image),
        }
    }

    /// [`Self::forward`] for inference; see [`Inference`]. Samplers, which call the network
    /// many times, should keep one [`Self::prepare_inference`] instead: it folds the weights once.
    pub fn infer(&self, x: Tensor<4>, t: Tensor<1, Int>, y: Tensor<1, Int>) -> Tensor<4> {
        self.prepare_inference().infer(x, t, y)
    }

    /// This network ready for inference on its device (see [`Inference`]).
    pub fn prepare_inference(&self) -> Inference<'_> {
        let on_cpu = self.device() == Device::flex();
        let folded = match self {
            // Only the CPU has the folded attention kernel.
            DitNet::MnistDits(m) if on_cpu => m.prepare(true),
            _ => None,
        };
        Inference { net: self, folded, on_cpu }
    }

    fn device(&self) -> Device {
        match self {
            DitNet::MnistDits(m) => m.patch_pos_emb.device(),
            DitNet::Dit(m) => m.pos_embed.device(),
        }
    }

    /// Tokens per image and their width.
    fn token_shape(&self) -> (usize, usize) {
        let dims = match self {
            DitNet::MnistDits(m) => m.patch_pos_emb.dims(),
            DitNet::Dit(m) => m.pos_embed.dims(),
        };
        (dims[1], dims[2])
    }

    pub fn family(&self) -> Family {
        match self {
            DitNet::MnistDits(_) => Family::MnistDits,
            DitNet::Dit(_) => Family::Dit,
        }
    }
}

/// A network prepared for inference (no gradients). Its results equal [`DitNet::forward`]'s bit
/// for bit; on the CPU it differs in three ways:
///
/// - The batch is cut into chunks small enough for a block's activations to stay in the caches,
///   and the chunks run in parallel (each image's output does not depend on the others). Why:
///   at batch 256 each operation of a block streams megabytes through memory and the next reads
///   them back; in chunks sized to the L2 cache ([`CHUNK_VALUES_PER_L2_MIB`]) they stay nearer.
/// - The folded attention weights (see [`super::mnist_dits::folded`]), which `forward` derives
///   from the parameters at every call, are derived once.
/// - On CPUs with AVX2 or AVX-512, each mnist-dits block runs as one kernel, image by image,
///   with its weights packed once ([`crate::kernels::inference_block`]).
pub struct Inference<'a> {
    net: &'a DitNet,
    /// mnist-dits' blocks prepared (see [`PreparedBlock`]), where its attention folds.
    folded: Option<Vec<PreparedBlock>>,
    on_cpu: bool,
}

impl Inference<'_> {
    /// `x` `[B, C, H, W]`, `t` `[B]` level indices, `y` `[B]` labels → the prediction.
    pub fn infer(&self, x: Tensor<4>, t: Tensor<1, Int>, y: Tensor<1, Int>) -> Tensor<4> {
        let batch = x.dims()[0];
        let (tokens, width) = self.net.token_shape();
        let chunk = chunk_images(tokens, width);
        if !self.on_cpu || x.device() != Device::flex() || batch <= chunk {
            return self.forward(x, t, y);
        }
        let threads = rayon::current_num_threads().max(1);
        // Whole rounds of chunks per thread, so no core idles at the end.
        let parts = batch.div_ceil(chunk).div_ceil(threads) * threads;
        let outs: Vec<Tensor<4>> = crate::ranges::micro_batches(batch, parts)
            .into_par_iter()
            .map(|r| {
                let (start, len) = (r.start, r.len());
                self.forward(
                    x.clone().narrow(0, start, len),
                    t.clone().narrow(0, start, len),
                    y.clone().narrow(0, start, len),
                )
            })
            .collect();
        Tensor::cat(outs, 0)
    }

    /// Whether the attention runs folded (see [`super::mnist_dits::folded`]).
    pub fn is_folded(&self) -> bool {
        self.folded.is_some()
    }

    /// Whether every block runs as one fused kernel (see [`crate::kernels::inference_block`]).
    pub fn is_packed(&self) -> bool {
        self.folded.as_ref().is_some_and(|blocks| blocks.iter().all(PreparedBlock::is_packed))
    }

    fn forward(&self, x: Tensor<4>, t: Tensor<1, Int>, y: Tensor<1, Int>) -> Tensor<4> {
        match (self.net, &self.folded) {
            (DitNet::MnistDits(m), Some(folded)) => m.forward_folded(x, t, y, folded),
            (net, _) => net.forward(x, t, y),
        }
    }
}

/// Token values (tokens × width) per inference chunk and MiB of L2 cache per core: 32
/// mnist-dits images (49 × 64 f32, 0.4 MB). Chosen by measurement on CPUs with 1 and 2 MiB
/// (README, "Speed": the chunk sizes tried): a chunk's larger activations (the folded `qv`, the
/// MLP's hidden layer) never fit in L2 whole, but how much of them the next operation finds
/// there follows its size.
const CHUNK_VALUES_PER_L2_MIB: usize = 32 * 49 * 64;

/// Images per inference chunk for tokens of `width` values, scaled to the L2 cache per core
/// between 1 and 2 MiB (the sizes measured); 2 MiB where the system does not say.
fn chunk_images(tokens: usize, width: usize) -> usize {
    let l2_mib = crate::kernels::cache::l2_bytes().map_or(2.0, |b| (b as f64 / (1 << 20) as f64).clamp(1.0, 2.0));
    ((l2_mib * CHUNK_VALUES_PER_L2_MIB as f64) as usize / (tokens * width).max(1)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunked inference with the folded weights prepared once (and, on AVX2 CPUs, the blocks
    /// fused) is `forward`, bit for bit, including a last chunk of another size.
    #[test]
    fn infer_equals_forward() {
        let cfg = DitConfig::mnist_dits();
        let device = Device::flex();
        let model = DitNet::new(&cfg, &device, 3);
        let b = 2 * chunk_images(cfg.tokens(), cfg.width) + 5;
        let mut rng = crate::rng::stream(3, crate::rng::Purpose::Bench, 0);
        let n = cfg.channels * cfg.image_size * cfg.image_size;
        let dims = [b, cfg.channels, cfg.image_size, cfg.image_size];
        let x = Tensor::<4>::from_data(TensorData::new(crate::rng::standard_normal(&mut rng, b * n), dims), &device);
        let t =
            Tensor::<1, Int>::from_data(TensorData::new((0..b as i64).map(|i| i * 37 % 1000).collect(), [b]), &device);
        let y = Tensor::<1, Int>::from_data(TensorData::new((0..b as i64).map(|i| i % 10).collect(), [b]), &device);
        let whole = model.forward(x.clone(), t.clone(), y.clone()).into_data().try_to_vec::<f32>().unwrap();
        let prepared = model.prepare_inference();
        assert!(prepared.is_folded(), "mnist-dits folds its attention on the CPU");
        let packs = crate::kernels::inference_block::PackedBlock::available(cfg.width);
        assert_eq!(prepared.is_packed(), packs, "the blocks run fused exactly where the kernel runs");
        let chunked = prepared.infer(x, t, y).into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(whole.len(), chunked.len());
        let differ = whole.iter().zip(&chunked).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(differ, 0, "{differ} of {} values differ", whole.len());
    }
}
