//! Lazy mounts, both modes, against the referees: the tree under a mount equals `umoci
//! unpack` of the original image, cold, warm and read from views; python runs in it
//! under runc; faults (registry stopped, corrupted data, daemon killed) give EIO or
//! ENOTCONN within the bound, never wrong data or a hang (mounts that hoist serves; an
//! erofs mount over views needs no hoist and is not among them); an erofs mount moves
//! to its views while mounted.

mod common;

use common::*;
use hoist_testkit::{Auth, Fault, FaultProxy, Registry};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MODES: [&str; 2] = ["fuse", "erofs"];

/// Fixtures, root, the kernel pieces, umoci, skopeo and docker-registry; `None` (skipped)
/// only without root and with `HOIST_TESTS_UNPRIVILEGED`.
fn setup() -> Option<PathBuf> {
    require(
        "mount tests",
        &[
            Need::Root,
            Need::Fuse,
            Need::LoopDevices,
            Need::tool("umoci"),
            Need::tool("skopeo"),
            Need::tool("docker-registry"),
        ],
    )
    .then(fixtures)
}

/// A hoist state root of its own, and the mount points under it; the daemon is stopped
/// and every mount detached when it is dropped.
struct Home {
    root: PathBuf,
}

impl Home {
    fn new(name: &str) -> Home {
        let root = scratch().join(name);
        std::fs::create_dir_all(&root).unwrap();
        Home { root }
    }
    fn env(&self) -> [(&'static str, String); 1] {
        [("HOIST_HOME", self.root.display().to_string())]
    }
    fn run(&self, args: &[&str]) -> std::process::Output {
        let env = self.env();
        hoist_env(args, &[(env[0].0, env[0].1.as_str())])
    }
    fn ok(&self, args: &[&str]) -> String {
        let env = self.env();
        hoist_env_ok(args, &[(env[0].0, env[0].1.as_str())])
    }
    fn mountpoint(&self, name: &str) -> PathBuf {
        let p = self.root.join("mnt").join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }
    fn stat(&self, mp: &Path) -> Value {
        let out = self.ok(&["stat", "--json", &mp.display().to_string()]);
        serde_json::from_str(&out).unwrap()
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        let _ = self.run(&["daemon", "stop"]);
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for line in info.lines() {
            if let Some(mp) = line.split(' ').nth(4) {
                if mp.starts_with(&*self.root.to_string_lossy()) {
                    let _ = Command::new("umount").args(["-l", mp]).status();
                }
            }
        }
    }
}

/// Runs `cmd` with a deadline; returns its exit status and output, or panics when it
/// hangs (a process stuck on a dead mount).
fn run_bounded(cmd: &mut Command, limit: Duration) -> std::process::Output {
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("{cmd:?} still runs after {limit:?}: it hangs"))
        .unwrap()
}

fn registry_with(layout: &Path, tags: &[&str]) -> (Registry, FaultProxy, String) {
    let reg = Registry::start(&Auth::None);
    let proxy = FaultProxy::start(&reg.addr);
    let home = scratch().join("convert-home").display().to_string();
    for tag in tags {
        let src = format!("oci:{}:{tag}", layout.display());
        let dst = format!("docker://{}/hoist/{tag}:latest", reg.addr);
        hoist_env_ok(
            &["--plain-http", "convert", &src, &dst],
            &[("HOIST_HOME", &home)],
        );
    }
    let base = format!("docker://{}/hoist", proxy.addr);
    (reg, proxy, base)
}

#[test]
fn mounts_equal_umoci_in_both_modes_cold_warm_and_from_views() {
    let Some(layout) = setup() else { return };
    for tag in ["tiny-v1", "debian-python-v1", "debian-python-v2"] {
        let image = convert(&layout, tag, &format!("conv-{tag}"), &[]);
        for mode in MODES {
            let home = Home::new(&format!("equal-{tag}-{mode}"));
            let mp = home.mountpoint("root");
            let mps = mp.display().to_string();
            // cold: an empty cache. warm: a full one; this mount prefetches all, which
            // ends by building views. views: the kernel reads those (erofs: the blobs'
            // views as its devices; fuse: files of several chunks by passthrough).
            for round in ["cold", "warm", "views"] {
                let prefetch = if round == "warm" { "all" } else { "trace" };
                home.ok(&[
                    "mount",
                    "--mode",
                    mode,
                    "--prefetch",
                    prefetch,
                    &image,
                    &mps,
                ]);
                if mode == "erofs" {
                    // cold and warm: loop devices (on hoist's device files at first);
                    // views: a mount over the views themselves.
                    let s = home.stat(&mp);
                    let devices = if round == "views" { "views" } else { "loop" };
                    assert_eq!(s["devices"], devices, "{tag} {round}: {s}");
                    assert_eq!(s["local_devices"], round == "views", "{tag} {round}: {s}");
                    // The fixtures' metadata is read whole, into a local file.
                    assert_eq!(s["meta_local"], true, "{tag} {round}: {s}");
                }
                assert_same_tree(&layout, tag, &mp, &format!("{mode} mount ({round} cache)"));
                if round == "views" && mode == "fuse" {
                    assert_largest_file_by_passthrough(&home, &mp);
                }
                if round == "warm" {
                    let p = wait_prefetch(&home, &mp);
                    assert_eq!(p["views_failed"], 0, "{p}");
                    assert!(p["views_total"].as_u64().unwrap() > 0, "{p}");
                    if mode == "erofs" {
                        // Each blob moved to its view behind its loop device.
                        let s = home.stat(&mp);
                        assert_eq!(s["devices_local"], s["devices_total"], "{tag}: {s}");
                    }
                    let views: Value =
                        serde_json::from_str(&home.ok(&["cache", "stat", "--json"])).unwrap();
                    assert!(views["views"].as_u64().unwrap() > 0, "{views}");
                }
                let s = home.stat(&mp);
                assert_eq!(s["state"], "ready");
                if round == "cold" {
                    assert!(s["bytes_fetched"].as_u64().unwrap() > 0, "{s}");
                } else {
                    // Everything the tree reaches came from the cache.
                    assert_eq!(s["bytes_fetched"], 0, "warm mount fetched: {s}");
                    assert_eq!(s["requests"], 0, "{s}");
                    assert_eq!(s["cache_misses"], 0, "{s}");
                    // Every chunk a file uses is cached; chunks no file uses are
                    // never fetched, even when the kernel reads ahead into them.
                    assert_eq!(s["chunks_cached"], s["chunks_total"], "{s}");
                }
                if mode == "fuse" && tag == "tiny-v1" {
                    check_seek(&mp);
                    check_dirs(&mp);
                }
                // Unmounting a busy mount succeeds: it is detached at once.
                let busy = std::fs::File::open(mp.join("bin")).unwrap();
                home.ok(&["umount", &mps]);
                assert!(
                    !hoist_fs::kernel::is_mountpoint(&mp),
                    "{mode}: still mounted"
                );
                drop(busy);
            }
            // With no mount left, the cache can be emptied.
            let pruned = home.ok(&["cache", "prune"]);
            assert!(pruned.contains("removed"), "{pruned}");
            let stat = home.ok(&["cache", "stat", "--json"]);
            let stat: Value = serde_json::from_str(&stat).unwrap();
            assert_eq!(stat["chunks"], 0, "{stat}");
            assert_eq!(stat["views"], 0, "{stat}");
        }
    }
}

/// Waits (up to two minutes) for a mount's prefetch to finish; returns its progress.
fn wait_prefetch(home: &Home, mp: &Path) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let p = home.stat(mp)["prefetch"].clone();
        if p["state"] == "done" {
            return p;
        }
        assert!(Instant::now() < deadline, "prefetch not done: {p}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// With passthrough on, the largest file of the tree (several chunks) opens by
/// passthrough from its view, and its reads never reach hoist.
fn assert_largest_file_by_passthrough(home: &Home, mp: &Path) {
    let before = home.stat(mp);
    if before["passthrough"] != true {
        return;
    }
    let largest = walkdir(mp)
        .into_iter()
        .filter(|p| p.symlink_metadata().is_ok_and(|m| m.is_file()))
        .max_by_key(|p| p.metadata().map(|m| m.len()).unwrap_or(0))
        .unwrap();
    // Several chunks long (1 MiB each): it is read from its view.
    let len = std::fs::read(&largest).unwrap().len();
    assert!(len > 1 << 20, "{}: {len} bytes", largest.display());
    let after = home.stat(mp);
    assert_eq!(
        after["passthrough_opens"].as_u64().unwrap(),
        before["passthrough_opens"].as_u64().unwrap() + 1,
        "{}",
        largest.display()
    );
    assert_eq!(after["reads"], before["reads"], "{}", largest.display());
}

fn walkdir(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if e.file_type().unwrap().is_dir() {
            out.extend(walkdir(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Directories as the kernel opens them without asking hoist (its opendir answers
/// ENOSYS): `.` and `..` listed with the right inode numbers, the same entries when
/// listed again (from the kernel's cache), and ENOTDIR for a file opened as one.
fn check_dirs(mp: &Path) {
    use rustix::fs::{open, Dir, Mode, OFlags};
    use std::os::unix::fs::MetadataExt;
    let list = |dir: &Path| {
        let fd = open(dir, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        let mut names: Vec<(Vec<u8>, u64)> = Dir::read_from(&fd)
            .unwrap()
            .map(|e| {
                e.map(|e| (e.file_name().to_bytes().to_vec(), e.ino()))
                    .unwrap()
            })
            .collect();
        names.sort();
        names
    };
    let app = mp.join("app");
    let first = list(&app);
    let ino = |name: &[u8]| first.iter().find(|(n, _)| n == name).map(|(_, i)| *i);
    assert_eq!(ino(b"."), Some(app.metadata().unwrap().ino()), "{first:?}");
    assert_eq!(ino(b".."), Some(mp.metadata().unwrap().ino()), "{first:?}");
    assert!(ino(b"data.bin").is_some(), "{first:?}");
    assert_eq!(list(&app), first, "listed again");
    let err = open(
        app.join("data.bin"),
        OFlags::RDONLY | OFlags::DIRECTORY,
        Mode::empty(),
    );
    assert_eq!(err.err(), Some(rustix::io::Errno::NOTDIR));
}

/// SEEK_DATA and SEEK_HOLE on a file of zeros (stored as holes) and one of data.
fn check_seek(mp: &Path) {
    use rustix::fs::{seek, SeekFrom};
    let zeros = std::fs::File::open(mp.join("app/zeros.bin")).unwrap();
    assert_eq!(seek(&zeros, SeekFrom::Hole(0)).unwrap(), 0);
    assert_eq!(
        seek(&zeros, SeekFrom::Data(0)),
        Err(rustix::io::Errno::NXIO),
        "a file of holes has no data"
    );
    let data = std::fs::File::open(mp.join("app/data.bin")).unwrap();
    assert_eq!(seek(&data, SeekFrom::Data(4096)).unwrap(), 4096);
    assert_eq!(seek(&data, SeekFrom::Hole(0)).unwrap(), 8 << 20);
}

/// Generates a runc bundle running `args` in `rootfs`: umoci's config of the image
/// (env, cwd, user), with the given arguments and no terminal.
fn runc(bundle: &Path, rootfs: &Path, config_from: &Path, args: &[&str]) -> (i32, String) {
    let mut config: Value =
        serde_json::from_slice(&std::fs::read(config_from.join("config.json")).unwrap()).unwrap();
    config["root"] = serde_json::json!({"path": rootfs, "readonly": false});
    config["process"]["args"] = serde_json::json!(args);
    config["process"]["terminal"] = Value::Bool(false);
    std::fs::create_dir_all(bundle).unwrap();
    std::fs::write(bundle.join("config.json"), config.to_string()).unwrap();
    let id = format!("hoist-test-{}", std::process::id());
    let out = run_bounded(
        Command::new("runc")
            .args(["run", "--bundle"])
            .arg(bundle)
            .arg(&id),
        Duration::from_secs(120),
    );
    let _ = Command::new("runc").args(["delete", "-f", &id]).output();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn python_runs_lazily_under_runc_in_both_modes() {
    let Some(layout) = setup() else { return };
    require("python under runc", &[Need::tool("runc")]);
    let tag = "debian-python-v1";
    // The reference: umoci's bundle of the original image.
    let reference = umoci_unpack(&layout, tag, "runc-ref");
    let cmd = ["python3", "/app/main.py"];
    let (code, want) = runc(
        &scratch().join("bundle-ref"),
        &reference.join("rootfs"),
        &reference,
        &cmd,
    );
    assert_eq!(code, 0, "reference run: {want}");

    let (_reg, proxy, base) = registry_with(&layout, &[tag]);
    let image = format!("{base}/{tag}:latest");
    let image_bytes: u64 = {
        let home = Home::new("inspect");
        let out = home.ok(&["--plain-http", "inspect", "--json", &image]);
        let v: Value = serde_json::from_str(&out).unwrap();
        v["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["size"].as_u64().unwrap())
            .sum()
    };
    for mode in MODES {
        let home = Home::new(&format!("runc-{mode}"));
        let mp = home.mountpoint("lower");
        let mps = mp.display().to_string();
        let before = proxy.bytes_down();
        home.ok(&["--plain-http", "mount", "--mode", mode, &image, &mps]);
        let mounted = proxy.bytes_down() - before;
        assert!(
            mounted * 20 < image_bytes,
            "{mode}: mounting read {mounted} of {image_bytes} bytes (5% or more)"
        );
        // A writable layer on top, as a container runtime does.
        let upper = home.mountpoint("upper");
        let work = home.mountpoint("work");
        let merged = home.mountpoint("merged");
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            mp.display(),
            upper.display(),
            work.display()
        );
        let st = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(&merged)
            .status()
            .unwrap();
        assert!(st.success(), "overlay mount");
        let (code, got) = runc(&home.root.join("bundle"), &merged, &reference, &cmd);
        let ran = proxy.bytes_down() - before;
        let s = home.stat(&mp);
        eprintln!(
            "{mode}: mount read {mounted} B, mount + python3 /app/main.py read {ran} B of {image_bytes} B ({:.1}%); hoist stat: fetched {} B in {} requests, {} of {} chunks cached, {} libraries and {} python modules fetched ahead",
            ran as f64 * 100.0 / image_bytes as f64,
            s["bytes_fetched"],
            s["requests"],
            s["chunks_cached"],
            s["chunks_total"],
            s["libraries"],
            s["modules"]
        );
        assert_eq!(
            (code, &got),
            (0, &want),
            "{mode}: output differs from the reference run"
        );
        assert!(
            ran * 2 < image_bytes,
            "{mode}: running main.py read {ran} of {image_bytes} bytes"
        );
        assert!(s["bytes_fetched"].as_u64().unwrap() > 0);
        // python3.11 loads libm, libz, libexpat and libc: once its dynamic section was
        // in, they were asked for before the loader opened the first of them.
        assert!(
            s["libraries"].as_u64().unwrap() >= 3,
            "{mode}: {} libraries fetched ahead",
            s["libraries"]
        );
        // main.py imports hashlib, json and sqlite3, which import more (json.decoder,
        // re, enum, functools, collections, datetime, ...): the script's read and each
        // compiled module's asked for them before the interpreter did.
        assert!(
            s["modules"].as_u64().unwrap() >= 10,
            "{mode}: {} python modules fetched ahead",
            s["modules"]
        );
        Command::new("umount").arg(&merged).status().unwrap();
        home.ok(&["umount", &mps]);
    }
    // `hoist run` tells the daemon what it runs: python3 and main.py are fetched while
    // runc starts, with the C library's files python's start reads and the modules it
    // imports first, and main.py's imports as soon as it is in.
    for mode in MODES {
        let home = Home::new(&format!("run-{mode}"));
        let stats = home.root.join("stats.json");
        let s = stats.display().to_string();
        let args = [
            "--plain-http",
            "run",
            "--rm",
            "--mode",
            mode,
            "--stats-json",
            &s,
        ];
        let got = home.ok(&[&args[..], &[image.as_str(), "--"], &cmd[..]].concat());
        assert_eq!(
            got, want,
            "{mode}: hoist run's output differs from the reference run"
        );
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
        let s = &v["stat"];
        eprintln!(
            "{mode}: hoist run fetched {} files for the process, {} libraries, {} python modules ahead; {} misses",
            s["process_files"], s["libraries"], s["modules"], s["cache_misses"]
        );
        assert_eq!(
            s["process_files"], 5,
            "{mode}: python3, /app/main.py, and C.UTF-8's LC_CTYPE, gconv-modules.cache \
             and /etc/localtime: {s}"
        );
        assert!(s["modules"].as_u64().unwrap() >= 10, "{mode}: {s}");
    }
}

fn read(path: &Path) -> std::io::Result<Vec<u8>> {
    std::fs::read(path)
}

#[test]
fn registry_outage_gives_eio_within_the_bound_and_recovers() {
    let Some(layout) = setup() else { return };
    let tag = "tiny-v1";
    let reference = umoci_unpack(&layout, tag, "outage-ref");
    let want_busybox = read(&reference.join("rootfs/bin/busybox")).unwrap();
    let want_data = read(&reference.join("rootfs/app/data.bin")).unwrap();
    let (mut reg, _proxy, base) = registry_with(&layout, &[tag]);
    let image = format!("{base}/{tag}:latest");
    for mode in MODES {
        let home = Home::new(&format!("outage-{mode}"));
        let mp = home.mountpoint("root");
        let mps = mp.display().to_string();
        home.ok(&[
            "--plain-http",
            "--retries",
            "1",
            "mount",
            "--mode",
            mode,
            "--read-timeout",
            "5",
            &image,
            &mps,
        ]);
        assert_eq!(read(&mp.join("bin/busybox")).unwrap(), want_busybox);
        reg.stop();
        // Uncached data: EIO, within the bound (5 s, plus the kernel's own retries of
        // readahead in erofs mode).
        let t = Instant::now();
        let err = read(&mp.join("app/data.bin"))
            .expect_err("read of uncached data with the registry down");
        let took = t.elapsed();
        assert_eq!(err.raw_os_error(), Some(5), "{mode}: {err}");
        assert!(took < Duration::from_secs(25), "{mode}: EIO after {took:?}");
        // Cached data is still served.
        assert_eq!(read(&mp.join("bin/busybox")).unwrap(), want_busybox);
        reg.restart();
        // Recovery without intervention.
        assert_eq!(
            read(&mp.join("app/data.bin")).unwrap(),
            want_data,
            "{mode}: after the registry came back"
        );
        let s = home.stat(&mp);
        assert!(s["fetch_errors"].as_u64().unwrap() > 0, "{s}");
        home.ok(&["umount", &mps]);
    }
}

#[test]
fn corrupted_data_is_never_served() {
    let Some(layout) = setup() else { return };
    let tag = "tiny-v1";
    let reference = umoci_unpack(&layout, tag, "corrupt-ref");
    let want = read(&reference.join("rootfs/app/data.bin")).unwrap();
    let (_reg, proxy, base) = registry_with(&layout, &[tag]);
    let image = format!("{base}/{tag}:latest");
    for mode in MODES {
        let home = Home::new(&format!("corrupt-{mode}"));
        let mp = home.mountpoint("root");
        let mps = mp.display().to_string();
        home.ok(&["--plain-http", "mount", "--mode", mode, &image, &mps]);
        // Every blob range read now has one byte flipped.
        proxy.on("GET", "/blobs/", 1000, Fault::Corrupt { at: 10 });
        let err = read(&mp.join("app/data.bin")).expect_err("corrupted chunks must not be served");
        assert_eq!(err.raw_os_error(), Some(5), "{mode}: {err}");
        proxy.clear();
        assert_eq!(
            read(&mp.join("app/data.bin")).unwrap(),
            want,
            "{mode}: after the proxy healed"
        );
        home.ok(&["umount", &mps]);
    }
}

/// erofs mode where loop devices cannot be had (here: `/dev/loop-control` covered in a
/// mount namespace of its own): the mount reads hoist's device files, exactly, and says
/// so.
#[test]
fn an_erofs_mount_without_loop_devices_reads_the_device_files_and_says_so() {
    let Some(layout) = setup() else { return };
    let tag = "tiny-v1";
    let image = convert(&layout, tag, "conv-noloop", &[]);
    let reference = umoci_unpack(&layout, tag, "noloop-ref");
    let want = read(&reference.join("rootfs/app/data.bin")).unwrap();
    let home = Home::new("noloop");
    let mp = home.mountpoint("root");
    // The daemon starts inside the namespace, so its mounts live there: everything
    // that looks at the mount runs there too.
    let script = r#"set -e
mount --bind /dev/null /dev/loop-control
"$HOIST" mount --mode erofs --prefetch none "$IMAGE" "$MP" >/dev/null
cat "$MP/app/data.bin" > "$ROOT/data.bin"
"$HOIST" stat --json "$MP" > "$ROOT/stat.json"
"$HOIST" umount "$MP" >/dev/null
"$HOIST" daemon stop >/dev/null"#;
    let out = run_bounded(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", script])
            .env("HOIST", env!("CARGO_BIN_EXE_hoist"))
            .env("HOIST_HOME", &home.root)
            .env("IMAGE", &image)
            .env("MP", &mp)
            .env("ROOT", &home.root),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        read(&home.root.join("data.bin")).unwrap() == want,
        "app/data.bin differs"
    );
    let s: Value = serde_json::from_slice(&read(&home.root.join("stat.json")).unwrap()).unwrap();
    assert_eq!(s["devices"], "files", "{s}");
    assert_eq!(s["devices_local"], 0, "{s}");
    let log = std::fs::read_to_string(home.root.join("daemon.log")).unwrap();
    assert!(log.contains("no loop devices"), "{log}");
}

/// Kills the daemon of `home` with SIGKILL and waits for it to be gone (its FUSE
/// connections close with it).
/// Kills the whole daemon of `home` with SIGKILL: its holder, and so its server (which
/// dies with it); waits for both to be gone (their FUSE connections close with them).
fn kill_daemon(home: &Home) {
    let out = home.ok(&["daemon", "status", "--json"]);
    let s: Value = serde_json::from_str(&out).unwrap();
    let holder = s["daemon"]["holder"]["pid"].as_i64().expect("a holder") as i32;
    let server = s["daemon"]["pid"].as_i64().unwrap() as i32;
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(holder).unwrap(),
        rustix::process::Signal::Kill,
    )
    .unwrap();
    let t = Instant::now();
    for pid in [holder, server] {
        while std::fs::read_to_string(format!("/proc/{pid}/status"))
            .is_ok_and(|s| !s.contains("State:\tZ"))
        {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "daemon process {pid} survived the holder's SIGKILL"
            );
            std::thread::yield_now();
        }
    }
}

#[test]
fn killed_daemon_leaves_no_hanging_mount_and_a_verified_cache() {
    let Some(layout) = setup() else { return };
    let tag = "tiny-v1";
    let image = convert(&layout, tag, "conv-kill", &[]);
    for mode in MODES {
        let home = Home::new(&format!("kill-{mode}"));
        let mp = home.mountpoint("root");
        let mps = mp.display().to_string();
        home.ok(&["mount", "--mode", mode, &image, &mps]);
        // Cache part of the image, and keep a file open across the kill.
        std::fs::read(mp.join("bin/busybox")).unwrap();
        let held = std::fs::File::open(mp.join("app/hello.txt")).unwrap();
        kill_daemon(&home);
        // Processes on the mount get errors at once, not D state.
        let out = run_bounded(
            Command::new("cat").arg(mp.join("app/data.bin")),
            Duration::from_secs(10),
        );
        assert!(
            !out.status.success(),
            "{mode}: reading uncached data from a dead mount succeeded"
        );
        drop(held);
        // Damage a cached chunk: the next daemon must verify before serving it.
        let chunk = std::fs::read_dir(home.root.join("cache/chunks"))
            .unwrap()
            .flatten()
            .flat_map(|d| std::fs::read_dir(d.path()).unwrap().flatten())
            .max_by_key(|e| e.metadata().unwrap().len())
            .unwrap()
            .path();
        let mut bytes = std::fs::read(&chunk).unwrap();
        bytes[0] ^= 0xff;
        std::fs::write(&chunk, bytes).unwrap();
        // A new mount on the same mount point works (the new daemon detaches the dead
        // one), and the tree is exact although the cache held a damaged chunk.
        home.ok(&["mount", "--mode", mode, &image, &mps]);
        assert_same_tree(
            &layout,
            tag,
            &mp,
            &format!("{mode} mount after a killed daemon"),
        );
        home.ok(&["umount", &mps]);
    }
}

/// Drops the page cache, so that the next reads reach the devices.
fn drop_caches() {
    rustix::fs::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").unwrap();
}

/// erofs mode: the mount that fetches the image moves each blob to its view behind the
/// same loop device once the view is built, while mounted: files opened before read on,
/// nothing reaches hoist any more, and the mount outlives a killed daemon.
#[test]
fn an_erofs_mount_moves_to_its_views_while_mounted_and_outlives_its_daemon() {
    use std::io::{Read, Seek};
    let Some(layout) = setup() else { return };
    let tag = "tiny-v1";
    let image = convert(&layout, tag, "conv-move", &[]);
    let reference = umoci_unpack(&layout, tag, "move-ref");
    let want = read(&reference.join("rootfs/app/data.bin")).unwrap();
    let home = Home::new("move");
    let mp = home.mountpoint("root");
    let mps = mp.display().to_string();
    home.ok(&[
        "mount",
        "--mode",
        "erofs",
        "--prefetch",
        "all",
        &image,
        &mps,
    ]);
    let s = home.stat(&mp);
    assert_eq!(s["devices"], "loop", "{s}");
    // A file opened while the blobs are still hoist's device files.
    let mut held = std::fs::File::open(mp.join("app/data.bin")).unwrap();
    let mut head = vec![0; 4096];
    held.read_exact(&mut head).unwrap();
    assert_eq!(head, want[..4096]);

    let p = wait_prefetch(&home, &mp);
    assert_eq!(p["views_failed"], 0, "{p}");
    let s = home.stat(&mp);
    assert_eq!(s["devices_local"], s["devices_total"], "{s}");
    assert_eq!(s["local_devices"], true, "{s}");

    // Everything now comes from the views: the held file, then the whole tree, read
    // from the disk (no page cache), and not one read reaches hoist.
    drop_caches();
    let reads = s["reads"].as_u64().unwrap();
    let mut all = Vec::new();
    held.rewind().unwrap();
    held.read_to_end(&mut all).unwrap();
    assert!(all == want, "app/data.bin, open across the move, differs");
    assert_same_tree(&layout, tag, &mp, "erofs mount moved to its views");
    let s = home.stat(&mp);
    assert_eq!(
        s["reads"].as_u64().unwrap(),
        reads,
        "reads reached hoist: {s}"
    );

    // hoist is out of the read path: the mount outlives its daemon.
    kill_daemon(&home);
    drop_caches();
    assert_same_tree(&layout, tag, &mp, "erofs mount on views, daemon killed");
    drop(held);
    // Unmounting it detaches the mount and the dead daemon's private mounts; the loop
    // devices go with them.
    let out = home.ok(&["umount", &mps]);
    assert!(out.contains("daemon that died"), "{out}");
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let left: Vec<&str> = info
        .lines()
        .filter(|l| l.contains(&*home.root.to_string_lossy()))
        .collect();
    assert!(left.is_empty(), "left mounted: {left:?}");
    assert_eq!(loops_under(&home.root), Vec::<String>::new());
}

/// Regression: the kernel refuses an open by FUSE passthrough while the same inode is
/// open through the page cache (`sh: wc: Input/output error` on a cold `hoist run`,
/// when the binary's chunk arrived between two opens of it). An inode keeps the mode of
/// its first open while it is open; a later first open uses passthrough.
/// Issue 20: a mount of a version 3 image reads its metadata in chunks, as lookups need
/// them (fuse mode: hoist's; erofs mode: the kernel's, through hoist's `meta` device
/// file), and serves the same tree as with all of it read at mount.
#[test]
fn a_mount_reads_its_metadata_on_demand_and_equals_umoci() {
    if setup().is_none() {
        return;
    }
    // An image of many small files, whose metadata is many chunks, in directories of
    // 3,000 entries (many blocks each).
    let src = scratch().join("many-files");
    let _ = std::fs::remove_dir_all(&src);
    let mut entries = vec![raw_entry(b"many/", b'5', b"", b"")];
    for d in 0..10 {
        entries.push(raw_entry(
            format!("many/d{d:02}/").as_bytes(),
            b'5',
            b"",
            b"",
        ));
        for f in 0..3000 {
            let body = format!("module.exports = {{ dir: {d}, file: {f} }};\n");
            let path = format!("many/d{d:02}/f{f:04}.js");
            entries.push(raw_entry(path.as_bytes(), b'0', b"", body.as_bytes()));
        }
    }
    make_layout(&src, "many", &[tar_of(&entries)]);
    let image = convert(&src, "many", "conv-lazy-meta", &[]);
    let dir = image.trim_start_matches("oci:").rsplit_once(':').unwrap().0;
    let index: Value =
        serde_json::from_slice(&std::fs::read(format!("{dir}/index.json")).unwrap()).unwrap();
    let manifest_hex = &index["manifests"][0]["digest"].as_str().unwrap()[7..];
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(format!("{dir}/blobs/sha256/{manifest_hex}")).unwrap(),
    )
    .unwrap();
    let layer = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["mediaType"].as_str().unwrap().contains("meta"))
        .unwrap()["size"]
        .as_u64()
        .unwrap();
    for mode in ["fuse", "erofs"] {
        // Each mode from an empty cache.
        let home = Home::new(&format!("lazy-meta-{mode}"));
        let mp = home.mountpoint("root");
        let mps = mp.display().to_string();
        // 0: on demand whatever its size (by default only layers over 1 MiB are).
        let args = [
            "mount",
            "--mode",
            mode,
            "--prefetch",
            "none",
            "--meta-whole-max",
            "0",
        ];
        home.ok(&[&args[..], &[&image, &mps]].concat());
        let s = home.stat(&mp);
        let at_mount = s["meta_bytes"].as_u64().unwrap();
        assert!(
            at_mount * 2 < layer,
            "{mode}: the mount read {at_mount} bytes of a {layer}-byte metadata layer"
        );
        assert_eq!(s["meta_local"], false, "{mode}: {s}");
        // Lookups in directories not listed yet, then the whole tree.
        for (path, want) in [
            (
                "many/d07/f2345.js",
                Some("module.exports = { dir: 7, file: 2345 };\n"),
            ),
            (
                "many/d07/f0000.js",
                Some("module.exports = { dir: 7, file: 0 };\n"),
            ),
            (
                "many/d03/f2999.js",
                Some("module.exports = { dir: 3, file: 2999 };\n"),
            ),
            ("many/d07/f2345.jsx", None),
            ("many/d07/a", None),
            ("many/d07/z", None),
        ] {
            let got = std::fs::read_to_string(mp.join(path));
            match want {
                Some(w) => assert_eq!(got.unwrap(), w, "{mode}: {path}"),
                None => assert_eq!(
                    got.unwrap_err().kind(),
                    std::io::ErrorKind::NotFound,
                    "{mode}: {path}"
                ),
            }
        }
        assert_same_tree(
            &src,
            "many",
            &mp,
            &format!("{mode}: metadata read on demand"),
        );
        let walked = home.stat(&mp)["meta_bytes"].as_u64().unwrap();
        assert!(
            walked > at_mount,
            "{mode}: a walk read no metadata: {walked}"
        );
        home.ok(&["umount", &mps]);

        // Mounted again, the metadata read before, its chunk table included, comes from
        // the cache: nothing is fetched.
        home.ok(&[&args[..], &[&image, &mps]].concat());
        assert_same_tree(
            &src,
            "many",
            &mp,
            &format!("{mode}: metadata from the cache"),
        );
        let again = home.stat(&mp)["meta_bytes"].as_u64().unwrap();
        assert_eq!(again, 0, "{mode}: fetched {again} bytes of metadata again");
        home.ok(&["umount", &mps]);
    }

    // erofs mode, the whole image wanted local: the metadata's loop device moves from
    // hoist's device file to the local file, as the blobs' move to their views, and then
    // not one read of the tree reaches hoist.
    let home = Home::new("lazy-meta-all");
    let mp = home.mountpoint("root");
    let mps = mp.display().to_string();
    let all = [
        "mount",
        "--mode",
        "erofs",
        "--prefetch",
        "all",
        "--meta-whole-max",
        "0",
    ];
    home.ok(&[&all[..], &[&image, &mps]].concat());
    let deadline = Instant::now() + Duration::from_secs(60);
    let s = loop {
        let s = home.stat(&mp);
        if s["local_devices"] == true {
            break s;
        }
        assert!(Instant::now() < deadline, "not all local: {s}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(s["meta_local"], true, "{s}");
    let local_meta = home.root.join("cache/meta").display().to_string();
    assert_eq!(
        loops_under(Path::new(&local_meta)).len(),
        1,
        "a loop device reading the local metadata"
    );
    drop_caches();
    let reads = s["reads"].as_u64().unwrap();
    assert_same_tree(&src, "many", &mp, "erofs: all local");
    let s = home.stat(&mp);
    assert_eq!(s["reads"].as_u64().unwrap(), reads, "{s}");
    home.ok(&["umount", &mps]);

    // Mounted again, the local file is checked against the pinned digests and mounted:
    // nothing is fetched, and nothing goes through hoist.
    home.ok(&[&all[..3], &all[5..], &[&image, &mps]].concat());
    let s = home.stat(&mp);
    assert_eq!(s["meta_local"], true, "{s}");
    assert_eq!(s["meta_bytes"].as_u64(), Some(0), "{s}");
    assert_same_tree(&src, "many", &mp, "erofs: mounted again");
    home.ok(&["umount", &mps]);
}

#[test]
fn a_file_open_through_the_page_cache_is_reopened_the_same_way() {
    use std::io::Read;
    let Some(layout) = setup() else { return };
    // Without frames, so that the small file is a chunk of its own, which passthrough
    // can serve (a file in a frame is always served by hoist).
    let image = convert(&layout, "tiny-v1", "conv-reopen", &["--frame-size", "0"]);
    let home = Home::new("reopen");
    let mp = home.mountpoint("m");
    home.ok(&["mount", "--mode", "fuse", &image, &mp.display().to_string()]);
    let path = mp.join("app/hello.txt");
    let mut first = std::fs::File::open(&path).unwrap();
    let mut a = String::new();
    first.read_to_string(&mut a).unwrap();
    assert_eq!(a, "hello from tiny-v1 upper\n");
    // Its chunk is cached now; a second open while the first is live must still work.
    let mut b = String::new();
    std::fs::File::open(&path)
        .and_then(|mut f| f.read_to_string(&mut b))
        .expect("second open of a file open through the page cache");
    assert_eq!(a, b);
    drop(first);
    let before = home.stat(&mp)["passthrough_opens"].as_u64().unwrap();
    let mut c = String::new();
    std::fs::File::open(&path)
        .and_then(|mut f| f.read_to_string(&mut c))
        .unwrap();
    assert_eq!(a, c);
    if home.stat(&mp)["passthrough"] == true {
        assert_eq!(
            home.stat(&mp)["passthrough_opens"].as_u64().unwrap(),
            before + 1,
            "once closed, the cached file opens by passthrough"
        );
    }
}

#[test]
fn a_cache_directory_removed_under_the_daemon_is_made_again() {
    // Issue 15: `rm -rf` of a --cache-dir between two mounts failed every later mount
    // of that daemon ("…/meta/…: No such file or directory … tmp/.tmp…").
    let Some(layout) = setup() else { return };
    let image = convert(&layout, "tiny-v1", "conv-rmcache", &[]);
    let reference = umoci_unpack(&layout, "tiny-v1", "rmcache-ref");
    let want = read(&reference.join("rootfs/app/hello.txt")).unwrap();
    let home = Home::new("rmcache");
    let mp = home.mountpoint("root");
    let cache = home.root.join("c");
    let (m, c) = (mp.display().to_string(), cache.display().to_string());
    for mode in MODES {
        for round in 0..2 {
            home.ok(&["mount", "--mode", mode, &image, &m, "--cache-dir", &c]);
            assert_eq!(
                read(&mp.join("app/hello.txt")).unwrap(),
                want,
                "{mode} {round}"
            );
            home.ok(&["umount", &m]);
            std::fs::remove_dir_all(&cache).unwrap();
        }
    }
}

#[test]
fn umount_refuses_a_mount_hoist_did_not_make() {
    // Issue 19: `hoist umount` detached any mount point, a tmpfs for instance.
    if !require("hoist umount of a tmpfs", &[Need::Root]) {
        return;
    }
    let home = Home::new("umount-foreign");
    let mp = home.mountpoint("tmpfs");
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "none"])
        .arg(&mp)
        .status()
        .unwrap();
    assert!(status.success());
    let out = home.run(&["umount", &mp.display().to_string()]);
    let err = String::from_utf8_lossy(&out.stderr);
    let still = hoist_fs::kernel::is_mountpoint(&mp);
    let _ = Command::new("umount").arg(&mp).status();
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("is not a mount of hoist's"), "{err}");
    assert!(still, "the tmpfs was unmounted");
}

#[test]
fn a_foreground_mount_is_unmounted_by_hoist_umount() {
    let Some(layout) = setup() else { return };
    let image = convert(&layout, "tiny-v1", "conv-foreground", &[]);
    let home = Home::new("foreground");
    let mp = home.mountpoint("root");
    let mut child = Command::new(env!("CARGO_BIN_EXE_hoist"))
        .args(["mount", "--foreground", &image])
        .arg(&mp)
        .env("HOIST_HOME", &home.root)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // It says so on stderr once the mount is served.
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut err, &mut line).unwrap();
    assert!(line.starts_with("serving"), "{line}");
    assert!(mp.join("app/hello.txt").exists());
    let out = home.ok(&["umount", &mp.display().to_string()]);
    assert!(out.contains("--foreground"), "{out}");
    let status = run_bounded_child(&mut child, Duration::from_secs(30));
    assert!(status.success());
    assert!(!hoist_fs::kernel::is_mountpoint(&mp));
}

/// Waits for `child` at most `limit`.
fn run_bounded_child(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "still running after {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The cache on a disk too small for the image, then on a full one (issue 15: a full
/// disk fails only the reads that need space, and serving goes on). On a 4 MiB tmpfs,
/// smaller than the image's 10 MB of data, the whole tree reads exact: the store makes
/// room by evicting its oldest files when a write finds the disk full. With the disk
/// filled by another file and nothing of the cache to evict, a read that needs a fetch
/// fails with EIO, the server stays the same, and once space is freed the same read
/// works without a restart.
#[test]
fn a_full_cache_disk_fails_only_the_reads_that_need_space() {
    let Some(layout) = setup() else { return };
    let tag = "tiny-v1";
    let image = convert(&layout, tag, "conv-full", &[]);
    let want = read(&umoci_unpack(&layout, tag, "full-ref").join("rootfs/app/data.bin")).unwrap();
    for mode in MODES {
        let home = Home::new(&format!("full-{mode}"));
        let small = home.root.join("small");
        std::fs::create_dir_all(&small).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs"])
            .arg(&small)
            .status()
            .unwrap();
        assert!(st.success(), "mounting a tmpfs on {}", small.display());
        let cache = small.join("cache").display().to_string();
        let mp = home.mountpoint("root");
        let mps = mp.display().to_string();
        let mount = || {
            home.ok(&[
                "mount",
                "--mode",
                mode,
                "--prefetch",
                "none",
                "--cache-dir",
                &cache,
                &image,
                &mps,
            ])
        };
        mount();
        assert_same_tree(&layout, tag, &mp, &format!("{mode}: cache on a 4 MiB disk"));
        let s = home.stat(&mp);
        assert!(
            s["bytes_fetched"].as_u64().unwrap() > 4 << 20,
            "{mode}: more than the disk holds went through the cache: {s}"
        );
        home.ok(&["umount", &mps]);

        // A fresh cache (only the metadata), then the disk filled by another file.
        let _ = std::fs::remove_dir_all(small.join("cache/chunks"));
        mount();
        let server = |home: &Home| {
            let s: Value = serde_json::from_str(&home.ok(&["daemon", "status", "--json"])).unwrap();
            s["daemon"]["pid"].as_i64().unwrap()
        };
        let pid = server(&home);
        let filler = small.join("filler");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&filler).unwrap();
            let block = vec![0x5a; 64 << 10];
            while f.write_all(&block).is_ok() {}
            let _ = f.sync_all();
        }
        drop_caches();
        let data = mp.join("app/data.bin");
        let out = run_bounded(Command::new("cat").arg(&data), Duration::from_secs(40));
        assert!(
            !out.status.success(),
            "{mode}: a read needing space on a full disk succeeded"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("Input/output error"), "{mode}: {err}");
        // Serving goes on: the same server answers, and what needs no space (the tree's
        // metadata, in the cache already) reads.
        assert_eq!(server(&home), pid, "{mode}: the server changed");
        let names = std::fs::read_dir(mp.join("app")).unwrap().count();
        assert!(names > 0, "{mode}: app/ lists nothing");
        std::fs::remove_file(&filler).unwrap();
        assert!(
            read(&data).unwrap() == want,
            "{mode}: app/data.bin after space was freed"
        );
        assert_eq!(server(&home), pid, "{mode}: the server changed");
        home.ok(&["umount", &mps]);
    }
}

/// Issue 19: with the registry stalling, one 4 KiB `pread` of uncached data fails with
/// EIO within `--read-timeout` plus 2 s, in both modes. The kernel turns it into several
/// requests (readahead, then the read itself): each used to wait a bound of its own
/// (60 s in fuse mode, 90 s in erofs mode, for a 30 s bound).
#[test]
fn a_stalled_registry_fails_one_read_within_the_bound() {
    use std::os::unix::fs::FileExt;
    let Some(layout) = setup() else { return };
    let tag = "tiny-v1";
    let (_reg, proxy, base) = registry_with(&layout, &[tag]);
    let image = format!("{base}/{tag}:latest");
    for mode in MODES {
        let home = Home::new(&format!("stall-{mode}"));
        let mp = home.mountpoint("root");
        let mps = mp.display().to_string();
        home.ok(&[
            "--plain-http",
            "mount",
            "--mode",
            mode,
            "--prefetch",
            "none",
            "--read-timeout",
            "5",
            &image,
            &mps,
        ]);
        proxy.on("GET", "/blobs/", u64::MAX, Fault::Stall { after: 0 });
        let f = std::fs::File::open(mp.join("app/data.bin")).unwrap();
        let mut buf = [0u8; 4096];
        let t = Instant::now();
        let err = f
            .read_at(&mut buf, 4 << 20)
            .expect_err("a read of uncached data with the registry stalling");
        let took = t.elapsed();
        eprintln!("{mode}: EIO after {took:?}");
        assert_eq!(err.raw_os_error(), Some(5), "{mode}: {err}");
        assert!(
            took < Duration::from_secs(7),
            "{mode}: one pread waited {took:?} for a 5 s bound"
        );
        proxy.clear();
        drop(f);
        home.ok(&["umount", &mps]);
    }
}

#[test]
fn a_flipped_byte_in_a_view_is_never_served() {
    // Issue 19: a byte flipped in a file under cache/views/ was served, wrong, by the
    // next daemon's mount (views were trusted forever; damaged chunks were not).
    use std::os::unix::fs::FileExt;
    let Some(layout) = setup() else { return };
    let tag = "tiny-v1";
    let image = convert(&layout, tag, "conv-views", &[]);
    for mode in MODES {
        let home = Home::new(&format!("views-{mode}"));
        let mp = home.mountpoint("root");
        let mps = mp.display().to_string();
        let mount = |prefetch| {
            home.ok(&[
                "mount",
                "--mode",
                mode,
                "--prefetch",
                prefetch,
                &image,
                &mps,
            ])
        };
        mount("all");
        wait_prefetch(&home, &mp);
        home.ok(&["umount", &mps]);
        home.ok(&["daemon", "stop"]);
        // One byte flipped in the middle of every view, where the data is (or a hole,
        // which must read as zeros). The originals are kept to check the repair.
        let views: Vec<PathBuf> = std::fs::read_dir(home.root.join("cache/views"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(!views.is_empty(), "{mode}: no views built");
        let mut originals = Vec::new();
        for v in &views {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(v)
                .unwrap();
            let at = f.metadata().unwrap().len() / 2;
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, at).unwrap();
            f.write_all_at(&[b[0] ^ 0xff], at).unwrap();
            originals.push((v.clone(), at, b[0]));
        }
        drop_caches();

        // A new daemon, and no prefetch (which would find the damage first): the tree is
        // exact at once, hoist serving what it has not verified.
        mount("none");
        assert_same_tree(&layout, tag, &mp, &format!("{mode}: views damaged on disk"));
        // Every damaged view is found, built again from verified chunks, and then used.
        let deadline = Instant::now() + Duration::from_secs(60);
        let s = loop {
            let s = home.stat(&mp);
            if s["views_damaged"].as_u64() == Some(views.len() as u64) {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "{mode}: damaged views not all found: {s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        for (v, at, byte) in &originals {
            let mut b = [0u8; 1];
            std::fs::File::open(v)
                .unwrap()
                .read_exact_at(&mut b, *at)
                .unwrap();
            assert_eq!(b[0], *byte, "{mode}: {} not repaired", v.display());
        }
        if mode == "erofs" {
            let deadline = Instant::now() + Duration::from_secs(60);
            while home.stat(&mp)["devices_local"] != s["devices_total"] {
                assert!(
                    Instant::now() < deadline,
                    "{mode}: blobs not moved to their views"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        drop_caches();
        assert_same_tree(&layout, tag, &mp, &format!("{mode}: from repaired views"));
        if mode == "fuse" {
            assert_largest_file_by_passthrough(&home, &mp);
        }
        home.ok(&["umount", &mps]);
    }
}

/// Issue 19: a registry stalling on the metadata blob held `hoist mount` for 188 s (a
/// stall timeout per resume, five resumes) and the error said "error decoding response
/// body after 5 resumes". The mount gives up within `--read-timeout`, and the error
/// names the blob, the registry, how long it waited and what to do.
#[test]
fn a_registry_stalling_on_the_metadata_blob_fails_the_mount_within_the_timeout() {
    let Some(layout) = setup() else { return };
    let tag = "tiny-v1";
    let (_reg, proxy, base) = registry_with(&layout, &[tag]);
    let image = format!("{base}/{tag}:latest");
    let home = Home::new("stall-meta");
    let inspect: Value =
        serde_json::from_str(&home.ok(&["--plain-http", "inspect", "--json", &image])).unwrap();
    let meta = inspect["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["media_type"] == "application/vnd.oci.image.layer.hoist.meta.v1.erofs")
        .and_then(|l| l["digest"].as_str())
        .unwrap_or_else(|| panic!("no metadata layer in {inspect}"))
        .to_string();
    proxy.on(
        "GET",
        &format!("/blobs/{meta}"),
        u64::MAX,
        Fault::Stall { after: 0 },
    );
    let mp = home.mountpoint("root");
    let timeout = 3;
    let t = Instant::now();
    let out = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_hoist"))
            .args([
                "--plain-http",
                "mount",
                "--read-timeout",
                &timeout.to_string(),
            ])
            .arg(&image)
            .arg(&mp)
            .env("HOIST_HOME", &home.root),
        Duration::from_secs(120),
    );
    let took = t.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("gave up after {took:?}: {stderr}");
    assert!(
        !out.status.success(),
        "mounted with the metadata blob stalled"
    );
    assert!(
        took < Duration::from_secs(timeout + 5),
        "gave up after {took:?} for a {timeout} s timeout: {stderr}"
    );
    for want in [
        meta.as_str(),
        &format!("{}/hoist/{tag}", proxy.addr),
        "sent no data for",
        "--read-timeout",
    ] {
        assert!(stderr.contains(want), "{stderr:?} does not say {want:?}");
    }
    assert!(proxy.faults() >= 1, "the stall was not injected");
}

/// What the cache's chunks/ and views/ take on disk, in bytes (allocated: a view of a
/// file with holes is sparse), as the cache counts it against its cap.
fn cache_bytes(cache: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fn walk(dir: &Path) -> u64 {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        entries
            .flatten()
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => walk(&e.path()),
                Ok(_) => e.metadata().map_or(0, |m| m.blocks() * 512),
                Err(_) => 0,
            })
            .sum()
    }
    walk(&cache.join("chunks")) + walk(&cache.join("views"))
}

/// Issue 17: with `--cache-size 30M`, a tar of a mounted image left 153 MB in the cache,
/// and `hoist cache prune` removed nothing: every chunk of a mounted image was pinned.
/// Past the cap, chunks of mounted images are evicted too (least recently used first)
/// and fetched again when read. A cap of a fifth of the image: every file reads right,
/// the cache stays within the cap plus the chunks in flight (sampled throughout), and a
/// second read fetches again what was evicted.
#[test]
fn a_capped_cache_holds_its_cap_while_a_mounted_image_is_read_whole() {
    let Some(layout) = setup() else { return };
    let tag = "debian-python-v1";
    let image = convert(&layout, tag, "conv-cap", &[]);
    for mode in MODES {
        let home = Home::new(&format!("cap-{mode}"));
        let mp = home.mountpoint("root");
        let mps = mp.display().to_string();
        let cache = home.root.join("cache");
        home.ok(&["mount", "--mode", mode, "--prefetch", "none", &image, &mps]);
        let total = home.stat(&mp)["bytes_total"].as_u64().unwrap();
        home.ok(&["umount", &mps]);
        // The daemon keeps a cache's limit from its first mount: a new one takes the cap.
        home.ok(&["daemon", "stop"]);
        let cap = total / 5;
        let size = format!("{}K", cap >> 10);
        let mount = || {
            home.ok(&[
                "mount",
                "--mode",
                mode,
                "--prefetch",
                "none",
                "--cache-size",
                &size,
                &image,
                &mps,
            ]);
        };
        mount();
        let done = std::sync::atomic::AtomicBool::new(false);
        let most = std::thread::scope(|s| {
            let sampler = s.spawn(|| {
                let mut most = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    most = most.max(cache_bytes(&cache));
                    std::thread::sleep(Duration::from_millis(20));
                }
                most
            });
            assert_same_tree(&layout, tag, &mp, &format!("{mode} mount, cache capped"));
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            sampler.join().unwrap()
        });
        let s = home.stat(&mp);
        eprintln!(
            "{mode}: image {} MB, cap {} MB, most in the cache {} MB, {} evictions",
            total >> 20,
            cap >> 20,
            most >> 20,
            s["cache_evictions"]
        );
        // Writers wait for room once the cache is a sixteenth over its cap; each of the
        // 10 fetch workers may be writing one chunk (at most 1 MiB) meanwhile.
        let in_flight = cap / 16 + (10 << 20);
        assert!(
            most <= cap + in_flight,
            "{mode}: the cache held {most} bytes against a cap of {cap}: {s}"
        );
        assert!(s["cache_evictions"].as_u64().unwrap() > 0, "{s}");
        // A second read of everything, past the page cache: right again, fetching
        // what was evicted.
        drop_caches();
        assert_same_tree(&layout, tag, &mp, &format!("{mode} mount, second read"));
        let s = home.stat(&mp);
        assert!(s["cache_refetches"].as_u64().unwrap() > 0, "{s}");
        assert!(cache_bytes(&cache) <= cap + in_flight, "{s}");
        // `cache prune` keeps what mounts use; with --max-size it takes those too.
        home.ok(&["cache", "prune"]);
        let kept = cache_bytes(&cache);
        assert!(
            kept > cap / 2,
            "prune took a mounted image's chunks: {kept} bytes left"
        );
        home.ok(&["cache", "prune", "--max-size", "1M"]);
        let left = cache_bytes(&cache);
        assert!(
            left <= 1 << 20,
            "{left} bytes left after prune --max-size 1M"
        );
        home.ok(&["umount", &mps]);
    }
}
