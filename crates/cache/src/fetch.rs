//! Fetching chunks on demand and in the background.
//!
//! A [`Fetcher`] serves one image from a [`ChunkSource`]. A read of a chunk that is not
//! cached becomes a *job*: one ranged read of the data blob covering the chunk and the
//! chunks that follow it in the blob, as long as they are adjacent, missing and not
//! already being fetched, until the job holds the bytes its priority asks for. Chunks
//! follow file order in a blob, so this both coalesces the misses of a sequential reader
//! and amplifies small reads into requests worth a round trip.
//!
//! Every read, cached or not, is also an access of the reader's stream (see
//! [`crate::readahead`]): a reader that keeps going forward through a blob (through a
//! file, or through the files of a directory) gets demand jobs that grow, and jobs that
//! fetch ahead of it at [`Priority::Readahead`], several in flight at once; a reader
//! that jumps about gets [`FetchConfig::min_fetch`] and nothing more.
//!
//! Jobs run on worker threads, at most [`FetchConfig::workers`] of them, which bounds
//! concurrency. A worker starts when a job is queued and no worker is free, and ends
//! after [`FetchConfig::worker_idle`] without work: an idle image costs no thread (a
//! node mounts an image per pod, most of them idle most of the time). There are four
//! priorities: jobs of readers go first; then readahead (at most
//! [`FetchConfig::readahead_workers`] at once); then jobs of a start-up trace (at most
//! [`FetchConfig::trace_workers`]); then other prefetch jobs (at most
//! [`FetchConfig::prefetch_workers`]). Background jobs together never take the last two
//! workers, so a reader always finds one free. A queued background job that a reader
//! starts waiting for is promoted to a reader's job.
//!
//! A source's answer is streamed ([`ChunkSource::open_range`]): each chunk is served to
//! its readers as soon as its bytes are in, so a reader of a job's first chunk does not
//! wait for the rest of a large job. An answer is never trusted: each chunk is decoded
//! and checked against its digest. A chunk that fails is discarded and fetched again on
//! its own, once; the other chunks of the answer are kept. Only a chunk that fails twice
//! fails its readers. An answer that breaks off keeps the chunks that came whole.
//! A reader waits at most [`FetchConfig::read_timeout`] and then gets an error (EIO at
//! the filesystem), whatever the registry does; the job itself goes on and fills the
//! cache if it succeeds. Nothing is remembered of failures: the next read tries again,
//! so fetching resumes by itself when the registry is back.

mod libraries;
mod modules;
mod process;

pub use libraries::{Files, Located};
pub use process::{Process, DEFAULT_PATH};

use crate::readahead::{Plan, Streams};
use crate::source::{ChunkSource, SourceError};
use crate::store::{ChunkStore, Claim, Inflight, Slot};
use crate::views::{Built, Piece, View};
use hoist_format::chunk::ChunkEntry;
use hoist_oci::Digest;
use std::collections::{HashSet, VecDeque};
use std::fs::File;
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Tuning of a [`Fetcher`].
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Compressed bytes a miss fetches: its chunk, and the chunks after it as long as
    /// they fit within this size.
    pub min_fetch: u64,
    /// Compressed bytes a prefetch job fetches at least.
    pub prefetch_fetch: u64,
    /// Compressed bytes a trace job fetches at most. A job takes only chunks of the
    /// trace that lie next to each other in a blob, which start-up reads together (a
    /// program, a library, a data file), so a large one costs its readers little and
    /// saves requests: python's start-up from its trace was ready in 0.39 s at 1 Gbit/s
    /// with 4 MiB and 0.58 s with 1 MiB (eight 1 MiB reads of one file racing for a
    /// short queue, one of them losing its tail to a retransmission timeout), 1.61-1.66 s
    /// against 1.70-1.80 s at 100 Mbit/s.
    pub trace_fetch: u64,
    /// Worker threads: the most ranged reads in flight at once.
    pub workers: usize,
    /// How many of the workers may run trace jobs at once.
    pub trace_workers: usize,
    /// How many of the workers may run other prefetch jobs at once.
    pub prefetch_workers: usize,
    /// How many of the workers may run readahead jobs at once.
    pub readahead_workers: usize,
    /// The largest window a stream of reads fetches ahead of itself, compressed bytes.
    pub readahead_max: u64,
    /// Compressed bytes one readahead job fetches at most: a window is fetched as
    /// several jobs, in flight together.
    pub readahead_job: u64,
    /// How long a read waits for a chunk before it fails.
    pub read_timeout: Duration,
    /// How long a worker without work lives on (a worker that stays costs nothing but
    /// a thread; one that starts again costs a thread's creation, tens of microseconds).
    pub worker_idle: Duration,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            min_fetch: 64 << 10,
            prefetch_fetch: 4 << 20,
            trace_fetch: 4 << 20,
            workers: 10,
            trace_workers: 8,
            prefetch_workers: 2,
            readahead_workers: 4,
            readahead_max: 8 << 20,
            readahead_job: 1 << 20,
            read_timeout: Duration::from_secs(30),
            worker_idle: Duration::from_secs(10),
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
    /// Ahead of a reader going forward.
    Readahead,
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
    /// Chunks a source answered with bytes that failed their digest (discarded).
    pub corrupt: AtomicU64,
    /// Readahead jobs started.
    pub readaheads: AtomicU64,
    /// Libraries fetched because a program loading them was read (see
    /// [`crate::Files`]).
    pub libraries: AtomicU64,
    /// Python modules fetched because a module importing them was read (see
    /// [`crate::python`]).
    pub modules: AtomicU64,
    /// Files fetched because a process about to start reads them first: its program,
    /// the files its arguments name, the C library's files python's start reads (see
    /// [`Process`]).
    pub process_files: AtomicU64,
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
    /// A reader's miss outside any stream of reads (the minimum fetch), or a library
    /// a program loads: its chunks may hint at what comes next ([`crate::elf`]). A
    /// walker's misses need no hint: its stream reads ahead of it.
    hint: bool,
}

impl Job {
    /// Whether it fetches a file that a chunk just read names (a program's library, a
    /// module's import: [`Inner::fetch_named`]), the one readahead job with a hint.
    fn is_named(&self) -> bool {
        self.hint && self.priority == Priority::Readahead
    }
}

/// The queues of jobs, by priority, and how many background jobs of each run.
#[derive(Default)]
struct Queue {
    demand: VecDeque<Job>,
    /// Files a chunk just read names: after readers, before other background jobs and
    /// outside their limits. Each is one small chunk that a reader will most likely
    /// ask for within a round trip or two (its loader or interpreter is running); behind
    /// a window of readahead jobs it came 0.5 s late.
    named: VecDeque<Job>,
    /// Readahead, trace and prefetch jobs, in priority order.
    background: [VecDeque<Job>; 3],
    busy: [usize; 3],
    /// Worker threads alive, and how many of them wait for work.
    workers: usize,
    idle: usize,
}

/// The place of a background priority in [`Queue::background`].
fn rank(p: Priority) -> Option<usize> {
    match p {
        Priority::Demand => None,
        Priority::Readahead => Some(0),
        Priority::Trace => Some(1),
        Priority::Prefetch => Some(2),
    }
}

impl Queue {
    fn push(&mut self, job: Job) {
        if job.is_named() {
            return self.named.push_back(job);
        }
        match rank(job.priority) {
            None => self.demand.push_back(job),
            Some(r) => self.background[r].push_back(job),
        }
    }

    fn pop(&mut self, cfg: &FetchConfig) -> Option<Job> {
        if let Some(j) = self.demand.pop_front() {
            return Some(j);
        }
        if let Some(j) = self.named.pop_front() {
            // Outside the background limits (its end is not counted: see `done`).
            return Some(j);
        }
        // A queued job a reader waits for goes first, and past the limits.
        for q in &mut self.background {
            if let Some(i) = q.iter().position(|j| j.slots.iter().any(|s| s.is_urgent())) {
                let mut j = q.remove(i)?;
                // It runs as a reader's job: outside the limits.
                j.priority = Priority::Demand;
                return Some(j);
            }
        }
        // Background jobs leave two workers to readers.
        if self.busy.iter().sum::<usize>() >= cfg.workers.saturating_sub(2).max(1) {
            return None;
        }
        let limits = [
            cfg.readahead_workers,
            cfg.trace_workers,
            cfg.prefetch_workers,
        ];
        let queues = self.background.iter_mut().zip(&mut self.busy).zip(limits);
        for ((q, busy), limit) in queues {
            if *busy < limit {
                if let Some(j) = q.pop_front() {
                    *busy += 1;
                    return Some(j);
                }
            }
        }
        None
    }

    /// A job of `priority` finished.
    fn done(&mut self, priority: Priority) {
        if let Some(r) = rank(priority) {
            self.busy[r] = self.busy[r].saturating_sub(1);
        }
    }

    /// Jobs queued, of every priority.
    fn queued(&self) -> usize {
        self.demand.len()
            + self.named.len()
            + self.background.iter().map(VecDeque::len).sum::<usize>()
    }

    fn drain(&mut self) -> Vec<Job> {
        let mut jobs: Vec<Job> = self.demand.drain(..).collect();
        jobs.extend(self.named.drain(..));
        for q in &mut self.background {
            jobs.extend(q.drain(..));
        }
        jobs
    }
}

/// The chunks a workload opened, in order, while recording.
#[derive(Default)]
struct Recording {
    order: Vec<(usize, usize)>,
    seen: std::collections::HashSet<(usize, usize)>,
}

struct Inner {
    source: Arc<dyn ChunkSource>,
    streams: Mutex<Streams>,
    /// Chunks a start-up trace is fetching: reads of them are foreseen, and start no
    /// readahead (which would fetch what the trace knows start-up does not read).
    foreseen: Mutex<HashSet<(usize, usize)>>,
    /// Chunks of programs and libraries read ahead whole ([`crate::elf`]): the loader's
    /// page faults on them jump about, and start no readahead either.
    mapped: Mutex<HashSet<(usize, usize)>>,
    /// The libraries of the programs read ([`libraries`]).
    libraries: libraries::Libraries,
    /// The python modules imported by the modules read ([`modules`]).
    modules: modules::Modules,
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
    views: Mutex<ViewQueue>,
    /// This, for the threads it starts.
    me: std::sync::Weak<Inner>,
}

/// The views to build, one at a time, by a thread that runs while there are some.
#[derive(Default)]
struct ViewQueue {
    todo: VecDeque<View>,
    /// The keys of the views queued or being built.
    keys: HashSet<String>,
    running: bool,
}

/// Fetches and caches the chunks of one image.
pub struct Fetcher {
    inner: Arc<Inner>,
}

impl Fetcher {
    /// A fetcher reading `blobs` from `source` into `store`; `inflight` is shared by all
    /// fetchers of the store. Starts no thread: workers start with the first jobs.
    pub fn new(
        source: Arc<dyn ChunkSource>,
        blobs: Vec<BlobChunks>,
        store: Arc<ChunkStore>,
        inflight: Arc<Inflight>,
        cfg: FetchConfig,
    ) -> Fetcher {
        let inner = Arc::new_cyclic(|me| Inner {
            source,
            streams: Mutex::new(Streams::new(cfg.min_fetch, cfg.readahead_max)),
            foreseen: Mutex::new(HashSet::new()),
            mapped: Mutex::new(HashSet::new()),
            libraries: libraries::Libraries::default(),
            modules: modules::Modules::default(),
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
            views: Mutex::new(ViewQueue::default()),
            me: me.clone(),
        });
        Fetcher { inner }
    }

    /// Gives the fetcher the image's tree, so that a program's libraries are fetched
    /// as soon as its dynamic section is in, before the loader opens them one by one
    /// (see [`Files`]), and a python module's imports as soon as it is read (see
    /// [`crate::python`]). Without it, only each file's own mapped range is read
    /// ahead. Only the first call counts.
    pub fn set_files(&self, files: Arc<dyn Files>) {
        self.inner.libraries.set_files(files);
    }

    /// A process is about to start in the image: the first chunks of its program and
    /// of the files its arguments name are fetched now, before its reads (see
    /// [`Process`]). Returns at once; does nothing without the image's tree
    /// ([`Fetcher::set_files`]).
    pub fn will_run(&self, process: Process) {
        self.inner.will_run(process);
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

    /// Worker threads alive now.
    pub fn workers(&self) -> usize {
        self.inner.lock().workers
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
        self.open_planned(blob, index).map(|(f, _)| f)
    }

    /// [`Fetcher::open_chunk`], with the plan of the reader's stream for the access.
    fn open_planned(&self, blob: usize, index: usize) -> Result<(File, Plan), FetchError> {
        let e = *self.entry(blob, index)?;
        let plan = self.inner.access(blob, index);
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
                return Ok((f, plan));
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
            let slot = self.inner.request(blob, index, plan.demand);
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
        let (f, plan) = self.open_planned(blob, index)?;
        f.read_exact_at(buf, offset)?;
        // A walker's stream reads ahead of it (tar reading every module of a tree
        // needs none of their imports fetched ahead).
        if !plan.confirmed {
            self.inner.module_read(blob, index, offset, buf);
        }
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

    /// Notes that chunk `index` of blob `blob` is read: for its reader's stream (which
    /// may fetch ahead of it) and, while recording, for the trace. Reads through
    /// [`Fetcher::open_chunk`] are noted by it; a reader that reaches the cache another
    /// way (FUSE passthrough) says so here.
    pub fn note_read(&self, blob: usize, index: usize) {
        self.inner.access(blob, index);
    }

    /// Tells the fetcher that a start-up trace fetches `chunks`: reads of them start no
    /// readahead, and the store evicts them last (until [`Fetcher::shutdown`]).
    pub fn foresee(&self, chunks: impl IntoIterator<Item = (usize, usize)>) {
        let mut foreseen = lock(&self.inner.foreseen);
        let new: Vec<(usize, usize)> = chunks
            .into_iter()
            .filter(|c| self.entry(c.0, c.1).is_ok() && foreseen.insert(*c))
            .collect();
        self.inner.store.pin_trace(&self.inner.digests(&new));
    }

    /// Queues `view` for building in the background, unless it is queued already.
    /// It is built only if all its chunks are cached by then.
    pub fn build_view_later(&self, view: View) {
        let inner = &self.inner;
        let mut v = lock(&inner.views);
        if inner.stop.load(Relaxed) || !v.keys.insert(view.key()) {
            return;
        }
        v.todo.push_back(view);
        if v.running {
            return;
        }
        // One thread: views are built from local files, one at a time is enough, and
        // it never competes with more than one reader for the disk.
        let me = inner.clone();
        let spawned = std::thread::Builder::new()
            .name("hoist-views".into())
            .spawn(move || me.build_views());
        match spawned {
            Ok(_) => v.running = true,
            Err(e) => {
                tracing::warn!("starting the view builder: {e}");
                v.todo.clear();
                v.keys.clear();
            }
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
        let foreseen: Vec<(usize, usize)> = lock(&self.inner.foreseen).drain().collect();
        self.inner.store.unpin_trace(&self.inner.digests(&foreseen));
        let jobs = self.inner.lock().drain();
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

    /// Claims chunk `d` for fetching if nobody is fetching it and it is not cached.
    fn claim_missing(&self, d: &[u8; 32]) -> Option<Arc<Slot>> {
        let slot = self.inflight.try_claim(d)?;
        (!self.cached_meanwhile(d, &slot)).then_some(slot)
    }

    /// Whether chunk `d`, just claimed with `slot`, was cached meanwhile (by a fetch
    /// that finished between the caller's look at the store and its claim); if so the
    /// claim is released at once, as a success.
    fn cached_meanwhile(&self, d: &[u8; 32], slot: &Arc<Slot>) -> bool {
        let cached = self.store.contains(d);
        if cached {
            self.inflight.finish(d, slot, Ok(()));
        }
        cached
    }

    /// The digests of chunks named by (blob, index), which must exist.
    fn digests(&self, chunks: &[(usize, usize)]) -> HashSet<[u8; 32]> {
        chunks
            .iter()
            .filter_map(|&(b, i)| self.blobs.get(b)?.entries.get(i).map(|e| e.digest))
            .collect()
    }

    fn failed(&self, blob: usize, index: usize, why: Arc<str>) -> FetchError {
        FetchError::Failed {
            blob: self.blobs[blob].digest.to_string(),
            index,
            why,
        }
    }

    /// Notes an access for the reader's stream and the recording, and starts the
    /// readahead the stream asks for. Returns the stream's plan.
    fn access(&self, blob: usize, index: usize) -> Plan {
        if self.recording.load(Relaxed) {
            let mut r = lock(&self.record);
            if r.seen.insert((blob, index)) {
                r.order.push((blob, index));
            }
        }
        let Some(b) = self.blobs.get(blob) else {
            return Plan::default();
        };
        if lock(&self.foreseen).contains(&(blob, index)) {
            return Plan::default();
        }
        let mapped = lock(&self.mapped);
        if mapped.contains(&(blob, index)) {
            return Plan::default();
        }
        // A program's chunks are neither a stream's steps nor gaps in one: a walker
        // reading it whole (tar) goes on after it as if it had skipped it.
        let used = |k: usize| b.is_used(k) && !mapped.contains(&(blob, k));
        let plan = lock(&self.streams).access(blob, index, &b.entries, &used);
        drop(mapped);
        if let Some((from, to)) = plan.ahead {
            self.read_ahead(blob, from, to);
        }
        plan
    }

    /// Starts readahead jobs for the used, missing chunks of blob `blob` whose
    /// compressed bytes start in `from..to`.
    fn read_ahead(&self, blob: usize, from: u64, to: u64) {
        let b = &self.blobs[blob];
        let mut i = b.entries.partition_point(|e| e.compressed_offset < from);
        while let Some(e) = b.entries.get(i) {
            if e.compressed_offset >= to || self.stop.load(Relaxed) {
                break;
            }
            if !b.is_used(i) || self.store.contains(&e.digest) {
                i += 1;
                continue;
            }
            let Some(slot) = self.claim_missing(&e.digest) else {
                i += 1;
                continue;
            };
            self.counters.readaheads.fetch_add(1, Relaxed);
            let within = |k: usize| b.entries[k].compressed_offset < to;
            let (_, next) = self.enqueue(
                blob,
                i,
                slot,
                Priority::Readahead,
                self.cfg.readahead_job,
                &within,
                false,
            );
            i = next.max(i + 1);
        }
    }

    /// Starts readahead of the chunks after chunk `index` of blob `blob` that hold the
    /// first `len` bytes of the ELF file starting there (a file's chunks lie in order
    /// in its blob), at most [`FetchConfig::readahead_max`] compressed bytes of them.
    fn read_ahead_mapped(&self, blob: usize, index: usize, len: u64) {
        let entries = &self.blobs[blob].entries;
        if lock(&self.foreseen).contains(&(blob, index)) {
            return;
        }
        let end = entries[index].uncompressed_offset.saturating_add(len);
        let last = entries.partition_point(|e| e.uncompressed_offset < end);
        let (Some(first), Some(last)) = (entries.get(index + 1), last.checked_sub(1)) else {
            return;
        };
        if last <= index {
            return;
        }
        let to = entries[last].compressed_offset + u64::from(entries[last].compressed_size);
        let to = to.min(first.compressed_offset + self.cfg.readahead_max);
        // Past the cap, a large file's reader gets its stream's readahead as any other.
        let last = (index + 1..=last)
            .take_while(|&k| entries[k].compressed_offset < to)
            .last()
            .unwrap_or(index);
        lock(&self.mapped).extend((index..=last).map(|k| (blob, k)));
        tracing::debug!(
            "chunk {index} of blob {} starts an ELF file mapping {len} bytes: reading ahead chunks {}..={last}",
            self.blobs[blob].digest,
            index + 1
        );
        self.read_ahead(blob, first.compressed_offset, to);
    }

    /// Fetches chunk `index` of blob `blob` alone, at readahead priority, unless it is
    /// unused, cached or being fetched, counting it in `counter`; whether it asked. For
    /// files a chunk just read names (a program's libraries, a module's imports): the
    /// chunk is the file's start, and hints in turn (a program's header says what else
    /// it maps and loads).
    fn fetch_named(&self, blob: usize, index: usize, counter: &AtomicU64) -> bool {
        let Some(e) = self.blobs.get(blob).and_then(|b| b.entries.get(index)) else {
            return false;
        };
        if !self.blobs[blob].is_used(index) || self.store.contains(&e.digest) {
            return false;
        }
        let Claim::Mine(slot) = self.inflight.claim(&e.digest) else {
            return false;
        };
        if self.cached_meanwhile(&e.digest, &slot) {
            return false;
        }
        counter.fetch_add(1, Relaxed);
        self.enqueue(
            blob,
            index,
            slot,
            Priority::Readahead,
            self.cfg.min_fetch,
            &|_| false,
            true,
        );
        true
    }

    /// The slot of a demanded chunk: a new job of at least `want` compressed bytes, or
    /// the one fetching it already.
    fn request(&self, blob: usize, index: usize, want: u64) -> Arc<Slot> {
        let d = self.blobs[blob].entries[index].digest;
        match self.inflight.claim(&d) {
            Claim::Theirs(slot) => {
                if !slot.is_urgent() {
                    slot.make_urgent();
                    // Promoted if still queued: it may need a worker of its own.
                    self.wake(&mut self.lock());
                }
                slot
            }
            Claim::Mine(slot) if self.cached_meanwhile(&d, &slot) => slot,
            Claim::Mine(slot) => {
                // A large window is fetched ahead, in readahead jobs in flight
                // together, not by the reader's own job.
                let want = want.min(self.cfg.readahead_job).max(self.cfg.min_fetch);
                let hint = want <= self.cfg.min_fetch;
                self.enqueue(
                    blob,
                    index,
                    slot.clone(),
                    Priority::Demand,
                    want,
                    &|_| true,
                    hint,
                );
                slot
            }
        }
    }

    /// Builds and queues a job of `priority` starting with `index`, whose slot the
    /// caller claimed, taking the chunks after it (adjacent, used, missing, not in
    /// flight, and for which `take` holds) until it holds `want` compressed bytes; with
    /// `hint`, its chunks may say what is read next (see [`Job`]). Returns the job's
    /// slots and the index after its last chunk.
    #[allow(clippy::too_many_arguments)]
    fn enqueue(
        &self,
        blob: usize,
        index: usize,
        first: Arc<Slot>,
        priority: Priority,
        want: u64,
        take: &dyn Fn(usize) -> bool,
        hint: bool,
    ) -> (Vec<Arc<Slot>>, usize) {
        let entries = &self.blobs[blob].entries;
        let mut slots = vec![first];
        let mut end = entries[index].compressed_offset + u64::from(entries[index].compressed_size);
        let mut next = index + 1;
        while let Some(e) = entries.get(next) {
            let bytes = end - entries[index].compressed_offset;
            // A miss takes the small chunks after it up to `want`, never a large one
            // past it (python's start-up fetched 0.7 MB of neighbours it never read
            // when a 64 KiB miss could take one of 300 KiB).
            let past = priority == Priority::Demand && bytes + u64::from(e.compressed_size) > want;
            if bytes >= want
                || past
                || e.compressed_offset != end
                || !self.blobs[blob].is_used(next)
                || !take(next)
                || self.store.contains(&e.digest)
            {
                break;
            }
            let Some(slot) = self.claim_missing(&e.digest) else {
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
            hint,
        };
        let mut q = self.lock();
        q.push(job);
        self.wake(&mut q);
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
        let want = match priority {
            Priority::Demand => self.cfg.min_fetch,
            Priority::Readahead => self.cfg.readahead_job,
            Priority::Trace => self.cfg.trace_fetch,
            Priority::Prefetch => self.cfg.prefetch_fetch,
        };
        match self.inflight.claim(&e.digest) {
            Claim::Theirs(slot) => (vec![slot], index + 1),
            Claim::Mine(slot) if self.cached_meanwhile(&e.digest, &slot) => (Vec::new(), index + 1),
            Claim::Mine(slot) => self.enqueue(blob, index, slot, priority, want, take, false),
        }
    }

    /// Starts a worker if the queued jobs outnumber the workers waiting for work and
    /// the limit allows; then wakes the waiting ones. Called with the queue locked,
    /// after a job was queued or promoted.
    fn wake(&self, q: &mut Queue) {
        if q.queued() > q.idle && q.workers < self.cfg.workers.max(1) {
            if let Some(me) = self.me.upgrade() {
                let spawned = std::thread::Builder::new()
                    .name(format!("hoist-fetch-{}", q.workers))
                    .spawn(move || me.work());
                match spawned {
                    Ok(_) => q.workers += 1,
                    // The job waits for a running worker, or fails its reader at the
                    // read timeout if there is none.
                    Err(e) => tracing::warn!("starting a fetch worker: {e}"),
                }
            }
        }
        self.cv.notify_all();
    }

    /// A worker: runs jobs until the fetcher stops or it has waited
    /// [`FetchConfig::worker_idle`] for one.
    fn work(&self) {
        loop {
            let job = {
                let mut q = self.lock();
                let mut waited_out = false;
                loop {
                    if self.stop.load(Relaxed) {
                        q.workers -= 1;
                        return;
                    }
                    if let Some(j) = q.pop(&self.cfg) {
                        break j;
                    }
                    if waited_out {
                        q.workers -= 1;
                        return;
                    }
                    q.idle += 1;
                    let (g, r) = self
                        .cv
                        .wait_timeout(q, self.cfg.worker_idle)
                        .unwrap_or_else(|e| e.into_inner());
                    q = g;
                    q.idle -= 1;
                    waited_out = r.timed_out();
                }
            };
            // A panic must not strand the job's readers: they get an error instead.
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run(&job)));
            if ran.is_err() {
                self.fail_job(&job, "internal error while fetching (see the log)".into());
            }
            if job.priority != Priority::Demand && !job.is_named() {
                self.lock().done(job.priority);
                self.cv.notify_all();
            }
        }
    }

    /// The view builder: builds the queued views, then ends.
    fn build_views(&self) {
        loop {
            let view = {
                let mut v = lock(&self.views);
                match v.todo.pop_front() {
                    Some(view) if !self.stop.load(Relaxed) => view,
                    _ => {
                        v.todo.clear();
                        v.keys.clear();
                        v.running = false;
                        return;
                    }
                }
            };
            match self.store.build_view(&view, &|| self.stop.load(Relaxed)) {
                Ok(built) => self.counters.count_view(built),
                Err(e) => tracing::debug!("view {}: {e}", view.key()),
            }
            lock(&self.views).keys.remove(&view.key());
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
        let t0 = Instant::now();
        let what = || {
            format!(
                "{len} bytes at {start} of blob {} from {}",
                blob.digest,
                self.source.describe()
            )
        };
        c.requests.fetch_add(1, Relaxed);
        // The answer is streamed: each chunk is verified, stored and handed to its
        // readers as soon as its bytes are in, not when the whole range is.
        let mut answer = match self.source.open_range(&blob.digest, start, len) {
            Ok(r) => Some(r),
            Err(SourceError::Unavailable(why)) => {
                c.errors.fetch_add(1, Relaxed);
                tracing::warn!("fetching {}: {why}", what());
                return self.fail_job(job, why);
            }
            // Nothing of it is usable: each chunk is fetched on its own below.
            Err(SourceError::Corrupt(why)) => {
                c.errors.fetch_add(1, Relaxed);
                tracing::warn!("fetching {}: {why}", what());
                None
            }
        };
        let mut first_in = None;
        // Programs and libraries about to be mapped (crate::elf), for the chunk a lone
        // miss asked for (not the neighbours it took along) or a library's header; a
        // stream reads ahead by itself, and a trace knows what start-up reads.
        let hint = job.hint;
        let mut program = None;
        let mut bytes = Vec::new();
        for (k, (e, slot)) in chunks.iter().zip(&job.slots).enumerate() {
            let got = answer.as_mut().map(|r| {
                bytes.resize(e.compressed_size as usize, 0);
                r.read_exact(&mut bytes)
            });
            let stored = match got {
                None => None,
                Some(Ok(())) => {
                    c.bytes_fetched.fetch_add(bytes.len() as u64, Relaxed);
                    first_in.get_or_insert_with(Instant::now);
                    Some(bytes.as_slice())
                }
                // A short answer is a wrong one: the rest is fetched chunk by chunk.
                Some(Err(err)) if err.kind() == std::io::ErrorKind::UnexpectedEof => {
                    c.errors.fetch_add(1, Relaxed);
                    tracing::warn!(
                        "fetching {}: the answer ended before chunk {} (the source served damaged data)",
                        what(),
                        job.first + k
                    );
                    answer = None;
                    None
                }
                Some(Err(err)) => {
                    c.errors.fetch_add(1, Relaxed);
                    tracing::warn!("fetching {}: {err}", what());
                    let why: Arc<str> = err.to_string().into();
                    for (e, slot) in chunks[k..].iter().zip(&job.slots[k..]) {
                        self.inflight.finish(&e.digest, slot, Err(why.clone()));
                    }
                    return;
                }
            };
            let r = self
                .verified(job.blob, job.first + k, e, stored)
                .and_then(|data| {
                    if hint && k == 0 {
                        program = crate::elf::Program::parse(&data);
                    }
                    self.store
                        .put_chunk(&e.digest, &data)
                        .map_err(|err| format!("writing the chunk cache: {err}").into())
                });
            if r.is_ok() {
                c.chunks_fetched.fetch_add(1, Relaxed);
            }
            // Queued before the reader wakes, to be under way before its next fault
            // (or the loader's next open).
            if let Some(p) = program.take().filter(|_| r.is_ok()) {
                let mapped = p.mapped;
                if !self.watch_program(job.blob, job.first + k, p) {
                    self.read_ahead_mapped(job.blob, job.first + k, mapped);
                }
            }
            if r.is_ok() {
                self.chunk_in(job.blob, job.first + k);
                self.module_chunk_in(job.blob, job.first + k);
            }
            self.inflight.finish(&e.digest, slot, r);
        }
        let ms = |t: Instant| (t - t0).as_secs_f64() * 1e3;
        tracing::debug!(
            "{} job: {len} bytes at {start} of blob {}, {} chunks: first chunk in {:.1} ms, all in {:.1} ms",
            match job.is_named() {
                true => "Named".to_string(),
                false => format!("{:?}", job.priority),
            },
            blob.digest,
            chunks.len(),
            first_in.map_or(0.0, ms),
            ms(Instant::now()),
        );
    }

    /// One ranged read, counted; an answer of another length is corrupt.
    fn read(&self, blob: &Digest, start: u64, len: u64) -> Result<Vec<u8>, SourceError> {
        let c = &self.counters;
        c.requests.fetch_add(1, Relaxed);
        let r = self.source.read_range(blob, start, len).and_then(|bytes| {
            c.bytes_fetched.fetch_add(bytes.len() as u64, Relaxed);
            match bytes.len() as u64 == len {
                true => Ok(bytes),
                false => Err(SourceError::Corrupt(
                    format!("asked for {len} bytes at {start}, got {}", bytes.len()).into(),
                )),
            }
        });
        if let Err(e) = &r {
            c.errors.fetch_add(1, Relaxed);
            if let SourceError::Corrupt(why) = e {
                tracing::warn!("blob {blob} from {}: {why}", self.source.describe());
            }
        }
        r
    }

    /// Chunk `index` of blob `blob`, decoded and verified: from `stored` (its bytes in a
    /// larger answer) if they are right, or else fetched again on its own, once.
    fn verified(
        &self,
        blob: usize,
        index: usize,
        e: &ChunkEntry,
        stored: Option<&[u8]>,
    ) -> Result<Vec<u8>, Arc<str>> {
        let digest = &self.blobs[blob].digest;
        let check = |bytes: &[u8]| {
            hoist_codec::decode_verified(e, bytes).map_err(|err| {
                self.counters.corrupt.fetch_add(1, Relaxed);
                tracing::warn!(
                    "chunk {index} of blob {digest} (bytes {}..{}) from {}: {err}; discarded",
                    e.compressed_offset,
                    e.compressed_offset + u64::from(e.compressed_size),
                    self.source.describe()
                );
                err
            })
        };
        if let Some(Ok(data)) = stored.map(check) {
            return Ok(data);
        }
        let alone = self
            .read(digest, e.compressed_offset, u64::from(e.compressed_size))
            .map_err(|err| match err {
                SourceError::Corrupt(why) => SourceError::Corrupt(why).to_string().into(),
                SourceError::Unavailable(why) => why,
            })?;
        check(&alone).map_err(|err| format!("{err} (the source served damaged data twice)").into())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    //! The fetch core against a fake source: a blob in memory that counts and logs the
    //! ranges asked of it, and can stall, refuse, or damage chosen chunks.
    use super::*;
    use hoist_format::chunk::Compressor;
    use std::collections::HashMap;
    use std::sync::atomic::AtomicUsize;

    pub(super) const CHUNK: u32 = 16 << 10;

    #[derive(Default)]
    pub(super) struct Fake {
        blob: Vec<u8>,
        /// (offset, len) of every request, in order.
        pub(super) asked: Mutex<Vec<(u64, u64)>>,
        /// Requests being answered, and the most at once.
        now: AtomicUsize,
        most: AtomicUsize,
        /// Requests of this length wait until another request is under way (at most
        /// 200 ms): two in flight together are then seen, whatever the scheduling.
        meet_len: u64,
        /// Compressed offsets of chunks answered damaged, with how many times more.
        damage: Mutex<HashMap<u64, usize>>,
        /// While set, every request waits until it is cleared (bounded) and then fails.
        stall: Mutex<bool>,
        unstalled: Condvar,
        /// When set, answers are streamed ([`ChunkSource::open_range`]) and hold after
        /// this many bytes until it is cleared; then they go on, or break off if `cut`
        /// is set or nobody cleared it within 5 s.
        hold_after: Mutex<Option<u64>>,
        released: Condvar,
        cut: AtomicBool,
    }

    /// A streamed answer of the fake.
    struct Held<'a> {
        fake: &'a Fake,
        bytes: std::io::Cursor<Vec<u8>>,
        hold: u64,
    }

    impl Read for Held<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let at = self.bytes.position();
            if at >= self.hold {
                let g = self.fake.hold_after.lock().unwrap();
                let (g, _) = self
                    .fake
                    .released
                    .wait_timeout_while(g, Duration::from_secs(5), |h| h.is_some())
                    .unwrap();
                if self.fake.cut.load(Relaxed) || g.is_some() {
                    return Err(std::io::Error::other("connection reset"));
                }
                self.hold = u64::MAX;
            }
            let n = buf
                .len()
                .min((self.hold - at).min(usize::MAX as u64) as usize);
            self.bytes.read(&mut buf[..n])
        }
    }

    impl ChunkSource for Fake {
        fn read_range(&self, _: &Digest, offset: u64, len: u64) -> Result<Vec<u8>, SourceError> {
            self.asked.lock().unwrap().push((offset, len));
            let n = self.now.fetch_add(1, Relaxed) + 1;
            self.most.fetch_max(n, Relaxed);
            let t = Instant::now();
            while len == self.meet_len
                && self.now.load(Relaxed) < 2
                && t.elapsed() < Duration::from_millis(200)
            {
                std::thread::yield_now();
            }
            let stalled = {
                let g = self.stall.lock().unwrap();
                let (g, _) = self
                    .unstalled
                    .wait_timeout_while(g, Duration::from_secs(5), |s| *s)
                    .unwrap();
                *g
            };
            let r = if stalled {
                Err(SourceError::Unavailable("stalled".into()))
            } else {
                let mut bytes = self.blob[offset as usize..(offset + len) as usize].to_vec();
                let mut damage = self.damage.lock().unwrap();
                for (at, left) in damage.iter_mut() {
                    if *left > 0 && (offset..offset + len).contains(at) {
                        *left -= 1;
                        bytes[(*at - offset) as usize] ^= 0xff;
                    }
                }
                Ok(bytes)
            };
            self.now.fetch_sub(1, Relaxed);
            r
        }
        fn describe(&self) -> String {
            "the fake".into()
        }

        fn open_range(
            &self,
            blob: &Digest,
            offset: u64,
            len: u64,
        ) -> Result<Box<dyn Read + Send + '_>, SourceError> {
            let hold = *self.hold_after.lock().unwrap();
            let bytes = self.read_range(blob, offset, len)?;
            Ok(match hold {
                None => Box::new(std::io::Cursor::new(bytes)),
                Some(hold) => Box::new(Held {
                    fake: self,
                    bytes: std::io::Cursor::new(bytes),
                    hold,
                }),
            })
        }
    }

    impl Fake {
        fn release(&self) {
            *self.hold_after.lock().unwrap() = None;
            self.released.notify_all();
        }
    }

    impl Fake {
        pub(super) fn requests(&self) -> usize {
            self.asked.lock().unwrap().len()
        }
    }

    pub(super) struct Setup {
        _dir: tempfile::TempDir,
        pub(super) fake: Arc<Fake>,
        pub(super) fetcher: Fetcher,
        pub(super) chunks: Vec<Vec<u8>>,
    }

    /// Chunk `i` of a test blob: `len` distinct bytes.
    pub(super) fn chunk(i: usize, len: usize) -> Vec<u8> {
        let mut c: Vec<u8> = (0..len).map(|k| (i * 7 + k * 13 + k / 251) as u8).collect();
        // Distinct digests: no two chunks dedup into one.
        c[..8].copy_from_slice(&(i as u64).to_le_bytes());
        c
    }

    /// A blob of `n` stored (uncompressed) chunks of distinct bytes, all used.
    fn setup(n: usize, fake: Fake, cfg: FetchConfig) -> Setup {
        let chunks = (0..n).map(|i| chunk(i, CHUNK as usize)).collect();
        setup_chunks(chunks, fake, cfg)
    }

    /// A blob of these stored chunks (each a multiple of 4 KiB), all used.
    pub(super) fn setup_chunks(chunks: Vec<Vec<u8>>, fake: Fake, cfg: FetchConfig) -> Setup {
        let mut at = 0;
        let entries: Vec<ChunkEntry> = chunks
            .iter()
            .map(|c| {
                let e = ChunkEntry {
                    uncompressed_offset: at,
                    compressed_offset: at,
                    uncompressed_size: c.len() as u32,
                    compressed_size: c.len() as u32,
                    compressor: Compressor::None,
                    digest: hoist_codec::digest(c),
                };
                at += c.len() as u64;
                e
            })
            .collect();
        let n = chunks.len();
        let fake = Arc::new(Fake {
            blob: chunks.concat(),
            ..fake
        });
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(ChunkStore::open(dir.path(), 1 << 40).unwrap());
        let blobs = vec![BlobChunks {
            digest: Digest::of(&fake.blob),
            used: vec![true; n],
            entries,
        }];
        let fetcher = Fetcher::new(
            fake.clone(),
            blobs,
            store,
            Arc::new(Inflight::default()),
            cfg,
        );
        Setup {
            _dir: dir,
            fake,
            fetcher,
            chunks,
        }
    }

    pub(super) fn read(s: &Setup, index: usize) -> Vec<u8> {
        let mut buf = vec![0; s.chunks[index].len()];
        s.fetcher.read_at(0, index, 0, &mut buf).unwrap();
        buf
    }

    #[test]
    fn a_miss_takes_the_adjacent_missing_chunks_up_to_the_minimum() {
        let s = setup(64, Fake::default(), FetchConfig::default());
        assert_eq!(read(&s, 8), s.chunks[8]);
        // 64 KiB: four chunks of 16 KiB in one request.
        assert_eq!(*s.fake.asked.lock().unwrap(), vec![(8 * 16384, 65536)]);
        for i in 9..12 {
            assert_eq!(read(&s, i), s.chunks[i]);
        }
        // They came with it: nothing asked for them again. (Reading on in order starts
        // readahead past them.)
        let asked = s.fake.asked.lock().unwrap().clone();
        assert!(asked[1..].iter().all(|a| a.0 >= 12 * 16384), "{asked:?}");
    }

    #[test]
    fn a_miss_never_takes_a_large_chunk_past_the_minimum() {
        // Small chunks, then one of 256 KiB, then small ones again.
        let sizes = [16, 16, 16, 256, 16, 16].map(|k| k << 10);
        let chunks = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| chunk(i, n))
            .collect();
        let s = setup_chunks(chunks, Fake::default(), FetchConfig::default());
        assert_eq!(read(&s, 1), s.chunks[1]);
        // Chunk 2 fits in the 64 KiB a miss takes; chunk 3 would make it 288 KiB.
        assert_eq!(*s.fake.asked.lock().unwrap(), vec![(16 << 10, 32 << 10)]);
        assert_eq!(read(&s, 3), s.chunks[3]);
        assert_eq!(s.fake.asked.lock().unwrap()[1], (48 << 10, 256 << 10));
    }

    /// A 64-bit ELF header whose one loadable segment maps the file's first `len` bytes,
    /// at the start of a chunk of `size` bytes.
    fn elf_chunk(i: usize, size: usize, len: u64) -> Vec<u8> {
        let mut c = chunk(i, size);
        let mut h = [0u8; 64 + 56];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2; // 64 bits
        h[5] = 1; // little-endian
        h[6] = 1; // version
        h[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        h[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        h[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        h[64..68].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD at offset 0
        h[64 + 32..64 + 40].copy_from_slice(&len.to_le_bytes()); // p_filesz
        c[..h.len()].copy_from_slice(&h);
        c
    }

    /// A program of one chunk (chunk `i` of `CHUNK` bytes) that loads `libraries`.
    fn program_chunk(i: usize, libraries: &[&str]) -> Vec<u8> {
        program_chunks(i, libraries, 1, None).remove(0)
    }

    /// A program of `n` chunks (chunks `i..i + n` of `CHUNK` bytes, all mapped) that
    /// loads `libraries`, whose dynamic section lies in its last chunk, and whose
    /// interpreter is `interp`.
    pub(super) fn program_chunks(
        i: usize,
        libraries: &[&str],
        n: usize,
        interp: Option<&str>,
    ) -> Vec<Vec<u8>> {
        use object::elf;
        let mut strtab = vec![0u8];
        let mut dynamic = Vec::new();
        for l in libraries {
            dynamic.push((u64::from(elf::DT_NEEDED), strtab.len() as u64));
            strtab.extend_from_slice(l.as_bytes());
            strtab.push(0);
        }
        dynamic.push((u64::from(elf::DT_STRTAB), 0x40_1000));
        dynamic.push((u64::from(elf::DT_STRSZ), strtab.len() as u64));
        let c = CHUNK as usize;
        let (at, mapped) = match n {
            1 => (0x2000, 0x3000),
            _ => ((n - 1) * c + 0x100, n * c),
        };
        let f =
            crate::elf::tests::program_file(&strtab, &dynamic, at as u64, mapped as u64, interp);
        // The chunks keep their own bytes (distinct digests) but for the header, the
        // interpreter's path and the string table (0..0x2000), and the dynamic section.
        let mut out: Vec<Vec<u8>> = (0..n).map(|k| chunk(i + k, c)).collect();
        let head = if n == 1 { f.len() } else { 0x2000 };
        out[0][..head].copy_from_slice(&f[..head]);
        let d = at..at + 16 * dynamic.len();
        out[n - 1][d.start - (n - 1) * c..d.end - (n - 1) * c].copy_from_slice(&f[d]);
        out
    }

    /// An image tree of a few libraries: path → (blob, index).
    struct Tree(HashMap<String, (usize, usize)>);

    impl Files for Tree {
        fn first_chunk(&self, path: &str) -> Option<(usize, usize)> {
            self.0.get(path).copied()
        }
    }

    /// Waits (bounded) for chunk `index`, which must be in flight or cached: never
    /// starts a fetch of it.
    fn wait_fetched(s: &Setup, index: usize) {
        let (slots, _) = s.fetcher.prefetch(0, index, Priority::Prefetch, &|_| false);
        for slot in slots {
            let deadline = Instant::now() + Duration::from_secs(10);
            assert_eq!(slot.wait(deadline), Some(Ok(())), "chunk {index}");
        }
    }

    #[test]
    fn a_program_whose_dynamic_section_lies_anywhere_loads_nothing_and_breaks_nothing() {
        let tree = || {
            Arc::new(Tree(HashMap::from([(
                "/usr/lib/libfoo.so.1".to_owned(),
                (0, 7),
            )])))
        };
        for offset in [u64::MAX - 8, u64::MAX / 2, 40 * u64::from(CHUNK), 0x3000] {
            let mut chunks: Vec<Vec<u8>> = (0..12).map(|i| chunk(i, CHUNK as usize)).collect();
            chunks[2] = program_chunk(2, &["libfoo.so.1"]);
            // p_offset of the PT_DYNAMIC header (the second program header).
            chunks[2][64 + 56 + 8..64 + 56 + 16].copy_from_slice(&offset.to_le_bytes());
            let s = setup_chunks(chunks, Fake::default(), FetchConfig::default());
            s.fetcher.set_files(tree());
            assert_eq!(read(&s, 2), s.chunks[2], "dynamic section at {offset}");
            assert_eq!(s.fetcher.counters().libraries.load(Relaxed), 0);
        }
    }

    #[test]
    fn the_libraries_a_program_loads_are_fetched_before_the_loader_asks() {
        // Chunk 2 is a program loading libfoo (chunk 7, which loads libbar, chunk 10,
        // and libfoo again) and libnone, which the tree lacks.
        let mut chunks: Vec<Vec<u8>> = (0..12).map(|i| chunk(i, CHUNK as usize)).collect();
        chunks[2] = program_chunk(2, &["libfoo.so.1", "libnone.so"]);
        chunks[7] = program_chunk(7, &["libbar.so", "libfoo.so.1"]);
        let cfg = FetchConfig {
            min_fetch: CHUNK.into(),
            ..FetchConfig::default()
        };
        let s = setup_chunks(chunks, Fake::default(), cfg);
        s.fetcher.set_files(Arc::new(Tree(HashMap::from([
            ("/lib/x86_64-linux-gnu/libfoo.so.1".to_owned(), (0, 7)),
            ("/usr/lib/libbar.so".to_owned(), (0, 10)),
        ]))));
        let c = u64::from(CHUNK);
        assert_eq!(read(&s, 2), s.chunks[2]);
        // libfoo was asked for before the program's reader woke (and libbar, maybe
        // already, once libfoo's header is in); nothing twice.
        assert!((1..=2).contains(&s.fetcher.counters().libraries.load(Relaxed)));
        wait_fetched(&s, 7);
        assert_eq!(s.fetcher.counters().libraries.load(Relaxed), 2);
        wait_fetched(&s, 10);
        assert_eq!(s.fetcher.counters().libraries.load(Relaxed), 2);
        let mut asked = s.fake.asked.lock().unwrap().clone();
        asked.sort();
        assert_eq!(asked, vec![(2 * c, c), (7 * c, c), (10 * c, c)]);
        // The loader's reads find them cached.
        for i in [7, 10] {
            assert_eq!(read(&s, i), s.chunks[i]);
        }
        assert_eq!(s.fetcher.counters().misses.load(Relaxed), 1);
        assert_eq!(s.fake.requests(), 3);
        // With no tree given, a program loads nothing; nor does one that a miss of the
        // chunk before it took along (nobody asked for it).
        let mut chunks: Vec<Vec<u8>> = (0..12).map(|i| chunk(i, CHUNK as usize)).collect();
        chunks[2] = program_chunk(2, &["libfoo.so.1"]);
        let s = setup_chunks(chunks.clone(), Fake::default(), FetchConfig::default());
        assert_eq!(read(&s, 2), s.chunks[2]);
        assert_eq!(s.fetcher.counters().libraries.load(Relaxed), 0);
        let s = setup_chunks(chunks, Fake::default(), FetchConfig::default());
        s.fetcher.set_files(Arc::new(Tree(HashMap::from([(
            "/usr/lib/libfoo.so.1".to_owned(),
            (0, 7),
        )]))));
        assert_eq!(read(&s, 1), s.chunks[1]);
        // Chunk 2 is handed over once it has been looked at.
        assert_eq!(read(&s, 2), s.chunks[2]);
        assert_eq!(*s.fake.asked.lock().unwrap(), vec![(c, 4 * c)]);
        assert_eq!(s.fetcher.counters().libraries.load(Relaxed), 0);
    }

    #[test]
    fn a_programs_dynamic_section_comes_alone_and_first_then_its_libraries_and_mapped_range() {
        // Chunks 2..=6 hold a program whose dynamic section lies in chunk 6, which
        // loads libfoo (chunk 10) and is run by the loader at chunk 9.
        let mut chunks: Vec<Vec<u8>> = (0..12).map(|i| chunk(i, CHUNK as usize)).collect();
        let program = program_chunks(2, &["libfoo.so.1"], 5, Some("/lib64/ld.so"));
        for (k, c) in program.into_iter().enumerate() {
            chunks[2 + k] = c;
        }
        let cfg = FetchConfig {
            min_fetch: CHUNK.into(),
            ..FetchConfig::default()
        };
        let s = setup_chunks(chunks, Fake::default(), cfg);
        s.fetcher.set_files(Arc::new(Tree(HashMap::from([
            ("/lib64/ld.so".to_owned(), (0, 9)),
            ("/lib/x86_64-linux-gnu/libfoo.so.1".to_owned(), (0, 10)),
        ]))));
        let c = u64::from(CHUNK);
        assert_eq!(read(&s, 2), s.chunks[2]);
        for i in [3, 4, 5, 6, 9, 10] {
            wait_fetched(&s, i);
        }
        let asked = s.fake.asked.lock().unwrap().clone();
        let at = |r: (u64, u64)| asked.iter().position(|&a| a == r);
        let dynamic = at((6 * c, c)).expect("the dynamic section's chunk, alone");
        let library = at((10 * c, c)).expect("the library, alone");
        assert!(at((9 * c, c)).is_some(), "the loader: {asked:?}");
        // The rest of the mapped range is read ahead once the dynamic section is in,
        // and the library once its name is known; each chunk once.
        let of = |k: u64| {
            let mut holding = asked
                .iter()
                .enumerate()
                .filter(|(_, &(at, len))| (at..at + len).contains(&(k * c)));
            let first = holding.next().map(|(n, _)| n);
            assert!(holding.next().is_none(), "chunk {k} twice: {asked:?}");
            first.unwrap_or_else(|| panic!("chunk {k} never asked: {asked:?}"))
        };
        for k in 3..=5 {
            assert!(dynamic < of(k), "{asked:?}");
        }
        assert!(dynamic < library, "{asked:?}");
        assert_eq!(s.fetcher.counters().libraries.load(Relaxed), 2);
        // The loader's reads are hits.
        for i in [3, 4, 5, 6, 9, 10] {
            assert_eq!(read(&s, i), s.chunks[i]);
        }
        assert_eq!(s.fetcher.counters().misses.load(Relaxed), 1);
    }

    #[test]
    fn a_program_whose_header_is_read_gets_its_mapped_range_read_ahead() {
        // Chunks 2..=4 hold a program mapping 2.5 chunks; the chunks around it are
        // other files.
        let mut chunks: Vec<Vec<u8>> = (0..12).map(|i| chunk(i, CHUNK as usize)).collect();
        chunks[2] = elf_chunk(2, CHUNK as usize, 5 * u64::from(CHUNK) / 2);
        let cfg = FetchConfig {
            min_fetch: CHUNK.into(),
            ..FetchConfig::default()
        };
        let s = setup_chunks(chunks, Fake::default(), cfg);
        let c = u64::from(CHUNK);
        assert_eq!(read(&s, 2), s.chunks[2]);
        // The loader's faults, in no order: no request of their own, and no stream
        // readahead past the program.
        for i in [4, 3, 4, 3] {
            assert_eq!(read(&s, i), s.chunks[i]);
        }
        assert_eq!(
            *s.fake.asked.lock().unwrap(),
            vec![(2 * c, c), (3 * c, 2 * c)]
        );
        assert_eq!(s.fetcher.counters().readaheads.load(Relaxed), 1);
        // A walker reading on after the program is still one stream: the program's
        // chunks count as skipped, and the third step after it fetches ahead.
        for i in [0, 1] {
            assert_eq!(read(&s, i), s.chunks[i]);
        }
        for i in [5, 6, 7] {
            assert_eq!(read(&s, i), s.chunks[i]);
        }
        assert_eq!(s.fetcher.counters().readaheads.load(Relaxed), 2);
        // A program larger than the readahead window: what lies past it is read by the
        // reader's stream as any other file's chunks.
        let mut chunks: Vec<Vec<u8>> = (0..16).map(|i| chunk(i, CHUNK as usize)).collect();
        chunks[2] = elf_chunk(2, CHUNK as usize, 12 * c);
        let cfg = FetchConfig {
            min_fetch: c,
            readahead_max: 2 * c,
            ..FetchConfig::default()
        };
        let s = setup_chunks(chunks, Fake::default(), cfg);
        for i in 2..=7 {
            assert_eq!(read(&s, i), s.chunks[i]);
        }
        let asked = s.fake.asked.lock().unwrap().clone();
        assert_eq!(asked[..2], [(2 * c, c), (3 * c, 2 * c)]);
        assert!(
            s.fetcher.counters().readaheads.load(Relaxed) >= 2,
            "{asked:?}"
        );
        // The same header read by a trace's job starts nothing: the trace knows.
        let mut chunks: Vec<Vec<u8>> = (0..12).map(|i| chunk(i, CHUNK as usize)).collect();
        chunks[2] = elf_chunk(2, CHUNK as usize, 3 * c);
        let s = setup_chunks(chunks, Fake::default(), FetchConfig::default());
        let (slots, _) = s.fetcher.prefetch(0, 2, Priority::Trace, &|k| k == 2);
        for slot in slots {
            assert_eq!(
                slot.wait(Instant::now() + Duration::from_secs(10)),
                Some(Ok(()))
            );
        }
        assert_eq!(*s.fake.asked.lock().unwrap(), vec![(2 * c, c)]);
    }

    #[test]
    fn workers_start_with_the_first_read_and_end_when_idle() {
        let cfg = FetchConfig {
            worker_idle: Duration::from_secs(2),
            ..FetchConfig::default()
        };
        let s = setup(4096, Fake::default(), cfg);
        assert_eq!(
            s.fetcher.workers(),
            0,
            "an image nobody reads costs no thread"
        );
        // A sequential reader: demand and readahead jobs, several in flight.
        for i in 0..256 {
            assert_eq!(read(&s, i), s.chunks[i]);
        }
        let busy = s.fetcher.workers();
        assert!((1..=s.fetcher.config().workers).contains(&busy), "{busy}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while s.fetcher.workers() > 0 {
            assert!(
                Instant::now() < deadline,
                "workers stayed after their idle time"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // And start again.
        assert_eq!(read(&s, 3000), s.chunks[3000]);
        assert!(s.fetcher.workers() >= 1);
    }

    #[test]
    fn a_reader_jumping_about_fetches_the_minimum_and_nothing_ahead() {
        let s = setup(4096, Fake::default(), FetchConfig::default());
        let reads = [3000, 17, 2500, 900, 4000, 1200, 60, 3500];
        for i in reads {
            assert_eq!(read(&s, i), s.chunks[i]);
        }
        assert_eq!(s.fetcher.counters().readaheads.load(Relaxed), 0);
        // (Asked of the source: a reader may wake before the rest of its job's answer
        // is in and counted.)
        let asked: u64 = s.fake.asked.lock().unwrap().iter().map(|a| a.1).sum();
        assert_eq!(asked, reads.len() as u64 * (64 << 10));
    }

    #[test]
    fn a_sequential_reader_gets_growing_windows_with_several_requests_in_flight() {
        let n = 4096; // 64 MiB
        let s = setup(
            n,
            Fake {
                meet_len: 1 << 20,
                ..Fake::default()
            },
            FetchConfig::default(),
        );
        for i in 0..n {
            assert_eq!(read(&s, i), s.chunks[i], "chunk {i}");
        }
        let asked = s.fake.asked.lock().unwrap().clone();
        // Far fewer requests than a fixed 64 KiB window (1024), none twice: the reader
        // started few fetches of its own.
        assert!(asked.len() < 120, "{} requests", asked.len());
        let total: u64 = asked.iter().map(|a| a.1).sum();
        assert_eq!(total, n as u64 * u64::from(CHUNK), "each byte fetched once");
        assert!(s.fetcher.counters().readaheads.load(Relaxed) > 0);
        assert!(s.fake.most.load(Relaxed) >= 2, "never two requests at once");
        // Requests grew to the readahead job size.
        assert!(asked.iter().any(|a| a.1 == 1 << 20), "{asked:?}");
        // Whether a chunk fetched ahead is still in flight when the reader reaches it
        // depends on scheduling with an instant source (a miss, though no request of
        // its own): the request count above is what bounds the reader's own fetches.
    }

    #[test]
    fn a_chunk_is_served_as_soon_as_its_bytes_are_in_not_the_whole_answer() {
        let c = u64::from(CHUNK);
        let fake = Fake::default();
        // The answer stops after its first two chunks until released.
        *fake.hold_after.lock().unwrap() = Some(2 * c);
        let s = setup(16, fake, FetchConfig::default());
        let (slots, next) = s.fetcher.prefetch(0, 4, Priority::Trace, &|k| k < 8);
        assert_eq!((slots.len(), next), (4, 8), "one job of four chunks");
        // Readers of the first two get them while the rest of the answer is held.
        assert_eq!(read(&s, 4), s.chunks[4]);
        assert_eq!(read(&s, 5), s.chunks[5]);
        assert!(
            s.fake.hold_after.lock().unwrap().is_some(),
            "released too early"
        );
        s.fake.release();
        assert_eq!(read(&s, 7), s.chunks[7]);
        assert_eq!(read(&s, 6), s.chunks[6]);
        assert_eq!(*s.fake.asked.lock().unwrap(), vec![(4 * c, 4 * c)]);
    }

    #[test]
    fn a_file_a_chunk_names_is_fetched_while_readahead_fills_its_workers() {
        let c = u64::from(CHUNK);
        let fake = Fake::default();
        // Every answer holds after its first byte until released: what has started
        // shows in the requests asked.
        *fake.hold_after.lock().unwrap() = Some(1);
        let cfg = FetchConfig {
            readahead_workers: 1,
            readahead_job: c,
            ..FetchConfig::default()
        };
        let s = setup(16, fake, cfg);
        let inner = &s.fetcher.inner;
        // A window of four readahead jobs: one runs, three wait for the one worker.
        inner.read_ahead(0, 0, 4 * c);
        let asked = || s.fake.asked.lock().unwrap().clone();
        let deadline = Instant::now() + Duration::from_secs(10);
        while asked().is_empty() {
            assert!(Instant::now() < deadline, "no readahead started");
            std::thread::yield_now();
        }
        // A library or module a chunk named starts at once, past the queued window.
        let named = AtomicU64::new(0);
        assert!(inner.fetch_named(0, 9, &named));
        while !asked().contains(&(9 * c, c)) {
            assert!(
                Instant::now() < deadline,
                "the named file waits: {:?}",
                asked()
            );
            std::thread::yield_now();
        }
        assert_eq!(asked().len(), 2, "{:?}", asked());
        assert_eq!(named.load(Relaxed), 1);
        s.fake.release();
        for i in [0, 1, 2, 3, 9] {
            assert_eq!(read(&s, i), s.chunks[i]);
        }
        // Once all ended, no readahead worker is counted busy: the named job took none.
        loop {
            let q = inner.lock();
            if q.queued() == 0 && q.idle == q.workers {
                assert_eq!(q.busy, [0, 0, 0]);
                break;
            }
            drop(q);
            assert!(Instant::now() < deadline, "the jobs never ended");
            std::thread::yield_now();
        }
    }

    #[test]
    fn an_answer_that_breaks_off_keeps_what_came_and_fails_only_the_rest() {
        let c = u64::from(CHUNK);
        let fake = Fake::default();
        *fake.hold_after.lock().unwrap() = Some(c + c / 2);
        fake.cut.store(true, Relaxed);
        let s = setup(16, fake, FetchConfig::default());
        let (slots, _) = s.fetcher.prefetch(0, 0, Priority::Trace, &|k| k < 4);
        assert_eq!(read(&s, 0), s.chunks[0]);
        s.fake.release();
        let deadline = Instant::now() + Duration::from_secs(10);
        let ends: Vec<bool> = slots
            .iter()
            .map(|slot| matches!(slot.wait(deadline), Some(Ok(()))))
            .collect();
        assert_eq!(ends, [true, false, false, false]);
        assert!(s.fetcher.counters().errors.load(Relaxed) >= 1);
        // Nothing is remembered of the failure: the next read fetches again.
        s.fake.cut.store(false, Relaxed);
        assert_eq!(read(&s, 1), s.chunks[1]);
        assert_eq!(s.fake.asked.lock().unwrap()[1].0, c);
    }

    #[test]
    fn a_corrupt_answer_is_never_served_and_the_chunk_is_fetched_again_alone() {
        let fake = Fake::default();
        // Chunk 2 comes damaged in the first answer that holds it.
        fake.damage
            .lock()
            .unwrap()
            .insert(2 * u64::from(CHUNK) + 100, 1);
        let s = setup(16, fake, FetchConfig::default());
        assert_eq!(read(&s, 2), s.chunks[2], "the damaged copy was not kept");
        assert_eq!(s.fetcher.counters().corrupt.load(Relaxed), 1);
        let asked = s.fake.asked.lock().unwrap().clone();
        let chunk = u64::from(CHUNK);
        assert_eq!(
            asked,
            vec![(2 * chunk, 65536), (2 * chunk, chunk)],
            "chunk 2 alone"
        );
        // The other chunks of the damaged answer were kept: never asked for again.
        for i in 3..6 {
            assert_eq!(read(&s, i), s.chunks[i]);
        }
        let asked = s.fake.asked.lock().unwrap().clone();
        assert!(asked[2..].iter().all(|a| a.0 >= 6 * chunk), "{asked:?}");
    }

    #[test]
    fn a_chunk_damaged_every_time_fails_its_reader_and_is_not_stored() {
        let fake = Fake::default();
        fake.damage
            .lock()
            .unwrap()
            .insert(5 * u64::from(CHUNK), 100);
        let s = setup(16, fake, FetchConfig::default());
        let mut buf = vec![0; CHUNK as usize];
        let err = s.fetcher.read_at(0, 5, 0, &mut buf).unwrap_err();
        assert!(err.to_string().contains("damaged data twice"), "{err}");
        let d = s.fetcher.entry(0, 5).unwrap().digest;
        assert!(!s.fetcher.store().contains(&d));
        // Its neighbours in the same answer were fine and are served.
        assert_eq!(read(&s, 6), s.chunks[6]);
    }

    #[test]
    fn a_chunk_evicted_after_its_fetch_is_fetched_again() {
        let s = setup(16, Fake::default(), FetchConfig::default());
        assert_eq!(read(&s, 0), s.chunks[0]);
        s.fetcher.store().evict_to(0).unwrap();
        assert_eq!(read(&s, 0), s.chunks[0]);
        assert_eq!(s.fake.requests(), 2);
    }

    #[test]
    fn a_stalled_source_fails_the_reader_within_its_bound_and_its_retry_at_once() {
        let fake = Fake::default();
        *fake.stall.lock().unwrap() = true;
        let cfg = FetchConfig {
            read_timeout: Duration::from_millis(300),
            ..FetchConfig::default()
        };
        let s = setup(16, fake, cfg);
        let t = Instant::now();
        let mut buf = vec![0; 4096];
        let err = s.fetcher.read_at(0, 3, 0, &mut buf).unwrap_err();
        assert!(matches!(err, FetchError::Timeout { .. }), "{err}");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        // The kernel's second request for the same data: answered at once.
        let t = Instant::now();
        let err = s.fetcher.read_at(0, 3, 0, &mut buf).unwrap_err();
        assert!(matches!(err, FetchError::Timeout { .. }), "{err}");
        assert!(
            t.elapsed() < Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(s.fetcher.counters().timeouts.load(Relaxed), 2);
        *s.fake.stall.lock().unwrap() = false;
        s.fake.unstalled.notify_all();
    }

    fn job(p: Priority, inflight: &Inflight, k: u8) -> Job {
        let Claim::Mine(slot) = inflight.claim(&[k; 32]) else {
            panic!("claimed twice")
        };
        Job {
            blob: 0,
            first: k as usize,
            slots: vec![slot],
            priority: p,
            hint: false,
        }
    }

    #[test]
    fn readers_go_first_then_readahead_then_trace_then_prefetch() {
        let cfg = FetchConfig::default();
        let inflight = Inflight::default();
        let mut q = Queue::default();
        q.push(job(Priority::Prefetch, &inflight, 1));
        q.push(job(Priority::Trace, &inflight, 2));
        q.push(job(Priority::Readahead, &inflight, 3));
        q.push(job(Priority::Demand, &inflight, 4));
        let order: Vec<usize> = std::iter::from_fn(|| q.pop(&cfg))
            .map(|j| j.first)
            .collect();
        assert_eq!(order, vec![4, 3, 2, 1]);
    }

    #[test]
    fn background_jobs_keep_to_their_limits_and_leave_workers_to_readers() {
        let cfg = FetchConfig::default();
        let inflight = Inflight::default();
        let mut q = Queue::default();
        for k in 0..40 {
            let p = [Priority::Readahead, Priority::Trace, Priority::Prefetch][k % 3];
            q.push(job(p, &inflight, k as u8));
        }
        let popped: Vec<Priority> = std::iter::from_fn(|| q.pop(&cfg))
            .map(|j| j.priority)
            .collect();
        assert_eq!(
            popped.len(),
            cfg.workers - 2,
            "two workers stay free for readers"
        );
        let count = |p| popped.iter().filter(|&&x| x == p).count();
        assert_eq!(count(Priority::Readahead), cfg.readahead_workers);
        assert!(count(Priority::Prefetch) <= cfg.prefetch_workers);
        // A reader's job still runs at once.
        q.push(job(Priority::Demand, &inflight, 200));
        assert_eq!(q.pop(&cfg).map(|j| j.first), Some(200));
        // Finishing a readahead job lets the next one start.
        q.done(Priority::Readahead);
        assert_eq!(q.pop(&cfg).map(|j| j.priority), Some(Priority::Readahead));
    }

    #[test]
    fn a_queued_background_job_a_reader_waits_for_is_promoted_past_the_limits() {
        let cfg = FetchConfig {
            workers: 4,
            ..FetchConfig::default()
        };
        let inflight = Inflight::default();
        let mut q = Queue::default();
        for k in 0..10 {
            q.push(job(Priority::Prefetch, &inflight, k));
        }
        while q.pop(&cfg).is_some() {}
        // The limit is reached; a reader now waits for chunk 7.
        let waited = q.background[2].iter().find(|j| j.first == 7).unwrap();
        waited.slots[0].make_urgent();
        let j = q.pop(&cfg).unwrap();
        assert_eq!((j.first, j.priority), (7, Priority::Demand));
        assert!(q.pop(&cfg).is_none(), "the others still wait for a worker");
    }
}
