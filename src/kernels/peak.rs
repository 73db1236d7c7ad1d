//! The machine's measured FMA peak: what `dits bench` states its GFLOP/s against.
//!
//! Every thread of the pool runs a chain-free loop of fused multiply-adds in the widest vectors a
//! step uses (the CPU's widest, AVX-512, else AVX2 + FMA, else what the compiler makes of plain
//! multiply-adds; lower where `DITS_CPU_CAPABILITY` caps the kernels and gemm is built without
//! AVX-512), with more independent accumulators than an FMA's latency times its ports, so
//! nothing waits but the FMA units. The figure is the
//! ceiling the kernels are measured against, not a datasheet number: it includes whatever clock
//! the cores hold while every one of them runs vector code.

use std::time::Instant;

use super::isa::Isa;

/// The probe's result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Peak {
    pub gflops: f64,
    pub threads: usize,
    /// The instructions measured.
    pub isa: Isa,
}

/// Iterations of the inner loop per call: about 10 ms on one core.
const ITERS: u64 = 2_000_000;

/// Runs the probe for about `seconds` on every thread of the rayon pool.
pub fn measure(seconds: f64) -> Peak {
    let (isa, flops_per_iter, run): (Isa, f64, fn(u64) -> f32) = pick();
    let threads = rayon::current_num_threads();
    // One warm-up call per thread (clocks ramp up), then repeated calls until the time is up.
    rayon::broadcast(|_| std::hint::black_box(run(ITERS / 10)));
    let start = Instant::now();
    let calls: u64 = rayon::broadcast(|_| {
        let mut calls = 0u64;
        while start.elapsed().as_secs_f64() < seconds {
            std::hint::black_box(run(std::hint::black_box(ITERS)));
            calls += 1;
        }
        calls
    })
    .into_iter()
    .sum();
    let elapsed = start.elapsed().as_secs_f64();
    Peak { gflops: calls as f64 * ITERS as f64 * flops_per_iter / elapsed / 1e9, threads, isa }
}

/// Several probes spread over a benchmark. A shared host's speed moves between them (other
/// tenants, clocks), and contention only ever lowers a reading: the highest is the ceiling the
/// benchmark is stated against, and the lowest says how far the host moved meanwhile (a
/// single probe in a slow moment can put a step above "the peak"; README, `dits bench`).
#[derive(Debug, Clone, Default)]
pub struct Probes {
    readings: Vec<Peak>,
}

impl Probes {
    /// Takes one probe of about `seconds`.
    pub fn take(&mut self, seconds: f64) {
        self.readings.push(measure(seconds));
    }

    /// The highest reading, with how many were taken and the lowest of them.
    pub fn summary(&self) -> Option<PeakSummary> {
        let best = *self.readings.iter().max_by(|a, b| a.gflops.total_cmp(&b.gflops))?;
        let lowest = self.readings.iter().map(|p| p.gflops).fold(f64::INFINITY, f64::min);
        Some(PeakSummary { peak: best, lowest_gflops: lowest, probes: self.readings.len() })
    }
}

/// What [`Probes`] found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeakSummary {
    /// The highest reading.
    pub peak: Peak,
    pub lowest_gflops: f64,
    pub probes: usize,
}

impl PeakSummary {
    /// Whether the readings differ enough (more than 10%) that the host's speed moved during
    /// the benchmark, and shares of the peak are rough.
    pub fn host_moved(&self) -> bool {
        self.lowest_gflops < 0.9 * self.peak.gflops
    }
}

/// The probe for the widest extension a step runs, the kernels' or gemm's, with its FLOPs per
/// loop iteration.
fn pick() -> (Isa, f64, fn(u64) -> f32) {
    #[cfg(all(target_arch = "x86_64", not(fuzzing)))]
    {
        match super::isa::active().max(super::isa::gemm()) {
            // SAFETY: the CPU has AVX-512F (`isa::active` and `isa::gemm` are within its extensions).
            Isa::Avx512 => return (Isa::Avx512, (ACC * 16 * 2) as f64, |n| unsafe { x86::avx512(n) }),
            // SAFETY: the CPU has AVX2 and FMA (as above).
            Isa::Avx2 => return (Isa::Avx2, (ACC * 8 * 2) as f64, |n| unsafe { x86::avx2(n) }),
            Isa::Portable => {}
        }
    }
    (Isa::Portable, (ACC * 2) as f64, scalar)
}

/// Independent accumulators: more than FMA latency (4 cycles) × ports (2) on current cores, and
/// few enough to stay in AVX2's 16 registers.
const ACC: usize = 12;

fn scalar(n: u64) -> f32 {
    let (a, b) = (std::hint::black_box(0.999_f32), std::hint::black_box(1e-7_f32));
    let mut acc = [1f32; ACC];
    for _ in 0..n {
        for v in &mut acc {
            // Not `mul_add`: without the FMA extension that is a call to libm's exact `fmaf`.
            *v = *v * a + b;
        }
    }
    acc.iter().sum()
}

#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
mod x86 {
    use std::arch::x86_64::*;

    use super::ACC;

    #[target_feature(enable = "avx512f")]
    pub fn avx512(n: u64) -> f32 {
        let (a, b) = (_mm512_set1_ps(std::hint::black_box(0.999)), _mm512_set1_ps(std::hint::black_box(1e-7)));
        let mut acc = [_mm512_set1_ps(1.0); ACC];
        for _ in 0..n {
            for v in &mut acc {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
        }
        acc.iter().map(|&v| _mm512_reduce_add_ps(v)).sum()
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn avx2(n: u64) -> f32 {
        let (a, b) = (_mm256_set1_ps(std::hint::black_box(0.999)), _mm256_set1_ps(std::hint::black_box(1e-7)));
        let mut acc = [_mm256_set1_ps(1.0); ACC];
        for _ in 0..n {
            for v in &mut acc {
                *v = _mm256_fmadd_ps(*v, a, b);
            }
        }
        let mut lanes = [0f32; 8];
        let sum = acc.iter().fold(_mm256_setzero_ps(), |s, &v| _mm256_add_ps(s, v));
        // SAFETY: `lanes` holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
        lanes.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The summary keeps the highest reading and reports the lowest beside it.
    #[test]
    fn probes_keep_the_highest_reading() {
        let reading = |gflops| Peak { gflops, threads: 2, isa: Isa::Portable };
        let probes = Probes { readings: vec![reading(150.0), reading(201.0), reading(102.5)] };
        let s = probes.summary().unwrap();
        assert_eq!((s.peak.gflops, s.lowest_gflops, s.probes), (201.0, 102.5, 3));
        assert!(s.host_moved());
        let steady = Probes { readings: vec![reading(200.0), reading(195.0)] }.summary().unwrap();
        assert!(!steady.host_moved());
        assert!(Probes::default().summary().is_none());
    }

    /// The probe measures something positive and names what it ran; every variant the CPU runs
    /// computes the same recurrence (so none is optimised away into a different loop).
    #[test]
    fn the_probe_runs_and_its_variants_agree() {
        let p = measure(0.05);
        assert!(p.gflops > 0.0 && p.gflops.is_finite(), "{p:?}");
        assert!(p.threads >= 1);
        let (_, _, run) = pick();
        let (wide, narrow) = (run(1000), scalar(1000));
        let lanes = match p.isa {
            Isa::Avx512 => 16.0,
            Isa::Avx2 => 8.0,
            Isa::Portable => 1.0,
        };
        assert!((wide - lanes * narrow).abs() <= 1e-3 * wide.abs(), "{wide} vs {lanes} × {narrow}");
    }
}
