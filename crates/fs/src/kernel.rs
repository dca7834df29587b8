//! Kernel mounts: EROFS over a metadata file or device and device files or devices, and
//! lazy unmounts.
//!
//! `mount(2)` is called directly: util-linux `mount -t erofs FILE` sets up a loop device
//! for the source and then refuses regular files as `device=`, while the kernel (6.12+)
//! mounts file-backed EROFS, devices included, without loop devices.

use rustix::mount::{MountFlags, UnmountFlags};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// What a mount lets the image's files do beyond being read and executed.
///
/// Images are untrusted: a setuid-root file or a device node in one must never give a
/// host user privileges. Every mount is `nosuid,nodev` ([`Privileges::NONE`]) unless it
/// serves a container, which needs both inside; such a mount sits under a directory
/// only root can enter ([`check_private`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Privileges {
    /// Honour setuid and setgid bits (no `nosuid`).
    pub suid: bool,
    /// Let device nodes be opened (no `nodev`).
    pub dev: bool,
}

impl Privileges {
    /// `nosuid,nodev`: what every mount gets unless it serves a container.
    pub const NONE: Privileges = Privileges {
        suid: false,
        dev: false,
    };
    /// What a container's root filesystem needs.
    pub const CONTAINER: Privileges = Privileges {
        suid: true,
        dev: true,
    };

    /// The mount flags withholding what is not granted.
    pub fn flags(self) -> MountFlags {
        let mut f = MountFlags::empty();
        if !self.suid {
            f |= MountFlags::NOSUID;
        }
        if !self.dev {
            f |= MountFlags::NODEV;
        }
        f
    }

    /// Whether anything beyond `NONE` is granted.
    pub fn any(self) -> bool {
        self.suid || self.dev
    }
}

/// Checks that `path` lies under a directory that only root can enter (owned by root,
/// no search permission for group or others), so that a mount there with setuid files or
/// device nodes ([`Privileges`]) cannot be reached by another user. Returns the first
/// such directory, or an error naming the path and the fix. (POSIX ACLs granting search
/// to others are not looked at: hoist never sets them on its own directories.)
pub fn check_private(path: &Path) -> io::Result<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let mut dir = path.parent();
    while let Some(d) = dir {
        let m = std::fs::metadata(d)?;
        if m.uid() == 0 && m.mode() & 0o011 == 0 {
            return Ok(d.to_path_buf());
        }
        dir = d.parent();
    }
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "{} is not under a directory only root can enter; a mount with setuid files or \
             device nodes there would give every local user root: mount it under a root-owned \
             directory of mode 0700",
            path.display()
        ),
    ))
}

/// Mounts the EROFS image on `source` read-only at `target`, with `devices` as its extra
/// devices in order: regular files (a file-backed mount), or block devices (loop
/// devices, [`crate::LoopDevices`]) for a block device `source`. With `direct_io`, a
/// file-backed EROFS reads its devices by direct I/O: right for files on a local disk
/// (the data is not cached twice, and EROFS keeps several reads in flight), not for
/// hoist's FUSE device files (measured slower than buffered). The mount reads ahead
/// `readahead_kib` ([`readahead_kib`]) and grants `privileges`.
pub fn mount_erofs(
    source: &Path,
    devices: &[PathBuf],
    target: &Path,
    direct_io: bool,
    readahead_kib: u32,
    privileges: Privileges,
) -> io::Result<()> {
    let mut data = String::from(if direct_io { "directio" } else { "" });
    for d in devices {
        let s = d.to_str().filter(|s| !s.contains(',')).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "device path {} cannot be passed to EROFS (non-UTF-8 or a comma)",
                    d.display()
                ),
            )
        })?;
        if !data.is_empty() {
            data.push(',');
        }
        data.push_str("device=");
        data.push_str(s);
    }
    // A file-backed EROFS mount gets a backing device info of its own named `erofs-N`,
    // not `MAJOR:MINOR` (the only link from the mount to it is an ioctl): the one that
    // appears across the mount call is the new mount's. Mounts are serialised here so
    // that two of hoist's cannot be confused. A mount on a block device uses that
    // device's, found from the mount point.
    let file_backed = std::fs::metadata(source).is_ok_and(|m| m.is_file());
    let mut bdis = lock(&EROFS_BDIS);
    let before = if file_backed {
        erofs_bdis()
    } else {
        BTreeSet::new()
    };
    let mounted = rustix::mount::mount(
        source,
        target,
        "erofs",
        MountFlags::RDONLY | MountFlags::NOATIME | privileges.flags(),
        data.as_str(),
    );
    if mounted.is_ok() {
        if file_backed {
            let new: Vec<String> = erofs_bdis().difference(&before).cloned().collect();
            match new.as_slice() {
                [bdi] => {
                    bdis.insert(target.to_path_buf(), bdi.clone());
                }
                new => tracing::debug!(
                    "EROFS on {}: {} new backing device infos, readahead left as is",
                    target.display(),
                    new.len()
                ),
            }
        }
        drop(bdis);
        set_readahead(target, readahead_kib);
    }
    mounted.map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!(
                "mount -t erofs {} on {}: {e} (the kernel needs EROFS, with file-backed mounts for files: Linux 6.12 or later)",
                source.display(),
                target.display()
            ),
        )
    })
}

/// The least readahead window hoist gives its mounts, KiB. The kernel gives FUSE mounts
/// 128 KiB; reading ahead further lets a sequential reader's requests overlap hoist's
/// reads of the cache (the data is local, so a larger window costs little), and the same
/// holds for EROFS reading through the blob devices.
const READAHEAD_KIB: u32 = 4096;

/// The most, KiB.
const MAX_READAHEAD_KIB: u32 = 16384;

/// Readahead window of the blob device files of erofs mode, KiB. EROFS reads ahead
/// within a file; the device files hold every file of a blob, so the window on them reads
/// into the files next to the one being read and fetches their chunks over the network,
/// wanted or not: what a start-up needs less of, and what a reader of many small files
/// in a row needs more of. Measured by `bench/coldstart.py` (erofs mode, 3 runs each;
/// python's start-up with its trace, then `tar` of /usr and /app without prefetch):
///
/// | window | python ready | fetched | tar ready |
/// |---|---:|---:|---:|
/// | 8 MiB | 3.19 s | 29.3 MB | |
/// | 4 MiB | 2.96 s | 27.1 MB | 10.04 s |
/// | 2 MiB | 2.60 s | 25.4 MB | 10.36 s |
/// | 1 MiB | 2.39-2.73 s | 22.5 MB | 14.46 s |
/// | 128 KiB | 2.37 s | 20.5 MB | |
pub const DEVICE_READAHEAD_KIB: u32 = 2048;

/// The readahead window for mounts whose data lives under `local` (the chunk cache):
/// [`READAHEAD_KIB`], or the window of the disk that holds `local` if that is larger
/// (at most 16 MiB), so that reading a view through a mount reads ahead as far as
/// reading it directly does. Measured for fuse mode (`bench/coldstart.py`, python's
/// start-up, two paired runs of 3): with the start-up trace ready in 1.88 and 1.80 s with
/// 8 MiB (this disk's window) against 2.27 and 1.88 s with 4 MiB, without it 2.88 and
/// 2.87 s against 3.41 and 3.03 s. Reads by FUSE passthrough do not use this window at
/// all: they go through a backing file the kernel opens with the window of the disk
/// under the cache (8192 and 128 KiB here read alike).
pub fn readahead_kib(local: &Path) -> u32 {
    let disk = rustix::fs::stat(local).ok().and_then(|st| {
        let dev = format!(
            "/sys/dev/block/{}:{}",
            rustix::fs::major(st.st_dev),
            rustix::fs::minor(st.st_dev)
        );
        // A whole disk has its queue; a partition's is its disk's, one level up.
        ["queue/read_ahead_kb", "../queue/read_ahead_kb"]
            .iter()
            .find_map(|q| std::fs::read_to_string(Path::new(&dev).join(q)).ok())
            .and_then(|s| s.trim().parse::<u32>().ok())
    });
    disk.map_or(READAHEAD_KIB, |d| d.clamp(READAHEAD_KIB, MAX_READAHEAD_KIB))
}

/// Backing device infos of the EROFS mounts made by this process, by mountpoint.
static EROFS_BDIS: Mutex<BTreeMap<PathBuf, String>> = Mutex::new(BTreeMap::new());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Names of the backing device infos of file-backed EROFS mounts now present.
fn erofs_bdis() -> BTreeSet<String> {
    std::fs::read_dir("/sys/class/bdi")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("erofs-"))
        .collect()
}

/// Sets the readahead window of the filesystem mounted at `mountpoint` through its
/// backing device info (`/sys/class/bdi/NAME/read_ahead_kb`: `MAJOR:MINOR` for FUSE,
/// the name found at mount for file-backed EROFS); best effort.
pub fn set_readahead(mountpoint: &Path, kib: u32) {
    // A name whose bdi is gone is a stale entry (the mount went away without hoist).
    let known = lock(&EROFS_BDIS)
        .get(mountpoint)
        .filter(|n| Path::new("/sys/class/bdi").join(n).exists())
        .cloned();
    let bdi = match known {
        Some(bdi) => bdi,
        None => {
            let Ok(st) = rustix::fs::stat(mountpoint) else {
                return;
            };
            let dev = st.st_dev;
            format!("{}:{}", rustix::fs::major(dev), rustix::fs::minor(dev))
        }
    };
    let path = format!("/sys/class/bdi/{bdi}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, kib.to_string()) {
        tracing::debug!("{path}: {e}");
    }
}

/// Bind-mounts the mount at `source` on `target`: the same filesystem, with the same
/// flags (`nosuid`, `nodev`, read-only), at a second place.
pub fn bind(source: &Path, target: &Path) -> io::Result<()> {
    rustix::mount::mount_bind(source, target).map_err(io::Error::from)
}

/// Detaches the mount at `target` now; it goes away when its last user does. Works on a
/// busy mount and on a FUSE mount whose server died.
pub fn unmount_lazy(target: &Path) -> io::Result<()> {
    lock(&EROFS_BDIS).remove(target);
    rustix::mount::unmount(target, UnmountFlags::DETACH).map_err(io::Error::from)
}

/// Whether `path` is the root of a mount (per /proc/self/mountinfo).
pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    info.lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|mp| unescape(mp) == want))
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && b.len() - i >= 4 {
            let digits = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
