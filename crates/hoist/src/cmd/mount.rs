//! `hoist mount`, `umount`, `stat`, `cache` and `daemon`: clients of the daemon's API.

use super::{human, Context};
use crate::args::{CacheOp, DaemonOp, ModeArg, MountArgs, MountOptions, PrefetchArg, RegistryArgs};
use anyhow::{anyhow, bail, Context as _};
use hoist_daemon::api::{Client, ClientError, Mode, MountSpec, Prefetch, RegistryOptions, Request};
use hoist_daemon::{Home, Served};
use hoist_fs::kernel;
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
        registry: RegistryOptions {
            plain_http: registry.plain_http,
            creds: registry.creds.clone(),
            retries: registry.retries,
            timeout_secs: registry.timeout,
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

pub fn mount(cx: &Context, registry: &RegistryArgs, args: &MountArgs) -> anyhow::Result<()> {
    let home = home(cx);
    let mountpoint = args
        .mountpoint
        .canonicalize()
        .with_context(|| format!("mount point {}", args.mountpoint.display()))?;
    let mut spec = mount_spec(&home, registry, &args.image, mountpoint, &args.opts)?;
    (spec.suid, spec.dev) = (args.suid, args.dev);
    if args.foreground {
        return foreground(&home, spec);
    }
    let mut client = start_daemon(&home)?;
    let stats = client.call(&Request::Mount(Box::new(spec.clone())))?;
    println!(
        "mounted {} on {} ({}, {} of metadata read in {:.2} s)",
        spec.image,
        spec.mountpoint.display(),
        stats["mode"].as_str().unwrap_or("?"),
        human(stats["meta_bytes"].as_u64().unwrap_or(0)),
        stats["mount_secs"].as_f64().unwrap_or(0.0)
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
    let store = hoist_cache::ChunkStore::open(&spec.cache_dir, spec.cache_max_bytes)
        .with_context(|| format!("opening the chunk cache {}", spec.cache_dir.display()))?;
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])?;
    let served = Served::start(
        spec.clone(),
        Arc::new(store),
        Arc::new(hoist_cache::Inflight::default()),
        home,
    )
    .map_err(|e| anyhow!(e))?;
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
    served.stop().map_err(|e| anyhow!(e))
}

pub fn umount(cx: &Context, mountpoint: &Path) -> anyhow::Result<()> {
    let mp = absolute(mountpoint)?;
    if let Ok(mut client) = Client::connect(&home(cx).socket()) {
        match client.call(&Request::Umount {
            mountpoint: mp.clone(),
        }) {
            Ok(_) => {
                println!("unmounted {}", mp.display());
                return Ok(());
            }
            Err(ClientError::Refused(why)) if why.contains("not mounted by this daemon") => {}
            Err(e) => return Err(e.into()),
        }
    }
    // Not the daemon's: one whose daemon died (its record names its private mounts
    // too), or a foreground mount.
    if hoist_daemon::detach_orphan(&home(cx), &mp) {
        println!("unmounted {} (left by a daemon that died)", mp.display());
        return Ok(());
    }
    if !kernel::is_mountpoint(&mp) {
        bail!("{} is not a mount point", mp.display());
    }
    kernel::unmount_lazy(&mp).with_context(|| format!("unmounting {}", mp.display()))?;
    println!("unmounted {} (detached)", mp.display());
    Ok(())
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
    let s = daemon_client(cx)?.call(&Request::Stat { mountpoint: mp })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    let n = |k: &str| s[k].as_u64().unwrap_or(0);
    let pct = |a: u64, b: u64| {
        if b == 0 {
            100.0
        } else {
            a as f64 * 100.0 / b as f64
        }
    };
    println!(
        "{} on {} ({}, {})",
        s["image"].as_str().unwrap_or("?"),
        s["mountpoint"].as_str().unwrap_or("?"),
        s["mode"].as_str().unwrap_or("?"),
        s["state"].as_str().unwrap_or("?")
    );
    println!(
        "  fetched   {} in {} requests, plus {} of metadata ({:.1}% of the image's {})",
        human(n("bytes_fetched")),
        n("requests"),
        human(n("meta_bytes")),
        pct(
            n("bytes_fetched") + n("meta_bytes"),
            n("blob_bytes") + n("meta_bytes")
        ),
        human(n("blob_bytes") + n("meta_bytes"))
    );
    println!(
        "  cached    {} of {} chunks ({} of {})",
        n("chunks_cached"),
        n("chunks_total"),
        human(n("bytes_cached")),
        human(n("bytes_total"))
    );
    println!(
        "  reads     {} chunk hits, {} misses, {} errors, {} timeouts; {} requests reached hoist ({} read errors)",
        n("cache_hits"),
        n("cache_misses"),
        n("fetch_errors"),
        n("timeouts"),
        n("reads"),
        n("read_errors")
    );
    if s["passthrough"].as_bool() == Some(true) {
        println!("  passthrough on: {} opens", n("passthrough_opens"));
    }
    match (s["devices"].as_str(), n("devices_local"), n("devices_total")) {
        (Some("views"), ..) => {
            println!("  devices   the blobs' views on the local disk (hoist serves no file data)")
        }
        (Some("loop"), local, total) if local == total => println!(
            "  devices   loop devices, all {total} on the blobs' views on the local disk (hoist serves no file data)"
        ),
        (Some("loop"), local, total) => println!(
            "  devices   loop devices: {local} of {total} on the blobs' views, the others on hoist's device files"
        ),
        (Some("files"), ..) => println!(
            "  devices   hoist's device files (no loop devices: see the daemon log); hoist serves every read"
        ),
        _ => {}
    }
    let p = &s["prefetch"];
    let trace = match p["trace"].as_str() {
        Some(from @ ("image" | "mount")) => format!(
            "; start-up trace from the {from}: {} chunks first",
            p["trace_chunks"].as_u64().unwrap_or(0)
        ),
        _ => String::new(),
    };
    let views = match p["views_total"].as_u64() {
        Some(total @ 1..) => format!(
            "; then {} of {total} views",
            p["views_done"].as_u64().unwrap_or(0)
        ),
        _ => String::new(),
    };
    println!(
        "  prefetch  {} ({} of {} chunks{trace}{views})",
        p["state"].as_str().unwrap_or("?"),
        p["done"].as_u64().unwrap_or(0),
        p["total"].as_u64().unwrap_or(0)
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
                Some(mut c) => c.call(&Request::CacheStat {
                    cache_dir: cache_dir.clone(),
                })?,
                None => serde_json::to_value(
                    hoist_cache::ChunkStore::open(&cache_dir, u64::MAX)?.stats()?,
                )?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                let n = |k: &str| s[k].as_u64().unwrap_or(0);
                println!(
                    "{}: {} chunks, {}; {} views, {}; {} metadata blobs, {}; {} chunks in use by mounts",
                    cache_dir.display(),
                    n("chunks"),
                    human(n("chunk_bytes")),
                    n("views"),
                    human(n("view_bytes")),
                    n("metas"),
                    human(n("meta_bytes")),
                    n("pinned")
                );
            }
        }
        CacheOp::Prune {
            cache_dir,
            max_size,
        } => {
            let cache_dir = dir(cache_dir);
            let r = match client {
                Some(mut c) => c.call(&Request::CachePrune {
                    cache_dir: cache_dir.clone(),
                    max_bytes: max_size,
                })?,
                None => serde_json::to_value(
                    hoist_cache::ChunkStore::open(&cache_dir, u64::MAX)?.evict_to(max_size)?,
                )?,
            };
            let n = |k: &str| r[k].as_u64().unwrap_or(0);
            println!(
                "removed {} chunks and views ({}); {} left in {}",
                n("removed"),
                human(n("freed")),
                human(n("left")),
                cache_dir.display()
            );
        }
    }
    Ok(())
}

pub fn daemon(cx: &Context, op: DaemonOp) -> anyhow::Result<()> {
    let home = home(cx);
    match op {
        DaemonOp::Run => hoist_daemon::run(home).map_err(|e| anyhow!(e)),
        DaemonOp::Stop => match Client::connect(&home.socket()) {
            Ok(mut c) => {
                c.call(&Request::Shutdown)?;
                println!("stopped the hoist daemon of {}", home.root.display());
                Ok(())
            }
            Err(_) => {
                println!("no hoist daemon runs for {}", home.root.display());
                Ok(())
            }
        },
        DaemonOp::Status => match Client::connect(&home.socket()) {
            Ok(mut c) => {
                let pid = c.call(&Request::Ping)?;
                let list = c.call(&Request::List)?;
                println!("hoist daemon {} serves {}", pid["pid"], home.root.display());
                for m in list.as_array().into_iter().flatten() {
                    println!(
                        "  {} on {} ({}, {})",
                        m["image"].as_str().unwrap_or("?"),
                        m["mountpoint"].as_str().unwrap_or("?"),
                        m["mode"].as_str().unwrap_or("?"),
                        m["state"].as_str().unwrap_or("?")
                    );
                }
                Ok(())
            }
            Err(_) => bail!("no hoist daemon runs for {}", home.root.display()),
        },
    }
}
