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
//!
//! The metadata's loop device works the same way. Metadata read on demand starts on
//! hoist's `meta` device file; once all of it has been read and verified, hoist writes it
//! to a local file and puts that file behind the device (read through the page cache:
//! EROFS reads it a block at a time, and the page cache's readahead serves most of them).

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
    meta: BlobDevice,
    blobs: Vec<BlobDevice>,
}

/// A loop device whose file hoist may change once.
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
    /// Binds loop devices to `meta` (the metadata: a file on the local disk, or hoist's
    /// `meta` device file) and to each blob's file, in device order. Nothing is mounted
    /// yet; dropping the result before a mount frees the devices.
    pub fn attach(meta: &Backing, blobs: &[Backing]) -> Result<LoopDevices, String> {
        // The metadata through the page cache, not by direct I/O: EROFS reads it a block
        // at a time, and the file's readahead makes most of those blocks memory reads
        // (find | stat over the tree 1.24x native, against 1.07x by direct I/O). It is
        // small, so its second copy in the page cache costs little.
        let meta = bind(meta, false, true)?;
        let blobs = blobs
            .iter()
            .map(|b| bind(b, b.local, false))
            .collect::<Result<_, String>>()?;
        Ok(LoopDevices { meta, blobs })
    }

    /// Opens again the devices that an earlier process bound and mounted EROFS on
    /// (`paths`, as [`LoopDevices::paths`] gave them), so that blobs still on their
    /// device files can move to their views. Each device must still read the file it was
    /// given, or the local file it was to move to: the metadata's device file `meta.0`
    /// or its local file `meta.1`, blob k's device file `blobs[k].0` or its view
    /// `blobs[k].1` (then it is local already). A device reading anything else is not
    /// this mount's, and nothing is changed.
    pub fn reopen(
        paths: &[PathBuf],
        meta: &(PathBuf, PathBuf),
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
        let (dev, k) = open(&paths[0], &[meta.1.as_path(), meta.0.as_path()])?;
        let meta = BlobDevice {
            dev,
            local: AtomicBool::new(k == 0),
            swap: Mutex::new(()),
        };
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
            &self.meta.dev.path(),
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
        b.move_to(view, true)
    }

    /// Puts `local`, a file on the local disk holding all of the metadata (verified),
    /// behind the metadata's device in place of hoist's device file, read through the
    /// page cache. Returns false when the metadata was local already.
    pub fn use_meta(&self, local: &Path) -> Result<bool, SwapError> {
        self.meta.move_to(local, false)
    }

    /// Whether the metadata is read from a file on the local disk.
    pub fn meta_is_local(&self) -> bool {
        self.meta.local.load(Relaxed)
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

    /// Whether the metadata and every blob are read from the local disk: hoist is out
    /// of the mount's read path.
    pub fn all_local(&self) -> bool {
        self.meta_is_local() && self.local() == self.len()
    }

    /// The devices, metadata first, then the blobs in order.
    pub fn paths(&self) -> Vec<PathBuf> {
        std::iter::once(&self.meta)
            .chain(&self.blobs)
            .map(|b| b.dev.path())
            .collect()
    }
}

/// Binds a loop device to `backing`, by direct I/O if `direct` and the file is local,
/// with the page cache's readahead on hoist's device file if `readahead`.
fn bind(backing: &Backing, direct: bool, readahead: bool) -> Result<BlobDevice, String> {
    let file = File::open(&backing.path)
        .map_err(|e| format!("opening {}: {e}", backing.path.display()))?;
    if !backing.local && !readahead {
        // The loop driver reads hoist's device file through this open file: without
        // readahead on it, the kernel asks hoist for what EROFS reads, not for the rest
        // of the file after it (the neighbouring files of the layer, mostly unused);
        // hoist's own readahead follows the readers that go forward
        // (hoist_cache::readahead, and hoist_reader::lazy for the metadata).
        rustix::fs::fadvise(&file, 0, 0, rustix::fs::Advice::Random)
            .map_err(|e| format!("{}: fadvise: {e}", backing.path.display()))?;
    }
    let dev = LoopDevice::attach(&file, direct && backing.local).map_err(|e| e.to_string())?;
    Ok(BlobDevice {
        dev,
        local: AtomicBool::new(backing.local),
        swap: Mutex::new(()),
    })
}

impl BlobDevice {
    /// Puts `local` behind the device, by direct I/O if `direct`; false if it was
    /// local already.
    fn move_to(&self, local: &Path, direct: bool) -> Result<bool, SwapError> {
        let _held = self.swap.lock().unwrap_or_else(|p| p.into_inner());
        if self.local.load(Relaxed) {
            return Ok(false);
        }
        let file = File::open(local).map_err(|source| SwapError::Open {
            path: local.to_path_buf(),
            source,
        })?;
        let direct = self.dev.swap(&file, direct)?;
        self.local.store(true, Relaxed);
        tracing::info!(
            "{}: now reads {} ({})",
            self.dev.path().display(),
            local.display(),
            if direct { "direct I/O" } else { "buffered" }
        );
        Ok(true)
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
