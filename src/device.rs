//! Choosing the compute device and the CPU thread count.

use anyhow::{bail, ensure};
use burn::prelude::*;

/// The devices this build can use, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceKind {
    /// A GPU backend compiled into this build whose hardware device answers, else the CPU.
    Auto,
    /// burn's pure-Rust CPU backend (always available).
    Cpu,
    /// NVIDIA GPU through burn's CUDA backend (build with `--features cuda`).
    Cuda,
    /// Vulkan/Metal GPU through wgpu (build with `--features wgpu`).
    Wgpu,
}

impl DeviceKind {
    fn name(self) -> &'static str {
        match self {
            DeviceKind::Auto => "auto",
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
            DeviceKind::Wgpu => "wgpu",
        }
    }

    /// The GPU backends compiled into this build, in the order `auto` tries them.
    fn compiled_gpus() -> Vec<DeviceKind> {
        let mut gpus = Vec::new();
        if cfg!(feature = "cuda") {
            gpus.push(DeviceKind::Cuda);
        }
        if cfg!(feature = "wgpu") {
            gpus.push(DeviceKind::Wgpu);
        }
        gpus
    }
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Device `index` of a GPU backend compiled into this build (wgpu: its default adapter).
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
fn gpu(kind: DeviceKind, index: usize) -> Device {
    match kind {
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => Device::cuda(index),
        #[cfg(feature = "wgpu")]
        DeviceKind::Wgpu => Device::wgpu(Default::default()),
        _ => unreachable!("{kind} is not a GPU backend of this build"),
    }
}

/// The hardware devices of a GPU backend that `auto` may choose: for wgpu its discrete,
/// integrated and virtual GPUs, not a software rasterizer (Mesa's lavapipe, which runs on the
/// CPU, slower than the CPU backend; `--device wgpu` still takes it).
fn hardware(kind: DeviceKind) -> Vec<Device> {
    match kind {
        #[cfg(feature = "wgpu")]
        DeviceKind::Wgpu => {
            use burn::tensor::DeviceKind as Adapter;
            [Adapter::DiscreteGpu(0), Adapter::IntegratedGpu(0), Adapter::VirtualGpu(0)].map(Device::wgpu).to_vec()
        }
        other => vec![gpu(other, 0)],
    }
}

/// Whether `device` runs a small computation. burn's GPU backends panic when no adapter or driver
/// is found (wgpu without a Vulkan/Metal device, CUDA without its libraries), so the probe runs
/// under `catch_unwind` with the panic message silenced: absence is answered by the caller.
fn answers(device: &Device) -> bool {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let ok = std::panic::catch_unwind(|| {
        let t = Tensor::<1>::from_data(TensorData::new(vec![1f32, 2.0], [2]), device);
        t.sum().into_data().try_to_vec::<f32>().is_ok_and(|v| v == [3.0])
    })
    .unwrap_or(false);
    std::panic::set_hook(hook);
    ok
}

/// `kind` made concrete: `auto` becomes the first compiled-in GPU backend whose device answers,
/// else the CPU; a requested GPU must be compiled in and answer. Says which device runs.
pub fn resolve(kind: DeviceKind) -> anyhow::Result<DeviceKind> {
    let gpus = DeviceKind::compiled_gpus();
    let resolved = match kind {
        DeviceKind::Cpu => DeviceKind::Cpu,
        DeviceKind::Auto => {
            let found = gpus.iter().copied().find(|&g| hardware(g).iter().any(answers));
            let chosen = found.unwrap_or(DeviceKind::Cpu);
            let why = match (found, gpus.is_empty()) {
                (Some(_), _) => String::new(),
                (None, true) => " (no GPU backend in this build)".into(),
                (None, false) => {
                    format!(" (no {} device answered)", gpus.iter().map(|g| g.name()).collect::<Vec<_>>().join(" or "))
                }
            };
            tracing::info!("device: {chosen}, chosen by --device auto{why}");
            return Ok(chosen);
        }
        gpu_kind if !gpus.contains(&gpu_kind) => bail!(
            "this dits was built without the {gpu_kind} backend: rebuild with --features {gpu_kind} \
             (available here: {})",
            available(&gpus)
        ),
        gpu_kind => {
            ensure!(
                answers(&gpu(gpu_kind, 0)),
                "--device {gpu_kind}: no {gpu_kind} device answered (no adapter or driver found; available here: {})",
                available(&gpus.iter().copied().filter(|&g| g != gpu_kind && answers(&gpu(g, 0))).collect::<Vec<_>>())
            );
            gpu_kind
        }
    };
    Ok(resolved)
}

/// The devices a user may choose, for an error line.
fn available(gpus: &[DeviceKind]) -> String {
    let mut names: Vec<&str> = gpus.iter().map(|g| g.name()).collect();
    names.push("cpu");
    names.join(", ")
}

/// The device `kind` names (after [`resolve`]).
pub fn device(kind: DeviceKind) -> anyhow::Result<Device> {
    Ok(match resolve(kind)? {
        DeviceKind::Cpu => Device::flex(),
        other => gpu(other, 0),
    })
}

/// `n` devices of `kind` for `--dist devices`: CUDA GPUs `0..n`, or the CPU or wgpu's default
/// adapter `n` times (ranks sharing one device, as on a single-GPU machine).
pub fn devices(kind: DeviceKind, n: usize) -> anyhow::Result<Vec<Device>> {
    Ok(match resolve(kind)? {
        DeviceKind::Cpu => vec![Device::flex(); n],
        DeviceKind::Cuda => (0..n).map(|i| gpu(DeviceKind::Cuda, i)).collect(),
        other => vec![gpu(other, 0); n],
    })
}

/// Quiets Vulkan's window-system layer before any thread starts. Mesa loads libwayland even
/// for headless compute, and libwayland prints `error: XDG_RUNTIME_DIR is invalid or not set`
/// when that variable is missing, as on servers and in containers: lines that would break the
/// one-`error:`-line contract. A private empty directory answers it (no display is found there,
/// and none is wanted). Does nothing when the variable is set or no GPU backend is compiled in.
pub fn prepare_environment() {
    #[cfg(all(feature = "wgpu", unix))]
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        if std::env::var_os("XDG_RUNTIME_DIR").is_some() {
            return;
        }
        let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("dits-runtime-{uid}"));
        let private = std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)));
        if private.is_ok() {
            // SAFETY: called first thing in `main`, before any other thread exists.
            unsafe { std::env::set_var("XDG_RUNTIME_DIR", &dir) };
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU always answers; `auto` falls back to it when no GPU backend answers; a GPU
    /// backend this build lacks is an error naming what is available.
    #[test]
    fn auto_falls_back_to_the_cpu_and_absent_devices_are_errors() {
        assert_eq!(resolve(DeviceKind::Cpu).unwrap(), DeviceKind::Cpu);
        assert!(answers(&Device::flex()));
        let auto = resolve(DeviceKind::Auto).unwrap();
        assert!(auto == DeviceKind::Cpu || DeviceKind::compiled_gpus().contains(&auto), "{auto}");
        for gpu in [DeviceKind::Cuda, DeviceKind::Wgpu] {
            if !DeviceKind::compiled_gpus().contains(&gpu) {
                let err = resolve(gpu).unwrap_err().to_string();
                let mut listed: Vec<String> = DeviceKind::compiled_gpus().iter().map(|g| g.to_string()).collect();
                listed.push("cpu".into());
                let available = format!("available here: {})", listed.join(", "));
                assert!(err.contains(&format!("--features {gpu}")) && err.contains(&available), "{err}");
            }
        }
    }
}
