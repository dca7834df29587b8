//! Where a [`crate::Fetcher`] gets the compressed bytes of chunks.
//!
//! The fetcher needs one thing of the world: ranged reads of data blobs. [`ChunkSource`]
//! is that, and nothing more, so that a registry, a peer on the node's network or a
//! test's fake can stand behind it. Its errors say what the fetcher should do next:
//! [`SourceError::Unavailable`] (no answer now: try again later or elsewhere) or
//! [`SourceError::Corrupt`] (an answer that is wrong: discard it, never serve it). The
//! bytes a source returns are never trusted: the fetcher verifies every chunk against
//! its digest, and a chunk that fails is fetched again on its own, so one bad chunk in
//! a range costs one chunk, not the range.

use hoist_oci::{Digest, ImageSource, OciError};
use std::io::Read;
use std::sync::Arc;

/// Ranged reads of data blobs.
pub trait ChunkSource: Send + Sync {
    /// Reads `len` bytes of blob `blob` from `offset`. Unverified: the caller verifies.
    fn read_range(&self, blob: &Digest, offset: u64, len: u64) -> Result<Vec<u8>, SourceError>;
    /// Streams the same bytes as they arrive, so that the first chunks of a long range
    /// are served before its last ones come. A stream that ends before `len` bytes is
    /// a corrupt answer; one that fails is an unavailable source. By default one
    /// [`ChunkSource::read_range`].
    fn open_range(
        &self,
        blob: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Box<dyn Read + Send + '_>, SourceError> {
        Ok(Box::new(std::io::Cursor::new(
            self.read_range(blob, offset, len)?,
        )))
    }
    /// What the source is, for messages (a registry and repository, a peer).
    fn describe(&self) -> String;
}

/// Why a source gave no usable answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SourceError {
    /// The source could not answer (network, refusal, timeout): try again later, or
    /// another source.
    #[error("{0}")]
    Unavailable(Arc<str>),
    /// The source answered with bytes that are wrong (short, or failing their digest):
    /// they are discarded.
    #[error("{0} (the source served damaged data)")]
    Corrupt(Arc<str>),
}

impl SourceError {
    /// The message, without the kind.
    pub fn why(&self) -> &Arc<str> {
        match self {
            SourceError::Unavailable(w) | SourceError::Corrupt(w) => w,
        }
    }
}

/// An image's blobs where the image lives: its registry or image layout.
pub struct ImageChunks(pub Arc<dyn ImageSource>);

impl ChunkSource for ImageChunks {
    fn read_range(&self, blob: &Digest, offset: u64, len: u64) -> Result<Vec<u8>, SourceError> {
        self.0
            .read_blob_range(blob, offset, len)
            .map_err(source_error)
    }

    fn open_range(
        &self,
        blob: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Box<dyn Read + Send + '_>, SourceError> {
        self.0
            .open_blob_range(blob, offset, len)
            .map_err(source_error)
    }

    fn describe(&self) -> String {
        self.0.describe()
    }
}

fn source_error(e: OciError) -> SourceError {
    match e {
        // The blob is there and answered, with other bytes than its descriptor's.
        OciError::DigestMismatch { .. } => SourceError::Corrupt(e.to_string().into()),
        e => SourceError::Unavailable(e.to_string().into()),
    }
}
