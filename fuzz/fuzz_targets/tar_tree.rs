//! Arbitrary bytes as a tar layer: applying it to a tree and writing that tree as EROFS
//! must return errors, never panic.
#![no_main]

use hoist_builder::apply::Applier;
use hoist_builder::{BuildError, ChunkSink};
use hoist_format::erofs::{self, Device};
use hoist_format::tree::{ChunkRef, Metadata, Tree};
use libfuzzer_sys::fuzz_target;

struct Counter(u32);

impl ChunkSink for Counter {
    fn put(&mut self, data: Vec<u8>) -> Result<ChunkRef, BuildError> {
        if data.iter().all(|&b| b == 0) {
            return Ok(ChunkRef::Hole);
        }
        self.0 += 1;
        Ok(ChunkRef::Mapped { device: 1, blkaddr: self.0 })
    }
}

fuzz_target!(|data: &[u8]| {
    let mut tree = Tree::new(Metadata { mode: 0o755, ..Default::default() });
    let mut sink = Counter(0);
    // Two layers from the same bytes exercise whiteouts over existing entries.
    for _ in 0..2 {
        if Applier::new(&mut tree, 4096).apply(data, "fuzz", &mut sink).is_err() {
            return;
        }
    }
    let devices = [Device { tag: [b'0'; 64], blocks: u32::MAX }];
    if let Ok(image) = erofs::write_image(&tree, &devices, &erofs::WriteOptions { chunk_bits: 12 }) {
        let img = erofs::Image::open(image).expect("hoist reads what it writes");
        img.walk(|_, _| Ok(())).expect("hoist walks what it writes");
    }
});
