//! The devices of an erofs-mode mount, as loop devices whose files hoist swaps.
//!
//! EROFS mounts the metadata file's loop device with one `device=` per blob. A blob's
//! loop device starts on the blob's device file in hoist's private FUSE mount
//! ([`crate::BlobDevFs`], filled on demand) unless its view is built already. Once every
//! chunk of a blob is cached and copied into its view ([`hoist_cache::View`]), the view
//! replaces the device file behind the same loop device while EROFS stays mounted, read
//! by direct I/O: from then on the kernel reads that blob from the local disk and hoist
//! is out of its read path, for processes that have files open already too. A daemon
//! that dies then takes nothing with it: only blobs still on device files fail (EIO).

use crate::kernel;
use hoist_loopdev::{LoopDevice, LoopError};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Mutex;

/// What a blob's loop device reads when it is set up.
#[derive(Debug, Clone)]
pub struct Backing {
    /// The file: the blob's device file, or its view.
    pub path: PathBuf,
    /// Whether it is the view, a file on the local disk (read by direct I/O).
    pub local: bool,
}

/// The loop devices of one EROFS mount: the metadata file's and one per blob.
#[derive(Debug)]
pub struct LoopDevices {
    meta: LoopDevice,
    blobs: Vec<BlobDevice>,
}

#[derive(Debug)]
struct BlobDevice {
    dev: LoopDevice,
    local: AtomicBool,
    /// Held while the file behind the device is changed.
    swap: Mutex<()>,
}

/// Why a blob could not be moved to its view.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    /// There is no blob of that number.
    #[error("no blob {0} on this mount")]
    NoBlob(usize),
    /// The view could not be opened.
    #[error("opening view {path}: {source}")]
    Open {
        /// The view.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The loop driver refused.
    #[error(transparent)]
    Loop(#[from] LoopError),
}

impl LoopDevices {
    /// Binds loop devices to `meta` (the metadata file on the local disk, read through
    /// the page cache) and to each blob's file, in device order. Nothing is mounted yet;
    /// dropping the result before a mount frees the devices.
    pub fn attach(meta: &Path, blobs: &[Backing]) -> Result<LoopDevices, String> {
        let open = |p: &Path| File::open(p).map_err(|e| format!("opening {}: {e}", p.display()));
        // The metadata through the page cache, not by direct I/O: EROFS reads it a block
        // at a time, and the file's readahead makes most of those blocks memory reads
        // (find | stat over the tree 1.24x native, against 1.07x by direct I/O). It is
        // small, so its second copy in the page cache costs little.
        let meta = LoopDevice::attach(&open(meta)?, false).map_err(|e| e.to_string())?;
        let blobs = blobs
            .iter()
            .map(|b| {
                let file = open(&b.path)?;
                if !b.local {
                    // The loop driver reads hoist's device file through this open file:
                    // without readahead on it, the kernel asks hoist for what EROFS
                    // reads, not for the rest of the blob after it (the neighbouring
                    // files of the layer, mostly unused); hoist's own readahead follows
                    // the readers that go forward (hoist_cache::readahead).
                    rustix::fs::fadvise(&file, 0, 0, rustix::fs::Advice::Random)
                        .map_err(|e| format!("{}: fadvise: {e}", b.path.display()))?;
                }
                let dev = LoopDevice::attach(&file, b.local).map_err(|e| e.to_string())?;
                Ok(BlobDevice {
                    dev,
                    local: AtomicBool::new(b.local),
                    swap: Mutex::new(()),
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(LoopDevices { meta, blobs })
    }

    /// Opens again the devices that an earlier process bound and mounted EROFS on
    /// (`paths`, as [`LoopDevices::paths`] gave them), so that blobs still on their
    /// device files can move to their views. Each device must still read the file it was
    /// given: `meta`, or blob k's device file `blobs[k].0` or its view `blobs[k].1`
    /// (then the blob is local already). A device reading anything else is not this
    /// mount's, and nothing is changed.
    pub fn reopen(
        paths: &[PathBuf],
        meta: &Path,
        blobs: &[(PathBuf, PathBuf)],
    ) -> Result<LoopDevices, String> {
        if paths.len() != blobs.len() + 1 {
            return Err(format!(
                "{} loop devices recorded for 1 metadata file and {} blobs",
                paths.len(),
                blobs.len()
            ));
        }
        let open = |path: &PathBuf, wanted: &[&Path]| -> Result<(LoopDevice, usize), String> {
            let (dev, backing) = LoopDevice::open_bound(path).map_err(|e| e.to_string())?;
            wanted
                .iter()
                .position(|w| same_file_name(w, &backing))
                .map(|k| (dev, k))
                .ok_or_else(|| {
                    format!(
                        "{} reads {}, not {}",
                        path.display(),
                        backing.display(),
                        wanted[0].display()
                    )
                })
        };
        let (meta, _) = open(&paths[0], &[meta])?;
        let blobs = paths[1..]
            .iter()
            .zip(blobs)
            .map(|(path, (file, view))| {
                let (dev, k) = open(path, &[file, view])?;
                Ok(BlobDevice {
                    dev,
                    local: AtomicBool::new(k == 1),
                    swap: Mutex::new(()),
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(LoopDevices { meta, blobs })
    }

    /// Mounts EROFS on the devices at `target`, read-only, with a readahead window of
    /// `readahead_kib`, granting `privileges`.
    pub fn mount(
        &self,
        target: &Path,
        readahead_kib: u32,
        privileges: kernel::Privileges,
    ) -> io::Result<()> {
        let devices: Vec<PathBuf> = self.blobs.iter().map(|b| b.dev.path()).collect();
        kernel::mount_erofs(
            &self.meta.path(),
            &devices,
            target,
            false,
            readahead_kib,
            privileges,
        )
    }

    /// Puts blob `blob`'s view (`view`, a file of the device's size on the local disk)
    /// behind its device in place of the device file, read by direct I/O. Returns false
    /// when the blob was local already.
    pub fn use_view(&self, blob: usize, view: &Path) -> Result<bool, SwapError> {
        let b = self.blobs.get(blob).ok_or(SwapError::NoBlob(blob))?;
        let _held = b.swap.lock().unwrap_or_else(|p| p.into_inner());
        if b.local.load(Relaxed) {
            return Ok(false);
        }
        let file = File::open(view).map_err(|source| SwapError::Open {
            path: view.to_path_buf(),
            source,
        })?;
        let direct = b.dev.swap(&file, true)?;
        b.local.store(true, Relaxed);
        tracing::info!(
            "{}: now reads {} ({})",
            b.dev.path().display(),
            view.display(),
            if direct { "direct I/O" } else { "buffered" }
        );
        Ok(true)
    }

    /// Whether blob `blob` is read from its view.
    pub fn is_local(&self, blob: usize) -> bool {
        self.blobs.get(blob).is_some_and(|b| b.local.load(Relaxed))
    }

    /// How many blobs are read from their views.
    pub fn local(&self) -> usize {
        self.blobs.iter().filter(|b| b.local.load(Relaxed)).count()
    }

    /// How many blobs there are.
    pub fn len(&self) -> usize {
        self.blobs.len()
    }

    /// Whether the image has no blobs.
    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }

    /// The devices, metadata first, then the blobs in order.
    pub fn paths(&self) -> Vec<PathBuf> {
        std::iter::once(&self.meta)
            .chain(self.blobs.iter().map(|b| &b.dev))
            .map(LoopDevice::path)
            .collect()
    }
}

/// Whether `expected` names the file the kernel reports as `reported` (an absolute path
/// with symbolic links resolved): compared after resolving `expected`'s directory, so
/// that the file itself (on a FUSE mount) is never looked up.
fn same_file_name(expected: &Path, reported: &Path) -> bool {
    if expected == reported {
        return true;
    }
    let (Some(dir), Some(name)) = (expected.parent(), expected.file_name()) else {
        return false;
    };
    std::fs::canonicalize(dir).is_ok_and(|d| d.join(name) == reported)
}
