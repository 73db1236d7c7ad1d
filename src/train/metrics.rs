//! The run's metrics: one JSON object per line in `metrics.jsonl`, and `loss.png` drawn from
//! it.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

pub const METRICS_FILE: &str = "metrics.jsonl";
pub const LOSS_PLOT: &str = "loss.png";

/// One logged interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsRecord {
    /// Optimizer steps completed at the end of the interval.
    pub step: u64,
    pub epoch: u64,
    /// Mean training loss over the interval.
    pub loss: f64,
    pub lr: f64,
    pub samples_per_s: f64,
    pub elapsed_s: f64,
    /// fp16: steps of the interval skipped for a gradient overflow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped_steps: Option<u64>,
    /// fp16: the loss scale at the end of the interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
}

/// An evaluation during the run (`--eval-every`), a line of its own in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalLine {
    pub step: u64,
    pub eval: EvalFigures,
}

/// The judge's headline figures (the full report is in `evals.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalFigures {
    pub samples: usize,
    pub accuracy: f64,
    pub min_class_accuracy: f64,
    pub fid: f64,
    pub fid_floor: f64,
    pub fid_ratio: f64,
    /// Wall time of drawing and judging the samples.
    pub seconds: f64,
}

/// Append an evaluation line.
pub fn append_eval(run_dir: &Path, line: &EvalLine) -> anyhow::Result<()> {
    crate::fsutil::append_json_line(&run_dir.join(METRICS_FILE), line)
}

/// Append a record.
pub fn append(run_dir: &Path, record: &MetricsRecord) -> anyhow::Result<()> {
    crate::fsutil::append_json_line(&run_dir.join(METRICS_FILE), record)
}

/// Every record in the run's log (lines that do not parse, e.g. one cut by a crash, and the
/// evaluation lines, are skipped).
pub fn read(run_dir: &Path) -> Vec<MetricsRecord> {
    crate::fsutil::read_json_lines(&run_dir.join(METRICS_FILE))
}

/// On resume: drop the lines (intervals and evaluations) logged after the checkpoint, which
/// the resumed run will log again, and lines that do not parse.
pub fn truncate_after(run_dir: &Path, step: u64) -> anyhow::Result<()> {
    let path = run_dir.join(METRICS_FILE);
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let kept: String = text
        .lines()
        .filter(|l| {
            let v: Option<serde_json::Value> = serde_json::from_str(l).ok();
            v.and_then(|v| v.get("step").and_then(|s| s.as_u64())).is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::fsutil::write_atomic(&path, kept.as_bytes())
}

/// Draw the loss curve (log-scale loss against step) to `loss.png`.
pub fn plot_loss(run_dir: &Path) -> anyhow::Result<()> {
    let records = read(run_dir);
    if records.len() < 2 {
        return Ok(());
    }
    let path = run_dir.join(LOSS_PLOT);
    let img = chart(&records, &Curve::LOSS).map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))?;
    let tmp = run_dir.join(format!(".{LOSS_PLOT}.tmp.png"));
    img.save_with_format(&tmp, image::ImageFormat::Png).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
}

/// One quantity of the log against the step.
#[derive(Debug, Clone, Copy)]
pub struct Curve {
    pub title: &'static str,
    pub axis: &'static str,
    pub value: fn(&MetricsRecord) -> f64,
    /// A log-scale axis (the loss falls over decades).
    pub log: bool,
}

impl Curve {
    pub const LOSS: Curve = Curve { title: "training loss", axis: "loss", value: |r| r.loss, log: true };
    pub const LR: Curve = Curve { title: "learning rate", axis: "lr", value: |r| r.lr, log: false };
    pub const SPEED: Curve = Curve { title: "samples/s", axis: "samples/s", value: |r| r.samples_per_s, log: false };
}

const PLOT_SIZE: (u32, u32) = (800, 480);

/// `curve` drawn into an RGB image (encoded by the `image` crate, which dits already uses for
/// samples, rather than plotters' own encoder and its second copy of `image`).
pub fn chart(records: &[MetricsRecord], curve: &Curve) -> Result<image::RgbImage, Box<dyn std::error::Error>> {
    register_font();
    let (w, h) = PLOT_SIZE;
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE)?;
        let max_step = records.last().map_or(1, |r| r.step).max(1);
        let points: Vec<(u64, f64)> = records
            .iter()
            .map(|r| (r.step, (curve.value)(r)))
            .filter(|&(_, v)| v.is_finite() && (v > 0.0 || !curve.log))
            .collect();
        let lo = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let hi = points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        let mut builder = ChartBuilder::on(&root);
        builder.caption(curve.title, ("sans-serif", 24)).margin(12).x_label_area_size(40).y_label_area_size(70);
        let series = LineSeries::new(points.iter().copied(), &BLUE);
        if curve.log {
            let (lo, hi) = if lo.is_finite() && hi > lo { (lo * 0.9, hi * 1.1) } else { (1e-3, 1.0) };
            let mut chart = builder.build_cartesian_2d(0u64..max_step, (lo..hi).log_scale())?;
            chart
                .configure_mesh()
                .x_desc("step")
                .y_desc(curve.axis)
                .y_label_formatter(&|v| format!("{v:.3}"))
                .draw()?;
            chart.draw_series(series)?;
        } else {
            let (lo, hi) = if lo.is_finite() && hi > lo { (lo.min(0.0), hi * 1.05) } else { (0.0, hi.max(1e-9) * 2.0) };
            let mut chart = builder.build_cartesian_2d(0u64..max_step, lo..hi)?;
            chart
                .configure_mesh()
                .x_desc("step")
                .y_desc(curve.axis)
                .y_label_formatter(&|v| {
                    if v.abs() >= 1.0 || *v == 0.0 { format!("{v:.0}") } else { format!("{v:.1e}") }
                })
                .draw()?;
            chart.draw_series(series)?;
        }
        root.present()?;
    }
    Ok(image::RgbImage::from_raw(w, h, buf).ok_or("plot buffer size")?)
}

/// plotters draws text with a font registered by name; DejaVu Sans is embedded so plots render
/// the same on machines without any fonts installed.
fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(step: u64, loss: f64) -> MetricsRecord {
        MetricsRecord {
            step,
            epoch: 0,
            loss,
            lr: 1e-3,
            samples_per_s: 100.0,
            elapsed_s: step as f64,
            skipped_steps: None,
            loss_scale: None,
        }
    }

    #[test]
    fn log_truncates_on_resume_and_plots() {
        let dir = tempfile::tempdir().unwrap();
        for s in [10, 20, 30] {
            append(dir.path(), &rec(s, 1.0 / s as f64)).unwrap();
        }
        let figures = EvalFigures {
            samples: 500,
            accuracy: 0.9,
            min_class_accuracy: 0.8,
            fid: 3.0,
            fid_floor: 1.0,
            fid_ratio: 3.0,
            seconds: 1.0,
        };
        for step in [20, 30] {
            append_eval(dir.path(), &EvalLine { step, eval: figures.clone() }).unwrap();
        }
        truncate_after(dir.path(), 20).unwrap();
        assert_eq!(read(dir.path()).iter().map(|r| r.step).collect::<Vec<_>>(), vec![10, 20]);
        // The evaluation lines are kept up to the step too, and skipped by `read`.
        let evals: Vec<EvalLine> = crate::fsutil::read_json_lines(&dir.path().join(METRICS_FILE));
        assert_eq!(evals, vec![EvalLine { step: 20, eval: figures }]);
        plot_loss(dir.path()).unwrap();
        let png = image::open(dir.path().join(LOSS_PLOT)).unwrap();
        assert_eq!((png.width(), png.height()), (800, 480));
    }
}
