//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod server;

use std::path::Path;
use std::process::{Command, Output};

use dits::data::idx::encode_idx;

/// `n` toy 28×28 images of a split and their labels: a bright square whose position depends on
/// the label, plus seeded speckle (other speckle in the test split, so that its images are not
/// copies of the training images).
pub fn toy_images(n: u32, split: &str) -> (Vec<u8>, Vec<u8>) {
    let mut state = 12345u32;
    if split != "train" {
        // The speckle the test split had when both splits were drawn from one generator.
        for _ in 0..n * 784 {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        }
    }
    let mut pixels = Vec::with_capacity(n as usize * 784);
    let mut labels = Vec::with_capacity(n as usize);
    for i in 0..n {
        let label = (i % 10) as u8;
        labels.push(label);
        for y in 0..28u32 {
            for x in 0..28u32 {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let (cx, cy) = (4 + 2 * label as u32, 6 + label as u32);
                let on = x.abs_diff(cx) < 4 && y.abs_diff(cy) < 4;
                pixels.push(if on { 230 } else { (state >> 28) as u8 });
            }
        }
    }
    (pixels, labels)
}

/// Write a small MNIST-layout data set of `n` [`toy_images`] (raw IDX, both splits).
pub fn write_toy_dataset(dir: &Path, n: u32) {
    std::fs::create_dir_all(dir).unwrap();
    for (split, prefix) in [("train", "train"), ("test", "t10k")] {
        let (pixels, labels) = toy_images(n, split);
        std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), encode_idx(&[n, 28, 28], &pixels)).unwrap();
        std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), encode_idx(&[n], &labels)).unwrap();
    }
}

/// The same images as an image folder: `dir/train/<label>/NNNN.png` and `dir/test/…`.
pub fn write_toy_folder(dir: &Path, n: u32) {
    for split in ["train", "test"] {
        let (pixels, labels) = toy_images(n, split);
        for (i, &label) in labels.iter().enumerate() {
            let path = dir.join(format!("{split}/{label}/{i:04}.png"));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let image = image::GrayImage::from_raw(28, 28, pixels[i * 784..(i + 1) * 784].to_vec()).unwrap();
            image.save(path).unwrap();
        }
    }
}

/// The arguments of `dits train` on the data set in `data/` (beside the run), writing `out`, with
/// `flags` after: the command line every multi-step test starts from.
pub fn train_args(out: &str, flags: &[&str]) -> Vec<String> {
    ["train", "--data", "data", "--out", out].iter().chain(flags).map(|s| s.to_string()).collect()
}

/// `dits ARGS` run in `cwd`, its output kept.
pub fn dits(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dits")).args(args).current_dir(cwd).output().expect("running dits")
}

/// The output (stdout, then stderr) of a run that must succeed.
pub fn ok(out: &Output) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "dits failed:\n{text}");
    text
}

/// The one `error:` line of a run that must fail, and fail without a panic.
pub fn error_line(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected a failure, got success:\n{err}");
    assert!(!err.contains("panicked"), "a panic instead of an error:\n{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "expected one error line:\n{err}");
    lines[0].to_string()
}

/// [`error_line`], which must contain `needle`.
pub fn fails_with(out: &Output, needle: &str) -> String {
    let line = error_line(out);
    assert!(line.contains(needle), "error line {line:?} lacks {needle:?}");
    line
}

/// Headless Chromium (`DITS_CHROMIUM`, else `chromium` on the PATH), or `None` with a note
/// when it is absent, except where `DITS_REQUIRE_BROWSER` is set (CI), where that fails.
pub fn chromium() -> Option<std::path::PathBuf> {
    let candidate =
        std::env::var_os("DITS_CHROMIUM").map(std::path::PathBuf::from).unwrap_or_else(|| "chromium".into());
    let found = Command::new(&candidate).arg("--version").output().is_ok_and(|o| o.status.success());
    if found {
        return Some(candidate);
    }
    assert!(
        std::env::var_os("DITS_REQUIRE_BROWSER").is_none(),
        "DITS_REQUIRE_BROWSER is set, but {candidate:?} does not run"
    );
    eprintln!("skipped: no headless browser ({candidate:?}; Debian: apt-get install chromium)");
    None
}

/// A page loaded in headless Chromium: a screenshot of `size` (width, height), and the
/// browser's console lines (messages the page's scripts or the loader logged).
pub fn screenshot(browser: &Path, url: &str, size: (u32, u32), dir: &Path) -> (image::RgbImage, Vec<String>) {
    let shot = dir.join(format!("shot-{}.png", std::process::id()));
    let out = Command::new(browser)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr", "--v=0"])
        .arg(format!("--window-size={},{}", size.0, size.1))
        .arg(format!("--screenshot={}", shot.display()))
        .arg(url)
        .env("HOME", dir)
        .output()
        .expect("running chromium");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(shot.is_file(), "no screenshot:\n{log}");
    let console = log.lines().filter(|l| l.contains("CONSOLE")).map(str::to_string).collect();
    (image::open(&shot).unwrap().to_rgb8(), console)
}

/// `args` of a `dits train` that draws no pictures (no grids while training, no final
/// samples): for the tests about weights and numbers, where drawing them would only cost time
/// (tests/watch.rs tests the pictures). Other commands are returned as they are.
pub fn without_pictures<S: AsRef<str>>(args: &[S]) -> Vec<String> {
    let mut out: Vec<String> = args.iter().map(|a| a.as_ref().to_string()).collect();
    if out.first().is_some_and(|a| a == "train") {
        out.extend(["--sample-every", "0", "--no-final-samples"].map(String::from));
    }
    out
}

/// ChromeDriver (`DITS_CHROMEDRIVER`, else `chromedriver` on the PATH) with the browser of
/// [`chromium`], or `None` with a note when either is absent, except where
/// `DITS_REQUIRE_BROWSER` is set (CI), where that fails.
pub fn chromedriver() -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    let browser = chromium()?;
    let candidate =
        std::env::var_os("DITS_CHROMEDRIVER").map(std::path::PathBuf::from).unwrap_or_else(|| "chromedriver".into());
    let found = Command::new(&candidate).arg("--version").output().is_ok_and(|o| o.status.success());
    if found {
        // ChromeDriver wants the browser's path, not a name to look up.
        let browser = if browser.components().count() > 1 {
            browser
        } else {
            let path = std::env::var_os("PATH").unwrap_or_default();
            std::env::split_paths(&path).map(|d| d.join(&browser)).find(|p| p.is_file()).unwrap_or(browser)
        };
        return Some((candidate, browser));
    }
    assert!(
        std::env::var_os("DITS_REQUIRE_BROWSER").is_none(),
        "DITS_REQUIRE_BROWSER is set, but {candidate:?} does not run"
    );
    eprintln!("skipped: no chromedriver ({candidate:?}; Debian: apt-get install chromium-driver)");
    None
}
