//! `hoist run` and `hoist record` with real runc: the container gets the image config
//! (entrypoint, cmd, env, working dir, user) as umoci, the referee, reads it; the exit
//! code and signals pass through; traces are recorded, stored by `hoist convert` and
//! prefetched.

mod common;

use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Needs root, FUSE, runc, umoci and skopeo; `None` (skipped) only without root and with
/// `HOIST_TESTS_UNPRIVILEGED`.
fn setup() -> Option<PathBuf> {
    require(
        "run tests",
        &[
            Need::Root,
            Need::Fuse,
            Need::tool("runc"),
            Need::tool("umoci"),
            Need::tool("skopeo"),
        ],
    )
    .then(fixtures)
}

fn sh(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The test image, made once: tiny-v1 plus a user database and a working directory,
/// with a config naming a user, a working dir, env, entrypoint and cmd. Returns the
/// source layout (tag `cfg`), umoci's bundle of it (the referee), and the hoist image.
fn image(layout: &Path) -> &'static (PathBuf, PathBuf, String) {
    static IMAGE: OnceLock<(PathBuf, PathBuf, String)> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let s = scratch().join("run-image");
        std::fs::create_dir_all(&s).unwrap();
        let oci = s.join("oci");
        sh(Command::new("skopeo").args([
            "copy",
            "-q",
            &format!("oci:{}:tiny-v1", layout.display()),
            &format!("oci:{}:base", oci.display()),
        ]));
        let bundle = s.join("bundle");
        sh(Command::new("umoci")
            .args(["unpack", "--image", &format!("{}:base", oci.display())])
            .arg(&bundle));
        let root = bundle.join("rootfs");
        std::fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            root.join("etc/group"),
            "root:x:0:\nstaff:x:50:app\napp:x:1000:\naudio:x:29:app,root\n",
        )
        .unwrap();
        std::fs::create_dir_all(root.join("work")).unwrap();
        let cfg = format!("{}:cfg", oci.display());
        sh(Command::new("umoci")
            .args(["repack", "--image", &cfg])
            .arg(&bundle));
        sh(Command::new("umoci").args([
            "config",
            "--image",
            &cfg,
            "--config.user",
            "app:staff",
            "--config.workingdir",
            "/work",
            "--config.env",
            "FOO=from-image",
            "--config.entrypoint",
            "/bin/sh",
            "--config.entrypoint",
            "-c",
            "--config.cmd",
            "echo default-cmd; exit 3",
        ]));
        let reference = s.join("reference");
        sh(Command::new("umoci")
            .args(["unpack", "--image", &cfg])
            .arg(&reference));
        let hoisted = format!("oci:{}:cfg", s.join("hoist").display());
        hoist_ok(&["convert", &format!("oci:{cfg}"), &hoisted]);
        (oci, reference, hoisted)
    })
}

/// A state root of its own; the daemon is stopped when it is dropped.
struct Home(PathBuf);

impl Home {
    fn new(name: &str) -> Home {
        let p = scratch().join(name);
        std::fs::create_dir_all(&p).unwrap();
        Home(p)
    }
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_hoist"));
        c.args(args).env("HOIST_HOME", &self.0);
        c
    }
    /// Runs hoist to the end (bounded); returns exit code, stdout, stderr.
    fn run(&self, args: &[&str]) -> (i32, String, String) {
        let mut child = self
            .cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "hoist {args:?} hangs");
            std::thread::sleep(Duration::from_millis(50));
        };
        let out = child.wait_with_output().unwrap();
        (
            status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
    fn containers(&self) -> Vec<String> {
        std::fs::read_dir(self.0.join("containers"))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        let _ = self.cmd(&["daemon", "stop"]).output();
    }
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn run_follows_the_image_config_as_umoci_reads_it() {
    let Some(layout) = setup() else { return };
    let (_, reference, img) = image(&layout);
    let home = Home::new("run-config");

    // The image's entrypoint and cmd, and its exit code; the state is kept without --rm.
    let (code, out, err) = home.run(&["run", "--name", "c1", img]);
    assert_eq!((code, out.as_str()), (3, "default-cmd\n"), "{err}");
    assert_eq!(home.containers(), ["c1"]);
    // The runtime spec carries what umoci's does: args, cwd, user, groups, env.
    let ours = json(&home.0.join("containers/c1/config.json"));
    let theirs = json(&reference.join("config.json"));
    for key in ["args", "cwd"] {
        assert_eq!(ours["process"][key], theirs["process"][key], "{key}");
    }
    for key in ["uid", "gid"] {
        assert_eq!(
            ours["process"]["user"][key], theirs["process"]["user"][key],
            "user.{key}"
        );
    }
    // umoci leaves supplementary groups out; docker and containerd add the groups that
    // list the user in the image's /etc/group, and so does hoist.
    assert_eq!(
        ours["process"]["user"]["additionalGids"],
        serde_json::json!([29])
    );
    let env = |v: &Value| -> Vec<String> {
        let mut e: Vec<String> = v["process"]["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .filter(|x| !x.starts_with("TERM="))
            .collect();
        e.sort();
        e
    };
    assert_eq!(env(&ours), env(&theirs));

    // What the process sees, and a command line that replaces the cmd.
    let (code, out, err) = home.run(&[
        "run",
        "--rm",
        img,
        "--",
        "cat /proc/self/status; pwd; echo FOO=$FOO HOME=$HOME; exit 5",
    ]);
    assert_eq!(code, 5, "{out}{err}");
    let field = |key: &str| -> Vec<&str> {
        out.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {out}"))
            .split_whitespace()
            .collect()
    };
    assert_eq!(field("Uid:"), ["1000"; 4], "{out}");
    assert_eq!(field("Gid:"), ["50"; 4], "{out}");
    assert_eq!(field("Groups:"), ["29"], "{out}");
    let tail: Vec<&str> = out.lines().rev().take(2).collect();
    assert_eq!(tail, ["FOO=from-image HOME=/home/app", "/work"]);
    assert_eq!(home.containers(), ["c1"], "--rm leaves nothing behind");

    // --entrypoint and -e.
    let (code, out, _) = home.run(&[
        "run",
        "--rm",
        "--entrypoint",
        "/bin/echo",
        img,
        "--",
        "hello",
    ]);
    assert_eq!((code, out.as_str()), (0, "hello\n"));
    let (code, out, _) = home.run(&["run", "--rm", "-e", "FOO=cli", img, "--", "echo $FOO"]);
    assert_eq!((code, out.as_str()), (0, "cli\n"));

    // A name in use is refused before anything is mounted.
    let (code, _, err) = home.run(&["run", "--name", "c1", img]);
    assert_ne!(code, 0);
    assert!(err.contains("container c1 exists"), "{err}");
    // A launch that fails before the container starts leaves nothing behind.
    let missing = format!("oci:{}:none", home.0.join("no-such-layout").display());
    let (code, _, _) = home.run(&["run", "--name", "c2", &missing]);
    assert_ne!(code, 0);
    assert_eq!(home.containers(), ["c1"]);
}

#[test]
fn signals_reach_the_container_and_its_exit_code_returns() {
    let Some(layout) = setup() else { return };
    let (_, _, img) = image(&layout);
    let home = Home::new("run-signal");
    let mut child = home
        .cmd(&[
            "run",
            "--rm",
            "--mode",
            "erofs",
            img,
            "--",
            "trap 'echo got-term; exit 42' TERM; echo ready; while :; do :; done",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    let pid = rustix::process::Pid::from_child(&child);
    rustix::process::kill_process(pid, rustix::process::Signal::Term).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the container ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(lines.next().unwrap().unwrap(), "got-term");
    assert_eq!(status.code(), Some(42));
    assert!(home.containers().is_empty());
}

#[test]
fn traces_are_recorded_stored_in_the_image_and_prefetched() {
    let Some(layout) = setup() else { return };
    let (oci, _, img) = image(&layout);
    let home = Home::new("run-trace");
    let trace = home.0.join("trace.json");
    let t = trace.display().to_string();
    let (code, out, err) =
        home.run(&["record", img, "--trace-out", &t, "--", "cat /app/hello.txt"]);
    assert_eq!(code, 0, "{out}{err}");
    let rec = json(&trace);
    let files: Vec<&str> = rec["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    // The shell, then the file it printed, in the order read.
    let pos = |f: &str| files.iter().position(|x| *x == f);
    assert!(
        pos("/bin/busybox").unwrap() < pos("/app/hello.txt").unwrap(),
        "{files:?}"
    );
    let chunks = rec["chunks"].as_array().unwrap();
    assert!(chunks.iter().all(|c| c["size"].as_u64().unwrap() > 0));
    assert!(home.containers().is_empty(), "record cleans up");

    // Again on the warm cache: files now opened by FUSE passthrough are recorded too.
    let warm = home.0.join("trace-warm.json");
    let (code, _, err) = home.run(&[
        "record",
        img,
        "--trace-out",
        &warm.display().to_string(),
        "--",
        "cat /app/hello.txt",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        json(&warm)["files"],
        rec["files"],
        "warm and cold traces differ"
    );

    // Stored in the image as a layer after the metadata blob; the image still checks.
    let traced = format!("oci:{}:cfg", scratch().join("run-traced").display());
    hoist_ok(&[
        "convert",
        &format!("oci:{}:cfg", oci.display()),
        &traced,
        "--prefetch-trace",
        &t,
    ]);
    let inspect: Value = serde_json::from_str(&hoist_ok(&["inspect", "--json", &traced])).unwrap();
    let layers = inspect["layers"].as_array().expect("layers in inspect");
    assert_eq!(
        layers.last().unwrap()["media_type"],
        "application/vnd.oci.image.layer.hoist.trace.v1+json",
        "{inspect}"
    );
    hoist_ok(&["check", &traced]);

    // A run of the traced image prefetches the trace's chunks first.
    let stats = home.0.join("stats.json");
    let s = stats.display().to_string();
    let (code, out, _) = home.run(&[
        "run",
        "--rm",
        "--stats-json",
        &s,
        &traced,
        "--",
        "cat /app/hello.txt",
    ]);
    assert_eq!(code, 0);
    let distinct: std::collections::HashSet<(u64, u64)> = chunks
        .iter()
        .map(|c| (c["blob"].as_u64().unwrap(), c["index"].as_u64().unwrap()))
        .collect();
    let p = &json(&stats)["stat"]["prefetch"];
    assert_eq!(p["trace"], "image", "{p}");
    assert_eq!(p["trace_chunks"], distinct.len() as u64, "{p}");
    assert_eq!(out, "hello from tiny-v1 upper\n");

    // A trace whose positions are not this image's (recorded on another version of
    // it) resolves by digest, and without digests by file and offset: the same chunks.
    for (what, blank_digest) in [("digest", false), ("file", true)] {
        let mut moved = rec.clone();
        for c in moved["chunks"].as_array_mut().unwrap() {
            c["blob"] = Value::from(c["blob"].as_u64().unwrap() + 100);
            if blank_digest {
                c["digest"] = Value::from("00".repeat(32));
            }
        }
        let path = home.0.join(format!("trace-by-{what}.json"));
        std::fs::write(&path, moved.to_string()).unwrap();
        let (code, _, err) = home.run(&[
            "run",
            "--rm",
            "--stats-json",
            &s,
            "--prefetch-trace",
            &path.display().to_string(),
            &traced,
            "--",
            "true",
        ]);
        assert_eq!(code, 0, "{err}");
        let p = &json(&stats)["stat"]["prefetch"];
        assert_eq!(p["trace_chunks"], distinct.len() as u64, "by {what}: {p}");
    }

    // A file list given at mount time replaces the image's trace.
    let list = home.0.join("files.txt");
    std::fs::write(&list, "# first\n/app/hello.txt\n").unwrap();
    let (code, _, _) = home.run(&[
        "run",
        "--rm",
        "--stats-json",
        &s,
        "--prefetch-files",
        &list.display().to_string(),
        &traced,
        "--",
        "true",
    ]);
    assert_eq!(code, 0);
    let p = &json(&stats)["stat"]["prefetch"];
    assert_eq!(
        (p["trace"].as_str(), p["trace_chunks"].as_u64()),
        (Some("mount"), Some(1)),
        "{p}"
    );
}

/// Issue 20: a trace records the metadata chunks the workload's lookups read (metadata
/// read on demand), and a mount with that trace fetches them before anything asks:
/// the traced read then fetches no metadata, where without the trace it does.
#[test]
fn a_trace_records_the_metadata_it_read_and_a_mount_fetches_it_first() {
    let Some(layout) = setup() else { return };
    let (oci, _, _) = image(&layout);
    // The run image plus a layer of 20,000 small files: metadata of many chunks.
    let s = scratch().join("trace-meta");
    std::fs::create_dir_all(&s).unwrap();
    let s_dir = s.clone();
    let bundle = s.join("bundle");
    let cfg = format!("{}:cfg", oci.display());
    let many = format!("{}:many", oci.display());
    sh(Command::new("umoci")
        .args(["unpack", "--image", &cfg])
        .arg(&bundle));
    for d in 0..100 {
        let dir = bundle.join(format!("rootfs/many/d{d:02}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..200 {
            let body = format!("module.exports = {{ dir: {d}, file: {f} }};\n");
            std::fs::write(dir.join(format!("f{f:03}.js")), body).unwrap();
        }
    }
    sh(Command::new("umoci")
        .args(["repack", "--image", &many])
        .arg(&bundle));
    let img = format!("oci:{}:many", s.join("hoist").display());
    hoist_ok(&["convert", &format!("oci:{many}"), &img]);
    let want = "module.exports = { dir: 77, file: 123 };\n";
    let file = "/many/d77/f123.js";

    let home = Home::new("trace-meta-record");
    let trace = home.0.join("trace.json");
    let t = trace.display().to_string();
    let lazy = ["--meta-whole-max", "0"];
    let cat = format!("cat {file}");
    let (code, out, err) = home.run(
        &[
            &["record"][..],
            &lazy,
            &[&img, "--trace-out", &t, "--", &cat],
        ]
        .concat(),
    );
    assert_eq!((code, out.as_str()), (0, want), "{err}");
    let rec = json(&trace);
    let meta_chunks = rec["meta_chunks"].as_array().expect("metadata chunks");
    assert!(!meta_chunks.is_empty(), "{rec}");
    assert!(rec["meta_digest"].as_str().unwrap().starts_with("sha256:"));

    // Each mount from an empty cache: the metadata its read fetches, without the trace
    // and with it (once the trace's metadata chunks are in).
    let read_fetches = |name: &str, img: &str, extra: &[&str]| -> (u64, Value) {
        let home = Home::new(name);
        let mp = home.0.join("mnt");
        std::fs::create_dir_all(&mp).unwrap();
        let mps = mp.display().to_string();
        let (code, _, err) = home.run(&[&["mount"][..], &lazy, extra, &[img, &mps]].concat());
        assert_eq!(code, 0, "{err}");
        let stat = || {
            let (code, out, err) = home.run(&["stat", "--json", &mps]);
            assert_eq!(code, 0, "{err}");
            serde_json::from_str::<Value>(&out).unwrap()
        };
        wait_until(60, "the trace's metadata and chunks fetched", || {
            let p = &stat()["prefetch"];
            (p["trace_meta_chunks"] == 0 || p["trace_meta_done"] == true)
                && (p["state"] == "idle" || p["state"] == "done")
        });
        let before = stat()["meta_bytes"].as_u64().unwrap();
        let got = std::fs::read_to_string(mp.join(file.trim_start_matches('/'))).unwrap();
        assert_eq!(got, want);
        let s = stat();
        let (code, _, err) = home.run(&["umount", &mps]);
        assert_eq!(code, 0, "{err}");
        (s["meta_bytes"].as_u64().unwrap() - before, s)
    };
    let (without, _) = read_fetches("trace-meta-without", &img, &["--prefetch", "none"]);
    assert!(
        without > 0,
        "the read fetched no metadata without the trace"
    );
    let (with, s) = read_fetches("trace-meta-with", &img, &["--prefetch-trace", &t]);
    assert_eq!(
        s["prefetch"]["trace_meta_chunks"].as_u64(),
        Some(meta_chunks.len() as u64),
        "{s}"
    );
    assert_eq!(with, 0, "the traced read fetched metadata: {s}");
    // The trace's files (it lists the one read) are looked up, not found by a walk of
    // the tree, which would fetch all of the metadata.
    assert!(
        !rec["files"].as_array().unwrap().is_empty(),
        "the trace lists no files: {rec}"
    );
    assert!(
        s["meta_bytes"].as_u64().unwrap() < s["meta_layer_bytes"].as_u64().unwrap() / 2,
        "a mount with the trace fetched most of the metadata: {s}"
    );

    // Stored in the image, whose blobs then hold the trace's chunks first: the chunks
    // moved, the metadata's blocks did not, and the stored trace names the new
    // metadata layer, so its metadata chunks are fetched first there too.
    let convert_traced = |name: &str| {
        let image = format!("oci:{}:many", s_dir.join(name).display());
        let src = format!("oci:{many}");
        let out = hoist_ok(&["convert", &src, &image, "--prefetch-trace", &t, "--json"]);
        (image, out)
    };
    let (traced, out) = convert_traced("traced");
    let first = layers_sum(&out, "trace_first");
    assert!(first > 0, "no chunk of the trace was laid out first: {out}");
    let (with, s) = read_fetches("trace-meta-traced", &traced, &[]);
    assert_eq!(
        s["prefetch"]["trace_meta_chunks"].as_u64(),
        Some(meta_chunks.len() as u64),
        "{s}"
    );
    assert_eq!(with, 0, "the traced image's read fetched metadata: {s}");

    // Converted again from the conversion cache (every layer reused, so no blob is laid
    // out again), the stored trace still names the new metadata layer.
    let (again, out) = convert_traced("traced-again");
    let report: Value = serde_json::from_str(&out).unwrap();
    let layers = report["layers"].as_array().unwrap().len() as u64;
    assert_eq!(report["reused_layers"].as_u64(), Some(layers), "{out}");
    let (manifest, blob) = layout_manifest(&again);
    let layer = |media: &str| {
        let l = manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["mediaType"] == media);
        l.expect(media)["digest"].as_str().unwrap().to_string()
    };
    let stored: Value =
        serde_json::from_slice(&blob(&layer(hoist_oci::media::HOIST_TRACE))).unwrap();
    assert_eq!(
        stored["meta_digest"],
        layer(hoist_oci::media::HOIST_META).as_str()
    );
    assert_eq!(stored["meta_chunks"], rec["meta_chunks"]);
}

#[test]
fn many_runs_started_at_once_share_the_daemon_one_of_them_starts() {
    // Issue 15: of 8 `hoist run`s started together with no daemon running, 3 failed
    // with "another hoist daemon serves …" instead of using the one that won.
    let Some(layout) = setup() else { return };
    let (_, _, img) = image(&layout);
    let home = Home::new("run-many");
    let children: Vec<_> = (0..16)
        .map(|i| {
            home.cmd(&[
                "run",
                "--rm",
                "--name",
                &format!("c{i}"),
                img,
                "--",
                "echo ok-$HOSTNAME",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut failed = Vec::new();
    for (i, mut child) in children.into_iter().enumerate() {
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "run c{i} hangs");
            std::thread::sleep(Duration::from_millis(50));
        };
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !status.success() || stdout != format!("ok-c{i}\n") {
            failed.push(format!(
                "c{i}: {status:?} {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    assert!(home.containers().is_empty());
    // One daemon started and served them all; the others waited for it.
    let log = std::fs::read_to_string(home.0.join("daemon.log")).unwrap();
    let started = log.lines().filter(|l| l.contains(" serving ")).count();
    assert_eq!(started, 1, "{log}");
    assert!(!log.contains("another hoist daemon serves"), "{log}");
}

/// The mount points under `dir`, from this process's mount table.
fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|mp| Path::new(mp).starts_with(&dir))
        .map(String::from)
        .collect()
}

/// runc's state of container `name` in `home`, or None when runc does not know it.
fn runc_state(home: &Home, name: &str) -> Option<Value> {
    let out = Command::new("runc")
        .arg("--root")
        .arg(home.0.join("runc"))
        .args(["state", name])
        .output()
        .unwrap();
    out.status.success().then(|| json_of(&out.stdout))
}

/// runc's status of container `name` in `home`, or None when runc does not know it.
fn runc_status(home: &Home, name: &str) -> Option<String> {
    runc_state(home, name).map(|s| s["status"].as_str().unwrap().to_string())
}

fn json_of(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap()
}

/// Polls `cond` until it holds, or fails naming `what` after `secs`.
fn wait_until(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "{what} (after {secs} s)");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The pid of the `hoist watch-container NAME` of `home`.
fn watcher_of(home: &Home, name: &str) -> rustix::process::Pid {
    let want = format!("HOIST_HOME={}", home.0.display());
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let (Ok(cmdline), Ok(environ)) = (
            std::fs::read(e.path().join("cmdline")),
            std::fs::read(e.path().join("environ")),
        ) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.len() >= 3
            && args[1] == b"watch-container"
            && args[2] == name.as_bytes()
            && environ.split(|b| *b == 0).any(|v| v == want.as_bytes())
        {
            return rustix::process::Pid::from_raw(pid).unwrap();
        }
    }
    panic!("no watcher of container {name}");
}

#[test]
fn a_killed_hoist_run_leaves_no_container_and_ps_shows_the_rest() {
    // Issue 19: after `kill -9` of `hoist run`, its container kept running and its image
    // and overlay stayed mounted, even with --rm; nothing listed or removed them.
    let Some(layout) = setup() else { return };
    let (_, _, img) = image(&layout);
    let home = Home::new("run-reap");
    let start = |name: &str, rm: bool| {
        let mut args = vec!["run", "--name", name];
        if rm {
            args.push("--rm");
        }
        args.extend([img.as_str(), "--", "sleep 1000"]);
        home.cmd(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut runs = [
        ("ra", start("ra", true)),
        ("rb", start("rb", false)),
        ("rc", start("rc", true)),
    ];
    for (name, _) in &runs {
        wait_until(60, &format!("{name} runs"), || {
            runc_status(&home, name).as_deref() == Some("running")
        });
    }
    let containers = home.0.join("containers");
    // rb and rc lose their watchers too: only the next hoist command can reap them.
    for name in ["rb", "rc"] {
        rustix::process::kill_process(watcher_of(&home, name), rustix::process::Signal::Kill)
            .unwrap();
    }
    for (_, child) in &mut runs {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    // ra's watcher stops, unmounts and removes it.
    wait_until(30, "ra is reaped by its watcher", || {
        !containers.join("ra").exists()
    });
    assert_eq!(runc_status(&home, "ra"), None);
    assert!(mounts_under(&containers.join("ra")).is_empty());
    // Without watchers, rb and rc still run: the leak the next command must clean.
    for name in ["rb", "rc"] {
        assert_eq!(runc_status(&home, name).as_deref(), Some("running"));
    }
    let (code, out, err) = home.run(&["ps"]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(rows.len(), 1, "{out}");
    assert!(
        rows[0].starts_with("rb ") && rows[0].contains("stopped (its hoist run died)"),
        "{out}"
    );
    for name in ["rb", "rc"] {
        assert_eq!(runc_status(&home, name), None, "{name} still known to runc");
    }
    assert!(!containers.join("rc").exists(), "--rm: rc is removed");
    assert!(
        containers.join("rb/upper").is_dir(),
        "rb's writable layer is kept"
    );
    assert!(
        mounts_under(&containers).is_empty(),
        "{:?}",
        mounts_under(&containers)
    );
    let (code, out, err) = home.run(&["rm", "rb"]);
    assert_eq!((code, out.as_str()), (0, "rb\n"), "{err}");
    assert!(home.containers().is_empty());

    // A detached container outlives its `hoist run`, and only `rm --force` stops it.
    let (code, out, err) =
        home.run(&["run", "-d", "--rm", "--name", "rd", img, "--", "sleep 1000"]);
    assert_eq!((code, out.as_str()), (0, "rd\n"), "{err}");
    assert_eq!(runc_status(&home, "rd").as_deref(), Some("running"));
    // Its cgroup is its home's and its name's, not the bare name that a container of
    // the same name in another home would share.
    let pid = runc_state(&home, "rd").unwrap()["pid"].as_u64().unwrap();
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        cgroups
            .lines()
            .all(|l| l.contains("/hoist-") && l.ends_with("-rd")),
        "{cgroups}"
    );
    let (_, out, _) = home.run(&["ps", "--json"]);
    let listed = json_of(out.as_bytes());
    assert_eq!(listed[0]["name"], "rd");
    assert_eq!(listed[0]["status"]["state"], "running");
    assert_eq!(listed[0]["detached"], true);
    let (code, _, err) = home.run(&["rm", "rd"]);
    assert_ne!(code, 0);
    assert!(err.contains("container rd is running (detached)"), "{err}");
    assert_eq!(runc_status(&home, "rd").as_deref(), Some("running"));
    let (code, _, err) = home.run(&["rm", "--force", "rd"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(runc_status(&home, "rd"), None);
    assert!(home.containers().is_empty());
    assert!(mounts_under(&containers).is_empty());

    // A detached container that exits is unmounted by its watcher; its log is kept.
    let (code, _, err) = home.run(&["run", "-d", "--name", "re", img, "--", "echo bye; exit 7"]);
    assert_eq!(code, 0, "{err}");
    wait_until(30, "re is unmounted once it exits", || {
        let rec = std::fs::read(containers.join("re/state.json")).unwrap_or_default();
        !rec.is_empty()
            && json_of(&rec)["status"]["state"] == "exited"
            && mounts_under(&containers.join("re")).is_empty()
    });
    assert_eq!(
        std::fs::read_to_string(containers.join("re/log")).unwrap(),
        "bye\n"
    );
    let (code, _, err) = home.run(&["rm", "re", "nothing-here"]);
    assert_ne!(code, 0);
    assert!(err.contains("no container nothing-here"), "{err}");
    assert!(home.containers().is_empty());
}
