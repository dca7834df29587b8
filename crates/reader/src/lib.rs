//! Reads hoist images.
//!
//! [`HoistImage`] opens a converted image from any [`ImageSource`]: it fetches the
//! manifest and the metadata blob (checked against its digest), and from then on reads
//! any file by fetching, decoding and verifying just the chunks it needs, one ranged read
//! each. [`unpack`], [`check`] and [`inspect`] are built on it; the lazy mount of a later
//! issue uses the same chunk path behind a cache.

mod check;
mod inspect;
pub mod lazy;
pub mod output;
pub mod trace;
mod unpack;

pub use check::{check, CheckReport};
pub use inspect::{inspect, InspectReport};
pub use unpack::{unpack, UnpackStats};

use hoist_format::chunk::ChunkEntry;
use hoist_format::erofs::{Image, Inode};
use hoist_format::meta::{self, Meta};
use hoist_format::tree::ChunkRef;
use hoist_oci::{media, Digest, ImageSource};
use serde_json::Value;
use std::sync::Arc;

pub use hoist_format::meta::MAX_META_SIZE;

/// Errors reading a hoist image.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Access to the image failed.
    #[error(transparent)]
    Oci(#[from] hoist_oci::OciError),
    /// The metadata is corrupt.
    #[error("metadata blob {digest}: {source}")]
    Meta {
        /// Digest of the metadata blob.
        digest: String,
        /// What is wrong.
        #[source]
        source: hoist_format::FormatError,
    },
    /// A chunk fails to decode or verify.
    #[error(transparent)]
    Chunk(Box<ChunkError>),
    /// A file refers to data its image does not have.
    #[error("{path}: {why}")]
    File {
        /// Path in the image.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// A filesystem operation during unpack failed.
    #[error("{path}: {source}")]
    Io {
        /// Path written.
        path: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// Setting an extended attribute during unpack failed.
    #[error("{path}: setting xattr {name}: {source}; {hint}")]
    Xattr {
        /// Path written.
        path: String,
        /// The xattr's full name.
        name: String,
        /// What to do about it.
        hint: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The image is not a hoist image or is unusable.
    #[error("{0}")]
    Invalid(String),
}

/// A chunk that fails to decode or verify, with where it is and who uses it.
#[derive(Debug, thiserror::Error)]
#[error("chunk {index} of blob {blob} (compressed bytes {start}..{end}){used_by}: {source}")]
pub struct ChunkError {
    /// Blob digest.
    pub blob: String,
    /// Index in the blob's chunk table.
    pub index: usize,
    /// Compressed range start.
    pub start: u64,
    /// Compressed range end.
    pub end: u64,
    /// `, used by /path` when known.
    pub used_by: String,
    /// Decode or digest failure.
    #[source]
    pub source: hoist_codec::CodecError,
}

/// A layer of the manifest.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Layer {
    /// Media type.
    pub media_type: String,
    /// Digest.
    pub digest: String,
    /// Size.
    pub size: u64,
    /// Annotations.
    pub annotations: serde_json::Map<String, Value>,
}

/// An opened hoist image.
pub struct HoistImage {
    src: Box<dyn ImageSource>,
    /// Manifest digest.
    pub manifest_digest: Digest,
    /// The manifest.
    pub manifest: Value,
    /// Manifest layers.
    pub layers: Vec<Layer>,
    /// Digest of the metadata blob.
    pub meta_digest: Digest,
    /// The hoist tables of the metadata blob.
    pub meta: Meta,
    /// The EROFS tree.
    pub fs: Image<MetaReader>,
    /// The metadata itself (hoist header, EROFS image, tables): the metadata blob, what
    /// it decodes to when it is stored as a chunked blob (format version 3), or its
    /// chunks fetched on demand ([`HoistImage::open_lazy`]).
    pub meta_reader: MetaReader,
    /// Whether the metadata blob is stored as a chunked blob (its bytes are not the
    /// metadata itself).
    pub meta_chunked: bool,
    lazy: Option<Arc<lazy::ChunkedMeta>>,
    blob_digests: Vec<Digest>,
}

/// Where [`HoistImage::open_lazy`] reads metadata from, and from what size.
struct LazyFrom {
    meta_src: Arc<dyn ImageSource>,
    cache: Option<Arc<dyn lazy::MetaChunkCache>>,
    whole_max: u64,
}

/// Positioned reads of an image's metadata.
pub type MetaReader = Arc<dyn hoist_format::ReadAt + Send + Sync>;

impl HoistImage {
    /// Opens the hoist image of `src`: reads its manifest and its whole metadata blob.
    pub fn open(src: Box<dyn ImageSource>) -> Result<Self, ReadError> {
        Self::open_with(src, None)
    }

    /// Opens the hoist image of `src`, reading a metadata layer of more than
    /// `whole_max` bytes on demand where the image allows it (format version 3; other
    /// images, and smaller layers, which cost less than a few round trips, are read
    /// whole): through `meta_src` (the same image source), keeping decoded chunks in
    /// `cache`.
    pub fn open_lazy(
        src: Box<dyn ImageSource>,
        meta_src: Arc<dyn ImageSource>,
        cache: Option<Arc<dyn lazy::MetaChunkCache>>,
        whole_max: u64,
    ) -> Result<Self, ReadError> {
        Self::open_with(
            src,
            Some(LazyFrom {
                meta_src,
                cache,
                whole_max,
            }),
        )
    }

    fn open_with(
        src: Box<dyn ImageSource>,
        lazy_from: Option<LazyFrom>,
    ) -> Result<Self, ReadError> {
        let (bytes, manifest_digest) = src.manifest()?;
        let manifest: Value = serde_json::from_slice(&bytes)
            .map_err(|e| ReadError::Invalid(format!("manifest {manifest_digest}: {e}")))?;
        let layers: Vec<Layer> = manifest["layers"]
            .as_array()
            .map(|ls| {
                ls.iter()
                    .map(|l| Layer {
                        media_type: l["mediaType"].as_str().unwrap_or_default().to_string(),
                        digest: l["digest"].as_str().unwrap_or_default().to_string(),
                        size: l["size"].as_u64().unwrap_or(0),
                        annotations: l["annotations"].as_object().cloned().unwrap_or_default(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let meta_layer = layers
            .iter()
            .find(|l| media::is_hoist_meta(&l.media_type))
            .ok_or_else(|| {
                ReadError::Invalid(format!(
                    "{} is not a hoist image (no {} layer); convert it with `hoist convert`",
                    src.describe(),
                    media::HOIST_META
                ))
            })?;
        let meta_digest = Digest::parse(&meta_layer.digest)?;
        let meta_err = |source| ReadError::Meta {
            digest: meta_digest.to_string(),
            source,
        };
        let chunked = match lazy_from {
            Some(LazyFrom {
                meta_src,
                cache,
                whole_max,
            }) if meta_layer.size > whole_max => lazy::ChunkedMeta::open(
                meta_src,
                &meta_digest,
                meta_layer.size,
                &meta_layer.annotations,
                cache,
            )?
            .map(Arc::new),
            _ => None,
        };
        let (meta_reader, meta_chunked, lazy): (MetaReader, bool, _) = match chunked {
            Some(c) => (c.clone(), true, Some(c)),
            None => {
                let blob = src.read_blob(&meta_digest, meta_layer.size, MAX_META_SIZE)?;
                // Version 3 stores the metadata as a chunked blob; earlier versions as is.
                let chunked = !blob.starts_with(&meta::META_MAGIC);
                let blob = hoist_codec::metadata_of(blob, MAX_META_SIZE).map_err(|e| {
                    meta_err(hoist_format::FormatError::Corrupt(format!(
                        "neither metadata nor a chunked blob of it: {e}"
                    )))
                })?;
                (Arc::new(blob), chunked, None)
            }
        };
        let meta = meta::parse_at(meta_reader.as_ref()).map_err(meta_err)?;
        let fs = Image::open(meta_reader.clone()).map_err(meta_err)?;
        if fs.devices().len() != meta.blobs.len() {
            return Err(meta_err(hoist_format::FormatError::Corrupt(format!(
                "{} EROFS devices but {} blob records",
                fs.devices().len(),
                meta.blobs.len()
            ))));
        }
        let mut blob_digests = Vec::new();
        for (i, b) in meta.blobs.iter().enumerate() {
            let d = Digest::from_sha256(b.digest);
            if fs.devices()[i].tag != d.hex().as_bytes() {
                return Err(meta_err(hoist_format::FormatError::Corrupt(format!(
                    "device {} tag does not name blob {d}",
                    i + 1
                ))));
            }
            if !layers
                .iter()
                .any(|l| l.digest == d.as_str() && l.size == b.compressed_size)
            {
                return Err(ReadError::Invalid(format!(
                    "blob {d} of the metadata is not a layer of manifest {manifest_digest}"
                )));
            }
            blob_digests.push(d);
        }
        Ok(HoistImage {
            src,
            manifest_digest,
            manifest,
            layers,
            meta_digest,
            meta,
            fs,
            meta_reader,
            meta_chunked,
            lazy,
            blob_digests,
        })
    }

    /// All of the metadata (hoist header, EROFS image, tables), fetching what a lazy
    /// open has not read yet.
    pub fn meta_all(&self) -> Result<Vec<u8>, ReadError> {
        let io = |source| ReadError::Io {
            path: format!("metadata {}", self.meta_digest),
            source,
        };
        let len = self.meta_reader.size().map_err(io)?;
        let mut out = vec![0u8; len as usize];
        self.meta_reader.read_exact_at(&mut out, 0).map_err(io)?;
        Ok(out)
    }

    /// Whether all of the metadata is in memory: always, unless it is read on demand
    /// and some chunks were never read.
    pub fn meta_complete(&self) -> bool {
        self.lazy.as_ref().is_none_or(|l| l.complete())
    }

    /// For metadata read on demand: takes `whole` (all of the metadata, from a local
    /// file) if it matches the pinned digests chunk by chunk, and returns whether the
    /// metadata is all in memory now.
    pub fn adopt_meta(&self, whole: &[u8]) -> bool {
        self.lazy.as_ref().is_none_or(|l| l.adopt(whole))
    }

    /// For metadata read on demand: starts noting which of its chunks reads touch (for
    /// a start-up trace).
    pub fn start_recording_meta(&self) {
        if let Some(l) = &self.lazy {
            l.start_recording();
        }
    }

    /// The metadata chunks reads touched since [`HoistImage::start_recording_meta`], in
    /// the order first touched (empty unless the metadata is read on demand).
    pub fn recorded_meta(&self) -> Vec<usize> {
        self.lazy.as_ref().map_or_else(Vec::new, |l| l.recorded())
    }

    /// For metadata read on demand: fetches the chunks of `chunks` (a start-up trace's)
    /// not read yet, a few ranged reads at once; returns how many were missing.
    pub fn prefetch_meta(&self, chunks: &[usize]) -> Result<usize, ReadError> {
        let Some(l) = &self.lazy else { return Ok(0) };
        l.prefetch(chunks).map_err(|source| ReadError::Io {
            path: format!("metadata {}", self.meta_digest),
            source,
        })
    }

    /// For metadata read on demand: compressed bytes fetched so far and requests sent.
    pub fn meta_fetched(&self) -> Option<(u64, u64)> {
        self.lazy.as_ref().map(|l| l.fetched())
    }

    /// Downloads every data blob whole (in parallel, verified against its digest) into
    /// unlinked temporary files in `dir`, from which chunks are read from then on. For
    /// reading most of an image from a remote source (unpack), where one ranged request
    /// per chunk would cost a round trip each.
    pub fn fetch_blobs(&mut self, dir: &std::path::Path) -> Result<(), ReadError> {
        let io_err = |source| ReadError::Io {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io_err)?;
        let wanted: Vec<(Digest, u64)> = self
            .blob_digests
            .iter()
            .zip(&self.meta.blobs)
            .map(|(d, b)| (d.clone(), b.compressed_size))
            .collect();
        let src = self.src.as_ref();
        // At most 4 downloads at once; after a failure the others stop taking work.
        let queue = std::sync::Mutex::new(wanted.iter());
        let failed = std::sync::atomic::AtomicBool::new(false);
        let results = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|scope| {
            for _ in 0..wanted.len().clamp(1, 4) {
                scope.spawn(|| loop {
                    if failed.load(std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                    let next = queue.lock().unwrap_or_else(|e| e.into_inner()).next();
                    let Some((digest, size)) = next else { return };
                    let one = (|| -> Result<std::fs::File, ReadError> {
                        let mut file = tempfile::tempfile_in(dir).map_err(io_err)?;
                        let mut r = src.open_blob(digest, *size)?;
                        std::io::copy(&mut r, &mut file).map_err(|e| ReadError::Io {
                            path: format!("blob {digest} of {}", src.describe()),
                            source: e,
                        })?;
                        Ok(file)
                    })();
                    if one.is_err() {
                        failed.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    results
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((digest.clone(), one));
                });
            }
        });
        let mut files = std::collections::HashMap::new();
        for (digest, r) in results.into_inner().unwrap_or_else(|e| e.into_inner()) {
            files.insert(digest, r?);
        }
        if files.len() != wanted.len() {
            return Err(ReadError::Invalid("a blob download thread stopped".into()));
        }
        let inner = std::mem::replace(&mut self.src, Box::new(Detached));
        self.src = Box::new(LocalBlobs { inner, files });
        Ok(())
    }

    /// The image source.
    pub fn source(&self) -> &dyn ImageSource {
        self.src.as_ref()
    }

    /// Digest of the blob behind device id `device` (1-based).
    pub fn blob_digest(&self, device: u16) -> Option<&Digest> {
        self.blob_digests.get(usize::from(device).checked_sub(1)?)
    }

    /// Resolves a chunk reference to the stored chunk that holds its bytes.
    pub fn resolve(&self, c: ChunkRef) -> Option<ChunkAt<'_>> {
        let ChunkRef::Mapped { device, blkaddr } = c else {
            return None;
        };
        let blob = usize::from(device).checked_sub(1)?;
        let table = &self.meta.blobs.get(blob)?.chunks;
        let offset = u64::from(blkaddr) * hoist_format::erofs::ondisk::BLOCK_SIZE;
        let index = if self.meta.version < 2 {
            // Version 1 refers to chunks by their start only.
            table.position(offset)?
        } else {
            table.containing(offset)?
        };
        let entry = &table.entries[index];
        Some(ChunkAt {
            blob,
            index,
            entry,
            skip: offset - entry.uncompressed_offset,
        })
    }

    /// Fetches, decodes and verifies one chunk.
    pub fn read_chunk(&self, blob: usize, index: usize) -> Result<Vec<u8>, ReadError> {
        let e = &self.meta.blobs[blob].chunks.entries[index];
        let digest = &self.blob_digests[blob];
        let stored =
            self.src
                .read_blob_range(digest, e.compressed_offset, u64::from(e.compressed_size))?;
        hoist_codec::decode_verified(e, &stored).map_err(|source| {
            ReadError::Chunk(Box::new(ChunkError {
                blob: digest.to_string(),
                index,
                start: e.compressed_offset,
                end: e.compressed_offset + u64::from(e.compressed_size),
                used_by: String::new(),
                source,
            }))
        })
    }

    /// Which chunks of each blob a file of the tree uses (`[blob][index]`). A blob can
    /// hold chunks no file reaches (files an upper layer removed); nothing needs them.
    /// Read from the metadata where the conversion stored it (version 3), else found by
    /// walking the tree.
    pub fn referenced_chunks(&self) -> Result<Vec<Vec<bool>>, ReadError> {
        match &self.meta.used {
            Some(used) => Ok(used.clone()),
            None => self.walk_referenced_chunks(),
        }
    }

    /// [`HoistImage::referenced_chunks`] found by walking the whole tree.
    pub fn walk_referenced_chunks(&self) -> Result<Vec<Vec<bool>>, ReadError> {
        let mut used: Vec<Vec<bool>> = self
            .meta
            .blobs
            .iter()
            .map(|b| vec![false; b.chunks.entries.len()])
            .collect();
        let mut seen = std::collections::HashSet::new();
        self.fs
            .walk(|_, inode| {
                if inode.is_file() && seen.insert(inode.nid) {
                    for c in self.chunks(inode)? {
                        if let Some(at) = self.resolve(c) {
                            used[at.blob][at.index] = true;
                        }
                    }
                }
                Ok(())
            })
            .map_err(|source| ReadError::Meta {
                digest: self.meta_digest.to_string(),
                source,
            })?;
        Ok(used)
    }

    /// The chunk references of a regular file, checked to use the image's chunk size.
    pub fn chunks(&self, inode: &Inode) -> Result<Vec<ChunkRef>, hoist_format::FormatError> {
        if inode.size > 0 && self.fs.chunk_bits(inode)? != self.meta.chunk_bits {
            return Err(hoist_format::FormatError::Corrupt(format!(
                "inode {} uses a chunk size other than the image's 2^{}",
                inode.nid, self.meta.chunk_bits
            )));
        }
        self.fs.chunks(inode)
    }

    /// Calls `f(offset, bytes)` for each data chunk of a regular file, in order, with
    /// verified bytes; holes are skipped (the caller sees a gap).
    pub fn read_file(
        &self,
        path: &str,
        inode: &Inode,
        mut f: impl FnMut(u64, &[u8]) -> Result<(), ReadError>,
    ) -> Result<(), ReadError> {
        let file_err = |why: String| ReadError::File {
            path: path.to_string(),
            why,
        };
        let chunks = self.chunks(inode).map_err(|e| file_err(e.to_string()))?;
        let chunk_size = 1u64 << self.meta.chunk_bits;
        for (i, c) in chunks.into_iter().enumerate() {
            if c == ChunkRef::Hole {
                continue;
            }
            let at = self
                .resolve(c)
                .ok_or_else(|| file_err(format!("chunk {i} points at no stored chunk ({c:?})")))?;
            let offset = i as u64 * chunk_size;
            let want = (inode.size - offset).min(chunk_size);
            if at.available() < want {
                return Err(file_err(format!(
                    "chunk {i} has {} bytes from where it points, the file needs {want}",
                    at.available()
                )));
            }
            let data = self.read_chunk(at.blob, at.index).map_err(|e| match e {
                ReadError::Chunk(mut c) => {
                    c.used_by = format!(", used by {path}");
                    ReadError::Chunk(c)
                }
                other => other,
            })?;
            let skip = at.skip as usize;
            f(offset, &data[skip..skip + want as usize])?;
        }
        Ok(())
    }
}

/// Where the bytes of one chunk reference are: a stored chunk, and how far into it.
#[derive(Debug, Clone, Copy)]
pub struct ChunkAt<'a> {
    /// Blob index (0-based device order).
    pub blob: usize,
    /// Index of the chunk in the blob's chunk table.
    pub index: usize,
    /// The chunk's table entry.
    pub entry: &'a ChunkEntry,
    /// Offset of the referenced bytes in the decoded chunk: 0, or for a small file in a
    /// frame (format version 2) its place in the frame.
    pub skip: u64,
}

impl ChunkAt<'_> {
    /// Decoded bytes of the chunk from the referenced offset to its end.
    pub fn available(&self) -> u64 {
        u64::from(self.entry.uncompressed_size) - self.skip
    }
}

/// An image source whose data blobs were downloaded to local files.
struct LocalBlobs {
    inner: Box<dyn ImageSource>,
    files: std::collections::HashMap<Digest, std::fs::File>,
}

impl ImageSource for LocalBlobs {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn manifest(&self) -> Result<(Vec<u8>, Digest), hoist_oci::OciError> {
        self.inner.manifest()
    }
    fn open_blob(
        &self,
        digest: &Digest,
        size: u64,
    ) -> Result<Box<dyn std::io::Read + Send>, hoist_oci::OciError> {
        self.inner.open_blob(digest, size)
    }
    fn read_blob_range(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, hoist_oci::OciError> {
        let Some(file) = self.files.get(digest) else {
            return self.inner.read_blob_range(digest, offset, len);
        };
        let mut buf = vec![
            0u8;
            usize::try_from(len).map_err(|_| {
                hoist_oci::OciError::Invalid(format!("range of blob {digest} too large"))
            })?
        ];
        std::os::unix::fs::FileExt::read_exact_at(file, &mut buf, offset).map_err(|e| {
            hoist_oci::OciError::io(format!("downloaded blob {digest} at {offset}"), e)
        })?;
        Ok(buf)
    }
    fn open_blob_range(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Box<dyn std::io::Read + Send>, hoist_oci::OciError> {
        if !self.files.contains_key(digest) {
            return self.inner.open_blob_range(digest, offset, len);
        }
        Ok(Box::new(std::io::Cursor::new(
            self.read_blob_range(digest, offset, len)?,
        )))
    }
}

/// Placeholder while the source is being swapped; never read.
struct Detached;

impl ImageSource for Detached {
    fn describe(&self) -> String {
        "(detached)".into()
    }
    fn manifest(&self) -> Result<(Vec<u8>, Digest), hoist_oci::OciError> {
        Err(hoist_oci::OciError::Invalid("detached source".into()))
    }
    fn open_blob(
        &self,
        _: &Digest,
        _: u64,
    ) -> Result<Box<dyn std::io::Read + Send>, hoist_oci::OciError> {
        Err(hoist_oci::OciError::Invalid("detached source".into()))
    }
    fn read_blob_range(&self, _: &Digest, _: u64, _: u64) -> Result<Vec<u8>, hoist_oci::OciError> {
        Err(hoist_oci::OciError::Invalid("detached source".into()))
    }
}
