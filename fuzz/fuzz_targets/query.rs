//! The server's query-string parser on arbitrary bytes (what a client can put after `?`): a
//! request within the limits, or a message short enough to send back.
#![no_main]

use dits::serve::query::{Bounds, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let bounds = Bounds {
        class_names: ["0", "1", "ankle boot", "<b>"].map(String::from).to_vec(),
        guidable: true,
        timesteps: 1000,
        max_images: 64,
        max_steps: 250,
    };
    let text = String::from_utf8_lossy(bytes);
    match parse(Some(&text), &bounds) {
        Ok(r) => assert!(r.class < 4 && (1..=64).contains(&r.n) && (1..=250).contains(&r.chain.steps)),
        Err(message) => assert!(message.len() < 400, "{} bytes", message.len()),
    }
});
