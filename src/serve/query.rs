//! `GET /sample?class=3&n=16&seed=1&steps=20&cfg=1.5&sampler=euler`: the query string read into
//! a draw request, every value checked against the model and the server's limits. Strict on
//! purpose: an unknown or repeated parameter is an error, so `clas=3` or a second `n=` is never
//! silently ignored.

use clap::ValueEnum;

use crate::diffusion::SamplerKind;
use crate::diffusion::defaults::{DEFAULT_CFG_SCALE, DEFAULT_SAMPLER, DEFAULT_STEPS};
use crate::sample::class_id;

/// The largest guidance scale accepted (beyond it samples saturate; the bound keeps a typo such
/// as `cfg=15000` from being taken).
pub const MAX_CFG: f64 = 20.0;

/// The parameters `/sample` reads.
pub const PARAMETERS: [&str; 6] = ["class", "n", "seed", "steps", "cfg", "sampler"];

/// What the request is checked against: the model's classes and schedule, the server's limits.
#[derive(Debug, Clone)]
pub struct Bounds {
    pub class_names: Vec<String>,
    /// The model was trained with label dropout, so guidance (cfg ≠ 1) is possible.
    pub guidable: bool,
    /// Levels of the model's noise schedule (the most steps a chain can take).
    pub timesteps: usize,
    /// Images in one request.
    pub max_images: usize,
    /// Steps of one request's chain.
    pub max_steps: usize,
}

impl Bounds {
    pub fn default_steps(&self) -> usize {
        DEFAULT_STEPS.min(self.steps_limit())
    }

    pub fn default_cfg(&self) -> f64 {
        if self.guidable { DEFAULT_CFG_SCALE } else { 1.0 }
    }

    pub fn steps_limit(&self) -> usize {
        self.max_steps.min(self.timesteps)
    }
}

/// How a request's images are denoised: requests that agree on it share model calls.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Chain {
    pub steps: usize,
    pub cfg: f64,
    pub sampler: SamplerKind,
}

/// One checked request: `n` images of `class` from noise `seed`, the images `dits sample
/// --classes CLASS --per-class N --seed SEED` draws.
#[derive(Debug, Clone, PartialEq)]
pub struct DrawRequest {
    pub class: usize,
    pub n: usize,
    pub seed: u64,
    pub chain: Chain,
}

/// The request in `query` (the part of the URL after `?`, or None), or the message of a 400.
pub fn parse(query: Option<&str>, bounds: &Bounds) -> Result<DrawRequest, String> {
    let mut values: [Option<String>; PARAMETERS.len()] = Default::default();
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let Some(slot) = PARAMETERS.iter().position(|p| *p == key) else {
            return Err(format!("unknown parameter {:?}: /sample takes {}", clip(&key), PARAMETERS.join(", ")));
        };
        if values[slot].is_some() {
            return Err(format!("parameter {key:?} is given twice"));
        }
        values[slot] = Some(value.into_owned());
    }
    let [class, n, seed, steps, cfg, sampler] = values;
    let class = class.ok_or_else(|| {
        format!("parameter \"class\" is required: a class id 0..{} or name", bounds.class_names.len() - 1)
    })?;
    let class = class_id(&class, &bounds.class_names)
        .map_err(|e| e.to_string().replace(&format!("{class:?}"), &format!("{:?}", clip(&class))))?;
    let n = whole("n", n.as_deref(), 1, 1, bounds.max_images as u64)? as usize;
    let seed = whole("seed", seed.as_deref(), 0, 0, u64::MAX)?;
    let steps_limit = bounds.steps_limit();
    let steps = whole("steps", steps.as_deref(), bounds.default_steps() as u64, 1, steps_limit as u64)? as usize;
    let cfg = match cfg {
        None => bounds.default_cfg(),
        Some(text) => match text.trim().parse::<f64>() {
            Ok(v) if (0.0..=MAX_CFG).contains(&v) => v,
            _ => return Err(format!("cfg must be a number from 0 to {MAX_CFG}, got {:?}", clip(&text))),
        },
    };
    if cfg != 1.0 && !bounds.guidable {
        return Err(format!("cfg {cfg} needs a model trained with label dropout; this one takes cfg=1 only"));
    }
    let sampler = match sampler {
        None => DEFAULT_SAMPLER,
        Some(text) => <SamplerKind as ValueEnum>::from_str(&text, true).map_err(|_| {
            let names: Vec<String> = SamplerKind::value_variants()
                .iter()
                .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_string()))
                .collect();
            format!("unknown sampler {:?}: one of {}", clip(&text), names.join(", "))
        })?,
    };
    Ok(DrawRequest { class, n, seed, chain: Chain { steps, cfg, sampler } })
}

/// A whole number in `lo..=hi` (or `default` when absent).
fn whole(name: &str, text: Option<&str>, default: u64, lo: u64, hi: u64) -> Result<u64, String> {
    let Some(text) = text else { return Ok(default) };
    match text.trim().parse::<u64>() {
        Ok(v) if (lo..=hi).contains(&v) => Ok(v),
        _ => Err(format!("{name} must be a whole number from {lo} to {hi}, got {:?}", clip(text))),
    }
}

/// A value quoted back to the client, cut short (a hostile query can be megabytes long).
fn clip(text: &str) -> String {
    const MAX: usize = 40;
    match text.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bounds() -> Bounds {
        Bounds {
            class_names: (0..10).map(|i| i.to_string()).collect(),
            guidable: true,
            timesteps: 1000,
            max_images: 64,
            max_steps: 250,
        }
    }

    #[test]
    fn defaults_are_dits_samples() {
        let r = parse(Some("class=3"), &bounds()).unwrap();
        let chain = Chain { steps: DEFAULT_STEPS, cfg: DEFAULT_CFG_SCALE, sampler: DEFAULT_SAMPLER };
        assert_eq!(r, DrawRequest { class: 3, n: 1, seed: 0, chain });
        let r = parse(Some("class=7&n=16&seed=1&steps=20&cfg=1.5&sampler=dpmpp-2m"), &bounds()).unwrap();
        assert_eq!((r.class, r.n, r.seed, r.chain.steps, r.chain.cfg), (7, 16, 1, 20, 1.5));
        assert_eq!(r.chain.sampler, SamplerKind::DpmPp2m);
    }

    #[test]
    fn classes_by_name_and_percent_encoding() {
        let named = Bounds { class_names: vec!["ankle boot".into(), "bag".into()], ..bounds() };
        assert_eq!(parse(Some("class=ankle%20boot"), &named).unwrap().class, 0);
        assert_eq!(parse(Some("class=ankle+boot"), &named).unwrap().class, 0);
        assert_eq!(parse(Some("class=1"), &named).unwrap().class, 1);
    }

    #[test]
    fn every_bad_value_is_named() {
        for (query, needle) in [
            (None, "\"class\" is required"),
            (Some("class=10"), "outside the model's 10 classes"),
            (Some("class=seven"), "unknown class"),
            (Some("class=1&n=0"), "n must be"),
            (Some("class=1&n=65"), "n must be"),
            (Some("class=1&n=-3"), "n must be"),
            (Some("class=1&n=1e3"), "n must be"),
            (Some("class=1&steps=0"), "steps must be"),
            (Some("class=1&steps=251"), "from 1 to 250"),
            (Some("class=1&seed=99999999999999999999999"), "seed must be"),
            (Some("class=1&cfg=nan"), "cfg must be"),
            (Some("class=1&cfg=inf"), "cfg must be"),
            (Some("class=1&cfg=-1"), "cfg must be"),
            (Some("class=1&cfg=21"), "cfg must be"),
            (Some("class=1&sampler=magic"), "unknown sampler"),
            (Some("class=1&clas=3"), "unknown parameter \"clas\""),
            (Some("class=1&n=2&n=3"), "given twice"),
        ] {
            let err = parse(query, &bounds()).unwrap_err();
            assert!(err.contains(needle), "{query:?}: {err}");
        }
        let unguided = Bounds { guidable: false, ..bounds() };
        assert!(parse(Some("class=1&cfg=2"), &unguided).unwrap_err().contains("label dropout"));
        assert_eq!(parse(Some("class=1"), &unguided).unwrap().chain.cfg, 1.0);
        let short = Bounds { timesteps: 8, ..bounds() };
        assert_eq!(parse(Some("class=1"), &short).unwrap().chain.steps, 8);
        assert!(parse(Some("class=1&steps=9"), &short).is_err());
    }

    #[test]
    fn quoted_values_are_cut_short() {
        let err = parse(Some(&format!("class={}", "9".repeat(100_000))), &bounds()).unwrap_err();
        assert!(err.len() < 300, "{}", err.len());
        let err = parse(Some(&format!("{}=1", "x".repeat(100_000))), &bounds()).unwrap_err();
        assert!(err.len() < 300, "{}", err.len());
    }

    proptest! {
        #[test]
        fn any_query_is_a_request_or_a_message(query in "\\PC{0,80}") {
            let _ = parse(Some(&query), &bounds());
        }

        #[test]
        fn valid_queries_round_trip(
            class in 0usize..10, n in 1usize..=64, seed: u64, steps in 1usize..=250, cfg in 0.0f64..=20.0
        ) {
            let q = format!("seed={seed}&class={class}&steps={steps}&n={n}&cfg={cfg}");
            let r = parse(Some(&q), &bounds()).unwrap();
            prop_assert_eq!(r, DrawRequest { class, n, seed, chain: Chain { steps, cfg, sampler: DEFAULT_SAMPLER } });
        }
    }
}
