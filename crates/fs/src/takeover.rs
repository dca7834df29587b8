//! Serving a FUSE connection that another process mounted and initialised: how a
//! successor takes a mount over after the process serving it died or was replaced.
//!
//! The kernel sends `INIT` once per connection, and any process holding the connection's
//! `/dev/fuse` file may serve it. `fuser` (0.18, the maintained crate hoist serves with,
//! for its mainline FUSE passthrough) cannot serve a connection without running the INIT
//! handshake first (`Session::from_fd` always waits for one: its issues #378 and #753),
//! and has no way to send `FUSE_NOTIFY_RESEND`. Rather than write a FUSE server of our
//! own, a successor lets fuser run its handshake against a synthetic INIT on one end of
//! a socket pair, carrying the capabilities the kernel offered the connection's first
//! server ([`InitParams`]: the filesystem then negotiates as it did), and then puts the
//! connection's real `/dev/fuse` file at the descriptor number fuser reads from
//! (`dup2`): fuser reads and writes that number with plain `read(2)` and `writev(2)`,
//! so from then on it serves the connection the kernel already knows, node ids, file
//! handles and passthrough backing ids included. Then [`notify_resend`] has the kernel
//! queue again the requests the dead server had read but never answered.
//!
//! The two `unsafe` calls of this module are the only ones outside `hoist-loopdev`; each
//! says why it is sound.
#![allow(unsafe_code)]

use crate::session::{fuse_config, Contents};
use fuser::{BackgroundSession, BackingId, ReplyOpen};
use rustix::net::{AddressFamily, SocketFlags, SocketType};
use serde::{Deserialize, Serialize};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// What the kernel offered a connection at INIT, kept for the servers that take it over.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitParams {
    /// The kernel's protocol minor version (major 7).
    pub minor: u32,
    /// The capability flags the kernel offered (`flags | flags2 << 32`).
    pub flags: u64,
}

/// `FUSE_INIT`.
const OP_INIT: u32 = 26;
/// `FUSE_INIT_EXT`: `flags2` is valid.
const INIT_EXT: u32 = 1 << 30;
/// `FUSE_NOTIFY_RESEND` (Linux 6.9).
const NOTIFY_RESEND: i32 = 7;
/// The capability the kernel offers when it can resend (`FUSE_HAS_RESEND`).
pub const HAS_RESEND: u64 = 1 << 39;
/// The bit a resent request carries in its unique id (`FUSE_UNIQUE_RESEND`).
pub const UNIQUE_RESEND: u64 = 1 << 63;

/// An INIT request as the kernel writes it: `fuse_in_header` (40 bytes) then
/// `fuse_init_in` (64 bytes), little-endian on every Linux target hoist runs on.
fn init_request(init: InitParams) -> Vec<u8> {
    let mut m = Vec::with_capacity(104);
    m.extend_from_slice(&104u32.to_ne_bytes()); // len
    m.extend_from_slice(&OP_INIT.to_ne_bytes()); // opcode
    m.extend_from_slice(&1u64.to_ne_bytes()); // unique
    m.extend_from_slice(&0u64.to_ne_bytes()); // nodeid
    m.extend_from_slice(&[0u8; 16]); // uid, gid, pid, padding
    m.extend_from_slice(&7u32.to_ne_bytes()); // major
    m.extend_from_slice(&init.minor.to_ne_bytes());
    m.extend_from_slice(&(1u32 << 20).to_ne_bytes()); // max_readahead
    m.extend_from_slice(&((init.flags as u32) | INIT_EXT).to_ne_bytes());
    m.extend_from_slice(&((init.flags >> 32) as u32).to_ne_bytes());
    m.extend_from_slice(&[0u8; 44]); // unused
    m
}

/// Serves `fs` on the FUSE connection whose `/dev/fuse` file is `dev` (a duplicate of
/// the one the connection was mounted with), with `threads` threads, without a second
/// INIT; then asks the kernel to resend what the previous server left unanswered.
pub fn resume_fuse<FS: fuser::Filesystem>(
    fs: FS,
    dev: OwnedFd,
    threads: usize,
    contents: Contents,
    init: InitParams,
) -> io::Result<BackgroundSession> {
    let (ours, theirs) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::io::write(&ours, &init_request(init))?;
    let config = fuse_config(String::new(), threads, contents);
    let session = fuser::Session::from_fd(fs, theirs, config.acl, config)?;
    // fuser's INIT reply, which nobody needs: the kernel has its own from the first
    // server.
    let mut reply = [0u8; 256];
    rustix::io::read(&ours, &mut reply)?;
    let target = session.as_fd().as_raw_fd();
    // SAFETY: `target` is the descriptor of fuser's channel, open for as long as
    // `session` lives; wrapping it for `dup2` without dropping it (ManuallyDrop) neither
    // closes it nor lets it be closed twice. `dup2` atomically makes the number refer to
    // the connection's `/dev/fuse` file instead of the socket: fuser, which has only
    // read the INIT from it and keeps no other state about the descriptor, serves the
    // connection from then on.
    let mut slot = std::mem::ManuallyDrop::new(unsafe { OwnedFd::from_raw_fd(target) });
    rustix::io::dup2(&dev, &mut slot)?;
    let session = session.spawn()?;
    notify_resend(dev.as_fd())?;
    Ok(session)
}

/// Has the kernel queue again every request of the connection that a server read and
/// did not answer (`FUSE_NOTIFY_RESEND`): a header with no body, written to `dev`.
pub fn notify_resend(dev: BorrowedFd<'_>) -> io::Result<()> {
    let mut m = Vec::with_capacity(16);
    m.extend_from_slice(&16u32.to_ne_bytes());
    m.extend_from_slice(&NOTIFY_RESEND.to_ne_bytes());
    m.extend_from_slice(&0u64.to_ne_bytes());
    rustix::io::write(dev, &m)?;
    Ok(())
}

/// Takes ownership of a passthrough backing id a previous server of this connection
/// registered (or that [`BackingId::into_raw`] released), so that an open of the same
/// inode replies with the same backing file, as the kernel requires while the inode has
/// passthrough opens.
pub(crate) fn adopt_backing(reply: &ReplyOpen, raw: u32) -> BackingId {
    // SAFETY: `raw` was returned by FUSE_DEV_IOC_BACKING_OPEN on this connection (by this
    // process or its predecessor, whose record of it this process read), and is closed
    // only when the inode's last open is released, which is when the id is dropped here.
    unsafe { reply.wrap_backing(raw) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_synthetic_init_is_what_the_kernel_writes() {
        let m = init_request(InitParams {
            minor: 45,
            flags: HAS_RESEND | 1,
        });
        assert_eq!(m.len(), 104);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 104);
        assert_eq!(u32::from_ne_bytes(m[4..8].try_into().unwrap()), OP_INIT);
        assert_eq!(u32::from_ne_bytes(m[44..48].try_into().unwrap()), 45);
        assert_eq!(
            u32::from_ne_bytes(m[52..56].try_into().unwrap()),
            1 | INIT_EXT
        );
        assert_eq!(u32::from_ne_bytes(m[56..60].try_into().unwrap()), 1 << 7);
    }
}
