//! Arbitrary bytes as the tail of a data blob (chunk table + trailer), and as a chunk
//! table on its own: parsing must return errors, never panic.
#![no_main]

use hoist_format::chunk::{BlobTrailer, ChunkTable, BLOB_TRAILER_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() >= BLOB_TRAILER_SIZE {
        let (table, trailer) = data.split_at(data.len() - BLOB_TRAILER_SIZE);
        if let Ok(t) = BlobTrailer::parse(trailer, data.len() as u64 + 1000) {
            let _ = ChunkTable::parse(table, t.table_offset, t.uncompressed_size);
        }
    }
    if let Ok(t) = ChunkTable::parse(data, u64::MAX / 2, u64::MAX / 2) {
        for e in &t.entries {
            assert!(t.find(e.uncompressed_offset).is_some());
        }
    }
});
