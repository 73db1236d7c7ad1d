//! Golden numerics for the diffusion side: schedule tables, trailing timesteps and sampler
//! trajectories against smalldiffusion, diffusers and mnist-dits' own reverse process
//! (`tests/fixtures/make_golden_diffusion.py`). The model is the exact denoiser of Gaussian
//! data ([`GaussianOracle`]), and every random number the references drew is fed back, so the
//! trajectories must agree step by step.

use std::collections::HashMap;
use std::path::PathBuf;

use burn::prelude::*;
use dits::diffusion::guidance::Guided;
use dits::diffusion::oracle::GaussianOracle;
use dits::diffusion::sampler::{Chain, Clip, NoiseSource, SamplerKind, StepRule, sample_batch, timestep_sequence};
use dits::diffusion::schedule::{Level, NoiseSchedule, ScheduleKind};
use safetensors::SafeTensors;
use serde::Deserialize;

const T: usize = 1000;
const SHAPE: [usize; 3] = [1, 2, 3];

struct Fixture {
    f64s: HashMap<String, (Vec<usize>, Vec<f64>)>,
    i64s: HashMap<String, Vec<i64>>,
    cases: Vec<Case>,
    s: f64,
}

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    source: String,
    schedule: String,
    steps: usize,
    #[serde(default)]
    gamma: f64,
    #[serde(default)]
    mu: f64,
    #[serde(default)]
    cfg_scale: f64,
    #[serde(default)]
    sampler: String,
    #[serde(default)]
    eta: f64,
    #[serde(default)]
    every: usize,
}

fn fixture() -> Fixture {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden_diffusion.safetensors");
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut f = Fixture {
        f64s: HashMap::new(),
        i64s: HashMap::new(),
        cases: serde_json::from_str(&meta["cases"]).unwrap(),
        s: meta["s"].parse().unwrap(),
    };
    for (name, view) in st.tensors() {
        let words = view.data().chunks_exact(8).map(|c| <[u8; 8]>::try_from(c).unwrap());
        match view.dtype() {
            safetensors::Dtype::F64 => {
                f.f64s.insert(name, (view.shape().to_vec(), words.map(f64::from_le_bytes).collect()));
            }
            safetensors::Dtype::I64 => {
                f.i64s.insert(name, words.map(i64::from_le_bytes).collect());
            }
            other => panic!("unexpected dtype {other:?}"),
        }
    }
    f
}

fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * w.abs().max(1.0), "{what}[{i}]: got {g}, want {w} (tolerance {tol})");
    }
}

fn alpha_bars(s: &NoiseSchedule) -> Vec<f64> {
    (0..s.timesteps()).map(|i| s.alpha_bar(i)).collect()
}

#[test]
fn schedule_tables_match_smalldiffusion_and_diffusers() {
    let f = fixture();
    // smalldiffusion computes these in float64 (the script sets the default dtype) ...
    for name in ["linear", "sigmoid", "log-linear"] {
        let ours = NoiseSchedule::new(ScheduleKind::from_name(name).unwrap(), T);
        let want = &f.f64s[&format!("schedule.smalldiffusion.{name}.alpha_bar")].1;
        assert_close(&format!("smalldiffusion {name}"), &alpha_bars(&ours), want, 1e-12);
    }
    // ... its cosine schedule and every diffusers table in float32.
    let cosine = alpha_bars(&NoiseSchedule::new(ScheduleKind::Cosine, T));
    assert_close("smalldiffusion cosine", &cosine, &f.f64s["schedule.smalldiffusion.cosine.alpha_bar"].1, 2e-6);
    for name in ["linear", "cosine", "sigmoid"] {
        let ours = alpha_bars(&NoiseSchedule::new(ScheduleKind::from_name(name).unwrap(), T));
        assert_close(
            &format!("diffusers {name}"),
            &ours,
            &f.f64s[&format!("schedule.diffusers.{name}.alpha_bar")].1,
            2e-6,
        );
    }
    let flow = NoiseSchedule::new(ScheduleKind::Flow, T);
    let t: Vec<f64> = flow.levels.iter().map(|l| l.b).collect();
    assert_close("smalldiffusion flow t", &t, &f.f64s["schedule.smalldiffusion.flow.t"].1, 1e-12);
}

#[test]
fn trailing_timesteps_match_diffusers() {
    let f = fixture();
    for k in [1, 3, 16, 20, 50, 999, 1000] {
        let ours: Vec<i64> = timestep_sequence(T, k).unwrap().into_iter().map(|t| t as i64).collect();
        assert_eq!(ours, f.i64s[&format!("timesteps.trailing.{k}")], "{k} steps");
    }
}

/// The reference's random numbers, in the order our sampler asks for them.
struct Recorded {
    /// `[K + 1, values]`: the start, then the noise of each step.
    noise: Vec<Vec<f32>>,
}

impl NoiseSource for Recorded {
    fn noise(&mut self, k: usize, len: usize) -> Vec<f32> {
        assert_eq!(self.noise[k].len(), len);
        self.noise[k].clone()
    }
}

fn rows(f: &Fixture, key: &str) -> Vec<Vec<f64>> {
    let (shape, v) = &f.f64s[key];
    v.chunks(v.len() / shape[0]).map(|c| c.to_vec()).collect()
}

/// Our trajectory of `case`: the image after each step (k = 0 the start), in model coordinates.
fn run_chain(f: &Fixture, case: &Case, schedule: &NoiseSchedule, chain: &Chain, start_scale: f64) -> Vec<Vec<f64>> {
    let device = Device::flex();
    let labels: Vec<u8> = f.i64s["labels"].iter().map(|&l| l as u8).collect();
    let mut noise: Vec<Vec<f32>> = rows(f, &format!("case.{}.noise", case.name))
        .into_iter()
        .map(|r| r.iter().map(|&v| v as f32).collect())
        .collect();
    noise[0].iter_mut().for_each(|v| *v = (*v as f64 * start_scale) as f32);
    let oracle = GaussianOracle::new(schedule.clone(), f.s);
    let guided = Guided::new(&oracle, if case.cfg_scale == 0.0 { 1.0 } else { case.cfg_scale }, Some(10)).unwrap();
    let mut traj = Vec::new();
    sample_batch(&guided, schedule, chain, &labels, SHAPE, &mut Recorded { noise }, &device, |_, x| {
        traj.push(x.to_data().iter::<f32>().map(|v| v as f64).collect::<Vec<f64>>())
    })
    .unwrap();
    traj
}

#[test]
fn generalised_sampler_matches_smalldiffusion() {
    let f = fixture();
    let mut checked = 0;
    for case in f.cases.iter().filter(|c| c.source == "smalldiffusion") {
        let want = rows(&f, &format!("case.{}.trajectory", case.name));
        let rule = StepRule::of(SamplerKind::Gen, 0.0, case.gamma, case.mu).unwrap();
        // Our states and what to divide each by to get smalldiffusion's: its VP chains run in
        // x̃ = x/a, its flow chain in the flow's own coordinates.
        let (traj, divisors): (Vec<Vec<f64>>, Vec<f64>) = if case.schedule == "flow" {
            // smalldiffusion's flow chain visits t = linspace(1, 0.001, K), then 0: a schedule
            // of exactly those levels, ending at clean data.
            let ts = &f.f64s[&format!("case.{}.levels", case.name)].1;
            let levels: Vec<Level> = ts[..case.steps].iter().rev().map(|&t| Level { a: 1.0 - t, b: t }).collect();
            let schedule = NoiseSchedule { kind: ScheduleKind::Flow, levels };
            let chain = Chain { indices: (0..case.steps).rev().collect(), end: None, rule, clip: Clip::None };
            (run_chain(&f, case, &schedule, &chain, 1.0), vec![1.0; case.steps + 1])
        } else {
            let mut schedule = NoiseSchedule::new(ScheduleKind::from_name(&case.schedule).unwrap(), T);
            let indices = timestep_sequence(T, case.steps).unwrap();
            // The levels exactly as the reference had them (its cosine table is float32; the
            // tables themselves are compared above).
            let sigmas = &f.f64s[&format!("case.{}.levels", case.name)].1;
            for (&i, &sigma) in indices.iter().chain([&0]).zip(sigmas) {
                let a = 1.0 / (1.0 + sigma * sigma).sqrt();
                schedule.levels[i] = Level { a, b: sigma * a };
            }
            // smalldiffusion starts at x̃ = σ·z, i.e. x = b·z, and ends at the first level.
            let start_b = schedule.levels[indices[0]].b;
            let chain = Chain { indices: indices.clone(), end: Some(0), rule, clip: Clip::None };
            let divisors = indices.iter().chain([&0]).map(|&i| schedule.levels[i].a).collect();
            (run_chain(&f, case, &schedule, &chain, start_b), divisors)
        };
        assert_eq!(traj.len(), want.len(), "{}: trajectory length", case.name);
        // The reference runs in float64, we in float32. The cosine schedule's last level has
        // σ = 2·10⁴ (a = 4.9·10⁻⁵): float32 carries ε̂ to 6·10⁻⁸, and x̂0 = (x − b·ε̂)/a turns
        // that into ~10⁻³ absolute (more under guidance ×3), which the chain carries along.
        // Every other chain agrees to float32 rounding.
        let tol = if case.schedule == "cosine" { 1e-2 } else { 2e-5 };
        for (k, (ours, theirs)) in traj.iter().zip(&want).enumerate() {
            let ours: Vec<f64> = ours.iter().map(|v| v / divisors[k]).collect();
            assert_close(&format!("{} step {k}", case.name), &ours, theirs, tol);
        }
        checked += 1;
    }
    assert_eq!(checked, 7, "every smalldiffusion case ran");
}

#[test]
fn ddpm_and_ddim_eta_match_diffusers() {
    let f = fixture();
    let schedule = NoiseSchedule::ddpm();
    let mut checked = 0;
    for case in f.cases.iter().filter(|c| c.source == "diffusers") {
        let kind = if case.sampler == "ddim" { SamplerKind::Ddim } else { SamplerKind::Ddpm };
        let rule = StepRule::of(kind, case.eta, 1.0, 0.0).unwrap();
        let chain = Chain::trailing(&schedule, case.steps, rule, Clip::None).unwrap();
        let traj = run_chain(&f, case, &schedule, &chain, 1.0);
        let want = rows(&f, &format!("case.{}.trajectory", case.name));
        assert_eq!(traj.len(), want.len());
        for (k, (ours, theirs)) in traj.iter().zip(&want).enumerate() {
            assert_close(&format!("{} step {k}", case.name), ours, theirs, 2e-5);
        }
        checked += 1;
    }
    assert_eq!(checked, 2);
}

#[test]
fn ddpm_1000_with_xt_clipping_is_mnist_dits_reverse_process() {
    let f = fixture();
    let case = f.cases.iter().find(|c| c.source == "mnist-dits").unwrap();
    let schedule = NoiseSchedule::ddpm();
    let rule = StepRule::of(SamplerKind::Ddpm, 0.0, 1.0, 0.0).unwrap();
    let chain = Chain::trailing(&schedule, case.steps, rule, Clip::Xt).unwrap();
    let traj = run_chain(&f, case, &schedule, &chain, 1.0);
    let want = rows(&f, &format!("case.{}.trajectory", case.name));
    for (j, theirs) in want.iter().enumerate() {
        let k = j * case.every;
        assert_close(&format!("mnist-dits step {k}"), &traj[k], theirs, 1e-4);
    }
}
