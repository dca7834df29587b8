//! The daemon process: the API server and the table of mounts.
//!
//! An image is served once per set of options: mounted at a private mount point,
//! `run/images/<key>` (the key hashes the manifest digest and every option but the
//! mount point), with one FUSE connection, one fetcher and one copy of its metadata.
//! Each mount point asked for is a bind mount of it, with its flags. A node running a
//! hundred pods of ten images serves ten images; their pages are cached once; an idle
//! mount point costs a bind mount. The image is unmounted with its last mount point.

use crate::api::{Client, DaemonError, DaemonInfo, Mounted, Reply, Request, Response};
use crate::holder::HolderClient;
use crate::home::Home;
use crate::image::mount_id;
use crate::served::{HeldMount, Served};
use hoist_cache::{ChunkStore, Inflight};
use hoist_fs::kernel;
use rustix::fs::FlockOperation;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What the daemon writes of each mount, to clean up after itself if it dies.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    mountpoint: PathBuf,
    image: String,
    devdir: Option<PathBuf>,
    pid: u32,
    /// A mount point's: the served image's private mount point it is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    root: Option<PathBuf>,
}

type Stores = HashMap<PathBuf, (Arc<ChunkStore>, Arc<Inflight>)>;

/// The daemon's state: the served images and the mount points bound to them.
pub struct Daemon {
    home: Home,
    started: std::time::Instant,
    /// The process keeping the mounts' connections (none for a foreground mount).
    holder: Option<HolderClient>,
    stores: Mutex<Stores>,
    /// The served images, by their private mount points.
    served: Mutex<HashMap<PathBuf, Served>>,
    /// The mount points, each with the private mount point it is bound to.
    mounts: Mutex<HashMap<PathBuf, PathBuf>>,
    pending: Mutex<HashSet<PathBuf>>,
    /// A lock per served image's mount point, so that concurrent mounts of one image
    /// serve it once.
    starting: Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Daemon {
    /// A daemon over `home`, with no mounts, whose mounts `holder` keeps.
    pub fn new(home: Home, holder: Option<HolderClient>) -> Daemon {
        Daemon {
            home,
            holder,
            started: std::time::Instant::now(),
            stores: Mutex::new(HashMap::new()),
            served: Mutex::new(HashMap::new()),
            mounts: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashSet::new()),
            starting: Mutex::new(HashMap::new()),
        }
    }

    fn store(
        &self,
        dir: &Path,
        max_bytes: u64,
    ) -> Result<(Arc<ChunkStore>, Arc<Inflight>), DaemonError> {
        let mut stores = lock(&self.stores);
        if let Some(s) = stores.get(dir) {
            // Removed or emptied by hand since: made again rather than failing every
            // mount until a restart.
            if !s.0.is_intact() {
                s.0.recreate().map_err(|e| cache_error(dir, e))?;
            }
            return Ok(s.clone());
        }
        let store = ChunkStore::open_shared(dir, max_bytes).map_err(|e| cache_error(dir, e))?;
        let entry = (store, Arc::new(Inflight::default()));
        stores.insert(dir.to_path_buf(), entry.clone());
        Ok(entry)
    }

    /// The store mounts use, or one opened for this request only (so that its size
    /// limit stays the one the first mount gives).
    fn store_for_maintenance(&self, dir: &Path) -> Result<Arc<ChunkStore>, DaemonError> {
        if let Some((s, _)) = lock(&self.stores).get(dir) {
            return Ok(s.clone());
        }
        ChunkStore::open(dir, u64::MAX)
            .map(Arc::new)
            .map_err(|e| cache_error(dir, e))
    }

    fn record_path(&self, mountpoint: &Path) -> PathBuf {
        self.home
            .mounts()
            .join(format!("{}.json", mount_id(mountpoint)))
    }

    /// Answers one request.
    pub fn handle(&self, req: Request) -> Result<Reply, DaemonError> {
        let not_mounted = |mp: &Path| {
            DaemonError::NotFound(format!("{} is not mounted by this daemon", mp.display()))
        };
        match req {
            Request::Ping => Ok(Reply::Pong(DaemonInfo {
                pid: std::process::id(),
                uptime_secs: self.started.elapsed().as_secs_f64(),
                home: self.home.root.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                holder: self.holder_status(),
            })),
            Request::Mount(spec) => self.mount(*spec).map(|m| Reply::Mounted(Box::new(m))),
            Request::Umount { mountpoint } => {
                let root = lock(&self.mounts)
                    .remove(&mountpoint)
                    .ok_or_else(|| not_mounted(&mountpoint))?;
                self.unbind(&mountpoint, &root).map(|()| Reply::Unmounted)
            }
            Request::Trace { mountpoint } => self
                .with_served(&mountpoint, |s| s.trace())
                .ok_or_else(|| not_mounted(&mountpoint))?
                .map(|t| Reply::Trace(Box::new(t))),
            Request::Stat { mountpoint } => {
                let root = lock(&self.mounts).get(&mountpoint).cloned();
                root.and_then(|root| self.stats_of(&mountpoint, &root))
                    .map(|s| Reply::Stat(Box::new(s)))
                    .ok_or_else(|| not_mounted(&mountpoint))
            }
            Request::WillRun {
                mountpoint,
                process,
            } => self
                .with_served(&mountpoint, |s| s.fetcher.will_run(process))
                .map(|()| Reply::WillRun)
                .ok_or_else(|| not_mounted(&mountpoint)),
            Request::List => {
                let mounts: Vec<(PathBuf, PathBuf)> = lock(&self.mounts)
                    .iter()
                    .map(|(mp, root)| (mp.clone(), root.clone()))
                    .collect();
                let mut list: Vec<crate::api::Stats> = mounts
                    .iter()
                    .filter_map(|(mp, root)| self.stats_of(mp, root))
                    .collect();
                list.sort_by(|a, b| a.mountpoint.cmp(&b.mountpoint));
                Ok(Reply::List(list))
            }
            Request::CacheStat { cache_dir } => {
                let store = self.store_for_maintenance(&cache_dir)?;
                let stats = store.stats().map_err(|e| cache_error(&cache_dir, e))?;
                Ok(Reply::CacheStat(stats))
            }
            Request::CachePrune {
                cache_dir,
                max_bytes,
                mounted_too,
            } => {
                let store = self.store_for_maintenance(&cache_dir)?;
                let report = store
                    .prune(max_bytes, mounted_too)
                    .map_err(|e| cache_error(&cache_dir, e))?;
                Ok(Reply::CachePruned(report))
            }
            Request::Shutdown => {
                self.shutdown();
                Ok(Reply::ShuttingDown)
            }
        }
    }

    /// Runs `f` on the served image `mountpoint` is bound to.
    fn with_served<T>(&self, mountpoint: &Path, f: impl FnOnce(&Served) -> T) -> Option<T> {
        let root = lock(&self.mounts).get(mountpoint)?.clone();
        lock(&self.served).get(&root).map(f)
    }

    /// The statistics of mount point `mp`, bound to the served image at `root`.
    fn stats_of(&self, mp: &Path, root: &Path) -> Option<crate::api::Stats> {
        let bound = lock(&self.mounts).values().filter(|r| *r == root).count();
        let served = lock(&self.served);
        Some(served.get(root)?.stats_at(mp, bound as u64))
    }

    /// Mounts `spec`, unless its mount point is mounted or being mounted.
    fn mount(&self, spec: crate::api::MountSpec) -> Result<Mounted, DaemonError> {
        let mp = spec.mountpoint.clone();
        if lock(&self.mounts).contains_key(&mp) || !lock(&self.pending).insert(mp.clone()) {
            return Err(DaemonError::AlreadyExists(format!(
                "{} is already mounted by hoist",
                mp.display()
            )));
        }
        let result = self.mount_pending(spec);
        lock(&self.pending).remove(&mp);
        result
    }

    fn mount_pending(&self, spec: crate::api::MountSpec) -> Result<Mounted, DaemonError> {
        let t0 = Instant::now();
        let mp = spec.mountpoint.clone();
        crate::served::check_mountpoint(&spec)?;
        let (store, inflight) = self.store(&spec.cache_dir, spec.cache_max_bytes)?;
        let source = crate::served::image_source(&spec, &store, None)?;
        let (_, digest) = source.manifest().map_err(crate::image::image_error)?;
        let root = self
            .home
            .run()
            .join("images")
            .join(served_key(&spec, &digest));
        let starting = lock(&self.starting)
            .entry(root.clone())
            .or_default()
            .clone();
        let _one_at_a_time = lock(&starting);
        let fresh = !lock(&self.served).contains_key(&root);
        if fresh {
            let images = self.home.run().join("images");
            self.home
                .private_dir(&self.home.run())
                .and_then(|()| std::fs::create_dir_all(&root))
                .map_err(|e| {
                    DaemonError::Unavailable(format!("creating {}: {e}", images.display()))
                })?;
            let private = crate::api::MountSpec {
                mountpoint: root.clone(),
                ..spec.clone()
            };
            let started = Served::start_from(private, source, store, inflight, &self.home, t0)
                .and_then(|served| remember(&self.home, &served).map(|()| served));
            let mut served = match started {
                Ok(served) => served,
                Err(e) => {
                    let _ = std::fs::remove_dir(&root);
                    return Err(e);
                }
            };
            self.hold(&mut served);
            lock(&self.served).insert(root.clone(), served);
        }
        // Recorded first: a server killed between the two leaves a record to clean up
        // by, not a mount nobody knows.
        let bound = remember_bind(&self.home, &mp, &root, &spec.image).and_then(|()| {
            kernel::bind(&root, &mp).map_err(|e| {
                DaemonError::Internal(format!(
                    "bind-mounting {} on {}: {e}",
                    root.display(),
                    mp.display()
                ))
            })
        });
        if let Err(e) = bound {
            if kernel::is_mountpoint(&mp) {
                let _ = kernel::unmount_lazy(&mp);
            }
            let _ = std::fs::remove_file(self.record_path(&mp));
            if let Err(e) = self.stop_unused(&root) {
                tracing::warn!("{e}");
            }
            return Err(e);
        }
        lock(&self.mounts).insert(mp.clone(), root.clone());
        let gone = || DaemonError::Internal(format!("{} went away", root.display()));
        let stats = self.stats_of(&mp, &root).ok_or_else(gone)?;
        let served = lock(&self.served);
        Ok(Mounted {
            stats,
            config: served.get(&root).ok_or_else(gone)?.config().clone(),
        })
    }

    /// Detaches the mount point `mp`, bound to `root`, and stops serving the image if
    /// no other mount point is bound to it.
    fn unbind(&self, mp: &Path, root: &Path) -> Result<(), DaemonError> {
        let detached = match kernel::is_mountpoint(mp) {
            true => kernel::unmount_lazy(mp)
                .map_err(|e| DaemonError::Internal(format!("unmounting {}: {e}", mp.display()))),
            false => Ok(()),
        };
        let _ = std::fs::remove_file(self.record_path(mp));
        let stopped = self.stop_if_unused(root);
        detached.and(stopped)
    }

    /// Stops serving the image at `root` if no mount point is bound to it.
    fn stop_if_unused(&self, root: &Path) -> Result<(), DaemonError> {
        let starting = lock(&self.starting).get(root).cloned();
        let _one_at_a_time = starting.as_ref().map(|s| lock(s));
        self.stop_unused(root)
    }

    /// [`Daemon::stop_if_unused`], for a caller that holds the image's lock.
    fn stop_unused(&self, root: &Path) -> Result<(), DaemonError> {
        if lock(&self.mounts).values().any(|r| r == root) {
            return Ok(());
        }
        let Some(served) = lock(&self.served).remove(root) else {
            return Ok(());
        };
        let stopped = served.stop();
        let _ = std::fs::remove_file(self.record_path(root));
        self.release(root);
        let _ = std::fs::remove_dir(root);
        stopped
    }

    /// Unmounts everything.
    pub fn shutdown(&self) {
        let mounts: Vec<(PathBuf, PathBuf)> = lock(&self.mounts).drain().collect();
        for (mp, root) in mounts {
            if let Err(e) = self.unbind(&mp, &root) {
                tracing::warn!("{e}");
            }
        }
        let roots: Vec<PathBuf> = lock(&self.served).keys().cloned().collect();
        for root in roots {
            if let Err(e) = self.stop_if_unused(&root) {
                tracing::warn!("{e}");
            }
        }
    }

    /// Hands the holder what a successor needs to serve `served` again.
    fn hold(&self, served: &mut Served) {
        let Some(holder) = &self.holder else { return };
        let key = mount_id(&served.spec().mountpoint);
        let dev = served.take_dev();
        let record = serde_json::to_string(&served.held()).unwrap_or_default();
        let fds: Vec<_> = dev.iter().map(|d| d.as_fd()).collect();
        if let Err(e) = holder.hold(&key, record, &fds) {
            tracing::warn!(
                "{}: {e}; the mount will not survive this server",
                served.spec().mountpoint.display()
            );
        }
    }

    /// Has the holder close what it keeps of the mount at `mountpoint`.
    fn release(&self, mountpoint: &Path) {
        if let Some(holder) = &self.holder {
            if let Err(e) = holder.release(&mount_id(mountpoint)) {
                tracing::warn!("{e}");
            }
        }
    }

    /// Serves again the mounts the holder kept from a previous server; a mount that
    /// cannot be served again is detached and forgotten.
    fn adopt(&self, held: Vec<(String, String, Vec<OwnedFd>)>) {
        for (key, record, fds) in held {
            let resumed = serde_json::from_str::<HeldMount>(&record)
                .map_err(|e| DaemonError::Internal(format!("the held record of {key}: {e}")))
                .and_then(|h| {
                    let (store, inflight) =
                        self.store(&h.spec.cache_dir, h.spec.cache_max_bytes)?;
                    Served::resume(h, fds, store, inflight, &self.home)
                });
            match resumed {
                Ok(served) => {
                    let mp = served.spec().mountpoint.clone();
                    lock(&self.served).insert(mp, served);
                }
                Err(e) => {
                    tracing::warn!("mount {key} cannot be served again: {e}; detaching it");
                    forget_record(&self.home.mounts().join(format!("{key}.json")));
                    if let Some(holder) = &self.holder {
                        let _ = holder.release(&key);
                    }
                }
            }
        }
    }

    /// Takes back the mount points bound to the served images a predecessor left (from
    /// their records), then detaches the mounts a daemon that died left behind (their
    /// FUSE servers are gone, so they answer ENOTCONN), and forgets them: those its
    /// holder did not keep.
    fn clean_up_after_predecessor(&self) {
        let Ok(dir) = std::fs::read_dir(self.home.mounts()) else {
            return;
        };
        let records: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        for path in &records {
            let Some(r) = std::fs::read(path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
            else {
                continue;
            };
            let Some(root) = r.root else { continue };
            if lock(&self.served).contains_key(&root) && kernel::is_mountpoint(&r.mountpoint) {
                lock(&self.mounts).insert(r.mountpoint, root);
            }
        }
        let served: Vec<PathBuf> = lock(&self.served).keys().cloned().collect();
        for root in served {
            // A served image none of whose mount points is left.
            if let Err(e) = self.stop_if_unused(&root) {
                tracing::warn!("{e}");
            }
        }
        let mut live: HashSet<String> = lock(&self.mounts)
            .keys()
            .map(|mp| format!("{}.json", mount_id(mp)))
            .collect();
        live.extend(
            lock(&self.served)
                .keys()
                .map(|root| format!("{}.json", mount_id(root))),
        );
        let Ok(dir) = std::fs::read_dir(self.home.mounts()) else {
            return;
        };
        for e in dir.flatten() {
            if !live.contains(&e.file_name().to_string_lossy().into_owned()) {
                forget_record(&e.path());
            }
        }
    }
}

/// Writes the record of a mount: what `hoist umount` and the next daemon need to detach
/// it if its server dies, and what tells hoist's mounts from others.
pub fn remember(home: &Home, served: &Served) -> Result<(), DaemonError> {
    let mp = &served.spec().mountpoint;
    let record = Record {
        mountpoint: mp.clone(),
        image: served.spec().image.clone(),
        devdir: served.devdir().map(Path::to_path_buf),
        pid: std::process::id(),
        root: None,
    };
    write_record(home, &record)
}

/// Writes the record of mount point `mp`, bound to the served image at `root`.
fn remember_bind(home: &Home, mp: &Path, root: &Path, image: &str) -> Result<(), DaemonError> {
    let record = Record {
        mountpoint: mp.to_path_buf(),
        image: image.to_string(),
        devdir: None,
        pid: std::process::id(),
        root: Some(root.to_path_buf()),
    };
    write_record(home, &record)
}

fn write_record(home: &Home, record: &Record) -> Result<(), DaemonError> {
    let path = home
        .mounts()
        .join(format!("{}.json", mount_id(&record.mountpoint)));
    std::fs::create_dir_all(home.mounts())
        .and_then(|()| std::fs::write(&path, serde_json::to_vec(record).unwrap_or_default()))
        .map_err(|e| {
            DaemonError::Unavailable(format!("writing the mount record {}: {e}", path.display()))
        })
}

/// Removes the record of the mount at `mountpoint`.
pub fn forget(home: &Home, mountpoint: &Path) {
    let _ = std::fs::remove_file(home.mounts().join(format!("{}.json", mount_id(mountpoint))));
}

/// The name of the served image a mount of `spec` shares: a hash of the manifest's
/// digest and of every option but the mount point (a recording mount is never
/// shared: its record is its own).
fn served_key(spec: &crate::api::MountSpec, manifest: &hoist_oci::Digest) -> String {
    let mut options = spec.clone();
    if !spec.record {
        options.mountpoint = PathBuf::new();
    }
    let mut bytes = serde_json::to_vec(&options).unwrap_or_default();
    bytes.extend_from_slice(manifest.as_str().as_bytes());
    hoist_oci::Digest::of(&bytes).hex()[..16].to_string()
}

/// A chunk cache that cannot be opened: its directory named, and the disk's fault.
fn cache_error(dir: &Path, e: std::io::Error) -> DaemonError {
    DaemonError::Unavailable(format!("the chunk cache {}: {e}", dir.display()))
}

/// Detaches the mount at `mountpoint` that a daemon of `home` which is no longer running
/// left, with its private mounts, and forgets it. False when no daemon recorded it.
pub fn detach_orphan(home: &Home, mountpoint: &Path) -> bool {
    let path = home.mounts().join(format!("{}.json", mount_id(mountpoint)));
    path.exists() && {
        forget_record(&path);
        true
    }
}

/// Detaches what the mount record at `path` names (the mount point and the blob
/// devices' private mount), removes its private directory and the record; for a mount
/// point bound to a served image, the image too if no other mount point is bound to it.
fn forget_record(path: &Path) {
    let record: Option<Record> = std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if let Some(r) = record {
        for mp in std::iter::once(&r.mountpoint).chain(r.devdir.as_ref()) {
            if kernel::is_mountpoint(mp) {
                match kernel::unmount_lazy(mp) {
                    Ok(()) => tracing::info!(
                        "detached {} left by daemon {} ({})",
                        mp.display(),
                        r.pid,
                        r.image
                    ),
                    Err(e) => tracing::warn!("detaching {}: {e}", mp.display()),
                }
            }
        }
        if let Some(run_dir) = r.devdir.as_ref().and_then(|d| d.parent()) {
            let _ = std::fs::remove_dir_all(run_dir);
        }
        // A served image's private mount point (empty once detached).
        if r.mountpoint.parent().and_then(Path::file_name) == Some("images".as_ref()) {
            let _ = std::fs::remove_dir(&r.mountpoint);
        }
        let _ = std::fs::remove_file(path);
        // The served image of the last mount point bound to it goes too.
        if let (Some(root), Some(dir)) = (&r.root, path.parent()) {
            let bound = |p: &Path| {
                std::fs::read(p)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
                    .is_some_and(|o| o.root.as_ref() == Some(root))
            };
            let others = std::fs::read_dir(dir)
                .map(|d| d.flatten().any(|e| bound(&e.path())))
                .unwrap_or(false);
            if !others {
                forget_record(&dir.join(format!("{}.json", mount_id(root))));
            }
        }
    }
    let _ = std::fs::remove_file(path);
}

/// Runs the server of `home` (`hoist daemon serve`, the holder's child): takes from the
/// holder the API socket and the mounts a previous server left, serves them again,
/// then answers requests until a signal or a `shutdown` request. Prints `ready` once
/// it serves.
pub fn serve(home: Home) -> Result<(), String> {
    // The holder's death ends this server at once, and with it the mounts' connections:
    // they fail closed (ENOTCONN), their records stay for `hoist umount` and the next
    // daemon to clean up.
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::Kill))
        .map_err(|e| format!("PR_SET_PDEATHSIG: {e}"))?;
    let (holder, inherited) = HolderClient::hello(&home)?;
    let listener = inherited.listener;
    let daemon = Arc::new(Daemon::new(home.clone(), Some(holder)));
    // A holder that just started holds nothing; one whose server died holds its mounts.
    let (n, t0) = (inherited.mounts.len(), Instant::now());
    daemon.adopt(inherited.mounts);
    if inherited.takeover {
        tracing::info!(
            "server {} took {n} mounts over in {:.3} s",
            std::process::id(),
            t0.elapsed().as_secs_f64()
        );
    }
    daemon.clean_up_after_predecessor();

    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .map_err(|e| format!("installing signal handlers: {e}"))?;
    {
        let daemon = daemon.clone();
        std::thread::spawn(move || {
            if let Some(sig) = signals.forever().next() {
                tracing::info!("signal {sig}: unmounting everything");
                daemon.stop_for_good();
            }
        });
    }
    tracing::info!(
        "hoist daemon {} serving {}",
        std::process::id(),
        home.socket().display()
    );
    println!("ready");
    let _ = std::io::stdout().flush();

    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let daemon = daemon.clone();
        std::thread::spawn(move || {
            if serve_connection(&daemon, conn) {
                daemon.stop_for_good();
            }
        });
    }
    Ok(())
}

impl Daemon {
    /// Unmounts everything, tells the holder not to start another server, and exits.
    fn stop_for_good(&self) -> ! {
        self.shutdown();
        if let Some(holder) = &self.holder {
            if let Err(e) = holder.stopping() {
                tracing::warn!("{e}");
            }
        }
        std::process::exit(0)
    }

    /// The holder's status, if this server has one.
    pub fn holder_status(&self) -> Option<crate::holder::HolderInfo> {
        self.holder.as_ref().and_then(|h| h.status().ok())
    }
}

/// Serves one connection; true when it asked the daemon to exit.
fn serve_connection(daemon: &Daemon, conn: UnixStream) -> bool {
    let Ok(mut writer) = conn.try_clone() else {
        return false;
    };
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return false };
        let req: Result<Request, _> = serde_json::from_str(&line);
        let exit = matches!(req, Ok(Request::Shutdown));
        let resp: Response = match req {
            Ok(req) => daemon.handle(req),
            Err(e) => Err(DaemonError::InvalidArgument(format!(
                "bad request (a client of another hoist version?): {e}"
            ))),
        };
        let mut out = serde_json::to_vec(&resp).unwrap_or_default();
        out.push(b'\n');
        if writer.write_all(&out).is_err() {
            return exit;
        }
        if exit {
            return true;
        }
    }
    false
}

/// How long a client waits for a daemon to start (its own, or one another client or
/// the service manager is starting), at most.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits, at most `timeout`, until the daemon of `home` has exited: its holder releases
/// `daemon.lock` last, after its sockets are closed. A command run right after `hoist
/// daemon stop` then starts a new daemon instead of reaching the one going away.
pub fn wait_stopped(home: &Home, timeout: Duration) -> Result<(), String> {
    let path = home.root.join("daemon.lock");
    let lock = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("opening {}: {e}", path.display())),
    };
    if !flock_by(
        &lock,
        FlockOperation::NonBlockingLockShared,
        Instant::now() + timeout,
    ) {
        return Err(format!(
            "the hoist daemon of {} was told to stop but still runs after {} s (see {})",
            home.root.display(),
            timeout.as_secs(),
            home.log().display()
        ));
    }
    Ok(())
}

/// Takes a lock on `file` with `op` (non-blocking), trying until `deadline`: flock has
/// no timeout of its own. Returns whether it got it.
fn flock_by(file: &std::fs::File, op: FlockOperation, deadline: Instant) -> bool {
    while rustix::fs::flock(file, op).is_err() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Makes sure a daemon serves `home`: connects, or starts `exe daemon run` in the
/// background (its own process group, so the terminal's signals do not reach it; its
/// output in `daemon.log`) and waits until it is ready. Clients that find no daemon at
/// once take turns on `start.lock`: the first starts it, the others then find it
/// running, so a node starting many containers at once starts one daemon and every
/// client uses it.
pub fn spawn_and_wait(home: &Home, exe: &Path) -> Result<Client, String> {
    if let Ok(c) = Client::connect(&home.socket()) {
        return Ok(c);
    }
    home.create()
        .map_err(|e| format!("creating hoist's state root: {e}"))?;
    let deadline = Instant::now() + START_TIMEOUT;
    let lock_path = home.root.join("start.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("opening {}: {e}", lock_path.display()))?;
    if !flock_by(&lock, FlockOperation::NonBlockingLockExclusive, deadline) {
        return Err(format!(
            "another hoist command has been starting the daemon of {} for {} s (see {})",
            home.root.display(),
            START_TIMEOUT.as_secs(),
            home.log().display()
        ));
    }
    // Whoever held the lock may have started it.
    if let Ok(c) = Client::connect(&home.socket()) {
        return Ok(c);
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(home.log())
        .map_err(|e| format!("opening {}: {e}", home.log().display()))?;
    use std::os::unix::process::CommandExt;
    let mut child = std::process::Command::new(exe)
        .args(["daemon", "run"])
        .env("HOIST_HOME", &home.root)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("starting {} daemon run: {e}", exe.display()))?;
    // The daemon prints `ready` once its socket accepts; read on a thread so that the
    // wait is bounded.
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(out) = child.stdout.take() {
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
    }
    let line = rx
        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        .unwrap_or_default();
    if line.trim() == "ready" {
        return Client::connect(&home.socket()).map_err(|e| e.to_string());
    }
    let _ = child.kill();
    let _ = child.wait();
    // `busy`: a daemon started another way (`hoist daemon run` by a service manager)
    // holds the daemon lock and is about to listen.
    while line.trim() == "busy" && Instant::now() < deadline {
        if let Ok(c) = Client::connect(&home.socket()) {
            return Ok(c);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let tail = std::fs::read_to_string(home.log()).unwrap_or_default();
    let tail: Vec<&str> = tail.lines().rev().take(5).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    Err(format!(
        "the hoist daemon did not start (log {}):\n{}",
        home.log().display(),
        tail.join("\n")
    ))
}
