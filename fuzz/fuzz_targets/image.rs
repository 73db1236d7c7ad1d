//! Image decoding (PNG, JPEG, and anything else a file named `.png` may hold) on arbitrary
//! bytes, with and without `--image-size`: an error, or planes whose size matches their shape,
//! one or three channels, sides within the limit: never a panic or an allocation past it.
#![no_main]

use dits::data::decode::{MAX_SIDE, decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&size, bytes)) = data.split_first() else { return };
    for size in [None, Some(u32::from(size % 64) + 1)] {
        if let Ok(p) = decode(bytes, size) {
            assert!(p.channels == 1 || p.channels == 3);
            assert_eq!(p.data.len(), p.channels * p.height * p.width);
            assert!(p.height as u32 <= MAX_SIDE && p.width as u32 <= MAX_SIDE);
            if let Some(s) = size {
                assert_eq!((p.height, p.width), (s as usize, s as usize));
            }
        }
    }
});
