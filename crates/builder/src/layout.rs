//! Data blobs laid out in a start-up trace's order.
//!
//! A blob stores its chunks in layer order, so the chunks a workload reads at start-up
//! lie scattered through it: python's start-up reads 56 chunks in 31 runs of three
//! blobs, and its trace was fetched in about 50 ranged reads. Every read has a price
//! apart from its bytes: a round trip, and the registry's own work (docker-registry 2.8
//! spends 3.2-4.0 ms of CPU on any read up to 1 MiB, as `bench/range_reads.py`
//! measures; a registry behind a CDN or object store adds its time to first byte). So a conversion given a trace (`hoist convert --prefetch-trace`) puts
//! the chunks the trace reads first in each blob, in trace order, ahead of the rest in
//! layer order: the trace's fetch becomes a few long reads, one stream per blob
//! (as eStargz puts its prioritized files first in a layer).
//!
//! The chunks move in the blob's uncompressed address space too, so that a blob's
//! chunk table stays in the order of its bytes, as every reader expects (the fetcher
//! joins adjacent chunks into one ranged read; the kernel reads ahead through a blob
//! device in that order). The files that point at a moved chunk are pointed at its new
//! place ([`crate::chunker::Remap`]).
//!
//! The trace stored in the image is pointed at the chunks' new places
//! ([`Trace::retarget`]). Its metadata chunks (which 64 KiB pieces of the metadata a
//! mount read first, for metadata read on demand) name places in the metadata layer it
//! was recorded on. The layout changes values in that layer (block addresses, offsets,
//! blob digests), never where anything is: so when the metadata this conversion would
//! have written in layer order is the one the trace names, its pieces are the same in
//! the new layer, and the trace is pointed at it.

use crate::chunker::Remap;
use crate::BuildError;
use hoist_format::chunk::ChunkEntry;
use hoist_format::erofs::ondisk::BLOCK_SIZE;
use hoist_format::meta::BlobInfo;
use hoist_reader::trace::Trace;
use std::collections::{HashMap, HashSet};

/// The digests of a trace's chunk entries, in its order, each once.
pub(crate) fn trace_digests(trace: &Trace) -> Vec<[u8; 32]> {
    let mut seen = HashSet::new();
    trace
        .chunks
        .iter()
        .filter_map(|c| c.digest_bytes())
        .filter(|d| seen.insert(*d))
        .collect()
}

/// What the conversion cache adds to its key for a layout in the order of `digests`
/// (nothing for none): the cached conversion of a layer is reused only with the same
/// layout.
pub(crate) fn cache_key(digests: &[[u8; 32]]) -> String {
    if digests.is_empty() {
        return String::new();
    }
    let mut h = blake3::Hasher::new();
    for d in digests {
        h.update(d);
    }
    format!(";layout={}", h.finalize().to_hex())
}

/// The remaps that point the files of a tree whose blob `device` (1-based) is `laid`
/// back at the places its chunks have in `unordered`, the same blob in layer order.
pub(crate) fn back_to_layer_order(
    device: u16,
    laid: &BlobInfo,
    unordered: &BlobInfo,
) -> Vec<Remap> {
    let before: HashMap<[u8; 32], u64> = unordered
        .chunks
        .entries
        .iter()
        .map(|e| (e.digest, e.uncompressed_offset))
        .collect();
    laid.chunks
        .entries
        .iter()
        .filter_map(|e| {
            let old = *before.get(&e.digest)?;
            (old != e.uncompressed_offset).then(|| Remap {
                device,
                start: (e.uncompressed_offset / BLOCK_SIZE) as u32,
                blocks: u64::from(e.uncompressed_size).div_ceil(BLOCK_SIZE) as u32,
                to_device: device,
                to_blkaddr: (old / BLOCK_SIZE) as u32,
            })
        })
        .collect()
}

/// A blob's chunks in their new order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    /// The indices of the blob's chunks (in its old table) in their new order.
    pub order: Vec<usize>,
    /// The new table: each chunk at its new uncompressed and compressed offsets.
    pub entries: Vec<ChunkEntry>,
    /// The new end of the uncompressed address space.
    pub uncompressed_size: u64,
    /// Each chunk that moved: its first block before, its blocks, its first block after.
    pub moves: Vec<(u32, u32, u32)>,
}

/// Where the chunks of a blob go when those that `rank` ranks (a start-up trace's
/// order) come first, by rank, and the others keep their order after them; `None`
/// when that changes nothing. `entries` is the blob's table, in the order of its
/// bytes.
pub(crate) fn plan(
    entries: &[ChunkEntry],
    rank: &HashMap<[u8; 32], u64>,
) -> Result<Option<Plan>, BuildError> {
    let mut first: Vec<(u64, usize)> = entries
        .iter()
        .enumerate()
        .filter_map(|(i, e)| rank.get(&e.digest).map(|&r| (r, i)))
        .collect();
    first.sort_unstable();
    let order: Vec<usize> = first
        .iter()
        .map(|&(_, i)| i)
        .chain(
            entries
                .iter()
                .enumerate()
                .filter(|(_, e)| !rank.contains_key(&e.digest))
                .map(|(i, _)| i),
        )
        .collect();
    if order.iter().enumerate().all(|(k, &i)| k == i) {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(entries.len());
    let mut moves = Vec::new();
    let (mut uoffset, mut coffset) = (0u64, 0u64);
    for &i in &order {
        let e = &entries[i];
        let blocks = u64::from(e.uncompressed_size).div_ceil(BLOCK_SIZE);
        let block = |offset: u64| {
            u32::try_from(offset / BLOCK_SIZE)
                .map_err(|_| BuildError::Invalid("a layer over 16 TiB".into()))
        };
        if e.uncompressed_offset != uoffset {
            let blocks = u32::try_from(blocks)
                .map_err(|_| BuildError::Invalid("a chunk over 16 TiB".into()))?;
            moves.push((block(e.uncompressed_offset)?, blocks, block(uoffset)?));
        }
        out.push(ChunkEntry {
            uncompressed_offset: uoffset,
            compressed_offset: coffset,
            ..*e
        });
        uoffset += blocks * BLOCK_SIZE;
        coffset += u64::from(e.compressed_size);
    }
    Ok(Some(Plan {
        order,
        entries: out,
        uncompressed_size: uoffset,
        moves,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hoist_format::chunk::Compressor;

    /// A table of chunks of `sizes` bytes (uncompressed; half that compressed), each
    /// at the next block boundary, digests 1, 2, 3...
    fn table(sizes: &[u32]) -> Vec<ChunkEntry> {
        let (mut u, mut c) = (0, 0);
        sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                let e = ChunkEntry {
                    uncompressed_offset: u,
                    compressed_offset: c,
                    uncompressed_size: size,
                    compressed_size: size / 2,
                    compressor: Compressor::Zstd,
                    digest: [i as u8 + 1; 32],
                };
                u += u64::from(size).next_multiple_of(BLOCK_SIZE);
                c += u64::from(size / 2);
                e
            })
            .collect()
    }

    fn ranks(digests: &[u8]) -> HashMap<[u8; 32], u64> {
        digests
            .iter()
            .enumerate()
            .map(|(r, &d)| ([d; 32], r as u64))
            .collect()
    }

    #[test]
    fn the_ranked_chunks_come_first_in_rank_order_and_the_rest_keep_theirs() {
        let entries = table(&[8192, 4096, 100, 12288, 5000]);
        // The trace reads chunk 4 (digest 4), then 2, then one of another blob (9).
        let p = plan(&entries, &ranks(&[4, 2, 9])).unwrap().unwrap();
        assert_eq!(p.order, [3, 1, 0, 2, 4]);
        let offsets: Vec<(u64, u64)> = p
            .entries
            .iter()
            .map(|e| (e.uncompressed_offset, e.compressed_offset))
            .collect();
        assert_eq!(
            offsets,
            [
                (0, 0),
                (12288, 6144),
                (16384, 8192),
                (24576, 12288),
                (28672, 12338)
            ]
        );
        let digests: Vec<u8> = p.entries.iter().map(|e| e.digest[0]).collect();
        assert_eq!(digests, [4, 2, 1, 3, 5]);
        assert_eq!(p.uncompressed_size, 28672 + 8192);
        // (old block, blocks, new block) of each chunk that moved; chunk 4 stays.
        assert_eq!(p.moves, [(4, 3, 0), (2, 1, 3), (0, 2, 4), (3, 1, 6)]);
        // The new table is a valid one: in the order of its bytes, none overlapping.
        let t = hoist_format::chunk::ChunkTable { entries: p.entries };
        let end = t
            .entries
            .last()
            .map(|e| e.compressed_offset + u64::from(e.compressed_size));
        let parsed = hoist_format::chunk::ChunkTable::parse(
            &t.to_bytes(),
            end.unwrap(),
            p.uncompressed_size,
        );
        assert_eq!(parsed.unwrap(), t);
    }

    #[test]
    fn a_blob_whose_trace_chunks_lead_already_or_that_has_none_is_left_alone() {
        let entries = table(&[4096, 4096, 4096]);
        assert_eq!(plan(&entries, &ranks(&[])).unwrap(), None);
        assert_eq!(plan(&entries, &ranks(&[7, 8])).unwrap(), None);
        assert_eq!(plan(&entries, &ranks(&[1, 2])).unwrap(), None);
        assert!(plan(&entries, &ranks(&[2, 1])).unwrap().is_some());
    }

    #[test]
    fn gaps_in_the_address_space_close_up() {
        // A frame found stored elsewhere leaves a gap where it was placed: chunk 2
        // starts 3 blocks after chunk 1 ends.
        let mut entries = table(&[4096, 4096]);
        entries[1].uncompressed_offset += 3 * BLOCK_SIZE;
        let p = plan(&entries, &ranks(&[2])).unwrap().unwrap();
        assert_eq!(p.moves, [(4, 1, 0), (0, 1, 1)]);
        assert_eq!(p.uncompressed_size, 2 * BLOCK_SIZE);
    }
}
