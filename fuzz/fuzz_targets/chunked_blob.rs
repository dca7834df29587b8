//! Arbitrary bytes as a metadata layer (format version 3: a chunked blob, or plain
//! metadata): decoding checks the trailer and the table, decodes and verifies every
//! chunk within a size limit, and returns errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(meta) = hoist_codec::metadata_of(data.to_vec(), 1 << 24) {
        let _ = hoist_format::meta::parse(&meta);
    }
});
