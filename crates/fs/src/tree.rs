//! The FUSE filesystem of an image's tree (`--mode fuse`).

use crate::opens::{self, Journal};
use crate::session::{negotiate, FsCounters, TTL};
use crate::takeover;
use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use hoist_cache::{Fetcher, Piece, View};
use hoist_format::erofs::ondisk::mode;
use hoist_format::erofs::{DirEntry, Inode};
use hoist_format::tree::ChunkRef;
use hoist_reader::HoistImage;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, UNIX_EPOCH};

/// Cached chunks after the one being entered that a read asks the kernel to load ahead.
pub(crate) const READAHEAD_CHUNKS: usize = 4;

const SEEK_DATA: i32 = 3;
const SEEK_HOLE: i32 = 4;

/// A read-only FUSE filesystem serving a hoist image's tree.
///
/// Inode numbers are EROFS nids plus 2, except the root, which FUSE wants as 1; so a
/// hardlinked file has one inode number, as on any filesystem.
pub struct TreeFs {
    image: Arc<HoistImage>,
    fetcher: Arc<Fetcher>,
    counters: Arc<FsCounters>,
    dirs: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    /// How each open inode is open, with its open count (when passthrough is on), and
    /// the record of it a successor reads ([`crate::opens`]).
    opens: Mutex<(HashMap<u64, Opened>, Option<Journal>)>,
    want_passthrough: bool,
    passthrough: bool,
}

/// How the open files of an inode are served. The kernel refuses to mix the two on one
/// inode (an open by passthrough while an open through the page cache is live fails,
/// and the reverse too), so an inode keeps the mode of its first open until its last
/// open is released: a file opened before its chunk was cached stays on the page cache
/// path while it is open.
enum Opened {
    /// By FUSE passthrough, on this backing id: held here, or (registered by the
    /// previous server of the connection) not yet.
    Passthrough(Option<BackingId>, u32, usize),
    /// Through hoist and the page cache.
    Cached(usize),
}

impl Opened {
    fn state(&self) -> (opens::Mode, usize) {
        match self {
            Opened::Passthrough(_, raw, n) => (opens::Mode::Passthrough(*raw), *n),
            Opened::Cached(n) => (opens::Mode::Cached, *n),
        }
    }
}

/// File handles: which kind of open a release ends.
const FH_PLAIN: u64 = 0;
const FH_PASSTHROUGH: u64 = 1;
const FH_CACHED: u64 = 2;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl TreeFs {
    /// Serves `image`, reading file data through `fetcher`. With `passthrough`, files
    /// whose data is one cached chunk are opened by FUSE passthrough when the kernel
    /// offers it.
    pub fn new(
        image: Arc<HoistImage>,
        fetcher: Arc<Fetcher>,
        counters: Arc<FsCounters>,
        passthrough: bool,
    ) -> TreeFs {
        TreeFs {
            image,
            fetcher,
            counters,
            dirs: Mutex::new(HashMap::new()),
            opens: Mutex::new((HashMap::new(), None)),
            want_passthrough: passthrough,
            passthrough: false,
        }
    }

    /// Records how inodes are open in the file at `path`, for a server that takes the
    /// mount over. With `resume`, this server is that successor: it first reads the
    /// record the previous server left, and opens those inodes again the same way.
    pub fn with_opens_record(self, path: &std::path::Path, resume: bool) -> std::io::Result<Self> {
        let (journal, state) = Journal::open(path, resume)?;
        {
            let mut opens = lock(&self.opens);
            for (ino, (mode, count)) in state {
                let o = match mode {
                    opens::Mode::Passthrough(raw) => Opened::Passthrough(None, raw, count),
                    opens::Mode::Cached => Opened::Cached(count),
                };
                opens.0.insert(ino, o);
            }
            opens.1 = Some(journal);
        }
        Ok(self)
    }

    fn ino(&self, nid: u64) -> INodeNo {
        if nid == self.image.fs.root_nid() {
            INodeNo(1)
        } else {
            // Saturates for absurd nids: such an inode then fails to decode (EIO).
            INodeNo(nid.saturating_add(2))
        }
    }

    fn nid(&self, ino: INodeNo) -> u64 {
        if ino.0 == 1 {
            self.image.fs.root_nid()
        } else {
            ino.0.wrapping_sub(2)
        }
    }

    fn inode(&self, ino: INodeNo) -> Result<Inode, Errno> {
        self.image.fs.inode(self.nid(ino)).map_err(|e| {
            tracing::warn!("inode {}: {e}", ino.0);
            Errno::EIO
        })
    }

    fn dir(&self, inode: &Inode) -> Result<Arc<Vec<DirEntry>>, Errno> {
        if !inode.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        if let Some(d) = lock(&self.dirs).get(&inode.nid) {
            return Ok(d.clone());
        }
        let entries = Arc::new(self.image.fs.read_dir(inode).map_err(|e| {
            tracing::warn!("directory {}: {e}", inode.nid);
            Errno::EIO
        })?);
        lock(&self.dirs).insert(inode.nid, entries.clone());
        Ok(entries)
    }

    fn attr(&self, inode: &Inode) -> FileAttr {
        let kind = match inode.file_type() {
            mode::S_IFDIR => FileType::Directory,
            mode::S_IFLNK => FileType::Symlink,
            mode::S_IFCHR => FileType::CharDevice,
            mode::S_IFBLK => FileType::BlockDevice,
            mode::S_IFIFO => FileType::NamedPipe,
            mode::S_IFSOCK => FileType::Socket,
            _ => FileType::RegularFile,
        };
        let mtime = UNIX_EPOCH
            .checked_add(Duration::new(
                inode.mtime,
                inode.mtime_nsec.min(999_999_999),
            ))
            .unwrap_or(UNIX_EPOCH);
        let rdev = if matches!(kind, FileType::CharDevice | FileType::BlockDevice) {
            let (major, minor) = inode.rdev();
            // The kernel's new_encode_dev, as FUSE expects.
            (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
        } else {
            0
        };
        FileAttr {
            ino: self.ino(inode.nid),
            size: inode.size,
            blocks: inode.size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm: (inode.mode & 0o7777) as u16,
            nlink: inode.nlink.max(1),
            uid: inode.uid,
            gid: inode.gid,
            rdev,
            blksize: 4096,
            flags: 0,
        }
    }

    fn lookup_child(&self, parent: INodeNo, name: &OsStr) -> Result<Inode, Errno> {
        let dir = self.dir(&self.inode(parent)?)?;
        let name = name.as_bytes();
        // EROFS keeps directory entries sorted by name (the kernel bisects them too).
        let i = dir
            .binary_search_by(|e| e.name.as_slice().cmp(name))
            .map_err(|_| Errno::ENOENT)?;
        self.image.fs.inode(dir[i].nid).map_err(|e| {
            tracing::warn!("inode {}: {e}", dir[i].nid);
            Errno::EIO
        })
    }

    fn chunk_refs(&self, inode: &Inode) -> Result<Vec<ChunkRef>, Errno> {
        self.image.chunks(inode).map_err(|e| {
            tracing::warn!("chunks of inode {}: {e}", inode.nid);
            Errno::EIO
        })
    }

    /// Reads file bytes from `offset` into `buf`; returns how many (short at the end).
    fn read_range(&self, inode: &Inode, offset: u64, buf: &mut [u8]) -> Result<usize, Errno> {
        if !inode.is_file() {
            return Err(Errno::EISDIR);
        }
        if offset >= inode.size {
            return Ok(0);
        }
        let end = inode.size.min(offset.saturating_add(buf.len() as u64));
        let chunks = self.chunk_refs(inode)?;
        let bits = self.image.meta.chunk_bits;
        let mut pos = offset;
        while pos < end {
            let i = (pos >> bits) as usize;
            let chunk_start = (i as u64) << bits;
            let within = pos - chunk_start;
            let n = (end - pos).min((1u64 << bits) - within);
            let out = &mut buf[(pos - offset) as usize..(pos - offset + n) as usize];
            match chunks.get(i).copied() {
                Some(ChunkRef::Hole) => out.fill(0),
                Some(c) => {
                    let at = self.image.resolve(c).ok_or_else(|| {
                        tracing::warn!("inode {}: chunk {i} points nowhere", inode.nid);
                        Errno::EIO
                    })?;
                    if at.available() < within + n {
                        tracing::warn!("inode {}: chunk {i} is too short", inode.nid);
                        return Err(Errno::EIO);
                    }
                    self.fetcher
                        .read_at(at.blob, at.index, at.skip + within, out)
                        .map_err(|e| {
                            tracing::warn!("reading inode {} at {pos}: {e}", inode.nid);
                            Errno::EIO
                        })?;
                    if within == 0 {
                        // A reader entering a chunk: start loading the next ones from disk.
                        for c in chunks.iter().skip(i + 1).take(READAHEAD_CHUNKS) {
                            if let Some(at) = self.image.resolve(*c) {
                                self.fetcher.will_need(at.blob, at.index);
                            }
                        }
                    }
                }
                None => return Err(Errno::EIO),
            }
            pos += n;
        }
        Ok((end - offset) as usize)
    }

    /// A local file holding all of a file's data, for passthrough: its one cached chunk,
    /// or its built and verified view. A file of several chunks, all cached, whose view
    /// is not built, or not verified by this process, gets it built or verified in the
    /// background (for its next opens). None while recording: a
    /// view would hide which of its chunks the workload reads.
    fn backing_file(&self, inode: &Inode) -> Option<std::fs::File> {
        let chunks = self.chunk_refs(inode).ok()?;
        if chunks.len() > 1 && !self.fetcher.is_recording() {
            let view = file_view(&self.image, inode.size, &chunks)?;
            let store = self.fetcher.store();
            if let Some(f) = store.open_view(&view).ok().flatten() {
                return Some(f);
            }
            // Built but not verified by this process yet (verified in the background,
            // served by hoist until then), or buildable.
            if store.has_view_file(&view) || view.pieces.iter().all(|p| store.contains(&p.digest)) {
                self.fetcher.build_view_later(view);
            }
            return None;
        }
        let [c] = chunks.as_slice() else { return None };
        let at = self.image.resolve(*c)?;
        // A small file in a frame shares its chunk file with others: passthrough would
        // show the whole frame, so hoist serves it.
        let (blob, index, entry) = (at.blob, at.index, at.entry);
        if at.skip != 0 || u64::from(entry.uncompressed_size) != inode.size {
            return None;
        }
        let file = self
            .fetcher
            .store()
            .open_chunk(&entry.digest, entry.uncompressed_size)
            .ok()
            .flatten()?;
        // The kernel reads it from here on without asking hoist: record it now.
        self.fetcher.note_read(blob, index);
        Some(file)
    }

    fn open_passthrough(&self, ino: INodeNo, inode: &Inode, reply: ReplyOpen) {
        // Looked for outside the lock (a view costs a stat per chunk): other opens go on.
        let known = lock(&self.opens).0.contains_key(&ino.0);
        let backing = if known {
            None
        } else {
            self.backing_file(inode)
        };
        let mut guard = lock(&self.opens);
        let (opens, journal) = &mut *guard;
        // The record is written before the kernel hears of the open.
        let mut record = |ino: u64, o: &Opened| {
            if let Some(j) = journal.as_mut() {
                j.record(ino, Some(o.state()));
            }
        };
        if let Some(o) = opens.get_mut(&ino.0) {
            match o {
                Opened::Passthrough(held, raw, count) => {
                    *count += 1;
                    if held.is_none() {
                        *held = Some(takeover::adopt_backing(&reply, *raw));
                    }
                }
                Opened::Cached(count) => *count += 1,
            }
            record(ino.0, o);
            return match o {
                Opened::Passthrough(Some(id), ..) => {
                    self.counters.passthrough_opens.fetch_add(1, Relaxed);
                    reply.opened_passthrough(FileHandle(FH_PASSTHROUGH), FopenFlags::empty(), id)
                }
                _ => reply.opened(FileHandle(FH_CACHED), FopenFlags::FOPEN_KEEP_CACHE),
            };
        }
        if let Some(file) = backing {
            match reply.open_backing(&file) {
                Ok(id) => {
                    // The raw id is what a successor needs; this process keeps owning it.
                    let raw = id.into_raw();
                    let id = takeover::adopt_backing(&reply, raw);
                    let o = Opened::Passthrough(None, raw, 1);
                    record(ino.0, &o);
                    self.counters.passthrough_opens.fetch_add(1, Relaxed);
                    reply.opened_passthrough(FileHandle(FH_PASSTHROUGH), FopenFlags::empty(), &id);
                    opens.insert(ino.0, Opened::Passthrough(Some(id), raw, 1));
                    return;
                }
                Err(e) => tracing::debug!("passthrough for inode {}: {e}", ino.0),
            }
        }
        let o = Opened::Cached(1);
        record(ino.0, &o);
        opens.insert(ino.0, o);
        reply.opened(FileHandle(FH_CACHED), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn xattrs(&self, ino: INodeNo) -> Result<Vec<hoist_format::erofs::read::Xattr>, Errno> {
        let inode = self.inode(ino)?;
        self.image.fs.xattrs(&inode).map_err(|e| {
            tracing::warn!("xattrs of inode {}: {e}", ino.0);
            Errno::EIO
        })
    }
}

/// A file of `image` of `size` bytes with chunks `chunks` (two or more) as a view: its
/// chunks at their offsets in the file, holes left as holes. None when a chunk points
/// nowhere.
///
/// Each chunk must fill its place in the file exactly (the chunk size, or the rest of
/// the file for the last), as [`TreeFs`] reads demand; otherwise (malformed metadata)
/// there is no view and the file is read through hoist, which answers EIO.
pub fn file_view(image: &HoistImage, size: u64, chunks: &[ChunkRef]) -> Option<View> {
    let chunk_size = 1u64.checked_shl(image.meta.chunk_bits.into())?;
    let mut pieces = Vec::with_capacity(chunks.len());
    for (i, c) in chunks.iter().enumerate() {
        let offset = (i as u64).checked_mul(chunk_size)?;
        if *c == ChunkRef::Hole {
            continue;
        }
        let at = image.resolve(*c)?;
        let e = at.entry;
        if at.skip != 0
            || u64::from(e.uncompressed_size) != chunk_size.min(size.checked_sub(offset)?)
        {
            return None;
        }
        pieces.push(Piece {
            offset,
            digest: e.digest,
            size: e.uncompressed_size,
        });
    }
    Some(View { len: size, pieces })
}

/// Answers a getxattr/listxattr request: the size when asked for it, else the bytes.
fn reply_sized(reply: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if data.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

fn file_type_of(ft: u8) -> FileType {
    // EROFS FT_* values.
    match ft {
        2 => FileType::Directory,
        3 => FileType::CharDevice,
        4 => FileType::BlockDevice,
        5 => FileType::NamedPipe,
        6 => FileType::Socket,
        7 => FileType::Symlink,
        _ => FileType::RegularFile,
    }
}

/// Where SEEK_DATA or SEEK_HOLE from `offset` lands, at chunk granularity: a hole chunk
/// is a hole, any other chunk is data, and there is a hole at the end of the file.
pub(crate) fn seek(
    chunks: &[ChunkRef],
    bits: u8,
    size: u64,
    offset: u64,
    whence: i32,
) -> Option<u64> {
    if offset >= size {
        return None;
    }
    let first = (offset >> bits) as usize;
    let want_data = whence == SEEK_DATA;
    for (i, c) in chunks.iter().enumerate().skip(first) {
        let is_data = *c != ChunkRef::Hole;
        if is_data == want_data {
            return Some(offset.max((i as u64) << bits).min(size));
        }
    }
    if want_data {
        None
    } else {
        Some(size)
    }
}

impl fuser::Filesystem for TreeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        self.passthrough = negotiate(config, &self.counters, self.want_passthrough, true);
        self.counters
            .passthrough_available
            .store(u64::from(self.passthrough), Relaxed);
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.counters.note(req);
        match self.lookup_child(parent, name) {
            Ok(inode) => reply.entry(&TTL, &self.attr(&inode), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.counters.note(req);
        match self.inode(ino) {
            Ok(inode) => reply.attr(&TTL, &self.attr(&inode)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let r = self.inode(ino).and_then(|inode| {
            self.image.fs.read_link(&inode).map_err(|e| {
                tracing::warn!("symlink {}: {e}", ino.0);
                Errno::EINVAL
            })
        });
        match r {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.counters.note(req);
        if flags.0 & (rustix::fs::OFlags::ACCMODE.bits() as i32) != 0 {
            return reply.error(Errno::EROFS);
        }
        let inode = match self.inode(ino) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        if self.passthrough && inode.is_file() {
            return self.open_passthrough(ino, &inode, reply);
        }
        reply.opened(FileHandle(FH_PLAIN), FopenFlags::FOPEN_KEEP_CACHE);
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
        let inode = match self.inode(ino) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        self.counters
            .reply_read(size, reply, |buf| self.read_range(&inode, offset, buf));
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.counters.note(req);
        if fh.0 == FH_PASSTHROUGH || fh.0 == FH_CACHED {
            let mut guard = lock(&self.opens);
            let (opens, journal) = &mut *guard;
            let state = opens.get_mut(&ino.0).map(|o| {
                match o {
                    Opened::Passthrough(_, _, count) | Opened::Cached(count) => {
                        *count = count.saturating_sub(1)
                    }
                }
                o.state()
            });
            if let Some((_, count)) = state {
                let left = if count > 0 { state } else { None };
                if left.is_none() {
                    // Dropping a held backing id closes it; one inherited and never
                    // held by this server stays registered until the unmount.
                    opens.remove(&ino.0);
                }
                if let Some(j) = journal.as_mut() {
                    j.record(ino.0, left);
                }
            }
        }
        reply.ok();
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

    /// ENOSYS: the kernel then opens directories without asking (no `OPENDIR` and no
    /// `RELEASEDIR`, two round trips per directory a walk saves) and keeps their entries
    /// in its cache, as `FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR` would (its default for
    /// filesystems without opendir, since Linux 5.1). The VFS itself refuses
    /// `O_DIRECTORY` on a non-directory.
    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
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
        let dir = match self.inode(ino).and_then(|i| self.dir(&i)) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        for (i, e) in dir.iter().enumerate().skip(offset as usize) {
            let ino = self.ino(e.nid);
            let name = OsStr::from_bytes(&e.name);
            if reply.add(ino, i as u64 + 1, file_type_of(e.file_type), name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let dir = match self.inode(ino).and_then(|i| self.dir(&i)) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        for (i, e) in dir.iter().enumerate().skip(offset as usize) {
            let inode = match self.image.fs.inode(e.nid) {
                Ok(inode) => inode,
                Err(err) => {
                    tracing::warn!("inode {}: {err}", e.nid);
                    return reply.error(Errno::EIO);
                }
            };
            let name = OsStr::from_bytes(&e.name);
            if reply.add(
                self.ino(e.nid),
                i as u64 + 1,
                name,
                &TTL,
                &self.attr(&inode),
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let bytes: u64 = self
            .image
            .meta
            .blobs
            .iter()
            .map(|b| b.uncompressed_size)
            .sum();
        reply.statfs(
            bytes / 4096,
            0,
            0,
            self.image.fs.inode_count(),
            0,
            4096,
            255,
            4096,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.xattrs(ino) {
            Ok(xs) => match xs.iter().find(|(n, _)| n.as_slice() == name.as_bytes()) {
                Some((_, v)) => reply_sized(reply, size, v),
                None => reply.error(Errno::NO_XATTR),
            },
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.xattrs(ino) {
            Ok(xs) => {
                let mut names = Vec::new();
                for (n, _) in xs {
                    names.extend_from_slice(&n);
                    names.push(0);
                }
                reply_sized(reply, size, &names)
            }
            Err(e) => reply.error(e),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let inode = match self.inode(ino) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        if whence != SEEK_DATA && whence != SEEK_HOLE {
            return reply.error(Errno::EINVAL);
        }
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(Errno::ENXIO);
        };
        let chunks = match self.chunk_refs(&inode) {
            Ok(c) => c,
            Err(e) => return reply.error(e),
        };
        match seek(
            &chunks,
            self.image.meta.chunk_bits,
            inode.size,
            offset,
            whence,
        ) {
            Some(at) => reply.offset(at as i64),
            None => reply.error(Errno::ENXIO),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seek_data_and_hole_follow_chunks() {
        let d = ChunkRef::Mapped {
            device: 1,
            blkaddr: 0,
        };
        let h = ChunkRef::Hole;
        // 4 KiB chunks: data, hole, hole, data; 14000 bytes.
        let chunks = [d, h, h, d];
        let size = 14000;
        assert_eq!(seek(&chunks, 12, size, 0, SEEK_DATA), Some(0));
        assert_eq!(seek(&chunks, 12, size, 100, SEEK_HOLE), Some(4096));
        assert_eq!(seek(&chunks, 12, size, 5000, SEEK_DATA), Some(12288));
        assert_eq!(seek(&chunks, 12, size, 12300, SEEK_HOLE), Some(size));
        assert_eq!(seek(&chunks, 12, size, 14000, SEEK_DATA), None);
        assert_eq!(seek(&[h, h], 12, 8192, 0, SEEK_DATA), None);
        assert_eq!(seek(&[h, h], 12, 8192, 10, SEEK_HOLE), Some(10));
        assert_eq!(seek(&[], 12, 0, 0, SEEK_HOLE), None);
    }
}
