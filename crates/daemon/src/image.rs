//! Opening a mount's image: the registry options, the config and start-up trace read
//! beside the metadata blob, and what the serving modes derive from the image.

use crate::api::{DaemonError, MountSpec};
use hoist_cache::View;
use hoist_oci::{media, ImageSource, OciError, MAX_CONFIG_SIZE};
use hoist_reader::trace::{Trace, MAX_TRACE_SIZE};
use hoist_reader::HoistImage;
use hoist_registry::{Credentials, RegistryConfig, RegistryError};
use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

/// The kind of a failure to read the image: a reference or image that is wrong is the
/// caller's, a registry that fails or stalls is unavailable.
pub(crate) fn image_error(e: OciError) -> DaemonError {
    let msg = e.to_string();
    match e {
        OciError::BadReference { .. } | OciError::Invalid(_) | OciError::DigestMismatch { .. } => {
            DaemonError::InvalidArgument(msg)
        }
        OciError::NotFound(_) => DaemonError::NotFound(msg),
        OciError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            DaemonError::NotFound(msg)
        }
        OciError::Remote(r) => match r.downcast_ref::<RegistryError>() {
            Some(RegistryError::Status { status: 404, .. }) => DaemonError::NotFound(msg),
            Some(RegistryError::Unauthorized { .. } | RegistryError::Config(_)) => {
                DaemonError::InvalidArgument(msg)
            }
            _ => DaemonError::Unavailable(msg),
        },
        OciError::Io { .. } => DaemonError::Unavailable(msg),
    }
}

/// The kind of a failure to open a hoist image: the source's, else the image's own
/// (not a hoist image, or a damaged one).
pub(crate) fn read_error(e: hoist_reader::ReadError) -> DaemonError {
    match e {
        hoist_reader::ReadError::Oci(e) => image_error(e),
        e => DaemonError::InvalidArgument(e.to_string()),
    }
}

/// Builds the registry configuration of a mount: a stall, and the whole retry budget,
/// fit within the read timeout.
pub(crate) fn registry_config(spec: &MountSpec) -> Result<RegistryConfig, DaemonError> {
    let creds = spec
        .registry
        .creds
        .as_deref()
        .map(Credentials::parse)
        .transpose()
        .map_err(|e| DaemonError::InvalidArgument(format!("--creds: {e}")))?;
    let read_timeout = Duration::from_secs(spec.read_timeout_secs.max(1));
    Ok(RegistryConfig {
        plain_http: spec.registry.plain_http,
        creds,
        stall_timeout: Duration::from_secs(spec.registry.timeout_secs.max(1)).min(read_timeout),
        connect_timeout: Duration::from_secs(10).min(read_timeout),
        retries: spec.registry.retries,
        retry_budget: read_timeout,
        hosts_dir: spec.registry.hosts_dir.clone(),
        ..RegistryConfig::default()
    })
}

/// The result of a thread that read part of the image.
pub(crate) fn joined<T>(r: std::thread::Result<Result<T, DaemonError>>) -> Result<T, DaemonError> {
    r.unwrap_or_else(|_| {
        Err(DaemonError::Internal(
            "internal error reading the image (see the log)".into(),
        ))
    })
}

/// The image config, checked against its digest.
pub(crate) fn read_config(
    source: &dyn ImageSource,
    manifest: &serde_json::Value,
) -> Result<serde_json::Value, DaemonError> {
    let what = format!("config of {}", source.describe());
    let (digest, size, _) =
        hoist_oci::descriptor(&manifest["config"], &what).map_err(image_error)?;
    let bytes = source
        .read_blob(&digest, size, MAX_CONFIG_SIZE)
        .map_err(image_error)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| DaemonError::InvalidArgument(format!("config {digest}: {e}")))
}

/// The start-up trace the image carries, if any.
pub(crate) fn read_trace(
    source: &dyn ImageSource,
    manifest: &serde_json::Value,
) -> Result<Option<Trace>, DaemonError> {
    let layer = manifest["layers"].as_array().and_then(|ls| {
        ls.iter()
            .find(|l| l["mediaType"].as_str().is_some_and(media::is_hoist_trace))
    });
    let Some(layer) = layer else {
        return Ok(None);
    };
    let what = format!("start-up trace of {}", source.describe());
    let (digest, size, _) = hoist_oci::descriptor(layer, &what).map_err(image_error)?;
    let bytes = source
        .read_blob(&digest, size, MAX_TRACE_SIZE)
        .map_err(image_error)?;
    Trace::parse(&bytes).map(Some).map_err(|e| {
        DaemonError::InvalidArgument(format!(
            "start-up trace {digest} of {}: {e}",
            source.describe()
        ))
    })
}

/// The views of the image's files of more than one chunk, each once.
pub(crate) fn file_views(image: &HoistImage) -> Vec<View> {
    let mut views = Vec::new();
    let mut seen = HashSet::new();
    let walked = image.fs.walk(|_, inode| {
        if inode.is_file() && seen.insert(inode.nid) {
            let chunks = image.chunks(inode)?;
            if chunks.len() > 1 {
                views.extend(hoist_fs::file_view(image, inode.size, &chunks));
            }
        }
        Ok(())
    });
    if let Err(e) = walked {
        tracing::warn!("listing files for views: {e}");
    }
    views
}

/// The sizes of the image's blob devices: each blob's uncompressed address space,
/// whole blocks (a loop device ends at its last whole sector, and EROFS reads whole
/// blocks; hoist's converter writes whole blocks already).
pub(crate) fn device_sizes(image: &HoistImage) -> Vec<u64> {
    let block = hoist_format::erofs::ondisk::BLOCK_SIZE;
    image
        .meta
        .blobs
        .iter()
        .map(|b| {
            b.uncompressed_size
                .checked_next_multiple_of(block)
                .unwrap_or(b.uncompressed_size)
        })
        .collect()
}

/// The local file the kernel mounts as the image's metadata (erofs mode): the cached
/// metadata blob itself, or, for a blob stored as a chunked blob (format version 3), the
/// metadata this process decoded and verified from it. `None` while metadata read on
/// demand is not all local: the kernel then mounts hoist's `meta` device file. A file
/// left by an earlier mount is used, and spares every fetch, if each of its chunks
/// matches the digests the manifest pins.
pub(crate) fn kernel_meta(
    store: &hoist_cache::ChunkStore,
    image: &HoistImage,
) -> std::io::Result<Option<std::path::PathBuf>> {
    let hex = image.meta_digest.hex();
    if !image.meta_chunked {
        return Ok(Some(store.meta_path(hex)));
    }
    let path = store.meta_image_path(hex);
    if !image.meta_complete() {
        let found = std::fs::read(&path).is_ok_and(|whole| image.adopt_meta(&whole));
        return Ok(found.then_some(path));
    }
    let bytes = image.meta_all().map_err(std::io::Error::other)?;
    store.put_meta_image(hex, &bytes).map(Some)
}

/// The two files the metadata's loop device may read (erofs mode): hoist's device file
/// in `devdir`, and the local file it moves to.
pub(crate) fn meta_backings(
    store: &hoist_cache::ChunkStore,
    image: &HoistImage,
    devdir: &Path,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let hex = image.meta_digest.hex();
    let local = match image.meta_chunked {
        true => store.meta_image_path(hex),
        false => store.meta_path(hex),
    };
    (devdir.join(hoist_fs::META_FILE), local)
}

/// Decoded metadata chunks kept in the chunk cache, as data chunks are: a remount, or a
/// server taking a mount over, reads what was read before without the registry.
pub(crate) struct StoreMetaCache(pub std::sync::Arc<hoist_cache::ChunkStore>);

impl hoist_reader::lazy::MetaChunkCache for StoreMetaCache {
    fn get(&self, digest: &[u8; 32], size: u32) -> Option<Vec<u8>> {
        use std::io::Read;
        let mut f = self.0.open_chunk(digest, size).ok()??;
        let mut data = Vec::with_capacity(size as usize);
        f.read_to_end(&mut data).ok()?;
        Some(data)
    }
    fn put(&self, digest: &[u8; 32], data: &[u8]) {
        if let Err(e) = self.0.put_chunk(digest, data) {
            tracing::warn!("caching a metadata chunk: {e}");
        }
    }
}

/// An image's tree as the fetcher looks up the libraries a program loads and the
/// python modules a module imports.
pub(crate) struct ImageFiles(pub std::sync::Arc<HoistImage>);

impl ImageFiles {
    /// The regular file at `path` (symlinks followed) and its chunk references.
    fn file(&self, path: &str) -> Option<(u64, Vec<hoist_format::tree::ChunkRef>)> {
        let inode = self.0.fs.resolve_path(path.as_bytes()).ok()??;
        if !inode.is_file() {
            return None;
        }
        Some((inode.size, self.0.chunks(&inode).ok()?))
    }
}

impl hoist_cache::Files for ImageFiles {
    fn first_chunk(&self, path: &str) -> Option<(usize, usize)> {
        let (_, chunks) = self.file(path)?;
        let at = self.0.resolve(*chunks.first()?)?;
        Some((at.blob, at.index))
    }

    fn locate(&self, path: &str) -> Option<hoist_cache::Located> {
        let (size, chunks) = self.file(path)?;
        let [c] = chunks[..] else {
            return None;
        };
        let at = self.0.resolve(c)?;
        (at.available() >= size).then_some(hoist_cache::Located {
            blob: at.blob,
            index: at.index,
            skip: at.skip,
        })
    }

    fn list(&self, path: &str) -> Option<std::sync::Arc<[String]>> {
        let image = &self.0;
        let inode = image.fs.resolve_path(path.as_bytes()).ok()??;
        if !inode.is_dir() {
            return None;
        }
        let mut names: Vec<String> = image
            .fs
            .read_dir(&inode)
            .ok()?
            .into_iter()
            .filter(|e| e.name != b"." && e.name != b"..")
            .filter_map(|e| String::from_utf8(e.name).ok())
            .collect();
        names.sort_unstable();
        Some(names.into())
    }
}

/// A file-name-safe id of a mount point.
pub(crate) fn mount_id(mountpoint: &Path) -> String {
    let digest = hoist_oci::Digest::of(mountpoint.as_os_str().as_encoded_bytes());
    digest.hex()[..16].to_string()
}
