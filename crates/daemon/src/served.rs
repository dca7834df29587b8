//! A live mount: the image, its fetcher, the FUSE sessions and the kernel mount, in
//! either serving mode, and its teardown.

use crate::api::{
    DaemonError, Devices, Mode, MountSpec, MountState, Prefetch, PrefetchStats, Stats, TraceSource,
};
use crate::home::Home;
use crate::image::{
    device_sizes, image_error, joined, kernel_meta, meta_backings, mount_id, read_config,
    read_error, read_trace, ImageFiles, StoreMetaCache,
};
use crate::metadev::MetaMove;
use hoist_cache::prefetch::Progress;
use hoist_cache::{
    BlobChunks, ChunkStore, FetchConfig, Fetcher, ImageChunks, Inflight, MetaCachingSource, View,
    ViewError,
};
use hoist_fs::{kernel, Backing, BlobDevFs, FsCounters, LoopDevices, TreeFs};
use hoist_oci::{ImageRef, ImageSource};
use hoist_reader::HoistImage;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Threads serving each FUSE connection.
const FUSE_THREADS: usize = 4;

/// What the holder keeps of a mount for the next server (opaque to the holder).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct HeldMount {
    /// The request it was mounted with.
    pub spec: MountSpec,
    /// The manifest as read (so a successor needs no registry to start).
    pub manifest: String,
    /// Its digest.
    pub manifest_digest: String,
    /// What the kernel offered at INIT.
    pub init: hoist_fs::InitParams,
    /// erofs mode: the blob devices' private mount.
    pub devdir: Option<PathBuf>,
    /// erofs mode: the mount reads the blobs' views directly.
    pub local_devices: bool,
    /// erofs mode: the loop devices.
    pub loops: Vec<PathBuf>,
    /// Seconds the first mount took.
    pub mount_secs: f64,
}

/// A mounted image.
pub struct Served {
    pub(crate) spec: MountSpec,
    pub(crate) image: Arc<HoistImage>,
    pub(crate) fetcher: Arc<Fetcher>,
    counters: Arc<FsCounters>,
    pub(crate) progress: Arc<Progress>,
    pins: HashSet<[u8; 32]>,
    session: Option<fuser::BackgroundSession>,
    devdir: Option<PathBuf>,
    local_devices: bool,
    pub(crate) loops: Option<Arc<LoopDevices>>,
    /// erofs mode: moves the metadata's loop device to a local file once all of it is
    /// read.
    pub(crate) meta_move: Arc<MetaMove>,
    /// erofs mode: the kernel mounted the metadata from a local file.
    meta_mounted_local: bool,
    readahead_kib: u32,
    mount_secs: f64,
    config: serde_json::Value,
    trace_source: TraceSource,
    pub(crate) trace_chunks: Arc<AtomicU64>,
    /// Metadata chunks of the start-up trace, fetched early, and whether that is done.
    pub(crate) trace_meta: Arc<(AtomicU64, std::sync::atomic::AtomicBool)>,
    /// The manifest as read, for a successor.
    manifest: Vec<u8>,
    /// The FUSE connection's `/dev/fuse` file, until the holder has a copy.
    dev: Option<OwnedFd>,
    /// This mount's private directory under `run/`.
    rundir: Option<PathBuf>,
}

impl Served {
    /// Opens the image of `spec` and mounts it; returns once the mount is usable.
    pub fn start(
        spec: MountSpec,
        store: Arc<ChunkStore>,
        inflight: Arc<Inflight>,
        home: &Home,
    ) -> Result<Served, DaemonError> {
        let t0 = Instant::now();
        let source = image_source(&spec, &store, None)?;
        Served::start_from(spec, source, store, inflight, home, t0)
    }

    /// [`Served::start`] from the image's source, as [`image_source`] opened it at
    /// `t0`.
    pub(crate) fn start_from(
        spec: MountSpec,
        source: Arc<dyn ImageSource>,
        store: Arc<ChunkStore>,
        inflight: Arc<Inflight>,
        home: &Home,
        t0: Instant,
    ) -> Result<Served, DaemonError> {
        check_mountpoint(&spec)?;
        let (mut served, mut trace) = Served::open(spec, source, store.clone(), inflight)?;
        // The trace's chunks are fetched while the kernel mounts; only `--prefetch all`
        // waits for the mount (its views move erofs loop devices).
        if served.spec.prefetch != Prefetch::All {
            served.start_prefetch(trace.take())?;
        }
        let name = format!("hoist:{}", served.spec.image.replace(',', "_"));
        // On failure from here, dropping `served` undoes what was done.
        match served.spec.mode {
            Mode::Fuse => {
                let fs = served.tree_fs(home, false)?;
                let m = hoist_fs::mount_fuse(
                    fs,
                    &served.spec.mountpoint,
                    &name,
                    FUSE_THREADS,
                    served.readahead_kib,
                    hoist_fs::Contents::Tree(served.spec.privileges()),
                )
                .map_err(|e| {
                    DaemonError::Internal(format!("FUSE mount on {}: {e}", mp_display(&served)))
                })?;
                served.session = Some(m.session);
                served.dev = Some(m.dev);
            }
            Mode::Erofs => {
                // None: metadata read on demand, through hoist's `meta` device file (always
                // when recording: the record notes the chunks the kernel reads).
                let meta = match served.spec.record && !served.image.meta_complete() {
                    true => None,
                    false => kernel_meta(&store, &served.image).map_err(|e| {
                        DaemonError::Internal(format!(
                            "writing the metadata of {} for the kernel: {e}",
                            served.image.meta_digest
                        ))
                    })?,
                };
                let sizes = device_sizes(&served.image);
                // A fully cached image whose blob views are built is read by the kernel
                // from the local disk (direct I/O: no second copy in the page cache),
                // never through hoist. Not when recording: the record needs the reads.
                let views = (!served.spec.record)
                    .then(|| served.local_views(&sizes))
                    .flatten();
                if let (Some(views), Some(meta)) = (views, &meta) {
                    let (mp, ra) = (&served.spec.mountpoint, served.readahead_kib);
                    let privileges = served.spec.privileges();
                    match kernel::mount_erofs(meta, &views, mp, true, ra, privileges) {
                        Ok(()) => {
                            served.local_devices = true;
                            served.meta_mounted_local = true;
                        }
                        // A view evicted since it was found: serve the blobs as usual.
                        Err(e) => tracing::info!("mounting over the views: {e}"),
                    }
                }
                if !served.local_devices {
                    served.mount_blob_devices(home, &name, meta.as_deref(), sizes)?;
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
        if served.spec.prefetch == Prefetch::All {
            served.start_prefetch(trace)?;
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

    /// Opens the image of `spec` from `source` (whose manifest [`image_source`] read):
    /// its metadata, config and trace, the fetcher; mounts nothing. Returns the trace
    /// to prefetch.
    fn open(
        spec: MountSpec,
        source: Arc<dyn ImageSource>,
        store: Arc<ChunkStore>,
        inflight: Arc<Inflight>,
    ) -> Result<(Served, Option<hoist_reader::trace::Trace>), DaemonError> {
        // The config and the trace are fetched while the metadata blob is.
        let (manifest_bytes, _) = source.manifest().map_err(image_error)?;
        let manifest: serde_json::Value = serde_json::from_slice(&manifest_bytes).map_err(|e| {
            DaemonError::InvalidArgument(format!("manifest of {}: {e}", spec.image))
        })?;
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
            // Metadata is read when it is needed (version 3 images): by hoist in fuse
            // mode, by the kernel through hoist's `meta` device file in erofs mode.
            let image = HoistImage::open_lazy(
                Box::new(source.clone()),
                source.clone(),
                Some(Arc::new(StoreMetaCache(store.clone()))),
                spec.meta_whole_max_bytes,
            )
            .map_err(read_error);
            (image, joined(config.join()), joined(trace.join()))
        });
        let (image, config, image_trace) = (image?, config?, image_trace?);
        let used = image
            .referenced_chunks()
            .map_err(|e| DaemonError::InvalidArgument(format!("{}: {e}", spec.image)))?;
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
        let fetcher = Arc::new(Fetcher::new(
            Arc::new(ImageChunks(source)),
            blobs,
            store.clone(),
            inflight,
            fetch_cfg,
        ));
        store.pin(&pins);
        let image = Arc::new(image);
        // A program's libraries are fetched as soon as it names them, and a python
        // module's imports as soon as it is read.
        fetcher.set_files(Arc::new(ImageFiles(image.clone())));
        let counters = Arc::new(FsCounters::default());
        let meta_move = MetaMove::new(image.clone(), store.clone());
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
            meta_move,
            meta_mounted_local: false,
            readahead_kib: kernel::readahead_kib(store.root()),
            mount_secs: 0.0,
            config,
            trace_source: TraceSource::None,
            trace_chunks: Arc::new(AtomicU64::new(0)),
            trace_meta: Arc::default(),
            manifest: manifest_bytes,
            dev: None,
            rundir: None,
        };
        let trace = match (&served.spec.trace, image_trace) {
            (Some(t), _) => {
                served.trace_source = TraceSource::Mount;
                Some(t.clone())
            }
            (None, Some(t)) => {
                served.trace_source = TraceSource::Image;
                Some(t)
            }
            (None, None) => None,
        };
        if served.spec.record {
            served.fetcher.start_recording();
            served.image.start_recording_meta();
        }
        Ok((served, trace))
    }

    /// This mount's private directory, `run/<id>` (0700 under a 0700 root), made if
    /// need be.
    fn rundir(&mut self, home: &Home) -> Result<PathBuf, DaemonError> {
        let dir = home.run().join(mount_id(&self.spec.mountpoint));
        home.private_dir(&home.run())
            .and_then(|()| std::fs::create_dir_all(&dir))
            .map_err(|e| {
                DaemonError::Unavailable(format!("creating the private mount points: {e}"))
            })?;
        self.rundir = Some(dir.clone());
        Ok(dir)
    }

    /// The tree filesystem of a fuse mount, recording its opens for a successor; with
    /// `resume`, this process is that successor.
    fn tree_fs(&mut self, home: &Home, resume: bool) -> Result<TreeFs, DaemonError> {
        let opens = self.rundir(home)?.join("opens");
        TreeFs::new(
            self.image.clone(),
            self.fetcher.clone(),
            self.counters.clone(),
            self.spec.passthrough,
        )
        .with_opens_record(&opens, resume)
        .map_err(|e| DaemonError::Unavailable(format!("{}: {e}", opens.display())))
    }

    /// The FUSE connection's `/dev/fuse` file, for the holder (once).
    pub fn take_dev(&mut self) -> Option<OwnedFd> {
        self.dev.take()
    }

    /// What a successor needs to serve this mount again.
    pub(crate) fn held(&self) -> HeldMount {
        HeldMount {
            spec: self.spec.clone(),
            manifest: String::from_utf8_lossy(&self.manifest).into_owned(),
            manifest_digest: self.image.manifest_digest.to_string(),
            init: self.counters.init_params(),
            devdir: self.devdir.clone(),
            local_devices: self.local_devices,
            loops: self.loops.as_ref().map(|l| l.paths()).unwrap_or_default(),
            mount_secs: self.mount_secs,
        }
    }

    /// Serves again a mount that a previous server made, over the FUSE connection whose
    /// `/dev/fuse` file the holder kept (`fds`): no remount, no INIT, the kernel's node
    /// ids, file handles and passthrough opens as they were; then the kernel resends what
    /// the previous server left unanswered.
    pub(crate) fn resume(
        held: HeldMount,
        mut fds: Vec<OwnedFd>,
        store: Arc<ChunkStore>,
        inflight: Arc<Inflight>,
        home: &Home,
    ) -> Result<Served, DaemonError> {
        let digest = hoist_oci::Digest::parse(&held.manifest_digest)
            .map_err(|e| DaemonError::Internal(format!("held manifest digest: {e}")))?;
        let pinned = (held.manifest.into_bytes(), digest);
        let source = image_source(&held.spec, &store, Some(pinned))?;
        let (mut served, trace) = Served::open(held.spec, source, store, inflight)?;
        served.mount_secs = held.mount_secs;
        served.local_devices = held.local_devices;
        // Mounted over the views, the kernel reads the metadata's local file too.
        served.meta_mounted_local = held.local_devices;
        let contents = match served.spec.mode {
            Mode::Fuse => hoist_fs::Contents::Tree(served.spec.privileges()),
            Mode::Erofs => hoist_fs::Contents::Devices,
        };
        let dev = fds.pop();
        let session = match (served.spec.mode, dev) {
            (_, None) => None,
            (Mode::Fuse, Some(dev)) => {
                let fs = served.tree_fs(home, true)?;
                Some(hoist_fs::resume_fuse(
                    fs,
                    dev,
                    FUSE_THREADS,
                    contents,
                    held.init,
                ))
            }
            (Mode::Erofs, Some(dev)) => {
                served.rundir(home)?;
                served.devdir = held.devdir;
                let fs = served.blob_dev_fs()?;
                Some(hoist_fs::resume_fuse(
                    fs,
                    dev,
                    FUSE_THREADS,
                    contents,
                    held.init,
                ))
            }
        };
        if let Some(session) = session {
            served.session = Some(session.map_err(|e| {
                DaemonError::Internal(format!("taking {} over: {e}", mp_display(&served)))
            })?);
        }
        // The kernel stays at INIT's parameters; the next successor needs them too.
        served
            .counters
            .kernel_minor
            .store(u64::from(held.init.minor), Relaxed);
        served.counters.kernel_flags.store(held.init.flags, Relaxed);
        if !held.loops.is_empty() {
            served.reopen_loops(&held.loops);
        }
        served.start_prefetch(trace)?;
        tracing::info!(
            "took over {} on {} ({:?})",
            served.spec.image,
            served.spec.mountpoint.display(),
            served.spec.mode
        );
        Ok(served)
    }

    /// Takes back the loop devices of an erofs mount a predecessor made, so that blobs
    /// still on hoist's device files move to their views once built. A device that no
    /// longer reads what the record says is left alone, and its blobs stay on the device
    /// files until the image is mounted again.
    fn reopen_loops(&mut self, paths: &[PathBuf]) {
        let Some(devdir) = self.devdir.clone() else {
            return;
        };
        let store = self.fetcher.store();
        let meta = meta_backings(store, &self.image, &devdir);
        let blobs: Vec<(PathBuf, PathBuf)> = self
            .fetcher
            .blobs()
            .iter()
            .zip(device_sizes(&self.image))
            .enumerate()
            .map(|(k, (blob, size))| {
                (
                    devdir.join((k + 1).to_string()),
                    store.view_path(&blob.view(size)),
                )
            })
            .collect();
        match LoopDevices::reopen(paths, &meta, &blobs) {
            Ok(loops) => {
                tracing::info!(
                    "{}: took back loop devices {:?}, {} of {} blobs on their views, metadata {}",
                    mp_display(self),
                    paths,
                    loops.local(),
                    loops.len(),
                    if loops.meta_is_local() { "local" } else { "on hoist's device file" }
                );
                // A local copy of the metadata left meanwhile is taken if it matches
                // (not when recording: the record needs the kernel's reads).
                if !loops.meta_is_local() && !self.spec.record {
                    if let Err(e) = kernel_meta(store, &self.image) {
                        tracing::warn!("metadata {}: {e}", self.image.meta_digest);
                    }
                }
                let loops = Arc::new(loops);
                self.meta_move.set_loops(loops.clone());
                self.loops = Some(loops);
                // Views of blobs still on hoist's device files, built meanwhile.
                if !self.spec.record {
                    self.verify_views_later(&device_sizes(&self.image));
                }
            }
            Err(e) => tracing::warn!(
                "{}: the loop devices cannot be taken back ({e}); blobs not yet on their views stay on hoist's device files until remounted",
                mp_display(self)
            ),
        }
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
        meta: Option<&Path>,
        sizes: Vec<u64>,
    ) -> Result<(), DaemonError> {
        let devdir = self.rundir(home)?.join("dev");
        std::fs::create_dir_all(&devdir)
            .map_err(|e| DaemonError::Unavailable(format!("creating {}: {e}", devdir.display())))?;
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
        let fs = self.blob_dev_fs()?;
        let m = hoist_fs::mount_fuse(
            fs,
            &devdir,
            &format!("{name}-devices"),
            FUSE_THREADS,
            kernel::DEVICE_READAHEAD_KIB,
            hoist_fs::Contents::Devices,
        )
        .map_err(|e| {
            DaemonError::Internal(format!(
                "FUSE mount of the blob devices on {}: {e}",
                devdir.display()
            ))
        })?;
        self.session = Some(m.session);
        self.dev = Some(m.dev);
        self.devdir = Some(devdir.clone());
        let meta = match meta {
            Some(path) => Backing {
                path: path.to_path_buf(),
                local: true,
            },
            None => Backing {
                path: devdir.join(hoist_fs::META_FILE),
                local: false,
            },
        };
        self.meta_mounted_local = meta.local;
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
        match LoopDevices::attach(&meta, &backings) {
            Ok(loops) => {
                loops
                    .mount(mp, ra, self.spec.privileges())
                    .map_err(|e| DaemonError::Internal(e.to_string()))?;
                tracing::info!(
                    "{}: EROFS on loop devices {:?}, {} of {} blobs on their views, metadata {}",
                    mp.display(),
                    loops.paths(),
                    loops.local(),
                    loops.len(),
                    if meta.local {
                        "local"
                    } else {
                        "on hoist's device file"
                    }
                );
                let loops = Arc::new(loops);
                self.meta_move.set_loops(loops.clone());
                self.loops = Some(loops);
                if !self.spec.record {
                    self.verify_views_later(&sizes);
                }
                Ok(())
            }
            Err(e) => {
                tracing::warn!(
                    "{}: no loop devices ({e}); EROFS reads hoist's device files for as long as it is mounted",
                    mp.display()
                );
                let privileges = self.spec.privileges();
                kernel::mount_erofs(&meta.path, &devices, mp, false, ra, privileges)
                    .map_err(|e| DaemonError::Internal(e.to_string()))
            }
        }
    }

    /// Verifies, in the background, the blob views on disk that this process has not
    /// verified (a daemon restarted over a warm cache), and moves each blob whose view
    /// holds what it should to it; a damaged view is built again from the cached chunks
    /// first, or, if some are missing, left to the prefetch or the next mount.
    fn verify_views_later(&self, sizes: &[u64]) {
        let (Some(loops), fetcher) = (self.loops.clone(), self.fetcher.clone()) else {
            return;
        };
        let store = fetcher.store().clone();
        let todo: Vec<(usize, View)> = fetcher
            .blobs()
            .iter()
            .zip(sizes)
            .map(|(blob, size)| blob.view(*size))
            .enumerate()
            .filter(|(k, v)| {
                !loops.is_local(*k)
                    && store.has_view_file(v)
                    && store.open_view(v).ok().flatten().is_none()
            })
            .collect();
        if todo.is_empty() {
            return;
        }
        let mp = self.spec.mountpoint.clone();
        let spawned = std::thread::Builder::new()
            .name("hoist-verify".into())
            .spawn(move || {
                for (k, view) in todo {
                    match store.build_view(&view, &|| fetcher.stopping()) {
                        Ok(built) => {
                            fetcher.counters().count_view(built);
                            if let Err(e) = loops.use_view(k, &store.view_path(&view)) {
                                tracing::warn!("blob {} stays on hoist's device file: {e}", k + 1);
                            }
                        }
                        Err(ViewError::Stopped) => return,
                        Err(e) => tracing::info!(
                            "{}: blob {} stays on hoist's device file: its view: {e}",
                            mp.display(),
                            k + 1
                        ),
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("starting the verification of views: {e}");
        }
    }

    /// The blob devices' filesystem, the metadata's file included.
    fn blob_dev_fs(&self) -> Result<BlobDevFs, DaemonError> {
        let meta_move = self.meta_move.clone();
        BlobDevFs::new(
            self.fetcher.clone(),
            device_sizes(&self.image),
            self.counters.clone(),
            &self.image,
            Some(Arc::new(move || meta_move.check())),
        )
        .map_err(|e| DaemonError::Internal(format!("metadata {}: {e}", self.image.meta_digest)))
    }

    /// erofs mode: whether the kernel reads the metadata from a file on the local disk.
    fn meta_local(&self) -> bool {
        match (&self.loops, self.spec.mode) {
            (_, Mode::Fuse) => false,
            (Some(l), _) => l.meta_is_local(),
            (None, Mode::Erofs) => self.meta_mounted_local,
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

    /// The image's config (env, entrypoint, cmd, working dir, user).
    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }

    /// Bytes of metadata read: what was fetched so far when it is read on demand, else
    /// the whole metadata blob.
    pub(crate) fn meta_bytes(&self) -> u64 {
        match self.image.meta_fetched() {
            Some((fetched, _)) => fetched,
            None => self.meta_layer_bytes(),
        }
    }

    /// Bytes of the metadata blob.
    pub(crate) fn meta_layer_bytes(&self) -> u64 {
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

    /// Whether the kernel reads the metadata and every blob from the local disk (erofs
    /// mode), not through hoist.
    fn all_local(&self) -> bool {
        self.local_devices
            || self
                .loops
                .as_ref()
                .is_some_and(|l| !l.is_empty() && l.all_local())
    }

    /// Current statistics, as those of mount point `mp`, one of the `mountpoints`
    /// bound to this image (the counters are the image's, shared by them).
    pub(crate) fn stats_at(&self, mp: &Path, mountpoints: u64) -> Stats {
        let mut stats = self.stats();
        stats.mountpoint = mp.to_path_buf();
        stats.mountpoints = mountpoints;
        if !kernel::is_mountpoint(mp) {
            stats.state = MountState::Gone;
        }
        stats
    }

    /// Current statistics.
    pub fn stats(&self) -> Stats {
        let store = self.fetcher.store();
        let c = self.fetcher.counters();
        let evictions = self.fetcher.store().eviction_counts();
        let mut stats = Stats {
            mountpoint: self.spec.mountpoint.clone(),
            image: self.spec.image.clone(),
            manifest: self.image.manifest_digest.to_string(),
            mode: self.spec.mode,
            state: if self.alive() {
                MountState::Ready
            } else {
                MountState::Gone
            },
            mount_secs: self.mount_secs,
            mountpoints: 1,
            meta_bytes: self.meta_bytes(),
            meta_layer_bytes: self.meta_layer_bytes(),
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
            corrupt: c.corrupt.load(Relaxed),
            readaheads: c.readaheads.load(Relaxed),
            libraries: c.libraries.load(Relaxed),
            modules: c.modules.load(Relaxed),
            process_files: c.process_files.load(Relaxed),
            cache_evictions: evictions.0,
            cache_refetches: evictions.1,
            reads: self.counters.reads.load(Relaxed),
            read_bytes: self.counters.read_bytes.load(Relaxed),
            read_errors: self.counters.read_errors.load(Relaxed),
            resent: self.counters.resent.load(Relaxed),
            read_latency: {
                let (counts, sum_secs) = self.counters.read_latency.snapshot();
                crate::api::LatencyStats {
                    bounds_secs: hoist_fs::LATENCY_BOUNDS.to_vec(),
                    counts,
                    sum_secs,
                }
            },
            passthrough: self.counters.passthrough_available.load(Relaxed) == 1,
            passthrough_opens: self.counters.passthrough_opens.load(Relaxed),
            views_built: c.views_built.load(Relaxed),
            views_verified: c.views_verified.load(Relaxed),
            views_damaged: c.views_damaged.load(Relaxed),
            local_devices: self.all_local(),
            meta_local: self.meta_local(),
            devices: match (self.spec.mode, &self.loops) {
                (Mode::Fuse, _) => Devices::None,
                (Mode::Erofs, Some(_)) => Devices::Loop,
                (Mode::Erofs, None) if self.local_devices => Devices::Views,
                (Mode::Erofs, None) => Devices::Files,
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
                trace_meta_chunks: self.trace_meta.0.load(Relaxed),
                trace_meta_done: self.trace_meta.1.load(Relaxed),
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
    pub fn stop(mut self) -> Result<(), DaemonError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), DaemonError> {
        let mut err = None;
        // Stop prefetch and the fetch workers; reads of a busy, detached mount then fail.
        self.fetcher.shutdown();
        // Detached at once in both modes: a busy mount goes away with its last user.
        if kernel::is_mountpoint(&self.spec.mountpoint) {
            if let Err(e) = kernel::unmount_lazy(&self.spec.mountpoint) {
                err = Some(DaemonError::Internal(format!(
                    "unmounting {}: {e}",
                    self.spec.mountpoint.display()
                )));
            }
        }
        // Dropping the session unmounts what is left of its FUSE mount.
        drop(self.session.take());
        if let Some(devdir) = self.devdir.take() {
            if kernel::is_mountpoint(&devdir) {
                let _ = kernel::unmount_lazy(&devdir);
            }
        }
        if let Some(dir) = self.rundir.take() {
            let _ = std::fs::remove_dir_all(dir);
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

/// What a mount point needs before anything is mounted on it.
pub(crate) fn check_mountpoint(spec: &MountSpec) -> Result<(), DaemonError> {
    let mp = &spec.mountpoint;
    if !mp.is_dir() {
        return Err(DaemonError::InvalidArgument(format!(
            "mount point {} is not a directory",
            mp.display()
        )));
    }
    if kernel::is_mountpoint(mp) {
        return Err(DaemonError::AlreadyExists(format!(
            "{} is already a mount point; `hoist umount {}` first",
            mp.display(),
            mp.display()
        )));
    }
    // Setuid files and device nodes of an image are for the containers on it only.
    if spec.privileges().any() {
        kernel::check_private(mp)
            .map_err(|e| DaemonError::InvalidArgument(format!("--suid/--dev: {e}")))?;
    }
    Ok(())
}

/// The source of `spec`'s image, its manifest read (or `pinned`, the one a predecessor
/// read, so that a takeover asks the registry nothing).
pub(crate) fn image_source(
    spec: &MountSpec,
    store: &Arc<ChunkStore>,
    pinned: Option<(Vec<u8>, hoist_oci::Digest)>,
) -> Result<Arc<dyn ImageSource>, DaemonError> {
    let cfg = crate::image::registry_config(spec)?;
    let reference = ImageRef::parse(&spec.image).map_err(image_error)?;
    let src = hoist_registry::open_source(&reference, &cfg).map_err(image_error)?;
    let source = MetaCachingSource::new(src, store.clone());
    if let Some((bytes, digest)) = pinned {
        source.pin_manifest(bytes, digest).map_err(image_error)?;
    }
    source.manifest().map_err(image_error)?;
    Ok(Arc::new(source))
}

fn mp_display(s: &Served) -> String {
    s.spec.mountpoint.display().to_string()
}
