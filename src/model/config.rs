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

/// Which network: the two differ in every detail of conditioning and initialisation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// owenliang/mnist-dits: learned positions, adaLN γ/β/α from separate Linears of the
    /// condition, ReLU FFN, affine LayerNorms, PyTorch default initialisation.
    #[default]
    MnistDits,
    /// The DiT paper (Peebles & Xie 2023), as smalldiffusion uses it: adaLN-Zero (shift, scale
    /// and gate from one SiLU → Linear, zero-initialised), LayerNorms without affine
    /// parameters, fixed 2-D sin-cos positions, GELU-tanh MLP, Xavier initialisation and a
    /// zero-initialised output layer.
    Dit,
}

/// A class-conditional DiT over `channels × image_size × image_size` images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DitConfig {
    /// Absent in checkpoints written before the DiT-paper family existed: mnist-dits.
    #[serde(default)]
    pub family: Family,
    pub image_size: usize,
    pub channels: usize,
    /// Side of the square patches; must divide `image_size`.
    pub patch: usize,
    /// Token width (the embedding size).
    pub width: usize,
    /// Number of DiT blocks.
    pub depth: usize,
    pub heads: usize,
    /// Width of each head; mnist-dits gives every head the full token width, the DiT family
    /// splits it (`heads · head_dim = width`).
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
pub const PRESETS: &[&str] = &["mnist-dits", "dit-s2", "dit-s4"];

impl DitConfig {
    /// owenliang/mnist-dits: patch 4 → 49 tokens of width 64, 3 blocks, 4 heads of 64.
    pub fn mnist_dits() -> Self {
        Self {
            family: Family::MnistDits,
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

    /// The DiT-paper family with `patch`, `depth` and `heads` of `head_dim` (width
    /// `heads · head_dim`), MLP ratio 4, a null label for guidance.
    pub fn dit(patch: usize, depth: usize, heads: usize, head_dim: usize) -> Self {
        Self {
            family: Family::Dit,
            image_size: 28,
            channels: 1,
            patch,
            width: heads * head_dim,
            depth,
            heads,
            head_dim,
            mlp_ratio: 4,
            classes: 10,
            attn_scale: AttnScale::HeadDim,
            null_class: true,
        }
    }

    /// `mnist-dits`; `dit-s2`: smalldiffusion's Fashion-MNIST DiT (patch 2 → 196 tokens,
    /// depth 6, 6 heads × 32); `dit-s4`: the same at patch 4 (49 tokens, ~4× cheaper).
    pub fn preset(name: &str) -> anyhow::Result<Self> {
        match name {
            "mnist-dits" => Ok(Self::mnist_dits()),
            "dit-s2" => Ok(Self::dit(2, 6, 6, 32)),
            "dit-s4" => Ok(Self::dit(4, 6, 6, 32)),
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
        if self.family == Family::Dit {
            ensure!(
                self.heads * self.head_dim == self.width,
                "heads × head width ({} × {}) must equal the model width {} in the DiT family",
                self.heads,
                self.head_dim,
                self.width
            );
            ensure!(
                self.width.is_multiple_of(4),
                "model width {} must be a multiple of 4 (2-D sin-cos positions)",
                self.width
            );
        }
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
        let mut c = DitConfig::preset("dit-s2").unwrap();
        c.validate().unwrap();
        assert_eq!((c.tokens(), c.width), (196, 192));
        c.heads = 5;
        assert!(c.validate().unwrap_err().to_string().contains("must equal the model width"));
    }

    #[test]
    fn configs_written_before_the_family_field_read_as_mnist_dits() {
        let mut v = serde_json::to_value(DitConfig::mnist_dits()).unwrap();
        v.as_object_mut().unwrap().remove("family");
        assert_eq!(serde_json::from_value::<DitConfig>(v).unwrap(), DitConfig::mnist_dits());
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
