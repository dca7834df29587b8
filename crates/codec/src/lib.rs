//! Chunk codecs: compression, decompression and digests of hoist chunks.
//!
//! Every chunk is compressed on its own (one zstd frame, or one raw LZ4 block), so it can
//! be fetched with a single ranged read and decoded without its neighbours. A chunk that
//! does not shrink is stored as is ([`Compressor::None`]); decoding never allocates more
//! than the size the chunk table promises, and every decoded chunk is checked against its
//! BLAKE3 digest before anyone sees it.

use hoist_format::chunk::{
    parse_blob_tail, BlobTrailer, ChunkEntry, ChunkTable, Compressor, BLOB_TRAILER_SIZE,
    CHUNK_ENTRY_SIZE,
};
use hoist_format::erofs::ondisk::BLOCK_SIZE;

/// Errors decoding a chunk.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The compressed bytes do not decode to the promised size.
    #[error("{compressor} chunk does not decompress to {expected} bytes: {detail}")]
    Decode {
        /// Codec in use.
        compressor: &'static str,
        /// Size the chunk table promised.
        expected: u32,
        /// What the decoder said.
        detail: String,
    },
    /// Decoded bytes do not match their digest.
    #[error("digest mismatch: expected {expected}, got {actual}")]
    Digest {
        /// Digest in the chunk table (hex).
        expected: String,
        /// Digest of the decoded bytes (hex).
        actual: String,
    },
    /// The compressor failed (never expected for in-memory buffers).
    #[error("{0} compression failed: {1}")]
    Encode(&'static str, String),
    /// A whole blob's framing (trailer, chunk table) is corrupt.
    #[error(transparent)]
    Format(#[from] hoist_format::FormatError),
    /// A chunk of a whole blob fails to decode or verify.
    #[error("chunk {index}: {source}")]
    Chunk {
        /// Index of the chunk in the blob's table.
        index: usize,
        /// What is wrong.
        #[source]
        source: Box<CodecError>,
    },
}

/// BLAKE3-256 digest of a chunk's uncompressed bytes.
pub fn digest(data: &[u8]) -> [u8; 32] {
    *blake3::hash(data).as_bytes()
}

/// A reusable chunk compressor (keeps its zstd context between chunks).
pub struct Encoder {
    compressor: Compressor,
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

/// zstd level used for chunks: fast enough to keep up with gzip decoding on one core.
pub const ZSTD_LEVEL: i32 = 3;

impl Encoder {
    /// An encoder for `compressor`.
    pub fn new(compressor: Compressor) -> Result<Self, CodecError> {
        let zstd = match compressor {
            Compressor::Zstd => Some(
                zstd::bulk::Compressor::new(ZSTD_LEVEL)
                    .map_err(|e| CodecError::Encode("zstd", e.to_string()))?,
            ),
            _ => None,
        };
        Ok(Encoder { compressor, zstd })
    }

    /// Compresses `data`; returns the codec actually used (`None` when compression did
    /// not shrink the chunk) and the bytes to store.
    pub fn encode(&mut self, data: &[u8]) -> Result<(Compressor, Vec<u8>), CodecError> {
        let packed = match (self.compressor, self.zstd.as_mut()) {
            (Compressor::Zstd, Some(z)) => z
                .compress(data)
                .map_err(|e| CodecError::Encode("zstd", e.to_string()))?,
            (Compressor::Lz4, _) => lz4_flex::block::compress(data),
            _ => return Ok((Compressor::None, data.to_vec())),
        };
        if packed.len() >= data.len() {
            Ok((Compressor::None, data.to_vec()))
        } else {
            Ok((self.compressor, packed))
        }
    }
}

/// Decodes the stored bytes of `entry` and verifies them against its digest.
pub fn decode_verified(entry: &ChunkEntry, stored: &[u8]) -> Result<Vec<u8>, CodecError> {
    let data = decode(entry.compressor, stored, entry.uncompressed_size)?;
    let actual = digest(&data);
    if actual != entry.digest {
        return Err(CodecError::Digest {
            expected: hex(&entry.digest),
            actual: hex(&actual),
        });
    }
    Ok(data)
}

/// Decodes stored bytes to exactly `size` bytes, never allocating more than that.
pub fn decode(compressor: Compressor, stored: &[u8], size: u32) -> Result<Vec<u8>, CodecError> {
    let bad = |detail: String| CodecError::Decode {
        compressor: compressor.name(),
        expected: size,
        detail,
    };
    let out = match compressor {
        Compressor::None => stored.to_vec(),
        Compressor::Zstd => {
            zstd::bulk::decompress(stored, size as usize).map_err(|e| bad(e.to_string()))?
        }
        Compressor::Lz4 => {
            let mut out = vec![0u8; size as usize];
            let n = lz4_flex::block::decompress_into(stored, &mut out)
                .map_err(|e| bad(e.to_string()))?;
            out.truncate(n);
            out
        }
    };
    if out.len() != size as usize {
        return Err(bad(format!("got {} bytes", out.len())));
    }
    Ok(out)
}

/// Encodes `data` as a hoist blob (the data blob framing: compressed chunks of
/// `chunk_size` bytes, a power of two from 4 KiB, then their table and a trailer), so
/// that any range of it can be fetched and verified on its own. hoist stores its
/// metadata this way (format version 3).
pub fn encode_blob(
    data: &[u8],
    chunk_size: usize,
    compressor: Compressor,
) -> Result<Vec<u8>, CodecError> {
    debug_assert!(chunk_size.is_power_of_two() && chunk_size as u64 >= BLOCK_SIZE);
    let mut enc = Encoder::new(compressor)?;
    let mut out = Vec::new();
    let mut table = ChunkTable::default();
    for (i, piece) in data.chunks(chunk_size).enumerate() {
        let (compressor, stored) = enc.encode(piece)?;
        table.entries.push(ChunkEntry {
            uncompressed_offset: (i * chunk_size) as u64,
            compressed_offset: out.len() as u64,
            uncompressed_size: piece.len() as u32,
            compressed_size: stored.len() as u32,
            compressor,
            digest: digest(piece),
        });
        out.extend_from_slice(&stored);
    }
    let trailer = BlobTrailer {
        chunk_count: table.entries.len() as u64,
        table_offset: out.len() as u64,
        uncompressed_size: (data.len() as u64).next_multiple_of(BLOCK_SIZE),
    };
    out.extend_from_slice(&table.to_bytes());
    out.extend_from_slice(&trailer.to_bytes());
    Ok(out)
}

/// The BLAKE3 of a blob's chunk table and trailer (its last `64 × chunks + 64` bytes),
/// which pins every chunk of it: what a manifest records for a chunked metadata blob
/// (`dev.hoist.meta.table`). `None` if the blob is shorter than that.
pub fn table_digest(blob: &[u8], chunks: usize) -> Option<[u8; 32]> {
    let tail = chunks
        .checked_mul(CHUNK_ENTRY_SIZE)?
        .checked_add(BLOB_TRAILER_SIZE)?;
    Some(digest(&blob[blob.len().checked_sub(tail)?..]))
}

/// Decodes a whole blob written by [`encode_blob`] back to its bytes (its uncompressed
/// address space up to the end of its last chunk), verifying every chunk; refuses a
/// blob that would decode to more than `limit` bytes before allocating them.
pub fn decode_blob(blob: &[u8], limit: u64) -> Result<Vec<u8>, CodecError> {
    let tail =
        blob.len()
            .checked_sub(BLOB_TRAILER_SIZE)
            .ok_or(hoist_format::FormatError::Corrupt(
                "blob shorter than its trailer".into(),
            ))?;
    let trailer = BlobTrailer::parse(&blob[tail..], blob.len() as u64)?;
    if trailer.uncompressed_size > limit {
        return Err(CodecError::Format(hoist_format::FormatError::Corrupt(
            format!(
                "blob of {} bytes decoded, more than the {limit} allowed",
                trailer.uncompressed_size
            ),
        )));
    }
    // The trailer's check bounds the table within the blob.
    let (_, table) = parse_blob_tail(&blob[trailer.table_offset as usize..], blob.len() as u64)?;
    let mut out = vec![0u8; table.end() as usize];
    for (index, e) in table.entries.iter().enumerate() {
        // The table's checks bound the compressed range within the chunk area.
        let at = e.compressed_offset as usize;
        let stored = &blob[at..at + e.compressed_size as usize];
        let data = decode_verified(e, stored).map_err(|source| CodecError::Chunk {
            index,
            source: Box::new(source),
        })?;
        let to = e.uncompressed_offset as usize;
        out[to..to + data.len()].copy_from_slice(&data);
    }
    Ok(out)
}

/// The metadata held by a metadata blob: the blob itself up to format version 2, what
/// it decodes to from version 3 on (a chunked blob; [`decode_blob`] with `limit`).
pub fn metadata_of(blob: Vec<u8>, limit: u64) -> Result<Vec<u8>, CodecError> {
    if blob.starts_with(&hoist_format::meta::META_MAGIC) {
        Ok(blob)
    } else {
        decode_blob(&blob, limit)
    }
}

fn hex(bytes: &[u8]) -> String {
    hoist_format::meta::hex(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Untrusted bytes as a chunked blob: an error, never a panic, and a damaged
        /// blob decodes to its own bytes or not at all.
        #[test]
        fn a_damaged_blob_decodes_to_its_bytes_or_fails(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..20_000),
            flips in proptest::collection::vec((proptest::prelude::any::<usize>(), 1u8..), 1..4),
            cut in 0usize..100,
        ) {
            let blob = encode_blob(&data, 4096, Compressor::Zstd).unwrap();
            let mut bad = blob.clone();
            for (at, x) in &flips {
                let i = at % bad.len();
                bad[i] ^= x;
            }
            if let Ok(out) = decode_blob(&bad, 1 << 20) {
                proptest::prop_assert_eq!(out, data.clone());
            }
            let short = &blob[..blob.len().saturating_sub(cut + 1)];
            let _ = decode_blob(short, 1 << 20);
            let _ = metadata_of(bad, 1 << 20);
        }
    }

    #[test]
    fn a_blob_round_trips_and_a_damaged_one_is_refused() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 7 + i / 5000) as u8).collect();
        for compressor in [Compressor::Zstd, Compressor::Lz4, Compressor::None] {
            let blob = encode_blob(&data, 64 << 10, compressor).unwrap();
            assert_eq!(decode_blob(&blob, 1 << 20).unwrap(), data);
            assert!(decode_blob(&blob, 100_000).is_err(), "over the limit");
            let mut bad = blob.clone();
            bad[10] ^= 1;
            assert!(decode_blob(&bad, 1 << 20).is_err(), "a flipped byte");
            assert!(decode_blob(&blob[1..], 1 << 20).is_err(), "cut");
        }
        assert_eq!(
            decode_blob(&encode_blob(&[], 4096, Compressor::Zstd).unwrap(), 0).unwrap(),
            b""
        );
    }

    fn entry(compressor: Compressor, data: &[u8], stored: &[u8]) -> ChunkEntry {
        ChunkEntry {
            uncompressed_offset: 0,
            compressed_offset: 0,
            uncompressed_size: data.len() as u32,
            compressed_size: stored.len() as u32,
            compressor,
            digest: digest(data),
        }
    }

    #[test]
    fn every_codec_round_trips_and_verifies() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        for c in [Compressor::None, Compressor::Zstd, Compressor::Lz4] {
            let (used, stored) = Encoder::new(c).unwrap().encode(&data).unwrap();
            assert_eq!(used, c, "compressible data keeps its codec");
            let e = entry(used, &data, &stored);
            assert_eq!(decode_verified(&e, &stored).unwrap(), data);
        }
    }

    #[test]
    fn incompressible_chunks_are_stored() {
        let mut data = vec![0u8; 4096];
        blake3::Hasher::new().finalize_xof().fill(&mut data);
        let (used, stored) = Encoder::new(Compressor::Zstd)
            .unwrap()
            .encode(&data)
            .unwrap();
        assert_eq!(used, Compressor::None);
        assert_eq!(stored, data);
    }

    #[test]
    fn a_flipped_byte_is_caught() {
        let data = vec![7u8; 10_000];
        for c in [Compressor::None, Compressor::Zstd, Compressor::Lz4] {
            let (used, mut stored) = Encoder::new(c).unwrap().encode(&data).unwrap();
            let e = entry(used, &data, &stored);
            let last = stored.len() - 1;
            stored[last] ^= 0x40;
            assert!(decode_verified(&e, &stored).is_err(), "{c:?}");
        }
    }

    #[test]
    fn decoding_is_bounded_by_the_promised_size() {
        let data = vec![0u8; 1 << 20];
        let (_, stored) = Encoder::new(Compressor::Zstd)
            .unwrap()
            .encode(&data)
            .unwrap();
        assert!(decode(Compressor::Zstd, &stored, 4096).is_err());
        let lz = lz4_flex::block::compress(&data);
        assert!(decode(Compressor::Lz4, &lz, 4096).is_err());
    }
}
