//! The daemon's local API: one JSON request per line on a unix socket, one JSON answer
//! line back. Requests ([`Request`]), replies ([`Reply`]), statistics ([`Stats`]) and
//! errors ([`DaemonError`]) are Rust types shared by the daemon and its [`Client`]. The socket is `$HOIST_HOME/daemon.sock`, mode 0600 (root only): requests
//! may carry registry credentials.

use hoist_cache::prefetch::PrefetchState;
/// A process about to start on a mount ([`Request::WillRun`]).
pub use hoist_cache::Process;
use hoist_cache::{PruneReport, StoreStats};
use hoist_reader::trace::Trace;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// How a mount is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// hoist's FUSE filesystem serves the tree.
    Fuse,
    /// The kernel's EROFS serves the tree; hoist serves the blob devices.
    Erofs,
}

/// What to fetch in the background after mounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Prefetch {
    /// Nothing: data comes when read.
    None,
    /// The chunks of the start-up trace (the mount's, else the image's), if any.
    Trace,
    /// The trace's chunks first, then every chunk of the image, behind the readers.
    All,
}

/// Registry options of a mount (credentials travel only over the root-only socket and
/// are never written to disk).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RegistryOptions {
    /// Plain HTTP.
    pub plain_http: bool,
    /// `USER:PASSWORD`.
    pub creds: Option<String>,
    /// Resends after transient errors.
    pub retries: u32,
    /// Stall timeout, seconds.
    pub timeout_secs: u64,
    /// containerd's registry host files (mirrors, CAs, client certificates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts_dir: Option<PathBuf>,
}

/// A mount request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountSpec {
    /// `docker://…` or `oci:DIR:TAG`.
    pub image: String,
    /// Where to mount (an existing directory; made absolute by the client).
    pub mountpoint: PathBuf,
    /// How to serve it.
    pub mode: Mode,
    /// Background prefetch.
    pub prefetch: Prefetch,
    /// The chunk cache directory.
    pub cache_dir: PathBuf,
    /// Size limit of the chunk cache, bytes.
    pub cache_max_bytes: u64,
    /// Seconds a read waits for data before failing with EIO.
    pub read_timeout_secs: u64,
    /// Use FUSE passthrough for cached files when the kernel offers it.
    pub passthrough: bool,
    /// Compressed bytes a miss fetches at least (following chunks of the same blob).
    pub fetch_min_bytes: u64,
    /// A metadata layer larger than this is read on demand (fuse mode, format version
    /// 3); a smaller one whole, at mount.
    #[serde(default = "default_meta_whole_max")]
    pub meta_whole_max_bytes: u64,
    /// How to reach the registry.
    pub registry: RegistryOptions,
    /// A start-up trace (or file list) to prefetch instead of the one the image carries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<Trace>,
    /// Record the chunks the workload reads (see [`Request::Trace`]); the mount keeps the
    /// kernel's default readahead window so the record holds what was read.
    #[serde(default)]
    pub record: bool,
    /// Honour the image's setuid bits (no `nosuid`). Only for a mount point under a
    /// directory only root can enter, such as a container's; refused elsewhere.
    #[serde(default)]
    pub suid: bool,
    /// Let the image's device nodes be opened (no `nodev`); as for `suid`.
    #[serde(default)]
    pub dev: bool,
}

/// The default of [`MountSpec::meta_whole_max_bytes`]: 1 MiB, which costs less than
/// about 4 round trips of 20 ms at 100 Mbit/s.
pub const DEFAULT_META_WHOLE_MAX: u64 = 1 << 20;

fn default_meta_whole_max() -> u64 {
    DEFAULT_META_WHOLE_MAX
}

impl MountSpec {
    /// What the mount grants beyond reading and executing.
    pub fn privileges(&self) -> hoist_fs::Privileges {
        hoist_fs::Privileges {
            suid: self.suid,
            dev: self.dev,
        }
    }
}

/// A request to the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Is it alive?
    Ping,
    /// Mount an image.
    Mount(Box<MountSpec>),
    /// Unmount (lazily: succeeds on a busy mount).
    Umount {
        /// The mount point.
        mountpoint: PathBuf,
    },
    /// The chunks and files read so far on a mount started with `record`, in order,
    /// as a start-up trace.
    Trace {
        /// The mount point.
        mountpoint: PathBuf,
    },
    /// Statistics of a mount.
    Stat {
        /// The mount point.
        mountpoint: PathBuf,
    },
    /// A process is about to start on a mount: the files it reads first are fetched
    /// before it starts.
    WillRun {
        /// The mount point.
        mountpoint: PathBuf,
        /// The process.
        process: Process,
    },
    /// Every mount.
    List,
    /// Usage of a chunk cache.
    CacheStat {
        /// The cache directory.
        cache_dir: PathBuf,
    },
    /// Evict views and chunks no mount uses (with `mounted_too`, then chunks of
    /// mounted images, least recently used first) until the cache holds at most
    /// `max_bytes`.
    CachePrune {
        /// The cache directory.
        cache_dir: PathBuf,
        /// Bytes to keep at most.
        max_bytes: u64,
        /// Whether chunks of mounted images may go too.
        #[serde(default)]
        mounted_too: bool,
    },
    /// Unmount everything and exit.
    Shutdown,
}

/// Shows the enums as they are written on the wire (lowercase).
macro_rules! display_as_wire {
    ($($t:ty { $($v:ident => $s:literal),* $(,)? })*) => {$(
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(match self { $(Self::$v => $s),* })
            }
        }
    )*};
}

display_as_wire! {
    Mode { Fuse => "fuse", Erofs => "erofs" }
    MountState { Ready => "ready", Gone => "gone" }
    Devices { None => "none", Loop => "loop", Views => "views", Files => "files" }
    TraceSource { Image => "image", Mount => "mount", None => "none" }
}

/// What the daemon says of itself (`ping`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonInfo {
    /// Its process id.
    pub pid: u32,
    /// Seconds it has run.
    pub uptime_secs: f64,
    /// Its state root.
    pub home: PathBuf,
    /// The hoist version it runs.
    pub version: String,
    /// The holder keeping its mounts' connections, and its count of takeovers (none for
    /// a server without one).
    #[serde(default)]
    pub holder: Option<crate::holder::HolderInfo>,
}

/// The answer to a mount request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Mounted {
    /// The mount's statistics at the moment it became usable.
    pub stats: Stats,
    /// The image's config document (OCI image config: env, entrypoint, cmd, user…),
    /// checked against its digest.
    pub config: serde_json::Value,
}

/// Whether the kernel still has a mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MountState {
    /// Served.
    Ready,
    /// The kernel mount went away without hoist (unmounted by hand).
    Gone,
}

/// What the kernel reads an erofs mount's blobs through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Devices {
    /// Not an erofs mount.
    None,
    /// Loop devices, each on its blob's view or on hoist's device file.
    Loop,
    /// The mount was made over the blobs' views on the local disk.
    Views,
    /// hoist's device files themselves (no loop devices could be had).
    Files,
}

/// Where the start-up trace a mount prefetches came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TraceSource {
    /// The image carries it.
    Image,
    /// The mount request gave it.
    Mount,
    /// There is none.
    None,
}

/// What `hoist stat` shows of a mount.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stats {
    /// Mount point.
    pub mountpoint: PathBuf,
    /// Image reference.
    pub image: String,
    /// Manifest digest.
    pub manifest: String,
    /// Serving mode.
    pub mode: Mode,
    /// Whether the kernel still has it.
    pub state: MountState,
    /// Seconds from the request to a usable mount.
    pub mount_secs: f64,
    /// Mount points bound to the served image, this one included: the counters are the
    /// image's, shared by all of them.
    #[serde(default)]
    pub mountpoints: u64,
    /// Bytes of the metadata blob read: all of it when it is read whole at mount, else
    /// what was fetched so far (metadata read on demand).
    pub meta_bytes: u64,
    /// Bytes of the metadata blob (the layer).
    #[serde(default)]
    pub meta_layer_bytes: u64,
    /// Compressed bytes of all data blobs.
    pub blob_bytes: u64,
    /// Chunks the image's files use.
    pub chunks_total: u64,
    /// Chunks in the local cache.
    pub chunks_cached: u64,
    /// Uncompressed bytes of all chunks.
    pub bytes_total: u64,
    /// Uncompressed bytes in the cache.
    pub bytes_cached: u64,
    /// Compressed bytes fetched by ranged reads.
    pub bytes_fetched: u64,
    /// Ranged reads sent.
    pub requests: u64,
    /// Chunk reads served from the cache.
    pub cache_hits: u64,
    /// Chunk reads that waited for a fetch.
    pub cache_misses: u64,
    /// Failed ranged reads or chunks.
    pub fetch_errors: u64,
    /// Reads that gave up waiting (EIO).
    pub timeouts: u64,
    /// Chunks a source answered damaged (discarded, and fetched again on their own).
    #[serde(default)]
    pub corrupt: u64,
    /// Readahead jobs started for readers going forward through a blob.
    #[serde(default)]
    pub readaheads: u64,
    /// Libraries fetched because a program that loads them was read, before the
    /// loader asked for them.
    #[serde(default)]
    pub libraries: u64,
    /// Python modules fetched because a module that imports them was read, before
    /// the interpreter asked for them.
    #[serde(default)]
    pub modules: u64,
    /// Files fetched because a process about to start reads them first (its program,
    /// the files its arguments name, the C library's files python's start reads:
    /// `hoist run` says what it runs), before it read them.
    #[serde(default)]
    pub process_files: u64,
    /// Chunks the cache evicted (all mounts of the cache: past `--cache-size`, chunks
    /// of mounted images go too, least recently used first).
    #[serde(default)]
    pub cache_evictions: u64,
    /// Evicted chunks fetched again (all mounts of the cache).
    #[serde(default)]
    pub cache_refetches: u64,
    /// Read requests that reached hoist.
    pub reads: u64,
    /// Bytes those returned.
    pub read_bytes: u64,
    /// Reads answered with EIO.
    pub read_errors: u64,
    /// Requests the kernel sent this server again after its predecessor died without
    /// answering them (a takeover).
    #[serde(default)]
    pub resent: u64,
    /// Whether FUSE passthrough is on.
    pub passthrough: bool,
    /// Opens served by passthrough.
    pub passthrough_opens: u64,
    /// Views built (cached chunks copied into one file for the kernel).
    pub views_built: u64,
    /// Views found on disk and verified before the kernel first read them.
    #[serde(default)]
    pub views_verified: u64,
    /// Views found damaged on disk: removed and built again, never served.
    #[serde(default)]
    pub views_damaged: u64,
    /// erofs mode: whether the kernel reads every blob from its view on the local disk,
    /// and the metadata from its local file, not through hoist: the image was fully
    /// cached when it was mounted, or every blob's view and the metadata's file have
    /// been swapped in behind their loop devices since.
    pub local_devices: bool,
    /// erofs mode: whether the kernel reads the metadata from a file on the local disk,
    /// not through hoist's `meta` device file (metadata read on demand moves there once
    /// all of it is read).
    #[serde(default)]
    pub meta_local: bool,
    /// erofs mode: what the kernel reads the blobs through.
    pub devices: Devices,
    /// erofs mode: blobs read from their views on the local disk.
    pub devices_local: u64,
    /// erofs mode: blobs (devices) of the image.
    pub devices_total: u64,
    /// Background prefetch.
    pub prefetch: PrefetchStats,
    /// How long the read requests that reached hoist took to answer.
    #[serde(default)]
    pub read_latency: LatencyStats,
}

/// A latency histogram.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LatencyStats {
    /// Upper bounds of the buckets, seconds.
    pub bounds_secs: Vec<f64>,
    /// Requests per bucket (not cumulative); one more than the bounds: longer ones.
    pub counts: Vec<u64>,
    /// Sum of all latencies, seconds.
    pub sum_secs: f64,
}

/// Prefetch progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrefetchStats {
    /// Where it is.
    pub state: PrefetchState,
    /// Chunks cached of the list.
    pub done: u64,
    /// Chunks in the list.
    pub total: u64,
    /// Chunks of the start-up trace, fetched first.
    pub trace_chunks: u64,
    /// Where the trace came from.
    pub trace: TraceSource,
    /// Metadata chunks of the trace (metadata read on demand), fetched before anything
    /// asks for them.
    #[serde(default)]
    pub trace_meta_chunks: u64,
    /// Whether those have been fetched.
    #[serde(default)]
    pub trace_meta_done: bool,
    /// Views built after the chunks (`--prefetch all`).
    pub views_done: u64,
    /// Views to build.
    pub views_total: u64,
    /// Views that could not be built.
    pub views_failed: u64,
}

/// A successful answer: one variant per request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", content = "value", rename_all = "snake_case")]
pub enum Reply {
    /// To [`Request::Ping`].
    Pong(DaemonInfo),
    /// To [`Request::Mount`].
    Mounted(Box<Mounted>),
    /// To [`Request::Umount`].
    Unmounted,
    /// To [`Request::Trace`].
    Trace(Box<Trace>),
    /// To [`Request::Stat`].
    Stat(Box<Stats>),
    /// To [`Request::WillRun`]: the fetching has started.
    WillRun,
    /// To [`Request::List`].
    List(Vec<Stats>),
    /// To [`Request::CacheStat`].
    CacheStat(StoreStats),
    /// To [`Request::CachePrune`].
    CachePruned(PruneReport),
    /// To [`Request::Shutdown`].
    ShuttingDown,
}

/// Why the daemon refused a request. The kinds are those a gRPC front end (the
/// containerd snapshotter) maps to its status codes; the message names the object and,
/// where there is one, the fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", content = "message", rename_all = "snake_case")]
pub enum DaemonError {
    /// The mount (or other object) named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// It exists already (the mount point is mounted).
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is wrong: a bad reference, a mount point that is no directory,
    /// privileges refused where they are not safe, an image hoist cannot serve.
    #[error("{0}")]
    InvalidArgument(String),
    /// Something the daemon depends on did not answer: the registry, the disk.
    #[error("{0}")]
    Unavailable(String),
    /// The daemon failed on its own (a kernel call, a bug): see its log.
    #[error("{0}")]
    Internal(String),
}

/// The daemon's answer on the wire, one JSON line: `{"Ok":{"reply":…}}` or
/// `{"Err":{"kind":…,"message":…}}`.
pub type Response = Result<Reply, DaemonError>;

/// Errors talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No daemon listens.
    #[error("no hoist daemon at {path}: {source}")]
    NotRunning {
        /// The socket.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The exchange failed.
    #[error("talking to the hoist daemon: {0}")]
    Io(#[from] std::io::Error),
    /// The daemon answered with something this client does not understand (a daemon of
    /// another version).
    #[error("the hoist daemon answered {0} (a daemon of another version? `hoist daemon stop`)")]
    Protocol(String),
    /// The daemon refused the request.
    #[error(transparent)]
    Refused(#[from] DaemonError),
}

/// A connection to the daemon.
pub struct Client {
    stream: BufReader<UnixStream>,
}

/// Unwraps the reply variant a request expects, or says what came instead.
macro_rules! expect {
    ($reply:expr, $pat:pat => $out:expr) => {
        match $reply {
            $pat => Ok($out),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    };
}

impl Client {
    /// Connects to the daemon listening on `socket`.
    pub fn connect(socket: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(socket).map_err(|source| ClientError::NotRunning {
            path: socket.display().to_string(),
            source,
        })?;
        Ok(Client {
            stream: BufReader::new(stream),
        })
    }

    /// Sends a request and waits for its answer.
    pub fn call(&mut self, req: &Request) -> Result<Reply, ClientError> {
        let mut line = serde_json::to_vec(req).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.stream.get_mut().write_all(&line)?;
        let mut answer = String::new();
        if self.stream.read_line(&mut answer)? == 0 {
            return Err(ClientError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the daemon closed the connection (see $HOIST_HOME/daemon.log)",
            )));
        }
        let resp: Response = serde_json::from_str(&answer)
            .map_err(|e| ClientError::Protocol(format!("{e}: {}", answer.trim())))?;
        Ok(resp?)
    }

    /// The daemon's pid, uptime and version.
    pub fn ping(&mut self) -> Result<DaemonInfo, ClientError> {
        expect!(self.call(&Request::Ping)?, Reply::Pong(i) => i)
    }

    /// Mounts an image; returns once the mount is usable.
    pub fn mount(&mut self, spec: MountSpec) -> Result<Mounted, ClientError> {
        expect!(self.call(&Request::Mount(Box::new(spec)))?, Reply::Mounted(m) => *m)
    }

    /// Unmounts (lazily).
    pub fn umount(&mut self, mountpoint: &Path) -> Result<(), ClientError> {
        let req = Request::Umount {
            mountpoint: mountpoint.to_path_buf(),
        };
        expect!(self.call(&req)?, Reply::Unmounted => ())
    }

    /// What a recording mount read so far, as a start-up trace.
    pub fn trace(&mut self, mountpoint: &Path) -> Result<Trace, ClientError> {
        let req = Request::Trace {
            mountpoint: mountpoint.to_path_buf(),
        };
        expect!(self.call(&req)?, Reply::Trace(t) => *t)
    }

    /// Statistics of a mount.
    pub fn stat(&mut self, mountpoint: &Path) -> Result<Stats, ClientError> {
        let req = Request::Stat {
            mountpoint: mountpoint.to_path_buf(),
        };
        expect!(self.call(&req)?, Reply::Stat(s) => *s)
    }

    /// Tells the daemon a process is about to start on mount `mountpoint`, so that it
    /// fetches the process's program and script now; returns at once.
    pub fn will_run(&mut self, mountpoint: &Path, process: Process) -> Result<(), ClientError> {
        let req = Request::WillRun {
            mountpoint: mountpoint.to_path_buf(),
            process,
        };
        expect!(self.call(&req)?, Reply::WillRun => ())
    }

    /// Every mount.
    pub fn list(&mut self) -> Result<Vec<Stats>, ClientError> {
        expect!(self.call(&Request::List)?, Reply::List(l) => l)
    }

    /// Usage of a chunk cache.
    pub fn cache_stat(&mut self, cache_dir: &Path) -> Result<StoreStats, ClientError> {
        let req = Request::CacheStat {
            cache_dir: cache_dir.to_path_buf(),
        };
        expect!(self.call(&req)?, Reply::CacheStat(s) => s)
    }

    /// Evicts views and chunks no mount uses (with `mounted_too`, then chunks of
    /// mounted images) down to `max_bytes`.
    pub fn cache_prune(
        &mut self,
        cache_dir: &Path,
        max_bytes: u64,
        mounted_too: bool,
    ) -> Result<PruneReport, ClientError> {
        let req = Request::CachePrune {
            cache_dir: cache_dir.to_path_buf(),
            max_bytes,
            mounted_too,
        };
        expect!(self.call(&req)?, Reply::CachePruned(r) => r)
    }

    /// Unmounts everything and stops the daemon.
    pub fn shutdown(&mut self) -> Result<(), ClientError> {
        expect!(self.call(&Request::Shutdown)?, Reply::ShuttingDown => ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_and_errors_round_trip_as_one_json_line() {
        let answers: Vec<Response> = vec![
            Ok(Reply::Unmounted),
            Ok(Reply::List(vec![])),
            Ok(Reply::Pong(DaemonInfo {
                pid: 7,
                uptime_secs: 1.5,
                home: "/var/lib/hoist".into(),
                version: "0.1.0".into(),
                holder: None,
            })),
            Err(DaemonError::AlreadyExists("/mnt is already mounted".into())),
        ];
        for a in answers {
            let line = serde_json::to_string(&a).unwrap();
            assert!(!line.contains('\n'));
            let back: Response = serde_json::from_str(&line).unwrap();
            assert_eq!(format!("{back:?}"), format!("{a:?}"));
        }
        let e: Response =
            serde_json::from_str(r#"{"Err":{"kind":"not_found","message":"/m"}}"#).unwrap();
        assert_eq!(e.unwrap_err(), DaemonError::NotFound("/m".into()));
    }
}
