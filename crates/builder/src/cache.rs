//! The conversion cache: what a conversion had built after each layer, so that converting
//! an image that shares its lower layers with one converted before resumes after them.
//!
//! The state after layer `k` depends on the options, the chunk dictionary and layers
//! `0..=k` (chunks are deduplicated against lower layers), so it is keyed by a hash of
//! exactly those: like the OCI ChainID, plus the options. A snapshot holds the merged tree,
//! the data blob written for each layer (digest, sizes, chunk table), the layer reports,
//! and where the blobs were pushed. Resuming needs those blobs in the destination: a blob
//! that is missing there is copied (or, on the same registry, mounted) from where it was
//! pushed; if it cannot be, a shorter prefix is tried.
//!
//! Files are written to a temporary name and renamed, and carry a BLAKE3 checksum of
//! their payload: a torn or damaged snapshot is ignored, never used. The directory is kept
//! under a size limit by removing the least recently used snapshots.

use crate::convert::LayerReport;
use crate::BuildError;
use hoist_format::chunk::ChunkTable;
use hoist_format::meta::BlobInfo;
use hoist_format::tree::Tree;
use hoist_oci::{Digest, ImageSink, ImageSource, OciError};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

const MAGIC: &[u8; 8] = b"HOISTSNP";
/// 2: layer reports carry the layer's `diff_id`.
/// 3: layer reports count the trace's chunks stored first; a layer laid out in a
/// trace's order keeps its blob in layer order too.
pub(crate) const VERSION: u32 = 3;

/// Opens an image reference (as recorded in a snapshot) for reading.
pub type Opener = Arc<dyn Fn(&str) -> Result<Box<dyn ImageSource>, OciError> + Send + Sync>;

/// A conversion cache directory.
#[derive(Clone)]
pub struct ConvertCache {
    /// The directory (created when first written).
    pub dir: PathBuf,
    /// Size above which least recently used snapshots are removed.
    pub max_bytes: u64,
    /// Opens the images a cached blob was pushed to, to copy it to a new destination.
    pub open: Option<Opener>,
}

impl std::fmt::Debug for ConvertCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConvertCache")
            .field("dir", &self.dir)
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

/// One data blob as a snapshot keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CachedBlob {
    pub digest: [u8; 32],
    pub compressed_size: u64,
    pub data_size: u64,
    pub uncompressed_size: u64,
    pub table: Vec<u8>,
    /// Image references the blob was pushed with.
    pub locations: Vec<String>,
}

impl CachedBlob {
    pub fn new(info: &BlobInfo, location: String) -> Self {
        CachedBlob {
            digest: info.digest,
            compressed_size: info.compressed_size,
            data_size: info.data_size,
            uncompressed_size: info.uncompressed_size,
            table: info.chunks.to_bytes(),
            locations: vec![location],
        }
    }

    pub fn info(&self) -> Result<BlobInfo, BuildError> {
        Ok(BlobInfo {
            digest: self.digest,
            compressed_size: self.compressed_size,
            data_size: self.data_size,
            uncompressed_size: self.uncompressed_size,
            chunks: ChunkTable::parse(&self.table, self.data_size, self.uncompressed_size)?,
        })
    }

    pub fn oci_digest(&self) -> Digest {
        Digest::from_sha256(self.digest)
    }
}

/// One converted layer in a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CachedLayer {
    pub report: LayerReport,
    pub blob: Option<CachedBlob>,
    /// For a blob laid out in a trace's order: the blob in layer order (never written;
    /// [`crate::chunker::FinishedBlob::unordered`]).
    pub unordered: Option<CachedBlob>,
}

/// The state of a conversion after some layers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Snapshot {
    pub version: u32,
    /// The key it is stored under, checked on load.
    pub key: String,
    pub layers: Vec<CachedLayer>,
    pub tree: Tree,
}

/// A snapshot being stored (borrowing the converter's state; encodes like [`Snapshot`]).
#[derive(Serialize)]
pub(crate) struct SnapshotRef<'a> {
    pub version: u32,
    pub key: String,
    pub layers: &'a [CachedLayer],
    pub tree: &'a Tree,
}

/// The key of the state after `layers` (the chain so far) under `options`.
pub(crate) fn chain_key(options: &str, layers: &[&Digest]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(format!("hoist-convert-snapshot-v{VERSION}\n{options}\n").as_bytes());
    for d in layers {
        h.update(d.as_str().as_bytes());
        h.update(b"\n");
    }
    h.finalize().to_hex().to_string()
}

impl ConvertCache {
    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.snap"))
    }

    /// The snapshot stored under `key`, if one is there and intact.
    pub(crate) fn load(&self, key: &str) -> Option<Snapshot> {
        let path = self.path(key);
        let bytes = fs::read(&path).ok()?;
        match decode(&bytes, key) {
            Ok(s) => {
                // Mark it recently used for eviction.
                let _ = fs::File::open(&path)
                    .and_then(|f| f.set_modified(std::time::SystemTime::now()));
                Some(s)
            }
            Err(why) => {
                tracing::warn!("ignoring conversion cache entry {}: {why}", path.display());
                None
            }
        }
    }

    /// Whether `dst` holds the blob, copying (or mounting) it from where it was pushed
    /// before if not.
    pub(crate) fn obtain(&self, blob: &CachedBlob, dst: &dyn ImageSink) -> bool {
        let digest = blob.oci_digest();
        if dst.has_blob(&digest) {
            return true;
        }
        let Some(open) = &self.open else {
            return false;
        };
        blob.locations.iter().any(|loc| {
            let copied =
                open(loc).and_then(|src| dst.copy_blob_from(&*src, &digest, blob.compressed_size));
            if let Err(e) = &copied {
                tracing::info!("blob {digest} not available from {loc}: {e}");
            }
            copied.is_ok()
        })
    }

    /// Stores a snapshot; failures are reported, not fatal (the cache is an optimisation).
    pub(crate) fn store(&self, snap: &SnapshotRef<'_>) {
        if let Err(e) = self.try_store(snap) {
            tracing::warn!(
                "not caching conversion state in {}: {e}",
                self.dir.display()
            );
        }
        self.evict();
    }

    fn try_store(&self, snap: &SnapshotRef<'_>) -> Result<(), Box<dyn std::error::Error>> {
        fs::create_dir_all(&self.dir)?;
        let payload = postcard::to_stdvec(snap)?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(&self.dir)?;
        tmp.write_all(MAGIC)?;
        tmp.write_all(blake3::hash(&payload).as_bytes())?;
        tmp.write_all(&payload)?;
        tmp.as_file().sync_all()?;
        tmp.persist(self.path(&snap.key))?;
        Ok(())
    }

    /// Removes least recently used snapshots until the directory is under its limit.
    fn evict(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
            .filter_map(|e| {
                let e = e.ok()?;
                let m = e.metadata().ok()?;
                let name = e.file_name();
                let name = name.to_str()?;
                (m.is_file() && name.ends_with(".snap")).then(|| {
                    (
                        m.modified().ok().unwrap_or(std::time::UNIX_EPOCH),
                        m.len(),
                        e.path(),
                    )
                })
            })
            .collect();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        files.sort();
        for (_, len, path) in files {
            if total <= self.max_bytes {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                total -= len;
            }
        }
    }
}

fn decode(bytes: &[u8], key: &str) -> Result<Snapshot, String> {
    if bytes.len() < 40 || &bytes[..8] != MAGIC {
        return Err("not a snapshot".into());
    }
    let payload = &bytes[40..];
    if blake3::hash(payload).as_bytes() != &bytes[8..40] {
        return Err("checksum mismatch".into());
    }
    let snap: Snapshot = postcard::from_bytes(payload).map_err(|e| e.to_string())?;
    if snap.version != VERSION || snap.key != key {
        return Err("written for another version or key".into());
    }
    Ok(snap)
}
