//! Training batches: a seeded permutation per epoch, drop-last, pixels scaled to [-1, 1], the
//! next batch assembled on a background thread while the model trains on the current one.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use rand::seq::SliceRandom;

use super::dataset::ImageDataset;
use crate::rng::{Purpose, stream};

/// How many batches the background thread may run ahead.
const PREFETCH_DEPTH: usize = 2;

/// One batch, in host memory, ready to become tensors.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[batch, channels, height, width]` in [-1, 1].
    pub images: Vec<f32>,
    pub labels: Vec<u8>,
    /// Position of this batch: its epoch and its index within the epoch.
    pub epoch: u64,
    pub index: u64,
}

/// Where a loader starts (for resume): the epoch and the batch within it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Position {
    pub epoch: u64,
    pub index: u64,
}

/// The permutation of `0..n` used for `epoch`: a pure function of (seed, epoch).
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.shuffle(&mut stream(seed, Purpose::DataOrder, epoch));
    order
}

/// Full batches in one epoch (the remainder is dropped).
pub fn batches_per_epoch(n: usize, batch: usize) -> u64 {
    (n / batch) as u64
}

/// Fill `out` with image `index` of `ds`, mapped from [0, 255] to [-1, 1].
pub fn scale_image(ds: &ImageDataset, index: usize, out: &mut [f32]) {
    for (o, &p) in out.iter_mut().zip(ds.image(index)) {
        *o = p as f32 / 127.5 - 1.0;
    }
}

/// Build the batch at `pos` (used by the loader thread, and directly by tests).
pub fn make_batch(ds: &ImageDataset, order: &[u32], batch: usize, pos: Position) -> Batch {
    let len = ds.image_len();
    let mut images = vec![0f32; batch * len];
    let mut labels = Vec::with_capacity(batch);
    let start = pos.index as usize * batch;
    for (slot, &i) in order[start..start + batch].iter().enumerate() {
        scale_image(ds, i as usize, &mut images[slot * len..(slot + 1) * len]);
        labels.push(ds.labels[i as usize]);
    }
    Batch { images, labels, epoch: pos.epoch, index: pos.index }
}

/// An endless stream of training batches (epoch after epoch) from a background thread.
pub struct BatchLoader {
    rx: Option<Receiver<Batch>>,
    worker: Option<JoinHandle<()>>,
    pub batches_per_epoch: u64,
}

impl BatchLoader {
    /// Start producing batches of `batch` images at `start`.
    ///
    /// Panics are impossible on user input: `batch` must be ≤ the data set size, which the
    /// caller validates (see [`BatchLoader::check`]).
    pub fn new(ds: Arc<ImageDataset>, batch: usize, seed: u64, start: Position) -> Self {
        let batches_per_epoch = batches_per_epoch(ds.len(), batch);
        let (tx, rx) = sync_channel(PREFETCH_DEPTH);
        let worker = std::thread::Builder::new()
            .name("dits-loader".into())
            .spawn(move || produce(ds, batch, seed, start, tx))
            .expect("spawning the loader thread");
        Self { rx: Some(rx), worker: Some(worker), batches_per_epoch }
    }

    /// Whether a data set of `n` images can feed batches of `batch`.
    pub fn check(n: usize, batch: usize) -> anyhow::Result<()> {
        anyhow::ensure!(batch > 0, "batch size must be at least 1");
        anyhow::ensure!(batch <= n, "batch size {batch} is larger than the data set ({n} images)");
        Ok(())
    }

    pub fn next_batch(&mut self) -> Batch {
        self.rx.as_ref().and_then(|rx| rx.recv().ok()).expect("the loader thread stopped unexpectedly")
    }
}

impl Drop for BatchLoader {
    fn drop(&mut self) {
        // Dropping the receiver makes the worker's next send fail, which ends it.
        self.rx.take();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

fn produce(ds: Arc<ImageDataset>, batch: usize, seed: u64, start: Position, tx: SyncSender<Batch>) {
    let per_epoch = batches_per_epoch(ds.len(), batch);
    let mut pos = start;
    loop {
        let order = epoch_order(ds.len(), seed, pos.epoch);
        while pos.index < per_epoch {
            if tx.send(make_batch(&ds, &order, batch, pos)).is_err() {
                return;
            }
            pos.index += 1;
        }
        pos = Position { epoch: pos.epoch + 1, index: 0 };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy(n: usize) -> ImageDataset {
        ImageDataset {
            pixels: (0..n).flat_map(|i| [i as u8, 255]).collect(),
            labels: (0..n).map(|i| (i % 10) as u8).collect(),
            channels: 1,
            height: 1,
            width: 2,
            classes: (0..10).map(|i| i.to_string()).collect(),
        }
    }

    #[test]
    fn epochs_are_permutations_seeded_and_distinct() {
        let a = epoch_order(100, 1, 0);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(100, 1, 0));
        assert_ne!(a, epoch_order(100, 1, 1));
        assert_ne!(a, epoch_order(100, 2, 0));
    }

    #[test]
    fn loader_drops_the_remainder_scales_pixels_and_resumes_mid_epoch() {
        let ds = Arc::new(toy(10));
        let mut loader = BatchLoader::new(ds.clone(), 4, 9, Position::default());
        assert_eq!(loader.batches_per_epoch, 2);
        let batches: Vec<Batch> = (0..5).map(|_| loader.next_batch()).collect();
        let positions: Vec<(u64, u64)> = batches.iter().map(|b| (b.epoch, b.index)).collect();
        assert_eq!(positions, vec![(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]);
        assert!(batches[0].images.iter().all(|&p| (-1.0..=1.0).contains(&p)));
        assert_eq!(batches[0].images[1], 1.0);
        // The image and its label travel together.
        for b in &batches {
            for (slot, &label) in b.labels.iter().enumerate() {
                let id = ((b.images[slot * 2] + 1.0) * 127.5).round() as usize;
                assert_eq!(label as usize, id % 10);
            }
        }
        let mut resumed = BatchLoader::new(ds, 4, 9, Position { epoch: 1, index: 1 });
        assert_eq!(resumed.next_batch().images, batches[3].images);
    }
}
