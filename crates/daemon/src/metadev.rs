//! erofs mode: the metadata's loop device moves to a local file once all of the
//! metadata has been read.
//!
//! A version 3 image's metadata is read on demand: the kernel mounts hoist's `meta`
//! device file ([`hoist_fs::BlobDevFs`]), and each block it reads fetches only the chunks
//! it touches. Once every chunk has been read and verified (by the walks of the
//! workload, or by `--prefetch all`), hoist writes the metadata to a local file and puts
//! it behind the same loop device, as blobs move to their views: from then on the kernel
//! reads the metadata without hoist, and a daemon that dies takes none of it along.

use crate::image::kernel_meta;
use hoist_cache::ChunkStore;
use hoist_fs::LoopDevices;
use hoist_reader::HoistImage;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, Weak};

/// Moves an erofs mount's metadata to its local file, once.
pub(crate) struct MetaMove {
    image: Arc<HoistImage>,
    store: Arc<ChunkStore>,
    /// Weak: the device files' FUSE session holds this (through its read callback), and
    /// the loop devices' open files keep that session's mount alive; a strong reference
    /// would keep the devices bound after the mount is gone.
    loops: OnceLock<Weak<LoopDevices>>,
    started: AtomicBool,
}

impl MetaMove {
    /// The move of `image`'s metadata.
    pub(crate) fn new(image: Arc<HoistImage>, store: Arc<ChunkStore>) -> Arc<MetaMove> {
        Arc::new(MetaMove {
            image,
            store,
            loops: OnceLock::new(),
            started: AtomicBool::new(false),
        })
    }

    /// The mount's loop devices, once they are bound (or bound again by a successor):
    /// the move starts if all of the metadata is here.
    pub(crate) fn set_loops(self: &Arc<Self>, loops: Arc<LoopDevices>) {
        let _ = self.loops.set(Arc::downgrade(&loops));
        self.check();
    }

    /// After a read of the metadata's device file: once all of the metadata is in
    /// memory, moves the device, on a thread of its own (the loop driver waits for the
    /// device's reads in flight, which may be waiting for the FUSE thread calling this).
    pub(crate) fn check(self: &Arc<Self>) {
        let Some(loops) = self.loops.get().and_then(Weak::upgrade) else {
            return;
        };
        if loops.meta_is_local() || !self.image.meta_complete() || self.started.swap(true, Relaxed)
        {
            return;
        }
        let this = self.clone();
        let spawned = std::thread::Builder::new()
            .name("hoist-meta".into())
            .spawn(move || this.move_now());
        if let Err(e) = spawned {
            tracing::warn!("starting the move of the metadata: {e}");
        }
    }

    /// Reads what is missing of the metadata (fetching it) and moves the device now, on
    /// the calling thread (`--prefetch all`, which wants the whole image local).
    pub(crate) fn complete(&self) {
        let Some(loops) = self.loops.get().and_then(Weak::upgrade) else {
            return;
        };
        if loops.meta_is_local() || self.started.swap(true, Relaxed) {
            return;
        }
        if let Err(e) = self.image.meta_all() {
            tracing::warn!(
                "metadata {}: {e}; it stays on hoist's device file",
                self.image.meta_digest
            );
            self.started.store(false, Relaxed);
            return;
        }
        self.move_now();
    }

    fn move_now(&self) {
        let Some(loops) = self.loops.get().and_then(Weak::upgrade) else {
            return;
        };
        let moved = match kernel_meta(&self.store, &self.image) {
            Ok(Some(path)) => loops.use_meta(&path).map_err(|e| e.to_string()),
            Ok(None) => Err("not all of it is read".to_string()),
            Err(e) => Err(format!("writing it for the kernel: {e}")),
        };
        if let Err(e) = moved {
            tracing::warn!(
                "metadata {} stays on hoist's device file: {e}",
                self.image.meta_digest
            );
        }
    }
}
