//! Chunk tables and the trailer of a data blob.
//!
//! A data blob is `[compressed chunks][chunk table][trailer]`. Each chunk is compressed on
//! its own, so any chunk can be fetched with one ranged read and decoded alone. The chunk
//! table maps the blob's *uncompressed address space* (every chunk starts at a 4 KiB
//! boundary there; this is what EROFS chunk indexes point into) to compressed ranges.
//! The same tables are copied into the metadata blob so a mount never reads a data blob
//! to find them.

use crate::erofs::ondisk::BLOCK_SIZE;
use crate::FormatError;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Size of one chunk table entry.
pub const CHUNK_ENTRY_SIZE: usize = 64;
/// Size of the data blob trailer.
pub const BLOB_TRAILER_SIZE: usize = 64;
/// Magic of the data blob trailer.
pub const BLOB_MAGIC: [u8; 8] = *b"HOISTBLB";
/// log2 of the largest chunk size.
pub const MAX_CHUNK_BITS: u8 = 26;
/// Largest chunk hoist accepts (to prevent denial of service when decoding).
pub const MAX_CHUNK_SIZE: u64 = 1 << MAX_CHUNK_BITS;
/// Most chunks one blob may hold (1 TiB of 4 KiB chunks; bounds table allocations).
pub const MAX_CHUNKS: u64 = 1 << 28;

/// How one chunk is compressed. The on-disk value is the discriminant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Compressor {
    /// Stored as is.
    None = 0,
    /// Zstandard frame.
    Zstd = 1,
    /// One raw LZ4 block (its size comes from the chunk table).
    Lz4 = 2,
}

impl TryFrom<u8> for Compressor {
    type Error = FormatError;
    fn try_from(v: u8) -> Result<Self, FormatError> {
        match v {
            0 => Ok(Compressor::None),
            1 => Ok(Compressor::Zstd),
            2 => Ok(Compressor::Lz4),
            other => Err(FormatError::Corrupt(format!("unknown compressor {other}"))),
        }
    }
}

impl Compressor {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Compressor::None => "none",
            Compressor::Zstd => "zstd",
            Compressor::Lz4 => "lz4",
        }
    }
}

/// Chunk digest algorithm. hoist uses BLAKE3 (see docs/format.md for why).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DigestAlgo {
    /// BLAKE3-256.
    Blake3 = 1,
}

impl TryFrom<u8> for DigestAlgo {
    type Error = FormatError;
    fn try_from(v: u8) -> Result<Self, FormatError> {
        match v {
            1 => Ok(DigestAlgo::Blake3),
            other => Err(FormatError::Corrupt(format!(
                "unknown digest algorithm {other}"
            ))),
        }
    }
}

/// On-disk chunk table entry (64 bytes).
#[derive(Debug, Clone, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct RawChunkEntry {
    /// Offset in the blob's uncompressed address space (4 KiB aligned).
    pub uncompressed_offset: U64,
    /// Offset of the compressed bytes in the blob.
    pub compressed_offset: U64,
    /// Uncompressed length.
    pub uncompressed_size: U32,
    /// Compressed length.
    pub compressed_size: U32,
    /// [`Compressor`] value.
    pub compressor: u8,
    /// Reserved (0).
    pub reserved: [u8; 7],
    /// Digest of the uncompressed bytes.
    pub digest: [u8; 32],
}

/// A validated chunk table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkEntry {
    /// Offset in the blob's uncompressed address space (4 KiB aligned).
    pub uncompressed_offset: u64,
    /// Offset of the compressed bytes in the blob.
    pub compressed_offset: u64,
    /// Uncompressed length.
    pub uncompressed_size: u32,
    /// Compressed length.
    pub compressed_size: u32,
    /// How the bytes are compressed.
    pub compressor: Compressor,
    /// Digest of the uncompressed bytes.
    pub digest: [u8; 32],
}

impl ChunkEntry {
    /// This chunk's stored bytes within `bytes`, a ranged read of its blob from
    /// compressed offset `start`; `None` unless all of them are inside it (a table need
    /// not list compressed ranges in order: it is untrusted).
    pub fn stored_in<'a>(&self, bytes: &'a [u8], start: u64) -> Option<&'a [u8]> {
        let at = usize::try_from(self.compressed_offset.checked_sub(start)?).ok()?;
        bytes.get(at..at.checked_add(self.compressed_size as usize)?)
    }

    /// The on-disk form.
    pub fn to_raw(&self) -> RawChunkEntry {
        RawChunkEntry {
            uncompressed_offset: self.uncompressed_offset.into(),
            compressed_offset: self.compressed_offset.into(),
            uncompressed_size: self.uncompressed_size.into(),
            compressed_size: self.compressed_size.into(),
            compressor: self.compressor as u8,
            reserved: [0; 7],
            digest: self.digest,
        }
    }

    /// The block address of the chunk in the uncompressed address space.
    pub fn blkaddr(&self) -> u64 {
        self.uncompressed_offset / BLOCK_SIZE
    }
}

/// The chunk table of one blob, sorted by uncompressed offset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkTable {
    /// Entries in uncompressed-offset order.
    pub entries: Vec<ChunkEntry>,
}

impl ChunkTable {
    /// Encodes the table.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.entries.len() * CHUNK_ENTRY_SIZE);
        for e in &self.entries {
            out.extend_from_slice(e.to_raw().as_bytes());
        }
        out
    }

    /// Decodes and validates a table for a blob whose compressed chunk area is
    /// `data_size` bytes and whose uncompressed address space is `uncompressed_size` bytes.
    pub fn parse(
        bytes: &[u8],
        data_size: u64,
        uncompressed_size: u64,
    ) -> Result<Self, FormatError> {
        if !bytes.len().is_multiple_of(CHUNK_ENTRY_SIZE) {
            return Err(FormatError::Corrupt(format!(
                "chunk table of {} bytes is not a whole number of entries",
                bytes.len()
            )));
        }
        let mut entries = Vec::with_capacity(bytes.len() / CHUNK_ENTRY_SIZE);
        let mut next_free = 0u64;
        for (i, raw) in bytes.chunks_exact(CHUNK_ENTRY_SIZE).enumerate() {
            let raw = RawChunkEntry::read_from_bytes(raw)
                .map_err(|_| FormatError::Corrupt("chunk entry".into()))?;
            let bad = |why: &str| FormatError::Corrupt(format!("chunk {i}: {why}"));
            let e = ChunkEntry {
                uncompressed_offset: raw.uncompressed_offset.get(),
                compressed_offset: raw.compressed_offset.get(),
                uncompressed_size: raw.uncompressed_size.get(),
                compressed_size: raw.compressed_size.get(),
                compressor: Compressor::try_from(raw.compressor)
                    .map_err(|_| bad("unknown compressor"))?,
                digest: raw.digest,
            };
            if !e.uncompressed_offset.is_multiple_of(BLOCK_SIZE) {
                return Err(bad("uncompressed offset is not 4 KiB aligned"));
            }
            if e.uncompressed_offset < next_free {
                return Err(bad("overlaps the previous chunk or is out of order"));
            }
            if e.uncompressed_size == 0 || u64::from(e.uncompressed_size) > MAX_CHUNK_SIZE {
                return Err(bad("uncompressed size is 0 or above 64 MiB"));
            }
            let uend = e
                .uncompressed_offset
                .checked_add(u64::from(e.uncompressed_size));
            let Some(uend) = uend.filter(|end| *end <= uncompressed_size) else {
                return Err(bad("ends past the blob's uncompressed size"));
            };
            if e.compressed_offset
                .checked_add(u64::from(e.compressed_size))
                .is_none_or(|end| end > data_size)
            {
                return Err(bad("compressed range runs past the blob's chunk area"));
            }
            if e.compressor == Compressor::None && e.compressed_size != e.uncompressed_size {
                return Err(bad("stored chunk whose sizes differ"));
            }
            next_free = uend;
            entries.push(e);
        }
        Ok(ChunkTable { entries })
    }

    /// The chunk starting at `uncompressed_offset`, if any.
    pub fn find(&self, uncompressed_offset: u64) -> Option<&ChunkEntry> {
        self.entries
            .binary_search_by_key(&uncompressed_offset, |e| e.uncompressed_offset)
            .ok()
            .map(|i| &self.entries[i])
    }

    /// Index of the chunk starting at `uncompressed_offset`, if any.
    pub fn position(&self, uncompressed_offset: u64) -> Option<usize> {
        self.entries
            .binary_search_by_key(&uncompressed_offset, |e| e.uncompressed_offset)
            .ok()
    }

    /// The end of the last chunk's bytes in the uncompressed address space (0 if none).
    pub fn end(&self) -> u64 {
        self.entries.last().map_or(0, |e| {
            e.uncompressed_offset + u64::from(e.uncompressed_size)
        })
    }

    /// Index of the chunk whose bytes hold `uncompressed_offset`, if any: the chunk that
    /// starts there, or a frame of small files (format version 2) that holds a file there.
    pub fn containing(&self, uncompressed_offset: u64) -> Option<usize> {
        let i = self
            .entries
            .partition_point(|e| e.uncompressed_offset <= uncompressed_offset)
            .checked_sub(1)?;
        let e = &self.entries[i];
        (uncompressed_offset - e.uncompressed_offset < u64::from(e.uncompressed_size)).then_some(i)
    }
}

/// Parses the end of a blob of `blob_size` bytes: `tail` is its chunk table followed by
/// its trailer (the blob's last bytes, at least the trailer).
pub fn parse_blob_tail(
    tail: &[u8],
    blob_size: u64,
) -> Result<(BlobTrailer, ChunkTable), FormatError> {
    let at = tail
        .len()
        .checked_sub(BLOB_TRAILER_SIZE)
        .ok_or_else(|| FormatError::Corrupt("blob shorter than its trailer".into()))?;
    let (table, trailer) = tail.split_at(at);
    let t = BlobTrailer::parse(trailer, blob_size)?;
    let table = ChunkTable::parse(table, t.table_offset, t.uncompressed_size)?;
    Ok((t, table))
}

/// On-disk trailer at the end of a data blob (64 bytes).
#[derive(Debug, Clone, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct RawBlobTrailer {
    /// [`BLOB_MAGIC`].
    pub magic: [u8; 8],
    /// Format version (1).
    pub version: U32,
    /// [`DigestAlgo`] of the chunk digests.
    pub digest_algo: u8,
    /// Reserved (0).
    pub reserved: [u8; 3],
    /// Number of chunk table entries.
    pub chunk_count: U64,
    /// Offset of the chunk table (= size of the compressed chunk area).
    pub table_offset: U64,
    /// Size of the uncompressed address space.
    pub uncompressed_size: U64,
    /// Reserved (0).
    pub reserved2: [u8; 24],
}

/// A validated blob trailer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobTrailer {
    /// Number of chunks.
    pub chunk_count: u64,
    /// Offset of the chunk table.
    pub table_offset: u64,
    /// Size of the uncompressed address space.
    pub uncompressed_size: u64,
}

impl BlobTrailer {
    /// Encodes the trailer.
    pub fn to_bytes(&self) -> [u8; BLOB_TRAILER_SIZE] {
        let raw = RawBlobTrailer {
            magic: BLOB_MAGIC,
            version: 1.into(),
            digest_algo: DigestAlgo::Blake3 as u8,
            chunk_count: self.chunk_count.into(),
            table_offset: self.table_offset.into(),
            uncompressed_size: self.uncompressed_size.into(),
            ..Default::default()
        };
        let mut out = [0u8; BLOB_TRAILER_SIZE];
        out.copy_from_slice(raw.as_bytes());
        out
    }

    /// Decodes the last [`BLOB_TRAILER_SIZE`] bytes of a blob of `blob_size` bytes.
    pub fn parse(bytes: &[u8], blob_size: u64) -> Result<Self, FormatError> {
        let raw = RawBlobTrailer::read_from_bytes(bytes)
            .map_err(|_| FormatError::Corrupt("blob trailer has the wrong size".into()))?;
        if raw.magic != BLOB_MAGIC {
            return Err(FormatError::Corrupt(
                "not a hoist data blob (bad trailer magic)".into(),
            ));
        }
        if raw.version.get() != 1 {
            return Err(FormatError::Corrupt(format!(
                "blob format version {}",
                raw.version.get()
            )));
        }
        DigestAlgo::try_from(raw.digest_algo)?;
        let t = BlobTrailer {
            chunk_count: raw.chunk_count.get(),
            table_offset: raw.table_offset.get(),
            uncompressed_size: raw.uncompressed_size.get(),
        };
        let table_end = t
            .chunk_count
            .checked_mul(CHUNK_ENTRY_SIZE as u64)
            .and_then(|n| n.checked_add(t.table_offset))
            .and_then(|n| n.checked_add(BLOB_TRAILER_SIZE as u64));
        if t.chunk_count > MAX_CHUNKS || table_end != Some(blob_size) {
            return Err(FormatError::Corrupt(
                "blob trailer does not match the blob size".into(),
            ));
        }
        Ok(t)
    }
}
