//! The chunk cache of hoist: where lazily read image data lives on the local disk, and
//! how it gets there.
//!
//! - [`ChunkStore`]: verified, uncompressed chunks, one file per BLAKE3 digest, shared by
//!   every mount of every image, bounded in size with eviction of unused chunks;
//!   metadata blobs beside them.
//! - [`Fetcher`]: turns misses into ranged reads of data blobs through a
//!   [`ChunkSource`] (an image's registry or layout today, peers later), coalescing
//!   adjacent misses, amplifying small reads, fetching ahead of readers that go forward
//!   ([`readahead`]), never fetching a chunk twice at once, bounding concurrency and the
//!   time a reader waits, verifying every chunk (a bad one is fetched again on its own),
//!   and putting readers before readahead, readahead before a start-up trace's chunks,
//!   and those before other prefetch; it can record the chunks read. Programs and
//!   libraries ([`elf`]) have their mapped range read ahead and, given the image's
//!   tree ([`Files`]), the libraries they load fetched before the loader asks, and
//!   the python modules a module imports ([`python`]) before the interpreter asks;
//!   told of a process about to start ([`Process`]), it fetches its program and
//!   script before the runtime execs it.
//! - [`View`]: cached chunks copied into one file shaped like a file of the image or a
//!   blob's address space, for FUSE passthrough and EROFS devices the kernel reads
//!   without hoist.
//! - [`prefetch`]: background fetching of chunk lists in stages (trace, then all).
//!
//! The main design choice is the one-file-per-chunk store: it makes sharing across
//! images exact (one copy per digest), eviction an unlink, and crash safety a rename
//! plus a hash on first use, at the cost of one open per chunk read.

pub mod elf;
mod fetch;
pub mod glibc;
mod meta;
pub mod prefetch;
pub mod python;
pub mod readahead;
mod source;
mod store;
mod views;

pub use fetch::{
    BlobChunks, Counters, FetchConfig, FetchError, Fetcher, Files, Located, Priority, Process,
    DEFAULT_PATH,
};
pub use meta::MetaCachingSource;
pub use source::{ChunkSource, ImageChunks, SourceError};
pub use store::{ChunkDigest, ChunkStore, Claim, Inflight, PruneReport, Slot, StoreStats};
pub use views::{Built, Piece, View, ViewError};
