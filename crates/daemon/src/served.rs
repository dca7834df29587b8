//! A live mount: the image, its fetcher, the FUSE sessions and the kernel mount.

use crate::api::{Mode, MountSpec, Prefetch};
use hoist_cache::prefetch::{self, PrefetchState, Progress};
use hoist_cache::{BlobChunks, ChunkStore, FetchConfig, Fetcher, Inflight, MetaCachingSource};
use hoist_fs::{kernel, BlobDevFs, FsCounters, TreeFs};
use hoist_oci::{ImageRef, ImageSource};
use hoist_reader::HoistImage;
use hoist_registry::{Credentials, RegistryConfig};
use serde::Serialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The layout of hoist's state root.
#[derive(Debug, Clone)]
pub struct Home {
    /// The root.
    pub root: PathBuf,
}

impl Home {
    /// `$HOIST_HOME`, else `/var/lib/hoist`.
    pub fn from_env() -> Home {
        let root = std::env::var_os("HOIST_HOME")
            .filter(|h| !h.is_empty())
            .map_or_else(|| PathBuf::from("/var/lib/hoist"), PathBuf::from);
        Home { root }
    }
    /// The API socket.
    pub fn socket(&self) -> PathBuf {
        self.root.join("daemon.sock")
    }
    /// The default chunk cache.
    pub fn cache(&self) -> PathBuf {
        self.root.join("cache")
    }
    /// Mount records.
    pub fn mounts(&self) -> PathBuf {
        self.root.join("mounts")
    }
    /// Private mount points.
    pub fn run(&self) -> PathBuf {
        self.root.join("run")
    }
    /// The daemon log.
    pub fn log(&self) -> PathBuf {
        self.root.join("daemon.log")
    }
}

/// What `hoist stat` shows of a mount.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    /// Mount point.
    pub mountpoint: PathBuf,
    /// Image reference.
    pub image: String,
    /// Manifest digest.
    pub manifest: String,
    /// Serving mode.
    pub mode: Mode,
    /// `ready`, or `gone` when the kernel mount went away without hoist.
    pub state: String,
    /// Seconds from the request to a usable mount.
    pub mount_secs: f64,
    /// Bytes of the metadata blob (read whole at mount).
    pub meta_bytes: u64,
    /// Compressed bytes of all data blobs.
    pub blob_bytes: u64,
    /// Chunks the image's files use.
    pub chunks_total: u64,
    /// Chunks in the local cache.
    pub chunks_cached: u64,
    /// Uncompressed bytes of all chunks.
    pub bytes_total: u64,
    /// Uncompressed bytes in the cache.
    pub bytes_cached: u64,
    /// Compressed bytes fetched by ranged reads.
    pub bytes_fetched: u64,
    /// Ranged reads sent.
    pub requests: u64,
    /// Chunk reads served from the cache.
    pub cache_hits: u64,
    /// Chunk reads that waited for a fetch.
    pub cache_misses: u64,
    /// Failed ranged reads or chunks.
    pub fetch_errors: u64,
    /// Reads that gave up waiting (EIO).
    pub timeouts: u64,
    /// Read requests that reached hoist.
    pub reads: u64,
    /// Bytes those returned.
    pub read_bytes: u64,
    /// Reads answered with EIO.
    pub read_errors: u64,
    /// Whether FUSE passthrough is on.
    pub passthrough: bool,
    /// Opens served by passthrough.
    pub passthrough_opens: u64,
    /// Background prefetch.
    pub prefetch: PrefetchStats,
}

/// Prefetch progress.
#[derive(Debug, Clone, Serialize)]
pub struct PrefetchStats {
    /// Where it is.
    pub state: PrefetchState,
    /// Chunks cached of the list.
    pub done: u64,
    /// Chunks in the list.
    pub total: u64,
}

/// A mounted image.
pub struct Served {
    spec: MountSpec,
    image: Arc<HoistImage>,
    fetcher: Arc<Fetcher>,
    counters: Arc<FsCounters>,
    progress: Arc<Progress>,
    pins: HashSet<[u8; 32]>,
    session: Option<fuser::BackgroundSession>,
    devdir: Option<PathBuf>,
    mount_secs: f64,
}

/// Builds the registry configuration of a mount: a stall, and the whole retry budget,
/// fit within the read timeout.
fn registry_config(spec: &MountSpec) -> Result<RegistryConfig, String> {
    let creds = spec
        .registry
        .creds
        .as_deref()
        .map(Credentials::parse)
        .transpose()
        .map_err(|e| format!("--creds: {e}"))?;
    let read_timeout = Duration::from_secs(spec.read_timeout_secs.max(1));
    Ok(RegistryConfig {
        plain_http: spec.registry.plain_http,
        creds,
        stall_timeout: Duration::from_secs(spec.registry.timeout_secs.max(1)).min(read_timeout),
        connect_timeout: Duration::from_secs(10).min(read_timeout),
        retries: spec.registry.retries,
        retry_budget: read_timeout,
        ..RegistryConfig::default()
    })
}

impl Served {
    /// Opens the image of `spec` and mounts it; returns once the mount is usable.
    pub fn start(
        spec: MountSpec,
        store: Arc<ChunkStore>,
        inflight: Arc<Inflight>,
        home: &Home,
    ) -> Result<Served, String> {
        let t0 = Instant::now();
        let mp = &spec.mountpoint;
        if !mp.is_dir() {
            return Err(format!("mount point {} is not a directory", mp.display()));
        }
        if kernel::is_mountpoint(mp) {
            return Err(format!(
                "{} is already a mount point; `hoist umount {}` first",
                mp.display(),
                mp.display()
            ));
        }
        let cfg = registry_config(&spec)?;
        let reference = ImageRef::parse(&spec.image).map_err(|e| e.to_string())?;
        let src = hoist_registry::open_source(&reference, &cfg).map_err(|e| e.to_string())?;
        let source: Arc<dyn ImageSource> = Arc::new(MetaCachingSource::new(src, store.clone()));
        let image = HoistImage::open(Box::new(source.clone())).map_err(|e| e.to_string())?;
        let used = image.referenced_chunks().map_err(|e| e.to_string())?;
        let blobs: Vec<BlobChunks> = image
            .meta
            .blobs
            .iter()
            .zip(used)
            .enumerate()
            .map(|(i, (b, used))| BlobChunks {
                digest: image
                    .blob_digest(i as u16 + 1)
                    .cloned()
                    .expect("HoistImage::open checked one digest per blob"),
                entries: b.chunks.entries.clone(),
                used,
            })
            .collect();
        let pins: HashSet<[u8; 32]> = blobs
            .iter()
            .flat_map(|b| {
                b.entries
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| b.is_used(*i))
                    .map(|(_, e)| e.digest)
            })
            .collect();
        let fetch_cfg = FetchConfig {
            read_timeout: Duration::from_secs(spec.read_timeout_secs.max(1)),
            min_fetch: spec.fetch_min_bytes,
            ..FetchConfig::default()
        };
        let fetcher = Arc::new(
            Fetcher::new(source, blobs, store.clone(), inflight, fetch_cfg)
                .map_err(|e| format!("starting fetch threads: {e}"))?,
        );
        store.pin(&pins);
        let image = Arc::new(image);
        let counters = Arc::new(FsCounters::default());
        let name = format!("hoist:{}", spec.image.replace(',', "_"));
        let mut served = Served {
            spec,
            image,
            fetcher,
            counters,
            progress: Arc::new(Progress::default()),
            pins,
            session: None,
            devdir: None,
            mount_secs: 0.0,
        };
        // On failure from here, dropping `served` undoes what was done.
        match served.spec.mode {
            Mode::Fuse => {
                let fs = TreeFs::new(
                    served.image.clone(),
                    served.fetcher.clone(),
                    served.counters.clone(),
                    served.spec.passthrough,
                );
                served.session = Some(
                    hoist_fs::mount_fuse(fs, &served.spec.mountpoint, &name, 4)
                        .map_err(|e| format!("FUSE mount on {}: {e}", mp_display(&served)))?,
                );
            }
            Mode::Erofs => {
                let devdir = home
                    .run()
                    .join(mount_id(&served.spec.mountpoint))
                    .join("dev");
                std::fs::create_dir_all(&devdir)
                    .map_err(|e| format!("creating {}: {e}", devdir.display()))?;
                if kernel::is_mountpoint(&devdir) {
                    let _ = kernel::unmount_lazy(&devdir);
                }
                let sizes: Vec<u64> = served
                    .image
                    .meta
                    .blobs
                    .iter()
                    .map(|b| b.uncompressed_size)
                    .collect();
                let devices: Vec<PathBuf> = (1..=sizes.len())
                    .map(|n| devdir.join(n.to_string()))
                    .collect();
                let fs = BlobDevFs::new(served.fetcher.clone(), sizes, served.counters.clone());
                served.session = Some(
                    hoist_fs::mount_fuse(fs, &devdir, &format!("{name}-devices"), 4).map_err(
                        |e| {
                            format!(
                                "FUSE mount of the blob devices on {}: {e}",
                                devdir.display()
                            )
                        },
                    )?,
                );
                served.devdir = Some(devdir);
                let meta = store.meta_path(served.image.meta_digest.hex());
                kernel::mount_erofs(&meta, &devices, &served.spec.mountpoint)
                    .map_err(|e| e.to_string())?;
            }
        }
        if served.spec.prefetch == Prefetch::All {
            let list = prefetch::all_chunks(&served.fetcher);
            prefetch::spawn(served.fetcher.clone(), list, served.progress.clone())
                .map_err(|e| format!("starting prefetch: {e}"))?;
        }
        served.mount_secs = t0.elapsed().as_secs_f64();
        tracing::info!(
            "mounted {} on {} ({:?}) in {:.3} s",
            served.spec.image,
            served.spec.mountpoint.display(),
            served.spec.mode,
            served.mount_secs
        );
        Ok(served)
    }

    /// The request it was mounted with.
    pub fn spec(&self) -> &MountSpec {
        &self.spec
    }

    /// The private mount point of the blob devices (erofs mode).
    pub fn devdir(&self) -> Option<&Path> {
        self.devdir.as_deref()
    }

    /// Whether the kernel still has the mount.
    pub fn alive(&self) -> bool {
        kernel::is_mountpoint(&self.spec.mountpoint)
            && self
                .session
                .as_ref()
                .is_some_and(|s| !s.guard.is_finished())
    }

    /// Current statistics.
    pub fn stats(&self) -> Stats {
        let store = self.fetcher.store();
        let c = self.fetcher.counters();
        let mut stats = Stats {
            mountpoint: self.spec.mountpoint.clone(),
            image: self.spec.image.clone(),
            manifest: self.image.manifest_digest.to_string(),
            mode: self.spec.mode,
            state: if self.alive() { "ready" } else { "gone" }.into(),
            mount_secs: self.mount_secs,
            meta_bytes: self
                .image
                .layers
                .iter()
                .find(|l| l.digest == self.image.meta_digest.as_str())
                .map_or(0, |l| l.size),
            blob_bytes: self
                .image
                .meta
                .blobs
                .iter()
                .map(|b| b.compressed_size)
                .sum(),
            chunks_total: 0,
            chunks_cached: 0,
            bytes_total: 0,
            bytes_cached: 0,
            bytes_fetched: c.bytes_fetched.load(Relaxed),
            requests: c.requests.load(Relaxed),
            cache_hits: c.hits.load(Relaxed),
            cache_misses: c.misses.load(Relaxed),
            fetch_errors: c.errors.load(Relaxed),
            timeouts: c.timeouts.load(Relaxed),
            reads: self.counters.reads.load(Relaxed),
            read_bytes: self.counters.read_bytes.load(Relaxed),
            read_errors: self.counters.read_errors.load(Relaxed),
            passthrough: self.counters.passthrough_available.load(Relaxed) == 1,
            passthrough_opens: self.counters.passthrough_opens.load(Relaxed),
            prefetch: PrefetchStats {
                state: self.progress.state(),
                done: self.progress.done.load(Relaxed),
                total: self.progress.total.load(Relaxed),
            },
        };
        for b in self.fetcher.blobs() {
            for (_, e) in b.entries.iter().enumerate().filter(|(i, _)| b.is_used(*i)) {
                stats.chunks_total += 1;
                stats.bytes_total += u64::from(e.uncompressed_size);
                if store.contains(&e.digest) {
                    stats.chunks_cached += 1;
                    stats.bytes_cached += u64::from(e.uncompressed_size);
                }
            }
        }
        stats
    }

    /// Unmounts (lazily) and stops serving.
    pub fn stop(mut self) -> Result<(), String> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), String> {
        let mut err = None;
        // Stop prefetch and the fetch workers; reads of a busy, detached mount then fail.
        self.fetcher.shutdown();
        // Detached at once in both modes: a busy mount goes away with its last user.
        if kernel::is_mountpoint(&self.spec.mountpoint) {
            if let Err(e) = kernel::unmount_lazy(&self.spec.mountpoint) {
                err = Some(format!(
                    "unmounting {}: {e}",
                    self.spec.mountpoint.display()
                ));
            }
        }
        // Dropping the session unmounts what is left of its FUSE mount.
        drop(self.session.take());
        if let Some(devdir) = self.devdir.take() {
            if kernel::is_mountpoint(&devdir) {
                let _ = kernel::unmount_lazy(&devdir);
            }
            if let Some(dir) = devdir.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        self.fetcher.store().unpin(&self.pins);
        self.pins.clear();
        err.map_or(Ok(()), Err)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::warn!("{e}");
        }
    }
}

fn mp_display(s: &Served) -> String {
    s.spec.mountpoint.display().to_string()
}

/// A file-name-safe id of a mount point.
pub(crate) fn mount_id(mountpoint: &Path) -> String {
    let digest = hoist_oci::Digest::of(mountpoint.as_os_str().as_encoded_bytes());
    digest.hex()[..16].to_string()
}
