use super::*;
use hoist_format::tree::{Metadata, Node, NodeKind, Tree};
use std::sync::{Arc, Mutex};

/// A blob kept in memory, shared with the test.
struct MemBlob(Arc<Mutex<Vec<u8>>>);

impl Write for MemBlob {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl BlobWriter for MemBlob {
    fn commit(self: Box<Self>) -> Result<(Digest, u64), hoist_oci::OciError> {
        let len = self.0.lock().unwrap().len() as u64;
        Ok((Digest::from_sha256([7; 32]), len))
    }
}

const FRAME: u64 = 64 << 10;

fn chunker() -> Chunker {
    Chunker::new(Compressor::Zstd, 2, FRAME)
}

fn start(c: &mut Chunker, blob: u16) -> Arc<Mutex<Vec<u8>>> {
    let bytes = Arc::new(Mutex::new(Vec::new()));
    c.start_blob(blob, Box::new(MemBlob(bytes.clone())));
    bytes
}

/// A small file's distinct content.
fn file(n: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| n.wrapping_add((i % 251) as u8) | 1)
        .collect()
}

/// The `len` bytes at `c` in a finished blob, decoded and verified.
fn read(blob: &FinishedBlob, bytes: &[u8], c: ChunkRef, len: usize) -> Vec<u8> {
    let ChunkRef::Mapped { blkaddr, .. } = c else {
        panic!("a hole: {c:?}")
    };
    let offset = u64::from(blkaddr) * BLOCK_SIZE;
    let e = blob
        .info
        .chunks
        .entries
        .iter()
        .find(|e| {
            e.uncompressed_offset <= offset
                && offset < e.uncompressed_offset + u64::from(e.uncompressed_size)
        })
        .expect("a chunk holds the reference");
    let start = e.compressed_offset as usize;
    let stored = &bytes[start..start + e.compressed_size as usize];
    let data = hoist_codec::decode_verified(e, stored).unwrap();
    let skip = (offset - e.uncompressed_offset) as usize;
    data[skip..skip + len].to_vec()
}

#[test]
fn small_files_share_frames_at_block_boundaries_and_read_back() {
    let mut c = chunker();
    assert_eq!(c.small_file_limit(), FRAME / 8);
    let bytes = start(&mut c, 0);
    // 20 files of 5000 bytes take 2 blocks each: 8 fit a 64 KiB frame.
    let files: Vec<Vec<u8>> = (0..20).map(|n| file(n, 5000)).collect();
    let refs: Vec<ChunkRef> = files
        .iter()
        .map(|f| c.put_small(f.clone()).unwrap())
        .collect();
    let blob = c.finish_blob().unwrap().unwrap();
    assert_eq!(
        blob.info.chunks.entries.len(),
        3,
        "3 frames: 8 + 8 + 4 files"
    );
    let blk = |r: &ChunkRef| match r {
        ChunkRef::Mapped { device: 1, blkaddr } => *blkaddr,
        other => panic!("{other:?}"),
    };
    let addrs: Vec<u32> = refs.iter().map(blk).collect();
    assert_eq!(
        addrs[..3],
        [0, 2, 4],
        "each file at the next block boundary"
    );
    assert_eq!(addrs[8], 16, "the second frame starts after the first");
    let bytes = bytes.lock().unwrap();
    for (f, r) in files.iter().zip(&refs) {
        assert_eq!(&read(&blob, &bytes, *r, f.len()), f);
    }
    let stats = c.take_stats();
    assert_eq!((stats.small_files, stats.frames), (20, 3));
    assert_eq!(stats.stored_bytes, 20 * 5000);
}

#[test]
fn a_small_file_met_again_is_not_stored_again() {
    let mut c = chunker();
    start(&mut c, 0);
    let a = c.put_small(file(1, 100)).unwrap();
    let same_frame = c.put_small(file(1, 100)).unwrap();
    assert_eq!(a, same_frame, "a duplicate in the open frame");
    c.put_small(file(2, 100)).unwrap();
    // A large chunk closes the frame; then the file is found in the dedup map.
    c.put(file(3, 200_000)).unwrap();
    let later = c.put_small(file(1, 100)).unwrap();
    assert_eq!(a, later, "a duplicate of a sealed frame's file");
    // A lower layer's small files are known by their frames, not one by one (a
    // conversion restored from the cache above that layer knows no more).
    c.finish_blob().unwrap().unwrap();
    start(&mut c, 1);
    let next_layer = c.put_small(file(1, 100)).unwrap();
    assert!(matches!(next_layer, ChunkRef::Mapped { device: 2, .. }));
    assert_eq!(c.take_stats().dedup_chunks, 2);
    assert_eq!(
        c.finish_blob().unwrap().unwrap().info.chunks.entries.len(),
        1
    );
}

#[test]
fn a_large_chunk_closes_the_frame_before_it_so_offsets_increase() {
    let mut c = chunker();
    let bytes = start(&mut c, 0);
    let small = c.put_small(file(1, 3000)).unwrap();
    let large = c.put(file(2, 100_000)).unwrap();
    let small2 = c.put_small(file(3, 3000)).unwrap();
    let blob = c.finish_blob().unwrap().unwrap();
    let offsets: Vec<u64> = blob
        .info
        .chunks
        .entries
        .iter()
        .map(|e| e.uncompressed_offset)
        .collect();
    assert_eq!(offsets, [0, 4096, 4096 + 102_400]);
    let bytes = bytes.lock().unwrap();
    assert_eq!(read(&blob, &bytes, small, 3000), file(1, 3000));
    assert_eq!(read(&blob, &bytes, large, 100_000), file(2, 100_000));
    assert_eq!(read(&blob, &bytes, small2, 3000), file(3, 3000));
}

/// A tree of one file node per small file, stored through `c`.
fn tree_of(files: &[Vec<u8>], c: &mut Chunker) -> Tree {
    let mut tree = Tree::new(Metadata::default());
    for f in files {
        let chunks = vec![c.put_small(f.clone()).unwrap()];
        let size = f.len() as u64;
        tree.add(Node {
            meta: Metadata::default(),
            kind: NodeKind::File { size, chunks },
        });
    }
    tree
}

/// The chunk reference of each file node of a [`tree_of`].
fn refs_of(tree: &Tree) -> Vec<ChunkRef> {
    tree.nodes[1..]
        .iter()
        .map(|n| match &n.kind {
            NodeKind::File { chunks, .. } => chunks[0],
            other => panic!("{other:?}"),
        })
        .collect()
}

#[test]
fn a_frame_stored_before_is_reused_and_its_files_remapped() {
    let mut c = chunker();
    let files: Vec<Vec<u8>> = (0..3).map(|n| file(n, 3000)).collect();
    start(&mut c, 0);
    let first: Vec<ChunkRef> = files
        .iter()
        .map(|f| c.put_small(f.clone()).unwrap())
        .collect();
    c.finish_blob().unwrap().unwrap();
    assert!(c.take_remaps().is_empty());

    // The next layer holds the same three files: their frame is found stored.
    start(&mut c, 1);
    let mut tree = tree_of(&files, &mut c);
    assert!(c.finish_blob().unwrap().is_none(), "nothing new to store");
    let remaps = c.take_remaps();
    assert_eq!(remaps.len(), 1);
    apply_remaps(&mut tree, &remaps);
    assert_eq!(refs_of(&tree), first, "pointed at the lower layer's frame");

    // The same through a dictionary, checked to the end: the files are pointed at
    // the dictionary's copy.
    let mut d = chunker();
    start(&mut d, 0);
    let dict_refs: Vec<ChunkRef> = files
        .iter()
        .map(|f| d.put_small(f.clone()).unwrap())
        .collect();
    let dict_blob = d.finish_blob().unwrap().unwrap();
    let mut c = chunker();
    c.add_dict_blob(&dict_blob.info).unwrap();
    start(&mut c, 1);
    let mut tree = tree_of(&files, &mut c);
    assert!(refs_of(&tree)
        .iter()
        .all(|r| matches!(r, ChunkRef::Mapped { device: 2, .. })));
    assert!(c.finish_blob().unwrap().is_none(), "nothing new to store");
    let remaps = c.take_remaps();
    assert_eq!(remaps.len(), 1);
    apply_remaps(&mut tree, &remaps);
    assert_eq!(refs_of(&tree), dict_refs, "device 1 is the dictionary blob");
    let stats = c.take_stats();
    assert_eq!((stats.dedup_frames, stats.stored_bytes), (1, 0));
    assert_eq!(stats.dict_bytes, 3 * 3000);
}

#[test]
fn frames_line_up_again_after_a_file_added_in_front() {
    let files: Vec<Vec<u8>> = (0..200u32)
        .map(|n| format!("file {n}: {}", "x".repeat(n as usize % 50)).into_bytes())
        .collect();
    let mut c = chunker();
    start(&mut c, 0);
    for f in &files {
        c.put_small(f.clone()).unwrap();
    }
    c.finish_blob().unwrap().unwrap();
    let first = c.take_stats();
    // The same files after a new one: the frames before the first content-defined
    // boundary differ, those after it are found stored.
    start(&mut c, 1);
    c.put_small(b"a new file".to_vec()).unwrap();
    for f in &files {
        c.put_small(f.clone()).unwrap();
    }
    c.finish_blob().unwrap().unwrap();
    let second = c.take_stats();
    assert!(second.dedup_frames > 0, "{second:?}");
    assert!(
        second.frames * 2 < first.frames,
        "{} of {} frames stored again",
        second.frames,
        first.frames
    );
}

/// Stores `files` in a new blob `blob` of `c` (a chunk of its own each if larger
/// than a frame's small files, else in a frame), one tree node each; returns the
/// blob and its bytes.
fn store_files(
    c: &mut Chunker,
    blob: u16,
    files: &[Vec<u8>],
    tree: &mut Tree,
) -> (Option<FinishedBlob>, Vec<u8>) {
    let bytes = start(c, blob);
    for f in files {
        let chunks = match f.len() as u64 > c.small_file_limit() {
            true => vec![c.put(f.clone()).unwrap()],
            false => vec![c.put_small(f.clone()).unwrap()],
        };
        tree.add(Node {
            meta: Metadata::default(),
            kind: NodeKind::File {
                size: f.len() as u64,
                chunks,
            },
        });
    }
    let blob = c.finish_blob().unwrap();
    apply_remaps(tree, &c.take_remaps());
    let bytes = bytes.lock().unwrap().clone();
    (blob, bytes)
}

#[test]
fn a_blob_laid_out_in_a_traces_order_reads_back_through_the_remapped_tree() {
    // Two frames of small files and three large files, in this layer order.
    let small: Vec<Vec<u8>> = (0..10).map(|n| file(n, 3000)).collect();
    let large: Vec<Vec<u8>> = (0..3).map(|n| file(100 + n, 100_000)).collect();
    let files: Vec<Vec<u8>> = [&small[..5], &large[..2], &small[5..], &large[2..]].concat();
    let (plain, plain_bytes) = store_files(
        &mut chunker(),
        0,
        &files,
        &mut Tree::new(Metadata::default()),
    );
    let plain = plain.unwrap();
    let plain_info = plain.info.clone();
    let plain: Vec<[u8; 32]> = plain.info.chunks.entries.iter().map(|e| e.digest).collect();
    assert_eq!(plain.len(), 5, "frame, large, large, frame, large");

    // A trace read the third large file, the second frame, the first large file,
    // and a chunk of another image.
    let trace = [plain[4], plain[3], plain[1], [9; 32]];
    let mut c = chunker();
    c.lay_out_first(trace, std::env::temp_dir());
    let mut tree = Tree::new(Metadata::default());
    let (blob, bytes) = store_files(&mut c, 0, &files, &mut tree);
    let blob = blob.unwrap();
    let digests: Vec<[u8; 32]> = blob.info.chunks.entries.iter().map(|e| e.digest).collect();
    assert_eq!(digests, [plain[4], plain[3], plain[1], plain[0], plain[2]]);
    assert_eq!(c.take_laid_out(), 3);
    // Its table is valid: in the order of its bytes, in both address spaces.
    let table = ChunkTable::parse(
        &blob.info.chunks.to_bytes(),
        blob.info.data_size,
        blob.info.uncompressed_size,
    )
    .unwrap();
    assert_eq!(table, blob.info.chunks);
    assert_eq!(blob.info.chunks.entries[0].compressed_offset, 0);
    // The blob it would have been in layer order is known, digest and all.
    let (unordered, digest) = blob.unordered.clone().unwrap();
    assert_eq!(unordered.chunks, plain_info.chunks);
    assert_eq!(digest, Digest::of(&plain_bytes));
    assert_eq!(unordered.compressed_size, plain_bytes.len() as u64);
    // Every file reads back through its (remapped) reference.
    for (f, r) in files.iter().zip(refs_of(&tree)) {
        assert_eq!(&read(&blob, &bytes, r, f.len()), f);
    }

    // The next layer's copies of a moved large file and of a moved frame (its
    // files, which form the same frame again) are found where they went.
    let mut next = Tree::new(Metadata::default());
    let again = [&large[..1], &small[5..]].concat();
    let (stored, _) = store_files(&mut c, 1, &again, &mut next);
    assert!(stored.is_none(), "nothing new to store");
    for (f, r) in again.iter().zip(refs_of(&next)) {
        assert!(matches!(r, ChunkRef::Mapped { device: 1, .. }), "{r:?}");
        assert_eq!(&read(&blob, &bytes, r, f.len()), f);
    }
    let stats = c.take_stats();
    assert_eq!((stats.dedup_chunks, stats.dedup_frames), (1, 1));
}

#[test]
fn without_frames_small_files_are_chunks_of_their_own() {
    let mut c = Chunker::new(Compressor::Zstd, 1, 0);
    assert_eq!(c.small_file_limit(), 0);
    start(&mut c, 0);
    c.put(file(1, 100)).unwrap();
    c.put(file(2, 100)).unwrap();
    let blob = c.finish_blob().unwrap().unwrap();
    assert_eq!(blob.info.chunks.entries.len(), 2);
}
