//! Command-line arguments: plain data, parsed by clap.

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// hoist: container images that start lazily.
///
/// Images are named as `oci:DIR[:TAG]` (an OCI image layout, as skopeo and umoci use) or
/// `docker://HOST[:PORT]/REPO[:TAG][@sha256:DIGEST]` (an image in a registry).
///
/// State (the conversion cache, spooled layers) lives under $HOIST_HOME, or /var/lib/hoist
/// when it is not set.
#[derive(Debug, Parser)]
#[command(name = "hoist", version, about, long_about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// How to reach registries.
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// Options for `docker://` images, accepted by every command.
#[derive(Debug, Clone, clap::Args)]
pub struct RegistryArgs {
    /// Talk plain HTTP to registries (for a registry on loopback or a trusted network).
    #[arg(long, global = true)]
    pub plain_http: bool,
    /// Registry credentials. Without them, credentials come from $REGISTRY_AUTH_FILE,
    /// $XDG_RUNTIME_DIR/containers/auth.json or ~/.docker/config.json (docker/skopeo login).
    #[arg(long, value_name = "USER:PASSWORD", global = true)]
    pub creds: Option<String>,
    /// Resends of a registry request after a connection error, a timeout, 429 or 5xx.
    #[arg(long, default_value_t = 5, global = true)]
    pub retries: u32,
    /// Seconds a registry may keep a request without sending anything before it is
    /// abandoned (and retried).
    #[arg(long, value_name = "SECONDS", default_value_t = 30, global = true)]
    pub timeout: u64,
    /// containerd's registry host files, one `HOST[:PORT]/hosts.toml` per registry (as
    /// containerd's `config_path`): mirrors tried first, a registry's own CA, client
    /// certificates, `skip_verify`, plain HTTP for an `http://` host. A directory that
    /// does not exist reads as empty.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/etc/containerd/certs.d",
        global = true
    )]
    pub hosts_dir: PathBuf,
}

/// Chunk compressor.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CompressorArg {
    /// Zstandard (level 3): the best ratio at gzip-decoding speed.
    Zstd,
    /// LZ4: fastest to decode, larger.
    Lz4,
    /// Stored uncompressed.
    None,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Convert an OCI image (gzip, zstd or plain tar layers) into a hoist image.
    ///
    /// SRC and DST may be image layouts or registries (docker://...). Conversion is
    /// incremental: the state after each layer is cached under $HOIST_HOME/convert, keyed by
    /// the options and the layers so far, so converting a new version of an image only
    /// converts the layers above the ones it shares with an earlier conversion.
    ///
    /// Writes one data blob per layer (deduplicated, compressed chunks), a metadata blob
    /// (an EROFS image of the merged tree plus the chunk tables), the original config, and
    /// a manifest tagged in DST. The source config is kept (env, cmd, entrypoint, history);
    /// only its `rootfs.diff_ids` name the new layers (the source's are checked against the
    /// uncompressed layers first). Trees that `check` and `mount` would refuse (nested 4096
    /// directories deep) are refused. Prints a one-line summary; `--json` prints a report.
    Convert(ConvertArgs),
    /// Materialise the root filesystem of a hoist image in a new or empty directory.
    ///
    /// A failed unpack leaves nothing behind: a directory it made is removed, an empty
    /// one it was given is emptied again.
    Unpack {
        /// The hoist image (oci:DIR:TAG or docker://HOST/REPO:TAG).
        image: String,
        /// Target directory.
        dir: PathBuf,
    },
    /// Verify a hoist image: metadata, every file's chunks, every chunk's digest.
    ///
    /// Exits non-zero and names the first bad chunk, blob and file on corruption.
    Check {
        /// The hoist image (oci:DIR:TAG or docker://HOST/REPO:TAG).
        image: String,
    },
    /// Show layers, blobs, files, chunks, dedup ratio and sizes of a hoist image.
    Inspect {
        /// The hoist image (oci:DIR:TAG or docker://HOST/REPO:TAG).
        image: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write the files the kernel needs to mount a hoist image without hoist.
    ///
    /// DIR receives `meta.erofs` (the metadata blob) and `NNN-<digest>.img` per data blob, NNN
    /// being its device number (1-based; pass them as device= in that order), holding its
    /// uncompressed address space, sparse). Prints a mount command using loop devices.
    /// A failed export leaves nothing new behind.
    Export {
        /// The hoist image (oci:DIR:TAG or docker://HOST/REPO:TAG).
        image: String,
        /// Output directory (new or empty).
        dir: PathBuf,
    },
    /// Mount a hoist image lazily: usable as soon as its metadata is read; file data is
    /// fetched by ranged reads when first read, verified, and cached in the chunk cache.
    ///
    /// Without --foreground the mount is served by the hoist daemon (started on demand,
    /// one per $HOIST_HOME; log in $HOIST_HOME/daemon.log), and the command returns once
    /// the mount is usable. A read whose data cannot be fetched within --read-timeout fails
    /// with EIO; cached data keeps being served when the registry is unreachable.
    Mount(MountArgs),
    /// Run a container from a hoist image, lazily: the image is mounted (as by `hoist
    /// mount`, through the daemon), an overlayfs layer on top takes the container's
    /// writes, and runc runs CMD (default: the image's entrypoint and cmd) with the
    /// image's env, working directory and user. Exits with the container's exit code;
    /// signals go to the container. The container's state lives in
    /// $HOIST_HOME/containers/NAME; --rm removes it at exit.
    ///
    /// The container shares the host's network; its root is the overlay, writable.
    Run(RunArgs),
    /// Run a command as `hoist run` does, and write which chunks and files it read, in
    /// order, as a start-up trace for `hoist convert --prefetch-trace`. The trace
    /// covers the whole run of the command: give it the start-up to record (e.g. a
    /// command that exits once the service is ready).
    Record(RecordArgs),
    /// List the containers `hoist run` made: running, detached, and stopped ones whose
    /// writable layer is kept (run without --rm). Containers whose `hoist run` was killed
    /// are stopped and unmounted first (and removed if run with --rm).
    Ps {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove containers: their writable layer and state. A running container is
    /// refused unless --force, which stops it first.
    Rm {
        /// The containers' names.
        #[arg(required = true)]
        names: Vec<String>,
        /// Stop running containers (SIGKILL) and remove them.
        #[arg(short, long)]
        force: bool,
    },
    /// Started by `hoist run` beside itself: waits until the run's process is gone, then
    /// stops and unmounts the container if the run could not.
    #[command(hide = true)]
    WatchContainer {
        /// The container.
        name: String,
    },
    /// Unmount a hoist mount. Succeeds on a busy mount (it is detached and goes away with
    /// its last user) and on a mount whose daemon died.
    Umount {
        /// The mount point.
        mountpoint: PathBuf,
    },
    /// Show what a mount fetched and cached: bytes and requests, cache hits, chunks cached
    /// of the total, prefetch progress.
    Stat {
        /// The mount point.
        mountpoint: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Inspect or shrink the chunk cache.
    Cache {
        /// What to do.
        #[command(subcommand)]
        op: CacheOp,
    },
    /// Serve containerd's snapshots API, so that containerd (and Kubernetes through it)
    /// starts hoist images lazily.
    ///
    /// Plug it into containerd as a proxy plugin (`[proxy_plugins.hoist] type =
    /// "snapshot" address = SOCKET`) and set the CRI plugin's `snapshotter = "hoist"` and
    /// `disable_snapshot_annotations = false`. A hoist image's layers are never
    /// downloaded: its snapshot mounts the image through the hoist daemon (started on
    /// demand), with the mount options below. Other images (the sandbox image too) are
    /// unpacked by containerd into overlayfs snapshots. Snapshots live in
    /// $HOIST_HOME/snapshots and survive restarts of the snapshotter and of containerd.
    Snapshotter(SnapshotterArgs),
    /// Control the hoist daemon.
    Daemon {
        /// What to do.
        #[command(subcommand)]
        op: DaemonOp,
    },
}

/// The arguments of `hoist snapshotter`.
#[derive(Debug, clap::Args)]
pub struct SnapshotterArgs {
    /// The unix socket to serve on [default: $HOIST_HOME/snapshotter.sock].
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9110): per mount,
    /// the counters of `hoist stat` and a read-latency histogram; snapshots by kind; the
    /// daemon's takeovers. Off by default.
    #[arg(long, value_name = "ADDR")]
    pub metrics_address: Option<std::net::SocketAddr>,
    /// How hoist images are served and fetched.
    #[command(flatten)]
    pub opts: MountOptions,
}

/// The arguments of `hoist mount`.
#[derive(Debug, clap::Args)]
pub struct MountArgs {
    /// The hoist image (oci:DIR:TAG or docker://HOST/REPO:TAG).
    pub image: String,
    /// An existing directory to mount it on.
    pub mountpoint: PathBuf,
    /// How to serve and fetch.
    #[command(flatten)]
    pub opts: MountOptions,
    /// Serve the mount from this process until it is unmounted or gets SIGINT/SIGTERM,
    /// instead of handing it to the background daemon.
    #[arg(long)]
    pub foreground: bool,
    /// Honour the image's setuid and setgid bits. The mount is `nosuid` without it: an
    /// image is untrusted, and a setuid-root file in it would give any local user root.
    /// Refused unless the mount point lies under a root-owned directory of mode 0700.
    #[arg(long)]
    pub suid: bool,
    /// Let the image's device nodes be opened. The mount is `nodev` without it (a device
    /// node in an image would open the host's device); refused as `--suid` is.
    #[arg(long)]
    pub dev: bool,
}

/// How a lazy mount is served and fetched: shared by `mount`, `run` and `record`.
#[derive(Debug, Clone, clap::Args)]
pub struct MountOptions {
    /// `fuse`: hoist's FUSE filesystem serves the tree (FUSE passthrough for cached
    /// files). `erofs`: the kernel's EROFS serves the tree from the metadata blob, and
    /// hoist serves only the data, as blob device files behind loop devices, until a
    /// blob's view is built (by `--prefetch all`): then the kernel reads the view from
    /// the local disk, while mounted. An image whose blob views are all built is
    /// mounted over them.
    #[arg(long, value_enum, default_value = "fuse")]
    pub mode: ModeArg,
    /// The chunk cache, shared by all mounts that name it [default: $HOIST_HOME/cache].
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Size limit of the chunk cache, views included; beyond it views are evicted,
    /// then chunks no mount uses, then chunks of mounted images (least recently used
    /// first; a start-up trace's last), which are fetched again when read: while the
    /// registry is unreachable such a read fails with EIO (suffixes K, M, G).
    #[arg(long, default_value = "20G", value_parser = parse_size)]
    pub cache_size: u64,
    /// What to fetch ahead of the reads. `trace`: the chunks of the start-up trace
    /// (--prefetch-trace or --prefetch-files, else the one the image carries, if any),
    /// in order, many requests at once. `all`: the trace first, then every chunk, then
    /// views: the image's large files (fuse) or blobs (erofs) copied whole, so that the
    /// kernel reads them without hoist (this costs a second copy of their bytes on disk).
    #[arg(long, value_enum, default_value = "trace")]
    pub prefetch: PrefetchArg,
    /// A start-up trace (from `hoist record`) to prefetch instead of the image's.
    #[arg(long, value_name = "FILE", conflicts_with = "prefetch_files")]
    pub prefetch_trace: Option<PathBuf>,
    /// Files (one path per line) to prefetch first, in order, instead of the image's trace.
    #[arg(long, value_name = "FILE")]
    pub prefetch_files: Option<PathBuf>,
    /// Seconds a read of data that is not cached waits for the registry before it fails
    /// with EIO.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub read_timeout: u64,
    /// Compressed bytes a read of uncached data fetches: its chunk, and the chunks that
    /// follow in the same blob (which hold the files that follow in the layer) as long
    /// as they fit within this size. Larger means fewer round trips for a reader that
    /// goes on, more bytes for one that does not (suffixes K, M). 64K measured best for python start-up
    /// (bench/fetch_min.py).
    #[arg(long, value_name = "BYTES", default_value = "64K", value_parser = parse_size)]
    pub fetch_min: u64,
    /// Metadata layers up to this size are fetched whole when the image is mounted; a
    /// larger one (an image of many files) is read in 64 KiB chunks as lookups need
    /// them, so the mount does not wait for all of it (images converted with format
    /// version 3; in erofs mode the kernel reads it through hoist until all of it is
    /// local; suffixes K, M). 0 reads all metadata on demand.
    #[arg(long, value_name = "BYTES", default_value = "1M", value_parser = parse_size)]
    pub meta_whole_max: u64,
    /// Never hand cached files to the kernel by FUSE passthrough (fuse mode).
    #[arg(long)]
    pub no_passthrough: bool,
}

/// The arguments of `hoist run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The hoist image (oci:DIR:TAG or docker://HOST/REPO:TAG).
    pub image: String,
    /// The command, replacing the image's cmd (its entrypoint stays, as with docker).
    #[arg(last = true, value_name = "CMD")]
    pub cmd: Vec<String>,
    /// Replace the image's entrypoint (an empty string clears it).
    #[arg(long, value_name = "PATH")]
    pub entrypoint: Option<String>,
    /// Container name (and the directory of its state) [default: hoist-<random>].
    #[arg(long)]
    pub name: Option<String>,
    /// Remove the container's writable layer and state when it exits.
    #[arg(long)]
    pub rm: bool,
    /// Give the container a terminal (stdin and stdout must be one).
    #[arg(short, long)]
    pub tty: bool,
    /// Start the container and return, printing its name: it outlives this command, its
    /// output goes to $HOIST_HOME/containers/NAME/log, and `hoist rm --force NAME` stops
    /// it. Without it, a container never outlives its `hoist run`: if the command is
    /// killed, the container is stopped and unmounted (and removed with --rm).
    #[arg(short, long, conflicts_with = "tty")]
    pub detach: bool,
    /// Extra environment, NAME=VALUE (repeatable), over the image's.
    #[arg(short, long, value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// Write timings and the mount's statistics as JSON to FILE when the container exits.
    #[arg(long, value_name = "FILE")]
    pub stats_json: Option<PathBuf>,
    /// How to serve and fetch the image.
    #[command(flatten)]
    pub opts: MountOptions,
}

/// The arguments of `hoist record`.
#[derive(Debug, clap::Args)]
pub struct RecordArgs {
    /// The hoist image (oci:DIR:TAG or docker://HOST/REPO:TAG).
    pub image: String,
    /// Where to write the trace (JSON).
    #[arg(long, value_name = "FILE")]
    pub trace_out: PathBuf,
    /// The command (as for `hoist run`).
    #[arg(last = true, value_name = "CMD")]
    pub cmd: Vec<String>,
    /// Replace the image's entrypoint (an empty string clears it).
    #[arg(long, value_name = "PATH")]
    pub entrypoint: Option<String>,
    /// Extra environment, NAME=VALUE (repeatable), over the image's.
    #[arg(short, long, value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// How to serve and fetch the image. Record in fuse mode (the default): EROFS also
    /// reads ahead through the blob devices, and the trace would hold that too. A warm
    /// cache records the same trace as a cold one.
    #[command(flatten)]
    pub opts: MountOptions,
}

/// How a mount is served.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModeArg {
    /// hoist's FUSE filesystem.
    Fuse,
    /// The kernel's EROFS over hoist's blob devices.
    Erofs,
}

/// Background prefetch.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PrefetchArg {
    /// Fetch data only when read.
    None,
    /// Fetch the start-up trace's chunks first, if there is a trace.
    Trace,
    /// Fetch the trace's chunks, then everything, then build views, in the background.
    All,
}

/// `hoist cache` operations.
#[derive(Debug, Subcommand)]
pub enum CacheOp {
    /// Chunks, views and bytes in the cache.
    Stat {
        /// The cache [default: $HOIST_HOME/cache].
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Evict views, then chunks that no mount uses, least recently used first. With
    /// --max-size, down to that size, and if that is not enough, chunks of mounted images
    /// too (least recently used first; they are fetched again when read).
    Prune {
        /// The cache [default: $HOIST_HOME/cache].
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        /// Bytes to keep at most (suffixes K, M, G). Without it, every chunk no mount
        /// uses goes, and mounted images keep theirs.
        #[arg(long, value_parser = parse_size)]
        max_size: Option<u64>,
    },
}

/// `hoist daemon` operations.
#[derive(Debug, Subcommand)]
pub enum DaemonOp {
    /// Run the daemon in this process (what `hoist mount` starts in the background): the
    /// holder, which keeps the mounts' FUSE connections and runs the server as its child,
    /// starting another at once if it dies.
    Run,
    /// The server the holder runs (not for use by hand).
    #[command(hide = true)]
    Serve,
    /// Replace the server by a new one (the binary at the same path: an upgraded hoist
    /// takes over this way), without unmounting anything: readers see a pause.
    Restart,
    /// Unmount everything the daemon serves and stop it.
    Stop,
    /// Whether a daemon runs: its holder and server (pids, uptimes, takeovers) and mounts.
    Status {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
}

/// The arguments of `hoist convert`.
#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    /// Source image, e.g. oci:./images:app-v1 or docker://registry:5000/app:v1.
    pub src: String,
    /// Destination, e.g. oci:./out:app-v1 (the layout is created if missing) or
    /// docker://registry:5000/app:v1-hoist. Prints the pushed manifest digest.
    pub dst: String,
    /// Chunk compressor.
    #[arg(long, value_enum, default_value = "zstd")]
    pub compressor: CompressorArg,
    /// Chunk size in bytes: a power of two from 4096 to 67108864 (suffixes K and M allowed).
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    pub chunk_size: u64,
    /// Frame size in bytes: files up to an eighth of it are packed, in layer order, into
    /// compressed frames of up to this size, so the compressor sees across them and one
    /// ranged read serves them all. A multiple of 4096, at most the chunk size; 0 gives
    /// every file chunks of its own. Default: 256K, or the chunk size if smaller.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub frame_size: Option<u64>,
    /// A hoist image whose chunks are reused instead of stored again.
    #[arg(long, value_name = "IMAGE")]
    pub chunk_dict: Option<String>,
    /// Credentials for the source registry only (overrides --creds).
    #[arg(long, value_name = "USER:PASSWORD")]
    pub src_creds: Option<String>,
    /// Credentials for the destination registry only (overrides --creds).
    #[arg(long, value_name = "USER:PASSWORD")]
    pub dest_creds: Option<String>,
    /// Layers downloaded at once.
    #[arg(long, default_value_t = 3)]
    pub jobs: usize,
    /// Convert every layer even if the conversion cache ($HOIST_HOME/convert) holds a
    /// conversion of the same lower layers with the same options.
    #[arg(long)]
    pub no_cache: bool,
    /// Print the conversion report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Store this start-up trace (written by `hoist record`) in the image: mounts fetch
    /// its chunks first, in order. Each data blob stores the chunks the trace reads
    /// first, in its order, so that a mount fetches them in a few long reads. The trace
    /// is kept as a layer of media type
    /// application/vnd.oci.image.layer.hoist.trace.v1+json after the metadata blob.
    #[arg(long, value_name = "FILE", conflicts_with = "prefetch_files")]
    pub prefetch_trace: Option<PathBuf>,
    /// Store a list of files (one path per line) as the image's start-up trace: mounts
    /// fetch those files first, in the order listed.
    #[arg(long, value_name = "FILE")]
    pub prefetch_files: Option<PathBuf>,
    /// For an image index (a multi-platform image): the platforms to convert, as
    /// `os/arch[/variant]`, comma-separated or repeated (default: every platform). The
    /// destination gets an index of the converted manifests.
    #[arg(long, value_name = "OS/ARCH", value_delimiter = ',')]
    pub platform: Vec<String>,
    /// For an image index: write one index holding the original manifests first and the
    /// hoist manifests after them (marked with the OS feature `hoist` and the annotation
    /// `dev.hoist.source.manifest`). Plain nodes (containerd's platform matching takes the
    /// first entry of a platform) pull the original; hoist's snapshotter finds the hoist
    /// manifest of the original it is asked for and serves it lazily. Every entry of the
    /// source index is kept (platforms not chosen with --platform, attestations), copied
    /// to the destination with its blobs if it lacks them.
    #[arg(long)]
    pub merge_platform: bool,
}

/// Parses `4096`, `64K`, `1M`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 1M, 256K, 4096)"))
}
