//! Where a data set comes from: a path, its format (detected from the directory, or forced), the
//! side images are resized to, and the share held out for testing when the format has no test
//! split. A run stores this, so training, resume, sampling and eval all read the same images.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::seq::SliceRandom;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::cifar;
use super::dataset::{ImageDataset, Split, idx_class_count, idx_present};
use super::decode::{Pixels, decode};
use super::file_list::{Entry, FileList, list_csv, list_folder, read_class_names, subdirectories};
use super::store::{ImageStore, StreamedFiles};
use crate::rng::{Purpose, stream};

/// The data layouts `--data` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DataFormat {
    /// MNIST's IDX files (`train-images-idx3-ubyte[.gz]`, …).
    Idx,
    /// torchvision's `ImageFolder`: `DIR/<class>/*.png|jpg|jpeg`.
    Folder,
    /// A CSV of `file,label` rows.
    Csv,
    /// CIFAR-10's binary batches.
    Cifar10,
}

/// The share of an unsplit data set held out as its test split unless told otherwise.
pub const DEFAULT_VAL_FRACTION: f64 = 0.1;
/// The hold-out is fixed by the data, not by the run's seed, so every run of a data set (and
/// its judge) tests on the same images.
const HOLDOUT_SEED: u64 = 0x005E_ED0F_7E57;

/// An image's channels, height and width.
type Shape = (usize, usize, usize);
/// Images decoded before a progress bar is worth showing.
const PROGRESS_FROM: usize = 2_000;

/// A data set as a run names it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSource {
    pub path: PathBuf,
    pub format: DataFormat,
    /// Resize (centre-cropping non-square images) to this side; `None` keeps the files' size.
    #[serde(default)]
    pub image_size: Option<usize>,
    /// Held out for testing when the format has no test split.
    #[serde(default = "default_val_fraction")]
    pub val_fraction: f64,
}

fn default_val_fraction() -> f64 {
    DEFAULT_VAL_FRACTION
}

impl DataSource {
    /// `path` in `format`, detected when `None`.
    pub fn new(
        path: &Path,
        format: Option<DataFormat>,
        image_size: Option<usize>,
        val_fraction: Option<f64>,
    ) -> anyhow::Result<Self> {
        let format = match format {
            Some(f) => f,
            None => detect(path)?,
        };
        let val_fraction = val_fraction.unwrap_or(DEFAULT_VAL_FRACTION);
        ensure!(
            val_fraction > 0.0 && val_fraction < 1.0,
            "--val-fraction must lie strictly between 0 and 1, got {val_fraction}"
        );
        if let Some(s) = image_size {
            ensure!(
                (1..=super::decode::MAX_SIDE as usize).contains(&s),
                "--image-size must be 1..={}, got {s}",
                super::decode::MAX_SIDE
            );
            ensure!(
                matches!(format, DataFormat::Folder | DataFormat::Csv),
                "--image-size applies to image files (folder, csv); {format:?} data has a fixed size"
            );
        }
        Ok(Self { path: path.to_path_buf(), format, image_size, val_fraction })
    }

    /// An IDX directory as every run before data sources named it.
    pub fn idx(path: &Path) -> Self {
        Self { path: path.to_path_buf(), format: DataFormat::Idx, image_size: None, val_fraction: DEFAULT_VAL_FRACTION }
    }

    /// One split in memory, validated in full: every file decoded, one channel count, one size.
    pub fn load(&self, split: Split) -> anyhow::Result<ImageDataset> {
        self.load_with_progress(split, false)
    }

    /// [`Self::load`], with a progress bar on stderr while many image files decode.
    pub fn load_with_progress(&self, split: Split, progress: bool) -> anyhow::Result<ImageDataset> {
        match self.open(split, progress, u64::MAX)? {
            ImageStore::Memory(ds) => Ok(ds),
            ImageStore::Files(_) => unreachable!("no limit: every set fits"),
        }
    }

    /// One split, validated in full as [`Self::load`] validates it, kept in memory when its
    /// decoded pixels take at most `memory_limit` bytes; a larger set of image files is kept as
    /// its file list, to be decoded again batch by batch.
    pub fn open(&self, split: Split, progress: bool, memory_limit: u64) -> anyhow::Result<ImageStore> {
        let store = match self.format {
            DataFormat::Idx | DataFormat::Cifar10 => ImageStore::Memory(self.read_whole(split)?),
            DataFormat::Folder | DataFormat::Csv => {
                let (list, rows) = self.split_list(split)?;
                self.check_files(list, &rows, progress, memory_limit)?
            }
        };
        ensure!(!store.is_empty(), "{}: the {split:?} split holds no images", self.path.display());
        let classes = store.classes().len();
        if let Some(i) = (0..store.len()).find(|&i| store.label(i) as usize >= classes) {
            bail!(
                "{}: image {i} of the {split:?} split has label {}, outside the {classes} classes",
                self.path.display(),
                store.label(i)
            );
        }
        Ok(store)
    }

    /// A split of the formats held in one or a few binary files.
    fn read_whole(&self, split: Split) -> anyhow::Result<ImageDataset> {
        let dir = &self.path;
        match self.format {
            DataFormat::Idx => {
                let names = optional_names(&dir.join("classes.txt"))?;
                let limit = names.as_ref().map_or(super::file_list::MAX_CLASSES, Vec::len);
                let mut ds = ImageDataset::load(dir, split, limit)?;
                ds.classes = match names {
                    Some(names) => names,
                    None => (0..idx_class_count(dir)?).map(|i| i.to_string()).collect(),
                };
                Ok(ds)
            }
            DataFormat::Cifar10 => {
                ensure!(
                    cifar::is_cifar_dir(dir),
                    "{}: no {} (CIFAR-10 binary layout)",
                    dir.display(),
                    cifar::TRAIN_FILES[0]
                );
                let classes = cifar::class_names(dir)?;
                let (mut pixels, mut labels) = (Vec::new(), Vec::new());
                let has_test = dir.join(cifar::TEST_FILE).is_file();
                let files: Vec<&str> = if split == Split::Test && has_test {
                    vec![cifar::TEST_FILE]
                } else {
                    cifar::TRAIN_FILES.iter().copied().filter(|f| dir.join(f).is_file()).collect()
                };
                cifar::read_batches(dir, &files, classes.len(), &mut pixels, &mut labels)?;
                let side = cifar::SIDE;
                let ds = ImageDataset { pixels, labels, channels: 3, height: side, width: side, classes };
                Ok(if has_test { ds } else { ds.subset(&self.split_rows(ds.len(), split)) })
            }
            DataFormat::Folder | DataFormat::Csv => unreachable!("file formats are read by check_files"),
        }
    }

    /// The files to check for one split of a file format, and the rows among them that make the
    /// split: a split of its own, or the whole unsplit set (both parts are checked together).
    fn split_list(&self, split: Split) -> anyhow::Result<(FileList, Vec<usize>)> {
        let all = |list: FileList| {
            let n = list.entries.len();
            (list, (0..n).collect())
        };
        Ok(match (split, self.file_lists()?) {
            (Split::Train, (train, Some(_))) => all(train),
            (Split::Test, (_, Some(test))) => all(test),
            (split, (list, None)) => {
                let rows = self.split_rows(list.entries.len(), split);
                (list, rows)
            }
        })
    }

    /// The training list, and the test list where the layout has one.
    fn file_lists(&self) -> anyhow::Result<(FileList, Option<FileList>)> {
        let dir = &self.path;
        match self.format {
            DataFormat::Folder => match split_folders(dir)? {
                Some((train, test)) => {
                    let train = list_folder(&train, None)?;
                    let test = list_folder(&test, Some(&train.classes))?;
                    Ok((train, Some(test)))
                }
                None => Ok((list_folder(dir, None)?, None)),
            },
            DataFormat::Csv => {
                let (train_csv, test_csv) = csv_files(dir)?;
                let names = optional_names(&train_csv.parent().unwrap_or(Path::new(".")).join("classes.txt"))?;
                let train = list_csv(&train_csv, names.as_deref())?;
                let test = test_csv.map(|t| list_csv(&t, Some(&train.classes))).transpose()?;
                Ok((train, test))
            }
            _ => unreachable!("only file formats have file lists"),
        }
    }

    /// Every file of `list` decoded in parallel and checked to share one shape; the images at
    /// `rows` make the split, their pixels kept when they fit in `memory_limit` bytes.
    fn check_files(
        &self,
        list: FileList,
        rows: &[usize],
        progress: bool,
        memory_limit: u64,
    ) -> anyhow::Result<ImageStore> {
        let bar = if progress && list.entries.len() >= PROGRESS_FROM {
            ProgressBar::new(list.entries.len() as u64)
        } else {
            ProgressBar::with_draw_target(Some(list.entries.len() as u64), ProgressDrawTarget::hidden())
        };
        bar.set_style(
            ProgressStyle::with_template("checking images {bar:30} {pos}/{len} {per_sec} ETA {eta}").expect("template"),
        );
        let size = self.image_size.map(|s| s as u32);
        let read = |e: &Entry| -> anyhow::Result<Pixels> {
            let bytes = std::fs::read(&e.path).with_context(|| format!("reading {}", e.describe()))?;
            decode(&bytes, size).with_context(|| e.describe())
        };
        let Some(first_entry) = list.entries.first() else { bail!("{}: no images", self.path.display()) };
        let first = read(first_entry)?;
        let shape = |p: &Pixels| (p.channels, p.height, p.width);
        let keep = (rows.len() as u64).saturating_mul(first.data.len() as u64) <= memory_limit;
        let mut in_split = vec![false; list.entries.len()];
        rows.iter().for_each(|&i| in_split[i] = true);
        // Each file's shape, and its pixels when kept: a streamed set is checked in memory
        // bounded by the decoding threads, not by the set.
        let decoded: Vec<(Shape, Option<Vec<u8>>)> = list
            .entries
            .par_iter()
            .zip(&in_split)
            .map(|(e, &wanted)| {
                let pixels = read(e)?;
                bar.inc(1);
                Ok((shape(&pixels), (keep && wanted).then_some(pixels.data)))
            })
            .collect::<anyhow::Result<_>>()?;
        bar.finish_and_clear();
        let describe = |i: usize| list.entries[i].describe();
        if let Some(i) = decoded.iter().position(|(s, _)| s.0 != first.channels) {
            bail!(
                "{} has {} channel(s) but {} has {}: a data set is all grayscale or all colour",
                describe(0),
                first.channels,
                describe(i),
                decoded[i].0.0
            );
        }
        if let Some(i) = decoded.iter().position(|(s, _)| *s != shape(&first)) {
            bail!(
                "{} is {}×{} but {} is {}×{}: give --image-size S to resize them all",
                describe(0),
                first.width,
                first.height,
                describe(i),
                decoded[i].0.2,
                decoded[i].0.1
            );
        }
        ensure!(
            first.width == first.height,
            "{} is {}×{}: images must be square; give --image-size S to centre-crop and resize",
            describe(0),
            first.width,
            first.height
        );
        let (channels, side) = (first.channels, first.height);
        let entries: Vec<Entry> = rows.iter().map(|&i| list.entries[i].clone()).collect();
        if !keep {
            return Ok(ImageStore::Files(StreamedFiles { entries, size, channels, side, classes: list.classes }));
        }
        let labels = entries.iter().map(|e| e.label).collect();
        let mut decoded = decoded;
        let pixels = rows.iter().flat_map(|&i| decoded[i].1.take().expect("kept")).collect();
        Ok(ImageStore::Memory(ImageDataset {
            pixels,
            labels,
            channels,
            height: side,
            width: side,
            classes: list.classes,
        }))
    }

    /// The rows of `split` in an unsplit set of `n`: a fixed shuffle picks `val_fraction` of the
    /// images (at least one) for testing; both parts keep the set's order.
    fn split_rows(&self, n: usize, split: Split) -> Vec<usize> {
        let k = ((n as f64 * self.val_fraction).round() as usize).clamp(1, n.saturating_sub(1).max(1));
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut stream(HOLDOUT_SEED, Purpose::Holdout, 0));
        let mut test = vec![false; n];
        for &i in &order[..k] {
            test[i] = true;
        }
        (0..n).filter(|&i| test[i] == (split == Split::Test)).collect()
    }
}

/// The command-line flags that name a data set (`dits train`, `dits eval`).
#[derive(Debug, Clone, Default, PartialEq, clap::Args)]
pub struct DataArgs {
    /// Data set: a directory of MNIST IDX files, class folders or CIFAR-10 batches, or a
    /// file,label CSV [default: the shipped MNIST].
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,
    /// The data's format, when the directory holds more than one.
    #[arg(long, value_enum)]
    pub format: Option<DataFormat>,
    /// Resize image files to S×S (centre-cropping non-square ones; antialiased bilinear).
    #[arg(long, value_name = "S")]
    pub image_size: Option<usize>,
    /// Share of the images held out for testing when the data has no test split.
    #[arg(long, value_name = "F")]
    pub val_fraction: Option<f64>,
}

impl DataArgs {
    /// The data set these flags name (the shipped MNIST without `--data`).
    pub fn source(&self) -> anyhow::Result<DataSource> {
        let path = self.data.clone().unwrap_or_else(super::default_data_dir);
        DataSource::new(&path, self.format, self.image_size, self.val_fraction)
    }

    /// Whether any flag besides `--data` was given.
    pub fn has_options(&self) -> bool {
        self.format.is_some() || self.image_size.is_some() || self.val_fraction.is_some()
    }
}

/// `DIR/train` and `DIR/test` (or `DIR/val`) when both hold class folders.
fn split_folders(dir: &Path) -> anyhow::Result<Option<(PathBuf, PathBuf)>> {
    let train = dir.join("train");
    let test = ["test", "val"].iter().map(|t| dir.join(t)).find(|t| t.is_dir());
    match test {
        Some(test) if train.is_dir() && !subdirectories(&train)?.is_empty() => Ok(Some((train, test))),
        _ => Ok(None),
    }
}

/// The training CSV and the test CSV if there is one: `path` itself when it is a file; else
/// `train.csv` (with `test.csv`) in the directory, else its only `.csv`.
fn csv_files(path: &Path) -> anyhow::Result<(PathBuf, Option<PathBuf>)> {
    if path.is_file() {
        return Ok((path.to_path_buf(), None));
    }
    if path.join("train.csv").is_file() {
        let test = path.join("test.csv");
        return Ok((path.join("train.csv"), test.is_file().then_some(test)));
    }
    match csv_names(path)?.as_slice() {
        [one] => Ok((path.join(one), None)),
        [] => bail!("{}: no .csv file", path.display()),
        many => {
            bail!("{}: several .csv files ({}); name one with --data DIR/FILE.csv", path.display(), many.join(", "))
        }
    }
}

fn csv_names(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.') && n.to_ascii_lowercase().ends_with(".csv"))
        .collect();
    names.sort();
    Ok(names)
}

/// Whether the directory's CSV (as [`csv_files`] picks it) names an existing file in one of its
/// first rows.
fn csv_lists_files(dir: &Path) -> bool {
    let Ok((csv_path, _)) = csv_files(dir) else { return false };
    let Ok(mut reader) = csv::ReaderBuilder::new().has_headers(false).flexible(true).from_path(&csv_path) else {
        return false;
    };
    let base = csv_path.parent().unwrap_or(Path::new("."));
    reader.records().take(2).filter_map(Result::ok).any(|r| r.get(0).is_some_and(|f| base.join(f.trim()).is_file()))
}

/// Whether any subfolder holds an image file (a class folder, or `train/<class>/`).
fn holds_images(dir: &Path) -> bool {
    walkdir::WalkDir::new(dir)
        .min_depth(2)
        .into_iter()
        .filter_map(Result::ok)
        .any(|e| e.file_type().is_file() && super::file_list::is_image_name(e.path()))
}

fn optional_names(path: &Path) -> anyhow::Result<Option<Vec<String>>> {
    path.is_file().then(|| read_class_names(path)).transpose()
}

/// The format of the data at `path`, from what it holds; two plausible formats are an error
/// asking for `--format`.
pub fn detect(path: &Path) -> anyhow::Result<DataFormat> {
    ensure!(path.exists(), "data {} does not exist", path.display());
    if path.is_file() {
        ensure!(
            path.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")),
            "--data {}: a file must be a .csv list of file,label rows",
            path.display()
        );
        return Ok(DataFormat::Csv);
    }
    let mut found = Vec::new();
    if idx_present(path) {
        found.push(DataFormat::Idx);
    }
    if cifar::is_cifar_dir(path) {
        found.push(DataFormat::Cifar10);
    }
    // A CSV that lists files makes the directory a CSV data set, even though the files it lists
    // usually sit in subfolders; a stray metadata CSV beside class folders does not.
    if csv_lists_files(path) {
        found.push(DataFormat::Csv);
    } else if holds_images(path) {
        found.push(DataFormat::Folder);
    }
    match found.as_slice() {
        [one] => Ok(*one),
        [] => bail!(
            "{}: no data set found: expected MNIST IDX files (train-images-idx3-ubyte[.gz], …), class folders \
             (DIR/<class>/*.png|jpg), a file,label CSV, or CIFAR-10 batches (data_batch_1.bin, …)",
            path.display()
        ),
        many => bail!(
            "{}: holds data in several formats ({}); choose one with --format",
            path.display(),
            many.iter().map(|f| format!("{f:?}").to_lowercase()).collect::<Vec<_>>().join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use image::{DynamicImage, GrayImage, Luma, Rgb, RgbImage};

    use super::*;
    use crate::data::idx::encode_idx;

    fn gray(path: &Path, side: u32, value: u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        DynamicImage::ImageLuma8(GrayImage::from_pixel(side, side, Luma([value]))).save(path).unwrap();
    }

    fn source(path: &Path) -> DataSource {
        DataSource::new(path, None, None, None).unwrap()
    }

    #[test]
    fn formats_are_detected_and_ambiguity_asks_for_format() {
        let d = tempfile::tempdir().unwrap();
        gray(&d.path().join("folder/cat/1.png"), 2, 0);
        assert_eq!(detect(&d.path().join("folder")).unwrap(), DataFormat::Folder);
        // A metadata CSV beside class folders leaves them a folder; a CSV listing files is a list.
        std::fs::write(d.path().join("folder/notes.csv"), "id,comment\n1,fine\n").unwrap();
        assert_eq!(detect(&d.path().join("folder")).unwrap(), DataFormat::Folder);
        std::fs::write(d.path().join("folder/notes.csv"), "cat/1.png,0\n").unwrap();
        assert_eq!(detect(&d.path().join("folder")).unwrap(), DataFormat::Csv);
        assert_eq!(detect(&d.path().join("folder/notes.csv")).unwrap(), DataFormat::Csv);
        // IDX files beside class folders: two formats, so --format decides.
        for f in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"] {
            std::fs::write(d.path().join("folder").join(f), b"").unwrap();
        }
        std::fs::remove_file(d.path().join("folder/notes.csv")).unwrap();
        let err = detect(&d.path().join("folder")).unwrap_err().to_string();
        assert!(err.contains("idx, folder") && err.contains("--format"), "{err}");
        std::fs::create_dir(d.path().join("cifar")).unwrap();
        std::fs::write(d.path().join("cifar/data_batch_1.bin"), [0u8; 3073]).unwrap();
        assert_eq!(detect(&d.path().join("cifar")).unwrap(), DataFormat::Cifar10);
        assert_eq!(detect(Path::new("data/mnist")).unwrap(), DataFormat::Idx);
        let empty = tempfile::tempdir().unwrap();
        assert!(detect(empty.path()).unwrap_err().to_string().contains("no data set found"));
        assert!(detect(&d.path().join("absent")).unwrap_err().to_string().contains("does not exist"));
    }

    #[test]
    fn an_unsplit_folder_holds_out_a_fixed_disjoint_share() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..20u8 {
            gray(&d.path().join(format!("{}/{i:02}.png", i % 2)), 2, i);
        }
        let s = source(d.path());
        let (train, test) = (s.load(Split::Train).unwrap(), s.load(Split::Test).unwrap());
        assert_eq!((train.len(), test.len()), (18, 2));
        let mut all: Vec<u8> = train.pixels.iter().chain(&test.pixels).step_by(4).copied().collect();
        all.sort();
        assert_eq!(all, (0..20).collect::<Vec<u8>>());
        assert_eq!(s.load(Split::Test).unwrap().pixels, test.pixels);
        assert_eq!(train.classes, ["0", "1"]);
        // The training part keeps the files' order (class by class).
        let labels = &train.labels;
        assert!(labels.windows(2).all(|w| w[0] <= w[1]), "{labels:?}");
    }

    #[test]
    fn train_and_test_folders_are_the_splits() {
        let d = tempfile::tempdir().unwrap();
        gray(&d.path().join("train/a/1.png"), 4, 1);
        gray(&d.path().join("train/b/1.png"), 4, 2);
        gray(&d.path().join("test/b/1.png"), 4, 3);
        let s = source(d.path());
        assert_eq!(s.format, DataFormat::Folder);
        let test = s.load(Split::Test).unwrap();
        assert_eq!((test.len(), test.labels[0], test.classes.len()), (1, 1, 2));
        assert_eq!(s.load(Split::Train).unwrap().len(), 2);
    }

    #[test]
    fn a_set_over_the_memory_limit_is_its_checked_file_list_with_the_same_images() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..12u8 {
            gray(&d.path().join(format!("{}/{i:02}.png", ["a", "b", "c"][i as usize % 3])), 5, 10 * i);
        }
        let s = DataSource::new(d.path(), None, Some(4), Some(0.25)).unwrap();
        for split in [Split::Train, Split::Test] {
            let memory = s.open(split, false, u64::MAX).unwrap();
            let files = s.open(split, false, 0).unwrap();
            assert!(!memory.streams() && files.streams());
            assert_eq!((files.len(), files.shape(), files.classes()), (memory.len(), (1, 4, 4), memory.classes()));
            for i in 0..memory.len() {
                let (mut a, mut b) = (vec![0u8; 16], vec![0u8; 16]);
                memory.read(i, &mut a).unwrap();
                files.read(i, &mut b).unwrap();
                assert_eq!((a, memory.label(i)), (b, files.label(i)));
            }
        }
        // Streaming still checks every file first, the held-out part included.
        std::fs::write(d.path().join("a/00.png"), b"\x89PNG\r\n\x1a\ntruncated").unwrap();
        let err = format!("{:#}", s.open(Split::Train, false, 0).unwrap_err());
        assert!(err.contains("00.png"), "{err}");
    }

    #[test]
    fn mixed_channels_and_sizes_are_errors_naming_two_files_and_image_size_resizes() {
        let d = tempfile::tempdir().unwrap();
        gray(&d.path().join("a/1.png"), 4, 1);
        gray(&d.path().join("b/2.png"), 6, 1);
        let err = source(d.path()).load(Split::Train).unwrap_err().to_string();
        assert!(
            err.contains("1.png is 4×4 but") && err.contains("2.png is 6×6") && err.contains("--image-size"),
            "{err}"
        );
        let resized = DataSource::new(d.path(), None, Some(3), None).unwrap().load(Split::Train).unwrap();
        assert_eq!((resized.height, resized.width, resized.channels), (3, 3, 1));
        RgbImage::from_pixel(4, 4, Rgb([1, 2, 3])).save(d.path().join("b/2.png")).unwrap();
        let err = source(d.path()).load(Split::Train).unwrap_err().to_string();
        assert!(err.contains("1 channel(s) but") && err.contains("2.png has 3"), "{err}");
        std::fs::write(d.path().join("b/2.png"), b"\x89PNG\r\n\x1a\ntruncated").unwrap();
        let err = format!("{:#}", source(d.path()).load(Split::Train).unwrap_err());
        assert!(err.contains("2.png"), "{err}");
    }

    #[test]
    fn idx_splits_keep_the_training_class_list() {
        let d = tempfile::tempdir().unwrap();
        let write = |prefix: &str, labels: &[u8]| {
            let n = labels.len() as u32;
            std::fs::write(
                d.path().join(format!("{prefix}-images-idx3-ubyte")),
                encode_idx(&[n, 2, 2], &vec![0; 4 * n as usize]),
            )
            .unwrap();
            std::fs::write(d.path().join(format!("{prefix}-labels-idx1-ubyte")), encode_idx(&[n], labels)).unwrap();
        };
        write("train", &[0, 4, 2]);
        write("t10k", &[1]);
        let s = source(d.path());
        assert_eq!(s.load(Split::Test).unwrap().classes.len(), 5);
        write("t10k", &[5]);
        let err = s.load(Split::Test).unwrap_err().to_string();
        assert!(err.contains("label 5, outside the 5 classes"), "{err}");
        write("t10k", &[1]);
        std::fs::write(d.path().join("classes.txt"), "a\nb\nc\nd\ne\nf\n").unwrap();
        assert_eq!(s.load(Split::Train).unwrap().classes[5], "f");
    }
}
