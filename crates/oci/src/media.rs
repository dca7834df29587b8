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

/// A hoist data blob: compressed chunks, chunk table, trailer.
pub const HOIST_BLOB: &str = "application/vnd.hoist.blob.v1";
/// The hoist metadata blob: EROFS image plus chunk tables.
pub const HOIST_META: &str = "application/vnd.hoist.meta.v1.erofs";
/// A hoist start-up trace: the chunks and files a workload reads first, in order (JSON).
pub const HOIST_TRACE: &str = "application/vnd.hoist.trace.v1+json";

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
/// Metadata blob annotation: format version.
pub const ANNOTATION_META_VERSION: &str = "dev.hoist.meta.version";
