//! Blob device files for the kernel's EROFS (`--mode erofs`).
//!
//! A flat FUSE directory holding one file per data blob, named by its device number
//! (`1`, `2`, …). File `n` is the uncompressed address space of blob `n`: each chunk at
//! its `uncompressed_offset`, zeros between chunks. EROFS mounts the metadata blob with
//! these files as `device=`s, and reads through them fetch chunks on demand.
//!
//! File `meta` is the image's metadata, read through [`HoistImage::meta_reader`]: for
//! metadata read on demand (format version 3), the kernel mounts this file until all of
//! the metadata is local, and each block it reads fetches only the chunks it touches.

use crate::session::{negotiate, FsCounters, TTL};
use crate::tree::READAHEAD_CHUNKS;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, KernelConfig,
    LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    Request,
};
use hoist_cache::Fetcher;
use hoist_reader::{HoistImage, MetaReader};
use std::ffi::OsStr;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

/// The name of the metadata's file.
pub const META_FILE: &str = "meta";

/// Called after each read of the metadata's file.
pub type OnMetaRead = Arc<dyn Fn() + Send + Sync>;

/// The FUSE filesystem of an image's blob devices.
pub struct BlobDevFs {
    fetcher: Arc<Fetcher>,
    sizes: Vec<u64>,
    counters: Arc<FsCounters>,
    meta: MetaReader,
    meta_size: u64,
    on_meta_read: Option<OnMetaRead>,
}

/// What a node of the directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    Root,
    Blob(usize),
    Meta,
}

impl BlobDevFs {
    /// Device files for the blobs of `fetcher`, of the given uncompressed sizes, and
    /// the metadata's file for `image`; `on_meta_read` runs after each read of that
    /// file (to notice when all of the metadata has been read).
    pub fn new(
        fetcher: Arc<Fetcher>,
        sizes: Vec<u64>,
        counters: Arc<FsCounters>,
        image: &HoistImage,
        on_meta_read: Option<OnMetaRead>,
    ) -> std::io::Result<BlobDevFs> {
        Ok(BlobDevFs {
            fetcher,
            sizes,
            counters,
            meta: image.meta_reader.clone(),
            meta_size: image.meta_reader.size()?,
            on_meta_read,
        })
    }

    /// Node numbers: 1 the directory, 2.. the blobs in order, then the metadata.
    fn node(&self, ino: INodeNo) -> Option<Node> {
        let n = self.sizes.len() as u64;
        match ino.0 {
            1 => Some(Node::Root),
            i if (2..n + 2).contains(&i) => Some(Node::Blob((i - 2) as usize)),
            i if i == n + 2 => Some(Node::Meta),
            _ => None,
        }
    }

    fn meta_ino(&self) -> INodeNo {
        INodeNo(self.sizes.len() as u64 + 2)
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, size, perm, nlink) = match self.node(ino)? {
            Node::Root => (FileType::Directory, 0, 0o500, 2),
            Node::Blob(b) => (FileType::RegularFile, self.sizes[b], 0o400, 1),
            Node::Meta => (FileType::RegularFile, self.meta_size, 0o400, 1),
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    /// Reads the metadata from `offset` into `buf`; returns how many bytes (short at
    /// the end).
    fn read_meta(&self, offset: u64, buf: &mut [u8]) -> Result<usize, Errno> {
        let n = self.meta_size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let read = self.meta.read_exact_at(&mut buf[..n], offset);
        if let Some(f) = &self.on_meta_read {
            f();
        }
        read.map(|()| n).map_err(|err| {
            tracing::warn!("metadata at {offset}: {err}");
            Errno::EIO
        })
    }

    /// Reads blob `blob`'s address space from `offset` into `buf`; returns how many
    /// bytes (short at the end).
    fn read_blob(&self, blob: usize, offset: u64, buf: &mut [u8]) -> Result<usize, Errno> {
        let total = self.sizes[blob];
        if offset >= total {
            return Ok(0);
        }
        let end = total.min(offset.saturating_add(buf.len() as u64));
        let entries = &self.fetcher.blobs()[blob].entries;
        // The first chunk that ends after `offset`.
        let first = entries
            .partition_point(|e| e.uncompressed_offset + u64::from(e.uncompressed_size) <= offset);
        // Bytes before `cursor` are written; gaps between chunks are zeros.
        let mut cursor = offset;
        for (k, e) in entries[first..].iter().enumerate() {
            if e.uncompressed_offset >= end {
                break;
            }
            let from = offset.max(e.uncompressed_offset);
            let to = end.min(e.uncompressed_offset + u64::from(e.uncompressed_size));
            if from < cursor || to <= from {
                tracing::warn!(
                    "device {}: chunk {} overlaps its neighbour",
                    blob + 1,
                    first + k
                );
                return Err(Errno::EIO);
            }
            buf[(cursor - offset) as usize..(from - offset) as usize].fill(0);
            let out = &mut buf[(from - offset) as usize..(to - offset) as usize];
            cursor = to;
            if !self.fetcher.blobs()[blob].is_used(first + k) {
                // No file uses it (the kernel reads ahead into it): zeros, not a fetch.
                out.fill(0);
                continue;
            }
            self.fetcher
                .read_at(blob, first + k, from - e.uncompressed_offset, out)
                .map_err(|err| {
                    tracing::warn!("device {} at {from}: {err}", blob + 1);
                    Errno::EIO
                })?;
            if from == e.uncompressed_offset {
                // A reader entering a chunk: start loading the next ones from disk.
                for next in first + k + 1..(first + k + 1 + READAHEAD_CHUNKS).min(entries.len()) {
                    self.fetcher.will_need(blob, next);
                }
            }
        }
        buf[(cursor - offset) as usize..(end - offset) as usize].fill(0);
        Ok((end - offset) as usize)
    }
}

impl fuser::Filesystem for BlobDevFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        negotiate(config, &self.counters, false, false);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let ino = match name.to_str() {
            _ if parent.0 != 1 => None,
            Some(META_FILE) => Some(self.meta_ino()),
            Some(n) => n
                .parse::<u64>()
                .ok()
                .filter(|n| (1..=self.sizes.len() as u64).contains(n))
                .map(|n| INodeNo(n + 1)),
            None => None,
        };
        let found = ino.and_then(|i| self.attr(i));
        match found {
            Some(attr) => reply.entry(&TTL, &attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.node(ino) {
            Some(Node::Blob(_) | Node::Meta) => {
                reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE)
            }
            Some(Node::Root) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.counters.note(req);
        match self.node(ino) {
            Some(Node::Blob(blob)) => self
                .counters
                .reply_read(size, reply, |buf| self.read_blob(blob, offset, buf)),
            Some(Node::Meta) => self
                .counters
                .reply_read(size, reply, |buf| self.read_meta(offset, buf)),
            Some(Node::Root) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    /// ENOSYS: nothing to flush on a read-only filesystem, and the kernel sends no
    /// flush again.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS)
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != 1 {
            return reply.error(Errno::ENOTDIR);
        }
        let mut names = vec![(INodeNo(1), FileType::Directory, ".".to_string())];
        names.push((INodeNo(1), FileType::Directory, "..".to_string()));
        for n in 1..=self.sizes.len() as u64 {
            names.push((INodeNo(n + 1), FileType::RegularFile, n.to_string()));
        }
        names.push((
            self.meta_ino(),
            FileType::RegularFile,
            META_FILE.to_string(),
        ));
        for (i, (ino, kind, name)) in names.into_iter().enumerate().skip(offset as usize) {
            if reply.add(ino, i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}
