//! `RUN_DIR/report.html`: one self-contained page per run (no network, no scripts, images
//! inline), rewritten at every checkpoint: the recipe and model, the loss, learning-rate and
//! speed curves, the grids over time, the evaluations, and the final grid and denoising process.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use base64::Engine as _;

use crate::info::{self, RunInfo};
use crate::train::metrics::{self, Curve};

/// The page's file name in the run directory.
pub const REPORT_FILE: &str = "report.html";

/// Writes the report of the run in `run_dir` (atomically: a reader never sees half a page).
pub fn write(run_dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let info = info::describe(run_dir, false)?;
    let records = metrics::read(run_dir);
    let html = render(&info, &records)?;
    let path = run_dir.join(REPORT_FILE);
    crate::fsutil::write_atomic(&path, html.as_bytes())?;
    Ok(path)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn data_uri(png: &[u8]) -> String {
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png))
}

fn png_file(path: &Path) -> anyhow::Result<String> {
    Ok(data_uri(&std::fs::read(path).with_context(|| format!("reading {}", path.display()))?))
}

/// A chart as PNG (zlib at its default level: the best level made a report 3× slower to write
/// for a file a third smaller).
fn encode(img: &image::RgbImage) -> anyhow::Result<Vec<u8>> {
    use image::ImageEncoder;
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    let mut out = Vec::new();
    PngEncoder::new_with_quality(&mut out, CompressionType::Default, FilterType::Adaptive)
        .write_image(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgb8)
        .context("encoding a chart")?;
    Ok(out)
}

const STYLE: &str = "body{font-family:sans-serif;margin:24px;color:#222;background:#fafafa}\
h1{font-size:22px}h2{font-size:18px;margin-top:28px}table{border-collapse:collapse}\
td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}\
.row{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}\
figure{margin:0;text-align:center;font-size:12px}img.chart{width:480px;border:1px solid #ddd}\
img.grid{image-rendering:pixelated;width:200px;background:#000}\
img.big{image-rendering:pixelated;max-width:100%}.status{font-size:15px}";

/// The page for `info` and its metrics log.
pub fn render(info: &RunInfo, records: &[metrics::MetricsRecord]) -> anyhow::Result<String> {
    let mut h = String::new();
    let title = info.run_dir.as_deref().unwrap_or(&info.checkpoint).display().to_string();
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>dits run {}</title><style>{STYLE}</style></head><body>",
        escape(&title)
    );
    let _ = write!(h, "<h1>dits run <code>{}</code></h1>", escape(&title));
    let done = if info.step == info.total_steps { "complete" } else { "in progress or paused" };
    let _ = write!(
        h,
        "<p class=\"status\" id=\"status\">step {} of {} ({done}), epoch {}, {:.1} min of training",
        info.step,
        info.total_steps,
        info.epoch,
        info.elapsed_s / 60.0
    );
    if let (Some(loss), Some(rate)) = (info.loss, info.samples_per_s) {
        let _ = write!(h, "; loss {loss:.4}, {rate:.0} samples/s (last logged interval)");
    }
    let _ = write!(
        h,
        "; {} parameters; data <code>{}</code> ({})</p>",
        info.parameters,
        escape(&info.data.path.display().to_string()),
        escape(&info.data.format)
    );

    h.push_str("<h2>Training curves</h2><div class=\"row\" id=\"curves\">");
    if records.len() >= 2 {
        for curve in [Curve::LOSS, Curve::LR, Curve::SPEED] {
            let img = metrics::chart(records, &curve).map_err(|e| anyhow::anyhow!("drawing {}: {e}", curve.title))?;
            let _ = write!(h, "<img class=\"chart\" alt=\"{}\" src=\"{}\">", curve.title, data_uri(&encode(&img)?));
        }
    } else {
        h.push_str("<p>Not enough steps logged yet.</p>");
    }
    h.push_str("</div>");

    h.push_str("<h2>Samples over time</h2><p>The moving average's samples from the same noise and labels at each step.</p><div class=\"row\" id=\"grids\">");
    for (step, path) in &info.grids {
        let _ = write!(
            h,
            "<figure><img class=\"grid\" alt=\"step {step}\" src=\"{}\"><figcaption>step {step}</figcaption></figure>",
            png_file(path)?
        );
    }
    if info.grids.is_empty() {
        h.push_str("<p>No grids yet (<code>--sample-every</code>).</p>");
    }
    h.push_str("</div>");

    h.push_str("<h2>Evaluations</h2>");
    if info.evals.is_empty() {
        h.push_str("<p>None yet: <code>dits eval RUN_DIR</code> judges the latest checkpoint and records it here.</p>");
    } else {
        h.push_str("<table id=\"evals\"><tr><th>step</th><th>samples</th><th>accuracy</th><th>lowest class</th><th>FID-CNN</th><th>floor</th><th>× floor</th><th>near-copies</th></tr>");
        for e in &info.evals {
            let r = &e.report;
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{:.4}</td><td>{:.4}</td><td>{:.3}</td><td>{:.3}</td><td>{:.2}</td><td>{:.1}%</td></tr>",
                e.step,
                r.samples,
                r.accuracy,
                r.min_class_accuracy,
                r.fid,
                r.fid_floor,
                r.fid_ratio,
                100.0 * r.memorisation.share
            );
        }
        h.push_str("</table>");
    }

    if let Some(grid) = &info.final_grid {
        h.push_str("<h2>Final samples</h2><div class=\"row\" id=\"final\">");
        let _ = write!(
            h,
            "<figure><img class=\"big\" alt=\"final grid\" src=\"{}\"><figcaption>10 per class</figcaption></figure>",
            png_file(grid)?
        );
        let process = grid.with_file_name("process.png");
        if process.is_file() {
            let _ = write!(
                h,
                "<figure><img class=\"big\" alt=\"denoising process\" src=\"{}\"><figcaption>from noise (left) to image</figcaption></figure>",
                png_file(&process)?
            );
        }
        h.push_str("</div>");
    }

    h.push_str("<h2>Recipe</h2><div class=\"row\">");
    for (name, table) in [("model", &info.model), ("train", &info.train)] {
        let _ = write!(h, "<table><tr><th colspan=\"2\">[{name}]</th></tr>");
        if let Some(map) = table.as_object() {
            for (k, v) in map {
                let _ = write!(h, "<tr><td>{}</td><td>{}</td></tr>", escape(k), escape(&v.to_string()));
            }
        }
        h.push_str("</table>");
    }
    h.push_str("</div>");
    let _ =
        writeln!(h, "<p>checkpoint <code>{}</code></p></body></html>", escape(&info.checkpoint.display().to_string()));
    Ok(h)
}
