//! `hoist run` and `hoist record`: a container on a lazy mount, run by runc.
//!
//! The image is mounted through the daemon on `$HOIST_HOME/containers/NAME/image`, an
//! overlayfs on `…/rootfs` takes the writes (`…/upper`, `…/work`), the runtime spec goes
//! to `…/config.json`, and `runc run` runs the container in the foreground with this
//! process's stdio, its state under `$HOIST_HOME/runc`. Signals hoist receives are passed
//! to runc, which passes them to the container; runc's exit status is the container's,
//! and hoist exits with it. The container is this process's (a lock it holds): if it
//! dies without cleaning up, its watcher or the next hoist command reaps the container
//! (see `containers`), unless it was started `--detach`.

use super::mount::{check_image, home, mount_spec, start_daemon};
use super::{human, Context};
use crate::args::{MountOptions, RecordArgs, RegistryArgs, RunArgs};
use anyhow::{anyhow, bail, Context as _};
use hoist_daemon::api::Client;
use hoist_fs::kernel;
use hoist_runtime::containers::{Held, Record, Status};
use hoist_runtime::{overlay, spec, user, ImageConfig};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// What `run` and `record` have in common.
struct Launch<'a> {
    image: &'a str,
    cmd: &'a [String],
    entrypoint: Option<&'a str>,
    env: &'a [String],
    name: Option<&'a str>,
    tty: bool,
    detach: bool,
    rm: bool,
    opts: &'a MountOptions,
    record: Option<&'a Path>,
    stats_json: Option<&'a Path>,
}

pub fn run(cx: &Context, registry: &RegistryArgs, a: &RunArgs) -> anyhow::Result<()> {
    let code = launch(
        cx,
        registry,
        Launch {
            image: &a.image,
            cmd: &a.cmd,
            entrypoint: a.entrypoint.as_deref(),
            env: &a.env,
            name: a.name.as_deref(),
            tty: a.tty,
            detach: a.detach,
            rm: a.rm,
            opts: &a.opts,
            record: None,
            stats_json: a.stats_json.as_deref(),
        },
    )?;
    std::process::exit(code)
}

pub fn record(cx: &Context, registry: &RegistryArgs, a: &RecordArgs) -> anyhow::Result<()> {
    let code = launch(
        cx,
        registry,
        Launch {
            image: &a.image,
            cmd: &a.cmd,
            entrypoint: a.entrypoint.as_deref(),
            env: &a.env,
            name: None,
            tty: false,
            detach: false,
            rm: true,
            opts: &a.opts,
            record: Some(&a.trace_out),
            stats_json: None,
        },
    )?;
    if code != 0 {
        eprintln!("hoist: the command exited with {code}; the trace holds what it read");
    }
    std::process::exit(code)
}

/// Undoes a launch, in reverse order, whatever happened.
struct Cleanup {
    dir: PathBuf,
    image_mp: PathBuf,
    rootfs: PathBuf,
    home: hoist_daemon::Home,
    mounted: bool,
    overlaid: bool,
    /// runc ran: the writable layer may hold something to keep.
    started: bool,
    /// The container's exit code, once runc returned.
    code: Option<i32>,
    rm: bool,
    /// Detached and started: the container outlives this command, nothing is undone.
    detached: bool,
    /// The container's record, with its lock; dropped last, once everything is undone.
    held: Held,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        if self.overlaid {
            if let Err(e) = overlay::unmount(&self.rootfs) {
                eprintln!("hoist: {e}");
            }
        }
        if self.mounted {
            let r = Client::connect(&self.home.socket())
                .map_err(|e| anyhow!(e))
                .and_then(|mut c| c.umount(&self.image_mp).map_err(|e| anyhow!(e)));
            if let Err(e) = r {
                eprintln!("hoist: unmounting {}: {e}", self.image_mp.display());
                let _ = kernel::unmount_lazy(&self.image_mp);
            }
        }
        let busy = kernel::is_mountpoint(&self.rootfs) || kernel::is_mountpoint(&self.image_mp);
        let remove = self.rm || !self.started;
        if remove && !busy {
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                eprintln!("hoist: removing {}: {e}", self.dir.display());
            }
            return;
        }
        if let Err(e) = self.held.set_status(Status::Exited { code: self.code }) {
            eprintln!("hoist: {e}");
        }
        if !remove {
            eprintln!(
                "hoist: the container's writable layer is kept in {} (`hoist rm {}` removes it, --rm does at exit)",
                self.dir.display(),
                self.held.name
            );
        }
    }
}

fn launch(cx: &Context, registry: &RegistryArgs, l: Launch) -> anyhow::Result<i32> {
    let t0 = Instant::now();
    check_image(l.image)?;
    let home = home(cx);
    let name = match l.name {
        Some(n) => {
            if n.is_empty()
                || n.len() > 64
                || !n
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
                || n.starts_with('.')
            {
                bail!("--name {n:?}: use up to 64 letters, digits, '_', '.' and '-'");
            }
            n.to_string()
        }
        None => random_name()?,
    };
    // Signals before runc runs end the launch through the cleanup, not halfway.
    let mut signals = signal_hook::iterator::Signals::new(forwarded_signals(l.tty))?;
    if l.detach && l.tty {
        bail!("--detach and --tty together are not supported: a detached container has no terminal (its output goes to its log)");
    }
    // Only root may enter the containers' directories: the image is mounted there with
    // its setuid files and device nodes working, as the container needs them.
    let containers = super::containers::containers(&home);
    home.private_dir(containers.dir())
        .context("creating the containers' directory")?;
    // Containers whose `hoist run` died and whose watcher died too.
    super::containers::reap_all(&home);
    // Claiming the name makes the directory, with its record, owned by this process
    // (also against a concurrent run) until it exits, however it exits.
    let held = containers.claim(
        &name,
        &Record {
            image: l.image.to_string(),
            created: hoist_runtime::containers::now(),
            rm: l.rm,
            detach: l.detach,
            owner: std::process::id(),
            status: Status::Created,
        },
    )?;
    let dir = held.dir.canonicalize()?;
    let (image_mp, upper, work, rootfs) = (
        dir.join("image"),
        dir.join("upper"),
        dir.join("work"),
        dir.join("rootfs"),
    );
    let mut cleanup = Cleanup {
        dir: dir.clone(),
        image_mp: image_mp.clone(),
        rootfs: rootfs.clone(),
        home: home.clone(),
        mounted: false,
        overlaid: false,
        started: false,
        code: None,
        rm: l.rm,
        detached: false,
        held,
    };
    start_watcher(&home, &name);
    for d in [&image_mp, &upper, &work, &rootfs] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let interrupted = |signals: &mut signal_hook::iterator::Signals| -> anyhow::Result<()> {
        match signals.pending().next() {
            Some(sig) => bail!("interrupted by signal {sig} before the container started"),
            None => Ok(()),
        }
    };
    let mut mspec = mount_spec(&home, registry, l.image, image_mp.clone(), l.opts)?;
    mspec.record = l.record.is_some();
    (mspec.suid, mspec.dev) = (true, true);
    let mut client = start_daemon(&home)?;
    let mounted = client.mount(mspec)?;
    cleanup.mounted = true;
    interrupted(&mut signals)?;
    let config = ImageConfig::from_json(&mounted.config)
        .with_context(|| format!("the config of {}", l.image))?;
    let args = config.process(l.entrypoint, l.cmd)?;
    let cwd = if config.working_dir.is_empty() {
        "/".to_string()
    } else {
        config.working_dir.clone()
    };
    overlay::mount(&image_mp, &upper, &work, &rootfs)?;
    cleanup.overlaid = true;
    let user = user::resolve(&rootfs, &config.user)?;
    let env = hoist_runtime::environment(&config.env, l.env, &user.home, l.tty);
    // The daemon fetches the program and its script while runc starts (about 0.1 s
    // before the kernel reads the program). After the user's lookup, whose reads of
    // /etc would share the link with them. A recording leaves the reads as they come.
    if l.record.is_none() {
        let process = hoist_daemon::api::Process::new(args.clone(), &env.vars, cwd.clone());
        // Only a head start: the container runs the same without it (a daemon being
        // restarted, or one too old to know the request).
        if let Err(e) = client.will_run(&image_mp, process) {
            tracing::debug!("telling the daemon what {} runs: {e}", l.image);
        }
    }
    for e in &env.dropped {
        tracing::warn!(
            "environment entry {e:?} (of the config of {} or -e) has no '=': not passed to \
             the container (it unsets {e}, as with docker)",
            l.image
        );
    }
    let container = spec::Container {
        args,
        env: env.vars,
        cwd,
        user,
        rootfs: rootfs.clone(),
        hostname: name.chars().take(63).collect(),
        terminal: l.tty,
        // One per home and name: two homes may both have a container `web`.
        cgroup: format!(
            "/hoist-{}-{name}",
            &hoist_oci::Digest::of(home.root.as_os_str().as_encoded_bytes()).hex()[..12]
        ),
    };
    spec::write(&dir, &spec::build(&container)?)?;
    let mount_secs = t0.elapsed().as_secs_f64();
    interrupted(&mut signals)?;

    let t1 = Instant::now();
    cleanup.started = true;
    cleanup.held.set_status(Status::Running)?;
    if l.detach {
        run_detached(&home.root.join("runc"), &dir, &name)?;
        cleanup.detached = true;
        println!("{name}");
        return Ok(0);
    }
    let code = run_runc(&home.root.join("runc"), &dir, &name, l.tty, signals)?;
    cleanup.code = Some(code);
    let run_secs = t1.elapsed().as_secs_f64();

    if let Some(out) = l.record {
        let t = client.trace(&image_mp)?;
        write_atomically(out, &t.to_json())?;
        eprintln!(
            "recorded {} chunks ({} compressed) of {} files to {}",
            t.chunks.len(),
            human(t.chunk_bytes()),
            t.files.len(),
            out.display()
        );
    }
    if let Some(out) = l.stats_json {
        let stat = client.stat(&image_mp)?;
        let report = serde_json::json!({
            "name": name,
            "image": l.image,
            "mount_secs": mount_secs,
            "run_secs": run_secs,
            "exit_code": code,
            "stat": stat,
        });
        write_atomically(out, &serde_json::to_vec_pretty(&report)?)?;
    }
    drop(cleanup);
    Ok(code)
}

/// Starts `hoist watch-container NAME` beside this process, in a process group of its
/// own, to reap the container if this process dies without cleaning up.
fn start_watcher(home: &hoist_daemon::Home, name: &str) {
    use std::process::Stdio;
    let started = std::env::current_exe().and_then(|exe| {
        Command::new(exe)
            .args(["watch-container", name])
            .env("HOIST_HOME", &home.root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
    });
    if let Err(e) = started {
        eprintln!(
            "hoist: starting the watcher of container {name}: {e} (if this command dies, the next hoist command reaps the container)"
        );
    }
}

/// Starts the bundle with `runc run --detach`: the container's stdout and stderr go to
/// `log` in its directory, its stdin is empty.
fn run_detached(root: &Path, bundle: &Path, name: &str) -> anyhow::Result<()> {
    use std::process::Stdio;
    let log_path = bundle.join("log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let out = Command::new("runc")
        .arg("--root")
        .arg(root)
        .args(["run", "--detach", "--bundle"])
        .arg(bundle)
        .arg(name)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .output()
        .context("starting runc (install the runc package)")?;
    if !out.status.success() {
        let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
        bail!(
            "runc could not start container {name}: {}",
            tail.lines().last().unwrap_or("see its log")
        );
    }
    Ok(())
}

/// Runs the bundle with `runc run` in the foreground, passing signals on; returns the
/// container's exit code (128 + the signal when a signal ended runc itself).
fn run_runc(
    root: &Path,
    bundle: &Path,
    name: &str,
    tty: bool,
    mut signals: signal_hook::iterator::Signals,
) -> anyhow::Result<i32> {
    let mut cmd = Command::new("runc");
    cmd.arg("--root")
        .arg(root)
        .args(["run", "--bundle"])
        .arg(bundle)
        .arg(name);
    // Without a terminal, runc gets a process group of its own so that a signal reaches
    // the container once, through hoist. With one, runc must stay in the terminal's
    // foreground group; the terminal is in raw mode, so ^C reaches the container as input.
    if !tty {
        cmd.process_group(0);
    }
    let mut child = cmd
        .spawn()
        .context("starting runc (install the runc package)")?;
    let pid = rustix::process::Pid::from_child(&child);
    let handle = signals.handle();
    let forwarder = std::thread::spawn(move || {
        for sig in signals.forever() {
            if let Some(s) = rustix::process::Signal::from_raw(sig) {
                let _ = rustix::process::kill_process(pid, s);
            }
        }
    });
    let status = child.wait().context("waiting for runc")?;
    handle.close();
    let _ = forwarder.join();
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

/// The signals passed on to the container: with a terminal (in raw mode, so ^C and ^\
/// reach the container as input), those that do not come from it.
fn forwarded_signals(tty: bool) -> &'static [i32] {
    use signal_hook::consts::*;
    if tty {
        &[SIGTERM, SIGHUP, SIGUSR1, SIGUSR2]
    } else {
        &[SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2]
    }
}

/// `hoist-` and 12 random hex digits.
fn random_name() -> anyhow::Result<String> {
    use std::io::Read;
    let mut b = [0u8; 6];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom")?;
    Ok(format!("hoist-{}", hex::encode(b)))
}

/// Writes `bytes` to `path` through a temporary file, so a reader never sees half.
fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("writing {}", path.display()))
}
