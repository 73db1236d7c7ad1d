//! Watching a run: the sample grids it draws while it trains (the same after a resume as
//! without one, and the images `dits sample` draws from that checkpoint), and the samples it
//! draws at its end.

mod common;

use common::{dits, ok, train_args, write_toy_dataset};

use std::path::Path;

/// A small run on the toy data, checkpointed only where a grid needs it and at the end.
fn flags(extra: &[&'static str]) -> Vec<&'static str> {
    let mut f = vec!["--batch", "8", "--threads", "2", "--seed", "3"];
    f.extend(["--checkpoint-every", "100", "--depth", "1", "--label-dropout", "0.1", "--no-progress"]);
    f.extend(extra);
    f
}

fn run(dir: &Path, out: &str, extra: &[&'static str]) -> String {
    let args = train_args(out, &flags(extra));
    ok(&dits(&args.iter().map(String::as_str).collect::<Vec<_>>(), dir))
}

fn grids(run: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(run.join("samples"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn grids_over_time_survive_a_resume_and_match_dits_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_toy_dataset(&dir.join("data"), 64);

    let text = run(dir, "whole", &["--steps", "6", "--sample-every", "2"]);
    assert!(text.contains("drew 3 sample grids"), "{text}");
    let names = grids(&dir.join("whole"));
    assert_eq!(names, ["step-0000002.png", "step-0000004.png", "step-0000006.png"]);
    // A row per class (10), PER_CLASS = 4 images of 28 + 2 pixels each, and a name margin.
    let img = image::open(dir.join("whole/samples/step-0000006.png")).unwrap();
    assert_eq!(img.height(), 10 * 30 + 2);
    assert!(img.width() > 4 * 30 + 2, "a margin for the class names");

    // Paused at step 3 (no grid there: the uninterrupted run has none) and resumed.
    run(dir, "resumed", &["--steps", "6", "--sample-every", "2", "--stop-after", "3"]);
    assert_eq!(grids(&dir.join("resumed")), ["step-0000002.png"]);
    assert!(!dir.join("resumed/final").exists(), "a paused run has no final samples yet");
    ok(&dits(&["train", "--resume", "resumed", "--threads", "2", "--no-progress"], dir));
    assert_eq!(grids(&dir.join("resumed")), names);
    for name in &names {
        let a = std::fs::read(dir.join("whole/samples").join(name)).unwrap();
        let b = std::fs::read(dir.join("resumed/samples").join(name)).unwrap();
        assert!(a == b, "{name} differs after a resume");
    }

    // The grid is `dits sample`'s, 4 per class, seeded with the run's seed.
    let ckpt = "whole/checkpoints/step-00000006";
    ok(&dits(&["sample", "--checkpoint", ckpt, "--out", "drawn", "--per-class", "4", "--seed", "3"], dir));
    let a = std::fs::read(dir.join("drawn/grid.png")).unwrap();
    let b = std::fs::read(dir.join("whole/samples/step-0000006.png")).unwrap();
    assert!(a == b, "the step-6 grid is not what dits sample draws from its checkpoint");

    // The end of the run: the default samples in RUN_DIR/final, and where they are.
    let line = text.lines().find(|l| l.starts_with("samples: ")).unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("whole/final/grid.png"), "{line}");
    for name in ["grid.png", "process.png", "0_00009.png", "9_00000.png", "samples.json"] {
        assert!(dir.join("whole/final").join(name).is_file(), "missing final/{name}");
    }
    let resumed_final = std::fs::read(dir.join("resumed/final/grid.png")).unwrap();
    assert!(resumed_final == std::fs::read(dir.join("whole/final/grid.png")).unwrap());
}

#[test]
fn grids_and_final_samples_can_be_turned_off() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_toy_dataset(&dir.join("data"), 32);
    let text = run(dir, "quiet", &["--sample-every", "0", "--no-final-samples", "--steps", "2"]);
    assert!(!text.contains("samples: "), "{text}");
    assert!(!dir.join("quiet/samples").exists() && !dir.join("quiet/final").exists());
    // Only the last checkpoint: no grid asked for one.
    let ckpts: Vec<String> = std::fs::read_dir(dir.join("quiet/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    assert_eq!(ckpts, ["step-00000002"]);
}

#[test]
fn the_report_is_one_page_that_shows_curves_and_grids_in_a_browser() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_toy_dataset(&dir.join("data"), 64);
    let text = run(dir, "run", &["--steps", "8", "--sample-every", "2", "--log-every", "1"]);
    let report = dir.join("run/report.html");
    assert!(text.contains(&format!("report: {}", Path::new("run/report.html").display())), "{text}");
    let html = std::fs::read_to_string(&report).unwrap();
    // Self-contained: every image inline, nothing fetched, no scripts.
    assert!(!html.contains("http://") && !html.contains("https://") && !html.contains("<script"));
    assert_eq!(
        html.matches("src=\"data:image/png;base64,").count(),
        3 + 4 + 2,
        "3 curves, 4 grids, final grid and process"
    );
    assert!(html.contains("step 8 of 8 (complete)"));

    let Some(browser) = common::chromium() else { return };
    let url = format!("file://{}", report.canonicalize().unwrap().display());
    let (shot, console) = common::screenshot(&browser, &url, (1300, 1600), dir);
    assert!(console.is_empty(), "console messages: {console:?}");
    // The curves: plotters' blue lines on white.
    let blue = shot.pixels().filter(|p| p[2] > 180 && p[0] < 120 && p[1] < 120).count();
    assert!(blue > 300, "{blue} curve pixels: no curves drawn");
    // The grids: bright samples on black (the page is near-white): bright pixels whose 7×7
    // neighbourhood is mostly black. Black text on the white charts does not count.
    let dark = |x: u32, y: u32| shot.get_pixel(x, y).0.iter().all(|&c| c < 40);
    let (w, h) = shot.dimensions();
    let mut on_black = 0usize;
    for y in 3..h - 3 {
        for x in 3..w - 3 {
            if shot.get_pixel(x, y).0.iter().all(|&c| c > 128) {
                let around = (y - 3..=y + 3)
                    .flat_map(|v| (x - 3..=x + 3).map(move |u| (u, v)))
                    .filter(|&(u, v)| dark(u, v))
                    .count();
                on_black += usize::from(around > 25);
            }
        }
    }
    assert!(on_black > 2000, "{on_black} bright pixels on black: no samples shown");
}

#[test]
fn evaluations_during_a_run_are_logged_and_shown() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_toy_dataset(&dir.join("data"), 320);
    let mut args = train_args("run", &flags(&["--steps", "4", "--eval-every", "2", "--sample-every", "0"]));
    args.extend(["--no-final-samples".to_string()]);
    // The judge is trained first (on the toy data) into a cache of the test's own.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dits"))
        .args(&args)
        .current_dir(dir)
        .env("XDG_CACHE_HOME", dir.join("cache"))
        .output()
        .unwrap();
    let text = ok(&out);
    assert!(text.contains("training the evaluation classifier"), "{text}");
    assert!(text.contains("judged the moving average 2 times"), "{text}");
    let evals: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("run/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("eval").is_some())
        .collect();
    assert_eq!(evals.iter().map(|v| v["step"].as_u64().unwrap()).collect::<Vec<_>>(), [2, 4]);
    for v in &evals {
        let e = &v["eval"];
        assert_eq!(e["samples"], 500, "50 per class");
        assert!((0.0..=1.0).contains(&e["accuracy"].as_f64().unwrap()));
        assert!(e["fid"].as_f64().unwrap() > 0.0 && e["fid_floor"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(std::fs::read_to_string(dir.join("run/evals.jsonl")).unwrap().lines().count(), 2);
    let html = std::fs::read_to_string(dir.join("run/report.html")).unwrap();
    assert!(html.contains("id=\"evals\"") && html.contains("<td>4</td><td>500</td>"), "the evaluations in the report");
    let info = ok(&dits(&["info", "run"], dir));
    assert!(info.contains("eval:       step 4: 500 samples"), "{info}");
    assert!(info.contains("sha256 "), "{info}");
}
