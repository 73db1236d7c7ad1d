//! Choosing the compute device and the CPU thread count.

use anyhow::bail;
use burn::prelude::*;

/// The devices this build can use, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceKind {
    /// burn's pure-Rust CPU backend (always available).
    Cpu,
    /// NVIDIA GPU through burn's CUDA backend (build with `--features cuda`).
    Cuda,
    /// Vulkan/Metal GPU through wgpu (build with `--features wgpu`).
    Wgpu,
}

pub fn device(kind: DeviceKind) -> anyhow::Result<Device> {
    match kind {
        DeviceKind::Cpu => Ok(Device::flex()),
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => Ok(Device::cuda(0)),
        #[cfg(feature = "wgpu")]
        DeviceKind::Wgpu => Ok(Device::wgpu(Default::default())),
        #[allow(unreachable_patterns)]
        other => bail!(
            "this dits was built without the {other:?} backend: rebuild with --features {}",
            format!("{other:?}").to_lowercase()
        ),
    }
}

/// `n` devices of `kind` for `--dist devices`: GPUs `0..n`, or the CPU `n` times.
pub fn devices(kind: DeviceKind, n: usize) -> anyhow::Result<Vec<Device>> {
    match kind {
        DeviceKind::Cpu => Ok(vec![Device::flex(); n]),
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => Ok((0..n).map(Device::cuda).collect()),
        DeviceKind::Wgpu => bail!("--dist devices supports --device cpu and cuda"),
        #[allow(unreachable_patterns)]
        other => device(other).map(|_| unreachable!("device() fails for a backend this build lacks")),
    }
}

/// Size the global thread pool that the CPU backend's kernels run on: `--threads`, else
/// `RAYON_NUM_THREADS`, else every core. Returns the count in effect.
pub fn init_threads(threads: Option<usize>) -> anyhow::Result<usize> {
    if let Some(0) = threads {
        bail!("--threads must be at least 1");
    }
    let mut builder = rayon::ThreadPoolBuilder::new();
    if let Some(t) = threads {
        builder = builder.num_threads(t);
    }
    // Fails only if the pool was already built (e.g. twice in one test process): keep it.
    let _ = builder.build_global();
    Ok(rayon::current_num_threads())
}
