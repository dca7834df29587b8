//! Metadata blobs kept in the cache, so a mount after a restart reads no blob remotely.

use crate::store::ChunkStore;
use hoist_oci::{Digest, ImageSource, OciError};
use std::sync::Arc;

/// An image source whose whole-blob reads (the metadata blob, the only blob a reader
/// reads whole) are served from and kept in the chunk store's `meta/` directory.
/// The manifest is kept in memory after the first read: a mount reads it more than once
/// (the image, then its config and trace), and each read would cost a round trip.
pub struct MetaCachingSource {
    inner: Box<dyn ImageSource>,
    store: Arc<ChunkStore>,
    manifest: std::sync::OnceLock<(Vec<u8>, Digest)>,
}

impl MetaCachingSource {
    /// Wraps `inner`.
    pub fn new(inner: Box<dyn ImageSource>, store: Arc<ChunkStore>) -> Self {
        MetaCachingSource {
            inner,
            store,
            manifest: std::sync::OnceLock::new(),
        }
    }
}

impl MetaCachingSource {
    /// Serves `bytes` as the manifest, without asking the source, once they are checked
    /// against `digest` (the manifest a previous server of the mount read: a takeover
    /// then needs no registry).
    pub fn pin_manifest(&self, bytes: Vec<u8>, digest: Digest) -> Result<(), OciError> {
        let got = Digest::of(&bytes);
        if got != digest {
            return Err(OciError::DigestMismatch {
                digest: digest.to_string(),
                why: format!("the manifest kept for it hashes to {got}"),
            });
        }
        let _ = self.manifest.set((bytes, digest));
        Ok(())
    }
}

impl ImageSource for MetaCachingSource {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn registry_repository(&self) -> Option<(String, String)> {
        self.inner.registry_repository()
    }
    fn manifest(&self) -> Result<(Vec<u8>, Digest), OciError> {
        if let Some(m) = self.manifest.get() {
            return Ok(m.clone());
        }
        let m = self.inner.manifest()?;
        Ok(self.manifest.get_or_init(|| m).clone())
    }
    fn open_blob(
        &self,
        digest: &Digest,
        size: u64,
    ) -> Result<Box<dyn std::io::Read + Send>, OciError> {
        self.inner.open_blob(digest, size)
    }
    fn read_blob_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Vec<u8>, OciError> {
        self.inner.read_blob_range(digest, offset, len)
    }
    fn open_blob_range(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Box<dyn std::io::Read + Send>, OciError> {
        self.inner.open_blob_range(digest, offset, len)
    }
    fn read_blob(&self, digest: &Digest, size: u64, limit: u64) -> Result<Vec<u8>, OciError> {
        let cached = self
            .store
            .get_meta(digest.hex())
            .map_err(|e| OciError::io(self.store.meta_path(digest.hex()).display(), e))?;
        if let Some(data) = cached.filter(|d| d.len() as u64 == size) {
            return Ok(data);
        }
        let data = self.inner.read_blob(digest, size, limit)?;
        self.store
            .put_meta(digest.hex(), &data)
            .map_err(|e| OciError::io(self.store.meta_path(digest.hex()).display(), e))?;
        Ok(data)
    }
}
