//! Summarises a hoist image: layers, blobs, files, chunks and dedup.

use crate::{HoistImage, Layer, ReadError};
use hoist_format::erofs::ondisk::mode;
use hoist_format::tree::ChunkRef;
use hoist_oci::media;
use std::collections::{BTreeMap, HashSet};

/// One data blob.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BlobSummary {
    /// Digest.
    pub digest: String,
    /// Compressed size (the blob's size).
    pub size: u64,
    /// Size of the uncompressed address space.
    pub uncompressed_size: u64,
    /// Uncompressed bytes of its chunks.
    pub chunk_bytes: u64,
    /// Chunks stored.
    pub chunks: u64,
    /// Source layer it was made from; `None` for a blob reused from a chunk dictionary.
    pub source_layer: Option<String>,
}

/// What `hoist inspect` prints.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InspectReport {
    /// Manifest digest.
    pub manifest: String,
    /// Manifest digest of the source image.
    pub source_manifest: Option<String>,
    /// Conversion options.
    pub options: Option<String>,
    /// Chunk size.
    pub chunk_size: u64,
    /// Manifest layers.
    pub layers: Vec<Layer>,
    /// Data blobs in device order.
    pub blobs: Vec<BlobSummary>,
    /// Metadata blob size.
    pub meta_size: u64,
    /// Inodes by type (`dir`, `file`, `symlink`, ...).
    pub inodes: BTreeMap<String, u64>,
    /// Names (hardlinks counted per name).
    pub entries: u64,
    /// Bytes of regular file content (each inode once).
    pub file_bytes: u64,
    /// Bytes of file content that are holes (all-zero chunks, not stored).
    pub hole_bytes: u64,
    /// Chunk references of all files.
    pub chunk_refs: u64,
    /// Distinct chunks referenced.
    pub unique_chunks: u64,
    /// Uncompressed bytes of all distinct chunks referenced.
    pub unique_chunk_bytes: u64,
    /// `file_bytes - hole_bytes` divided by `unique_chunk_bytes`.
    pub dedup_ratio: f64,
    /// Compressed bytes of all data blobs.
    pub stored_bytes: u64,
    /// Of those, in blobs reused from a chunk dictionary (stored by another image).
    pub reused_blob_bytes: u64,
    /// Uncompressed bytes this image's files take from reused blobs: not stored again.
    pub reused_chunk_bytes: u64,
}

/// Builds the summary.
pub fn inspect(image: &HoistImage) -> Result<InspectReport, ReadError> {
    let chunk_size = 1u64 << image.meta.chunk_bits;
    let mut inodes: BTreeMap<String, u64> = BTreeMap::new();
    let mut seen = HashSet::new();
    let mut unique = HashSet::new();
    let (mut entries, mut file_bytes, mut hole_bytes, mut refs, mut unique_bytes) =
        (0, 0, 0, 0, 0u64);
    let blobs: Vec<BlobSummary> = image
        .meta
        .blobs
        .iter()
        .map(|b| {
            let digest = b.digest_string();
            let source_layer = image
                .layers
                .iter()
                .find(|l| l.digest == digest)
                .and_then(|l| l.annotations.get(media::ANNOTATION_SOURCE_LAYER))
                .and_then(|v| v.as_str().map(str::to_string));
            BlobSummary {
                digest,
                size: b.compressed_size,
                uncompressed_size: b.uncompressed_size,
                chunk_bytes: b
                    .chunks
                    .entries
                    .iter()
                    .map(|e| u64::from(e.uncompressed_size))
                    .sum(),
                chunks: b.chunks.entries.len() as u64,
                source_layer,
            }
        })
        .collect();
    let mut reused_chunk_bytes = 0u64;
    image
        .fs
        .walk(|_, inode| {
            entries += 1;
            if !seen.insert(inode.nid) {
                return Ok(());
            }
            let kind = match inode.file_type() {
                mode::S_IFDIR => "dir",
                mode::S_IFREG => "file",
                mode::S_IFLNK => "symlink",
                mode::S_IFCHR => "chardev",
                mode::S_IFBLK => "blockdev",
                mode::S_IFIFO => "fifo",
                _ => "socket",
            };
            *inodes.entry(kind.into()).or_default() += 1;
            if !inode.is_file() {
                return Ok(());
            }
            file_bytes += inode.size;
            for (i, c) in image.chunks(inode)?.into_iter().enumerate() {
                let len = (inode.size - i as u64 * chunk_size).min(chunk_size);
                refs += 1;
                if c == ChunkRef::Hole {
                    hole_bytes += len;
                } else if let Some(at) = image.resolve(c) {
                    if unique.insert((at.blob, at.index)) {
                        let size = u64::from(at.entry.uncompressed_size);
                        unique_bytes += size;
                        if blobs[at.blob].source_layer.is_none() {
                            reused_chunk_bytes += size;
                        }
                    }
                }
            }
            Ok(())
        })
        .map_err(|source| ReadError::Meta {
            digest: image.meta_digest.to_string(),
            source,
        })?;
    let annotation = |k: &str| {
        image.manifest["annotations"][k]
            .as_str()
            .map(str::to_string)
    };
    let meta_size = image
        .layers
        .iter()
        .find(|l| media::is_hoist_meta(&l.media_type))
        .map_or(0, |l| l.size);
    let reused_blob_bytes = blobs
        .iter()
        .filter(|b| b.source_layer.is_none())
        .map(|b| b.size)
        .sum();
    Ok(InspectReport {
        manifest: image.manifest_digest.to_string(),
        source_manifest: annotation(media::ANNOTATION_SOURCE_MANIFEST),
        options: annotation(media::ANNOTATION_OPTIONS),
        chunk_size,
        layers: image.layers.clone(),
        stored_bytes: blobs.iter().map(|b| b.size).sum(),
        blobs,
        meta_size,
        inodes,
        entries,
        file_bytes,
        hole_bytes,
        chunk_refs: refs,
        unique_chunks: unique.len() as u64,
        unique_chunk_bytes: unique_bytes,
        dedup_ratio: if unique_bytes == 0 {
            1.0
        } else {
            (file_bytes - hole_bytes) as f64 / unique_bytes as f64
        },
        reused_blob_bytes,
        reused_chunk_bytes,
    })
}
