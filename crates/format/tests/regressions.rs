//! Inputs that once broke a parser, kept so they never do again (found by `cargo fuzz`).

use hoist_format::chunk::ChunkTable;

/// A chunk whose offset plus size wrapped around u64 made the next, lower offset look in
/// order; lookups in the accepted (unsorted) table then failed.
#[test]
fn chunk_table_offset_overflow() {
    let data = include_bytes!("regressions/chunk_table_offset_overflow.bin");
    if let Ok(t) = ChunkTable::parse(data, u64::MAX / 2, u64::MAX / 2) {
        for e in &t.entries {
            assert!(
                t.find(e.uncompressed_offset).is_some(),
                "accepted table is not sorted"
            );
        }
    }
    let mut ends_past_u64 = data[..64].to_vec();
    ends_past_u64[..8].copy_from_slice(&(u64::MAX - 100).to_le_bytes());
    assert!(ChunkTable::parse(&ends_past_u64, u64::MAX, u64::MAX).is_err());
}
