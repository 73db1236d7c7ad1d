//! The run's metrics: one JSON object per line in `metrics.jsonl`, and `loss.png` drawn from
//! it.

use std::io::Write;
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

/// Append a record (the file is opened per record: a few writes a minute).
pub fn append(run_dir: &Path, record: &MetricsRecord) -> anyhow::Result<()> {
    let path = run_dir.join(METRICS_FILE);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "{}", serde_json::to_string(record)?).with_context(|| format!("writing {}", path.display()))
}

/// Every record in the run's log (lines that do not parse, e.g. one cut by a crash, are
/// skipped).
pub fn read(run_dir: &Path) -> Vec<MetricsRecord> {
    std::fs::read_to_string(run_dir.join(METRICS_FILE))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// On resume: drop the records logged after the checkpoint, which the resumed run will log
/// again.
pub fn truncate_after(run_dir: &Path, step: u64) -> anyhow::Result<()> {
    let path = run_dir.join(METRICS_FILE);
    if !path.exists() {
        return Ok(());
    }
    let kept: String = read(run_dir)
        .into_iter()
        .filter(|r| r.step <= step)
        .map(|r| serde_json::to_string(&r).map(|s| s + "\n"))
        .collect::<Result<_, _>>()?;
    crate::fsutil::write_atomic(&path, kept.as_bytes())
}

/// Draw the loss curve (log-scale loss against step) to `loss.png`.
pub fn plot_loss(run_dir: &Path) -> anyhow::Result<()> {
    let records = read(run_dir);
    if records.len() < 2 {
        return Ok(());
    }
    register_font();
    let path = run_dir.join(LOSS_PLOT);
    let tmp = run_dir.join(format!(".{LOSS_PLOT}.tmp.png"));
    draw(&records, &tmp).map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
}

const PLOT_SIZE: (u32, u32) = (800, 480);

/// Draw into an RGB buffer (encoded by the `image` crate, which dits already uses for samples,
/// rather than plotters' own encoder and its second copy of `image`).
fn draw(records: &[MetricsRecord], path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let (w, h) = PLOT_SIZE;
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE)?;
        let max_step = records.last().map_or(1, |r| r.step).max(1);
        let losses = records.iter().map(|r| r.loss).filter(|l| l.is_finite() && *l > 0.0);
        let lo = losses.clone().fold(f64::INFINITY, f64::min);
        let hi = losses.fold(0.0, f64::max);
        let (lo, hi) = if lo.is_finite() && hi > lo { (lo * 0.9, hi * 1.1) } else { (1e-3, 1.0) };
        let mut chart = ChartBuilder::on(&root)
            .caption("training loss", ("sans-serif", 24))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0u64..max_step, (lo..hi).log_scale())?;
        chart.configure_mesh().x_desc("step").y_desc("loss").y_label_formatter(&|v| format!("{v:.3}")).draw()?;
        chart.draw_series(LineSeries::new(records.iter().filter(|r| r.loss > 0.0).map(|r| (r.step, r.loss)), &BLUE))?;
        root.present()?;
    }
    let img = image::RgbImage::from_raw(w, h, buf).ok_or("plot buffer size")?;
    img.save_with_format(path, image::ImageFormat::Png)?;
    Ok(())
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
        truncate_after(dir.path(), 20).unwrap();
        assert_eq!(read(dir.path()).iter().map(|r| r.step).collect::<Vec<_>>(), vec![10, 20]);
        plot_loss(dir.path()).unwrap();
        let png = image::open(dir.path().join(LOSS_PLOT)).unwrap();
        assert_eq!((png.width(), png.height()), (800, 480));
    }
}
