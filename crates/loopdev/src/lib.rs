//! Read-only loop devices whose backing file can be swapped while a filesystem is
//! mounted on them.
//!
//! The kernel's EROFS opens its devices once, when it is mounted. A file-backed mount
//! keeps the files it opened for as long as it lives, so a blob that hoist serves lazily
//! (a file of a private FUSE mount) would be read through hoist forever, even once all
//! of its chunks are on the local disk. A loop device puts one indirection in between:
//! `LOOP_CHANGE_FD` replaces the file behind a read-only loop device with another of the
//! same size while the device is in use, and `LOOP_SET_DIRECT_IO` then reads the new one
//! by direct I/O. The filesystem on top sees the same device throughout.
//!
//! Written here rather than taken from a crate: the maintained loop-device crates
//! (`loopdev-3` and its forks) generate their bindings with bindgen at build time (a
//! libclang dependency) and offer neither `LOOP_CONFIGURE` nor `LOOP_CHANGE_FD`. The
//! structures and request numbers come from `linux-raw-sys`, the calls go through
//! `rustix::ioctl`. These calls and two in `hoist-fs` (`takeover.rs`) are the only `unsafe` code in hoist; each says why it is
//! sound.

#![allow(unsafe_code)]

use linux_raw_sys::loop_device as sys;
use rustix::ioctl::{Ioctl, IoctlOutput, Opcode, RawOpcode};
use std::ffi::c_void;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// The loop driver's control device.
const CONTROL: &str = "/dev/loop-control";

/// How many free devices to try when other processes take them first.
const ATTEMPTS: usize = 32;

/// Why a loop device could not be set up or changed.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    /// The control device could not be opened.
    #[error(
        "opening {CONTROL}: {0} (loop devices need root and the loop driver: `modprobe loop`)"
    )]
    Control(#[source] io::Error),
    /// The driver has no free device to give.
    #[error("asking {CONTROL} for a free loop device: {0}")]
    NoFree(#[source] io::Error),
    /// An operation on a device failed.
    #[error("{device}: {op}: {source}")]
    Device {
        /// The device.
        device: PathBuf,
        /// What was being done.
        op: &'static str,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// Other processes took every free device offered, [`ATTEMPTS`] times over.
    #[error(
        "every free loop device offered was taken by another process first ({ATTEMPTS} tries)"
    )]
    Contended,
}

/// A read-only loop device bound to a file. It detaches itself (the kernel's autoclear)
/// once the last user closes it: this handle, and the filesystem mounted on it.
#[derive(Debug)]
pub struct LoopDevice {
    file: File,
    number: u32,
}

impl LoopDevice {
    /// Binds a free loop device to `backing`, read-only, reading it by direct I/O if
    /// `direct_io` (right for a file on a local disk: no second copy in the page cache).
    pub fn attach(backing: &File, direct_io: bool) -> Result<LoopDevice, LoopError> {
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .open(CONTROL)
            .map_err(LoopError::Control)?;
        let mut flags = sys::LO_FLAGS_READ_ONLY as u32 | sys::LO_FLAGS_AUTOCLEAR as u32;
        if direct_io {
            flags |= sys::LO_FLAGS_DIRECT_IO as u32;
        }
        let config = sys::loop_config {
            fd: fd_arg(backing),
            // The driver's default: the backing disk's logical block size for direct I/O.
            block_size: 0,
            info: sys::loop_info64 {
                lo_device: 0,
                lo_inode: 0,
                lo_rdevice: 0,
                lo_offset: 0,
                lo_sizelimit: 0,
                lo_number: 0,
                lo_encrypt_type: 0,
                lo_encrypt_key_size: 0,
                lo_flags: flags,
                lo_file_name: [0; 64],
                lo_crypt_name: [0; 64],
                lo_encrypt_key: [0; 32],
                lo_init: [0; 2],
            },
            __reserved: [0; 8],
        };
        for _ in 0..ATTEMPTS {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument; it returns a device number.
            let number = unsafe { call::<{ sys::LOOP_CTL_GET_FREE }>(&control, 0) }
                .map_err(LoopError::NoFree)?;
            let number = u32::try_from(number).map_err(|_| {
                LoopError::NoFree(io::Error::other(format!("the driver answered {number}")))
            })?;
            let (file, device) = open_number(number)?;
            // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which `config` is
            // (the binding's layout); the kernel copies it before returning.
            let configured =
                unsafe { call::<{ sys::LOOP_CONFIGURE }>(&file, &config as *const _ as usize) };
            match configured {
                Ok(_) => return Ok(LoopDevice { file, number }),
                // Another process bound it between our two calls: ask again.
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()) => {
                    continue
                }
                Err(source) => {
                    return Err(LoopError::Device {
                        device,
                        op: "binding it to its file (LOOP_CONFIGURE)",
                        source,
                    })
                }
            }
        }
        Err(LoopError::Contended)
    }

    /// Opens a device that is bound already (one a filesystem is mounted on, set up by
    /// an earlier process), to change its file later. Returns it with the file behind it
    /// (per sysfs), for the caller to check that the device is the one it expects.
    pub fn open_bound(path: &Path) -> Result<(LoopDevice, PathBuf), LoopError> {
        let number = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("loop"))
            .and_then(|n| n.parse::<u32>().ok())
            .ok_or_else(|| LoopError::Device {
                device: path.to_path_buf(),
                op: "parsing its name",
                source: io::Error::new(io::ErrorKind::InvalidInput, "not /dev/loopN"),
            })?;
        let (file, _) = open_number(number)?;
        let dev = LoopDevice { file, number };
        let backing = dev.backing_file().ok_or_else(|| {
            dev.error(
                "reading its file (sysfs backing_file)",
                io::Error::new(io::ErrorKind::NotFound, "the device is not bound"),
            )
        })?;
        Ok((dev, backing))
    }

    /// The device's path, `/dev/loopN`.
    pub fn path(&self) -> PathBuf {
        device_path(self.number)
    }

    /// Puts `backing` behind the device in place of its file, while it stays in use;
    /// then reads it by direct I/O if `direct_io`. `backing` must have the size of the
    /// file it replaces (the kernel refuses otherwise). Returns whether the device reads
    /// by direct I/O now: the kernel declines it for files that do not support it,
    /// which leaves the device working, through the page cache.
    ///
    /// The kernel waits for the device's requests in flight to finish before it swaps,
    /// so once this returns the old file is no longer read.
    pub fn swap(&self, backing: &File, direct_io: bool) -> Result<bool, LoopError> {
        // SAFETY: LOOP_CHANGE_FD takes a file descriptor as its argument; `backing` is
        // open for the duration of the call, and the kernel takes its own reference.
        unsafe { call::<{ sys::LOOP_CHANGE_FD }>(&self.file, fd_arg(backing) as usize) }
            .map_err(|source| self.error("changing its file (LOOP_CHANGE_FD)", source))?;
        if !direct_io {
            return Ok(false);
        }
        // SAFETY: LOOP_SET_DIRECT_IO takes an integer, 1 to turn direct I/O on.
        match unsafe { call::<{ sys::LOOP_SET_DIRECT_IO }>(&self.file, 1) } {
            Ok(_) => Ok(self.direct_io()),
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                Ok(false)
            }
            Err(source) => Err(self.error("turning direct I/O on (LOOP_SET_DIRECT_IO)", source)),
        }
    }

    /// Whether the device reads its file by direct I/O (per sysfs).
    pub fn direct_io(&self) -> bool {
        std::fs::read_to_string(self.sysfs("dio")).is_ok_and(|s| s.trim() == "1")
    }

    /// The file behind the device (per sysfs), if it is bound.
    pub fn backing_file(&self) -> Option<PathBuf> {
        let s = std::fs::read_to_string(self.sysfs("backing_file")).ok()?;
        Some(PathBuf::from(s.trim_end_matches('\n')))
    }

    fn sysfs(&self, name: &str) -> PathBuf {
        Path::new("/sys/block")
            .join(format!("loop{}", self.number))
            .join("loop")
            .join(name)
    }

    fn error(&self, op: &'static str, source: io::Error) -> LoopError {
        LoopError::Device {
            device: self.path(),
            op,
            source,
        }
    }
}

/// Opens `/dev/loop<number>`.
fn open_number(number: u32) -> Result<(File, PathBuf), LoopError> {
    let device = device_path(number);
    match File::open(&device) {
        Ok(file) => Ok((file, device)),
        Err(source) => Err(LoopError::Device {
            device,
            op: "open",
            source,
        }),
    }
}

fn device_path(number: u32) -> PathBuf {
    PathBuf::from(format!("/dev/loop{number}"))
}

/// A file descriptor as the loop driver's structures and arguments hold it.
fn fd_arg(f: &File) -> u32 {
    // Descriptors are never negative.
    f.as_raw_fd().unsigned_abs()
}

/// One request of the loop driver: request number `OP`, whose argument is passed to the
/// kernel as is (an integer, a descriptor or an address), returning the call's result.
struct LoopIoctl<const OP: u32> {
    arg: *mut c_void,
}

// SAFETY: the request numbers are the driver's (from linux-raw-sys); what each one does
// with its argument is the business of the `unsafe` call sites of `call`.
unsafe impl<const OP: u32> Ioctl for LoopIoctl<OP> {
    type Output = IoctlOutput;
    const IS_MUTATING: bool = false;
    #[allow(clippy::unnecessary_cast)] // RawOpcode is u32 or c_ulong, by backend
    const OPCODE: Opcode = Opcode::old(OP as RawOpcode);

    fn as_ptr(&mut self) -> *mut c_void {
        self.arg
    }

    unsafe fn output_from_ptr(out: IoctlOutput, _: *mut c_void) -> rustix::io::Result<IoctlOutput> {
        Ok(out)
    }
}

/// Calls loop request `OP` on `fd` with `arg`.
///
/// # Safety
/// `arg` must be what request `OP` expects: an integer, a descriptor, or the address
/// of a live value of the type the request reads.
unsafe fn call<const OP: u32>(fd: &File, arg: usize) -> io::Result<IoctlOutput> {
    let request = LoopIoctl::<OP> {
        arg: arg as *mut c_void,
    };
    // SAFETY: the caller vouches for the argument; `fd` is open.
    unsafe { rustix::ioctl::ioctl(fd, request) }.map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn file_of(dir: &Path, name: &str, fill: u8, len: usize) -> File {
        let path = dir.join(name);
        File::create(&path)
            .unwrap()
            .write_all(&vec![fill; len])
            .unwrap();
        File::open(path).unwrap()
    }

    fn read_device(dev: &LoopDevice) -> Vec<u8> {
        let mut out = Vec::new();
        File::open(dev.path())
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    /// Loop devices need root and the driver; the test suite runs as root (`.ci/run`).
    fn loop_available() -> bool {
        use hoist_testkit::{require, Need};
        require("loop device tests", &[Need::Root, Need::LoopDevices])
    }

    #[test]
    fn a_device_reads_its_file_then_the_one_swapped_in_and_goes_away_when_closed() {
        if !loop_available() {
            return;
        }
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let first = file_of(dir.path(), "first", 0xaa, 1 << 20);
        let dev = LoopDevice::attach(&first, false).unwrap();
        assert_eq!(read_device(&dev), vec![0xaa; 1 << 20]);
        assert_eq!(dev.backing_file(), Some(dir.path().join("first")));

        let second = file_of(dir.path(), "second", 0x55, 1 << 20);
        let dio = dev.swap(&second, true).unwrap();
        assert_eq!(dio, dev.direct_io());
        assert_eq!(dev.backing_file(), Some(dir.path().join("second")));
        assert_eq!(
            read_device(&dev),
            vec![0x55; 1 << 20],
            "stale data after the swap"
        );

        // A file of another size is refused, and the device keeps its file.
        let short = file_of(dir.path(), "short", 0x11, 1 << 19);
        let err = dev.swap(&short, true).unwrap_err();
        assert!(matches!(err, LoopError::Device { .. }), "{err}");
        assert_eq!(read_device(&dev), vec![0x55; 1 << 20]);

        let sysfs = dev.sysfs("backing_file");
        drop(dev);
        // Autoclear: the driver unbinds the device as its last user closes it.
        assert!(
            std::fs::read_to_string(&sysfs).is_err(),
            "{} still bound",
            sysfs.display()
        );
    }

    #[test]
    fn a_device_is_read_only() {
        if !loop_available() {
            return;
        }
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let backing = file_of(dir.path(), "f", 0x01, 4096);
        let dev = LoopDevice::attach(&backing, true).unwrap();
        let mut w = OpenOptions::new().write(true).open(dev.path()).unwrap();
        let err = w.write_all(&[0; 4096]).unwrap_err();
        assert_eq!(
            err.raw_os_error(),
            Some(rustix::io::Errno::PERM.raw_os_error()),
            "{err}"
        );
        assert_eq!(read_device(&dev), vec![0x01; 4096]);
    }
}
