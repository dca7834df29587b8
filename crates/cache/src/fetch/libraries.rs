//! The libraries a program loads, fetched before the loader asks for them.
//!
//! The dynamic loader opens a program's libraries one after the other, and each first
//! read of a header it has not got is a round trip: python's start-up waited for libm,
//! libz, libexpat and libc in turn. Their names are in the program's dynamic section
//! ([`crate::elf`]), usually in the last chunk of the mapped range. The fetcher asks
//! for the chunks holding it alone, ahead of the rest of that range's readahead (the
//! loader needs them first too). When they are in, the fetcher reads the names, finds
//! each library in the image's tree ([`Files`], the loader's search order of
//! [`crate::elf::search_paths`]) and fetches the first chunks of all of them at once,
//! after readers and ahead of readahead; each is a program in its turn (its mapped
//! range is read ahead, its own libraries found).
//!
//! The loader's own first read, its cache (`/etc/ld.so.cache`, [`crate::glibc`]), is
//! fetched with it when the program names glibc's loader.
//!
//! What it costs: nothing a start-up does not read, but for a library the search finds
//! in another directory than the loader does (the search does not read the loader's
//! cache), and a program started but never run past its header. Each program is
//! looked at once.

use super::{lock, Inner};
use crate::elf::{search_paths, Program};
use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, OnceLock};

/// The files of an image as the loader finds them: the owner of the image's tree gives
/// it to the fetcher ([`crate::Fetcher::set_files`]).
pub trait Files: Send + Sync {
    /// The first chunk (blob, index) of the regular file at `path`, following symlinks
    /// as a process rooted at the image would; `None` if there is none (or the file
    /// is empty, or its first chunk is a hole).
    fn first_chunk(&self, path: &str) -> Option<(usize, usize)>;

    /// Where the data of the regular file at `path` lies when it all lies in one
    /// chunk (a small file in a frame, or a file of one chunk); `None` otherwise. The
    /// python modules a module imports are found this way ([`crate::python`]).
    fn locate(&self, _path: &str) -> Option<Located> {
        None
    }

    /// The names in the directory at `path` (symlinks followed), sorted; `None` if
    /// there is no such directory.
    fn list(&self, _path: &str) -> Option<Arc<[String]>> {
        None
    }
}

/// Where a file's data lies: all of it in one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Located {
    /// The blob.
    pub blob: usize,
    /// The chunk's index in the blob.
    pub index: usize,
    /// Where the file starts in the chunk's uncompressed bytes.
    pub skip: u64,
}

/// Programs waiting for the chunks of their dynamic section, at most this many (the
/// oldest are dropped past it).
const MAX_WAITING: usize = 64;

/// The programs seen and those waiting for their dynamic section.
#[derive(Default)]
pub(super) struct Libraries {
    files: OnceLock<Arc<dyn Files>>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// First chunks of the programs looked at.
    seen: HashSet<(usize, usize)>,
    waiting: Vec<Waiting>,
}

struct Waiting {
    blob: usize,
    /// The program's first chunk.
    first: usize,
    program: Program,
    /// The chunks holding its dynamic section.
    holding: std::ops::RangeInclusive<usize>,
}

impl Libraries {
    pub(super) fn set_files(&self, files: Arc<dyn Files>) {
        let _ = self.files.set(files);
    }

    /// The image's tree, once given.
    pub(super) fn files(&self) -> Option<&Arc<dyn Files>> {
        self.files.get()
    }
}

impl Inner {
    /// A program (or library) starts at chunk `first` of blob `blob`: the chunks of its
    /// dynamic section are fetched alone, and once they are in, its libraries are
    /// fetched and then the rest of its mapped range is read ahead. Whether it took
    /// the readahead on; if not, the caller starts it now.
    ///
    /// The order is the loader's: it maps the program, reads its dynamic section (and
    /// relocates the data around it), opens the libraries, and only then runs the
    /// program's code. Read ahead alongside, the mapped range took the link from the
    /// dynamic section: python's libraries were asked for 0.2-0.3 s after its header
    /// was in, rather than one round trip.
    pub(super) fn watch_program(&self, blob: usize, first: usize, program: Program) -> bool {
        // A trace knows what start-up loads.
        if self.libraries.files.get().is_none() || lock(&self.foreseen).contains(&(blob, first)) {
            return false;
        }
        // The loader the kernel maps with a program: fetched ahead when the program
        // is (a process about to start), else asked for at once by the kernel.
        // glibc's loader reads its cache before it opens a library.
        if let (Some(path), Some(files)) = (&program.interp, self.libraries.files.get()) {
            let cache = crate::glibc::is_loader(path).then_some(crate::glibc::LOADER_CACHE);
            for p in std::iter::once(path.as_str()).chain(cache) {
                if let Some((b, k)) = files.first_chunk(p) {
                    self.fetch_named(b, k, &self.counters.libraries);
                }
            }
        }
        let Some((offset, len)) = program.dynamic.filter(|&(_, len)| len > 0) else {
            return false;
        };
        let entries = &self.blobs[blob].entries;
        let base = entries[first].uncompressed_offset;
        // Offsets from the header are untrusted: no overflow.
        let (Some(start), Some(end)) = (
            base.checked_add(offset),
            offset.checked_add(len).and_then(|e| base.checked_add(e)),
        ) else {
            return false;
        };
        // The chunks whose uncompressed bytes hold start..end (a file's chunks lie in
        // order in its blob).
        let from = entries
            .partition_point(|e| e.uncompressed_offset <= start)
            .saturating_sub(1);
        let to = entries
            .partition_point(|e| e.uncompressed_offset < end)
            .saturating_sub(1);
        if from < first || to < from {
            return false;
        }
        let w = Waiting {
            blob,
            first,
            program,
            holding: from..=to,
        };
        let mut s = lock(&self.libraries.state);
        if !s.seen.insert((blob, first)) {
            return false;
        }
        if self.holds(&w) {
            drop(s);
            self.program_ready(w);
            return true;
        }
        if s.waiting.len() >= MAX_WAITING {
            s.waiting.remove(0);
        }
        let holding = w.holding.clone();
        s.waiting.push(w);
        drop(s);
        for k in holding {
            self.fetch_named(blob, k, &self.counters.readaheads);
        }
        true
    }

    /// Chunk `index` of blob `blob` is in: the programs that waited for it, and now
    /// have their dynamic section, get their libraries fetched.
    pub(super) fn chunk_in(&self, blob: usize, index: usize) {
        let ready: Vec<Waiting> = {
            let mut s = lock(&self.libraries.state);
            if s.waiting.is_empty() {
                return;
            }
            let (ready, wait) = std::mem::take(&mut s.waiting)
                .into_iter()
                .partition(|w| w.blob == blob && w.holding.contains(&index) && self.holds(w));
            s.waiting = wait;
            ready
        };
        for w in ready {
            self.program_ready(w);
        }
    }

    /// `w`'s dynamic section is in: its libraries, then the rest of its mapped range.
    fn program_ready(&self, w: Waiting) {
        self.fetch_libraries(&w);
        self.read_ahead_mapped(w.blob, w.first, w.program.mapped);
    }

    /// Whether every chunk of `w`'s dynamic section is cached.
    fn holds(&self, w: &Waiting) -> bool {
        let entries = &self.blobs[w.blob].entries;
        w.holding
            .clone()
            .all(|k| self.store.contains(&entries[k].digest))
    }

    /// Bytes `at..at + len` of the file that starts at chunk `first` of blob `blob`,
    /// from the cache; `None` if a chunk of them is not there.
    fn read_file(&self, blob: usize, first: usize, at: u64, len: u64) -> Option<Vec<u8>> {
        let entries = &self.blobs[blob].entries;
        let start = entries[first].uncompressed_offset.checked_add(at)?;
        let end = start.checked_add(len)?;
        let mut out = Vec::with_capacity(usize::try_from(len).ok()?);
        let mut k = entries
            .partition_point(|e| e.uncompressed_offset <= start)
            .checked_sub(1)?;
        while (out.len() as u64) < len {
            let e = entries.get(k)?;
            let lo = start.max(e.uncompressed_offset);
            let hi = end.min(
                e.uncompressed_offset
                    .saturating_add(u64::from(e.uncompressed_size)),
            );
            if hi <= lo {
                return None;
            }
            let f = self
                .store
                .open_chunk(&e.digest, e.uncompressed_size)
                .ok()??;
            let mut buf = vec![0; (hi - lo) as usize];
            f.read_exact_at(&mut buf, lo - e.uncompressed_offset).ok()?;
            out.extend(buf);
            k += 1;
        }
        Some(out)
    }

    /// Reads `w`'s libraries from its dynamic section, and fetches the first chunk of
    /// each one the tree has that is neither cached nor being fetched.
    fn fetch_libraries(&self, w: &Waiting) {
        let Some(files) = self.libraries.files.get() else {
            return;
        };
        let Some((at, len)) = w.program.dynamic else {
            return;
        };
        let t0 = std::time::Instant::now();
        let read = |at, len| self.read_file(w.blob, w.first, at, len);
        let Some(needs) = read(at, len).and_then(|d| w.program.needs(&d, read)) else {
            return;
        };
        let mut asked = Vec::new();
        for name in &needs.libraries {
            let found = search_paths(name, &needs.search, w.program.machine)
                .iter()
                .find_map(|p| files.first_chunk(p));
            let Some((blob, index)) = found else {
                continue;
            };
            // The header the loader reads first; the rest of the library is its mapped
            // range, read ahead once the header is in.
            if !self.fetch_named(blob, index, &self.counters.libraries) {
                continue;
            }
            asked.push(name.as_str());
        }
        tracing::debug!(
            "the program at chunk {} of blob {} loads {:?}: fetching {asked:?} (found in {:.2} ms)",
            w.first,
            self.blobs[w.blob].digest,
            needs.libraries,
            t0.elapsed().as_secs_f64() * 1e3,
        );
    }
}
