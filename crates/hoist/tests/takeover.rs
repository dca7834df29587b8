//! Issue 15: the serving process dies (SIGKILL) or is restarted under a running
//! container, again and again, while the image is still being fetched from a slow
//! registry; the holder keeps the FUSE connections, the next server takes them over
//! and has the kernel resend what was in flight. The container's reads see pauses,
//! never an error, and every file hashes as `umoci unpack` of the image does.

mod common;

use common::*;
use hoist_testkit::{Auth, Fault, FaultProxy, Registry};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Needs fixtures, root, FUSE, runc, umoci, skopeo and docker-registry; `None` (skipped)
/// only without root and with `HOIST_TESTS_UNPRIVILEGED`.
fn setup() -> Option<PathBuf> {
    require(
        "takeover tests",
        &[
            Need::Root,
            Need::Fuse,
            Need::tool("runc"),
            Need::tool("umoci"),
            Need::tool("skopeo"),
            Need::tool("docker-registry"),
        ],
    )
    .then(fixtures)
}

/// sha256 of every regular file under `dirs` of the reference rootfs, by path.
fn reference_hashes(rootfs: &Path, dirs: &[&str]) -> BTreeMap<String, String> {
    use sha2::Digest as _;
    let mut out = BTreeMap::new();
    let mut stack: Vec<PathBuf> = dirs.iter().map(|d| rootfs.join(d)).collect();
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        } else if meta.is_file() {
            let mut h = sha2::Sha256::new();
            let mut f = std::fs::File::open(&p).unwrap();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = f.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            let rel = format!("/{}", p.strip_prefix(rootfs).unwrap().display());
            out.insert(rel, format!("{:x}", h.finalize()));
        }
    }
    out
}

fn hoist_in(home: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_hoist"))
        .args(args)
        .env("HOIST_HOME", home)
        .output()
        .unwrap()
}

/// The daemon's status (`hoist daemon status --json`), if it answers.
fn status(home: &Path) -> Option<Value> {
    let out = hoist_in(home, &["daemon", "status", "--json"]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

fn server_pid(home: &Path) -> Option<i32> {
    status(home)?["daemon"]["pid"].as_i64().map(|p| p as i32)
}

/// Requests the current server got again from the kernel, on `mp`.
fn resent(home: &Path, mp: &Path) -> u64 {
    let out = hoist_in(home, &["stat", "--json", &mp.display().to_string()]);
    serde_json::from_slice::<Value>(&out.stdout)
        .ok()
        .and_then(|v| v["resent"].as_u64())
        .unwrap_or(0)
}

/// A pseudo-random delay in `lo..hi` ms, from the clock (the moments need only vary).
fn random_ms(lo: u64, hi: u64) -> u64 {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    lo + n % (hi - lo)
}

/// What one round of disruptions did.
#[derive(Debug, Default)]
struct Disruptions {
    done: u32,
    resent: u64,
}

/// Runs a container hashing every file under /usr and /app of `image` (mode `mode`,
/// `--prefetch all`) while `disrupt` is done to the daemon `times` times at random
/// moments; checks every hash against the reference and that no read failed.
fn hash_under_disruption(
    image: &str,
    reference: &BTreeMap<String, String>,
    mode: &str,
    name: &str,
    times: u32,
    disrupt: fn(&Path, i32),
) -> Disruptions {
    let home = scratch().join(name);
    std::fs::create_dir_all(&home).unwrap();
    let script = "find /usr /app -type f | while read -r f; do sha256sum \"$f\"; done";
    let mut child = Command::new(env!("CARGO_BIN_EXE_hoist"))
        .args(["--plain-http", "run", "--rm", "--name", "h", "--mode", mode])
        .args(["--prefetch", "all"])
        .args(["--entrypoint", "/bin/sh", image, "--", "-c", script])
        .env("HOIST_HOME", &home)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).unwrap();
        s
    });
    let mp = home.join("containers/h/image");
    let mut d = Disruptions::default();
    let deadline = Instant::now() + Duration::from_secs(600);
    // Wait for the container's mount.
    while !(mp.join("app").exists()) {
        assert!(
            Instant::now() < deadline,
            "the container's image never mounted"
        );
        assert!(child.try_wait().unwrap().is_none(), "hoist run ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..times {
        std::thread::sleep(Duration::from_millis(random_ms(150, 700)));
        if child.try_wait().unwrap().is_some() {
            break;
        }
        let Some(pid) = server_pid(&home) else {
            continue;
        };
        d.resent += resent(&home, &mp);
        disrupt(&home, pid);
        d.done += 1;
        // The next server: a new pid answers.
        while server_pid(&home).is_none_or(|p| p == pid) {
            assert!(Instant::now() < deadline, "no server took over from {pid}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let mut last = 0;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        last = resent(&home, &mp).max(last);
        assert!(Instant::now() < deadline, "the container hangs");
        std::thread::sleep(Duration::from_millis(100));
    };
    d.resent += last;
    let out = reader.join().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let _ = hoist_in(&home, &["daemon", "stop"]);
    assert!(status.success(), "{mode}: {status:?}\n{err}");
    assert!(
        !err.contains("Input/output error") && !err.contains("not connected"),
        "{mode}: {err}"
    );
    let got: BTreeMap<String, String> = out
        .lines()
        .filter_map(|l| l.split_once("  "))
        .map(|(h, p)| (p.to_string(), h.to_string()))
        .collect();
    assert_eq!(got.len(), reference.len(), "{mode}: files hashed");
    for (path, want) in reference {
        assert_eq!(got.get(path), Some(want), "{mode}: {path}");
    }
    d
}

fn kill(_home: &Path, pid: i32) {
    let pid = rustix::process::Pid::from_raw(pid).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::Kill).unwrap();
}

fn restart(home: &Path, _pid: i32) {
    let out = hoist_in(home, &["daemon", "restart"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// tiny-v1 in a registry behind a proxy that sends blobs at 1 MB/s: the image is still
/// being fetched for the whole run.
fn slow_image(layout: &Path) -> (Registry, FaultProxy, String) {
    let reg = Registry::start(&Auth::None);
    let proxy = FaultProxy::start(&reg.addr);
    let home = scratch().join("convert-home").display().to_string();
    let src = format!("oci:{}:tiny-v1", layout.display());
    let dst = format!("docker://{}/hoist/tiny:v1", reg.addr);
    hoist_env_ok(
        &["--plain-http", "convert", &src, &dst],
        &[("HOIST_HOME", &home)],
    );
    proxy.on(
        "GET",
        "/blobs/",
        u64::MAX,
        Fault::Throttle {
            bytes_per_sec: 1_000_000,
        },
    );
    let image = format!("docker://{}/hoist/tiny:v1", proxy.addr);
    (reg, proxy, image)
}

#[test]
fn a_container_reads_on_through_ten_server_kills_in_both_modes() {
    let Some(layout) = setup() else { return };
    let (_reg, _proxy, image) = slow_image(&layout);
    let bundle = umoci_unpack(&layout, "tiny-v1", "takeover-ref");
    let reference = reference_hashes(&bundle.join("rootfs"), &["usr", "app"]);
    assert!(reference.len() > 100, "{}", reference.len());
    let mut resent = 0;
    for mode in ["fuse", "erofs"] {
        let d = hash_under_disruption(&image, &reference, mode, &format!("kill-{mode}"), 10, kill);
        eprintln!("{mode}: {d:?}");
        assert_eq!(d.done, 10, "{mode}: the workload ended before 10 kills");
        resent += d.resent;
    }
    // Requests really were in flight at a kill: the kernel sent them again.
    assert!(resent > 0, "no request was resent");
}

#[test]
fn a_container_reads_on_through_ten_planned_restarts_in_both_modes() {
    let Some(layout) = setup() else { return };
    let (_reg, _proxy, image) = slow_image(&layout);
    let bundle = umoci_unpack(&layout, "tiny-v1", "restart-ref");
    let reference = reference_hashes(&bundle.join("rootfs"), &["usr", "app"]);
    for mode in ["fuse", "erofs"] {
        let d = hash_under_disruption(
            &image,
            &reference,
            mode,
            &format!("restart-{mode}"),
            10,
            restart,
        );
        eprintln!("{mode}: {d:?}");
        assert_eq!(d.done, 10, "{mode}: the workload ended before 10 restarts");
    }
}

/// What a daemon holds across takeovers: mounts and loop devices under its root, and
/// the descriptors and threads of its holder. (Each server is a new process, so nothing
/// of its own accumulates; a snapshot of one still starting varies with its progress.)
#[derive(Debug, PartialEq, Eq)]
struct Census {
    mounts: usize,
    loops: usize,
    holder_fds: usize,
    holder_threads: usize,
}

fn count_dir(path: &str) -> usize {
    std::fs::read_dir(path).map_or(0, |d| d.count())
}

fn census(home: &Path) -> Census {
    let root = home.to_string_lossy().into_owned();
    let s = status(home).expect("the daemon answers");
    let holder = s["daemon"]["holder"]["pid"].as_i64().unwrap();
    Census {
        mounts: mounts_under(home).len(),
        loops: loops_under(Path::new(&root)).len(),
        holder_fds: count_dir(&format!("/proc/{holder}/fd")),
        holder_threads: count_dir(&format!("/proc/{holder}/task")),
    }
}

/// Kills the server and waits for the next one to answer.
fn kill_and_wait(home: &Path) {
    let pid = server_pid(home).expect("a server");
    kill(home, pid);
    let deadline = Instant::now() + Duration::from_secs(30);
    while server_pid(home).is_none_or(|p| p == pid) {
        assert!(Instant::now() < deadline, "no server took over from {pid}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn fifty_kills_leak_no_mount_loop_device_descriptor_or_thread() {
    let Some(layout) = setup() else { return };
    let image = convert(&layout, "tiny-v1", "conv-leak", &[]);
    let reference = umoci_unpack(&layout, "tiny-v1", "leak-ref");
    let want = std::fs::read(reference.join("rootfs/app/data.bin")).unwrap();
    let home = scratch().join("leak");
    let _stop = StopDaemon(home.clone());
    let mps: Vec<PathBuf> = ["fuse", "erofs"]
        .iter()
        .map(|mode| {
            let mp = home.join(format!("mnt-{mode}"));
            std::fs::create_dir_all(&mp).unwrap();
            let out = hoist_in(
                &home,
                &["mount", "--mode", mode, &image, &mp.display().to_string()],
            );
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            mp
        })
        .collect();
    // One file held open across every takeover, and reads after each.
    let held = std::fs::File::open(mps[0].join("app/hello.txt")).unwrap();
    let check = |i: usize| {
        for mp in &mps {
            let got = std::fs::read(mp.join("app/data.bin")).unwrap();
            assert!(
                got == want,
                "{}: app/data.bin differs after kill {i}",
                mp.display()
            );
        }
    };
    check(0);
    kill_and_wait(&home);
    check(1);
    let before = census(&home);
    for i in 2..=50 {
        kill_and_wait(&home);
        check(i);
    }
    let after = census(&home);
    assert_eq!(before, after, "after 50 kills");
    let s = status(&home).unwrap();
    assert_eq!(s["daemon"]["holder"]["takeovers"], 50, "{s}");
    drop(held);
    let out = hoist_in(&home, &["daemon", "stop"]);
    assert!(out.status.success());
    let left = mounts_under(&home);
    assert!(left.is_empty(), "left mounted: {left:?}");
}

/// The lines of /proc/self/mountinfo that name a path under `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&dir))
        .map(String::from)
        .collect()
}

/// Stops the daemon of a state root when dropped, so that a failed assertion leaves no
/// daemon running.
struct StopDaemon(PathBuf);

impl Drop for StopDaemon {
    fn drop(&mut self) {
        let _ = hoist_in(&self.0, &["daemon", "stop"]);
    }
}

/// `hoist stat --json` of a mount.
fn stat(home: &Path, mp: &Path) -> Value {
    let out = hoist_in(home, &["stat", "--json", &mp.display().to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Polls a mount's statistics until `done` holds of them (up to two minutes).
fn wait_stat(home: &Path, mp: &Path, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = stat(home, mp);
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "waiting for {what}: {s}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// erofs mode, `--prefetch all`: the server is killed while the image is still being
/// fetched, then again as soon as every chunk is cached: before, while or after the
/// blobs' views are built and swapped in behind the loop devices (it prints which; the
/// swap itself is one ioctl). Each successor takes the loop devices
/// back from the record and finishes the move: in the end every blob is read from its
/// view, no read reaches hoist, and the tree is exact, through one more kill. The
/// metadata is read on demand (`--meta-whole-max 0`), so its loop device starts on
/// hoist's `meta` device file and moves to the local file the same way.
#[test]
fn an_erofs_mount_finishes_moving_to_its_views_under_a_successor() {
    let Some(layout) = setup() else { return };
    let (_reg, proxy, image) = slow_image(&layout);
    let home = scratch().join("views-takeover");
    let _stop = StopDaemon(home.clone());
    let mp = home.join("mnt");
    std::fs::create_dir_all(&mp).unwrap();
    let out = hoist_in(
        &home,
        &[
            "--plain-http",
            "mount",
            "--mode",
            "erofs",
            "--meta-whole-max",
            "0",
            "--prefetch",
            "all",
            &image,
            &mp.display().to_string(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = stat(&home, &mp);
    assert_eq!(s["devices"], "loop", "{s}");
    let blobs = s["devices_total"].as_u64().unwrap();
    assert!(blobs > 0, "{s}");

    // During the chunks' prefetch.
    let s = wait_stat(&home, &mp, "prefetch to start", |s| {
        s["prefetch"]["done"].as_u64() > Some(0)
    });
    assert!(
        s["prefetch"]["done"].as_u64() < s["prefetch"]["total"].as_u64(),
        "prefetch ended before the first kill: {s}"
    );
    kill_and_wait(&home);
    // The registry at full speed now, then a kill as soon as every chunk is cached.
    proxy.clear();
    let s = wait_stat(&home, &mp, "every chunk cached", |s| {
        s["prefetch"]["total"].as_u64() > Some(0) && s["prefetch"]["done"] == s["prefetch"]["total"]
    });
    kill_and_wait(&home);
    eprintln!(
        "killed with {} of {} views built, {} of {blobs} devices on views",
        s["prefetch"]["views_done"], s["prefetch"]["views_total"], s["devices_local"]
    );
    let s = wait_stat(
        &home,
        &mp,
        "every blob on its view, the metadata local",
        |s| s["devices_local"].as_u64() == Some(blobs) && s["meta_local"] == true,
    );
    assert_eq!(s["local_devices"], true, "{s}");
    let meta = home.join("cache/meta").display().to_string();
    assert_eq!(
        loops_under(Path::new(&meta)).len(),
        1,
        "a loop device reading the local metadata"
    );

    // Every device now reads a view, per the kernel.
    let views = home.join("cache/views").display().to_string();
    assert_eq!(
        loops_under(Path::new(&views)).len() as u64,
        blobs,
        "loop devices reading views"
    );

    // The tree is exact, read from the disk, and not one read reaches hoist; the same
    // through one more kill.
    for round in ["after the move", "after one more kill"] {
        rustix::fs::sync();
        std::fs::write("/proc/sys/vm/drop_caches", "3\n").unwrap();
        let reads = stat(&home, &mp)["reads"].as_u64().unwrap();
        assert_same_tree(&layout, "tiny-v1", &mp, round);
        let s = stat(&home, &mp);
        assert_eq!(s["reads"].as_u64().unwrap(), reads, "{round}: {s}");
        assert_eq!(s["devices_local"].as_u64(), Some(blobs), "{round}: {s}");
        kill_and_wait(&home);
    }
    let out = hoist_in(&home, &["umount", &mp.display().to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        loops_under(&home).len(),
        0,
        "loop devices left after umount"
    );
}

/// The device number of the filesystem at `path`: mounts of one FUSE connection (or one
/// EROFS superblock) share it.
fn dev_of(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().dev()
}

/// Issue 17 (idle mounts cost little): mounts of one image with the same options are
/// bind mounts of one served image (one FUSE connection, one fetcher, one copy of the
/// metadata); other options serve it apart. Each mount point outlives the others, the
/// sharing survives a server's death, and the image goes with its last mount point.
#[test]
fn mounts_of_one_image_share_one_connection_and_outlive_each_other() {
    let Some(layout) = setup() else { return };
    let image = convert(&layout, "tiny-v1", "conv-share", &[]);
    let reference = umoci_unpack(&layout, "tiny-v1", "share-ref");
    let want = std::fs::read(reference.join("rootfs/app/data.bin")).unwrap();
    let home = scratch().join("share");
    let _stop = StopDaemon(home.clone());
    let mount = |name: &str, extra: &[&str]| {
        let mp = home.join(name);
        std::fs::create_dir_all(&mp).unwrap();
        let mp_s = mp.display().to_string();
        let mut args = vec!["mount"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[&image, &mp_s]);
        let out = hoist_in(&home, &args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        mp
    };
    let a = mount("a", &[]);
    let b = mount("b", &[]);
    let c = mount("c", &["--fetch-min", "128K"]);
    let d = mount("d", &["--mode", "erofs"]);
    let e = mount("e", &["--mode", "erofs"]);
    assert_eq!(dev_of(&a), dev_of(&b), "a and b share one FUSE connection");
    assert_ne!(
        dev_of(&a),
        dev_of(&c),
        "other options serve the image apart"
    );
    assert_eq!(dev_of(&d), dev_of(&e), "d and e share one EROFS mount");
    let loops = loops_under(&home).len();
    let check = |mps: &[&PathBuf], when: &str| {
        for mp in mps {
            let got = std::fs::read(mp.join("app/data.bin")).unwrap();
            assert!(got == want, "{}: app/data.bin differs {when}", mp.display());
            assert_eq!(
                stat(&home, mp)["mountpoint"].as_str(),
                Some(mp.to_str().unwrap()),
                "{when}"
            );
        }
    };
    check(&[&a, &b, &c, &d, &e], "at first");
    let sharing = |mp: &PathBuf| stat(&home, mp)["mountpoints"].as_u64();
    let counts: Vec<Option<u64>> = [&a, &b, &c, &d, &e].into_iter().map(sharing).collect();
    assert_eq!(
        counts,
        [2, 2, 1, 2, 2].map(Some),
        "mount points per served image"
    );
    kill_and_wait(&home);
    check(&[&a, &b, &c, &d, &e], "after the server was killed");
    assert_eq!(
        loops_under(&home).len(),
        loops,
        "no loop device more or less"
    );
    for (gone, left) in [(&a, &b), (&d, &e)] {
        let out = hoist_in(&home, &["umount", &gone.display().to_string()]);
        assert!(out.status.success());
        assert!(!hoist_fs::kernel::is_mountpoint(gone));
        check(&[left], &format!("after {} was unmounted", gone.display()));
        assert_eq!(sharing(left), Some(1));
    }
    for mp in [&b, &c, &e] {
        let out = hoist_in(&home, &["umount", &mp.display().to_string()]);
        assert!(out.status.success());
    }
    let left = mounts_under(&home);
    assert!(left.is_empty(), "left mounted: {left:?}");
    assert!(loops_under(&home).is_empty(), "loop devices left");
    let served = std::fs::read_dir(home.join("run/images")).map_or(0, |d| d.count());
    assert_eq!(served, 0, "served images left in run/images");
}
