//! Converts OCI images into hoist images.
//!
//! Layers are streamed once: decompressed (gzip, zstd or plain tar, detected from the
//! bytes), applied to one merged [`Tree`](hoist_format::tree::Tree) with OCI whiteout
//! semantics ([`apply`]), and their file contents cut into fixed-size chunks that are
//! deduplicated and compressed into one data blob per layer ([`chunker`]). The merged tree
//! then becomes the EROFS metadata blob, and a new manifest ties it all together
//! ([`convert`]).
//!
//! The main design choice: placement is decided in stream order on the reading thread
//! (so output is byte-for-byte deterministic), while compression runs on all cores.
//!
//! Given a start-up trace, each blob stores the chunks the trace reads first, in its
//! order ([`layout`]), so that fetching them takes a few long reads.
//!
//! Layers are downloaded ahead of the converter (`spool`), and the state after each layer
//! is cached ([`cache`]) so that converting an image whose lower layers were converted
//! before starts above them, with byte-identical output.

pub mod apply;
pub mod cache;
pub mod chunker;
pub mod convert;
pub mod dict;
mod layer;
pub mod layout;
mod spool;

pub use cache::ConvertCache;
pub use convert::{convert, ConvertOptions, ConvertReport, LayerReport};

use hoist_format::tree::ChunkRef;

/// Errors of a conversion; each names the object it concerns.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Reading or decoding a layer failed.
    #[error("layer {layer}: {what}: {source}")]
    Layer {
        /// Digest of the layer.
        layer: String,
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A tar entry is malformed or unsafe.
    #[error("layer {layer}: entry {path:?}: {why}")]
    Entry {
        /// Digest of the layer.
        layer: String,
        /// Path of the entry as written in the tar.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// A layer's uncompressed bytes do not hash to the config's `diff_id` for it.
    #[error(
        "layer {layer}: its uncompressed tar stream hashes to {actual}, but the config's \
         rootfs.diff_ids[{index}] is {expected}; the config does not describe this layer \
         (a corrupt or tampered image), so it is not converted"
    )]
    DiffId {
        /// Digest of the (compressed) layer blob.
        layer: String,
        /// Position of the layer in the manifest.
        index: usize,
        /// The config's `diff_id`.
        expected: String,
        /// The digest of the uncompressed stream.
        actual: String,
    },
    /// Reading or writing an image failed.
    #[error(transparent)]
    Oci(#[from] hoist_oci::OciError),
    /// The tree cannot be encoded, or a dictionary image is corrupt.
    #[error(transparent)]
    Format(#[from] hoist_format::FormatError),
    /// Writing a blob failed.
    #[error("writing a blob: {0}")]
    Write(#[source] std::io::Error),
    /// A blob laid out in a trace's order is spooled before it is written; the spool
    /// failed (the directory must be writable and have room for the layer's blob).
    #[error("spooling a blob in {dir}: {source}")]
    Spool {
        /// The spool directory.
        dir: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The source image or the options are not usable.
    #[error("{0}")]
    Invalid(String),
}

impl BuildError {
    fn layer(layer: &str, what: &str, source: std::io::Error) -> Self {
        BuildError::Layer {
            layer: layer.to_string(),
            what: what.to_string(),
            source,
        }
    }
    fn write(e: std::io::Error) -> Self {
        BuildError::Write(e)
    }
}

/// Receives file chunks in stream order and says where each one lives.
pub trait ChunkSink {
    /// Stores (or deduplicates) one chunk of file data.
    fn put(&mut self, data: Vec<u8>) -> Result<ChunkRef, BuildError>;

    /// The largest file (in bytes) that [`ChunkSink::put_small`] takes; 0 for none.
    fn small_file_limit(&self) -> u64 {
        0
    }

    /// Stores (or deduplicates) the whole content of a small file, which may share a
    /// compressed frame with the small files around it.
    fn put_small(&mut self, data: Vec<u8>) -> Result<ChunkRef, BuildError> {
        self.put(data)
    }
}
