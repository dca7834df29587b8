//! Verifies a hoist image end to end: metadata, every file's chunk references, every
//! chunk's digest, every blob's table and digest.

use crate::{ChunkError, HoistImage, ReadError};
use hoist_format::chunk::{parse_blob_tail, BLOB_TRAILER_SIZE};
use hoist_format::tree::ChunkRef;
use std::collections::HashMap;
use std::io::Read;

/// Counts of a successful check.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CheckReport {
    /// Inodes walked.
    pub inodes: u64,
    /// Blobs verified.
    pub blobs: u64,
    /// Chunks verified.
    pub chunks: u64,
    /// Compressed bytes read.
    pub bytes: u64,
}

/// Checks `image`; the first problem found is the error, naming the chunk and a file
/// that uses it.
pub fn check(image: &HoistImage) -> Result<CheckReport, ReadError> {
    let mut report = CheckReport::default();
    let chunk_size = 1u64 << image.meta.chunk_bits;
    // Which file uses each chunk, to name it in errors.
    let mut users: HashMap<(usize, usize), String> = HashMap::new();
    let mut failure = None;
    let walked = image.fs.walk(|path, inode| {
        report.inodes += 1;
        let shown = String::from_utf8_lossy(path).into_owned();
        let res = (|| {
            if inode.is_dir() {
                image.fs.read_dir(inode)?;
            }
            image.fs.xattrs(inode)?;
            if inode.file_type() == hoist_format::erofs::ondisk::mode::S_IFLNK {
                image.fs.read_link(inode)?;
            }
            Ok::<_, hoist_format::FormatError>(())
        })();
        if let Err(e) = res {
            failure = Some(ReadError::File {
                path: shown,
                why: e.to_string(),
            });
            return Err(hoist_format::FormatError::Invalid("stopped".into()));
        }
        if !inode.is_file() {
            return Ok(());
        }
        for (i, c) in image.chunks(inode)?.into_iter().enumerate() {
            if c == ChunkRef::Hole {
                continue;
            }
            let want = (inode.size - i as u64 * chunk_size).min(chunk_size);
            match image.resolve(c) {
                Some(at) if at.available() >= want => {
                    users
                        .entry((at.blob, at.index))
                        .or_insert_with(|| shown.clone());
                }
                _ => {
                    failure = Some(ReadError::File {
                        path: shown,
                        why: format!("chunk {i} ({c:?}) is not a stored chunk of its size"),
                    });
                    return Err(hoist_format::FormatError::Invalid("stopped".into()));
                }
            }
        }
        Ok(())
    });
    if let Some(e) = failure {
        return Err(e);
    }
    walked.map_err(|source| ReadError::Meta {
        digest: image.meta_digest.to_string(),
        source,
    })?;

    // The referenced-chunk bitmap a conversion stored must say what the tree says.
    if let Some(stored) = &image.meta.used {
        if *stored != image.walk_referenced_chunks()? {
            return Err(ReadError::Meta {
                digest: image.meta_digest.to_string(),
                source: hoist_format::FormatError::Corrupt(
                    "its referenced-chunk bitmap differs from the chunks the tree references"
                        .into(),
                ),
            });
        }
    }
    for (b, info) in image.meta.blobs.iter().enumerate() {
        let digest = image
            .blob_digest((b + 1) as u16)
            .expect("one digest per blob")
            .clone();
        let mut r = image.source().open_blob(&digest, info.compressed_size)?;
        let io = |e| ReadError::Io {
            path: format!("blob {digest}"),
            source: e,
        };
        let mut pos = 0u64;
        for (index, e) in info.chunks.entries.iter().enumerate() {
            if e.compressed_offset < pos {
                return Err(ReadError::Invalid(format!(
                    "blob {digest}: chunk {index} overlaps the previous one"
                )));
            }
            std::io::copy(
                &mut (&mut r).take(e.compressed_offset - pos),
                &mut std::io::sink(),
            )
            .map_err(io)?;
            let mut stored = vec![0u8; e.compressed_size as usize];
            r.read_exact(&mut stored).map_err(io)?;
            pos = e.compressed_offset + u64::from(e.compressed_size);
            hoist_codec::decode_verified(e, &stored).map_err(|source| {
                ReadError::Chunk(Box::new(ChunkError {
                    blob: digest.to_string(),
                    index,
                    start: e.compressed_offset,
                    end: pos,
                    used_by: users
                        .get(&(b, index))
                        .map(|p| format!(", used by {p}"))
                        .unwrap_or_default(),
                    source,
                }))
            })?;
            report.chunks += 1;
        }
        // The blob's own table and trailer must agree with the metadata's copy.
        std::io::copy(
            &mut (&mut r).take(info.data_size - pos),
            &mut std::io::sink(),
        )
        .map_err(io)?;
        let mut tail = Vec::new();
        r.read_to_end(&mut tail).map_err(io)?;
        let mismatch = |why: &str| ReadError::Invalid(format!("blob {digest}: {why}"));
        if tail.len() < BLOB_TRAILER_SIZE {
            return Err(mismatch("no trailer"));
        }
        let (t, own) =
            parse_blob_tail(&tail, info.compressed_size).map_err(|e| mismatch(&e.to_string()))?;
        if own != info.chunks
            || t.uncompressed_size != info.uncompressed_size
            || t.table_offset != info.data_size
        {
            return Err(mismatch(
                "its chunk table differs from the metadata blob's copy",
            ));
        }
        report.blobs += 1;
        report.bytes += info.compressed_size;
    }
    Ok(report)
}
