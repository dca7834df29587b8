//! OCI image access: where images come from and where converted images go.
//!
//! The builder and the reader never touch paths or sockets; they see an [`ImageSource`]
//! (manifest and blobs, streamed or by range) and an [`ImageSink`] (blobs written through
//! a [`BlobWriter`] that commits under its digest, then a manifest). An OCI image layout
//! ([`layout::LayoutImage`]) implements both here; the `hoist-registry` crate implements
//! them for registries and opens any [`ImageRef`].
//!
//! Every blob read in full is checked against its digest; streamed blobs are checked by
//! [`VerifyingReader`] when they end. Manifests and configs are bounded in size.

pub mod digest;
pub mod layout;
pub mod media;
pub mod reference;

pub use digest::{Digest, HashingReader, VerifyingReader};
pub use reference::ImageRef;

use serde_json::Value;
use std::io::{Read, Write};

/// Largest manifest or index accepted (to prevent denial of service).
pub const MAX_MANIFEST_SIZE: u64 = 4 << 20;
/// Largest image config accepted.
pub const MAX_CONFIG_SIZE: u64 = 16 << 20;

/// Errors of image access.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// Reading or writing a file of an image layout failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The image reference could not be parsed.
    #[error("invalid image reference {reference:?}: {why} (expected oci:DIR[:TAG] or docker://HOST[:PORT]/REPO[:TAG][@DIGEST])")]
    BadReference {
        /// The reference as given.
        reference: String,
        /// What is wrong with it.
        why: String,
    },
    /// No image of that tag.
    #[error("{0}")]
    NotFound(String),
    /// A blob's bytes do not match its digest or size.
    #[error("blob {digest} does not match its descriptor: {why}")]
    DigestMismatch {
        /// Expected digest.
        digest: String,
        /// Size or digest difference.
        why: String,
    },
    /// A manifest, index or config is malformed, too large or unsupported.
    #[error("{0}")]
    Invalid(String),
    /// A remote store (a registry) failed; the error names the object and the cause.
    #[error(transparent)]
    Remote(Box<dyn std::error::Error + Send + Sync>),
}

impl OciError {
    /// An I/O error on `path`.
    pub fn io(path: impl std::fmt::Display, source: std::io::Error) -> Self {
        OciError::Io {
            path: path.to_string(),
            source,
        }
    }
}

/// Read access to one image.
pub trait ImageSource: Send + Sync {
    /// The reference, for messages.
    fn describe(&self) -> String;
    /// `(registry, repository)` when the image lives in a registry; a sink on the same
    /// registry can then mount its blobs instead of copying them.
    fn registry_repository(&self) -> Option<(String, String)> {
        None
    }
    /// The image manifest (bytes as stored) and its digest.
    fn manifest(&self) -> Result<(Vec<u8>, Digest), OciError>;
    /// Streams a blob; the stream fails at its end if the bytes do not match `digest`
    /// and `size`.
    fn open_blob(&self, digest: &Digest, size: u64) -> Result<Box<dyn Read + Send>, OciError>;
    /// Reads `len` bytes of a blob from `offset`, unverified (callers verify chunks).
    fn read_blob_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Vec<u8>, OciError>;
    /// Streams `len` bytes of a blob from `offset`, unverified, as they arrive: a caller
    /// can use the first bytes of a large range before the last ones come. The stream
    /// ends after `len` bytes, or early if the source has no more (the caller checks).
    /// By default one [`ImageSource::read_blob_range`].
    fn open_blob_range(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Box<dyn Read + Send>, OciError> {
        Ok(Box::new(std::io::Cursor::new(
            self.read_blob_range(digest, offset, len)?,
        )))
    }

    /// The document the reference names, as stored: an image index or a manifest, with
    /// its digest and media type. [`ImageSource::manifest`] follows an index to this
    /// host's platform; this does not.
    fn top(&self) -> Result<(Vec<u8>, Digest, String), OciError> {
        let (bytes, digest) = self.manifest()?;
        Ok((bytes, digest, media::OCI_MANIFEST.to_string()))
    }
    /// A manifest of the image's index, by digest, checked against it.
    fn manifest_at(&self, digest: &Digest, size: u64) -> Result<Vec<u8>, OciError> {
        self.read_blob(digest, size, MAX_MANIFEST)
    }

    /// Reads a whole blob of at most `limit` bytes and checks its digest and size.
    fn read_blob(&self, digest: &Digest, size: u64, limit: u64) -> Result<Vec<u8>, OciError> {
        if size > limit {
            return Err(OciError::Invalid(format!(
                "blob {digest} is {size} bytes, more than the {limit} allowed"
            )));
        }
        let mut out = Vec::with_capacity(size as usize);
        self.open_blob(digest, size)?
            .read_to_end(&mut out)
            .map_err(|e| OciError::io(format!("blob {digest}"), e))?;
        Ok(out)
    }
}

/// A shared source is a source: one registry client can serve an image's reader and its
/// chunk fetcher.
impl<T: ImageSource + ?Sized> ImageSource for std::sync::Arc<T> {
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn registry_repository(&self) -> Option<(String, String)> {
        (**self).registry_repository()
    }
    fn manifest(&self) -> Result<(Vec<u8>, Digest), OciError> {
        (**self).manifest()
    }
    fn open_blob(&self, digest: &Digest, size: u64) -> Result<Box<dyn Read + Send>, OciError> {
        (**self).open_blob(digest, size)
    }
    fn read_blob_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Vec<u8>, OciError> {
        (**self).read_blob_range(digest, offset, len)
    }
    fn open_blob_range(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Box<dyn Read + Send>, OciError> {
        (**self).open_blob_range(digest, offset, len)
    }
    fn read_blob(&self, digest: &Digest, size: u64, limit: u64) -> Result<Vec<u8>, OciError> {
        (**self).read_blob(digest, size, limit)
    }
    fn top(&self) -> Result<(Vec<u8>, Digest, String), OciError> {
        (**self).top()
    }
    fn manifest_at(&self, digest: &Digest, size: u64) -> Result<Vec<u8>, OciError> {
        (**self).manifest_at(digest, size)
    }
}

/// The largest manifest or index read, in bytes.
pub const MAX_MANIFEST: u64 = 4 << 20;

/// One platform's image of a multi-platform source: its manifest pinned, everything
/// else read from the source.
pub struct Pinned<'a> {
    /// The source.
    pub inner: &'a dyn ImageSource,
    /// The manifest, as stored.
    pub manifest: Vec<u8>,
    /// Its digest.
    pub digest: Digest,
}

impl ImageSource for Pinned<'_> {
    fn describe(&self) -> String {
        format!("{}@{}", self.inner.describe(), self.digest)
    }
    fn registry_repository(&self) -> Option<(String, String)> {
        self.inner.registry_repository()
    }
    fn manifest(&self) -> Result<(Vec<u8>, Digest), OciError> {
        Ok((self.manifest.clone(), self.digest.clone()))
    }
    fn open_blob(&self, digest: &Digest, size: u64) -> Result<Box<dyn Read + Send>, OciError> {
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
    ) -> Result<Box<dyn Read + Send>, OciError> {
        self.inner.open_blob_range(digest, offset, len)
    }
    fn read_blob(&self, digest: &Digest, size: u64, limit: u64) -> Result<Vec<u8>, OciError> {
        self.inner.read_blob(digest, size, limit)
    }
}

/// A sink whose manifests are stored untagged: the manifests of an index being written,
/// tagged once as the index.
pub struct Untagged<'a>(pub &'a dyn ImageSink);

impl ImageSink for Untagged<'_> {
    fn describe(&self) -> String {
        self.0.describe()
    }
    fn blob_writer(&self) -> Result<Box<dyn BlobWriter>, OciError> {
        self.0.blob_writer()
    }
    fn has_blob(&self, digest: &Digest) -> bool {
        self.0.has_blob(digest)
    }
    fn copy_blob_from(
        &self,
        source: &dyn ImageSource,
        digest: &Digest,
        size: u64,
    ) -> Result<(), OciError> {
        self.0.copy_blob_from(source, digest, size)
    }
    fn put_manifest(&self, bytes: &[u8], media_type: &str) -> Result<Digest, OciError> {
        self.0.put_manifest_untagged(bytes, media_type)
    }
    fn put_manifest_untagged(&self, bytes: &[u8], media_type: &str) -> Result<Digest, OciError> {
        self.0.put_manifest_untagged(bytes, media_type)
    }
}

/// Write access to one image destination.
pub trait ImageSink: Send + Sync {
    /// The reference, for messages.
    fn describe(&self) -> String;
    /// A writer for a new blob, committed under its digest.
    fn blob_writer(&self) -> Result<Box<dyn BlobWriter>, OciError>;
    /// Whether the destination already holds a blob.
    fn has_blob(&self, digest: &Digest) -> bool;
    /// Copies a blob the destination lacks from `source`.
    fn copy_blob_from(
        &self,
        source: &dyn ImageSource,
        digest: &Digest,
        size: u64,
    ) -> Result<(), OciError> {
        if self.has_blob(digest) {
            return Ok(());
        }
        copy_blob(self, source, digest, size)
    }
    /// Stores the manifest and points the destination's tag at it. This is the commit
    /// point of a conversion: before it, the destination shows no new image.
    fn put_manifest(&self, bytes: &[u8], media_type: &str) -> Result<Digest, OciError>;
    /// Stores a manifest without pointing the tag at it (one an index will name).
    fn put_manifest_untagged(&self, bytes: &[u8], media_type: &str) -> Result<Digest, OciError>;
}

/// A blob being written. Dropping it without [`BlobWriter::commit`] discards it.
pub trait BlobWriter: Write + Send {
    /// Finishes the blob and stores it under its digest; returns digest and size.
    fn commit(self: Box<Self>) -> Result<(Digest, u64), OciError>;
}

/// The digest, size and media type of an OCI descriptor (a manifest's `config` or layer
/// entry, or an index entry); `what` names it in errors.
pub fn descriptor(v: &Value, what: &str) -> Result<(Digest, u64, String), OciError> {
    let digest = Digest::parse(v["digest"].as_str().unwrap_or_default())
        .map_err(|e| OciError::Invalid(format!("{what}: {e}")))?;
    let size = v["size"]
        .as_u64()
        .ok_or_else(|| OciError::Invalid(format!("{what}: descriptor without a size")))?;
    let media_type = v["mediaType"].as_str().unwrap_or_default().to_string();
    Ok((digest, size, media_type))
}

/// Whether a manifest document (with the media type of its descriptor) is an image
/// index or Docker manifest list rather than an image manifest.
pub fn is_index(doc: &Value, descriptor_media_type: &str) -> bool {
    let media_type = doc["mediaType"].as_str().unwrap_or(descriptor_media_type);
    media_type == media::OCI_INDEX
        || media_type == media::DOCKER_MANIFEST_LIST
        || (doc.get("manifests").is_some() && doc.get("layers").is_none())
}

/// The platform of this host in OCI terms: `(os, architecture, variant)`.
pub fn host_platform() -> (&'static str, &'static str, Option<&'static str>) {
    match std::env::consts::ARCH {
        "x86_64" => ("linux", "amd64", None),
        "aarch64" => ("linux", "arm64", Some("v8")),
        "arm" => ("linux", "arm", Some("v7")),
        other => ("linux", other, None),
    }
}

/// The descriptor of this host's manifest in an image index (`index_digest` names the
/// index in errors). A variant in the index must match the host's when both are known.
pub fn select_platform(index: &Value, index_digest: &Digest) -> Result<Value, OciError> {
    let (os, arch, variant) = host_platform();
    let manifests = index["manifests"]
        .as_array()
        .ok_or_else(|| OciError::Invalid(format!("index {index_digest} has no manifests")))?;
    let matches = |m: &&Value| {
        let p = &m["platform"];
        p["os"] == os
            && p["architecture"] == arch
            && match (p["variant"].as_str(), variant) {
                (Some(v), Some(h)) => v == h,
                _ => true,
            }
    };
    manifests.iter().find(matches).cloned().ok_or_else(|| {
        let offered: Vec<String> = manifests
            .iter()
            .map(|m| {
                let p = &m["platform"];
                format!(
                    "{}/{}",
                    p["os"].as_str().unwrap_or("?"),
                    p["architecture"].as_str().unwrap_or("?")
                )
            })
            .collect();
        OciError::NotFound(format!(
            "index {index_digest} has no manifest for {os}/{arch} (it offers {})",
            offered.join(", ")
        ))
    })
}

/// Copies the bytes of a blob from `source` into `dst` and checks what was stored.
pub fn copy_blob<S: ImageSink + ?Sized>(
    dst: &S,
    source: &dyn ImageSource,
    digest: &Digest,
    size: u64,
) -> Result<(), OciError> {
    let mut w = dst.blob_writer()?;
    let mut r = source.open_blob(digest, size)?;
    std::io::copy(&mut r, &mut w).map_err(|e| OciError::io(format!("copying blob {digest}"), e))?;
    let (got, _) = w.commit()?;
    if &got != digest {
        return Err(OciError::DigestMismatch {
            digest: digest.to_string(),
            why: format!("copied bytes hash to {got}"),
        });
    }
    Ok(())
}
