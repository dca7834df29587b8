//! A live mount: the image, its fetcher, the FUSE sessions and the kernel mount.

use crate::api::{Mode, MountSpec, Prefetch};
use hoist_cache::prefetch::{self, PrefetchState, Progress, Stage};
use hoist_cache::{
    BlobChunks, ChunkStore, FetchConfig, Fetcher, Inflight, MetaCachingSource, Priority, View,
};
use hoist_fs::{kernel, Backing, BlobDevFs, FsCounters, LoopDevices, TreeFs};
use hoist_oci::{media, ImageRef, ImageSource, MAX_CONFIG_SIZE};
use hoist_reader::trace::{FileIndex, Trace, TraceChunk, MAX_TRACE_SIZE, TRACE_VERSION};
use hoist_reader::HoistImage;
use hoist_registry::{Credentials, RegistryConfig};
use serde::Serialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
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

    /// Creates the root, or makes an existing one private: mode 0700, so that no other
    /// user reaches the mounts, containers and cache below it (an image's setuid files
    /// and device nodes work inside its containers, and credentials pass the socket).
    pub fn create(&self) -> std::io::Result<()> {
        private_dir(&self.root)
    }

    /// Creates `dir` (under the root, which is created first) with mode 0700, or makes
    /// an existing one 0700.
    pub fn private_dir(&self, dir: &Path) -> std::io::Result<()> {
        self.create()?;
        private_dir(dir)
    }
}

/// Creates `dir` and its missing parents, then makes `dir` mode 0700 if group or others
/// had any access to it. Errors name the directory.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let named =
        |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", dir.display()));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(named)?;
    let mode = std::fs::metadata(dir).map_err(named)?.permissions().mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o700))
            .map_err(named)?;
    }
    Ok(())
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
    /// Views built (cached chunks copied into one file for the kernel).
    pub views_built: u64,
    /// erofs mode: whether the kernel reads every blob from its view on the local disk,
    /// not through hoist: the image was fully cached when it was mounted, or every
    /// blob's view has been swapped in behind its loop device since.
    pub local_devices: bool,
    /// erofs mode: what the kernel reads the blobs through: `views` (the mount was made
    /// over the views), `loop` (loop devices, each on its blob's view or device file),
    /// `files` (hoist's device files, where loop devices could not be had); else `none`.
    pub devices: &'static str,
    /// erofs mode: blobs read from their views on the local disk.
    pub devices_local: u64,
    /// erofs mode: blobs (devices) of the image.
    pub devices_total: u64,
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
    /// Chunks of the start-up trace, fetched first.
    pub trace_chunks: u64,
    /// Where the trace came from: `image`, `mount` (given with the request) or `none`.
    pub trace: &'static str,
    /// Views built after the chunks (`--prefetch all`).
    pub views_done: u64,
    /// Views to build.
    pub views_total: u64,
    /// Views that could not be built.
    pub views_failed: u64,
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
    local_devices: bool,
    loops: Option<Arc<LoopDevices>>,
    readahead_kib: u32,
    mount_secs: f64,
    config: serde_json::Value,
    trace_source: &'static str,
    trace_chunks: Arc<AtomicU64>,
}

/// The views of the image's files of more than one chunk, each once.
fn file_views(image: &HoistImage) -> Vec<View> {
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
        // Setuid files and device nodes of an image are for the containers on it only.
        if spec.privileges().any() {
            kernel::check_private(mp).map_err(|e| format!("--suid/--dev: {e}"))?;
        }
        let cfg = registry_config(&spec)?;
        let reference = ImageRef::parse(&spec.image).map_err(|e| e.to_string())?;
        let src = hoist_registry::open_source(&reference, &cfg).map_err(|e| e.to_string())?;
        let source: Arc<dyn ImageSource> = Arc::new(MetaCachingSource::new(src, store.clone()));
        // The config and the trace are fetched while the metadata blob is.
        let (manifest, _) = source.manifest().map_err(|e| e.to_string())?;
        let manifest: serde_json::Value = serde_json::from_slice(&manifest)
            .map_err(|e| format!("manifest of {}: {e}", spec.image))?;
        let (image, config, image_trace) = std::thread::scope(|scope| {
            let config = scope.spawn(|| read_config(source.as_ref(), &manifest));
            let trace = scope.spawn(|| match (&spec.trace, spec.prefetch) {
                (Some(_), _) | (None, Prefetch::None) => Ok(None),
                // A trace this hoist cannot use must not keep the image from mounting.
                (None, _) => Ok(read_trace(source.as_ref(), &manifest).unwrap_or_else(|e| {
                    tracing::warn!("{}: {e}; mounting without it", spec.image);
                    None
                })),
            });
            let image = HoistImage::open(Box::new(source.clone())).map_err(|e| e.to_string());
            (image, joined(config.join()), joined(trace.join()))
        });
        let (image, config, image_trace) = (image?, config?, image_trace?);
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
            local_devices: false,
            loops: None,
            readahead_kib: kernel::readahead_kib(store.root()),
            mount_secs: 0.0,
            config,
            trace_source: "none",
            trace_chunks: Arc::new(AtomicU64::new(0)),
        };
        let trace = match (&served.spec.trace, image_trace) {
            (Some(t), _) => {
                served.trace_source = "mount";
                Some(t.clone())
            }
            (None, Some(t)) => {
                served.trace_source = "image";
                Some(t)
            }
            (None, None) => None,
        };
        if served.spec.record {
            served.fetcher.start_recording();
        }
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
                    hoist_fs::mount_fuse(
                        fs,
                        &served.spec.mountpoint,
                        &name,
                        4,
                        served.readahead_kib,
                        hoist_fs::Contents::Tree(served.spec.privileges()),
                    )
                    .map_err(|e| format!("FUSE mount on {}: {e}", mp_display(&served)))?,
                );
            }
            Mode::Erofs => {
                let meta = store.meta_path(served.image.meta_digest.hex());
                let sizes = device_sizes(&served.image);
                // A fully cached image whose blob views are built is read by the kernel
                // from the local disk (direct I/O: no second copy in the page cache),
                // never through hoist. Not when recording: the record needs the reads.
                let views = (!served.spec.record)
                    .then(|| served.local_views(&sizes))
                    .flatten();
                if let Some(views) = views {
                    let (mp, ra) = (&served.spec.mountpoint, served.readahead_kib);
                    let privileges = served.spec.privileges();
                    match kernel::mount_erofs(&meta, &views, mp, true, ra, privileges) {
                        Ok(()) => served.local_devices = true,
                        // A view evicted since it was found: serve the blobs as usual.
                        Err(e) => tracing::info!("mounting over the views: {e}"),
                    }
                }
                if !served.local_devices {
                    served.mount_blob_devices(home, &name, &meta, sizes)?;
                }
            }
        }
        if served.spec.record {
            // The kernel's default window: the record holds what the workload read.
            kernel::set_readahead(&served.spec.mountpoint, 128);
            if let Some(d) = &served.devdir {
                kernel::set_readahead(d, 128);
            }
        }
        served.start_prefetch(trace)?;
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

    /// The local files of the image's blob views, in device order, if all are built.
    fn local_views(&self, sizes: &[u64]) -> Option<Vec<PathBuf>> {
        self.built_views(sizes).into_iter().collect()
    }

    /// Serves the blobs as device files of a private FUSE mount and mounts EROFS over
    /// loop devices on them (on a blob's view instead where it is built), so that each
    /// blob can move to its view later; over the device files themselves if loop
    /// devices cannot be had.
    fn mount_blob_devices(
        &mut self,
        home: &Home,
        name: &str,
        meta: &Path,
        sizes: Vec<u64>,
    ) -> Result<(), String> {
        home.private_dir(&home.run())
            .map_err(|e| format!("creating the private mount points: {e}"))?;
        let devdir = home.run().join(mount_id(&self.spec.mountpoint)).join("dev");
        std::fs::create_dir_all(&devdir)
            .map_err(|e| format!("creating {}: {e}", devdir.display()))?;
        if kernel::is_mountpoint(&devdir) {
            let _ = kernel::unmount_lazy(&devdir);
        }
        let devices: Vec<PathBuf> = (1..=sizes.len())
            .map(|n| devdir.join(n.to_string()))
            .collect();
        // Views are not used when recording: the record needs the reads.
        let views: Vec<Option<PathBuf>> = match self.spec.record {
            true => vec![None; sizes.len()],
            false => self.built_views(&sizes),
        };
        let fs = BlobDevFs::new(self.fetcher.clone(), sizes, self.counters.clone());
        self.session = Some(
            hoist_fs::mount_fuse(
                fs,
                &devdir,
                &format!("{name}-devices"),
                4,
                kernel::DEVICE_READAHEAD_KIB,
                hoist_fs::Contents::Devices,
            )
            .map_err(|e| {
                format!(
                    "FUSE mount of the blob devices on {}: {e}",
                    devdir.display()
                )
            })?,
        );
        self.devdir = Some(devdir);
        let backings: Vec<Backing> = devices
            .iter()
            .zip(views)
            .map(|(dev, view)| match view {
                Some(path) => Backing { path, local: true },
                None => Backing {
                    path: dev.clone(),
                    local: false,
                },
            })
            .collect();
        let (mp, ra) = (&self.spec.mountpoint, self.readahead_kib);
        match LoopDevices::attach(meta, &backings) {
            Ok(loops) => {
                loops
                    .mount(mp, ra, self.spec.privileges())
                    .map_err(|e| e.to_string())?;
                tracing::info!(
                    "{}: EROFS on loop devices {:?}, {} of {} blobs on their views",
                    mp.display(),
                    loops.paths(),
                    loops.local(),
                    loops.len()
                );
                self.loops = Some(Arc::new(loops));
                Ok(())
            }
            Err(e) => {
                tracing::warn!(
                    "{}: no loop devices ({e}); EROFS reads hoist's device files for as long as it is mounted",
                    mp.display()
                );
                let privileges = self.spec.privileges();
                kernel::mount_erofs(meta, &devices, mp, false, ra, privileges)
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// The local files of the image's blob views that are built, in device order.
    fn built_views(&self, sizes: &[u64]) -> Vec<Option<PathBuf>> {
        let store = self.fetcher.store();
        self.fetcher
            .blobs()
            .iter()
            .zip(sizes)
            .map(|(blob, size)| {
                let view = blob.view(*size);
                store.open_view(&view).ok().flatten()?;
                Some(store.view_path(&view))
            })
            .collect()
    }

    /// Starts the prefetch the spec asks for, on a thread that first maps the trace
    /// onto the image (a walk of the tree, done after the mount is usable).
    fn start_prefetch(&self, trace: Option<Trace>) -> Result<(), String> {
        let trace = match self.spec.prefetch {
            Prefetch::None => return Ok(()),
            Prefetch::Trace | Prefetch::All => trace,
        };
        if trace.is_none() && self.spec.prefetch == Prefetch::Trace {
            return Ok(());
        }
        let all = self.spec.prefetch == Prefetch::All;
        let (image, fetcher, progress) = (
            self.image.clone(),
            self.fetcher.clone(),
            self.progress.clone(),
        );
        let counted = self.trace_chunks.clone();
        let name = self.spec.image.clone();
        let mode = self.spec.mode;
        // erofs on loop devices: each blob moves to its view once it is built.
        let on_view: Option<prefetch::OnView> = self.loops.clone().map(|loops| {
            let store = fetcher.store().clone();
            Box::new(move |blob: usize, view: &View| {
                if let Err(e) = loops.use_view(blob, &store.view_path(view)) {
                    tracing::warn!("blob {} stays on hoist's device file: {e}", blob + 1);
                }
            }) as prefetch::OnView
        });
        std::thread::Builder::new()
            .name("hoist-trace".into())
            .spawn(move || {
                let mut stages = Vec::new();
                if let Some(trace) = trace {
                    match FileIndex::build(&image) {
                        Ok(index) => {
                            let chunks = trace.resolve(&image, &index);
                            counted.store(chunks.len() as u64, Relaxed);
                            stages.push(Stage {
                                priority: Priority::Trace,
                                chunks,
                            });
                        }
                        Err(e) => tracing::warn!("{name}: mapping the start-up trace: {e}"),
                    }
                }
                let mut views = Vec::new();
                if all {
                    stages.push(Stage {
                        priority: Priority::Prefetch,
                        chunks: prefetch::all_chunks(&fetcher),
                    });
                    // The whole image is wanted local: once it is, copy it into views
                    // that the kernel reads without hoist (files of several chunks for
                    // passthrough; blobs as devices for the next EROFS mount).
                    views = match mode {
                        Mode::Fuse => file_views(&image),
                        Mode::Erofs => fetcher
                            .blobs()
                            .iter()
                            .zip(device_sizes(&image))
                            .map(|(b, size)| b.view(size))
                            .collect(),
                    };
                }
                if let Err(e) = prefetch::spawn(fetcher, stages, views, on_view, progress) {
                    tracing::warn!("{name}: starting prefetch: {e}");
                }
            })
            .map(|_| ())
            .map_err(|e| format!("starting prefetch: {e}"))
    }

    /// The image's config (env, entrypoint, cmd, working dir, user).
    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }

    /// What the workload read since the mount, as a start-up trace (a mount with
    /// `record`).
    pub fn trace(&self) -> Result<Trace, String> {
        if !self.spec.record {
            return Err(format!(
                "{} was not mounted to record a trace",
                self.spec.mountpoint.display()
            ));
        }
        let index = FileIndex::build(&self.image).map_err(|e| e.to_string())?;
        let mut files = Vec::new();
        let mut seen_files = HashSet::new();
        let chunks = self
            .fetcher
            .recorded()
            .into_iter()
            .filter_map(|(blob, i)| {
                let e = self.fetcher.entry(blob, i).ok()?;
                let owner = index.owner.get(&(blob, i));
                if let Some((path, _)) = owner {
                    if seen_files.insert(path.clone()) {
                        files.push(path.clone());
                    }
                }
                Some(TraceChunk {
                    blob,
                    index: i,
                    digest: hex::encode(e.digest),
                    offset: e.compressed_offset,
                    size: u64::from(e.compressed_size),
                    file: owner.map(|(p, _)| p.clone()),
                    file_offset: owner.map_or(0, |(_, o)| *o),
                })
            })
            .collect();
        Ok(Trace {
            version: TRACE_VERSION,
            image: self.spec.image.clone(),
            manifest: self.image.manifest_digest.to_string(),
            chunk_size: 1 << self.image.meta.chunk_bits,
            meta_bytes: self.meta_bytes(),
            chunks,
            files,
        })
    }

    fn meta_bytes(&self) -> u64 {
        self.image
            .layers
            .iter()
            .find(|l| l.digest == self.image.meta_digest.as_str())
            .map_or(0, |l| l.size)
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
            && (self.all_local()
                || self
                    .session
                    .as_ref()
                    .is_some_and(|s| !s.guard.is_finished()))
    }

    /// Whether the kernel reads every blob from the local disk (erofs mode), not
    /// through hoist.
    fn all_local(&self) -> bool {
        self.local_devices
            || self
                .loops
                .as_ref()
                .is_some_and(|l| !l.is_empty() && l.local() == l.len())
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
            meta_bytes: self.meta_bytes(),
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
            views_built: c.views_built.load(Relaxed),
            local_devices: self.all_local(),
            devices: match (self.spec.mode, &self.loops) {
                (Mode::Fuse, _) => "none",
                (Mode::Erofs, Some(_)) => "loop",
                (Mode::Erofs, None) if self.local_devices => "views",
                (Mode::Erofs, None) => "files",
            },
            devices_local: match &self.loops {
                Some(l) => l.local() as u64,
                None if self.local_devices => self.image.meta.blobs.len() as u64,
                None => 0,
            },
            devices_total: match self.spec.mode {
                Mode::Fuse => 0,
                Mode::Erofs => self.image.meta.blobs.len() as u64,
            },
            prefetch: PrefetchStats {
                state: self.progress.state(),
                done: self.progress.done.load(Relaxed),
                total: self.progress.total.load(Relaxed),
                trace_chunks: self.trace_chunks.load(Relaxed),
                trace: self.trace_source,
                views_done: self.progress.views_done.load(Relaxed),
                views_total: self.progress.views_total.load(Relaxed),
                views_failed: self.progress.views_failed.load(Relaxed),
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

/// The result of a thread that read part of the image.
fn joined<T>(r: std::thread::Result<Result<T, String>>) -> Result<T, String> {
    r.unwrap_or_else(|_| Err("internal error reading the image (see the log)".into()))
}

/// The image config, checked against its digest.
fn read_config(
    source: &dyn ImageSource,
    manifest: &serde_json::Value,
) -> Result<serde_json::Value, String> {
    let what = format!("config of {}", source.describe());
    let (digest, size, _) =
        hoist_oci::descriptor(&manifest["config"], &what).map_err(|e| e.to_string())?;
    let bytes = source
        .read_blob(&digest, size, MAX_CONFIG_SIZE)
        .map_err(|e| format!("config {digest}: {e}"))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("config {digest}: {e}"))
}

/// The start-up trace the image carries, if any.
fn read_trace(
    source: &dyn ImageSource,
    manifest: &serde_json::Value,
) -> Result<Option<Trace>, String> {
    let layer = manifest["layers"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["mediaType"] == media::HOIST_TRACE));
    let Some(layer) = layer else {
        return Ok(None);
    };
    let what = format!("start-up trace of {}", source.describe());
    let (digest, size, _) = hoist_oci::descriptor(layer, &what).map_err(|e| e.to_string())?;
    let bytes = source
        .read_blob(&digest, size, MAX_TRACE_SIZE)
        .map_err(|e| format!("start-up trace {digest}: {e}"))?;
    Trace::parse(&bytes)
        .map(Some)
        .map_err(|e| format!("start-up trace {digest} of {}: {e}", source.describe()))
}

fn mp_display(s: &Served) -> String {
    s.spec.mountpoint.display().to_string()
}

/// The sizes of the image's blob devices: each blob's uncompressed address space,
/// whole blocks (a loop device ends at its last whole sector, and EROFS reads whole
/// blocks; hoist's converter writes whole blocks already).
fn device_sizes(image: &HoistImage) -> Vec<u64> {
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

/// A file-name-safe id of a mount point.
pub(crate) fn mount_id(mountpoint: &Path) -> String {
    let digest = hoist_oci::Digest::of(mountpoint.as_os_str().as_encoded_bytes());
    digest.hex()[..16].to_string()
}
