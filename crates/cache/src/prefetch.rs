//! Background prefetch: fetches lists of chunks in order, behind the readers.
//!
//! A prefetch is a sequence of [`Stage`]s, each a list of chunks at one priority: first the
//! chunks of a start-up trace, in the trace's order ([`Priority::Trace`]: many requests in
//! flight, each merging the chunks of the trace that lie next to each other in a blob),
//! then, with `--prefetch all`, every chunk of the image in blob order
//! ([`Priority::Prefetch`]: a few large requests). The fetcher serves readers first, so
//! a stage never delays a read. Chunks that fail are tried again after a pause that
//! doubles up to 30 s, until they are all cached or the mount goes away: prefetch resumes
//! by itself when the registry comes back. Once every chunk is cached, the views given
//! (see [`crate::View`]) are built, so that the kernel reads the image without hoist.

use crate::fetch::{Fetcher, Priority};
use crate::store::Slot;
use crate::views::View;
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where a prefetch is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrefetchState {
    /// No prefetch asked for.
    Idle,
    /// Fetching.
    Running,
    /// Some chunks failed; waiting to try them again.
    Retrying,
    /// Every chunk of the list is cached.
    Done,
    /// The mount went away first.
    Stopped,
}

impl std::fmt::Display for PrefetchState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PrefetchState::Idle => "idle",
            PrefetchState::Running => "running",
            PrefetchState::Retrying => "retrying",
            PrefetchState::Done => "done",
            PrefetchState::Stopped => "stopped",
        })
    }
}

impl PrefetchState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Running,
            2 => Self::Retrying,
            3 => Self::Done,
            4 => Self::Stopped,
            _ => Self::Idle,
        }
    }
}

/// Progress of a prefetch, readable while it runs.
#[derive(Debug, Default)]
pub struct Progress {
    state: AtomicU8,
    /// Chunks of the list that are cached.
    pub done: AtomicU64,
    /// Chunks in the list.
    pub total: AtomicU64,
    /// Chunks that failed at least once.
    pub failures: AtomicU64,
    /// Views built after the chunks (see [`crate::View`]).
    pub views_done: AtomicU64,
    /// Views to build.
    pub views_total: AtomicU64,
    /// Views that could not be built (a chunk evicted meanwhile, no room, an error).
    pub views_failed: AtomicU64,
}

impl Progress {
    /// The current state.
    pub fn state(&self) -> PrefetchState {
        PrefetchState::from_u8(self.state.load(Relaxed))
    }
    fn set(&self, s: PrefetchState) {
        self.state.store(s as u8, Relaxed);
    }
}

/// Every chunk a file of the fetcher's image uses, in blob order.
pub fn all_chunks(fetcher: &Fetcher) -> Vec<(usize, usize)> {
    fetcher
        .blobs()
        .iter()
        .enumerate()
        .flat_map(|(b, blob)| {
            (0..blob.entries.len())
                .filter(|i| blob.is_used(*i))
                .map(move |i| (b, i))
        })
        .collect()
}

/// Chunks of a stage that are worked out on the prefetch thread.
pub type Later = Box<dyn FnOnce() -> Vec<(usize, usize)> + Send>;

/// A list of chunks (pairs of blob and chunk index) to fetch at one priority.
pub struct Stage {
    /// [`Priority::Trace`] or [`Priority::Prefetch`].
    pub priority: Priority,
    /// The chunks, in the order wanted.
    pub chunks: Vec<(usize, usize)>,
    /// More chunks at the same priority, worked out on the prefetch thread once
    /// `chunks` are fetched: for lists that are slow to compute and must not hold back
    /// the first ones (a trace's files, each looked up in metadata that may have to be
    /// fetched).
    pub later: Option<Later>,
}

impl std::fmt::Debug for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage")
            .field("priority", &self.priority)
            .field("chunks", &self.chunks.len())
            .field("later", &self.later.is_some())
            .finish()
    }
}

/// Called with a view's place in the list and the view, once it is built.
pub type OnView = Box<dyn Fn(usize, &View) + Send>;

/// Starts prefetching the stages, one after the other, on a thread of its own, then
/// builds `views` from the cached chunks, calling `on_view` after each one built.
/// Chunks of a later stage that an earlier one holds are left out of it.
pub fn spawn(
    fetcher: Arc<Fetcher>,
    stages: Vec<Stage>,
    views: Vec<View>,
    on_view: Option<OnView>,
    progress: Arc<Progress>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let mut seen = HashSet::new();
    let stages: Vec<Stage> = stages
        .into_iter()
        .map(|s| Stage {
            priority: s.priority,
            chunks: s.chunks.into_iter().filter(|c| seen.insert(*c)).collect(),
            later: s.later,
        })
        .collect();
    for s in stages.iter().filter(|s| s.priority == Priority::Trace) {
        fetcher.foresee(s.chunks.iter().copied());
    }
    progress.total.store(seen.len() as u64, Relaxed);
    progress.views_total.store(views.len() as u64, Relaxed);
    progress.set(PrefetchState::Running);
    std::thread::Builder::new()
        .name("hoist-prefetch".into())
        .spawn(move || {
            let mut stages = VecDeque::from(stages);
            // Chunks of the stages run so far.
            let mut done: HashSet<(usize, usize)> = HashSet::new();
            while let Some(mut stage) = stages.pop_front() {
                let (priority, later) = (stage.priority, stage.later.take());
                done.extend(stage.chunks.iter().copied());
                if !run(&fetcher, stage, &progress) {
                    return progress.set(PrefetchState::Stopped);
                }
                let Some(later) = later else { continue };
                let chunks: Vec<_> = later().into_iter().filter(|c| done.insert(*c)).collect();
                if chunks.is_empty() {
                    continue;
                }
                // Fetched now at this stage's priority, not again by a later stage.
                let now: HashSet<_> = chunks.iter().copied().collect();
                for s in stages.iter_mut() {
                    s.chunks.retain(|c| !now.contains(c));
                }
                let new = chunks.iter().filter(|c| !seen.contains(*c)).count();
                progress.total.fetch_add(new as u64, Relaxed);
                if priority == Priority::Trace {
                    fetcher.foresee(chunks.iter().copied());
                }
                let stage = Stage {
                    priority,
                    chunks,
                    later: None,
                };
                if !run(&fetcher, stage, &progress) {
                    return progress.set(PrefetchState::Stopped);
                }
            }
            for (k, view) in views.iter().enumerate() {
                if fetcher.stopping() {
                    return progress.set(PrefetchState::Stopped);
                }
                // A view whose chunk was evicted meanwhile is left for its next open.
                match fetcher.store().build_view(view, &|| fetcher.stopping()) {
                    Ok(built) => {
                        fetcher.counters().count_view(built);
                        if let Some(f) = &on_view {
                            f(k, view);
                        }
                    }
                    Err(e) => {
                        progress.views_failed.fetch_add(1, Relaxed);
                        tracing::warn!("building view {}: {e}", view.key());
                    }
                }
                progress.views_done.fetch_add(1, Relaxed);
            }
            progress.set(PrefetchState::Done);
        })
}

struct Pending {
    blob: usize,
    first: usize,
    slots: Vec<Arc<Slot>>,
    /// Compressed bytes of the job.
    bytes: u64,
}

/// Fetches a stage until every chunk is cached; false when the fetcher stops first.
fn run(fetcher: &Fetcher, stage: Stage, progress: &Progress) -> bool {
    let workers = match stage.priority {
        Priority::Trace => fetcher.config().trace_workers,
        _ => fetcher.config().prefetch_workers,
    };
    let window = workers.max(1) * 2;
    // A trace job takes the chunks after its first only when the trace holds them too.
    let wanted: HashSet<(usize, usize)> = match stage.priority {
        Priority::Trace => stage.chunks.iter().copied().collect(),
        _ => HashSet::new(),
    };
    let mut todo = stage.chunks;
    let mut pause = Duration::from_secs(1);
    loop {
        let mut failed = Vec::new();
        let mut pending: VecDeque<Pending> = VecDeque::new();
        // Chunks a job of this pass covers already (a merged trace job takes chunks that
        // come later in the trace).
        let mut covered: HashSet<(usize, usize)> = HashSet::new();
        let mut jobs = 0u32;
        let mut i = 0;
        while i < todo.len() {
            let (blob, first) = todo[i];
            if covered.contains(&(blob, first)) {
                i += 1;
                continue;
            }
            // Trace jobs start small and double up to the job size: the first chunks are
            // the ones start-up waits for first, and small first jobs share the link
            // with fewer bytes ahead of them.
            let cap = match stage.priority {
                Priority::Trace => {
                    (TRACE_RAMP_START << jobs.min(16)).min(fetcher.config().trace_fetch)
                }
                _ => u64::MAX,
            };
            let bytes = std::cell::Cell::new(size(fetcher, blob, first));
            let take = |next: usize| {
                if stage.priority != Priority::Trace {
                    return true;
                }
                let more = bytes.get() + size(fetcher, blob, next);
                bytes.set(more);
                wanted.contains(&(blob, next)) && more <= cap
            };
            let (slots, next) = fetcher.prefetch(blob, first, stage.priority, &take);
            jobs += 1;
            i += 1;
            if slots.is_empty() {
                progress.done.fetch_add(1, Relaxed);
                continue;
            }
            // The job covers the chunks up to `next` of this blob; skip those.
            while i < todo.len() && todo[i].0 == blob && (first..next).contains(&todo[i].1) {
                i += 1;
            }
            covered.extend((first..next).map(|k| (blob, k)));
            let bytes = (first..next).map(|k| size(fetcher, blob, k)).sum();
            pending.push_back(Pending {
                blob,
                first,
                slots,
                bytes,
            });
            // Trace jobs in flight hold at most TRACE_IN_FLIGHT bytes (large jobs, few
            // at once: each gets a larger share of the link, so a reader waiting for one
            // waits no longer than for a small one among many).
            while pending.len() >= window
                || (stage.priority == Priority::Trace
                    && pending.len() > 1
                    && pending.iter().map(|p| p.bytes).sum::<u64>() >= TRACE_IN_FLIGHT)
            {
                let Some(p) = pending.pop_front() else { break };
                if !settle(fetcher, p, progress, &mut failed) {
                    return false;
                }
            }
        }
        while let Some(p) = pending.pop_front() {
            if !settle(fetcher, p, progress, &mut failed) {
                return false;
            }
        }
        if failed.is_empty() {
            return true;
        }
        progress.failures.fetch_add(failed.len() as u64, Relaxed);
        progress.set(PrefetchState::Retrying);
        tracing::info!(
            "prefetch: {} chunks failed; trying again in {} s",
            failed.len(),
            pause.as_secs()
        );
        let until = Instant::now() + pause;
        while Instant::now() < until {
            if fetcher.stopping() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        pause = (pause * 2).min(Duration::from_secs(30));
        progress.set(PrefetchState::Running);
        todo = failed;
    }
}

/// Compressed bytes of trace jobs submitted and not yet done, at most (a job that
/// alone exceeds it still goes).
const TRACE_IN_FLIGHT: u64 = 8 << 20;

/// The first trace job's size; each next one may take twice as much, up to
/// [`crate::FetchConfig::trace_fetch`].
const TRACE_RAMP_START: u64 = 256 << 10;

/// The compressed size of chunk `index` of blob `blob` (0 if there is none).
fn size(fetcher: &Fetcher, blob: usize, index: usize) -> u64 {
    fetcher
        .entry(blob, index)
        .map_or(0, |e| u64::from(e.compressed_size))
}

/// Waits for a job's chunks; false when the fetcher stops.
fn settle(
    fetcher: &Fetcher,
    p: Pending,
    progress: &Progress,
    failed: &mut Vec<(usize, usize)>,
) -> bool {
    for (k, slot) in p.slots.iter().enumerate() {
        let outcome = loop {
            if fetcher.stopping() {
                return false;
            }
            if let Some(r) = slot.wait(Instant::now() + Duration::from_millis(500)) {
                break r;
            }
        };
        match outcome {
            Ok(()) => {
                progress.done.fetch_add(1, Relaxed);
            }
            Err(_) => failed.push((p.blob, p.first + k)),
        }
    }
    true
}
