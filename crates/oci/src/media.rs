//! Media types and annotation keys.

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// A hoist data blob: compressed chunks, chunk table, trailer. hoist's media types
/// start with `application/vnd.oci.image.layer.` so that containerd treats them as
/// layers: it hands them to the snapshotter instead of fetching them as other blobs.
pub const HOIST_BLOB: &str = "application/vnd.oci.image.layer.hoist.blob.v1";
/// The hoist metadata blob: EROFS image plus chunk tables.
pub const HOIST_META: &str = "application/vnd.oci.image.layer.hoist.meta.v1.erofs";
/// A hoist start-up trace: the chunks and files a workload reads first, in order (JSON).
pub const HOIST_TRACE: &str = "application/vnd.oci.image.layer.hoist.trace.v1+json";

/// The media types of images converted before hoist's types were layer types; read,
/// never written.
pub mod legacy {
    /// Data blob.
    pub const HOIST_BLOB: &str = "application/vnd.hoist.blob.v1";
    /// Metadata blob.
    pub const HOIST_META: &str = "application/vnd.hoist.meta.v1.erofs";
    /// Start-up trace.
    pub const HOIST_TRACE: &str = "application/vnd.hoist.trace.v1+json";
}

/// Whether `media_type` is a hoist data blob's.
pub fn is_hoist_blob(media_type: &str) -> bool {
    media_type == HOIST_BLOB || media_type == legacy::HOIST_BLOB
}

/// Whether `media_type` is a hoist metadata blob's.
pub fn is_hoist_meta(media_type: &str) -> bool {
    media_type == HOIST_META || media_type == legacy::HOIST_META
}

/// Whether `media_type` is a hoist start-up trace's.
pub fn is_hoist_trace(media_type: &str) -> bool {
    media_type == HOIST_TRACE || media_type == legacy::HOIST_TRACE
}

/// Layer annotation that tells hoist's containerd snapshotter a layer is hoist's, and
/// which part: `blob`, `meta` or `trace`. containerd passes a layer's annotations whose
/// keys start with `containerd.io/snapshot/` to the snapshotter as labels (it passes no
/// media type).
pub const ANNOTATION_SNAPSHOT_LAYER: &str = "containerd.io/snapshot/hoist.layer";

/// Tag name annotation of an OCI layout index entry.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Manifest annotation: digest of the manifest the image was converted from.
pub const ANNOTATION_SOURCE_MANIFEST: &str = "dev.hoist.source.manifest";
/// Manifest annotation: conversion options (`compressor=zstd,chunk-size=1048576`).
pub const ANNOTATION_OPTIONS: &str = "dev.hoist.convert.options";
/// Data blob annotation: size of the blob's uncompressed address space.
pub const ANNOTATION_UNCOMPRESSED_SIZE: &str = "dev.hoist.blob.uncompressed-size";
/// Data blob annotation: digest of the source layer whose chunks it stores.
pub const ANNOTATION_SOURCE_LAYER: &str = "dev.hoist.blob.source-layer";
/// Data blob annotation: number of chunks.
pub const ANNOTATION_CHUNKS: &str = "dev.hoist.blob.chunks";
/// Metadata blob annotation (format version 3): BLAKE3 of the blob's chunk table and
/// trailer (its last bytes), `blake3:<hex>`, so that ranges of the metadata can be
/// fetched and verified without reading the whole blob.
pub const ANNOTATION_META_TABLE: &str = "dev.hoist.meta.table";
/// Metadata blob annotation: format version.
pub const ANNOTATION_META_VERSION: &str = "dev.hoist.meta.version";
