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
//! - **erofs** ([`BlobDevFs`] + [`kernel`]): the kernel's own EROFS mounts the metadata
//!   blob (a local file) with one `device=` per data blob. The devices are files of a
//!   small private FUSE filesystem, each the uncompressed address space of one blob,
//!   filled on demand by the fetcher. Metadata operations never leave the kernel, and
//!   file-backed EROFS needs no loop devices. An image whose blob views are all built
//!   is mounted over those local files instead ([`kernel::mount_erofs`] with direct
//!   I/O), and hoist serves nothing.
//!
//! In both, a read that hoist cannot serve in time fails with EIO: each chunk it needs waits
//! at most the fetcher's read timeout (so a read spanning several uncached chunks can wait
//! that long for each).

mod blobdev;
pub mod kernel;
mod session;
mod tree;

pub use blobdev::BlobDevFs;
pub use session::{mount_fuse, FsCounters};
pub use tree::{file_view, TreeFs};
