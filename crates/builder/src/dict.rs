//! The small files inside a chunk dictionary's frames, so that a conversion finds them
//! one by one.
//!
//! A dictionary converted with frames (format version 2 and later) stores its small
//! files inside frames, and its chunk tables name only the frames. A frame is found in
//! the dictionary only if the new image packs exactly the same files into it, so one
//! changed file among a frame's dozens would cost the whole frame again.
//!
//! So the conversion reads the dictionary's chunks of at most a frame's size and keys
//! every place a small file can start in them: each 4 KiB boundary, for each length of
//! one to eight blocks, by the BLAKE3 of those blocks (zero-padded past the chunk's end).
//! A small file of the new image, zero-padded to whole blocks, has such a key; a chunk
//! whose bytes at that boundary are the file's holds it, and the file points there
//! instead of being stored again. Contents, not names, decide: a file the dictionary's
//! tree no longer shows (replaced by an upper layer) is found as well.
//!
//! Every chunk is verified against its digest in the dictionary's chunk table before it
//! is keyed, so a damaged dictionary can cost dedup, never correctness.

use crate::BuildError;
use hoist_format::chunk::ChunkEntry;
use hoist_format::erofs::ondisk::BLOCK_SIZE;
use hoist_format::meta::Meta;
use hoist_oci::{Digest, ImageSource};
use std::collections::HashMap;

/// Compressed bytes between two chunks that are read rather than spent on another
/// request.
const MAX_GAP: u64 = 64 << 10;
/// Most compressed bytes one request reads.
const MAX_READ: u64 = 16 << 20;
/// Zeros to pad a key's last block with.
const ZEROS: [u8; BLOCK_SIZE as usize] = [0; BLOCK_SIZE as usize];

/// Where a small file's bytes are in the dictionary: provisional (0-based) blob, first
/// block, and the end of the chunk they are in (uncompressed offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DictPlace {
    /// The dictionary blob's provisional index.
    pub blob: u16,
    /// The block the bytes start at.
    pub blkaddr: u32,
    /// The end of the chunk holding them: a file must end before it.
    pub chunk_end: u64,
}

/// The keyed places of a dictionary's small files.
#[derive(Debug, Default)]
pub struct DictFiles {
    places: HashMap<[u8; 32], DictPlace>,
}

/// The key of `data` (a small file): the BLAKE3 of its bytes zero-padded to whole blocks.
pub fn key_of(data: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(data);
    let tail = data.len() % BLOCK_SIZE as usize;
    if tail != 0 {
        h.update(&ZEROS[tail..]);
    }
    *h.finalize().as_bytes()
}

impl DictFiles {
    /// Where the dictionary holds `data` (a small file), if anywhere.
    pub fn find(&self, data: &[u8]) -> Option<DictPlace> {
        let p = *self.places.get(&key_of(data))?;
        let end = u64::from(p.blkaddr) * BLOCK_SIZE + data.len() as u64;
        (end <= p.chunk_end).then_some(p)
    }

    /// Places keyed.
    pub fn len(&self) -> usize {
        self.places.len()
    }

    /// Whether nothing was keyed.
    pub fn is_empty(&self) -> bool {
        self.places.is_empty()
    }

    /// Keys every start of a file of up to `limit` bytes in `data`, chunk `e` of blob
    /// `blob`.
    fn add_chunk(&mut self, blob: u16, e: &ChunkEntry, data: &[u8], limit: u64) {
        let block = BLOCK_SIZE as usize;
        let blocks = limit.div_ceil(BLOCK_SIZE) as usize;
        let chunk_end = e.uncompressed_offset + data.len() as u64;
        for start in (0..data.len()).step_by(block) {
            let Ok(blkaddr) = u32::try_from((e.uncompressed_offset + start as u64) / BLOCK_SIZE)
            else {
                return;
            };
            let place = DictPlace {
                blob,
                blkaddr,
                chunk_end,
            };
            let mut h = blake3::Hasher::new();
            for k in 0..blocks {
                let from = start + k * block;
                if from >= data.len() {
                    break;
                }
                let bytes = &data[from..data.len().min(from + block)];
                h.update(bytes);
                // Past the chunk's end, as a file's key is padded.
                h.update(&ZEROS[bytes.len()..]);
                self.places.entry(*h.finalize().as_bytes()).or_insert(place);
                if bytes.len() < block {
                    break;
                }
            }
        }
    }
}

/// Reads the chunks of at most `frame_size` bytes of the dictionary `src` (whose
/// metadata is `meta`; blob k is provisional blob k) and keys the small files of up to
/// `limit` bytes they can hold.
pub fn small_files(
    src: &dyn ImageSource,
    meta: &Meta,
    frame_size: u64,
    limit: u64,
) -> Result<DictFiles, BuildError> {
    let mut out = DictFiles::default();
    for (blob, info) in meta.blobs.iter().enumerate() {
        let Ok(blob) = u16::try_from(blob) else {
            break;
        };
        let digest = Digest::from_sha256(info.digest);
        let entries = &info.chunks.entries;
        // Neighbouring chunks in one request.
        let mut runs: Vec<Vec<usize>> = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            if u64::from(e.uncompressed_size) > frame_size {
                continue;
            }
            let joins = runs.last().is_some_and(|run| {
                let first = &entries[run[0]];
                let last = &entries[*run.last().expect("runs are never empty")];
                let end = last.compressed_offset + u64::from(last.compressed_size);
                e.compressed_offset >= end
                    && e.compressed_offset - end <= MAX_GAP
                    && e.compressed_offset + u64::from(e.compressed_size) - first.compressed_offset
                        <= MAX_READ
            });
            match joins {
                true => runs.last_mut().expect("checked").push(i),
                false => runs.push(vec![i]),
            }
        }
        for run in runs {
            let start = entries[run[0]].compressed_offset;
            let last = &entries[*run.last().expect("runs are never empty")];
            let len = last.compressed_offset + u64::from(last.compressed_size) - start;
            let bytes = src.read_blob_range(&digest, start, len)?;
            for i in run {
                let e = &entries[i];
                let data = e
                    .stored_in(&bytes, start)
                    .and_then(|stored| hoist_codec::decode_verified(e, stored).ok());
                match data {
                    Some(data) => out.add_chunk(blob, e, &data, limit),
                    None => tracing::warn!(
                        "chunk dictionary: blob {digest} chunk {i} is damaged; its files are not deduplicated against"
                    ),
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(offset: u64, len: usize) -> ChunkEntry {
        ChunkEntry {
            uncompressed_offset: offset,
            compressed_offset: 0,
            uncompressed_size: len as u32,
            compressed_size: 0,
            compressor: hoist_format::chunk::Compressor::None,
            digest: [0; 32],
        }
    }

    #[test]
    fn a_file_is_found_at_any_block_of_a_chunk_and_never_past_its_end() {
        let block = BLOCK_SIZE as usize;
        // Three files at block boundaries, the last one ending the chunk.
        let a: Vec<u8> = (0..5000).map(|i| (i % 251) as u8 + 1).collect();
        let b = b"small".to_vec();
        let c: Vec<u8> = (0..100).map(|i| i as u8 + 7).collect();
        let mut chunk = a.clone();
        chunk.resize(2 * block, 0);
        chunk.extend_from_slice(&b);
        chunk.resize(3 * block, 0);
        chunk.extend_from_slice(&c);
        let mut files = DictFiles::default();
        files.add_chunk(2, &entry(40 * BLOCK_SIZE, chunk.len()), &chunk, 32 << 10);
        let at = |blkaddr| {
            Some(DictPlace {
                blob: 2,
                blkaddr,
                chunk_end: 40 * BLOCK_SIZE + chunk.len() as u64,
            })
        };
        assert_eq!(files.find(&a), at(40));
        assert_eq!(files.find(&b), at(42));
        assert_eq!(files.find(&c), at(43));
        // The same bytes plus a trailing zero are the same bytes on disk, but not past
        // the chunk's end.
        assert_eq!(files.find(b"small\0"), at(42));
        let mut longer = c.clone();
        longer.push(0);
        assert_eq!(files.find(&longer), None);
        // Another file, or a piece of one that does not start at a block.
        assert_eq!(files.find(b"other"), None);
        assert_eq!(files.find(&a[1..]), None);
    }
}
