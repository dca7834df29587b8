//! Verified chunks on local disk, one file per chunk digest.
//!
//! Layout under the cache directory:
//!
//! ```text
//! chunks/ab/abcdef…   uncompressed chunk bytes, named by their BLAKE3 digest (hex)
//! meta/<sha256 hex>   metadata blobs, named by their OCI digest
//! tmp/                files being written; emptied when a store opens
//! views/<key>         chunks copied into one file for the kernel (see `View`)
//! ```
//!
//! A chunk is written to `tmp/` and renamed into place only after its bytes matched its
//! digest, so a crash mid-write leaves nothing under `chunks/`. Because a rename is not a
//! flush, a crash can still leave a named file with lost contents; every chunk file is
//! therefore hashed again the first time this process opens it, and a file that does not
//! match is deleted and fetched again. Nothing unverified is ever served.
//!
//! One file per digest makes the cache shared by every mount of every image (the same
//! chunk is stored once) and eviction a plain unlink. Chunks that a live mount pins are
//! never evicted.

use sha2::Digest as _;
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

/// A chunk digest (BLAKE3 of the uncompressed bytes).
pub type ChunkDigest = [u8; 32];

/// Usage figures of a store.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct StoreStats {
    /// Chunk files.
    pub chunks: u64,
    /// Bytes chunk files take on disk (whole blocks).
    pub chunk_bytes: u64,
    /// Metadata blobs.
    pub metas: u64,
    /// Bytes in metadata blobs.
    pub meta_bytes: u64,
    /// The size limit for chunks and views.
    pub max_bytes: u64,
    /// Chunks pinned by live mounts.
    pub pinned: u64,
    /// Views (chunks copied into file- or blob-shaped files for the kernel).
    pub views: u64,
    /// Bytes views take on disk.
    pub view_bytes: u64,
    /// Chunk files this process evicted.
    #[serde(default)]
    pub evictions: u64,
    /// Chunks fetched again after this process evicted them.
    #[serde(default)]
    pub refetches: u64,
}

/// What a prune removed.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct PruneReport {
    /// Chunk files and views removed.
    pub removed: u64,
    /// Bytes freed.
    pub freed: u64,
    /// Bytes of chunks and views left.
    pub left: u64,
}

/// The chunk store: shared by every mount in a process.
#[derive(Debug)]
pub struct ChunkStore {
    root: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
    /// Held while room is made on a full disk, so that one writer evicts at a time.
    room: Mutex<()>,
    /// Wakes the store's eviction thread, when it has one ([`ChunkStore::open_shared`]):
    /// a writer that takes the cache over its limit then leaves the scan of `chunks/`
    /// to that thread instead of running it before its readers are woken.
    evictor: Mutex<Option<std::sync::mpsc::SyncSender<()>>>,
}

#[derive(Debug, Default)]
struct State {
    /// Chunks hashed by this process since it opened the store.
    verified: HashSet<ChunkDigest>,
    /// Views built or verified by this process, by key, with the identity of the file
    /// that was verified (a file put in its place is verified again).
    views: HashMap<String, FileId>,
    /// Pin counts of chunks that live mounts use.
    pinned: HashMap<ChunkDigest, usize>,
    /// Pin counts of the chunks of live mounts' start-up traces (evicted last).
    traced: HashMap<ChunkDigest, usize>,
    /// When each chunk was last opened or written by this process (a tick of `clock`);
    /// chunks not in it were last used before, and rank by their write time.
    last_use: HashMap<ChunkDigest, u64>,
    clock: u64,
    /// Chunks this process evicted and has not fetched again (bounded), and counts.
    evicted: HashSet<ChunkDigest>,
    evictions: u64,
    refetches: u64,
    /// Bytes of chunk files and views (counted at open, then kept up to date).
    used: u64,
}

/// Which file a path held: device, inode and change time.
type FileId = (u64, u64, i64, i64);

fn file_id(md: &fs::Metadata) -> FileId {
    use std::os::unix::fs::MetadataExt;
    (md.dev(), md.ino(), md.ctime(), md.ctime_nsec())
}

/// Adds (`up`) or releases one pin of each of `digests` in a pin-count map.
fn count_pins(pins: &mut HashMap<ChunkDigest, usize>, digests: &HashSet<ChunkDigest>, up: bool) {
    for d in digests {
        if up {
            *pins.entry(*d).or_default() += 1;
        } else if let Some(n) = pins.get_mut(d) {
            *n -= 1;
            if *n == 0 {
                pins.remove(d);
            }
        }
    }
}

/// How much an eviction leaves.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// At most this many bytes.
    Bytes(u64),
    /// This share (numerator, denominator) of what the scan finds.
    Share(u64, u64),
}

/// Evicted chunks remembered for counting refetches (32 bytes each).
const MAX_EVICTED_REMEMBERED: usize = 1 << 20;

impl State {
    /// Notes a use of chunk `d` for the eviction order; returns whether this process
    /// has verified it.
    fn touch(&mut self, d: &ChunkDigest) -> bool {
        self.clock += 1;
        let now = self.clock;
        self.last_use.insert(*d, now);
        self.verified.contains(d)
    }
}

/// The directories of a store.
const SUBDIRS: [&str; 4] = ["chunks", "meta", "tmp", "views"];

fn hex_name(d: &ChunkDigest) -> String {
    hex::encode(d)
}

impl ChunkStore {
    /// Opens (creating) a store at `root`; chunks beyond `max_bytes` that no mount pins
    /// are evicted, oldest first.
    pub fn open(root: &Path, max_bytes: u64) -> io::Result<ChunkStore> {
        for sub in SUBDIRS {
            fs::create_dir_all(root.join(sub))?;
        }
        // Leftovers of writes a crash interrupted.
        for e in fs::read_dir(root.join("tmp"))?.flatten() {
            let _ = fs::remove_file(e.path());
        }
        let used = scan(&root.join("chunks"))?
            .iter()
            .map(|c| c.size)
            .sum::<u64>()
            + scan_views(&root.join("views"))?
                .iter()
                .map(|v| v.1)
                .sum::<u64>();
        Ok(ChunkStore {
            root: root.to_path_buf(),
            max_bytes,
            state: Mutex::new(State {
                used,
                ..State::default()
            }),
            room: Mutex::new(()),
            evictor: Mutex::new(None),
        })
    }

    /// Opens a store as [`ChunkStore::open`] does, for sharing between threads, with a
    /// thread of its own that evicts when a write takes the cache over its limit (the
    /// thread ends with the store).
    pub fn open_shared(root: &Path, max_bytes: u64) -> io::Result<Arc<ChunkStore>> {
        let store = Arc::new(ChunkStore::open(root, max_bytes)?);
        // One pending wake-up is enough: the thread evicts down to the target anyway.
        let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let weak = Arc::downgrade(&store);
        std::thread::Builder::new()
            .name("hoist-evict".into())
            .spawn(move || {
                // Ends when the store, which holds the sender, is dropped.
                while rx.recv().is_ok() {
                    let Some(store) = weak.upgrade() else { return };
                    if let Err(e) = store.evict_if_over() {
                        tracing::warn!("{}: evicting: {e}", store.root.display());
                    }
                }
            })?;
        *store.evictor.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        Ok(store)
    }

    /// Evicts down to 90% of the limit if the cache is over it.
    fn evict_if_over(&self) -> io::Result<()> {
        if self.lock().used > self.max_bytes {
            // Down to 90% so that eviction does not run on every write.
            self.evict_to(self.max_bytes / 10 * 9)?;
        }
        Ok(())
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Path of a chunk's file.
    pub fn chunk_path(&self, d: &ChunkDigest) -> PathBuf {
        let h = hex_name(d);
        self.root.join("chunks").join(&h[..2]).join(h)
    }

    /// Whether a chunk file exists (not verified: for statistics and prefetch planning).
    pub fn contains(&self, d: &ChunkDigest) -> bool {
        self.chunk_path(d).exists()
    }

    /// Opens a cached chunk of `size` bytes, verifying it the first time this process
    /// sees it. `None` when it is absent, or was present but damaged (it is then deleted).
    pub fn open_chunk(&self, d: &ChunkDigest, size: u32) -> io::Result<Option<File>> {
        let path = self.chunk_path(d);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if self.lock().touch(d) {
            return Ok(Some(file));
        }
        let mut data = Vec::with_capacity(size as usize);
        (&mut file)
            .take(u64::from(size) + 1)
            .read_to_end(&mut data)?;
        if data.len() != size as usize || hoist_codec::digest(&data) != *d {
            tracing::warn!(
                "cached chunk {} is damaged ({} bytes, {size} expected); fetching it again",
                path.display(),
                data.len()
            );
            if fs::remove_file(&path).is_ok() {
                let mut st = self.lock();
                st.used = st.used.saturating_sub(data.len() as u64);
            }
            return Ok(None);
        }
        let mut st = self.lock();
        st.verified.insert(*d);
        st.touch(d);
        drop(st);
        Ok(Some(file))
    }

    /// Stores a chunk whose bytes the caller has verified against `d`.
    pub fn put_chunk(&self, d: &ChunkDigest, data: &[u8]) -> io::Result<()> {
        let path = self.chunk_path(d);
        if path.exists() {
            return Ok(());
        }
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        match self.write_atomic(&path, data) {
            // The disk is full before the cache reached its own limit (other files
            // share it, or the limit is larger than the disk): evict the least recently
            // written quarter of the cache, live mounts' chunks too (they are fetched
            // again when read), and try once more. If nothing could be freed, only the
            // read that needed this chunk fails; serving goes on.
            Err(e) if e.kind() == io::ErrorKind::StorageFull => {
                let _one = self.room.lock().unwrap_or_else(|p| p.into_inner());
                if self.write_atomic(&path, data).is_err() {
                    // A quarter of what is there: the disk, not the count, is full.
                    let report = self.evict(Target::Share(3, 4), true, false)?;
                    tracing::warn!(
                        "{}: disk full; evicted {} cache files ({} bytes) to store a chunk",
                        self.root.display(),
                        report.removed,
                        report.freed
                    );
                    self.write_atomic(&path, data).map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!(
                                "{}: {e} (the disk is full, and evicting cache files freed {} bytes; free space on it or give the cache another disk with --cache-dir)",
                                self.root.display(),
                                report.freed
                            ),
                        )
                    })?;
                }
            }
            r => r?,
        }
        let used = {
            let mut st = self.lock();
            st.verified.insert(*d);
            st.touch(d);
            if st.evicted.remove(d) {
                st.refetches += 1;
            }
            // What the file takes on disk: whole blocks (the cap is about the disk).
            st.used += (data.len() as u64).div_ceil(4096) * 4096;
            st.used
        };
        if used > self.max_bytes {
            let evictor = self.evictor.lock().unwrap_or_else(|p| p.into_inner());
            match &*evictor {
                // Writers faster than the eviction thread (a scan of chunks/ per run)
                // wait for room themselves once the cache is well over its limit: the
                // limit holds within a sixteenth.
                Some(_) if used > self.max_bytes + (self.max_bytes / 16).max(1 << 20) => {
                    drop(evictor);
                    let _one = self.room.lock().unwrap_or_else(|p| p.into_inner());
                    self.evict_if_over()?;
                }
                // A wake-up already pending covers this write too.
                Some(tx) => drop(tx.try_send(())),
                None => {
                    drop(evictor);
                    self.evict_if_over()?;
                }
            }
        }
        Ok(())
    }

    fn write_atomic(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let write = || -> io::Result<()> {
            let mut tmp = self.temp_file()?;
            tmp.write_all(data)?;
            tmp.persist(path).map_err(|e| e.error)?;
            Ok(())
        };
        match write() {
            // The store's directories went away under it (removed by hand): made
            // again, and the write tried once more.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent)?;
                }
                write()
            }
            r => r,
        }
    }

    /// A temporary file in the store's `tmp/`, which is made again if it was removed.
    pub(crate) fn temp_file(&self) -> io::Result<tempfile::NamedTempFile> {
        let tmp = self.root.join("tmp");
        match tempfile::NamedTempFile::new_in(&tmp) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.recreate()?;
                tempfile::NamedTempFile::new_in(&tmp)
            }
            r => r,
        }
    }

    /// Whether the store's directories are all there (false once its directory was
    /// removed or emptied by hand).
    pub fn is_intact(&self) -> bool {
        SUBDIRS.iter().all(|sub| self.root.join(sub).is_dir())
    }

    /// Makes the store's directories again after they were removed under it, and
    /// counts what is left: chunks known verified may be gone, so none is trusted
    /// without a fresh check.
    pub fn recreate(&self) -> io::Result<()> {
        for sub in SUBDIRS {
            fs::create_dir_all(self.root.join(sub)).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("making the chunk cache {} again: {e}", self.root.display()),
                )
            })?;
        }
        let used = scan(&self.root.join("chunks"))?
            .iter()
            .map(|c| c.size)
            .sum::<u64>()
            + scan_views(&self.root.join("views"))?
                .iter()
                .map(|v| v.1)
                .sum::<u64>();
        let mut st = self.lock();
        st.used = used;
        st.verified.clear();
        tracing::warn!(
            "the chunk cache {} was removed while in use; made again",
            self.root.display()
        );
        Ok(())
    }

    /// Pins chunks against eviction (a mount uses them).
    pub fn pin(&self, digests: &HashSet<ChunkDigest>) {
        count_pins(&mut self.lock().pinned, digests, true);
    }

    /// Releases pins taken with [`ChunkStore::pin`].
    pub fn unpin(&self, digests: &HashSet<ChunkDigest>) {
        count_pins(&mut self.lock().pinned, digests, false);
    }

    /// Pins chunks of a start-up trace: past the limit they are evicted last.
    pub fn pin_trace(&self, digests: &HashSet<ChunkDigest>) {
        count_pins(&mut self.lock().traced, digests, true);
    }

    /// Releases pins taken with [`ChunkStore::pin_trace`].
    pub fn unpin_trace(&self, digests: &HashSet<ChunkDigest>) {
        count_pins(&mut self.lock().traced, digests, false);
    }

    /// Whether `bytes` more fit under the size limit.
    pub(crate) fn has_room_for(&self, bytes: u64) -> bool {
        self.lock().used.saturating_add(bytes) <= self.max_bytes
    }

    /// Counts a new view's bytes; if the cache is then over its limit, older views go
    /// (a view never pushes chunks out: they are the data, views only copies).
    pub(crate) fn add_view_bytes(&self, bytes: u64) -> io::Result<()> {
        let over = {
            let mut st = self.lock();
            st.used += bytes;
            st.used > self.max_bytes
        };
        if over {
            self.evict(Target::Bytes(self.max_bytes / 10 * 9), false, true)?;
        }
        Ok(())
    }

    /// Uncounts a removed view's bytes.
    /// Whether this process built or verified view `key` as the file `md` describes.
    pub(crate) fn is_verified_view(&self, key: &str, md: &fs::Metadata) -> bool {
        self.lock().views.get(key) == Some(&file_id(md))
    }

    /// Remembers that view `key`, the file `md` describes, holds what it should.
    pub(crate) fn note_verified_view(&self, key: String, md: &fs::Metadata) {
        self.lock().views.insert(key, file_id(md));
    }

    pub(crate) fn sub_view_bytes(&self, bytes: u64) {
        let mut st = self.lock();
        st.used = st.used.saturating_sub(bytes);
    }

    /// Removes views, then chunks, until at most `target` bytes are left. Views go
    /// first: they are copies, built again from the chunks when needed. Then chunks, in
    /// this order: those no live mount uses; those live mounts use; those of live
    /// mounts' start-up traces; within each, the least recently used first (a lazily
    /// mounted image fetches an evicted chunk again when it is read: the cost is a
    /// fetch, or EIO while the registry is unreachable).
    pub fn evict_to(&self, target: u64) -> io::Result<PruneReport> {
        self.evict(Target::Bytes(target), true, false)
    }

    /// `hoist cache prune`: removes views and chunks no mount uses until at most
    /// `target` bytes are left; with `mounted_too`, chunks of mounted images after them
    /// (as [`ChunkStore::evict_to`] does past the limit).
    pub fn prune(&self, target: u64, mounted_too: bool) -> io::Result<PruneReport> {
        self.evict(Target::Bytes(target), true, !mounted_too)
    }

    /// Removes views and chunks as [`ChunkStore::evict_to`] does until at most `target`
    /// bytes are left; `spare_pinned` keeps live mounts' chunks.
    fn evict(
        &self,
        target: Target,
        chunks_too: bool,
        spare_pinned: bool,
    ) -> io::Result<PruneReport> {
        let counted = self.lock().used;
        let mut views = scan_views(&self.root.join("views"))?;
        views.sort_by_key(|v| v.2);
        let mut files = scan(&self.root.join("chunks"))?;
        {
            let st = self.lock();
            // (class, last use in this process, write time): smallest goes first.
            files.sort_by_cached_key(|c| {
                let class = match (
                    st.pinned.contains_key(&c.digest),
                    st.traced.contains_key(&c.digest),
                ) {
                    (false, _) => 0,
                    (true, false) => 1,
                    (true, true) => 2,
                };
                (
                    class,
                    st.last_use.get(&c.digest).copied().unwrap_or(0),
                    c.mtime,
                )
            });
        }
        let mut used: u64 =
            files.iter().map(|c| c.size).sum::<u64>() + views.iter().map(|v| v.1).sum::<u64>();
        let target = match target {
            Target::Bytes(b) => b,
            Target::Share(n, d) => used / d * n,
        };
        let mut report = PruneReport::default();
        for (path, size, _) in views {
            if used <= target {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                used -= size;
                report.removed += 1;
                report.freed += size;
                if let Some(key) = path.file_name().and_then(|n| n.to_str()) {
                    self.lock().views.remove(key);
                }
            }
        }
        for c in files {
            if used <= target || !chunks_too {
                break;
            }
            if spare_pinned && self.lock().pinned.contains_key(&c.digest) {
                continue;
            }
            if fs::remove_file(&c.path).is_ok() {
                used -= c.size;
                report.removed += 1;
                report.freed += c.size;
                let mut st = self.lock();
                st.verified.remove(&c.digest);
                st.last_use.remove(&c.digest);
                st.evictions += 1;
                if st.evicted.len() >= MAX_EVICTED_REMEMBERED {
                    st.evicted.clear();
                }
                st.evicted.insert(c.digest);
            }
        }
        if used > target && chunks_too {
            tracing::warn!(
                "chunk cache holds {used} bytes, more than {target}: the rest is in use by mounts"
            );
        }
        let mut st = self.lock();
        // Writes that landed during the scan are counted in `used` and maybe not in the
        // scan: then only what was removed is taken off. Otherwise the scan, which sees
        // files removed by hand too, is the count.
        st.used = match st.used == counted {
            true => used,
            false => st.used.saturating_sub(report.freed),
        };
        report.left = used;
        Ok(report)
    }

    /// Chunks this process evicted, and how many of them it fetched again since.
    pub fn eviction_counts(&self) -> (u64, u64) {
        let st = self.lock();
        (st.evictions, st.refetches)
    }

    /// Usage figures.
    pub fn stats(&self) -> io::Result<StoreStats> {
        let chunks = scan(&self.root.join("chunks"))?;
        let metas = scan_flat(&self.root.join("meta"))?;
        let views = scan_views(&self.root.join("views"))?;
        let (pinned, evictions, refetches) = {
            let st = self.lock();
            (st.pinned.len() as u64, st.evictions, st.refetches)
        };
        Ok(StoreStats {
            views: views.len() as u64,
            view_bytes: views.iter().map(|v| v.1).sum(),
            chunks: chunks.len() as u64,
            chunk_bytes: chunks.iter().map(|c| c.size).sum(),
            metas: metas.len() as u64,
            meta_bytes: metas.iter().map(|(_, s)| s).sum(),
            max_bytes: self.max_bytes,
            pinned,
            evictions,
            refetches,
        })
    }

    /// Path of a metadata blob's file.
    pub fn meta_path(&self, digest_hex: &str) -> PathBuf {
        self.root.join("meta").join(digest_hex)
    }

    /// A cached metadata blob, checked against its sha256; a damaged one is deleted.
    pub fn get_meta(&self, digest_hex: &str) -> io::Result<Option<Vec<u8>>> {
        let path = self.meta_path(digest_hex);
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if hex::encode(sha2::Sha256::digest(&data)) != digest_hex {
            tracing::warn!(
                "cached metadata {} is damaged; fetching it again",
                path.display()
            );
            let _ = fs::remove_file(&path);
            return Ok(None);
        }
        Ok(Some(data))
    }

    /// Path of the metadata a kernel mounts for the metadata blob `digest_hex` when that
    /// blob is stored as a chunked blob (format version 3): the bytes it decodes to.
    pub fn meta_image_path(&self, digest_hex: &str) -> PathBuf {
        self.root.join("meta").join(format!("{digest_hex}.erofs"))
    }

    /// Makes the file at [`ChunkStore::meta_image_path`] hold exactly `data`, metadata
    /// the caller decoded and verified: a file that differs (damaged, or left by a
    /// crash) is replaced, so the kernel never reads bytes this process did not verify.
    pub fn put_meta_image(&self, digest_hex: &str, data: &[u8]) -> io::Result<PathBuf> {
        let path = self.meta_image_path(digest_hex);
        let same = fs::metadata(&path).is_ok_and(|m| m.len() == data.len() as u64)
            && fs::read(&path).is_ok_and(|d| d == data);
        if !same {
            self.write_atomic(&path, data)?;
        }
        Ok(path)
    }

    /// Stores a metadata blob the caller has verified.
    pub fn put_meta(&self, digest_hex: &str, data: &[u8]) -> io::Result<PathBuf> {
        let path = self.meta_path(digest_hex);
        if !path.exists() {
            self.write_atomic(&path, data)?;
        }
        Ok(path)
    }
}

struct Cached {
    path: PathBuf,
    digest: ChunkDigest,
    size: u64,
    mtime: SystemTime,
}

/// Every chunk file under `chunks/`; files with names that are not digests are ignored.
fn scan(dir: &Path) -> io::Result<Vec<Cached>> {
    let mut out = Vec::new();
    for sub in fs::read_dir(dir)?.flatten() {
        if !sub.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        for e in fs::read_dir(sub.path())?.flatten() {
            let name = e.file_name();
            let mut digest = [0u8; 32];
            if hex::decode_to_slice(name.as_encoded_bytes(), &mut digest).is_err() {
                continue;
            }
            let Ok(md) = e.metadata() else { continue };
            out.push(Cached {
                path: e.path(),
                digest,
                // Bytes on disk (whole blocks), as views are counted: the cap is about
                // the disk, where a chunk of 1 KiB takes 4.
                size: std::os::unix::fs::MetadataExt::blocks(&md) * 512,
                mtime: md.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            });
        }
    }
    Ok(out)
}

/// Every view: path, bytes on disk, modification time.
fn scan_views(dir: &Path) -> io::Result<Vec<(PathBuf, u64, SystemTime)>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(entries
        .flatten()
        .filter_map(|e| {
            let md = e.metadata().ok()?;
            md.is_file().then(|| {
                let mtime = md.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                (e.path(), crate::views::allocated(&md), mtime)
            })
        })
        .collect())
}

fn scan_flat(dir: &Path) -> io::Result<Vec<(PathBuf, u64)>> {
    Ok(fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| Some((e.path(), e.metadata().ok()?.len())))
        .collect())
}

/// A chunk being fetched: whoever needs it waits here for the outcome.
#[derive(Debug, Default)]
pub struct Slot {
    state: Mutex<SlotState>,
    cv: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct SlotState {
    result: Option<Result<(), Arc<str>>>,
    urgent: bool,
    /// When a reader first asked for the chunk (a prefetch may have queued it long
    /// before).
    demanded: Option<std::time::Instant>,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When a reader first asked for the chunk (now, if this is the first): a reader
    /// that joins a fetch late waits no longer than the first reader's bound.
    pub fn first_demand(&self) -> std::time::Instant {
        *self
            .lock()
            .demanded
            .get_or_insert_with(std::time::Instant::now)
    }

    /// Forgets the first reader's time once its bound has passed: a later read (the
    /// kernel's retry is answered by [`Inflight::timed_out_lately`]) gets a bound of its
    /// own even if this fetch is still stalled.
    pub fn reset_demand(&self) {
        self.lock().demanded = None;
    }

    /// Marks the chunk as wanted by a reader (a prefetch job holding it goes first).
    pub fn make_urgent(&self) {
        self.lock().urgent = true;
    }

    /// Whether a reader waits for it.
    pub fn is_urgent(&self) -> bool {
        self.lock().urgent
    }

    /// Waits for the outcome until `deadline`; `None` on timeout.
    pub fn wait(&self, deadline: std::time::Instant) -> Option<Result<(), Arc<str>>> {
        let mut st = self.lock();
        loop {
            if let Some(r) = &st.result {
                return Some(r.clone());
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return None;
            }
            st = self
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn complete(&self, r: Result<(), Arc<str>>) {
        let mut st = self.lock();
        if st.result.is_none() {
            st.result = Some(r);
        }
        drop(st);
        self.cv.notify_all();
    }
}

/// Outcome of [`Inflight::claim`].
pub enum Claim {
    /// The caller fetches the chunk and must call [`Inflight::finish`].
    Mine(Arc<Slot>),
    /// Someone else is fetching it; wait on the slot.
    Theirs(Arc<Slot>),
}

/// How long a read that timed out answers for its chunk: the kernel asks again at once
/// after an EIO (a readahead request fails, then the read itself is sent), and that
/// request gets the same answer instead of waiting out a bound of its own. Only
/// timeouts are remembered: a fetch that failed quickly (a refused connection, damaged
/// data, a full disk) is tried again by the next read.
pub const TIMEOUT_MEMORY: std::time::Duration = std::time::Duration::from_secs(2);

/// Chunks being fetched, by digest, so that no chunk is fetched twice at once, whichever
/// mount or image wants it; and the reads of them that just timed out.
#[derive(Debug, Default)]
pub struct Inflight {
    map: Mutex<HashMap<ChunkDigest, Arc<Slot>>>,
    timed_out: Mutex<HashMap<ChunkDigest, std::time::Instant>>,
}

impl Inflight {
    fn lock(&self) -> MutexGuard<'_, HashMap<ChunkDigest, Arc<Slot>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims a chunk for fetching, or joins the fetch under way.
    pub fn claim(&self, d: &ChunkDigest) -> Claim {
        let mut map = self.lock();
        match map.get(d) {
            Some(s) => Claim::Theirs(s.clone()),
            None => {
                let s = Arc::new(Slot::default());
                map.insert(*d, s.clone());
                Claim::Mine(s)
            }
        }
    }

    /// Claims a chunk only if nobody is fetching it.
    pub fn try_claim(&self, d: &ChunkDigest) -> Option<Arc<Slot>> {
        match self.claim(d) {
            Claim::Mine(s) => Some(s),
            Claim::Theirs(_) => None,
        }
    }

    /// Ends a fetch: wakes the waiters with `r`. A slot that was already finished (and
    /// whose digest someone may have claimed again since) is left alone.
    pub fn finish(&self, d: &ChunkDigest, slot: &Arc<Slot>, r: Result<(), Arc<str>>) {
        let mut map = self.lock();
        if map.get(d).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            map.remove(d);
        }
        drop(map);
        slot.complete(r);
    }

    /// Notes that a read of the chunk gave up waiting for it.
    pub fn note_timeout(&self, d: &ChunkDigest) {
        let mut t = self.timed_out.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        t.retain(|_, at| now.duration_since(*at) < TIMEOUT_MEMORY);
        t.insert(*d, now);
    }

    /// Whether a read of the chunk timed out within the last `TIMEOUT_MEMORY` (2 s).
    pub fn timed_out_lately(&self, d: &ChunkDigest) -> bool {
        let t = self.timed_out.lock().unwrap_or_else(|e| e.into_inner());
        t.get(d).is_some_and(|at| at.elapsed() < TIMEOUT_MEMORY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(byte: u8, len: usize) -> (ChunkDigest, Vec<u8>) {
        let data = vec![byte; len];
        (hoist_codec::digest(&data), data)
    }

    #[test]
    fn a_store_removed_while_open_is_made_again() {
        // Issue 15: `rm -rf` of a cache directory under a running daemon failed every
        // later write ("No such file or directory … tmp/.tmp…") until a restart.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cache");
        let store = ChunkStore::open(&root, 1 << 20).unwrap();
        let (d1, c1) = chunk(1, 4096);
        store.put_chunk(&d1, &c1).unwrap();
        assert!(store.open_chunk(&d1, 4096).unwrap().is_some());
        fs::remove_dir_all(&root).unwrap();
        assert!(!store.is_intact());
        assert!(store.open_chunk(&d1, 4096).unwrap().is_none());
        let (d2, c2) = chunk(2, 4096);
        store.put_chunk(&d2, &c2).unwrap();
        assert!(store.open_chunk(&d2, 4096).unwrap().is_some());
        store.put_meta("ab", b"meta").unwrap();
        assert!(store.is_intact());
        assert_eq!(store.stats().unwrap().chunks, 1);
    }

    #[test]
    fn past_the_limit_mounted_chunks_go_least_recently_used_first_and_trace_chunks_last() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), 1 << 30).unwrap();
        let c: Vec<_> = (1..=6).map(|i| chunk(i, 4096)).collect();
        for (d, data) in &c {
            store.put_chunk(d, data).unwrap();
        }
        // All pinned by a mount; 1 and 2 by its trace too. Chunk 3 is read again, so
        // 4 is now the least recently used of the others.
        let all: HashSet<_> = c.iter().map(|x| x.0).collect();
        store.pin(&all);
        store.pin_trace(&HashSet::from([c[0].0, c[1].0]));
        store.open_chunk(&c[2].0, 4096).unwrap().unwrap();
        // Room for three: 4, 5 and 6 go (untraced, least recently used first), then 3
        // would be next; the trace's are kept.
        let report = store.evict_to(3 * 4096).unwrap();
        assert_eq!(report.left, 3 * 4096);
        let kept: Vec<bool> = c.iter().map(|x| store.contains(&x.0)).collect();
        assert_eq!(kept, [true, true, true, false, false, false]);
        let report = store.evict_to(2 * 4096).unwrap();
        assert_eq!(report.removed, 1);
        assert!(
            !store.contains(&c[2].0),
            "the untraced chunk goes before the trace's"
        );
        // Evictions and refetches are counted.
        store.put_chunk(&c[3].0, &c[3].1).unwrap();
        let st = store.stats().unwrap();
        assert_eq!((st.evictions, st.refetches), (4, 1));
        // Past the trace's pins, its chunks go too.
        store.evict_to(0).unwrap();
        assert!(!store.contains(&c[0].0));
    }

    #[test]
    fn eviction_spares_pinned_chunks_and_damage_is_refetched() {
        let dir = tempfile::tempdir().unwrap();
        // Room for two 4 KiB chunks; eviction goes down to 90% of that.
        let store = ChunkStore::open(dir.path(), 8192).unwrap();
        let (a, da) = chunk(1, 4096);
        let (b, db) = chunk(2, 4096);
        let (c, dc) = chunk(3, 4096);
        store.put_chunk(&a, &da).unwrap();
        store.pin(&HashSet::from([a]));
        store.put_chunk(&b, &db).unwrap();
        store.put_chunk(&c, &dc).unwrap();
        // Over the limit: the unpinned go first, the pinned one stays.
        assert!(store.contains(&a), "a pinned chunk was evicted");
        assert!(store.stats().unwrap().chunk_bytes <= 8192);
        store.unpin(&HashSet::from([a]));
        let report = store.evict_to(0).unwrap();
        assert_eq!(report.left, 0);
        assert!(!store.contains(&a));

        // A chunk damaged on disk is not served by a fresh process's store.
        store.put_chunk(&a, &da).unwrap();
        std::fs::write(store.chunk_path(&a), vec![9u8; 4096]).unwrap();
        let reopened = ChunkStore::open(dir.path(), 8192).unwrap();
        assert!(reopened.open_chunk(&a, 4096).unwrap().is_none());
        assert!(!reopened.contains(&a), "the damaged chunk was not removed");
        // A write interrupted before its rename leaves nothing behind.
        std::fs::write(dir.path().join("tmp/partial"), b"xx").unwrap();
        ChunkStore::open(dir.path(), 8192).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }
}
