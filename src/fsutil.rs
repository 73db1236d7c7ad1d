//! Writing files so that a crash never leaves a half-written one in place.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use sha2::{Digest, Sha256};

/// Write `bytes` to `path` through a temporary file in the same directory, flushed to disk and
/// then renamed over the target: readers see the old file or the new one, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().context("target path has no file name")?.to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(dir);
        Ok::<(), std::io::Error>(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

/// Make a rename durable (best effort: not every filesystem supports syncing a directory).
/// Appends `value` as one JSON line to `path` (created if absent; opened per line: a few lines
/// a minute).
pub fn append_json_line(path: &Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    let line = serde_json::to_string(value)?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "{line}").with_context(|| format!("writing {}", path.display()))
}

/// The lines of `path` that parse as `T` (other lines, e.g. one cut by a crash or of another
/// kind, are skipped; a missing file has none).
pub fn read_json_lines<T: serde::de::DeserializeOwned>(path: &Path) -> Vec<T> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

pub fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.bin");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}

/// Put the complete directory `new` in the place of the existing directory `dest`, so that at
/// every moment `dest` is either the old complete directory or the new one; `new` then holds the
/// old one, for the caller to remove (a crash leaves it under `new`'s temporary name). On Linux
/// the two are exchanged in one `renameat2(RENAME_EXCHANGE)`; elsewhere the old directory is
/// renamed aside first, leaving a moment without `dest`. Hand-written: std has no exchange, and
/// this one call does not warrant a crate.
pub fn exchange_dirs(new: &Path, dest: &Path) -> std::io::Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
        let (a, b) = (c(new)?, c(dest)?);
        // SAFETY: both paths are valid NUL-terminated strings that outlive the call.
        let rc =
            unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_EXCHANGE) };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        // Filesystems without exchange support fall through to the two renames.
        if err.raw_os_error() != Some(libc::EINVAL) && err.raw_os_error() != Some(libc::ENOSYS) {
            return Err(err);
        }
    }
    // Beside `new`, under a name that extends its temporary one.
    let mut aside = new.as_os_str().to_owned();
    aside.push(".old");
    let aside = std::path::PathBuf::from(aside);
    std::fs::rename(dest, &aside)?;
    std::fs::rename(new, dest)?;
    std::fs::rename(&aside, new)
}

#[cfg(test)]
mod exchange_tests {
    use super::*;

    #[test]
    fn exchanging_directories_swaps_their_contents() {
        let tmp = std::env::temp_dir().join(format!("dits-exchange-{}", std::process::id()));
        let (a, b) = (tmp.join(".new.tmp-1"), tmp.join("dest"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(a.join("f"), b"new").unwrap();
        std::fs::write(b.join("f"), b"old").unwrap();
        exchange_dirs(&a, &b).unwrap();
        assert_eq!(std::fs::read(b.join("f")).unwrap(), b"new");
        assert_eq!(std::fs::read(a.join("f")).unwrap(), b"old");
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
