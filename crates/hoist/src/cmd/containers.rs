//! `hoist ps` and `hoist rm`, and the reaping of containers whose `hoist run` died.
//!
//! A container is owned by the `hoist run` that started it through a lock (see
//! `hoist_runtime::containers`). Two things find a container whose owner died without
//! cleaning up (`kill -9`, a crash):
//!
//! - the watcher `hoist run` starts beside itself (`hoist watch-container NAME`, in a
//!   process group of its own), which waits for the lock and reaps at once; and
//! - every later `hoist run`, `mount`, `umount`, `stat`, `ps`, `rm` and `daemon`
//!   command, in case the watcher died too (a reboot, `kill -9` of both).
//!
//! Reaping a container that was not detached stops it (SIGKILL to all its processes),
//! deletes runc's state, unmounts its overlay and image, and with `--rm` removes its
//! directory; without `--rm` the directory (its writable layer) is kept and `hoist ps`
//! shows it as stopped. A detached container is left running; once it has exited, the
//! same reaping unmounts it (and removes it with `--rm`).

use super::mount::home;
use super::Context;
use anyhow::{anyhow, bail, Context as _};
use hoist_daemon::api::Client;
use hoist_daemon::Home;
use hoist_fs::kernel;
use hoist_runtime::containers::{ContainerError, Containers, Held, Record, Status};
use hoist_runtime::runc::Runc;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long a killed container may take to stop before reaping gives up on it (its
/// processes are in uninterruptible sleep, e.g. on a stalled mount).
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `hoist rm --force` waits for the `hoist run` of a container it killed to
/// finish its own cleanup.
const OWNER_TIMEOUT: Duration = Duration::from_secs(30);

/// The containers of `home`.
pub fn containers(home: &Home) -> Containers {
    Containers::new(home.root.join("containers"))
}

fn runc(home: &Home) -> Runc {
    Runc::new(home.root.join("runc"))
}

/// Reaps every container whose owner is gone and that is not a detached container
/// still running. Problems are reported on stderr: reaping never fails the command
/// that does it.
pub fn reap_all(home: &Home) {
    let cs = containers(home);
    let Ok(list) = cs.list() else { return };
    for entry in list.into_iter().filter(|e| !e.owned) {
        let held = match cs.try_hold(&entry.name) {
            Ok(Some(h)) => h,
            _ => continue,
        };
        if let Err(e) = reap(home, &held, false) {
            eprintln!("hoist: reaping container {}: {e:#}", entry.name);
        }
    }
}

/// What reaping did.
#[derive(Debug, PartialEq, Eq)]
enum Reaped {
    /// Nothing: a detached container, still running.
    Running,
    /// Stopped and unmounted; its directory is kept.
    Kept,
    /// Removed.
    Removed,
}

/// Reaps a container whose lock is held and whose owner is gone: stops it unless it is
/// detached and running (or `force`), unmounts it, and removes it if its record says
/// `--rm` (or `force`).
fn reap(home: &Home, held: &Held, force: bool) -> anyhow::Result<Reaped> {
    let record = held.record();
    let runc = runc(home);
    let state = runc.state(&held.name)?;
    let alive = state.as_ref().is_some_and(|s| s.is_alive());
    if let Ok(r) = &record {
        if r.detach && alive && !force {
            return Ok(Reaped::Running);
        }
    }
    if alive {
        runc.kill(&held.name)?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        while runc.state(&held.name)?.is_some_and(|s| s.is_alive()) {
            if Instant::now() > deadline {
                bail!(
                    "it did not stop within {}s of SIGKILL (its processes may wait on a stalled mount); try again later",
                    STOP_TIMEOUT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if state.is_some() {
        runc.delete(&held.name)?;
    }
    unmount(home, &held.dir)?;
    let remove = force || record.as_ref().is_ok_and(|r| r.rm);
    if remove {
        std::fs::remove_dir_all(&held.dir)
            .with_context(|| format!("removing {}", held.dir.display()))?;
        return Ok(Reaped::Removed);
    }
    if let Ok(r) = record {
        let status = match r.status {
            Status::Created | Status::Running if r.detach => Status::Exited { code: None },
            Status::Created | Status::Running => Status::Reaped,
            done => done,
        };
        if status != r.status {
            held.set_status(status)?;
        }
    }
    Ok(Reaped::Kept)
}

/// Unmounts a container's overlay and image, whoever mounted the image (the daemon, or
/// one that died).
fn unmount(home: &Home, dir: &Path) -> anyhow::Result<()> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let (rootfs, image) = (dir.join("rootfs"), dir.join("image"));
    if kernel::is_mountpoint(&rootfs) {
        kernel::unmount_lazy(&rootfs)
            .with_context(|| format!("unmounting {}", rootfs.display()))?;
    }
    let by_daemon = Client::connect(&home.socket())
        .map_err(|e| anyhow!(e))
        .and_then(|mut c| c.umount(&image).map_err(|e| anyhow!(e)));
    if by_daemon.is_err()
        && !hoist_daemon::detach_orphan(home, &image)
        && kernel::is_mountpoint(&image)
    {
        kernel::unmount_lazy(&image).with_context(|| format!("unmounting {}", image.display()))?;
    }
    if kernel::is_mountpoint(&rootfs) || kernel::is_mountpoint(&image) {
        bail!("{} is still mounted", dir.display());
    }
    Ok(())
}

/// `hoist watch-container NAME`: waits until the `hoist run` owning the container is
/// gone, then reaps it; for a detached container, waits for it to exit first.
pub fn watch(cx: &Context, name: &str) -> anyhow::Result<()> {
    // Started in a process group of its own: a terminal's ^C or hangup, meant for the
    // container, must not end the watcher.
    let _ignored = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGQUIT,
    ])?;
    let home = home(cx);
    let cs = containers(&home);
    let held = match cs.hold(name) {
        Ok(h) => h,
        // Removed by its owner at exit (--rm).
        Err(ContainerError::NotFound { .. }) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let record = held.record()?;
    if matches!(record.status, Status::Exited { .. } | Status::Reaped) {
        return Ok(());
    }
    if !record.detach {
        return reap(&home, &held, false).map(|_| ());
    }
    // Its owner exited after starting it: wait for the container's init to exit, without
    // the lock (`hoist rm` takes it meanwhile), then reap it unless someone else does.
    drop(held);
    match runc(&home).state(name)? {
        Some(s) if s.is_alive() && s.pid > 0 => wait_for_exit(s.pid)?,
        _ => {}
    }
    match cs.try_hold(name) {
        Ok(Some(held)) => reap(&home, &held, false).map(|_| ()),
        Ok(None) | Err(ContainerError::NotFound { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Waits until process `pid` exits (not a child: through a pidfd).
fn wait_for_exit(pid: i32) -> anyhow::Result<()> {
    use rustix::event::{poll, PollFd, PollFlags};
    let Some(pid) = rustix::process::Pid::from_raw(pid) else {
        return Ok(());
    };
    let fd = match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::SRCH) => return Ok(()),
        Err(e) => return Err(anyhow!("pidfd_open({}): {e}", pid.as_raw_nonzero())),
    };
    loop {
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        match poll(&mut fds, -1) {
            Ok(_) => return Ok(()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(anyhow!("waiting for pid {}: {e}", pid.as_raw_nonzero())),
        }
    }
}

/// One line of `hoist ps --json`.
#[derive(Debug, serde::Serialize)]
struct Listed {
    name: String,
    image: Option<String>,
    status: Option<Status>,
    detached: bool,
    rm: bool,
    created: Option<u64>,
    /// Whether its `hoist run` is alive.
    attached: bool,
    error: Option<String>,
}

/// `hoist ps`: the containers, after reaping those whose `hoist run` died.
pub fn ps(cx: &Context, json: bool) -> anyhow::Result<()> {
    let home = home(cx);
    reap_all(&home);
    let listed: Vec<Listed> = containers(&home)
        .list()?
        .into_iter()
        .map(|e| {
            let (rec, error) = match e.record {
                Ok(r) => (Some(r), None),
                Err(err) => (None, Some(err.to_string())),
            };
            Listed {
                name: e.name,
                image: rec.as_ref().map(|r| r.image.clone()),
                status: rec.as_ref().map(|r| r.status),
                detached: rec.as_ref().is_some_and(|r| r.detach),
                rm: rec.as_ref().is_some_and(|r| r.rm),
                created: rec.as_ref().map(|r| r.created),
                attached: e.owned,
                error,
            }
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&listed)?);
        return Ok(());
    }
    println!("{:<24} {:<30} {:<12} IMAGE", "NAME", "STATUS", "CREATED");
    let now = hoist_runtime::containers::now();
    for l in &listed {
        let status = match (&l.status, &l.error) {
            (Some(Status::Running), _) if l.detached => "running (detached)".to_string(),
            (Some(s), _) => s.to_string(),
            (None, Some(e)) => format!("unreadable: {e}"),
            (None, None) => "unknown".into(),
        };
        let created = l
            .created
            .map(|c| ago(now.saturating_sub(c)))
            .unwrap_or_default();
        println!(
            "{:<24} {:<30} {:<12} {}",
            l.name,
            status,
            created,
            l.image.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

fn ago(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs}s ago"),
        120..=7199 => format!("{}m ago", secs / 60),
        7200..=172_799 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

/// `hoist rm NAME...`: removes stopped containers; `force` stops running ones first.
pub fn rm(cx: &Context, names: &[String], force: bool) -> anyhow::Result<()> {
    let home = home(cx);
    reap_all(&home);
    let cs = containers(&home);
    let mut failed = 0;
    for name in names {
        match rm_one(&home, &cs, name, force) {
            Ok(()) => println!("{name}"),
            Err(e) => {
                eprintln!("hoist: error: {e:#}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} containers not removed", names.len());
    }
    Ok(())
}

fn rm_one(home: &Home, cs: &Containers, name: &str, force: bool) -> anyhow::Result<()> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        bail!("{name:?} is not a container name");
    }
    let held = match cs.try_hold(name)? {
        Some(h) => h,
        None => {
            let owner = cs
                .record(name)
                .map_or_else(|_| String::new(), |r: Record| format!(", pid {}", r.owner));
            if !force {
                bail!(
                    "container {name} is running, attached to its `hoist run`{owner}; stop it, or `hoist rm --force {name}`"
                );
            }
            // Stop it: its `hoist run` then cleans up as the container exits.
            runc(home).kill(name)?;
            let deadline = Instant::now() + OWNER_TIMEOUT;
            loop {
                match cs.try_hold(name) {
                    Ok(Some(h)) => break h,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Ok(None) => bail!(
                        "container {name} was killed, but its `hoist run`{owner} did not finish within {}s",
                        OWNER_TIMEOUT.as_secs()
                    ),
                    // Removed by its `hoist run` (--rm).
                    Err(ContainerError::NotFound { .. }) => return Ok(()),
                    Err(e) => return Err(e.into()),
                }
            }
        }
    };
    if !force {
        if let Ok(r) = held.record() {
            let alive = runc(home).state(name)?.is_some_and(|s| s.is_alive());
            if alive && r.detach {
                bail!("container {name} is running (detached); `hoist rm --force {name}` stops and removes it");
            }
        }
    }
    reap(home, &held, true)?;
    Ok(())
}
