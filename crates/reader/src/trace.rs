//! Start-up traces: which chunks (and files) a workload read, in order.
//!
//! `hoist record` writes a trace; `hoist convert --prefetch-trace` stores it in the image as
//! a blob of media type [`hoist_oci::media::HOIST_TRACE`] listed among the manifest's layers (after the
//! metadata blob), so it travels with the image through any registry and is pinned by the
//! manifest's digest; a mount fetches it next to the metadata. A layer rather than an
//! annotation, because a read-most trace holds thousands of entries and manifests are
//! limited in size; rather than a referrer, because registries of the 2.8 generation have
//! no referrers API.
//!
//! A trace names each chunk three ways: its position (blob index, chunk index), its BLAKE3
//! digest, and the file and offset that read it. [`Trace::resolve`] maps it onto an image
//! by position when the digest there matches, else by digest, else by file: a trace
//! recorded on one version of an image still serves the next, whose files mostly keep
//! their chunks. A file list (`--prefetch-files`) is a trace with files and no chunks.

use crate::HoistImage;
use hoist_format::erofs::Inode;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};

/// Current trace version.
pub const TRACE_VERSION: u32 = 1;
/// Largest trace accepted, to prevent denial of service by a hostile image or file.
pub const MAX_TRACE_SIZE: u64 = 64 << 20;
/// Most chunk entries or files accepted in a trace.
pub const MAX_TRACE_ENTRIES: usize = 1 << 20;

/// One chunk the workload read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceChunk {
    /// Blob index (0-based) in the image it was recorded on (in a trace an image
    /// stores, in that image: [`Trace::retarget`]).
    pub blob: usize,
    /// Chunk index in that blob.
    pub index: usize,
    /// BLAKE3 digest of the chunk's data, hex.
    pub digest: String,
    /// Compressed offset in the blob.
    #[serde(default)]
    pub offset: u64,
    /// Compressed size: the bytes this chunk costs over the network.
    #[serde(default)]
    pub size: u64,
    /// A file the chunk belongs to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// The chunk's offset in that file.
    #[serde(default)]
    pub file_offset: u64,
}

impl TraceChunk {
    /// Its digest, if it is 64 hex digits.
    pub fn digest_bytes(&self) -> Option<[u8; 32]> {
        parse_hex32(&self.digest)
    }
}

/// A start-up trace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trace {
    /// Format version ([`TRACE_VERSION`]).
    pub version: u32,
    /// The image it was recorded on.
    #[serde(default)]
    pub image: String,
    /// That image's manifest digest.
    #[serde(default)]
    pub manifest: String,
    /// That image's chunk size.
    #[serde(default)]
    pub chunk_size: u64,
    /// Bytes of that image's metadata blob.
    #[serde(default)]
    pub meta_bytes: u64,
    /// Chunks in the order they were first read.
    #[serde(default)]
    pub chunks: Vec<TraceChunk>,
    /// The metadata layer it was recorded on, for [`Trace::meta_chunks`].
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub meta_digest: String,
    /// Metadata chunks (64 KiB pieces of the metadata read on demand, format version 3)
    /// in the order first read; they apply to that metadata layer only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub meta_chunks: Vec<usize>,
    /// Files in the order they were first read.
    #[serde(default)]
    pub files: Vec<String>,
}

/// A trace that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// Not valid trace JSON.
    #[error("not a hoist trace: {0}")]
    Json(#[from] serde_json::Error),
    /// Too large, or a version this hoist does not know.
    #[error("{0}")]
    Invalid(String),
}

impl Trace {
    /// A trace of files only, from a list of paths (one per line; blank lines and `#`
    /// comments skipped).
    pub fn from_file_list(text: &str) -> Result<Trace, TraceError> {
        let files: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(normalize)
            .collect();
        if files.len() > MAX_TRACE_ENTRIES {
            return Err(TraceError::Invalid(format!(
                "{} files listed; at most {MAX_TRACE_ENTRIES}",
                files.len()
            )));
        }
        Ok(Trace {
            version: TRACE_VERSION,
            files,
            ..Trace::default()
        })
    }

    /// Parses and bounds-checks a trace.
    pub fn parse(bytes: &[u8]) -> Result<Trace, TraceError> {
        if bytes.len() as u64 > MAX_TRACE_SIZE {
            return Err(TraceError::Invalid(format!(
                "trace of {} bytes; at most {MAX_TRACE_SIZE}",
                bytes.len()
            )));
        }
        let t: Trace = serde_json::from_slice(bytes)?;
        if t.version != TRACE_VERSION {
            return Err(TraceError::Invalid(format!(
                "trace version {} (this hoist reads version {TRACE_VERSION})",
                t.version
            )));
        }
        if t.chunks.len() > MAX_TRACE_ENTRIES
            || t.files.len() > MAX_TRACE_ENTRIES
            || t.meta_chunks.len() > MAX_TRACE_ENTRIES
        {
            return Err(TraceError::Invalid(format!(
                "trace of {} chunks, {} files and {} metadata chunks; at most {MAX_TRACE_ENTRIES} each",
                t.chunks.len(),
                t.files.len(),
                t.meta_chunks.len()
            )));
        }
        Ok(t)
    }

    /// The trace as JSON.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a trace always serialises")
    }

    /// The metadata chunks to fetch early for `image`: those recorded, if the trace was
    /// recorded on this metadata layer, else none (another layer's chunks are other
    /// bytes).
    pub fn meta_chunks_for(&self, image: &HoistImage) -> &[usize] {
        match self.meta_digest == image.meta_digest.as_str() {
            true => &self.meta_chunks,
            false => &[],
        }
    }

    /// Points its chunk entries at their places in an image whose data blobs are
    /// `blobs` (in the image's order): each entry whose digest one of them holds gets
    /// that blob, index, offset and size, so that the trace resolves on that image by
    /// position (a conversion that stores the trace moves chunks: [`Trace`] entries of
    /// the image they were recorded on name other places). The others are left as
    /// they are. Returns how many were found.
    pub fn retarget(&mut self, blobs: &[hoist_format::meta::BlobInfo]) -> usize {
        let mut at: HashMap<[u8; 32], (usize, usize)> = HashMap::new();
        for (b, blob) in blobs.iter().enumerate() {
            for (i, e) in blob.chunks.entries.iter().enumerate() {
                at.entry(e.digest).or_insert((b, i));
            }
        }
        let mut found = 0;
        for c in &mut self.chunks {
            let Some(&(b, i)) = c.digest_bytes().and_then(|d| at.get(&d)) else {
                continue;
            };
            let e = &blobs[b].chunks.entries[i];
            (c.blob, c.index) = (b, i);
            (c.offset, c.size) = (e.compressed_offset, u64::from(e.compressed_size));
            found += 1;
        }
        found
    }

    /// Compressed bytes of its distinct chunks.
    pub fn chunk_bytes(&self) -> u64 {
        let mut seen = HashSet::new();
        self.chunks
            .iter()
            .filter(|c| seen.insert((c.blob, c.index)))
            .map(|c| c.size)
            .sum()
    }

    /// The chunks of `image` this trace names, in trace order, each once: the chunk
    /// entries first (by position, digest or file, [`Trace::resolve_chunks`]), then
    /// every chunk of each listed file ([`Trace::resolve_files`]). Chunks for which
    /// `used` is false (no file of the image uses them), and names the image lacks, are
    /// skipped. Fails only if metadata a lookup needed cannot be read.
    pub fn resolve(
        &self,
        image: &HoistImage,
        used: impl Fn((usize, usize)) -> bool,
    ) -> Result<Vec<(usize, usize)>, crate::ReadError> {
        let mut out = self.resolve_chunks(image, &used)?;
        let mut seen: HashSet<(usize, usize)> = out.iter().copied().collect();
        out.extend(
            self.resolve_files(image, &used)?
                .into_iter()
                .filter(|c| seen.insert(*c)),
        );
        Ok(out)
    }

    /// The chunk entries of the trace on `image`, in trace order, each once.
    ///
    /// A trace recorded on this image resolves by position alone: the digest index is
    /// built, and files looked up, only for entries that need them, so that a mount's
    /// trace fetching starts at once.
    pub fn resolve_chunks(
        &self,
        image: &HoistImage,
        used: impl Fn((usize, usize)) -> bool,
    ) -> Result<Vec<(usize, usize)>, crate::ReadError> {
        let mut by_digest: Option<HashMap<[u8; 32], (usize, usize)>> = None;
        let mut files: HashMap<String, Option<FileChunks>> = HashMap::new();
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for c in &self.chunks {
            let digest = parse_hex32(&c.digest);
            let at = image
                .meta
                .blobs
                .get(c.blob)
                .and_then(|b| b.chunks.entries.get(c.index));
            let mut found = match (digest, at) {
                (Some(d), Some(e)) if e.digest == d => Some((c.blob, c.index)),
                (Some(d), _) => by_digest
                    .get_or_insert_with(|| digest_index(image))
                    .get(&d)
                    .copied(),
                _ => None,
            };
            if found.is_none() {
                if let Some(path) = c.file.as_deref() {
                    let path = normalize(path);
                    let chunks = match files.get(&path) {
                        Some(chunks) => chunks,
                        None => {
                            let chunks = file_chunks(image, &path)?;
                            files.entry(path).or_insert(chunks)
                        }
                    };
                    let k = c.file_offset >> image.meta.chunk_bits;
                    found = chunks
                        .as_ref()
                        .and_then(|file| usize::try_from(k).ok().and_then(|k| file.get(k)))
                        .copied()
                        .flatten();
                }
            }
            if let Some(c) = found.filter(|c| used(*c)) {
                if seen.insert(c) {
                    out.push(c);
                }
            }
        }
        Ok(out)
    }

    /// Every chunk of the trace's listed files, file by file, each once (empty when it
    /// lists none). Each file is looked up (the directories on its path are read, which
    /// may fetch metadata read on demand): a mount does this after the trace's chunk
    /// entries are on their way. A recorded trace lists the files whose chunks it holds,
    /// and those read by passthrough, whose chunks it cannot see.
    pub fn resolve_files(
        &self,
        image: &HoistImage,
        used: impl Fn((usize, usize)) -> bool,
    ) -> Result<Vec<(usize, usize)>, crate::ReadError> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for f in &self.files {
            for c in file_chunks(image, &normalize(f))?
                .into_iter()
                .flatten()
                .flatten()
            {
                if used(c) && seen.insert(c) {
                    out.push(c);
                }
            }
        }
        Ok(out)
    }
}

/// Every chunk of `image` by digest.
fn digest_index(image: &HoistImage) -> HashMap<[u8; 32], (usize, usize)> {
    image
        .meta
        .blobs
        .iter()
        .enumerate()
        .flat_map(|(b, blob)| {
            blob.chunks
                .entries
                .iter()
                .enumerate()
                .map(move |(i, e)| (e.digest, (b, i)))
        })
        .collect()
}

/// Every regular file of an image with its chunks in file order, and the reverse map.
#[derive(Debug, Default)]
pub struct FileIndex {
    /// Path → (chunk position in the file, blob, chunk index) per chunk of data, holes
    /// left out.
    pub files: HashMap<String, Vec<(u64, usize, usize)>>,
    /// (blob, chunk index) → the first path using it and the chunk's offset in that file.
    pub owner: HashMap<(usize, usize), (String, u64)>,
    /// Chunks some file uses.
    pub used: HashSet<(usize, usize)>,
}

impl FileIndex {
    /// Indexes the files of `image`.
    pub fn build(image: &HoistImage) -> Result<FileIndex, crate::ReadError> {
        let mut index = FileIndex::default();
        let chunk_size = 1u64 << image.meta.chunk_bits;
        image
            .fs
            .walk(|path, inode: &Inode| {
                if !inode.is_file() {
                    return Ok(());
                }
                let path = String::from_utf8_lossy(path).into_owned();
                let mut chunks = Vec::new();
                for (k, c) in image.chunks(inode)?.into_iter().enumerate() {
                    if let Some(at) = image.resolve(c) {
                        let (blob, i) = (at.blob, at.index);
                        chunks.push((k as u64, blob, i));
                        index.used.insert((blob, i));
                        index
                            .owner
                            .entry((blob, i))
                            .or_insert_with(|| (path.clone(), k as u64 * chunk_size));
                    }
                }
                index.files.insert(path, chunks);
                Ok(())
            })
            .map_err(|source| crate::ReadError::Meta {
                digest: image.meta_digest.to_string(),
                source,
            })?;
        Ok(index)
    }
}

/// `/a/b` for `a/b`, `./a/b` or `/a//b`.
/// A file's chunks (blob, chunk index) by position in the file; `None` for a hole.
type FileChunks = Vec<Option<(usize, usize)>>;

/// The chunks of the regular file at `path` in `image`, by position in the file (`None`
/// for a hole); `None` when the image has no regular file there. Reads the directories
/// on the path only (a lookup, not a walk of the tree).
fn file_chunks(image: &HoistImage, path: &str) -> Result<Option<FileChunks>, crate::ReadError> {
    let meta = |source| crate::ReadError::Meta {
        digest: image.meta_digest.to_string(),
        source,
    };
    let Some(inode) = image.fs.lookup_path(path.as_bytes()).map_err(meta)? else {
        return Ok(None);
    };
    if !inode.is_file() {
        return Ok(None);
    }
    let chunks = image.chunks(&inode).map_err(meta)?;
    Ok(Some(
        chunks
            .into_iter()
            .map(|c| image.resolve(c).map(|at| (at.blob, at.index)))
            .collect(),
    ))
}

fn normalize(p: &str) -> String {
    let parts: Vec<&str> = p
        .split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .collect();
    format!("/{}", parts.join("/"))
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok().map(|()| out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retarget_points_the_chunks_it_finds_at_their_places_and_leaves_the_rest() {
        use hoist_format::chunk::{ChunkEntry, ChunkTable, Compressor};
        use hoist_format::meta::BlobInfo;
        let entry = |d: u8, c: u64| ChunkEntry {
            uncompressed_offset: c * 4096,
            compressed_offset: c * 100,
            uncompressed_size: 4096,
            compressed_size: 100,
            compressor: Compressor::Zstd,
            digest: [d; 32],
        };
        let blob = |entries: Vec<ChunkEntry>| BlobInfo {
            digest: [0; 32],
            compressed_size: 0,
            data_size: 0,
            uncompressed_size: 0,
            chunks: ChunkTable { entries },
        };
        let blobs = [
            blob(vec![entry(1, 0), entry(2, 1)]),
            blob(vec![entry(3, 0), entry(4, 1)]),
        ];
        let chunk = |d: &str| TraceChunk {
            blob: 7,
            index: 9,
            digest: d.to_string(),
            offset: 1,
            size: 2,
            file: None,
            file_offset: 0,
        };
        let mut t = Trace {
            version: TRACE_VERSION,
            chunks: vec![
                chunk(&"04".repeat(32)),
                chunk(&"05".repeat(32)),
                chunk("xyz"),
            ],
            ..Trace::default()
        };
        assert_eq!(t.retarget(&blobs), 1);
        let at: Vec<(usize, usize, u64, u64)> = t
            .chunks
            .iter()
            .map(|c| (c.blob, c.index, c.offset, c.size))
            .collect();
        assert_eq!(at, [(1, 1, 100, 100), (7, 9, 1, 2), (7, 9, 1, 2)]);
    }

    #[test]
    fn parse_round_trips_and_bounds() {
        let t = Trace {
            version: TRACE_VERSION,
            image: "oci:x:y".into(),
            chunks: vec![TraceChunk {
                blob: 1,
                index: 2,
                digest: "ab".repeat(32),
                offset: 7,
                size: 9,
                file: Some("/usr/bin/x".into()),
                file_offset: 0,
            }],
            files: vec!["/usr/bin/x".into()],
            ..Trace::default()
        };
        assert_eq!(Trace::parse(&t.to_json()).unwrap(), t);
        assert_eq!(t.chunk_bytes(), 9);
        assert!(Trace::parse(b"{\"version\":2}").is_err());
        assert!(Trace::parse(b"[1,2]").is_err());
        assert!(Trace::parse(b"").is_err());
    }

    #[test]
    fn file_lists_are_normalised() {
        let t = Trace::from_file_list("# comment\n usr/bin/python3 \n\n/app//main.py\n./etc/x\n")
            .unwrap();
        assert_eq!(t.files, ["/usr/bin/python3", "/app/main.py", "/etc/x"]);
        assert!(t.chunks.is_empty());
    }

    #[test]
    fn hex_digests_decode_strictly() {
        assert_eq!(parse_hex32(&"0f".repeat(32)), Some([0x0f; 32]));
        assert_eq!(parse_hex32(&"0f".repeat(31)), None);
        assert_eq!(parse_hex32(&"zz".repeat(32)), None);
    }
}
