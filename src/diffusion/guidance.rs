//! Classifier-free guidance (Ho & Salimans 2022): extrapolate from the unconditional
//! prediction towards the conditional one, `ε̂ = ε̂(∅) + s·(ε̂(y) - ε̂(∅))` (applied to the raw
//! network output: ε̂ and the flow velocity are both affine in it, so either works).
//!
//! Convention: `s = 1` is the plain conditional model, `s = 0` the unconditional one, `s > 1`
//! guided (smalldiffusion's `cfg_scale` is our s − 1). Both predictions come from one model
//! call on a doubled batch, which keeps the matrix products large.
//!
//! Guidance can be limited to an interval of noise levels σ (Kynkäänniemi et al. 2024):
//! at high noise it pulls every sample of a class towards the same few shapes (less variety),
//! at low noise it changes little; outside the interval the step is the conditional model
//! alone, one plain model call.

use anyhow::ensure;
use burn::prelude::*;

use super::defaults::{DEFAULT_CFG_INTERVAL, DEFAULT_CFG_SCALE};
use super::sampler::Denoiser;

/// A denoiser with guidance applied.
pub struct Guided<'a, D> {
    pub model: &'a D,
    pub scale: f64,
    /// The label id the model was trained to read as "no label".
    pub null_label: Option<usize>,
    /// Per level index: whether guidance applies there (None: everywhere).
    pub active: Option<Vec<bool>>,
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
        Ok(Self { model, scale, null_label, active: None })
    }

    /// The guidance `dits sample` applies: `scale` (None: [`DEFAULT_CFG_SCALE`] for a model with a
    /// null label, else 1) within `interval` of σ (None: [`DEFAULT_CFG_INTERVAL`]; `(0, ∞)` guides
    /// every step). `sigmas` are the schedule's, by level.
    pub fn as_sampled(
        model: &'a D,
        null_label: Option<usize>,
        sigmas: &[f64],
        scale: Option<f64>,
        interval: Option<(f64, f64)>,
    ) -> anyhow::Result<Self> {
        let scale = scale.unwrap_or(if null_label.is_some() { DEFAULT_CFG_SCALE } else { 1.0 });
        let guided = Self::new(model, scale, null_label)?;
        match interval.unwrap_or(DEFAULT_CFG_INTERVAL) {
            (lo, hi) if lo > 0.0 || hi < f64::INFINITY => guided.within(sigmas, lo, hi),
            _ => Ok(guided),
        }
    }

    /// Guide only at levels whose σ lies in `[lo, hi]`; `sigmas` are the schedule's, by level.
    pub fn within(mut self, sigmas: &[f64], lo: f64, hi: f64) -> anyhow::Result<Self> {
        ensure!(0.0 <= lo && lo <= hi, "--cfg-interval needs 0 ≤ LO ≤ HI, got {lo},{hi}");
        self.active = Some(sigmas.iter().map(|&s| lo <= s && s <= hi).collect());
        Ok(self)
    }

    /// Whether the batch at levels `t` (one level for the whole batch while sampling) is guided.
    fn guides(&self, t: &Tensor<1, Int>) -> bool {
        match &self.active {
            None => true,
            Some(active) => {
                let level = t.clone().narrow(0, 0, 1).into_data().iter::<i64>().next().unwrap_or(0);
                active.get(level as usize).copied().unwrap_or(true)
            }
        }
    }
}

impl<D: Denoiser> Denoiser for Guided<'_, D> {
    fn predict(&self, x: Tensor<4>, t: Tensor<1, Int>, y: Tensor<1, Int>) -> Tensor<4> {
        let null = match self.null_label {
            Some(null) if self.scale != 1.0 && self.guides(&t) => null,
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

/// `"LO,HI"` → `(LO, HI)` for `--cfg-interval`: two non-negative numbers, LO ≤ HI (`inf` allowed).
pub fn parse_interval(text: &str) -> Result<(f64, f64), String> {
    let bad = || format!("expected LO,HI (two numbers, 0 ≤ LO ≤ HI), got '{text}'");
    let (lo, hi) = text.split_once(',').ok_or_else(bad)?;
    let lo: f64 = lo.trim().parse().map_err(|_| bad())?;
    let hi: f64 = hi.trim().parse().map_err(|_| bad())?;
    if lo.is_nan() || hi.is_nan() || lo < 0.0 || lo > hi {
        return Err(bad());
    }
    Ok((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn interval_parser_round_trips_and_never_panics(lo in 0.0f64..100.0, width in 0.0f64..100.0, junk in "\\PC{0,20}") {
            prop_assert_eq!(parse_interval(&format!("{lo},{}", lo + width)), Ok((lo, lo + width)));
            let _ = parse_interval(&junk);
            let reversed = format!("{},{}", lo + width + 1.0, lo);
            prop_assert!(parse_interval(&reversed).is_err());
        }
    }

    #[test]
    fn interval_parser_accepts_infinity_and_rejects_garbage() {
        assert_eq!(parse_interval("0.3, inf"), Ok((0.3, f64::INFINITY)));
        for bad in ["", "1", "1,2,3", "a,b", "-1,2", "NaN,1"] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
    }

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
    fn guidance_applies_only_inside_its_sigma_interval() {
        let d = Device::flex();
        let x = Tensor::<4>::from_data(TensorData::new(vec![0.5f32], [1, 1, 1, 1]), &d);
        let y = Tensor::<1, Int>::from_data(TensorData::new(vec![2i64], [1]), &d);
        // Levels 0..4 with σ = 0.1, 1, 2, 10: guidance only for σ in [1, 2].
        let g = Guided::new(&Linear, 3.0, Some(10)).unwrap().within(&[0.1, 1.0, 2.0, 10.0], 1.0, 2.0).unwrap();
        for (level, guided) in [(0i64, false), (1, true), (2, true), (3, false)] {
            let t = Tensor::<1, Int>::from_data(TensorData::new(vec![level], [1]), &d);
            let cond = 0.5 + 20.0 + level as f32;
            let want = if guided { cond + 2.0 * (20.0 - 100.0) } else { cond };
            assert_eq!(values(g.predict(x.clone(), t, y.clone())), [want], "level {level}");
        }
        assert!(Guided::new(&Linear, 3.0, Some(10)).unwrap().within(&[1.0], 2.0, 1.0).is_err());
    }

    #[test]
    fn a_scale_other_than_one_needs_a_null_label() {
        assert!(Guided::new(&Linear, 1.0, None).is_ok());
        let e = Guided::new(&Linear, 2.0, None).err().unwrap().to_string();
        assert!(e.contains("label dropout"), "{e}");
        assert!(Guided::new(&Linear, f64::NAN, Some(1)).is_err());
    }
}
