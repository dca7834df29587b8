//! Fetching chunks on demand and in the background.
//!
//! A [`Fetcher`] serves one image. A read of a chunk that is not cached becomes a *job*:
//! one ranged read of the data blob covering the chunk and the chunks that follow it in
//! the blob, as long as they are adjacent, missing and not already being fetched, until
//! the job holds at least [`FetchConfig::min_fetch`] compressed bytes. Chunks follow
//! file order in a blob, so this both coalesces the misses of a sequential reader and
//! amplifies small reads into requests worth a round trip.
//!
//! Jobs run on a fixed pool of worker threads, which bounds concurrency. There are three
//! priorities: jobs of readers go first; then jobs of a start-up trace (at most
//! [`FetchConfig::trace_workers`] at once, so a reader always finds a free worker); then
//! other prefetch jobs (at most [`FetchConfig::prefetch_workers`]). A queued prefetch or
//! trace job that a reader starts waiting for is promoted to a reader's job.
//! A reader waits at most [`FetchConfig::read_timeout`] and then gets an error (EIO at
//! the filesystem), whatever the registry does; the job itself goes on and fills the
//! cache if it succeeds. Nothing is remembered of failures: the next read tries again,
//! so fetching resumes by itself when the registry is back.

use crate::store::{ChunkStore, Claim, Inflight, Slot};
use crate::views::{Built, Piece, View};
use hoist_format::chunk::ChunkEntry;
use hoist_oci::{Digest, ImageSource};
use std::collections::{HashSet, VecDeque};
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Tuning of a [`Fetcher`].
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Compressed bytes a miss fetches at least, by taking the chunks after it.
    pub min_fetch: u64,
    /// Compressed bytes a prefetch job fetches at least.
    pub prefetch_fetch: u64,
    /// Compressed bytes a trace job fetches at most (smaller than prefetch jobs: many
    /// requests in flight keep a long link full and the trace's order close).
    pub trace_fetch: u64,
    /// Worker threads: the most ranged reads in flight at once.
    pub workers: usize,
    /// How many of the workers may run trace jobs at once.
    pub trace_workers: usize,
    /// How many of the workers may run other prefetch jobs at once.
    pub prefetch_workers: usize,
    /// How long a read waits for a chunk before it fails.
    pub read_timeout: Duration,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            min_fetch: 64 << 10,
            prefetch_fetch: 4 << 20,
            trace_fetch: 1 << 20,
            workers: 10,
            trace_workers: 8,
            prefetch_workers: 2,
            read_timeout: Duration::from_secs(30),
        }
    }
}

/// The chunk table of one data blob.
#[derive(Debug, Clone)]
pub struct BlobChunks {
    /// The blob's OCI digest.
    pub digest: Digest,
    /// Its chunks, by uncompressed offset.
    pub entries: Vec<ChunkEntry>,
    /// Whether a file of the image uses each chunk; unused ones are never fetched.
    pub used: Vec<bool>,
}

impl BlobChunks {
    /// Whether chunk `index` is used by a file.
    pub fn is_used(&self, index: usize) -> bool {
        self.used.get(index).copied().unwrap_or(false)
    }

    /// The blob's uncompressed address space of `len` bytes as a view: its used chunks
    /// at their offsets (the kernel's EROFS reads it as the blob's device).
    pub fn view(&self, len: u64) -> View {
        let pieces = self
            .entries
            .iter()
            .enumerate()
            .filter(|(i, _)| self.is_used(*i))
            .map(|(_, e)| Piece {
                offset: e.uncompressed_offset,
                digest: e.digest,
                size: e.uncompressed_size,
            })
            .collect();
        View { len, pieces }
    }
}

/// Why a chunk could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The registry did not deliver in time.
    #[error("chunk {index} of blob {blob}: not fetched within {secs} s")]
    Timeout {
        /// Blob digest.
        blob: String,
        /// Chunk index.
        index: usize,
        /// The bound.
        secs: u64,
    },
    /// Fetching, decoding or verifying failed.
    #[error("chunk {index} of blob {blob}: {why}")]
    Failed {
        /// Blob digest.
        blob: String,
        /// Chunk index.
        index: usize,
        /// What went wrong.
        why: Arc<str>,
    },
    /// The chunk store failed.
    #[error("chunk cache: {0}")]
    Io(#[from] std::io::Error),
    /// The caller named a chunk the image does not have.
    #[error("no chunk {index} in blob {blob} of this image")]
    NoSuchChunk {
        /// Blob index.
        blob: usize,
        /// Chunk index.
        index: usize,
    },
}

/// Who wants a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// A reader is waiting.
    Demand,
    /// Prefetch of a start-up trace.
    Trace,
    /// Background prefetch.
    Prefetch,
}

/// Counters of a fetcher.
#[derive(Debug, Default)]
pub struct Counters {
    /// Chunk opens served from the cache.
    pub hits: AtomicU64,
    /// Chunk opens that had to wait for a fetch.
    pub misses: AtomicU64,
    /// Ranged reads sent.
    pub requests: AtomicU64,
    /// Compressed bytes received.
    pub bytes_fetched: AtomicU64,
    /// Chunks fetched, verified and cached.
    pub chunks_fetched: AtomicU64,
    /// Ranged reads or chunks that failed.
    pub errors: AtomicU64,
    /// Reads that gave up waiting.
    pub timeouts: AtomicU64,
    /// Views built (see [`crate::View`]).
    pub views_built: AtomicU64,
    /// Views found on disk and verified before first use.
    pub views_verified: AtomicU64,
    /// Views found damaged on disk, removed and built again (never served).
    pub views_damaged: AtomicU64,
}

impl Counters {
    /// Counts what [`ChunkStore::build_view`] did.
    pub fn count_view(&self, built: Built) {
        match built {
            Built::Known => {}
            Built::Verified => {
                self.views_verified.fetch_add(1, Relaxed);
            }
            Built::Built => {
                self.views_built.fetch_add(1, Relaxed);
            }
            Built::Repaired => {
                self.views_damaged.fetch_add(1, Relaxed);
                self.views_built.fetch_add(1, Relaxed);
            }
        }
    }
}

struct Job {
    blob: usize,
    first: usize,
    slots: Vec<Arc<Slot>>,
    priority: Priority,
}

#[derive(Default)]
struct Queue {
    demand: VecDeque<Job>,
    trace: VecDeque<Job>,
    prefetch: VecDeque<Job>,
    busy_trace: usize,
    busy_prefetch: usize,
}

impl Queue {
    fn pop(&mut self, cfg: &FetchConfig) -> Option<Job> {
        if let Some(j) = self.demand.pop_front() {
            return Some(j);
        }
        // A queued job a reader waits for goes first, and past the limits.
        for q in [&mut self.trace, &mut self.prefetch] {
            if let Some(i) = q.iter().position(|j| j.slots.iter().any(|s| s.is_urgent())) {
                let mut j = q.remove(i)?;
                // It runs as a reader's job: outside the limits.
                j.priority = Priority::Demand;
                return Some(j);
            }
        }
        if self.busy_trace < cfg.trace_workers {
            if let Some(j) = self.trace.pop_front() {
                self.busy_trace += 1;
                return Some(j);
            }
        }
        if self.busy_prefetch < cfg.prefetch_workers {
            let j = self.prefetch.pop_front()?;
            self.busy_prefetch += 1;
            return Some(j);
        }
        None
    }

    /// A job of `priority` finished.
    fn done(&mut self, priority: Priority) {
        match priority {
            Priority::Demand => {}
            Priority::Trace => self.busy_trace = self.busy_trace.saturating_sub(1),
            Priority::Prefetch => self.busy_prefetch = self.busy_prefetch.saturating_sub(1),
        }
    }
}

/// The chunks a workload opened, in order, while recording.
#[derive(Default)]
struct Recording {
    order: Vec<(usize, usize)>,
    seen: std::collections::HashSet<(usize, usize)>,
}

struct Inner {
    source: Arc<dyn ImageSource>,
    blobs: Vec<BlobChunks>,
    store: Arc<ChunkStore>,
    inflight: Arc<Inflight>,
    cfg: FetchConfig,
    queue: Mutex<Queue>,
    cv: Condvar,
    counters: Counters,
    stop: AtomicBool,
    recording: AtomicBool,
    record: Mutex<Recording>,
    /// The view builder's queue (taken at shutdown, which ends the builder), and the
    /// keys of the views queued on it.
    views: Mutex<(Option<std::sync::mpsc::Sender<View>>, HashSet<String>)>,
}

/// Fetches and caches the chunks of one image.
pub struct Fetcher {
    inner: Arc<Inner>,
}

impl Fetcher {
    /// A fetcher reading `blobs` from `source` into `store`; `inflight` is shared by all
    /// fetchers of the store. Starts the worker threads.
    pub fn new(
        source: Arc<dyn ImageSource>,
        blobs: Vec<BlobChunks>,
        store: Arc<ChunkStore>,
        inflight: Arc<Inflight>,
        cfg: FetchConfig,
    ) -> std::io::Result<Fetcher> {
        let inner = Arc::new(Inner {
            source,
            blobs,
            store,
            inflight,
            cfg,
            queue: Mutex::new(Queue::default()),
            cv: Condvar::new(),
            counters: Counters::default(),
            stop: AtomicBool::new(false),
            recording: AtomicBool::new(false),
            record: Mutex::new(Recording::default()),
            views: Mutex::new((None, HashSet::new())),
        });
        let (tx, rx) = std::sync::mpsc::channel::<View>();
        lock(&inner.views).0 = Some(tx);
        {
            // One thread: views are built from local files, one at a time is enough,
            // and it never competes with more than one reader for the disk.
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("hoist-views".into())
                .spawn(move || {
                    for view in rx {
                        if inner.stop.load(Relaxed) {
                            break;
                        }
                        match inner.store.build_view(&view, &|| inner.stop.load(Relaxed)) {
                            Ok(built) => inner.counters.count_view(built),
                            Err(e) => tracing::debug!("view {}: {e}", view.key()),
                        }
                        lock(&inner.views).1.remove(&view.key());
                    }
                })?;
        }
        for i in 0..inner.cfg.workers.max(1) {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name(format!("hoist-fetch-{i}"))
                .spawn(move || inner.work())?;
        }
        Ok(Fetcher { inner })
    }

    /// The blobs and their chunks.
    pub fn blobs(&self) -> &[BlobChunks] {
        &self.inner.blobs
    }

    /// The chunk store.
    pub fn store(&self) -> &Arc<ChunkStore> {
        &self.inner.store
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// The configuration.
    pub fn config(&self) -> &FetchConfig {
        &self.inner.cfg
    }

    /// The chunk table entry of chunk `index` of blob `blob`.
    pub fn entry(&self, blob: usize, index: usize) -> Result<&ChunkEntry, FetchError> {
        self.inner
            .blobs
            .get(blob)
            .and_then(|b| b.entries.get(index))
            .ok_or(FetchError::NoSuchChunk { blob, index })
    }

    /// Opens a chunk's verified bytes in the cache, fetching it first if needed. Waits at
    /// most the configured read timeout.
    pub fn open_chunk(&self, blob: usize, index: usize) -> Result<File, FetchError> {
        let e = *self.entry(blob, index)?;
        self.note_read(blob, index);
        let deadline = Instant::now() + self.inner.cfg.read_timeout;
        let c = &self.inner.counters;
        // A chunk can vanish between its fetch and the open (evicted, or found damaged):
        // then it is fetched again, a bounded number of times.
        for attempt in 0..3 {
            if let Some(f) = self
                .inner
                .store
                .open_chunk(&e.digest, e.uncompressed_size)?
            {
                if attempt == 0 {
                    c.hits.fetch_add(1, Relaxed);
                }
                return Ok(f);
            }
            if attempt == 0 {
                c.misses.fetch_add(1, Relaxed);
            }
            if self.stopping() {
                return Err(self
                    .inner
                    .failed(blob, index, "the mount is shutting down".into()));
            }
            // The kernel's second request for data whose read just timed out (the read
            // after its readahead) gets the same answer at once.
            if self.inner.inflight.timed_out_lately(&e.digest) {
                c.timeouts.fetch_add(1, Relaxed);
                return Err(self.timeout(blob, index));
            }
            let slot = self.inner.request(blob, index, Priority::Demand);
            // A reader that joins a fetch under way waits no longer than the first one:
            // one read(2) that the kernel splits into several requests is bounded once.
            let deadline = deadline.min(slot.first_demand() + self.inner.cfg.read_timeout);
            match slot.wait(deadline) {
                Some(Ok(())) => {}
                Some(Err(why)) => return Err(self.inner.failed(blob, index, why)),
                None => {
                    c.timeouts.fetch_add(1, Relaxed);
                    self.inner.inflight.note_timeout(&e.digest);
                    slot.reset_demand();
                    return Err(self.timeout(blob, index));
                }
            }
        }
        Err(self.inner.failed(
            blob,
            index,
            "the chunk left the cache right after each fetch (is the cache too small?)".into(),
        ))
    }

    fn timeout(&self, blob: usize, index: usize) -> FetchError {
        FetchError::Timeout {
            blob: self.inner.blobs[blob].digest.to_string(),
            index,
            secs: self.inner.cfg.read_timeout.as_secs(),
        }
    }

    /// Reads `buf.len()` bytes of chunk `index` of blob `blob` from `offset` within the
    /// chunk (fetching it first if needed).
    pub fn read_at(
        &self,
        blob: usize,
        index: usize,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), FetchError> {
        use std::os::unix::fs::FileExt;
        let f = self.open_chunk(blob, index)?;
        f.read_exact_at(buf, offset)?;
        Ok(())
    }

    /// Hints the kernel to read cached chunk `index` of blob `blob` into the page cache
    /// (a sequential reader will want it next). Does nothing for an absent chunk; the
    /// read that follows verifies as always.
    pub fn will_need(&self, blob: usize, index: usize) {
        let Ok(e) = self.entry(blob, index) else {
            return;
        };
        if let Ok(f) = File::open(self.inner.store.chunk_path(&e.digest)) {
            let _ = rustix::fs::fadvise(&f, 0, 0, rustix::fs::Advice::WillNeed);
        }
    }

    /// Starts a job of `priority` (trace or prefetch) for chunk `index` of blob `blob`
    /// and the chunks after it for which `take` is true (adjacent, used, missing and not
    /// in flight, up to the priority's job size). Returns the slots to wait on (empty
    /// when it is cached) and the index after the last chunk the job covers.
    pub fn prefetch(
        &self,
        blob: usize,
        index: usize,
        priority: Priority,
        take: &dyn Fn(usize) -> bool,
    ) -> (Vec<Arc<Slot>>, usize) {
        self.inner.submit(blob, index, priority, take)
    }

    /// Records that chunk `index` of blob `blob` is read, while recording. Reads through
    /// [`Fetcher::open_chunk`] are recorded by it; a reader that reaches the cache
    /// another way (FUSE passthrough) says so here.
    pub fn note_read(&self, blob: usize, index: usize) {
        if self.inner.recording.load(Relaxed) {
            let mut r = self.inner.record.lock().unwrap_or_else(|e| e.into_inner());
            if r.seen.insert((blob, index)) {
                r.order.push((blob, index));
            }
        }
    }

    /// Queues `view` for building in the background, unless it is queued already.
    /// It is built only if all its chunks are cached by then.
    pub fn build_view_later(&self, view: View) {
        let mut v = lock(&self.inner.views);
        let (Some(tx), queued) = &mut *v else { return };
        if queued.insert(view.key()) && tx.send(view).is_err() {
            v.1.clear();
        }
    }

    /// Whether chunks are being recorded (a recording wants every read to reach hoist).
    pub fn is_recording(&self) -> bool {
        self.inner.recording.load(Relaxed)
    }

    /// Starts recording which chunks are opened, in order (for `hoist record`).
    pub fn start_recording(&self) {
        self.inner.recording.store(true, Relaxed);
    }

    /// The chunks opened since recording started, as (blob, index) in first-open order.
    pub fn recorded(&self) -> Vec<(usize, usize)> {
        let r = self.inner.record.lock().unwrap_or_else(|e| e.into_inner());
        r.order.clone()
    }

    /// Whether the fetcher is shutting down.
    pub fn stopping(&self) -> bool {
        self.inner.stop.load(Relaxed)
    }
}

impl Fetcher {
    /// Stops the workers and the prefetch, and fails the jobs still queued (their
    /// readers get an error at once). Later reads fail; the mount is going away.
    pub fn shutdown(&self) {
        self.inner.stop.store(true, Relaxed);
        lock(&self.inner.views).0 = None;
        let jobs: Vec<Job> = {
            let mut guard = self.inner.lock();
            let q = &mut *guard;
            q.demand
                .drain(..)
                .chain(q.trace.drain(..))
                .chain(q.prefetch.drain(..))
                .collect()
        };
        self.inner.cv.notify_all();
        for job in jobs {
            self.inner
                .fail_job(&job, "the mount is shutting down".into());
        }
    }
}

impl Drop for Fetcher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn failed(&self, blob: usize, index: usize, why: Arc<str>) -> FetchError {
        FetchError::Failed {
            blob: self.blobs[blob].digest.to_string(),
            index,
            why,
        }
    }

    /// The slot of a demanded chunk: a new job, or the one fetching it already.
    fn request(&self, blob: usize, index: usize, priority: Priority) -> Arc<Slot> {
        let d = self.blobs[blob].entries[index].digest;
        match self.inflight.claim(&d) {
            Claim::Theirs(slot) => {
                if priority == Priority::Demand && !slot.is_urgent() {
                    slot.make_urgent();
                    self.cv.notify_all();
                }
                slot
            }
            Claim::Mine(slot) => {
                self.enqueue(blob, index, slot.clone(), priority, &|_| true);
                slot
            }
        }
    }

    /// Builds and queues a job starting with `index`, whose slot the caller claimed.
    /// Returns the job's slots and the index after its last chunk.
    fn enqueue(
        &self,
        blob: usize,
        index: usize,
        first: Arc<Slot>,
        priority: Priority,
        take: &dyn Fn(usize) -> bool,
    ) -> (Vec<Arc<Slot>>, usize) {
        let entries = &self.blobs[blob].entries;
        let want = match priority {
            Priority::Demand => self.cfg.min_fetch,
            Priority::Trace => self.cfg.trace_fetch,
            Priority::Prefetch => self.cfg.prefetch_fetch,
        };
        let mut slots = vec![first];
        let mut end = entries[index].compressed_offset + u64::from(entries[index].compressed_size);
        let mut next = index + 1;
        while let Some(e) = entries.get(next) {
            let bytes = end - entries[index].compressed_offset;
            if bytes >= want
                || e.compressed_offset != end
                || !self.blobs[blob].is_used(next)
                || !take(next)
                || self.store.contains(&e.digest)
            {
                break;
            }
            let Some(slot) = self.inflight.try_claim(&e.digest) else {
                break;
            };
            slots.push(slot);
            end = e.compressed_offset + u64::from(e.compressed_size);
            next += 1;
        }
        let job = Job {
            blob,
            first: index,
            slots: slots.clone(),
            priority,
        };
        let mut q = self.lock();
        match priority {
            Priority::Demand => q.demand.push_back(job),
            Priority::Trace => q.trace.push_back(job),
            Priority::Prefetch => q.prefetch.push_back(job),
        }
        drop(q);
        self.cv.notify_one();
        (slots, next)
    }

    fn submit(
        &self,
        blob: usize,
        index: usize,
        priority: Priority,
        take: &dyn Fn(usize) -> bool,
    ) -> (Vec<Arc<Slot>>, usize) {
        let Some(e) = self.blobs.get(blob).and_then(|b| b.entries.get(index)) else {
            return (Vec::new(), index + 1);
        };
        if self.store.contains(&e.digest) {
            return (Vec::new(), index + 1);
        }
        match self.inflight.claim(&e.digest) {
            Claim::Theirs(slot) => (vec![slot], index + 1),
            Claim::Mine(slot) => self.enqueue(blob, index, slot, priority, take),
        }
    }

    fn work(&self) {
        loop {
            let job = {
                let mut q = self.lock();
                loop {
                    if self.stop.load(Relaxed) {
                        return;
                    }
                    if let Some(j) = q.pop(&self.cfg) {
                        break j;
                    }
                    q = self.cv.wait(q).unwrap_or_else(|e| e.into_inner());
                }
            };
            // A panic must not strand the job's readers: they get an error instead.
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run(&job)));
            if ran.is_err() {
                self.fail_job(&job, "internal error while fetching (see the log)".into());
            }
            if job.priority != Priority::Demand {
                self.lock().done(job.priority);
                self.cv.notify_all();
            }
        }
    }

    fn fail_job(&self, job: &Job, why: Arc<str>) {
        let entries = &self.blobs[job.blob].entries;
        for (k, slot) in job.slots.iter().enumerate() {
            self.inflight
                .finish(&entries[job.first + k].digest, slot, Err(why.clone()));
        }
    }

    fn run(&self, job: &Job) {
        let blob = &self.blobs[job.blob];
        let chunks = &blob.entries[job.first..job.first + job.slots.len()];
        let start = chunks[0].compressed_offset;
        let last = &chunks[chunks.len() - 1];
        let len = last.compressed_offset + u64::from(last.compressed_size) - start;
        let c = &self.counters;
        c.requests.fetch_add(1, Relaxed);
        let bytes = match self.source.read_blob_range(&blob.digest, start, len) {
            Ok(b) => b,
            Err(e) => {
                c.errors.fetch_add(1, Relaxed);
                tracing::warn!(
                    "fetching {len} bytes at {start} of blob {}: {e}",
                    blob.digest
                );
                return self.fail_job(job, e.to_string().into());
            }
        };
        c.bytes_fetched.fetch_add(bytes.len() as u64, Relaxed);
        if bytes.len() as u64 != len {
            c.errors.fetch_add(1, Relaxed);
            let why = format!("asked for {len} bytes at {start}, got {}", bytes.len());
            tracing::warn!("blob {}: {why}", blob.digest);
            return self.fail_job(job, why.into());
        }
        for (k, (e, slot)) in chunks.iter().zip(&job.slots).enumerate() {
            let at = (e.compressed_offset - start) as usize;
            let stored = &bytes[at..at + e.compressed_size as usize];
            let r = hoist_codec::decode_verified(e, stored)
                .map_err(|err| -> Arc<str> {
                    c.errors.fetch_add(1, Relaxed);
                    tracing::warn!(
                        "chunk {} of blob {} (bytes {}..{}): {err}",
                        job.first + k,
                        blob.digest,
                        e.compressed_offset,
                        e.compressed_offset + u64::from(e.compressed_size)
                    );
                    format!("{err} (the registry served damaged data)").into()
                })
                .and_then(|data| {
                    self.store
                        .put_chunk(&e.digest, &data)
                        .map_err(|err| format!("writing the chunk cache: {err}").into())
                });
            if r.is_ok() {
                c.chunks_fetched.fetch_add(1, Relaxed);
            }
            self.inflight.finish(&e.digest, slot, r);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
