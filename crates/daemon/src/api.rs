//! The daemon's local API: one JSON request per line on a unix socket, one JSON response
//! line back. The socket is `$HOIST_HOME/daemon.sock`, mode 0600 (root only): requests
//! may carry registry credentials.

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
    /// How to reach the registry.
    pub registry: RegistryOptions,
    /// A start-up trace (or file list) to prefetch instead of the one the image carries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<hoist_reader::trace::Trace>,
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
    /// Every mount.
    List,
    /// Usage of a chunk cache.
    CacheStat {
        /// The cache directory.
        cache_dir: PathBuf,
    },
    /// Evict chunks no mount uses until the cache holds at most `max_bytes`.
    CachePrune {
        /// The cache directory.
        cache_dir: PathBuf,
        /// Bytes to keep at most.
        max_bytes: u64,
    },
    /// Unmount everything and exit.
    Shutdown,
}

/// A response: `{"ok":true,"result":…}` or `{"ok":false,"error":"…"}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// The error message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

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
    /// The daemon refused the request.
    #[error("{0}")]
    Refused(String),
}

/// A connection to the daemon.
pub struct Client {
    stream: BufReader<UnixStream>,
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

    /// Sends a request and waits for its response.
    pub fn call(&mut self, req: &Request) -> Result<serde_json::Value, ClientError> {
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
        let resp: Response = serde_json::from_str(&answer).map_err(std::io::Error::other)?;
        if resp.ok {
            Ok(resp.result.unwrap_or(serde_json::Value::Null))
        } else {
            Err(ClientError::Refused(resp.error.unwrap_or_default()))
        }
    }
}
