//! The CPU's L2 cache per core, which sizes the work the CPU path keeps in cache at once (the
//! inference chunks of `model::net`).
//!
//! Read from Linux's sysfs (`/sys/devices/system/cpu/cpu0/cache/index*/`), where the kernel
//! reports what the CPU's identification says (in a VM, what the hypervisor passes on): no
//! crate reads it portably, and elsewhere callers fall back to a measured default.

use std::path::Path;
use std::sync::OnceLock;

/// Bytes of L2 cache per core, if the operating system says.
pub fn l2_bytes() -> Option<usize> {
    static L2: OnceLock<Option<usize>> = OnceLock::new();
    *L2.get_or_init(|| read_l2(Path::new("/sys/devices/system/cpu/cpu0/cache")))
}

/// The level-2 data or unified cache under a sysfs `cache` directory.
fn read_l2(dir: &Path) -> Option<usize> {
    let read = |index: &Path, file: &str| std::fs::read_to_string(index.join(file)).ok();
    std::fs::read_dir(dir).ok()?.flatten().find_map(|entry| {
        let index = entry.path();
        let level = read(&index, "level")?;
        let kind = read(&index, "type")?;
        (level.trim() == "2" && kind.trim() != "Instruction").then(|| parse_size(&read(&index, "size")?))?
    })
}

/// sysfs's size notation: `1024K`, `2M`, or plain bytes.
fn parse_size(text: &str) -> Option<usize> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, ""),
    };
    let scale = match unit {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => return None,
    };
    digits.parse::<usize>().ok()?.checked_mul(scale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reads_the_level_2_cache_of_a_sysfs_tree() {
        let dir = std::env::temp_dir().join(format!("dits-cache-{}", std::process::id()));
        for (index, level, kind, size) in
            [("index0", "1", "Data", "32K"), ("index1", "2", "Instruction", "64K"), ("index2", "2", "Unified", "1024K")]
        {
            let d = dir.join(index);
            std::fs::create_dir_all(&d).unwrap();
            for (file, text) in [("level", level), ("type", kind), ("size", size)] {
                std::fs::write(d.join(file), format!("{text}\n")).unwrap();
            }
        }
        assert_eq!(read_l2(&dir), Some(1 << 20));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(read_l2(&dir), None, "no sysfs tree");
    }

    proptest! {
        #[test]
        fn sizes_parse_in_every_unit(n in 0usize..1 << 20, unit in 0usize..4) {
            let (suffix, scale) = [("", 1), ("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)][unit];
            prop_assert_eq!(parse_size(&format!("{n}{suffix}\n")), Some(n * scale));
        }

        #[test]
        fn other_text_is_no_size(text in "\\PC*") {
            if let Some(bytes) = parse_size(&text) {
                // Only digits with an optional K, M or G parse.
                let t = text.trim();
                prop_assert!(t.trim_end_matches(['K', 'M', 'G']).chars().all(|c| c.is_ascii_digit()));
                prop_assert!(bytes > 0 || t.starts_with('0'));
            }
        }
    }
}
