//! Which vector extension dits' kernels run: the widest the CPU has, or a lower one named by
//! `DITS_CPU_CAPABILITY` (PyTorch's `ATEN_CPU_CAPABILITY`, for dits).
//!
//! The cap exists so that one machine can test and measure the code other machines run: an
//! AVX-512 CPU capped to `avx2` runs the AVX2 + FMA kernels an AMD Zen 3 or an Intel laptop
//! runs, and `default` runs the portable code a non-x86 CPU runs. It only ever lowers the
//! extension, so every kernel it selects is one the CPU executes. gemm (the Linear layers)
//! detects the CPU on its own; its AVX-512 code is the cargo feature `x86-v4` (default on), so
//! an AVX2-only measurement also builds with `--no-default-features` (`bench/compare_torch.sh
//! --isa avx2` does both).

use std::sync::OnceLock;

/// The environment variable that caps the vector extension.
pub const ENV: &str = "DITS_CPU_CAPABILITY";

/// A vector extension the kernels are compiled for, narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust, vectorised by the compiler for the build's target (SSE2 on x86-64).
    Portable,
    /// 256-bit AVX2 with fused multiply-add.
    Avx2,
    /// 512-bit AVX-512F.
    Avx512,
}

impl Isa {
    /// The value `DITS_CPU_CAPABILITY` takes for it (PyTorch's spelling).
    pub fn env_name(self) -> &'static str {
        match self {
            Isa::Portable => "default",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// How reports print it.
    pub fn label(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "AVX2+FMA",
            Isa::Avx512 => "AVX-512",
        }
    }

    fn parse(value: &str) -> Result<Self, String> {
        match value.trim().to_ascii_lowercase().as_str() {
            "avx512" => Ok(Isa::Avx512),
            "avx2" => Ok(Isa::Avx2),
            "default" => Ok(Isa::Portable),
            other => Err(format!("{ENV}={other:?} is not a capability: use avx512, avx2 or default")),
        }
    }
}

/// The extensions whose register tiles (16 or 32 columns) run here, so that an AVX-512 machine
/// tests both widths.
#[cfg(all(test, target_arch = "x86_64", not(fuzzing)))]
pub(crate) fn tile_extensions() -> Vec<Isa> {
    [Isa::Avx2, Isa::Avx512].into_iter().filter(|&e| active() >= e).collect()
}

/// The widest extension this CPU executes.
pub fn detected() -> Isa {
    #[cfg(all(target_arch = "x86_64", not(fuzzing)))]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return Isa::Avx2;
        }
    }
    // Fuzz builds (cargo-fuzz's coverage passes) leave the vector code out: nightly LLVM cannot
    // compile it with them, and no fuzz target reaches the kernels.
    Isa::Portable
}

/// The cap `DITS_CPU_CAPABILITY` asks for, if set; an error names a bad value, or a capability
/// this CPU lacks.
pub fn requested() -> Result<Option<Isa>, String> {
    let Some(value) = std::env::var_os(ENV) else { return Ok(None) };
    let Some(value) = value.to_str() else { return Err(format!("{ENV} is not valid UTF-8")) };
    let isa = Isa::parse(value)?;
    let cpu = detected();
    if isa > cpu {
        return Err(format!(
            "{ENV}={} asks for {}, but this CPU runs at most {}",
            isa.env_name(),
            isa.label(),
            cpu.label()
        ));
    }
    Ok(Some(isa))
}

/// The extension the kernels use: [`detected`], lowered to [`requested`]'s cap (a bad value is
/// ignored here; the command line reports it before any kernel runs).
pub fn active() -> Isa {
    static ACTIVE: OnceLock<Isa> = OnceLock::new();
    *ACTIVE.get_or_init(|| {
        let cpu = detected();
        requested().ok().flatten().map_or(cpu, |cap| cap.min(cpu))
    })
}

/// The extension gemm runs (the Linear layers): it detects the CPU itself, ignoring the cap, and
/// has AVX-512 code only when built with the `x86-v4` feature.
pub fn gemm() -> Isa {
    let cpu = detected();
    if cpu == Isa::Avx512 && !cfg!(feature = "x86-v4") { Isa::Avx2 } else { cpu }
}

/// One line for benchmark reports: what the kernels and gemm run, and why if not the CPU's best.
pub fn describe() -> String {
    let (cpu, kernels, gemm) = (detected(), active(), gemm());
    let mut line = format!("kernels {}", kernels.label());
    if kernels < cpu {
        line += &format!(" ({ENV}={}; the CPU has {})", kernels.env_name(), cpu.label());
    }
    line += &format!(", gemm {}", gemm.label());
    if gemm < cpu {
        line += " (built without the x86-v4 feature)";
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_parse_in_pytorchs_spelling_and_order_by_width() {
        for isa in [Isa::Portable, Isa::Avx2, Isa::Avx512] {
            assert_eq!(Isa::parse(isa.env_name()), Ok(isa));
        }
        assert_eq!(Isa::parse(" AVX2 "), Ok(Isa::Avx2));
        let err = Isa::parse("avx").unwrap_err();
        assert!(err.contains("DITS_CPU_CAPABILITY=\"avx\"") && err.contains("avx512, avx2 or default"), "{err}");
        assert!(Isa::Portable < Isa::Avx2 && Isa::Avx2 < Isa::Avx512);
    }

    /// The cap never raises the extension above the CPU's, so every kernel it picks runs.
    #[test]
    fn the_active_extension_is_within_the_cpus() {
        assert!(active() <= detected());
    }

    /// The kernels' code for narrower CPUs, tested on this one: this test binary runs every
    /// kernel test again under each lower cap (on an AVX-512 machine: the AVX2 and the portable
    /// code of the softmax, norms and tiles, which the CPU would otherwise never select).
    #[test]
    fn every_kernel_test_passes_under_each_lower_cap() {
        if requested().ok().flatten().is_some() {
            return; // a capped run: the run that spawned it covers the lower caps
        }
        let exe = std::env::current_exe().expect("the test binary's path");
        for cap in [Isa::Portable, Isa::Avx2].into_iter().filter(|&cap| cap < active()) {
            let out = std::process::Command::new(&exe)
                .args(["kernels::", "--test-threads", "2"])
                .env(ENV, cap.env_name())
                .output()
                .expect("run the test binary");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "kernel tests under {ENV}={}:\n{text}", cap.env_name());
            assert!(text.contains("test result: ok"), "no kernel test ran under the cap:\n{text}");
        }
    }
}
