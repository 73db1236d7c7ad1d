//! The shape of a DiT: every size lives here, nothing is a constant in the model code.

use anyhow::{bail, ensure};
use serde::{Deserialize, Serialize};

/// What the attention scores are divided by before the softmax.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttnScale {
    /// `sqrt(head_dim)`: the standard transformer scaling.
    HeadDim,
    /// `sqrt(sequence length)`: what owenliang/mnist-dits computes (`q.size(2)` on a
    /// `(B, H, S, E)` tensor), kept so its checkpoints behave identically here.
    SeqLen,
}

/// A class-conditional DiT over `channels × image_size × image_size` images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DitConfig {
    pub image_size: usize,
    pub channels: usize,
    /// Side of the square patches; must divide `image_size`.
    pub patch: usize,
    /// Token width (the embedding size).
    pub width: usize,
    /// Number of DiT blocks.
    pub depth: usize,
    pub heads: usize,
    /// Width of each head; mnist-dits gives every head the full token width.
    pub head_dim: usize,
    /// Hidden width of the feed-forward network, as a multiple of `width`.
    pub mlp_ratio: usize,
    /// Number of classes (label ids `0..classes`).
    pub classes: usize,
    pub attn_scale: AttnScale,
    /// One more label-embedding row, id `classes`, meaning "no label": trained by label
    /// dropout, it gives the unconditional prediction classifier-free guidance needs. The
    /// original mnist-dits has none (its `.pth` files load with `false`).
    #[serde(default)]
    pub null_class: bool,
}

/// Named presets, for `--model NAME`.
pub const PRESETS: &[&str] = &["mnist-dits"];

impl DitConfig {
    /// owenliang/mnist-dits: patch 4 → 49 tokens of width 64, 3 blocks, 4 heads of 64.
    pub fn mnist_dits() -> Self {
        Self {
            image_size: 28,
            channels: 1,
            patch: 4,
            width: 64,
            depth: 3,
            heads: 4,
            head_dim: 64,
            mlp_ratio: 4,
            classes: 10,
            attn_scale: AttnScale::SeqLen,
            null_class: false,
        }
    }

    pub fn preset(name: &str) -> anyhow::Result<Self> {
        match name {
            "mnist-dits" => Ok(Self::mnist_dits()),
            other => bail!("unknown model preset '{other}' (known: {})", PRESETS.join(", ")),
        }
    }

    /// Rows of the label embedding.
    pub fn label_rows(&self) -> usize {
        self.classes + usize::from(self.null_class)
    }

    /// The label id meaning "no label", if the model has one.
    pub fn null_label(&self) -> Option<usize> {
        self.null_class.then_some(self.classes)
    }

    /// Patches per image side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch
    }

    /// Tokens per image.
    pub fn tokens(&self) -> usize {
        self.grid() * self.grid()
    }

    /// Values in one flattened patch (`channels · patch²`).
    pub fn patch_values(&self) -> usize {
        self.channels * self.patch * self.patch
    }

    pub fn attn_scale_value(&self) -> f64 {
        let d = match self.attn_scale {
            AttnScale::HeadDim => self.head_dim,
            AttnScale::SeqLen => self.tokens(),
        };
        1.0 / (d as f64).sqrt()
    }

    /// Every size positive, the patch dividing the image, an even width for the sinusoidal
    /// time embedding.
    pub fn validate(&self) -> anyhow::Result<()> {
        for (name, v) in [
            ("image_size", self.image_size),
            ("channels", self.channels),
            ("patch", self.patch),
            ("width", self.width),
            ("depth", self.depth),
            ("heads", self.heads),
            ("head_dim", self.head_dim),
            ("mlp_ratio", self.mlp_ratio),
            ("classes", self.classes),
        ] {
            ensure!(v > 0, "model {name} must be at least 1");
        }
        ensure!(
            self.label_rows() <= 256,
            "at most 256 label ids (classes plus the null label), got {}",
            self.label_rows()
        );
        ensure!(
            self.image_size.is_multiple_of(self.patch),
            "patch size {} does not divide the image size {}",
            self.patch,
            self.image_size
        );
        ensure!(
            self.width.is_multiple_of(2) && self.width >= 4,
            "model width {} must be even and at least 4 (sin/cos time embedding)",
            self.width
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mnist_dits_sizes() {
        let c = DitConfig::mnist_dits();
        c.validate().unwrap();
        assert_eq!((c.grid(), c.tokens(), c.patch_values()), (7, 49, 16));
        assert!((c.attn_scale_value() - 1.0 / 7.0).abs() < 1e-12);
    }

    #[test]
    fn bad_sizes_are_rejected_with_the_reason() {
        let mut c = DitConfig::mnist_dits();
        c.patch = 5;
        assert!(c.validate().unwrap_err().to_string().contains("does not divide"));
        let mut c = DitConfig::mnist_dits();
        c.heads = 0;
        assert!(c.validate().unwrap_err().to_string().contains("heads"));
        assert!(DitConfig::preset("nope").is_err());
    }

    #[test]
    fn config_json_round_trips_and_rejects_unknown_keys() {
        let c = DitConfig::mnist_dits();
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<DitConfig>(&s).unwrap(), c);
        let bad = s.replace("\"depth\"", "\"detph\"");
        assert!(serde_json::from_str::<DitConfig>(&bad).is_err());
    }
}
