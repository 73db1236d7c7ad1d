//! The FLOP model of a DiT: the matrix products of one forward pass, as written and as dits
//! executes them. `dits bench` divides measured throughput by it to report GFLOP/s.

use super::config::{DitConfig, Family};

impl DitConfig {
    /// Floating-point operations of one image's forward pass, counting the matrix products
    /// (2 per multiply-add: patch embedding, conditioning MLPs, attention projections, scores
    /// and weighted sums, feed-forward, output layer); elementwise work is left out, as in the
    /// usual "model FLOPs" accounting. A training step costs about 3× this per image.
    pub fn forward_flops(&self) -> f64 {
        self.flops(false)
    }

    /// [`Self::forward_flops`] as dits executes them: with the attention folded where it pays
    /// (mnist-dits, see [`super::mnist_dits::folded`]), fewer than the model as written.
    pub fn executed_forward_flops(&self) -> f64 {
        self.flops(self.family == Family::MnistDits && self.attention_folds())
    }

    /// Whether mnist-dits blocks of this shape run their attention folded.
    pub fn attention_folds(&self) -> bool {
        super::mnist_dits::folded::folding_pays(self.tokens(), self.width, self.head_dim)
    }

    fn flops(&self, folded: bool) -> f64 {
        let (t, w, pv) = (self.tokens() as f64, self.width as f64, self.patch_values() as f64);
        let inner = (self.heads * self.head_dim) as f64;
        let hidden = (self.mlp_ratio * self.width) as f64;
        let attention = if folded {
            // q' and v' (H heads of W each), scores and weighted sums W wide.
            2.0 * t * w * self.heads as f64 * w + 2.0 * t * t * self.heads as f64 * w
        } else {
            3.0 * t * w * inner + 2.0 * t * t * inner + t * inner * w
        };
        let block = attention + 2.0 * t * w * hidden + 6.0 * w * w;
        let (embed, time, head) = match self.family {
            // Conv2d(C → C·p²) then Linear(C·p² → W); time MLP W → W → W; LN → Linear(W → C·p²).
            Family::MnistDits => (t * pv * pv + t * pv * w, 2.0 * w * w, t * w * pv),
            // Conv2d(C → W); time MLP 256 → W → W; adaLN W → 2W, then Linear(W → C·p²).
            Family::Dit => (t * pv * w, 256.0 * w + w * w, 2.0 * w * w + t * w * pv),
        };
        2.0 * (embed + time + self.depth as f64 * block + head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_of_a_training_step_and_of_the_presets() {
        // A training step at batch 256 is about 28 GFLOP (3 × the forward), mnist-dits as written.
        let step = 3.0 * 256.0 * DitConfig::mnist_dits().forward_flops();
        assert!((step / 1e9 - 28.0).abs() < 0.5, "{step}");
        // DiT-S/4 at 49 tokens: 12·W²·T per block dominates (≈ 21.7 MFLOP per block).
        let s4 = DitConfig::preset("dit-s4").unwrap();
        let per_block = 2.0 * (12.0 * 192.0 * 192.0 * 49.0 + 2.0 * 49.0 * 49.0 * 192.0 + 6.0 * 192.0 * 192.0);
        assert!(s4.forward_flops() > 6.0 * per_block && s4.forward_flops() < 6.2 * per_block);
        // Folding applies to mnist-dits (26% fewer), not to the DiT-paper presets.
        let m = DitConfig::mnist_dits();
        let saved = 1.0 - m.executed_forward_flops() / m.forward_flops();
        assert!((saved - 0.26).abs() < 0.01, "{saved}");
        assert_eq!(s4.executed_forward_flops(), s4.forward_flops());
    }
}
