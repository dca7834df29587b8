//! Kernel mounts: EROFS over a metadata file and device files, and lazy unmounts.
//!
//! `mount(2)` is called directly: util-linux `mount -t erofs FILE` sets up a loop device
//! for the source and then refuses regular files as `device=`, while the kernel (6.12+)
//! mounts file-backed EROFS, devices included, without loop devices.

use rustix::mount::{MountFlags, UnmountFlags};
use std::io;
use std::path::{Path, PathBuf};

/// Mounts the EROFS image in `meta` read-only at `target`, with `devices` as its extra
/// devices in order.
pub fn mount_erofs(meta: &Path, devices: &[PathBuf], target: &Path) -> io::Result<()> {
    let mut data = String::new();
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
    let mounted = rustix::mount::mount(
        meta,
        target,
        "erofs",
        MountFlags::RDONLY | MountFlags::NOATIME,
        data.as_str(),
    );
    if mounted.is_ok() {
        raise_readahead(target);
    }
    mounted.map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!(
                "mount -t erofs {} on {}: {e} (the kernel needs EROFS with file-backed mounts, Linux 6.12 or later)",
                meta.display(),
                target.display()
            ),
        )
    })
}

/// Readahead window hoist gives its mounts, KiB. The kernel gives FUSE mounts 128 KiB;
/// reading ahead further lets a sequential reader's requests overlap hoist's reads of
/// the cache (the data is local, so a larger window costs little), and the same holds
/// for EROFS reading through the blob devices.
const READAHEAD_KIB: u32 = 4096;

/// Gives the filesystem mounted at `mountpoint` hoist's readahead window.
pub fn raise_readahead(mountpoint: &Path) {
    set_readahead(mountpoint, READAHEAD_KIB);
}

/// Sets the readahead window of the filesystem mounted at `mountpoint` through its
/// backing device info (`/sys/class/bdi/MAJOR:MINOR/read_ahead_kb`); best effort.
pub fn set_readahead(mountpoint: &Path, kib: u32) {
    let Ok(st) = rustix::fs::stat(mountpoint) else {
        return;
    };
    let dev = st.st_dev;
    let path = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        rustix::fs::major(dev),
        rustix::fs::minor(dev)
    );
    if let Err(e) = std::fs::write(&path, kib.to_string()) {
        tracing::debug!("{path}: {e}");
    }
}

/// Detaches the mount at `target` now; it goes away when its last user does. Works on a
/// busy mount and on a FUSE mount whose server died.
pub fn unmount_lazy(target: &Path) -> io::Result<()> {
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
