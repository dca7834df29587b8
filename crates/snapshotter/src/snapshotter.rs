//! The snapshotter's logic, apart from gRPC: snapshots as overlayfs directories, and
//! hoist images as one lazy mount each.
//!
//! An ordinary layer is what containerd's own overlayfs snapshotter makes of it: an
//! active snapshot with a directory of its own, which containerd fills from the layer's
//! tar and then commits; a container's root is an overlay of its committed ancestors
//! with an upper directory of its own.
//!
//! A hoist layer (labelled [`LAYER_LABEL`] by `hoist convert`) is never unpacked.
//! `Prepare` commits it at once under the name containerd asked for in
//! [`REF_LABEL`], keeping the labels and the parent, and answers `AlreadyExists`:
//! containerd then finds the committed snapshot (`List` with a filter, and `Stat`) and
//! does not download the layer. The metadata layer's snapshot mounts the whole image
//! through the hoist daemon; the data-blob and trace layers are empty placeholders. A
//! container's overlay then has the image's mount as its lower directory.

use crate::filter::Filter;
use crate::store::{Changes, Content, Kind, Snapshot, Store, StoreError, Time};
use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// The label containerd sets on a snapshot it prepares to unpack a layer: the name the
/// committed snapshot will have (the layer's chain ID).
pub const REF_LABEL: &str = "containerd.io/snapshot.ref";
/// The label (from the layer's annotation) marking a hoist layer: `blob`, `meta` or
/// `trace`.
pub const LAYER_LABEL: &str = "containerd.io/snapshot/hoist.layer";
/// The image reference CRI passes (with `disable_snapshot_annotations = false`).
pub const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// The image's manifest digest, as CRI passes it.
pub const CRI_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// The digest of the layer being prepared, as CRI passes it.
pub const CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";

/// How long an image found to have no hoist counterpart is not asked about again.
const MISS_MEMORY: std::time::Duration = std::time::Duration::from_secs(300);

/// A counterpart lookup: when, and what it found.
type Lookup = (std::time::Instant, Option<Counterpart>);

/// The hoist image an index lists beside an ordinary manifest (`hoist convert
/// --merge-platform`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counterpart {
    /// The hoist image, `docker://REPO@DIGEST`.
    pub image: String,
    /// The ordinary manifest's layer digests, in order.
    pub layers: Vec<String>,
}

/// Why a request failed; each maps to the gRPC code containerd understands.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No snapshot of that key.
    #[error("{0}")]
    NotFound(String),
    /// The key is taken (or, for a hoist layer, the snapshot is ready).
    #[error("{0}")]
    AlreadyExists(String),
    /// A malformed request.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request does not fit the snapshot's state (a parent not committed, a
    /// snapshot with children).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A service hoist depends on did not answer (the daemon, the registry).
    #[error("{0}")]
    Unavailable(String),
    /// A failure of the snapshotter's own (the disk, a bug).
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Error {
        Error::Internal(e.to_string())
    }
}

/// Mounts hoist images lazily: the hoist daemon, in production.
pub trait ImageMounter: Send + Sync + 'static {
    /// Mounts `image` (`docker://REPO@DIGEST`) on `mountpoint` (an empty directory) to
    /// serve containers.
    fn mount(&self, image: &str, mountpoint: &Path) -> Result<(), Error>;
    /// Unmounts what [`ImageMounter::mount`] mounted there; nothing mounted is no error.
    fn umount(&self, mountpoint: &Path) -> Result<(), Error>;
    /// Whether `mountpoint` is served.
    fn is_mounted(&self, mountpoint: &Path) -> bool;
    /// The hoist image that the index of `image_ref` lists for its ordinary manifest
    /// `manifest_digest`, if any.
    fn counterpart(
        &self,
        image_ref: &str,
        manifest_digest: &str,
    ) -> Result<Option<Counterpart>, Error> {
        let _ = (image_ref, manifest_digest);
        Ok(None)
    }
}

/// A mount that makes a snapshot's tree, for containerd to perform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The filesystem type: `bind` or `overlay`.
    pub fs_type: String,
    /// The source.
    pub source: String,
    /// The options.
    pub options: Vec<String>,
}

/// A snapshot as `Stat` and `List` describe it.
#[derive(Debug, Clone)]
pub struct Info {
    /// Its key or name.
    pub name: String,
    /// Its record.
    pub snapshot: Snapshot,
}

/// The snapshotter.
pub struct Snapshotter {
    store: Mutex<Store>,
    images: Box<dyn ImageMounter>,
    /// Held while a hoist image is mounted, so that two pulls of one image mount it once.
    mounting: Mutex<()>,
    /// Ordinary manifests looked up for a hoist counterpart, by image reference and
    /// manifest digest, with when they were looked up.
    counterparts: Mutex<std::collections::HashMap<(String, String), Lookup>>,
}

impl Snapshotter {
    /// Opens the snapshots under `root` and mounts again the hoist images whose mounts
    /// are gone (after a reboot, or a daemon stopped by hand).
    pub fn open(root: &Path, images: Box<dyn ImageMounter>) -> Result<Snapshotter, Error> {
        let store = Store::open(root)?;
        for (name, snap) in store.all() {
            if let Content::HoistImage { image } = &snap.content {
                let mp = image_dir(&store, snap.id);
                if !images.is_mounted(&mp) {
                    tracing::info!("{name}: mounting {image} again on {}", mp.display());
                    if let Err(e) = images.mount(image, &mp) {
                        tracing::warn!("{name}: mounting {image}: {e}");
                    }
                }
            }
        }
        Ok(Snapshotter {
            store: Mutex::new(store),
            images,
            mounting: Mutex::new(()),
            counterparts: Mutex::default(),
        })
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A writable snapshot `key` over committed `parent` ("" for none). A hoist layer
    /// is committed at once, and the answer is `AlreadyExists`.
    pub fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, Error> {
        if let (Some(part), Some(target)) = (labels.get(LAYER_LABEL), labels.get(REF_LABEL)) {
            let (part, target) = (part.clone(), target.clone());
            return Err(self.hoist_layer(&part, &target, parent, labels, None));
        }
        // A layer of an ordinary manifest that an index pairs with a hoist image: its
        // layers are placeholders, and the last one mounts the hoist image.
        if let (Some(target), Some(layer)) = (
            labels.get(REF_LABEL).cloned(),
            labels.get(CRI_LAYER_DIGEST).cloned(),
        ) {
            if let Some(cp) = self.counterpart_of(&labels) {
                let last = cp.layers.last() == Some(&layer);
                let part = if last { "meta" } else { "blob" };
                let image = last.then_some(cp.image);
                return Err(self.hoist_layer(part, &target, parent, labels, image));
            }
        }
        self.create(Kind::Active, key, parent, labels)
    }

    /// The hoist counterpart of the image whose layer CRI prepares, looked up once per
    /// manifest. A lookup that fails is logged and the layer unpacked as usual.
    fn counterpart_of(&self, labels: &BTreeMap<String, String>) -> Option<Counterpart> {
        let (Some(reference), Some(manifest)) =
            (labels.get(CRI_IMAGE_REF), labels.get(CRI_MANIFEST_DIGEST))
        else {
            return None;
        };
        let key = (reference.clone(), manifest.clone());
        if let Some((when, known)) = self
            .counterparts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            // A hoist image found stays found; a miss is asked again after a while (the
            // index may have been converted since).
            if known.is_some() || when.elapsed() < MISS_MEMORY {
                return known.clone();
            }
        }
        let found = match self.images.counterpart(reference, manifest) {
            Ok(found) => {
                if let Some(cp) = &found {
                    tracing::info!(
                        "{reference} ({manifest}): serving its hoist image {}",
                        cp.image
                    );
                }
                found
            }
            Err(e) => {
                // Remembered as a miss too, so that the image's other layers do not each
                // wait on an unreachable registry.
                tracing::warn!(
                    "{reference}: looking for a hoist image beside {manifest}: {e}; unpacking it"
                );
                None
            }
        };
        self.counterparts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, (std::time::Instant::now(), found.clone()));
        found
    }

    /// A read-only snapshot `key` of committed `parent`.
    pub fn view(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, Error> {
        self.create(Kind::View, key, parent, labels)
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, Error> {
        check_key(key)?;
        let mut store = self.store();
        if store.get(key).is_some() {
            return Err(Error::AlreadyExists(format!("snapshot {key} exists")));
        }
        let parent = committed_parent(&store, parent)?;
        let root = store.root().to_path_buf();
        store.change(|c: &mut Changes<'_>| {
            let id = c.next_id();
            let dir = root.join(id.to_string());
            make_dirs(&dir)?;
            let now = Time::now();
            c.insert(
                key,
                Snapshot {
                    id,
                    kind,
                    parent,
                    labels,
                    created: now,
                    updated: now,
                    content: Content::Dir,
                    usage: None,
                },
            );
            Ok::<_, Error>(())
        })?;
        mounts_of(&store, key).inspect_err(|_| {
            // A chain that cannot be mounted leaves nothing behind.
            if let Some(id) = store.get(key).map(|s| s.id) {
                let _ = store.change(|c| {
                    c.remove(key);
                    Ok::<_, Error>(())
                });
                let _ = std::fs::remove_dir_all(store.dir(id));
            }
        })
    }

    /// Commits hoist layer `target` (a `blob`, `meta` or `trace` part) over `parent`;
    /// mounts the image for the `meta` part. Returns the error to answer: AlreadyExists
    /// once the snapshot is there.
    fn hoist_layer(
        &self,
        part: &str,
        target: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        image: Option<String>,
    ) -> Error {
        let _one = self.mounting.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = check_key(target) {
            return e;
        }
        let (id, image) = {
            let store = self.store();
            if store.get(target).is_some() {
                return Error::AlreadyExists(format!("snapshot {target} exists"));
            }
            if let Err(e) = committed_parent(&store, parent) {
                return e;
            }
            let image = match (part, image) {
                ("meta", Some(image)) => Some(image),
                ("meta", None) => match image_of(&labels) {
                    Ok(image) => Some(image),
                    Err(e) => return e,
                },
                ("blob" | "trace", _) => None,
                (other, _) => {
                    return Error::InvalidArgument(format!(
                        "layer {target}: unknown hoist layer part {other:?} in label {LAYER_LABEL} (blob, meta or trace)"
                    ))
                }
            };
            // The id is taken now so that the mount point is known; it is recorded
            // only once the mount worked.
            let mut store = store;
            let id = match store.change(|c| Ok::<_, Error>(c.next_id())) {
                Ok(id) => id,
                Err(e) => return e,
            };
            (id, image)
        };
        let dir = self.store().dir(id);
        let content = match image {
            None => Content::HoistLayer,
            Some(image) => {
                let mp = dir.join("image");
                if let Err(e) = make_dirs(&dir).and_then(|()| {
                    std::fs::create_dir_all(&mp)
                        .map_err(|e| Error::Internal(format!("creating {}: {e}", mp.display())))
                }) {
                    return e;
                }
                tracing::info!("layer {target}: mounting {image} on {}", mp.display());
                if let Err(e) = self.images.mount(&image, &mp) {
                    let _ = std::fs::remove_dir_all(&dir);
                    return e;
                }
                Content::HoistImage { image }
            }
        };
        let now = Time::now();
        let snap = Snapshot {
            id,
            kind: Kind::Committed,
            parent: (!parent.is_empty()).then(|| parent.to_string()),
            labels,
            created: now,
            updated: now,
            content,
            usage: Some((0, 0)),
        };
        let mut store = self.store();
        match store.change(|c| {
            c.insert(target, snap);
            Ok::<_, Error>(())
        }) {
            Ok(()) => Error::AlreadyExists(format!(
                "snapshot {target} exists (a hoist layer, served lazily)"
            )),
            Err(e) => {
                drop(store);
                let _ = self.images.umount(&dir.join("image"));
                let _ = std::fs::remove_dir_all(&dir);
                e
            }
        }
    }

    /// The mounts of active or view snapshot `key`.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>, Error> {
        mounts_of(&self.store(), key)
    }

    /// Commits active snapshot `key` as `name`.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), Error> {
        check_key(name)?;
        let (id, fs) = {
            let store = self.store();
            let snap = store
                .get(key)
                .ok_or_else(|| Error::NotFound(format!("snapshot {key} does not exist")))?;
            if snap.kind != Kind::Active {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key} is not active, so it cannot be committed"
                )));
            }
            (snap.id, store.dir(snap.id).join("fs"))
        };
        // Measured outside the lock: a large layer takes a while to walk.
        let usage = disk_usage(&fs);
        let mut store = self.store();
        if store.get(name).is_some() {
            return Err(Error::AlreadyExists(format!("snapshot {name} exists")));
        }
        store.change(|c| {
            let mut snap = c
                .remove(key)
                .filter(|s| s.id == id && s.kind == Kind::Active)
                .ok_or_else(|| Error::NotFound(format!("snapshot {key} changed meanwhile")))?;
            snap.kind = Kind::Committed;
            snap.labels = labels;
            snap.updated = Time::now();
            snap.usage = Some(usage);
            c.insert(name, snap);
            Ok(())
        })
    }

    /// Removes snapshot `key`, which no other has as its parent; unmounts its image.
    pub fn remove(&self, key: &str) -> Result<(), Error> {
        // The record goes first, under the same lock as the check for children, so no
        // child can be prepared on a snapshot that is going away; then its mount and
        // its files (Cleanup takes what a failure here leaves).
        let (snap, dir) = {
            let mut store = self.store();
            let snap = store
                .get(key)
                .cloned()
                .ok_or_else(|| Error::NotFound(format!("snapshot {key} does not exist")))?;
            if store.has_children(key) {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key} has children; remove them first"
                )));
            }
            store.change(|c| {
                c.remove(key);
                Ok::<_, Error>(())
            })?;
            let dir = store.dir(snap.id);
            (snap, dir)
        };
        if let Content::HoistImage { image } = &snap.content {
            if let Err(e) = self.images.umount(&dir.join("image")) {
                tracing::warn!("{key}: unmounting {image}: {e} (Cleanup tries again)");
                return Ok(());
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("removing {}: {e} (Cleanup tries again)", dir.display());
            }
        }
        Ok(())
    }

    /// Snapshot `key`.
    pub fn stat(&self, key: &str) -> Result<Info, Error> {
        let store = self.store();
        let snap = store
            .get(key)
            .ok_or_else(|| Error::NotFound(format!("snapshot {key} does not exist")))?;
        Ok(Info {
            name: key.to_string(),
            snapshot: snap.clone(),
        })
    }

    /// Changes the labels of `name`: all of them (no paths, or the path `labels`), or
    /// those named `labels.KEY` (a key absent from `labels` is removed).
    pub fn update(
        &self,
        name: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<Info, Error> {
        let mut store = self.store();
        store.change(|c| {
            let snap = c
                .get_mut(name)
                .ok_or_else(|| Error::NotFound(format!("snapshot {name} does not exist")))?;
            if paths.is_empty() {
                snap.labels = labels.clone();
            }
            for path in paths {
                if path == "labels" {
                    snap.labels = labels.clone();
                } else if let Some(k) = path.strip_prefix("labels.") {
                    match labels.get(k) {
                        Some(v) => snap.labels.insert(k.to_string(), v.clone()),
                        None => snap.labels.remove(k),
                    };
                } else {
                    return Err(Error::InvalidArgument(format!(
                        "cannot update field {path:?} of snapshot {name} (only labels)"
                    )));
                }
            }
            snap.updated = Time::now();
            Ok(Info {
                name: name.to_string(),
                snapshot: snap.clone(),
            })
        })
    }

    /// Bytes and inodes snapshot `key` holds of its own. Hoist snapshots hold none:
    /// their data is in the shared chunk cache.
    pub fn usage(&self, key: &str) -> Result<(i64, i64), Error> {
        let (snap, fs) = {
            let store = self.store();
            let snap = store
                .get(key)
                .cloned()
                .ok_or_else(|| Error::NotFound(format!("snapshot {key} does not exist")))?;
            let fs = store.dir(snap.id).join("fs");
            (snap, fs)
        };
        Ok(match (snap.usage, snap.content) {
            (Some(u), _) => u,
            (None, Content::Dir) => disk_usage(&fs),
            (None, _) => (0, 0),
        })
    }

    /// The snapshots any of `filters` matches (all when there are none).
    pub fn list(&self, filters: &[String]) -> Result<Vec<Info>, Error> {
        let filters: Vec<Filter> = filters
            .iter()
            .map(|f| Filter::parse(f).map_err(|e| Error::InvalidArgument(e.to_string())))
            .collect::<Result<_, _>>()?;
        let store = self.store();
        Ok(store
            .all()
            .filter(|(name, snap)| {
                filters.is_empty() || filters.iter().any(|f| f.matches(name, snap))
            })
            .map(|(name, snap)| Info {
                name: name.clone(),
                snapshot: snap.clone(),
            })
            .collect())
    }

    /// Removes directories under the root that no snapshot owns (left by a crash
    /// between a record's removal and its directory's).
    pub fn cleanup(&self) -> Result<(), Error> {
        // Not while an image is being mounted: its directory is not recorded yet.
        let _one = self.mounting.lock().unwrap_or_else(|p| p.into_inner());
        let store = self.store();
        let owned: std::collections::HashSet<String> =
            store.all().map(|(_, s)| s.id.to_string()).collect();
        let entries = std::fs::read_dir(store.root())
            .map_err(|e| Error::Internal(format!("{}: {e}", store.root().display())))?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.parse::<u64>().is_err() || owned.contains(&name) {
                continue;
            }
            let dir = e.path();
            if self.images.is_mounted(&dir.join("image")) {
                let _ = self.images.umount(&dir.join("image"));
            }
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!("cleanup: removing {}: {e}", dir.display());
            }
        }
        Ok(())
    }
}

fn check_key(key: &str) -> Result<(), Error> {
    if key.is_empty() || key.len() > 4096 {
        return Err(Error::InvalidArgument(format!(
            "snapshot key {key:?}: empty or longer than 4096 bytes"
        )));
    }
    Ok(())
}

/// `parent` if it names a committed snapshot; `None` for "".
fn committed_parent(store: &Store, parent: &str) -> Result<Option<String>, Error> {
    if parent.is_empty() {
        return Ok(None);
    }
    match store.get(parent) {
        None => Err(Error::NotFound(format!(
            "parent snapshot {parent} does not exist"
        ))),
        Some(p) if p.kind != Kind::Committed => Err(Error::FailedPrecondition(format!(
            "parent snapshot {parent} is not committed"
        ))),
        Some(_) => Ok(Some(parent.to_string())),
    }
}

/// The image a hoist metadata layer belongs to, from CRI's labels: `docker://REPO@DIGEST`.
fn image_of(labels: &BTreeMap<String, String>) -> Result<String, Error> {
    let (Some(reference), Some(digest)) =
        (labels.get(CRI_IMAGE_REF), labels.get(CRI_MANIFEST_DIGEST))
    else {
        return Err(Error::FailedPrecondition(format!(
            "a hoist image, but containerd did not say which ({CRI_IMAGE_REF} and {CRI_MANIFEST_DIGEST} are missing): pull it through CRI with `disable_snapshot_annotations = false` in the CRI plugin's containerd section (`ctr pull` cannot pull hoist images lazily)"
        )));
    };
    let repo = reference.split('@').next().unwrap_or_default();
    // A tag follows the last `:` after the last `/` (a port comes before it).
    let repo = match repo.rsplit_once('/') {
        Some((host_path, last)) => match last.split_once(':') {
            Some((name, _tag)) => format!("{host_path}/{name}"),
            None => repo.to_string(),
        },
        None => repo.split(':').next().unwrap_or_default().to_string(),
    };
    if repo.is_empty() || !digest.starts_with("sha256:") {
        return Err(Error::InvalidArgument(format!(
            "image {reference:?} with manifest {digest:?}: not a reference hoist can pull"
        )));
    }
    Ok(format!("docker://{repo}@{digest}"))
}

fn make_dirs(dir: &Path) -> Result<(), Error> {
    for sub in ["fs", "work"] {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir.join(sub))
            .map_err(|e| Error::Internal(format!("creating {}: {e}", dir.join(sub).display())))?;
    }
    Ok(())
}

fn image_dir(store: &Store, id: u64) -> PathBuf {
    store.dir(id).join("image")
}

/// The mounts that make snapshot `key`'s tree.
fn mounts_of(store: &Store, key: &str) -> Result<Vec<Mount>, Error> {
    let snap = store
        .get(key)
        .ok_or_else(|| Error::NotFound(format!("snapshot {key} does not exist")))?;
    if snap.kind == Kind::Committed {
        return Err(Error::FailedPrecondition(format!(
            "snapshot {key} is committed: it has no mounts (prepare or view a child)"
        )));
    }
    // Nearest first. A hoist image's mount holds its whole tree: nothing below it is a
    // lower directory. A placeholder with no image above it is a layer some hoist image
    // claimed (an index pairing an ordinary manifest with a hoist one) that this chain
    // shares without that image: it has no files to give.
    let mut lowers: Vec<String> = Vec::new();
    let mut placeholder = None;
    let mut image = false;
    for a in store.ancestors(snap) {
        match &a.content {
            Content::Dir => lowers.push(store.dir(a.id).join("fs").display().to_string()),
            Content::HoistImage { .. } => {
                lowers.push(image_dir(store, a.id).display().to_string());
                image = true;
                break;
            }
            Content::HoistLayer => placeholder = placeholder.or(a.labels.get(REF_LABEL)),
        }
    }
    if let (Some(layer), false) = (placeholder, image) {
        return Err(Error::FailedPrecondition(format!(
            "snapshot {key} stacks on layer {layer}, which a hoist image serves lazily, without that image: the layer has no files of its own. Remove the images that share it and pull this one again"
        )));
    }
    let dir = store.dir(snap.id);
    let fs = dir.join("fs").display().to_string();
    let bind = |source: String, rw: &str| Mount {
        fs_type: "bind".into(),
        source,
        options: vec![rw.into(), "rbind".into()],
    };
    Ok(match (snap.kind, lowers.len()) {
        (Kind::Active, 0) => vec![bind(fs, "rw")],
        (Kind::Active, _) => vec![Mount {
            fs_type: "overlay".into(),
            source: "overlay".into(),
            options: vec![
                format!("workdir={}", dir.join("work").display()),
                format!("upperdir={fs}"),
                format!("lowerdir={}", lowers.join(":")),
            ],
        }],
        (_, 0) => vec![bind(fs, "ro")],
        (_, 1) => vec![bind(lowers[0].clone(), "ro")],
        (_, _) => vec![Mount {
            fs_type: "overlay".into(),
            source: "overlay".into(),
            options: vec![format!("lowerdir={}", lowers.join(":"))],
        }],
    })
}

/// Bytes allocated and inodes under `dir` (each hard-linked inode once).
fn disk_usage(dir: &Path) -> (i64, i64) {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let (mut bytes, mut inodes) = (0i64, 0i64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if seen.insert((meta.dev(), meta.ino())) {
            inodes += 1;
            bytes = bytes.saturating_add(i64::try_from(meta.blocks() * 512).unwrap_or(i64::MAX));
        }
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&p) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        }
    }
    (bytes, inodes)
}

#[cfg(test)]
mod tests;
