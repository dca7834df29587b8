//! Mounting a FUSE filesystem of hoist's: options shared by both filesystems.

use crate::kernel::Privileges;
use fuser::{Config, KernelConfig, MountOption, SessionACL};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// How long the kernel may cache entries and attributes: the image never changes.
pub(crate) const TTL: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);

/// Counters of a mounted filesystem.
#[derive(Debug, Default, serde::Serialize)]
pub struct FsCounters {
    /// Read requests that reached hoist.
    pub reads: AtomicU64,
    /// Bytes they returned.
    pub read_bytes: AtomicU64,
    /// Reads answered with EIO.
    pub read_errors: AtomicU64,
    /// Opens handed to the kernel by FUSE passthrough.
    pub passthrough_opens: AtomicU64,
    /// Whether the kernel offered passthrough (1) or not (0).
    pub passthrough_available: AtomicU64,
    /// Requests the kernel sent again after a server died without answering them.
    pub resent: AtomicU64,
    /// The kernel's protocol minor version, from INIT.
    #[serde(skip)]
    pub kernel_minor: AtomicU64,
    /// The capabilities the kernel offered at INIT.
    #[serde(skip)]
    pub kernel_flags: AtomicU64,
    /// How long read requests took to answer.
    #[serde(skip)]
    pub read_latency: Latency,
}

/// Upper bounds of the read-latency buckets, in seconds: from a page-cache-speed answer
/// to a fetch that waits on a slow registry (the read bound is 30 s).
pub const LATENCY_BOUNDS: [f64; 12] = [
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0,
];

/// A histogram of latencies over [`LATENCY_BOUNDS`] (one more bucket for longer ones).
#[derive(Debug, Default)]
pub struct Latency {
    counts: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Latency {
    /// Counts one latency.
    pub fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        let k = LATENCY_BOUNDS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.counts[k].fetch_add(1, Relaxed);
        self.sum_nanos
            .fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    /// The count of each bucket (not cumulative; the last is beyond the bounds) and the
    /// sum, in seconds.
    pub fn snapshot(&self) -> (Vec<u64>, f64) {
        (
            self.counts.iter().map(|c| c.load(Relaxed)).collect(),
            self.sum_nanos.load(Relaxed) as f64 / 1e9,
        )
    }
}

impl FsCounters {
    /// What the kernel offered at INIT (zero before it), for a successor.
    pub fn init_params(&self) -> crate::takeover::InitParams {
        crate::takeover::InitParams {
            minor: self.kernel_minor.load(Relaxed) as u32,
            flags: self.kernel_flags.load(Relaxed),
        }
    }

    /// Counts `req` if the kernel resent it to this server after its predecessor died.
    pub(crate) fn note(&self, req: &fuser::Request) {
        if req.unique().0 & crate::takeover::UNIQUE_RESEND != 0 {
            self.resent.fetch_add(1, Relaxed);
        }
    }
}

impl FsCounters {
    /// Answers a read request of `size` bytes: `fill` writes the data into a buffer
    /// and returns its length. The buffer is the thread's own and reused, so a large
    /// read costs no allocation and no page faults.
    pub(crate) fn reply_read(
        &self,
        size: u32,
        reply: fuser::ReplyData,
        fill: impl FnOnce(&mut [u8]) -> Result<usize, fuser::Errno>,
    ) {
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        // The kernel asks for at most max_read (1 MiB); bound it all the same.
        let size = (size as usize).min(MAX_READ);
        let t0 = std::time::Instant::now();
        BUF.with(|b| {
            let mut b = b.borrow_mut();
            if b.len() < size {
                b.resize(size, 0);
            }
            let filled = fill(&mut b[..size]);
            self.read_latency.observe(t0.elapsed());
            match filled {
                Ok(n) => {
                    self.reads.fetch_add(1, Relaxed);
                    self.read_bytes.fetch_add(n as u64, Relaxed);
                    reply.data(&b[..n])
                }
                Err(e) => {
                    self.read_errors.fetch_add(1, Relaxed);
                    reply.error(e)
                }
            }
        })
    }
}

/// The largest read hoist answers in one reply.
const MAX_READ: usize = 16 << 20;

/// Negotiates the connection: large requests, cached symlinks and directories, and
/// passthrough when `passthrough` and the kernel offers it. Returns whether passthrough
/// is on.
///
/// With `readdirplus`, every directory read is a `READDIRPLUS` (not the kernel's "auto"
/// heuristic, which reads a directory's later batches without attributes and then looks
/// up each of their entries: 3,293 `LOOKUP`s in one `tar` of debian-python's tree after
/// dropping caches, gone when every batch carries its entries' attributes).
pub(crate) fn negotiate(
    config: &mut KernelConfig,
    counters: &FsCounters,
    passthrough: bool,
    readdirplus: bool,
) -> bool {
    use fuser::InitFlags as F;
    let caps = config.capabilities();
    counters
        .kernel_minor
        .store(u64::from(config.kernel_abi().1), Relaxed);
    counters.kernel_flags.store(caps.bits(), Relaxed);
    let mut wanted =
        F::FUSE_CACHE_SYMLINKS | F::FUSE_PARALLEL_DIROPS | F::FUSE_MAX_PAGES | F::FUSE_ASYNC_READ;
    if readdirplus {
        wanted |= F::FUSE_DO_READDIRPLUS;
    }
    let _ = config.add_capabilities(wanted & caps);
    // The largest read requests the kernel allows (1 MiB on current kernels).
    if let Err(max) = config.set_max_readahead(1 << 20) {
        let _ = config.set_max_readahead(max);
    }
    if let Err(max) = config.set_max_write(1 << 20) {
        let _ = config.set_max_write(max);
    }
    let _ = config.set_max_background(64);
    if passthrough && caps.contains(F::FUSE_PASSTHROUGH) {
        // Depth 1: backing files are on a plain filesystem (the cache), and overlayfs can
        // still stack on this mount (a container's writable layer).
        if config.add_capabilities(F::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok()
        {
            return true;
        }
    }
    false
}

/// What a FUSE mount of hoist's serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contents {
    /// An image's tree, granting `Privileges` (`nosuid,nodev` unless it serves a
    /// container).
    Tree(Privileges),
    /// Blob device files, read by the kernel only: `nosuid,nodev,noexec`.
    Devices,
}

/// A FUSE mount of hoist's being served.
pub struct FuseMount {
    /// The session serving it; dropping it unmounts (lazily).
    pub session: fuser::BackgroundSession,
    /// A duplicate of the connection's `/dev/fuse` file, to hand to the holder so that
    /// the connection outlives this process ([`crate::takeover`]).
    pub dev: std::os::fd::OwnedFd,
}

/// fuser's configuration of a hoist mount named `name` with `threads` threads.
///
/// The threads share the connection's one `/dev/fuse` file (no `FUSE_DEV_IOC_CLONE`):
/// requests in flight on a cloned file end with ECONNABORTED when its last holder dies,
/// even if the connection lives on, while those on the shared file wait for the next
/// server ([`crate::takeover`]).
pub(crate) fn fuse_config(name: String, threads: usize, contents: Contents) -> Config {
    let (privileges, exec) = match contents {
        Contents::Tree(p) => (p, MountOption::Exec),
        Contents::Devices => (Privileges::NONE, MountOption::NoExec),
    };
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(name),
        MountOption::Subtype("hoist".into()),
        MountOption::RO,
        MountOption::DefaultPermissions,
        if privileges.dev {
            MountOption::Dev
        } else {
            MountOption::NoDev
        },
        if privileges.suid {
            MountOption::Suid
        } else {
            MountOption::NoSuid
        },
        exec,
        MountOption::NoAtime,
    ];
    // Every user may read the image (a container's processes run as their own users);
    // the kernel checks permissions from the image's modes (default_permissions).
    config.acl = SessionACL::All;
    config.n_threads = Some(threads.max(1));
    config.clone_fd = false;
    config
}

/// Mounts `fs` read-only at `mountpoint`, served by `threads` threads, reading ahead
/// `readahead_kib` ([`crate::kernel::readahead_kib`]).
pub fn mount_fuse<FS: fuser::Filesystem>(
    fs: FS,
    mountpoint: &Path,
    name: &str,
    threads: usize,
    readahead_kib: u32,
    contents: Contents,
) -> std::io::Result<FuseMount> {
    let config = fuse_config(name.to_string(), threads, contents);
    let session = fuser::Session::new(fs, mountpoint, &config)?;
    let dev = rustix::io::fcntl_dupfd_cloexec(std::os::fd::AsFd::as_fd(&session), 0)?;
    let session = session.spawn()?;
    crate::kernel::set_readahead(mountpoint, readahead_kib);
    Ok(FuseMount { session, dev })
}
