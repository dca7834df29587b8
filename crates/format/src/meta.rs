//! The metadata blob: a hoist header, an EROFS image, and the blob table with the chunk
//! table of every data blob.
//!
//! ```text
//! [0, 1024)          hoist header (EROFS leaves these bytes to the boot sector)
//! [1024, erofs_size) the EROFS image (superblock at 1024)
//! [blob_table_offset, +128 * blob_count)   blob records, in EROFS device order
//! chunk tables       referenced by the blob records
//! ```
//!
//! The kernel reads `[0, erofs_size)` as EROFS and ignores the rest; hoist reads the
//! header to find the chunk tables. The whole blob is pinned by its OCI digest.

use crate::chunk::{ChunkTable, DigestAlgo, CHUNK_ENTRY_SIZE, MAX_CHUNKS};
use crate::erofs::ondisk::{BLOCK_SIZE, SUPER_OFFSET};
use crate::{FormatError, ReadAt};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

/// Magic of the metadata header.
pub const META_MAGIC: [u8; 8] = *b"HOISTMET";
/// The format version this crate writes. Version 2 lets a file's chunk index point
/// inside a stored chunk (a frame of small files compressed together), where version 1
/// required the exact start of one. Version 3 stores the metadata blob as a chunked blob
/// ([`META_CHUNK_SIZE`] chunks in the data blob framing) that decodes to these bytes.
pub const META_VERSION: u32 = 3;
/// Chunk size of a metadata blob stored as a chunked blob (version 3).
pub const META_CHUNK_SIZE: usize = 64 << 10;
/// The oldest format version this crate reads.
pub const MIN_META_VERSION: u32 = 1;
/// Size of one blob record.
pub const BLOB_RECORD_SIZE: usize = 128;
/// Largest metadata blob accepted (to prevent denial of service).
pub const MAX_META_SIZE: u64 = 1 << 30;
/// Most blobs one image may reference.
pub const MAX_BLOBS: u32 = 4096;

/// On-disk metadata header at offset 0 (128 bytes of the 1024 reserved).
#[derive(Debug, Clone, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct RawMetaHeader {
    /// [`META_MAGIC`].
    pub magic: [u8; 8],
    /// Format version ([`META_VERSION`] when written; [`MIN_META_VERSION`] and later
    /// are read).
    pub version: U32,
    /// [`DigestAlgo`] of chunk digests.
    pub digest_algo: u8,
    /// log2 of the chunk size.
    pub chunk_bits: u8,
    /// Reserved (0).
    pub reserved: [u8; 2],
    /// Bytes of the EROFS image (a multiple of 4096).
    pub erofs_size: U64,
    /// Offset of the blob records.
    pub blob_table_offset: U64,
    /// Number of blob records (= EROFS extra devices).
    pub blob_count: U32,
    /// Offset of the referenced-chunk bitmap (version 3), or 0 if there is none.
    pub used_offset: U64,
    /// Reserved (0).
    pub reserved2: [u8; 84],
}

/// On-disk blob record (128 bytes).
#[derive(Debug, Clone, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct RawBlobRecord {
    /// sha256 of the data blob, i.e. its OCI digest.
    pub digest: [u8; 32],
    /// Size of the data blob.
    pub compressed_size: U64,
    /// Size of its uncompressed address space.
    pub uncompressed_size: U64,
    /// Offset of its chunk table in the metadata blob.
    pub chunk_table_offset: U64,
    /// Number of chunks.
    pub chunk_count: U64,
    /// Offset of the chunk table within the data blob (= its compressed chunk area size).
    pub data_size: U64,
    /// Reserved (0).
    pub reserved: [u8; 56],
}

/// One data blob as the metadata blob knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    /// sha256 digest of the blob (raw bytes).
    pub digest: [u8; 32],
    /// Size of the blob.
    pub compressed_size: u64,
    /// Size of the compressed chunk area at the start of the blob.
    pub data_size: u64,
    /// Size of its uncompressed address space.
    pub uncompressed_size: u64,
    /// Its chunks.
    pub chunks: ChunkTable,
}

impl BlobInfo {
    /// `sha256:<hex>`.
    pub fn digest_string(&self) -> String {
        format!("sha256:{}", hex(&self.digest))
    }
}

/// The parsed hoist parts of a metadata blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Format version of the blob.
    pub version: u32,
    /// log2 of the chunk size.
    pub chunk_bits: u8,
    /// Bytes of the EROFS image at the start of the blob.
    pub erofs_size: u64,
    /// Data blobs in device order (device id `n` is `blobs[n - 1]`).
    pub blobs: Vec<BlobInfo>,
    /// For each blob, which of its chunks a file of the tree references
    /// (`used[blob][index]`), as computed at conversion (version 3); `None` on earlier
    /// images, whose readers walk the tree to know.
    pub used: Option<Vec<Vec<bool>>>,
}

/// Assembles a metadata blob from an EROFS image (whose first 1024 bytes are free), the
/// data blobs, and which of their chunks the tree references (`used[blob][index]`).
pub fn assemble(
    mut erofs: Vec<u8>,
    chunk_bits: u8,
    blobs: &[BlobInfo],
    used: &[Vec<bool>],
) -> Result<Vec<u8>, FormatError> {
    if used.len() != blobs.len()
        || used
            .iter()
            .zip(blobs)
            .any(|(u, b)| u.len() != b.chunks.entries.len())
    {
        return Err(FormatError::invalid(
            "the referenced-chunk bitmap does not match the chunk tables",
        ));
    }
    if erofs.len() < 2 * BLOCK_SIZE as usize
        || !erofs.len().is_multiple_of(BLOCK_SIZE as usize)
        || erofs[..SUPER_OFFSET as usize].iter().any(|&b| b != 0)
    {
        return Err(FormatError::invalid(
            "EROFS image must be whole blocks with 1024 free leading bytes",
        ));
    }
    let blob_count = u32::try_from(blobs.len())
        .ok()
        .filter(|n| *n <= MAX_BLOBS)
        .ok_or_else(|| FormatError::invalid("too many blobs"))?;
    let erofs_size = erofs.len() as u64;
    let table_offset = erofs_size;
    let mut records = Vec::new();
    let mut tables = Vec::new();
    let mut next_table = table_offset + (blobs.len() * BLOB_RECORD_SIZE) as u64;
    for b in blobs {
        let table = b.chunks.to_bytes();
        let rec = RawBlobRecord {
            digest: b.digest,
            compressed_size: b.compressed_size.into(),
            uncompressed_size: b.uncompressed_size.into(),
            chunk_table_offset: next_table.into(),
            chunk_count: (b.chunks.entries.len() as u64).into(),
            data_size: b.data_size.into(),
            reserved: [0; 56],
        };
        next_table += table.len() as u64;
        records.extend_from_slice(rec.as_bytes());
        tables.extend_from_slice(&table);
    }
    let used_offset = next_table;
    let header = RawMetaHeader {
        magic: META_MAGIC,
        version: META_VERSION.into(),
        digest_algo: DigestAlgo::Blake3 as u8,
        chunk_bits,
        erofs_size: erofs_size.into(),
        blob_table_offset: table_offset.into(),
        blob_count: blob_count.into(),
        used_offset: used_offset.into(),
        ..FromZeros::new_zeroed()
    };
    erofs[..size_of::<RawMetaHeader>()].copy_from_slice(header.as_bytes());
    erofs.extend_from_slice(&records);
    erofs.extend_from_slice(&tables);
    for bits in used {
        let mut bytes = vec![0u8; bits.len().div_ceil(8)];
        for (i, _) in bits.iter().enumerate().filter(|(_, b)| **b) {
            bytes[i / 8] |= 1 << (i % 8);
        }
        erofs.extend_from_slice(&bytes);
    }
    Ok(erofs)
}

/// Parses and validates the hoist parts of a metadata blob.
pub fn parse(blob: &[u8]) -> Result<Meta, FormatError> {
    parse_at(blob)
}

/// Reads `len` bytes at `at` of `r`, checked to lie within its `size`.
fn read_range(
    r: &(impl ReadAt + ?Sized),
    at: u64,
    len: u64,
    size: u64,
    what: &dyn Fn() -> String,
) -> Result<Vec<u8>, FormatError> {
    if at.checked_add(len).is_none_or(|end| end > size) {
        return Err(FormatError::Corrupt(format!(
            "{} does not fit in the metadata blob",
            what()
        )));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact_at(&mut buf, at)?;
    Ok(buf)
}

/// [`parse`] through positioned reads: reads the header, the blob records, the chunk
/// tables and the bitmap, and nothing of the EROFS image (a reader fetching metadata
/// on demand fetches just those ranges).
pub fn parse_at(r: &(impl ReadAt + ?Sized)) -> Result<Meta, FormatError> {
    let corrupt = |w: String| FormatError::Corrupt(w);
    let len = r.size()?;
    let head = read_range(r, 0, size_of::<RawMetaHeader>() as u64, len, &|| {
        "the header".into()
    })
    .map_err(|_| corrupt("metadata blob shorter than its header".into()))?;
    let (raw, _) = RawMetaHeader::read_from_prefix(&head)
        .map_err(|_| corrupt("metadata blob shorter than its header".into()))?;
    if raw.magic != META_MAGIC {
        return Err(corrupt("not a hoist metadata blob (bad magic)".into()));
    }
    let version = raw.version.get();
    if !(MIN_META_VERSION..=META_VERSION).contains(&version) {
        return Err(FormatError::Unsupported(format!(
            "metadata format version {version}; this hoist reads versions \
             {MIN_META_VERSION} to {META_VERSION}: upgrade hoist, or convert the image again \
             with this hoist (`hoist convert`)"
        )));
    }
    DigestAlgo::try_from(raw.digest_algo)?;
    let chunk_bits = raw.chunk_bits;
    if !(crate::erofs::ondisk::BLOCK_BITS..=crate::chunk::MAX_CHUNK_BITS).contains(&chunk_bits) {
        return Err(corrupt(format!(
            "chunk size 2^{chunk_bits} outside 4 KiB..64 MiB"
        )));
    }
    let erofs_size = raw.erofs_size.get();
    if erofs_size % BLOCK_SIZE != 0 || erofs_size > len || raw.blob_table_offset.get() != erofs_size
    {
        return Err(corrupt(
            "EROFS size in the header does not fit the blob".into(),
        ));
    }
    let count = raw.blob_count.get();
    if count > MAX_BLOBS {
        return Err(corrupt(format!("{count} blobs")));
    }
    let start = raw.blob_table_offset.get();
    let mut blobs = Vec::new();
    let records = read_range(
        r,
        start,
        u64::from(count) * BLOB_RECORD_SIZE as u64,
        len,
        &|| "the blob records".into(),
    )?;
    for (i, record) in records.chunks_exact(BLOB_RECORD_SIZE).enumerate() {
        let (rec, _) =
            RawBlobRecord::read_from_prefix(record).map_err(|_| corrupt("blob record".into()))?;
        let n = rec.chunk_count.get();
        let t_at = rec.chunk_table_offset.get();
        let t_end = n
            .checked_mul(CHUNK_ENTRY_SIZE as u64)
            .and_then(|b| b.checked_add(t_at))
            .filter(|e| *e <= len && n <= MAX_CHUNKS);
        let t_end = t_end.ok_or_else(|| {
            corrupt(format!(
                "chunk table of blob {i} runs past the metadata blob"
            ))
        })?;
        let data_size = rec.data_size.get();
        if data_size > rec.compressed_size.get() {
            return Err(corrupt(format!(
                "blob {i}: chunk area larger than the blob"
            )));
        }
        let table = read_range(r, t_at, t_end - t_at, len, &|| {
            format!("chunk table of blob {i}")
        })?;
        let chunks = ChunkTable::parse(&table, data_size, rec.uncompressed_size.get())
            .map_err(|e| corrupt(format!("blob {i}: {e}")))?;
        blobs.push(BlobInfo {
            digest: rec.digest,
            compressed_size: rec.compressed_size.get(),
            data_size,
            uncompressed_size: rec.uncompressed_size.get(),
            chunks,
        });
    }
    let used = match raw.used_offset.get() {
        0 => None,
        at => Some(parse_used(r, at, len, &blobs)?),
    };
    Ok(Meta {
        version,
        chunk_bits,
        erofs_size,
        blobs,
        used,
    })
}

/// Decodes the referenced-chunk bitmap at `at`: per blob in device order, a bit per
/// chunk (bit `i % 8` of byte `i / 8`), its bytes rounded up to whole bytes.
fn parse_used(
    r: &(impl ReadAt + ?Sized),
    at: u64,
    size: u64,
    blobs: &[BlobInfo],
) -> Result<Vec<Vec<bool>>, FormatError> {
    let total: u64 = blobs
        .iter()
        .map(|b| b.chunks.entries.len().div_ceil(8) as u64)
        .sum();
    let bytes = read_range(r, at, total, size, &|| "the referenced-chunk bitmap".into())?;
    let mut pos = 0;
    let mut used = Vec::with_capacity(blobs.len());
    for b in blobs {
        let n = b.chunks.entries.len();
        let bits = &bytes[pos..pos + n.div_ceil(8)];
        used.push((0..n).map(|k| bits[k / 8] & (1 << (k % 8)) != 0).collect());
        pos += n.div_ceil(8);
    }
    Ok(used)
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{ChunkEntry, Compressor};

    fn blob(n: u64, tag: u8) -> BlobInfo {
        let entries = (0..n)
            .map(|i| ChunkEntry {
                uncompressed_offset: i * BLOCK_SIZE,
                compressed_offset: i * 10,
                uncompressed_size: BLOCK_SIZE as u32,
                compressed_size: 10,
                compressor: Compressor::Zstd,
                digest: [tag; 32],
            })
            .collect();
        BlobInfo {
            digest: [tag; 32],
            compressed_size: n * 10 + 64 * n + 64,
            data_size: n * 10,
            uncompressed_size: n * BLOCK_SIZE,
            chunks: ChunkTable { entries },
        }
    }

    #[test]
    fn the_referenced_chunk_bitmap_round_trips_and_is_bounded() {
        let blobs = [blob(3, 1), blob(11, 2)];
        let used = vec![
            vec![true, false, true],
            (0..11).map(|i| i % 3 == 0).collect::<Vec<bool>>(),
        ];
        let bytes = assemble(vec![0; 2 * BLOCK_SIZE as usize], 20, &blobs, &used).unwrap();
        let meta = parse(&bytes).unwrap();
        assert_eq!(meta.version, META_VERSION);
        assert_eq!(meta.blobs, blobs);
        assert_eq!(meta.used.as_ref(), Some(&used));
        // One byte for blob 0, two for blob 1: cut the last one off.
        let cut = parse(&bytes[..bytes.len() - 1]).unwrap_err();
        assert!(cut.to_string().contains("bitmap does not fit"), "{cut}");
        // A bitmap that does not fit the tables is refused when written.
        let short = [vec![true; 3], vec![true; 10]];
        assert!(assemble(vec![0; 8192], 20, &blobs, &short).is_err());
        // A version this code does not know names the fixes.
        let mut future = bytes.clone();
        future[8..12].copy_from_slice(&(META_VERSION + 1).to_le_bytes());
        let err = parse(&future).unwrap_err().to_string();
        assert!(
            err.contains("hoist convert") && err.contains("upgrade hoist"),
            "{err}"
        );
        // Without the field (images of versions 1 and 2), there is no bitmap.
        let mut old = bytes.clone();
        old[36..44].fill(0);
        assert_eq!(parse(&old).unwrap().used, None);
    }
}
