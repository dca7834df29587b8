//! Reads EROFS images written by [`super::write`] (and the uncompressed subset of
//! `mkfs.erofs` output): superblock, device table, inodes, directories, symlinks, inline
//! xattrs and chunk indexes.
//!
//! The image is untrusted: every offset is checked against the image size, every size
//! against a bound, and a directory walk refuses cycles and absurd depths. Errors, never
//! panics.

use super::ondisk::*;
use crate::tree::ChunkRef;
use crate::{FormatError, ReadAt};
use std::collections::HashSet;
use zerocopy::FromBytes;

/// An extended attribute: full name and value.
pub type Xattr = (Vec<u8>, Vec<u8>);

/// Largest directory hoist will read (to prevent denial of service).
pub const MAX_DIR_SIZE: u64 = 256 << 20;
/// Directory nesting a walk refuses: a directory this many levels below the root (the
/// root's children are 1 level below it) or deeper is an error. The writer refuses such
/// trees too, so `hoist convert` never makes an image that `check`, `unpack` and `mount`
/// would refuse.
pub const MAX_DEPTH: usize = 4096;
/// Symlinks [`Image::resolve_path`] follows on one path before it gives up, as Linux's
/// `MAXSYMLINKS` (a loop ends there).
pub const MAX_SYMLINKS: usize = 40;

/// The names of a path's components: empty and `.` ones skipped.
fn components(path: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    path.split(|&b| b == b'/')
        .filter(|n| !n.is_empty() && *n != b".")
}

/// A device table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The 64-byte tag.
    pub tag: [u8; 64],
    /// Size in blocks.
    pub blocks: u32,
}

/// A decoded inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    /// Its nid.
    pub nid: u64,
    /// Type and permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, seconds.
    pub mtime: u64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: u32,
    /// Link count.
    pub nlink: u32,
    /// Data layout (`LAYOUT_*`).
    pub layout: u16,
    /// The layout-dependent word (raw block address, rdev or chunk format).
    pub i_u: u32,
    xattr_off: u64,
    xattr_size: u64,
    /// Absolute offset right after the inode and its xattrs.
    data_off: u64,
}

impl Inode {
    /// The `S_IF*` type bits.
    pub fn file_type(&self) -> u32 {
        self.mode & mode::S_IFMT
    }
    /// Whether this is a directory.
    pub fn is_dir(&self) -> bool {
        self.file_type() == mode::S_IFDIR
    }
    /// Whether this is a regular file.
    pub fn is_file(&self) -> bool {
        self.file_type() == mode::S_IFREG
    }
    /// Device numbers of a character or block device.
    pub fn rdev(&self) -> (u32, u32) {
        decode_dev(self.i_u)
    }
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Name (never `/`-containing; `.` and `..` are included by [`Image::read_dir`]).
    pub name: Vec<u8>,
    /// Inode of the entry.
    pub nid: u64,
    /// `FT_*` type.
    pub file_type: u8,
}

/// An EROFS image opened for reading.
#[derive(Debug)]
pub struct Image<R> {
    r: R,
    size: u64,
    root_nid: u64,
    meta_off: u64,
    inos: u64,
    devices: Vec<DeviceInfo>,
    /// The superblock's build time: the mtime of compact inodes (plus their offset).
    epoch: (u64, u32),
}

fn corrupt(what: impl Into<String>) -> FormatError {
    FormatError::Corrupt(what.into())
}

impl<R: ReadAt> Image<R> {
    /// Opens an image: checks the superblock and reads the device table.
    pub fn open(r: R) -> Result<Self, FormatError> {
        let size = r.size()?;
        let mut buf = [0u8; 128];
        read_checked(&r, size, SUPER_OFFSET, &mut buf, "superblock")?;
        let sb = SuperBlock::read_from_bytes(&buf).map_err(|_| corrupt("superblock"))?;
        if sb.magic.get() != EROFS_MAGIC {
            return Err(corrupt("no EROFS superblock (bad magic)"));
        }
        if sb.blkszbits != BLOCK_BITS {
            return Err(corrupt(format!(
                "block size 2^{} (only 4 KiB is supported)",
                sb.blkszbits
            )));
        }
        let unknown = sb.feature_incompat.get()
            & !(FEATURE_INCOMPAT_CHUNKED_FILE | FEATURE_INCOMPAT_DEVICE_TABLE);
        if unknown != 0 {
            return Err(corrupt(format!(
                "unsupported incompatible features {unknown:#x}"
            )));
        }
        let meta_off = u64::from(sb.meta_blkaddr.get()) * BLOCK_SIZE;
        let mut devices = Vec::new();
        let extra = sb.extra_devices.get();
        if extra > 0 {
            if sb.feature_incompat.get() & FEATURE_INCOMPAT_DEVICE_TABLE == 0 {
                return Err(corrupt("extra devices without the device table feature"));
            }
            let start = u64::from(sb.devt_slotoff.get()) * DEVICE_SLOT_SIZE;
            for i in 0..u64::from(extra) {
                let mut slot = [0u8; 128];
                read_checked(
                    &r,
                    size,
                    start + i * DEVICE_SLOT_SIZE,
                    &mut slot,
                    "device table",
                )?;
                let slot =
                    DeviceSlot::read_from_bytes(&slot).map_err(|_| corrupt("device slot"))?;
                devices.push(DeviceInfo {
                    tag: slot.tag,
                    blocks: slot.blocks.get(),
                });
            }
        }
        Ok(Image {
            r,
            size,
            root_nid: u64::from(sb.root_nid.get()),
            epoch: (sb.build_time.get(), sb.build_time_nsec.get()),
            meta_off,
            inos: sb.inos.get(),
            devices,
        })
    }

    /// nid of the root directory.
    pub fn root_nid(&self) -> u64 {
        self.root_nid
    }
    /// Number of inodes the superblock claims.
    pub fn inode_count(&self) -> u64 {
        self.inos
    }
    /// The device table (device id `n` is `devices()[n - 1]`).
    pub fn devices(&self) -> &[DeviceInfo] {
        &self.devices
    }
    /// The underlying reader.
    pub fn reader(&self) -> &R {
        &self.r
    }

    /// Reads and decodes inode `nid`.
    pub fn inode(&self, nid: u64) -> Result<Inode, FormatError> {
        let at = nid
            .checked_mul(32)
            .and_then(|o| o.checked_add(self.meta_off))
            .ok_or_else(|| corrupt(format!("nid {nid} out of range")))?;
        let mut buf = [0u8; 64];
        let what = || format!("inode {nid}");
        read_checked(&self.r, self.size, at, &mut buf[..32], &what())?;
        let format = u16::from_le_bytes([buf[0], buf[1]]);
        if format & !0x0f != 0 {
            return Err(corrupt(format!(
                "inode {nid}: unknown format bits {format:#x}"
            )));
        }
        let layout = (format >> 1) & 0x07;
        let (mut inode, isize) = if format & INODE_VERSION_EXTENDED != 0 {
            read_checked(&self.r, self.size, at, &mut buf, &what())?;
            let e = InodeExtended::read_from_bytes(&buf).map_err(|_| corrupt(what()))?;
            let inode = Inode {
                nid,
                mode: u32::from(e.i_mode.get()),
                uid: e.i_uid.get(),
                gid: e.i_gid.get(),
                size: e.i_size.get(),
                mtime: e.i_mtime.get(),
                mtime_nsec: e.i_mtime_nsec.get(),
                nlink: e.i_nlink.get(),
                layout,
                i_u: e.i_u.get(),
                xattr_off: 0,
                xattr_size: xattr_ibody_size(e.i_xattr_icount.get()),
                data_off: 0,
            };
            (inode, 64)
        } else {
            let c = InodeCompact::read_from_bytes(&buf[..32]).map_err(|_| corrupt(what()))?;
            let inode = Inode {
                nid,
                mode: u32::from(c.i_mode.get()),
                uid: u32::from(c.i_uid.get()),
                gid: u32::from(c.i_gid.get()),
                size: u64::from(c.i_size.get()),
                // As Linux reads it: the superblock's time plus the inode's offset
                // (older kernels ignore the offset, which hoist writes as 0).
                mtime: self.epoch.0.saturating_add(u64::from(c.i_reserved.get())),
                mtime_nsec: self.epoch.1,
                nlink: u32::from(c.i_nlink.get()),
                layout,
                i_u: c.i_u.get(),
                xattr_off: 0,
                xattr_size: xattr_ibody_size(c.i_xattr_icount.get()),
                data_off: 0,
            };
            (inode, 32)
        };
        if ![LAYOUT_FLAT_PLAIN, LAYOUT_FLAT_INLINE, LAYOUT_CHUNK_BASED].contains(&layout) {
            return Err(corrupt(format!(
                "inode {nid}: unsupported data layout {layout}"
            )));
        }
        inode.xattr_off = at + isize;
        inode.data_off = inode.xattr_off + inode.xattr_size;
        if inode.data_off > self.size {
            return Err(corrupt(format!(
                "inode {nid}: xattrs run past the image end"
            )));
        }
        Ok(inode)
    }

    /// Reads the whole data of a directory or symlink (flat layouts only).
    pub fn read_flat(&self, inode: &Inode) -> Result<Vec<u8>, FormatError> {
        let nid = inode.nid;
        if inode.size > MAX_DIR_SIZE {
            return Err(corrupt(format!(
                "inode {nid}: flat data of {} bytes is too large",
                inode.size
            )));
        }
        let size = inode.size;
        let mut out = vec![0u8; size as usize];
        let (full, tail) = match inode.layout {
            LAYOUT_FLAT_PLAIN => (size, 0),
            LAYOUT_FLAT_INLINE => {
                let tail = if size.is_multiple_of(BLOCK_SIZE) {
                    BLOCK_SIZE.min(size)
                } else {
                    size % BLOCK_SIZE
                };
                (size - tail, tail)
            }
            other => {
                return Err(corrupt(format!(
                    "inode {nid}: layout {other} has no flat data"
                )))
            }
        };
        if full > 0 {
            let at = u64::from(inode.i_u) * BLOCK_SIZE;
            read_checked(
                &self.r,
                self.size,
                at,
                &mut out[..full as usize],
                &format!("data of inode {nid}"),
            )?;
        }
        if tail > 0 {
            if inode.data_off % BLOCK_SIZE + tail > BLOCK_SIZE {
                return Err(corrupt(format!(
                    "inode {nid}: inline data crosses a block boundary"
                )));
            }
            read_checked(
                &self.r,
                self.size,
                inode.data_off,
                &mut out[full as usize..],
                &format!("inline data of inode {nid}"),
            )?;
        }
        Ok(out)
    }

    /// The entries of a directory, `.` and `..` included, in on-disk (sorted) order.
    pub fn read_dir(&self, inode: &Inode) -> Result<Vec<DirEntry>, FormatError> {
        let nid = inode.nid;
        if !inode.is_dir() {
            return Err(corrupt(format!("inode {nid} is not a directory")));
        }
        let data = self.read_flat(inode)?;
        let mut out = Vec::new();
        for block in data.chunks(BLOCK_SIZE as usize) {
            let first = Dirent::read_from_prefix(block)
                .map_err(|_| corrupt(format!("directory {nid}: short block")))?
                .0;
            let names_start = usize::from(first.nameoff.get());
            if names_start == 0 || names_start % 12 != 0 || names_start > block.len() {
                return Err(corrupt(format!(
                    "directory {nid}: bad first name offset {names_start}"
                )));
            }
            let count = names_start / 12;
            for i in 0..count {
                let d = Dirent::read_from_prefix(&block[i * 12..])
                    .map_err(|_| corrupt(format!("directory {nid}: entry {i}")))?
                    .0;
                let start = usize::from(d.nameoff.get());
                let end = if i + 1 < count {
                    let next = Dirent::read_from_prefix(&block[(i + 1) * 12..])
                        .map_err(|_| corrupt(format!("directory {nid}: entry {i}")))?
                        .0;
                    usize::from(next.nameoff.get())
                } else {
                    // The last name runs to the first NUL or the end of the block.
                    let rest = block.get(start..).unwrap_or(&[]);
                    start + rest.iter().position(|&b| b == 0).unwrap_or(rest.len())
                };
                if start < names_start
                    || end <= start
                    || end > block.len()
                    || end - start > NAME_LEN_MAX
                {
                    return Err(corrupt(format!(
                        "directory {nid}: entry {i} has a bad name range {start}..{end}"
                    )));
                }
                let name = block[start..end].to_vec();
                if name.contains(&b'/') || name.contains(&0) {
                    return Err(corrupt(format!("directory {nid}: name with '/' or NUL")));
                }
                out.push(DirEntry {
                    name,
                    nid: d.nid.get(),
                    file_type: d.file_type,
                });
            }
        }
        Ok(out)
    }

    /// The target of a symlink.
    pub fn read_link(&self, inode: &Inode) -> Result<Vec<u8>, FormatError> {
        if inode.file_type() != mode::S_IFLNK {
            return Err(corrupt(format!("inode {} is not a symlink", inode.nid)));
        }
        if inode.size == 0 || inode.size >= 4096 {
            return Err(corrupt(format!(
                "symlink {} has a target of {} bytes",
                inode.nid, inode.size
            )));
        }
        self.read_flat(inode)
    }

    /// The inline extended attributes of an inode, as full names and values.
    pub fn xattrs(&self, inode: &Inode) -> Result<Vec<Xattr>, FormatError> {
        let nid = inode.nid;
        if inode.xattr_size == 0 {
            return Ok(Vec::new());
        }
        let mut body = vec![0u8; inode.xattr_size as usize];
        read_checked(
            &self.r,
            self.size,
            inode.xattr_off,
            &mut body,
            &format!("xattrs of inode {nid}"),
        )?;
        if body[4] != 0 {
            return Err(corrupt(format!(
                "inode {nid}: shared xattrs are not supported"
            )));
        }
        let mut out = Vec::new();
        let mut pos = 12usize;
        while pos + 4 <= body.len() {
            let e = XattrEntry::read_from_prefix(&body[pos..])
                .map_err(|_| corrupt(format!("xattrs of inode {nid}")))?
                .0;
            let name_len = usize::from(e.e_name_len);
            let value_len = usize::from(e.e_value_size.get());
            let end = pos + 4 + name_len + value_len;
            if end > body.len() {
                return Err(corrupt(format!(
                    "inode {nid}: xattr entry runs past the xattr area"
                )));
            }
            let prefix = XATTR_PREFIXES
                .iter()
                .find(|(i, _)| *i == e.e_name_index)
                .ok_or_else(|| {
                    corrupt(format!(
                        "inode {nid}: unknown xattr name index {}",
                        e.e_name_index
                    ))
                })?
                .1;
            let mut name = prefix.to_vec();
            name.extend_from_slice(&body[pos + 4..pos + 4 + name_len]);
            out.push((name, body[pos + 4 + name_len..end].to_vec()));
            pos = end.next_multiple_of(4);
        }
        Ok(out)
    }

    /// log2 of the chunk size of a chunk-based file.
    pub fn chunk_bits(&self, inode: &Inode) -> Result<u8, FormatError> {
        if inode.layout != LAYOUT_CHUNK_BASED {
            return Err(corrupt(format!("inode {} is not chunk-based", inode.nid)));
        }
        let format = inode.i_u as u16;
        if format & CHUNK_FORMAT_INDEXES == 0 {
            return Err(corrupt(format!(
                "inode {}: block-map chunk format is not supported",
                inode.nid
            )));
        }
        let bits = BLOCK_BITS + (format & CHUNK_FORMAT_BLKBITS_MASK) as u8;
        if bits > 40 {
            return Err(corrupt(format!("inode {}: chunk size 2^{bits}", inode.nid)));
        }
        Ok(bits)
    }

    /// All chunk references of a regular file (empty for an empty file).
    pub fn chunks(&self, inode: &Inode) -> Result<Vec<ChunkRef>, FormatError> {
        let nid = inode.nid;
        if !inode.is_file() {
            return Err(corrupt(format!("inode {nid} is not a regular file")));
        }
        if inode.size == 0 && inode.layout != LAYOUT_CHUNK_BASED {
            return Ok(Vec::new());
        }
        let bits = self.chunk_bits(inode)?;
        let count = inode.size.div_ceil(1u64 << bits);
        let start = inode.data_off.next_multiple_of(8);
        let bytes = count
            .checked_mul(8)
            .filter(|b| start.checked_add(*b).is_some_and(|e| e <= self.size));
        let Some(bytes) = bytes else {
            return Err(corrupt(format!(
                "inode {nid}: {count} chunk indexes run past the image end"
            )));
        };
        let mut raw = vec![0u8; bytes as usize];
        read_checked(
            &self.r,
            self.size,
            start,
            &mut raw,
            &format!("chunk indexes of inode {nid}"),
        )?;
        let ndev = self.devices.len();
        raw.chunks_exact(8)
            .enumerate()
            .map(|(i, b)| {
                let idx = ChunkIndex::read_from_bytes(b).map_err(|_| corrupt("chunk index"))?;
                let blkaddr = idx.blkaddr.get();
                if blkaddr == NULL_ADDR {
                    return Ok(ChunkRef::Hole);
                }
                let device = idx.device_id.get();
                if device == 0 || usize::from(device) > ndev {
                    return Err(corrupt(format!(
                        "inode {nid}: chunk {i} on device {device}, image has {ndev}"
                    )));
                }
                Ok(ChunkRef::Mapped { device, blkaddr })
            })
            .collect()
    }

    /// The inode at `path` (components separated by `/`; empty and `.` ones skipped),
    /// found by bisecting each directory on the way, as the kernel's lookups do: it
    /// reads those directories only, not the tree. Symlinks are not followed; a name
    /// that is missing, `..`, or under a non-directory gives `None`.
    pub fn lookup_path(&self, path: &[u8]) -> Result<Option<Inode>, FormatError> {
        let mut inode = self.inode(self.root_nid)?;
        for name in components(path) {
            if !inode.is_dir() || name == b".." {
                return Ok(None);
            }
            let dir = self.read_dir(&inode)?;
            let Ok(i) = dir.binary_search_by(|e| e.name.as_slice().cmp(name)) else {
                return Ok(None);
            };
            inode = self.inode(dir[i].nid)?;
        }
        Ok(Some(inode))
    }

    /// The inode at `path` as a process whose root is the image's root would open it:
    /// symlinks are followed in every component (absolute targets from the root,
    /// relative ones from their directory), `..` goes up (and stays at the root), and
    /// more than [`MAX_SYMLINKS`] links on the way (a loop) gives `None`, as does a
    /// missing name or a name under a non-directory.
    pub fn resolve_path(&self, path: &[u8]) -> Result<Option<Inode>, FormatError> {
        let root = self.inode(self.root_nid)?;
        // The directories from the root down to where the walk is.
        let mut dirs = vec![root.clone()];
        // Components still to walk, the next one last.
        let mut todo: Vec<Vec<u8>> = components(path).rev().map(<[u8]>::to_vec).collect();
        let mut links = 0;
        let mut at = root;
        while let Some(name) = todo.pop() {
            if !at.is_dir() {
                return Ok(None);
            }
            if name == b".." {
                if dirs.len() > 1 {
                    dirs.pop();
                }
                at = dirs[dirs.len() - 1].clone();
                continue;
            }
            let entries = self.read_dir(&at)?;
            let Ok(i) = entries.binary_search_by(|e| e.name.as_slice().cmp(&name)) else {
                return Ok(None);
            };
            let child = self.inode(entries[i].nid)?;
            if child.file_type() == mode::S_IFLNK {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Ok(None);
                }
                let target = self.read_link(&child)?;
                if target.starts_with(b"/") {
                    dirs.truncate(1);
                }
                todo.extend(components(&target).rev().map(<[u8]>::to_vec));
                at = dirs[dirs.len() - 1].clone();
                continue;
            }
            if child.is_dir() {
                dirs.push(child.clone());
            }
            at = child;
        }
        Ok(Some(at))
    }

    /// Walks the tree depth-first from the root, calling `visit(path, entry_inode)` for
    /// every entry (the root as `/`). Directories are visited before their children;
    /// hardlinked files are visited once per name. Refuses cycles and deep nesting.
    pub fn walk(
        &self,
        mut visit: impl FnMut(&[u8], &Inode) -> Result<(), FormatError>,
    ) -> Result<(), FormatError> {
        let root = self.inode(self.root_nid)?;
        if !root.is_dir() {
            return Err(corrupt("the root is not a directory"));
        }
        visit(b"/", &root)?;
        let mut seen_dirs = HashSet::from([self.root_nid]);
        let mut stack = vec![(b"".to_vec(), root, 0usize)];
        while let Some((path, dir, depth)) = stack.pop() {
            if depth >= MAX_DEPTH {
                return Err(corrupt("directories nested too deep"));
            }
            let entries = self.read_dir(&dir)?;
            let mut subdirs = Vec::new();
            for e in entries {
                if e.name == b"." || e.name == b".." {
                    continue;
                }
                let mut child_path = path.clone();
                child_path.push(b'/');
                child_path.extend_from_slice(&e.name);
                let inode = self.inode(e.nid)?;
                visit(&child_path, &inode)?;
                if inode.is_dir() {
                    if !seen_dirs.insert(e.nid) {
                        return Err(corrupt(format!(
                            "directory inode {} is linked twice (cycle?)",
                            e.nid
                        )));
                    }
                    subdirs.push((child_path, inode, depth + 1));
                }
            }
            stack.extend(subdirs.into_iter().rev());
        }
        Ok(())
    }
}

fn read_checked<R: ReadAt>(
    r: &R,
    size: u64,
    at: u64,
    buf: &mut [u8],
    what: &str,
) -> Result<(), FormatError> {
    if at
        .checked_add(buf.len() as u64)
        .is_none_or(|end| end > size)
    {
        return Err(corrupt(format!(
            "{what} at offset {at} runs past the image end ({size} bytes)"
        )));
    }
    r.read_exact_at(buf, at)
        .map_err(|e| FormatError::Io(format!("{what} at offset {at}"), e))
}
