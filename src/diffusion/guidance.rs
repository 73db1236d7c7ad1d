//! Classifier-free guidance (Ho & Salimans 2022): extrapolate from the unconditional
//! prediction towards the conditional one, `ε̂ = ε̂(∅) + s·(ε̂(y) - ε̂(∅))` (applied to the raw
//! network output: ε̂ and the flow velocity are both affine in it, so either works).
//!
//! Convention: `s = 1` is the plain conditional model, `s = 0` the unconditional one, `s > 1`
//! guided (smalldiffusion's `cfg_scale` is our s − 1). Both predictions come from one model
//! call on a doubled batch, which keeps the matrix products large.

use anyhow::ensure;
use burn::prelude::*;

use super::sampler::Denoiser;

/// A denoiser with guidance applied.
pub struct Guided<'a, D> {
    pub model: &'a D,
    pub scale: f64,
    /// The label id the model was trained to read as "no label".
    pub null_label: Option<usize>,
}

impl<'a, D: Denoiser> Guided<'a, D> {
    /// `scale` must be finite; a scale other than 1 needs a null label.
    pub fn new(model: &'a D, scale: f64, null_label: Option<usize>) -> anyhow::Result<Self> {
        ensure!(scale.is_finite(), "--cfg-scale must be a finite number, got {scale}");
        ensure!(
            scale == 1.0 || null_label.is_some(),
            "--cfg-scale {scale} needs a model trained with label dropout (it has no null label); \
             use --cfg-scale 1, or train with --label-dropout > 0"
        );
        Ok(Self { model, scale, null_label })
    }
}

impl<D: Denoiser> Denoiser for Guided<'_, D> {
    fn predict(&self, x: Tensor<4>, t: Tensor<1, Int>, y: Tensor<1, Int>) -> Tensor<4> {
        let null = match self.null_label {
            Some(null) if self.scale != 1.0 => null,
            _ => return self.model.predict(x, t, y),
        };
        let b = x.dims()[0];
        let y_null = y.zeros_like() + null as i64;
        let both = self.model.predict(
            Tensor::cat(vec![x.clone(), x], 0),
            Tensor::cat(vec![t.clone(), t], 0),
            Tensor::cat(vec![y, y_null], 0),
        );
        let cond = both.clone().narrow(0, 0, b);
        let uncond = both.narrow(0, b, b);
        uncond.clone() + (cond - uncond) * self.scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ε̂ = x + 10·y + t: the label's effect is visible in every value, and each row can be
    /// told apart, so a mixed-up batch shows.
    struct Linear;

    impl Denoiser for Linear {
        fn predict(&self, x: Tensor<4>, t: Tensor<1, Int>, y: Tensor<1, Int>) -> Tensor<4> {
            let shift = (y.float() * 10.0 + t.float()).reshape([-1, 1, 1, 1]);
            x + shift
        }
    }

    fn values(x: Tensor<4>) -> Vec<f32> {
        x.into_data().try_to_vec::<f32>().unwrap()
    }

    #[test]
    fn guidance_extrapolates_per_row_from_one_batched_call() {
        let d = Device::flex();
        let x = Tensor::<4>::from_data(TensorData::new(vec![0.5f32, -1.0], [2, 1, 1, 1]), &d);
        let t = Tensor::<1, Int>::from_data(TensorData::new(vec![3i64, 7], [2]), &d);
        let y = Tensor::<1, Int>::from_data(TensorData::new(vec![2i64, 5], [2]), &d);
        let null = 10;
        // cond = x + 10y + t, uncond = x + 100 + t; guided = uncond + s·(10y - 100).
        for (s, want) in [(1.0, [23.5f32, 56.0]), (0.0, [103.5, 106.0]), (3.0, [103.5 - 240.0, 106.0 - 150.0])] {
            let g = Guided::new(&Linear, s, Some(null)).unwrap();
            assert_eq!(values(g.predict(x.clone(), t.clone(), y.clone())), want, "scale {s}");
        }
    }

    #[test]
    fn a_scale_other_than_one_needs_a_null_label() {
        assert!(Guided::new(&Linear, 1.0, None).is_ok());
        let e = Guided::new(&Linear, 2.0, None).err().unwrap().to_string();
        assert!(e.contains("label dropout"), "{e}");
        assert!(Guided::new(&Linear, f64::NAN, Some(1)).is_err());
    }
}
