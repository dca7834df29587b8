//! What a mount prefetches: the start-up trace mapped onto the image (started as soon as
//! the image is open, while the kernel mounts it), then (`--prefetch all`, started once
//! the mount is usable) every chunk and the views.

use crate::api::{DaemonError, Mode, Prefetch};
use crate::image::{device_sizes, file_views};
use crate::served::Served;
use hoist_cache::prefetch::{self, Stage};
use hoist_cache::{Priority, View};
use hoist_reader::trace::Trace;
use hoist_reader::HoistImage;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

impl Served {
    /// Starts the prefetch the spec asks for, on a thread that first maps the trace
    /// onto the image (by position; the tree is walked only for entries recorded on
    /// another image).
    pub(crate) fn start_prefetch(&self, trace: Option<Trace>) -> Result<(), DaemonError> {
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
        let trace_meta = self.trace_meta.clone();
        let meta_move = self.meta_move.clone();
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
                if let Some(trace) = &trace {
                    prefetch_meta(&image, trace, trace_meta, &name);
                }
                if let Some(trace) = trace {
                    let blobs = fetcher.clone();
                    let used = move |(b, i): (usize, usize)| {
                        blobs.blobs().get(b).is_some_and(|blob| blob.is_used(i))
                    };
                    match trace.resolve_chunks(&image, &used) {
                        Ok(chunks) => {
                            counted.store(chunks.len() as u64, Relaxed);
                            // The files it lists are looked up (metadata read on
                            // demand may be fetched), which must not hold back the
                            // chunks.
                            let (image, counted, name) =
                                (image.clone(), counted.clone(), name.clone());
                            let listed: HashSet<_> = chunks.iter().copied().collect();
                            let later = move || match trace.resolve_files(&image, &used) {
                                Ok(mut files) => {
                                    files.retain(|c| !listed.contains(c));
                                    counted.fetch_add(files.len() as u64, Relaxed);
                                    files
                                }
                                Err(e) => {
                                    tracing::warn!("{name}: the start-up trace's files: {e}");
                                    Vec::new()
                                }
                            };
                            stages.push(Stage {
                                priority: Priority::Trace,
                                chunks,
                                later: Some(Box::new(later)),
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
                        later: None,
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
                if all && mode == Mode::Erofs {
                    // The whole image local: the metadata read on demand too, while the
                    // chunks are fetched.
                    meta_move.complete();
                }
            })
            .map(|_| ())
            .map_err(|e| DaemonError::Internal(format!("starting prefetch: {e}")))
    }
}

/// Fetches the trace's metadata chunks (metadata read on demand) on a thread of its own,
/// beside the trace's data: lookups then find the metadata they need local.
fn prefetch_meta(
    image: &Arc<HoistImage>,
    trace: &Trace,
    state: Arc<(AtomicU64, AtomicBool)>,
    name: &str,
) {
    let chunks = trace.meta_chunks_for(image).to_vec();
    if chunks.is_empty() {
        return;
    }
    state.0.store(chunks.len() as u64, Relaxed);
    let (image, named) = (image.clone(), name.to_string());
    let spawned = std::thread::Builder::new()
        .name("hoist-trace-meta".into())
        .spawn(move || {
            match image.prefetch_meta(&chunks) {
                Ok(n) => tracing::debug!("{named}: {n} metadata chunks of the trace were missing"),
                Err(e) => tracing::warn!("{named}: the trace's metadata: {e}"),
            }
            state.1.store(true, Relaxed);
        });
    if let Err(e) = spawned {
        tracing::warn!("{name}: starting the trace's metadata fetch: {e}");
    }
}
