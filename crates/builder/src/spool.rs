//! Fetching layers ahead of the converter.
//!
//! Layers are applied one after another, but fetched in parallel: the layer being
//! converted is streamed straight from the source, and the next ones are downloaded at
//! the same time into anonymous temporary files (already unlinked, so nothing is left
//! behind on a crash) that the converter reads while they are still being written. Only
//! layers the converter has not reached yet touch the disk; a source that is slow to
//! answer does not stall the next layer's download, and a stalled download is not
//! mistaken for back-pressure (a bounded in-memory pipe would stop reading the socket).

use hoist_oci::{Digest, ImageSource};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::Scope;

#[derive(Default)]
struct State {
    written: u64,
    /// `Some` once the download ended: `Ok` or the error's text and kind.
    done: Option<Result<(), (io::ErrorKind, String)>>,
}

struct Shared {
    file: File,
    state: Mutex<State>,
    cond: Condvar,
}

/// A layer being downloaded into a temporary file.
pub(crate) struct Spooled {
    shared: Arc<Shared>,
}

/// Reads a spooled layer from the start, waiting for bytes still being downloaded.
pub(crate) struct SpoolReader {
    shared: Arc<Shared>,
    pos: u64,
}

impl Read for SpoolReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = {
            let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            while st.written <= self.pos && st.done.is_none() {
                st = self.shared.cond.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.written <= self.pos {
                return match &st.done {
                    Some(Err((kind, msg))) => Err(io::Error::new(*kind, msg.clone())),
                    _ => Ok(0),
                };
            }
            st.written - self.pos
        };
        let n = buf
            .len()
            .min(usize::try_from(available).unwrap_or(usize::MAX));
        let n = self.shared.file.read_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Spooled {
    pub(crate) fn reader(&self) -> SpoolReader {
        SpoolReader {
            shared: self.shared.clone(),
            pos: 0,
        }
    }
}

/// Downloads layers on `jobs` threads of a thread scope, in order. Dropping it asks the
/// threads to stop; the scope joins them.
pub(crate) struct Prefetcher {
    pub(crate) layers: Vec<Spooled>,
    cancel: Arc<AtomicBool>,
}

impl Prefetcher {
    /// Starts downloading `layers` into temporary files in `dir`, `jobs` at a time.
    pub(crate) fn start<'scope>(
        scope: &'scope Scope<'scope, '_>,
        src: &'scope dyn ImageSource,
        layers: Vec<(Digest, u64)>,
        dir: &Path,
        jobs: usize,
    ) -> io::Result<Prefetcher> {
        std::fs::create_dir_all(dir)?;
        let mut spooled = Vec::new();
        let mut work = Vec::new();
        for (digest, size) in layers {
            let shared = Arc::new(Shared {
                file: tempfile::tempfile_in(dir)?,
                state: Mutex::new(State::default()),
                cond: Condvar::new(),
            });
            spooled.push(Spooled {
                shared: shared.clone(),
            });
            work.push((digest, size, shared));
        }
        let queue = Arc::new(Mutex::new(work.into_iter()));
        let cancel = Arc::new(AtomicBool::new(false));
        for _ in 0..jobs.max(1).min(spooled.len()) {
            let (queue, cancel) = (queue.clone(), cancel.clone());
            scope.spawn(move || loop {
                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).next();
                let Some((digest, size, shared)) = next else {
                    return;
                };
                // A panicking download must still end the reader's wait.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    download(src, &digest, size, &shared, &cancel)
                }))
                .unwrap_or_else(|_| Err(io::Error::other("a layer download thread panicked")));
                let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
                st.done = Some(result.map_err(|e| (e.kind(), e.to_string())));
                shared.cond.notify_all();
            });
        }
        Ok(Prefetcher {
            layers: spooled,
            cancel,
        })
    }
}

fn download(
    src: &dyn ImageSource,
    digest: &Digest,
    size: u64,
    shared: &Shared,
    cancel: &AtomicBool,
) -> io::Result<()> {
    if cancel.load(Ordering::Relaxed) {
        return Err(io::Error::other("conversion stopped"));
    }
    let mut r = src.open_blob(digest, size).map_err(io::Error::other)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(io::Error::other("conversion stopped"));
        }
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        shared.file.write_all_at(&buf[..n], off)?;
        off += n as u64;
        let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        st.written = off;
        shared.cond.notify_all();
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}
