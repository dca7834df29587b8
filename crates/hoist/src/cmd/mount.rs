//! `hoist mount`, `umount`, `stat`, `cache` and `daemon`: clients of the daemon's API.

use super::{human, Context};
use crate::args::{CacheOp, DaemonOp, ModeArg, MountArgs, MountOptions, PrefetchArg, RegistryArgs};
use anyhow::{anyhow, bail, Context as _};
use hoist_daemon::api::{
    Client, ClientError, DaemonError, Devices, Mode, MountSpec, Prefetch, RegistryOptions,
    TraceSource,
};
use hoist_daemon::{Home, Served};
use hoist_fs::kernel;
use hoist_oci::ImageRef;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub(super) fn home(cx: &Context) -> Home {
    Home {
        root: cx.home.clone(),
    }
}

/// The absolute form of a mount point the user named; a dead mount cannot be resolved
/// (ENOTCONN), so only a path that resolves is canonicalised.
fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    match p.canonicalize() {
        Ok(c) => Ok(c),
        Err(_) => Ok(std::path::absolute(p)?),
    }
}

/// The daemon's mount request for `image` on `mountpoint` (absolute) with `opts`.
pub(super) fn mount_spec(
    home: &Home,
    registry: &RegistryArgs,
    image: &str,
    mountpoint: PathBuf,
    opts: &MountOptions,
) -> anyhow::Result<MountSpec> {
    Ok(MountSpec {
        image: image.to_string(),
        mountpoint,
        mode: match opts.mode {
            ModeArg::Fuse => Mode::Fuse,
            ModeArg::Erofs => Mode::Erofs,
        },
        prefetch: match opts.prefetch {
            PrefetchArg::None => Prefetch::None,
            PrefetchArg::Trace => Prefetch::Trace,
            PrefetchArg::All => Prefetch::All,
        },
        cache_dir: match &opts.cache_dir {
            Some(d) => {
                // Only root reads the cache: it holds the data of private images too.
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(d)
                    .with_context(|| format!("--cache-dir {}", d.display()))?;
                d.canonicalize()?
            }
            None => home.cache(),
        },
        cache_max_bytes: opts.cache_size,
        read_timeout_secs: opts.read_timeout.max(1),
        passthrough: !opts.no_passthrough,
        fetch_min_bytes: opts.fetch_min,
        meta_whole_max_bytes: opts.meta_whole_max,
        registry: RegistryOptions {
            plain_http: registry.plain_http,
            creds: registry.creds.clone(),
            retries: registry.retries,
            timeout_secs: registry.timeout,
            hosts_dir: Some(registry.hosts_dir.clone()),
        },
        trace: super::trace_arg(
            opts.prefetch_trace.as_deref(),
            opts.prefetch_files.as_deref(),
        )?,
        record: false,
        suid: false,
        dev: false,
    })
}

/// Checks an image reference before anything is started or created for it (a daemon,
/// `$HOIST_HOME`, a cache directory): a mistyped one is the user's error, said at once.
pub(super) fn check_image(image: &str) -> anyhow::Result<()> {
    ImageRef::parse(image)?;
    Ok(())
}

pub fn mount(cx: &Context, registry: &RegistryArgs, args: &MountArgs) -> anyhow::Result<()> {
    check_image(&args.image)?;
    let mountpoint = args
        .mountpoint
        .canonicalize()
        .with_context(|| format!("mount point {}", args.mountpoint.display()))?;
    if !mountpoint.is_dir() {
        bail!(
            "mount point {} is not a directory",
            args.mountpoint.display()
        );
    }
    let home = home(cx);
    let mut spec = mount_spec(&home, registry, &args.image, mountpoint, &args.opts)?;
    (spec.suid, spec.dev) = (args.suid, args.dev);
    if args.foreground {
        return foreground(&home, spec);
    }
    let mut client = start_daemon(&home)?;
    let stats = client.mount(spec.clone())?.stats;
    println!(
        "mounted {} on {} ({}, {} of metadata read in {:.2} s)",
        spec.image,
        spec.mountpoint.display(),
        stats.mode,
        human(stats.meta_bytes),
        stats.mount_secs
    );
    Ok(())
}

/// A connection to the daemon of `home`, started if none runs.
pub(super) fn start_daemon(home: &Home) -> anyhow::Result<Client> {
    let exe = std::env::current_exe().context("finding the hoist executable")?;
    hoist_daemon::spawn_and_wait(home, &exe).map_err(|e| anyhow!(e))
}

/// Serves one mount in this process until it is unmounted or a signal comes.
fn foreground(home: &Home, spec: MountSpec) -> anyhow::Result<()> {
    let store = hoist_cache::ChunkStore::open_shared(&spec.cache_dir, spec.cache_max_bytes)
        .with_context(|| format!("opening the chunk cache {}", spec.cache_dir.display()))?;
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])?;
    let served = Served::start(
        spec.clone(),
        store,
        Arc::new(hoist_cache::Inflight::default()),
        home,
    )
    .map_err(|e| anyhow!(e))?;
    hoist_daemon::remember(home, &served)?;
    eprintln!(
        "serving {} on {}; stop with `hoist umount {}` or Ctrl-C",
        spec.image,
        spec.mountpoint.display(),
        spec.mountpoint.display()
    );
    // Wakes up for a signal, and twice a second to see whether the mount went away.
    loop {
        if signals.pending().next().is_some() || !served.alive() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let stopped = served.stop();
    hoist_daemon::forget(home, &spec.mountpoint);
    stopped.map_err(|e| anyhow!(e))
}

pub fn umount(cx: &Context, mountpoint: &Path) -> anyhow::Result<()> {
    let mp = absolute(mountpoint)?;
    if let Ok(mut client) = Client::connect(&home(cx).socket()) {
        match client.umount(&mp) {
            Ok(()) => {
                println!("unmounted {}", mp.display());
                return Ok(());
            }
            Err(ClientError::Refused(DaemonError::NotFound(_))) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // Not the daemon's: one whose daemon died (its record names its private mounts
    // too), or a foreground mount.
    if hoist_daemon::detach_orphan(&home(cx), &mp) {
        println!(
            "unmounted {} (served by `hoist mount --foreground`, or left by a daemon that died)",
            mp.display()
        );
        return Ok(());
    }
    if !kernel::is_mountpoint(&mp) {
        bail!("{} is not a mount point", mp.display());
    }
    bail!(
        "{} is not a mount of hoist's: no hoist daemon or command of {} mounted it \
         (HOIST_HOME selects another; umount(8) unmounts other mounts)",
        mp.display(),
        home(cx).root.display()
    )
}

fn daemon_client(cx: &Context) -> anyhow::Result<Client> {
    Client::connect(&home(cx).socket()).map_err(|e| {
        anyhow!(
            "{e}; is anything mounted? (`hoist mount` starts the daemon, HOIST_HOME selects it)"
        )
    })
}

pub fn stat(cx: &Context, mountpoint: &Path, json: bool) -> anyhow::Result<()> {
    let mp = absolute(mountpoint)?;
    let s = daemon_client(cx)?.stat(&mp)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    let pct = |a: u64, b: u64| {
        if b == 0 {
            100.0
        } else {
            a as f64 * 100.0 / b as f64
        }
    };
    println!(
        "{} on {} ({}, {})",
        s.image,
        s.mountpoint.display(),
        s.mode,
        s.state
    );
    if s.mountpoints > 1 {
        println!(
            "  shared    by {} mount points of this image with these options (the figures below are theirs together)",
            s.mountpoints
        );
    }
    println!(
        "  fetched   {} in {} requests, plus {} of metadata ({:.1}% of the image's {})",
        human(s.bytes_fetched),
        s.requests,
        human(s.meta_bytes),
        pct(
            s.bytes_fetched + s.meta_bytes,
            s.blob_bytes + s.meta_layer_bytes
        ),
        human(s.blob_bytes + s.meta_layer_bytes)
    );
    println!(
        "  cached    {} of {} chunks ({} of {}); the cache evicted {} chunks, {} fetched again",
        s.chunks_cached,
        s.chunks_total,
        human(s.bytes_cached),
        human(s.bytes_total),
        s.cache_evictions,
        s.cache_refetches
    );
    println!(
        "  reads     {} chunk hits, {} misses, {} errors, {} timeouts; {} requests reached hoist ({} read errors)",
        s.cache_hits, s.cache_misses, s.fetch_errors, s.timeouts, s.reads, s.read_errors
    );
    println!(
        "  fetching  {} readahead jobs for readers going forward; {} files for the process about to start; {} libraries fetched for the programs that load them; {} python modules for the modules that import them; {} damaged chunks discarded and fetched again",
        s.readaheads, s.process_files, s.libraries, s.modules, s.corrupt
    );
    if s.passthrough {
        println!("  passthrough on: {} opens", s.passthrough_opens);
    }
    if s.views_verified + s.views_damaged > 0 {
        println!(
            "  views     {} found on disk and verified, {} found damaged and rebuilt",
            s.views_verified, s.views_damaged
        );
    }
    let (local, total) = (s.devices_local, s.devices_total);
    match s.devices {
        Devices::Views => {
            println!("  devices   the blobs' views on the local disk (hoist serves no file data)")
        }
        Devices::Loop if local == total && s.meta_local => println!(
            "  devices   loop devices, all {total} on the blobs' views and the metadata on its local file (hoist serves nothing)"
        ),
        Devices::Loop => println!(
            "  devices   loop devices: {local} of {total} on the blobs' views, the others on hoist's device files; metadata {}",
            if s.meta_local { "on its local file" } else { "on hoist's device file (read on demand)" }
        ),
        Devices::Files => println!(
            "  devices   hoist's device files (no loop devices: see the daemon log); hoist serves every read"
        ),
        Devices::None => {}
    }
    let p = &s.prefetch;
    let trace = match p.trace {
        TraceSource::Image | TraceSource::Mount => format!(
            "; start-up trace from the {}: {} chunks first",
            p.trace, p.trace_chunks
        ),
        TraceSource::None => String::new(),
    };
    let views = match p.views_total {
        0 => String::new(),
        total => format!("; then {} of {total} views", p.views_done),
    };
    println!(
        "  prefetch  {} ({} of {} chunks{trace}{views})",
        p.state, p.done, p.total
    );
    Ok(())
}

pub fn cache(cx: &Context, op: CacheOp) -> anyhow::Result<()> {
    let dir = |d: Option<PathBuf>| d.unwrap_or_else(|| home(cx).cache());
    // Through the daemon when one runs: it knows which chunks its mounts use.
    let client = Client::connect(&home(cx).socket()).ok();
    match op {
        CacheOp::Stat { cache_dir, json } => {
            let cache_dir = dir(cache_dir);
            let s = match client {
                Some(mut c) => c.cache_stat(&cache_dir)?,
                None => hoist_cache::ChunkStore::open(&cache_dir, u64::MAX)?.stats()?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!(
                    "{}: {} chunks, {}; {} views, {}; {} metadata blobs, {}; {} chunks in use by mounts",
                    cache_dir.display(),
                    s.chunks,
                    human(s.chunk_bytes),
                    s.views,
                    human(s.view_bytes),
                    s.metas,
                    human(s.meta_bytes),
                    s.pinned
                );
            }
        }
        CacheOp::Prune {
            cache_dir,
            max_size,
        } => {
            let cache_dir = dir(cache_dir);
            let (target, mounted_too) = (max_size.unwrap_or(0), max_size.is_some());
            let r = match client {
                Some(mut c) => c.cache_prune(&cache_dir, target, mounted_too)?,
                None => hoist_cache::ChunkStore::open(&cache_dir, u64::MAX)?
                    .prune(target, mounted_too)?,
            };
            println!(
                "removed {} chunks and views ({}); {} left in {}",
                r.removed,
                human(r.freed),
                human(r.left),
                cache_dir.display()
            );
        }
    }
    Ok(())
}

pub fn daemon(cx: &Context, op: DaemonOp) -> anyhow::Result<()> {
    let home = home(cx);
    match op {
        DaemonOp::Run => {
            let exe = std::env::current_exe().context("finding the hoist executable")?;
            hoist_daemon::run(home, exe).map_err(|e| anyhow!(e))
        }
        DaemonOp::Serve => hoist_daemon::serve(home).map_err(|e| anyhow!(e)),
        DaemonOp::Stop => match Client::connect(&home.socket()) {
            Ok(mut c) => {
                c.shutdown()?;
                hoist_daemon::wait_stopped(&home, std::time::Duration::from_secs(30))
                    .map_err(|e| anyhow!(e))?;
                println!("stopped the hoist daemon of {}", home.root.display());
                Ok(())
            }
            Err(_) => {
                println!("no hoist daemon runs for {}", home.root.display());
                Ok(())
            }
        },
        DaemonOp::Restart => restart(&home),
        DaemonOp::Status { json } => {
            let Ok(mut c) = Client::connect(&home.socket()) else {
                bail!("no hoist daemon runs for {}", home.root.display());
            };
            let info = c.ping()?;
            let list = c.list()?;
            if json {
                let out = serde_json::json!({ "daemon": info, "mounts": list });
                println!("{}", serde_json::to_string_pretty(&out)?);
                return Ok(());
            }
            println!(
                "hoist daemon {} (version {}, up {:.0} s) serves {}",
                info.pid,
                info.version,
                info.uptime_secs,
                home.root.display()
            );
            if let Some(h) = &info.holder {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                println!(
                    "  holder {} (up {:.0} s), server {} (up {:.0} s), {} takeovers",
                    h.pid,
                    now - h.started_unix,
                    h.server_pid,
                    now - h.server_started_unix,
                    h.takeovers
                );
            }
            for m in list {
                println!(
                    "  {} on {} ({}, {})",
                    m.image,
                    m.mountpoint.display(),
                    m.mode,
                    m.state
                );
            }
            Ok(())
        }
    }
}

/// `hoist daemon restart`: the holder replaces its server; returns once the new one
/// answers (30 s at most).
fn restart(home: &Home) -> anyhow::Result<()> {
    let mut c = Client::connect(&home.socket())
        .map_err(|_| anyhow!("no hoist daemon runs for {}", home.root.display()))?;
    let before = c.ping()?;
    let Some(holder) = before.holder else {
        bail!(
            "the daemon of {} has no holder to restart it",
            home.root.display()
        );
    };
    let pid = rustix::process::Pid::from_raw(holder.pid as i32)
        .ok_or_else(|| anyhow!("the holder's pid {} is not a pid", holder.pid))?;
    rustix::process::kill_process(pid, rustix::process::Signal::Hup)
        .with_context(|| format!("signalling the holder {}", holder.pid))?;
    let t0 = std::time::Instant::now();
    while t0.elapsed() < std::time::Duration::from_secs(30) {
        // The API socket stays bound: a request waits in its backlog for the new server.
        if let Ok(info) = Client::connect(&home.socket()).and_then(|mut c| c.ping()) {
            if info.pid != before.pid {
                println!(
                    "the hoist daemon of {} restarted: server {} replaced {} ({} mounts kept)",
                    home.root.display(),
                    info.pid,
                    before.pid,
                    info.holder.map_or(0, |h| h.mounts)
                );
                return Ok(());
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    bail!(
        "the daemon of {} did not restart within 30 s (see {})",
        home.root.display(),
        home.log().display()
    )
}
