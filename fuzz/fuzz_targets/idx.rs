//! The IDX reader on arbitrary bytes (raw or gzip), for each rank: an error or an array whose
//! size matches its dimensions, never a panic or a huge allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for rank in 1..=3 {
        if let Ok(a) = dits::data::idx::parse_idx(data, rank) {
            assert_eq!(a.dims.len(), rank);
            assert_eq!(a.dims.iter().product::<usize>(), a.data.len());
        }
    }
});
