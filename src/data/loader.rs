//! Training batches: a seeded permutation per epoch, drop-last, optional horizontal flips,
//! pixels scaled to [-1, 1], the next batches assembled on a background thread while the model
//! trains on the current one. A set streamed from its files is decoded there too, by a pool of
//! decoding threads; each image lands in its fixed slot, so a batch is the same whatever the
//! thread count.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::Instant;

use rand::Rng;
use rand::seq::SliceRandom;
use rayon::prelude::*;

use super::dataset::ImageDataset;
use super::store::ImageStore;
use crate::rng::{Purpose, stream};

/// How many finished batches the background thread may hold ahead of training. With the one it
/// builds and the one training uses, a loader holds at most `PREFETCH_DEPTH + 2` batches.
pub const PREFETCH_DEPTH: usize = 2;

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

/// The recipe's part of batching: a run's batches are a pure function of these and the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSpec {
    pub batch: usize,
    pub seed: u64,
    /// Mirror each image left-right with probability ½, drawn per (epoch, image).
    pub hflip: bool,
}

/// The permutation of `0..n` used for `epoch`: a pure function of (seed, epoch).
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.shuffle(&mut stream(seed, Purpose::DataOrder, epoch));
    order
}

/// Which of the `n` images `--hflip` mirrors in `epoch` (index = image): a pure function of
/// (seed, epoch), like the order, so a resumed run flips what an uninterrupted one would.
pub fn epoch_flips(n: usize, seed: u64, epoch: u64) -> Vec<bool> {
    let mut rng = stream(seed, Purpose::Flip, epoch);
    (0..n).map(|_| rng.random_bool(0.5)).collect()
}

/// One epoch's order and flips.
#[derive(Debug, Clone)]
pub struct Epoch {
    pub order: Vec<u32>,
    pub flips: Option<Vec<bool>>,
}

impl Epoch {
    pub fn new(n: usize, spec: &BatchSpec, epoch: u64) -> Self {
        Epoch { order: epoch_order(n, spec.seed, epoch), flips: spec.hflip.then(|| epoch_flips(n, spec.seed, epoch)) }
    }
}

/// Full batches in one epoch (the remainder is dropped).
pub fn batches_per_epoch(n: usize, batch: usize) -> u64 {
    (n / batch) as u64
}

/// Fill `out` with image `index` of `ds`, mapped from [0, 255] to [-1, 1].
pub fn scale_image(ds: &ImageDataset, index: usize, out: &mut [f32]) {
    scale(ds.image(index), false, ds.width, out);
}

/// Bytes → [-1, 1], mirrored left-right when `flip` (rows of `width` pixels).
fn scale(pixels: &[u8], flip: bool, width: usize, out: &mut [f32]) {
    if !flip {
        for (o, &p) in out.iter_mut().zip(pixels) {
            *o = p as f32 / 127.5 - 1.0;
        }
        return;
    }
    for (orow, prow) in out.chunks_exact_mut(width).zip(pixels.chunks_exact(width)) {
        for (o, &p) in orow.iter_mut().zip(prow.iter().rev()) {
            *o = p as f32 / 127.5 - 1.0;
        }
    }
}

/// Build the batch at `pos` (by the loader thread, and directly by tests). The images of a
/// streamed set are decoded in parallel on the current rayon pool.
pub fn make_batch(store: &ImageStore, epoch: &Epoch, batch: usize, pos: Position) -> anyhow::Result<Batch> {
    let len = store.image_len();
    let width = store.shape().2;
    let start = pos.index as usize * batch;
    let rows = &epoch.order[start..start + batch];
    let mut images = vec![0f32; batch * len];
    let fill = |(slot, out): (usize, &mut [f32])| -> anyhow::Result<()> {
        let i = rows[slot] as usize;
        let flip = epoch.flips.as_ref().is_some_and(|f| f[i]);
        match store {
            ImageStore::Memory(ds) => scale(ds.image(i), flip, width, out),
            ImageStore::Files(files) => {
                let mut pixels = vec![0u8; len];
                files.read(i, &mut pixels)?;
                scale(&pixels, flip, width, out);
            }
        }
        Ok(())
    };
    if store.streams() {
        images.par_chunks_mut(len).enumerate().try_for_each(fill)?;
    } else {
        images.chunks_mut(len).enumerate().try_for_each(fill)?;
    }
    let labels = rows.iter().map(|&i| store.label(i as usize)).collect();
    Ok(Batch { images, labels, epoch: pos.epoch, index: pos.index })
}

/// The machine's part of loading: where a set is held and how many threads decode it. Batches
/// do not depend on either, so a resumed run may change them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct LoaderArgs {
    /// Hold the decoded training images in memory up to this many MiB; a larger set of image
    /// files streams from disk, each batch decoded while the one before trains.
    #[arg(long, value_name = "MIB", default_value_t = LoaderArgs::DEFAULT.data_memory)]
    pub data_memory: u64,
    /// Threads decoding a streamed set's images, besides the training threads.
    #[arg(long, value_name = "N", default_value_t = LoaderArgs::DEFAULT.decode_threads)]
    pub decode_threads: usize,
}

impl LoaderArgs {
    pub const DEFAULT: Self = Self { data_memory: 4096, decode_threads: 2 };

    pub fn memory_limit(&self) -> u64 {
        self.data_memory.saturating_mul(1 << 20)
    }
}

impl Default for LoaderArgs {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// What a loader did, for the end-of-run report: whether the loader kept up with training.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoaderStats {
    pub batches: u64,
    /// Time the background thread spent building batches (decoding, flipping, scaling).
    pub build_s: f64,
    /// Time training waited for a batch.
    pub wait_s: f64,
    /// Decoding threads (0: the set is in memory).
    pub decode_threads: usize,
}

/// An endless stream of training batches (epoch after epoch) from a background thread.
pub struct BatchLoader {
    rx: Option<Receiver<anyhow::Result<Batch>>>,
    worker: Option<JoinHandle<()>>,
    pub batches_per_epoch: u64,
    build_ns: Arc<AtomicU64>,
    wait_s: f64,
    received: u64,
    decode_threads: usize,
}

impl BatchLoader {
    /// Start producing batches at `start`; a streamed set is decoded by `decode_threads`
    /// threads of the loader's own.
    ///
    /// Panics are impossible on user input: the batch must be ≤ the data set size, which the
    /// caller validates (see [`BatchLoader::check`]).
    pub fn new(store: Arc<ImageStore>, spec: BatchSpec, decode_threads: usize, start: Position) -> Self {
        let batches_per_epoch = batches_per_epoch(store.len(), spec.batch);
        let decode_threads = if store.streams() { decode_threads.max(1) } else { 0 };
        let (tx, rx) = sync_channel(PREFETCH_DEPTH);
        let build_ns = Arc::new(AtomicU64::new(0));
        let counter = build_ns.clone();
        let worker = std::thread::Builder::new()
            .name("dits-loader".into())
            .spawn(move || {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(decode_threads.max(1))
                    .thread_name(|i| format!("dits-decode-{i}"))
                    .build()
                    .expect("starting the decoding threads");
                pool.install(|| produce(&store, spec, start, &tx, &counter))
            })
            .expect("spawning the loader thread");
        Self {
            rx: Some(rx),
            worker: Some(worker),
            batches_per_epoch,
            build_ns,
            wait_s: 0.0,
            received: 0,
            decode_threads,
        }
    }

    /// Whether a data set of `n` images can feed batches of `batch`.
    pub fn check(n: usize, batch: usize) -> anyhow::Result<()> {
        anyhow::ensure!(batch > 0, "batch size must be at least 1");
        anyhow::ensure!(batch <= n, "batch size {batch} is larger than the data set ({n} images)");
        Ok(())
    }

    /// The next batch; an image file that can no longer be read is an error naming it.
    pub fn next_batch(&mut self) -> anyhow::Result<Batch> {
        let t = Instant::now();
        let b = self.rx.as_ref().and_then(|rx| rx.recv().ok()).expect("the loader thread stopped unexpectedly");
        self.wait_s += t.elapsed().as_secs_f64();
        self.received += 1;
        b
    }

    pub fn stats(&self) -> LoaderStats {
        LoaderStats {
            batches: self.received,
            build_s: self.build_ns.load(Ordering::Relaxed) as f64 * 1e-9,
            wait_s: self.wait_s,
            decode_threads: self.decode_threads,
        }
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

fn produce(
    store: &ImageStore,
    spec: BatchSpec,
    start: Position,
    tx: &SyncSender<anyhow::Result<Batch>>,
    build_ns: &AtomicU64,
) {
    let per_epoch = batches_per_epoch(store.len(), spec.batch);
    let mut pos = start;
    loop {
        let epoch = Epoch::new(store.len(), &spec, pos.epoch);
        while pos.index < per_epoch {
            let t = Instant::now();
            let batch = make_batch(store, &epoch, spec.batch, pos);
            build_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            let failed = batch.is_err();
            if tx.send(batch).is_err() || failed {
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

    fn spec(batch: usize, seed: u64, hflip: bool) -> BatchSpec {
        BatchSpec { batch, seed, hflip }
    }

    #[test]
    fn loader_drops_the_remainder_scales_pixels_and_resumes_mid_epoch() {
        let ds = Arc::new(ImageStore::Memory(toy(10)));
        let mut loader = BatchLoader::new(ds.clone(), spec(4, 9, false), 1, Position::default());
        assert_eq!(loader.batches_per_epoch, 2);
        let batches: Vec<Batch> = (0..5).map(|_| loader.next_batch().unwrap()).collect();
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
        let mut resumed = BatchLoader::new(ds, spec(4, 9, false), 1, Position { epoch: 1, index: 1 });
        assert_eq!(resumed.next_batch().unwrap().images, batches[3].images);
        assert_eq!(loader.stats().batches, 5);
    }

    #[test]
    fn flips_mirror_about_half_the_images_per_epoch_and_repeat_with_the_seed() {
        let f = epoch_flips(10_000, 3, 0);
        let share = f.iter().filter(|&&x| x).count() as f64 / 1e4;
        assert!((0.47..0.53).contains(&share), "{share}");
        assert_eq!(f, epoch_flips(10_000, 3, 0));
        assert_ne!(f, epoch_flips(10_000, 3, 1));
        // Mirrored images are the originals reversed row by row; the others are untouched.
        let ds = ImageStore::Memory(toy(10));
        let s = spec(10, 5, true);
        let epoch = Epoch::new(10, &s, 2);
        let plain = make_batch(&ds, &Epoch { flips: None, ..epoch.clone() }, 10, Position::default()).unwrap();
        let flipped = make_batch(&ds, &epoch, 10, Position::default()).unwrap();
        let flips = epoch.flips.as_ref().unwrap();
        assert!(flips.iter().any(|&f| f) && flips.iter().any(|&f| !f));
        for (slot, &i) in epoch.order.iter().enumerate() {
            let (p, q) = (&plain.images[slot * 2..slot * 2 + 2], &flipped.images[slot * 2..slot * 2 + 2]);
            if flips[i as usize] { assert_eq!((q[0], q[1]), (p[1], p[0])) } else { assert_eq!(p, q) }
        }
    }

    #[test]
    fn a_streamed_set_gives_the_in_memory_batches_whatever_the_thread_count() {
        use crate::data::file_list::Entry;
        use crate::data::store::StreamedFiles;
        let dir = tempfile::tempdir().unwrap();
        let n = 24;
        let ds = ImageDataset {
            pixels: (0..n * 3 * 4 * 4).map(|i| (i * 7 % 251) as u8).collect(),
            labels: (0..n).map(|i| (i % 3) as u8).collect(),
            channels: 3,
            height: 4,
            width: 4,
            classes: vec!["a".into(), "b".into(), "c".into()],
        };
        let entries = (0..n)
            .map(|i| {
                let path = dir.path().join(format!("{i}.png"));
                let planes = ds.image(i);
                let rgb = image::RgbImage::from_fn(4, 4, |x, y| {
                    let at = |c: usize| planes[c * 16 + (y * 4 + x) as usize];
                    image::Rgb([at(0), at(1), at(2)])
                });
                rgb.save(&path).unwrap();
                Entry { path, label: ds.labels[i], row: None }
            })
            .collect();
        let files = StreamedFiles { entries, size: None, channels: 3, side: 4, classes: ds.classes.clone() };
        let memory = Arc::new(ImageStore::Memory(ds));
        let streamed = Arc::new(ImageStore::Files(files));
        let batches = |store: &Arc<ImageStore>, threads| {
            let mut l = BatchLoader::new(store.clone(), spec(5, 1, true), threads, Position { epoch: 0, index: 3 });
            let b: Vec<(Vec<f32>, Vec<u8>)> =
                (0..6).map(|_| l.next_batch().unwrap()).map(|b| (b.images, b.labels)).collect();
            assert_eq!(l.stats().decode_threads, if store.streams() { threads } else { 0 });
            b
        };
        let reference = batches(&memory, 1);
        assert_eq!(batches(&streamed, 1), reference);
        assert_eq!(batches(&streamed, 3), reference);
        // A file damaged after the check is an error naming it, not a panic.
        let ImageStore::Files(f) = &*streamed else { unreachable!() };
        std::fs::write(&f.entries[0].path, b"not a png").unwrap();
        let mut l = BatchLoader::new(streamed.clone(), spec(24, 1, false), 2, Position::default());
        let err = format!("{:#}", l.next_batch().unwrap_err());
        assert!(err.contains("0.png") && err.contains("changed since"), "{err}");
    }
}
