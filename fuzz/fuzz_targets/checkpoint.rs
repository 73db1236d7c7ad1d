//! The checkpoint loader on arbitrary files. The input is split into state.json, the model,
//! the moving average and the optimizer state (little-endian u16 lengths first); each file's
//! checksum in state.json is then set to match, so the fuzzer reaches the safetensors and
//! optimizer parsers behind the checksums instead of stopping at them.
#![no_main]

use std::path::Path;

use burn::prelude::Device;
use libfuzzer_sys::fuzz_target;

fn split(data: &[u8]) -> Option<[Vec<u8>; 4]> {
    let mut parts = Vec::new();
    let mut rest = data;
    for _ in 0..3 {
        let (len, tail) = rest.split_first_chunk::<2>()?;
        let len = u16::from_le_bytes(*len) as usize;
        if tail.len() < len {
            return None;
        }
        parts.push(tail[..len].to_vec());
        rest = &tail[len..];
    }
    parts.push(rest.to_vec());
    parts.try_into().ok()
}

fuzz_target!(|data: &[u8]| {
    let Some([state, model, ema, optimizer]) = split(data) else { return };
    let dir = Path::new("fuzz");
    // With matching checksums, if state.json parses at all.
    let fixed = dits::train::checkpoint::parse_state(&state, &dir.join("state.json")).ok().map(|mut s| {
        for (file, bytes) in [("model.safetensors", &model), ("ema.safetensors", &ema), ("optimizer.safetensors", &optimizer)] {
            s.sha256.insert(file.to_string(), dits::fsutil::sha256_hex(bytes));
        }
        serde_json::to_vec(&s).expect("a state serialises")
    });
    for state in [Some(state), fixed].into_iter().flatten() {
        if let Ok(ckpt) = dits::train::checkpoint::from_bytes(dir, &state, model.clone(), ema.clone(), &optimizer) {
            let _ = dits::train::Trainer::from_checkpoint(ckpt, dir, &Device::flex());
        }
    }
});
