//! Keep freed memory for reuse.
//!
//! A training step allocates and frees the same large activation and gradient buffers every
//! time. glibc's defaults serve blocks above 128 KiB with `mmap` and give freed heap tops
//! back to the kernel, so each step page-faults (and zero-fills) those buffers anew (README,
//! "Speed", has the cost as measured). Raising both thresholds keeps the pages
//! mapped between steps; peak memory does not grow, because the same sizes come back each
//! step. One arena for all threads: the worker threads' own arenas are separate `mmap`ed heaps
//! that glibc unmaps whenever they empty, which happened every step.

/// Call once, before the first large allocation. Does nothing outside glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc caps the mmap threshold at 32 MiB on 64-bit targets (HEAP_MAX_SIZE / 2).
        const MMAP_THRESHOLD: libc::c_int = 32 << 20;
        const TRIM_THRESHOLD: libc::c_int = 1 << 30;
        // SAFETY: mallopt only sets allocator parameters; it is called before any other
        // thread exists.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

/// The process's peak resident memory so far (`VmHWM`), where the kernel reports it (Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn peak_rss_is_reported_on_linux_and_grows_with_touched_memory() {
        if !cfg!(target_os = "linux") {
            return;
        }
        let before = super::peak_rss_bytes().expect("VmHWM on Linux");
        let touched = vec![1u8; 64 << 20];
        let after = super::peak_rss_bytes().unwrap();
        assert!(after >= before && after >= (64 << 20), "{before} -> {after}");
        drop(std::hint::black_box(touched));
    }
}
