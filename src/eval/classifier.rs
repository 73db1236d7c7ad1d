//! The judge of `dits eval`: a small CNN trained by dits on the real training split of the data
//! set in use. Its penultimate layer is the feature space of FID-CNN (Inception features mean
//! little on 28×28 digits, and would need a download).

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::activation::{relu, softmax};
use indicatif::ProgressBar;

use crate::data::ImageDataset;
use crate::data::loader::{epoch_order, scale_image};

/// Width of the feature vector FID is computed on.
pub const FEATURES: usize = 128;

/// `conv3(32) → ReLU → pool2 → conv3(64) → ReLU → pool2 → Linear(128) → ReLU → Linear(classes)`.
#[derive(Module, Debug)]
pub struct Classifier {
    conv1: Conv2d,
    conv2: Conv2d,
    pool: MaxPool2d,
    hidden: Linear,
    out: Linear,
}

/// How the classifier is trained; recorded next to the cached weights.
#[derive(Debug, Clone, Copy)]
pub struct ClassifierTraining {
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub seed: u64,
}

impl Default for ClassifierTraining {
    /// 3 epochs reach ≥ 99% test accuracy on MNIST (the last at a tenth of the rate).
    fn default() -> Self {
        Self { epochs: 3, batch: 128, lr: 1e-3, seed: 0 }
    }
}

impl Classifier {
    /// `image_size` must be a multiple of 4 (two 2×2 poolings). The weights are a function of
    /// `seed` alone (drawn under [`crate::rng::with_device_seed`]'s lock, as for `DitNet::new`).
    pub fn new(channels: usize, image_size: usize, classes: usize, device: &Device, seed: u64) -> Self {
        crate::rng::with_device_seed(device, seed, || {
            let net = Self::init(channels, image_size, classes, device);
            crate::rng::init_params_now(&net);
            net
        })
    }

    fn init(channels: usize, image_size: usize, classes: usize, device: &Device) -> Self {
        let conv =
            |i, o| Conv2dConfig::new([i, o], [3, 3]).with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)).init(device);
        let side = image_size / 4;
        Self {
            conv1: conv(channels, 32),
            conv2: conv(32, 64),
            pool: MaxPool2dConfig::new([2, 2]).init(),
            hidden: LinearConfig::new(64 * side * side, FEATURES).init(device),
            out: LinearConfig::new(FEATURES, classes).init(device),
        }
    }

    /// Penultimate features `[B, FEATURES]` of images `[B, C, H, W]` in [-1, 1].
    pub fn features(&self, x: Tensor<4>) -> Tensor<2> {
        let x = self.pool.forward(relu(self.conv1.forward(x)));
        let x = self.pool.forward(relu(self.conv2.forward(x)));
        relu(self.hidden.forward(x.flatten(1, 3)))
    }

    /// Class logits `[B, classes]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        self.out.forward(self.features(x))
    }
}

/// Images `indices` of `ds` as a `[B, C, H, W]` tensor in [-1, 1].
pub fn image_batch(ds: &ImageDataset, indices: &[usize], device: &Device) -> Tensor<4> {
    let len = ds.image_len();
    let mut data = vec![0f32; indices.len() * len];
    for (slot, &i) in indices.iter().enumerate() {
        scale_image(ds, i, &mut data[slot * len..(slot + 1) * len]);
    }
    Tensor::from_data(TensorData::new(data, [indices.len(), ds.channels, ds.height, ds.width]), device)
}

/// Train on `train` (seeded init and order); `bar` advances once per step.
pub fn train(
    train: &ImageDataset,
    classes: usize,
    cfg: ClassifierTraining,
    device: &Device,
    bar: &ProgressBar,
) -> Classifier {
    let device = device.clone().autodiff();
    let mut model = Classifier::new(train.channels, train.height, classes, &device, cfg.seed);
    let mut optim = AdamConfig::new().init();
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    for epoch in 0..cfg.epochs {
        let lr = if epoch + 1 == cfg.epochs && cfg.epochs > 1 { cfg.lr / 10.0 } else { cfg.lr };
        let order = epoch_order(train.len(), cfg.seed, epoch as u64);
        for chunk in order.chunks_exact(cfg.batch) {
            let idx: Vec<usize> = chunk.iter().map(|&i| i as usize).collect();
            let x = image_batch(train, &idx, &device);
            let y = Tensor::<1, Int>::from_data(
                TensorData::new(idx.iter().map(|&i| train.labels[i] as i64).collect::<Vec<_>>(), [idx.len()]),
                &device,
            );
            let loss = loss_fn.forward(model.forward(x), y);
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(lr, model, grads);
            bar.inc(1);
        }
    }
    model.valid()
}

/// Steps [`train`] takes.
pub fn training_steps(n: usize, cfg: ClassifierTraining) -> u64 {
    (cfg.epochs * (n / cfg.batch)) as u64
}

/// Class probabilities `[n, classes]` and features `[n, FEATURES]` of `images` (`[n, C, H, W]`
/// values in [-1, 1], row-major), computed in batches without gradients.
pub fn probabilities_and_features(
    model: &Classifier,
    images: &[f32],
    dims: [usize; 3],
    device: &Device,
) -> (Vec<f32>, Vec<f32>) {
    let len: usize = dims.iter().product();
    let (mut probs, mut feats) = (Vec::new(), Vec::new());
    for chunk in images.chunks(512 * len) {
        let b = chunk.len() / len;
        let x = Tensor::<4>::from_data(TensorData::new(chunk.to_vec(), [b, dims[0], dims[1], dims[2]]), device);
        let f = model.features(x);
        let p = softmax(model.out.forward(f.clone()), 1);
        probs.extend(p.into_data().iter::<f32>());
        feats.extend(f.into_data().iter::<f32>());
    }
    (probs, feats)
}
