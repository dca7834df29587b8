//! Materialises the root filesystem of a hoist image in a directory.
//!
//! Safety against hostile metadata: the target must be new or empty; names come from
//! validated directory entries (no `/`, no `.`/`..`); only directories this function made
//! are descended into, and files are created with `O_EXCL | O_NOFOLLOW`, so nothing is
//! ever written through a symlink or outside the target. Directory attributes are applied
//! after their contents, so mode-000 directories and mtimes come out right.
//!
//! A failed unpack leaves no partial tree: what it wrote is removed again ([`OutputDir`]),
//! and its error names the path (and, for an xattr the target refuses, the xattr and what
//! to do).

use crate::output::OutputDir;
use crate::{HoistImage, ReadError};
use hoist_format::erofs::ondisk::mode;
use hoist_format::erofs::Inode;
use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, Timestamps, CWD};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Counts of an unpack.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct UnpackStats {
    /// Entries created (hardlinks included).
    pub entries: u64,
    /// Bytes of file content written.
    pub bytes: u64,
}

fn io_err(path: &Path, e: impl Into<std::io::Error>) -> ReadError {
    ReadError::Io {
        path: path.display().to_string(),
        source: e.into(),
    }
}

/// Unpacks `image` into `target` (created if missing; must be empty if it exists). On
/// failure nothing of the image is left in `target` (see [`OutputDir`]).
pub fn unpack(image: &HoistImage, target: &Path) -> Result<UnpackStats, ReadError> {
    let out = OutputDir::new(target, "unpack")?;
    match unpack_into(image, target) {
        Ok(stats) => Ok(stats),
        Err(e) => match out.discard() {
            Ok(()) => Err(e),
            Err(cleanup) => Err(ReadError::Invalid(format!(
                "{e}; removing the partial tree in {} failed too: {cleanup}",
                target.display()
            ))),
        },
    }
}

fn unpack_into(image: &HoistImage, target: &Path) -> Result<UnpackStats, ReadError> {
    let mut stats = UnpackStats::default();
    let mut links: HashMap<u64, PathBuf> = HashMap::new();
    let mut dirs: Vec<(PathBuf, Inode)> = Vec::new();
    let mut failure = None;
    let walked = image.fs.walk(|path, inode| {
        let rel = Path::new(OsStr::from_bytes(path.strip_prefix(b"/").unwrap_or(path)));
        let dest = target.join(rel);
        let res = create(image, path, &dest, inode, &mut links, &mut stats);
        match res {
            Ok(true) => dirs.push((dest, inode.clone())),
            Ok(false) => {}
            Err(e) => {
                failure = Some(e);
                return Err(hoist_format::FormatError::Invalid("stopped".into()));
            }
        }
        Ok(())
    });
    if let Some(e) = failure {
        return Err(e);
    }
    walked.map_err(|source| ReadError::Meta {
        digest: image.meta_digest.to_string(),
        source,
    })?;
    for (dest, inode) in dirs.iter().rev() {
        let xattrs = image.fs.xattrs(inode).map_err(|source| ReadError::Meta {
            digest: image.meta_digest.to_string(),
            source,
        })?;
        finish(dest, inode, &xattrs, false)?;
    }
    Ok(stats)
}

/// Creates one entry; returns whether it is a directory whose attributes come later.
fn create(
    image: &HoistImage,
    path: &[u8],
    dest: &Path,
    inode: &Inode,
    links: &mut HashMap<u64, PathBuf>,
    stats: &mut UnpackStats,
) -> Result<bool, ReadError> {
    let meta_err = |source| ReadError::Meta {
        digest: image.meta_digest.to_string(),
        source,
    };
    let shown = String::from_utf8_lossy(path).into_owned();
    if path == b"/" {
        return Ok(true);
    }
    stats.entries += 1;
    if !inode.is_dir() && inode.nlink > 1 {
        if let Some(first) = links.get(&inode.nid) {
            std::fs::hard_link(first, dest).map_err(|e| io_err(dest, e))?;
            return Ok(false);
        }
        links.insert(inode.nid, dest.to_path_buf());
    }
    let perm = Mode::from_raw_mode(0o600);
    match inode.file_type() {
        mode::S_IFDIR => {
            rfs::mkdirat(CWD, dest, Mode::from_raw_mode(0o700)).map_err(|e| io_err(dest, e))?;
            return Ok(true);
        }
        mode::S_IFREG => {
            let fd = rfs::openat(
                CWD,
                dest,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                perm,
            )
            .map_err(|e| io_err(dest, e))?;
            let file = File::from(fd);
            image.read_file(&shown, inode, |offset, data| {
                file.write_all_at(data, offset)
                    .map_err(|e| io_err(dest, e))?;
                stats.bytes += data.len() as u64;
                Ok(())
            })?;
            // Trailing holes: extend the file without writing zeros.
            file.set_len(inode.size).map_err(|e| io_err(dest, e))?;
        }
        mode::S_IFLNK => {
            let target = image.fs.read_link(inode).map_err(meta_err)?;
            rfs::symlinkat(OsStr::from_bytes(&target), CWD, dest).map_err(|e| io_err(dest, e))?;
        }
        mode::S_IFCHR | mode::S_IFBLK | mode::S_IFIFO | mode::S_IFSOCK => {
            let kind = match inode.file_type() {
                mode::S_IFCHR => rfs::FileType::CharacterDevice,
                mode::S_IFBLK => rfs::FileType::BlockDevice,
                mode::S_IFIFO => rfs::FileType::Fifo,
                _ => rfs::FileType::Socket,
            };
            let (major, minor) = inode.rdev();
            rfs::mknodat(CWD, dest, kind, perm, rfs::makedev(major, minor))
                .map_err(|e| io_err(dest, e))?;
        }
        other => {
            return Err(ReadError::File {
                path: shown,
                why: format!("unknown file type {other:o}"),
            })
        }
    }
    let xattrs = image.fs.xattrs(inode).map_err(meta_err)?;
    finish(dest, inode, &xattrs, inode.file_type() == mode::S_IFLNK)?;
    Ok(false)
}

/// Applies owner, mode, xattrs and mtime (in that order: chown clears setuid bits).
fn finish(
    dest: &Path,
    inode: &Inode,
    xattrs: &[(Vec<u8>, Vec<u8>)],
    symlink: bool,
) -> Result<(), ReadError> {
    std::os::unix::fs::lchown(dest, Some(inode.uid), Some(inode.gid))
        .map_err(|e| io_err(dest, e))?;
    if !symlink {
        rfs::chmodat(
            CWD,
            dest,
            Mode::from_raw_mode(inode.mode & 0o7777),
            AtFlags::empty(),
        )
        .map_err(|e| io_err(dest, e))?;
    }
    for (name, value) in xattrs {
        let res = rfs::lsetxattr(
            dest,
            OsStr::from_bytes(name),
            value,
            rfs::XattrFlags::empty(),
        );
        // Linux refuses user.* xattrs on symlinks; the reference tools skip them too.
        if let Err(e) = res {
            if !(symlink && name.starts_with(b"user.")) {
                return Err(ReadError::Xattr {
                    path: dest.display().to_string(),
                    name: String::from_utf8_lossy(name).into_owned(),
                    hint: xattr_hint(name, value.len(), e),
                    source: e.into(),
                });
            }
        }
    }
    let t = rfs::Timespec {
        tv_sec: inode.mtime as i64,
        tv_nsec: i64::from(inode.mtime_nsec) as _,
    };
    rfs::utimensat(
        CWD,
        dest,
        &Timestamps {
            last_access: t,
            last_modification: t,
        },
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| io_err(dest, e))?;
    Ok(())
}

/// What to do about an xattr the target filesystem or the kernel refused.
fn xattr_hint(name: &[u8], len: usize, e: rustix::io::Errno) -> String {
    use rustix::io::Errno;
    let namespace =
        String::from_utf8_lossy(name.split(|&b| b == b'.').next().unwrap_or(name)).into_owned();
    match e {
        Errno::NOSPC | Errno::TOOBIG | Errno::RANGE => format!(
            "the target filesystem cannot hold an xattr of {len} bytes (ext4 keeps a file's \
             xattrs in one block, about 4 KiB); unpack onto a filesystem with larger xattrs \
             (xfs, btrfs, tmpfs), or mount the image (hoist mount) instead"
        ),
        Errno::INVAL if name == b"security.capability" => format!(
            "the kernel refuses this value: the image's file capability ({len} bytes) is \
             malformed (a valid one is 20 or 24 bytes); the layer that set it needs fixing"
        ),
        Errno::PERM | Errno::ACCESS => format!(
            "setting {namespace}.* xattrs needs privileges (CAP_SYS_ADMIN for trusted.*, \
             CAP_SETFCAP for security.capability): run hoist unpack as root"
        ),
        Errno::NOTSUP => format!(
            "the target filesystem does not support {namespace}.* xattrs; unpack onto one \
             that does"
        ),
        _ => "the target filesystem refused it".into(),
    }
}
