//! Serving hoist images to the kernel, two ways.
//!
//! - **fuse** ([`TreeFs`]): a read-only FUSE filesystem of the image's EROFS tree. Every
//!   metadata operation is answered from the metadata blob in memory; file data comes
//!   through the [`hoist_cache::Fetcher`]. The image is immutable, so the kernel may cache
//!   entries, attributes, directories, symlinks and pages for as long as it likes, and a
//!   file whose single chunk is cached is handed to the kernel by FUSE passthrough (its
//!   reads never reach hoist again), and so is a larger file once its chunks are cached
//!   and copied into a view ([`hoist_cache::View`], built in the background at its first
//!   open, or by `--prefetch all`), unless it is open through the page cache already:
//!   the kernel does not mix the two on one inode, so an inode keeps its first open's mode
//!   while it is open.
//! - **erofs** ([`BlobDevFs`] + [`LoopDevices`] + [`kernel`]): the kernel's own EROFS
//!   mounts the metadata (a local file, or, while metadata read on demand is not all
//!   local, the `meta` file of the same private FUSE filesystem) with one `device=` per
//!   data blob, so metadata operations never leave the kernel once the metadata is
//!   cached. The devices are loop devices; behind
//!   each is a file of a small private FUSE filesystem, the uncompressed address space
//!   of one blob, filled on demand by the fetcher, until the blob's view is built: then
//!   the view takes its place behind the same loop device, read by direct I/O, and hoist
//!   is out of that blob's read path while the mount stays. An image whose blob views
//!   are all built when it is mounted needs no loop devices: a file-backed EROFS mount
//!   reads the views directly ([`kernel::mount_erofs`] with direct I/O).
//!
//! A connection outlives the process serving it when another holds its `/dev/fuse` file
//! ([`FuseMount::dev`]); a successor serves it again without a second INIT and has the
//! kernel resend what was in flight ([`takeover`]).
//!
//! In both, a read that hoist cannot serve in time fails with EIO: each chunk it needs waits
//! at most the fetcher's read timeout (so a read spanning several uncached chunks can wait
//! that long for each).

mod blobdev;
mod devices;
pub mod kernel;
mod opens;
mod session;
pub mod takeover;
mod tree;

pub use blobdev::{BlobDevFs, OnMetaRead, META_FILE};
pub use devices::{Backing, LoopDevices, SwapError};
pub use kernel::Privileges;
pub use session::{mount_fuse, Contents, FsCounters, FuseMount, Latency, LATENCY_BOUNDS};
pub use takeover::{resume_fuse, InitParams};
pub use tree::{file_view, TreeFs};
