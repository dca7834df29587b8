//! Issue 16: the real containerd (Debian's 1.6, CRI plugin built in), driven through
//! CRI as kubelet drives it, with `hoist snapshotter` as its snapshotter. The test starts
//! its own containerd (own config, root, state and socket), a registry behind a proxy
//! that logs every request, and the snapshotter, then:
//!
//! - pulls a hoist image: the registry serves the manifest, the config and the metadata
//!   blob, never a data blob; a container on it prints the right bytes, read lazily;
//! - runs an ordinary image the same way (containerd unpacks it; the sandbox image too);
//! - restarts containerd, then the snapshotter, under a running container that keeps
//!   reading, and starts one more container afterwards;
//! - removes the image: its snapshots and its lazy mount are gone;
//! - gives clear errors, leaving nothing behind, for an unknown key, a missing parent
//!   and a hoist image whose metadata blob the registry cannot serve.

mod common;

use common::*;
use hoist_testkit::cri::{channel, sandbox_config, Cri};
use hoist_testkit::{Auth, Fault, FaultProxy, Registry};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Needs fixtures, root, containerd, runc, skopeo, umoci and docker-registry; `None`
/// (skipped) only without root and with `HOIST_TESTS_UNPRIVILEGED`.
fn setup() -> Option<PathBuf> {
    require(
        "containerd tests",
        &[
            Need::Root,
            Need::tool("containerd"),
            Need::tool("runc"),
            Need::tool("skopeo"),
            Need::tool("umoci"),
            Need::tool("docker-registry"),
        ],
    )
    .then(fixtures)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Waits (bounded) for `what` to hold, polling.
fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "waited {limit:?} for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A process killed when dropped; for containerd, its CRI socket, whose pods are
/// removed first (a test that failed half-way leaves no shim or container behind).
struct Proc(Child, &'static str, Option<PathBuf>);

impl Proc {
    fn stop(&mut self) {
        let pid = rustix::process::Pid::from_raw(self.0.id() as i32).unwrap();
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::Term);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.0.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = self.0.kill();
                let _ = self.0.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            eprintln!("stopping {}", self.1);
            if let Some(sock) = &self.2 {
                Cri::new(sock).remove_all_pods();
            }
            self.stop();
        }
    }
}

struct Node {
    dir: PathBuf,
    home: PathBuf,
    registry_host: String,
    /// hoist's registry options for the snapshotter.
    registry_args: Vec<String>,
    /// More options for the snapshotter.
    snapshotter_args: Vec<String>,
}

impl Node {
    fn containerd_socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }
    fn snapshotter_socket(&self) -> PathBuf {
        self.dir.join("snapshotter.sock")
    }

    fn start_snapshotter(&self) -> Proc {
        let log = std::fs::File::create(self.dir.join("snapshotter.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_hoist"))
            .args(&self.registry_args)
            .args(["snapshotter", "--socket"])
            .arg(self.snapshotter_socket())
            .args(&self.snapshotter_args)
            .env("HOIST_HOME", &self.home)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let sock = self.snapshotter_socket();
        wait_for("the snapshotter's socket", Duration::from_secs(30), || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        });
        Proc(child, "the snapshotter", None)
    }

    fn start_containerd(&self) -> Proc {
        let log = std::fs::File::create(self.dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(self.dir.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let sock = self.containerd_socket();
        let cri = Cri::new(&sock);
        wait_for("containerd's CRI service", Duration::from_secs(60), || {
            sock.exists() && cri.version().is_ok()
        });
        Proc(child, "containerd", Some(sock))
    }

    /// containerd's config, with `hosts_toml` as the registry's host file (read by
    /// containerd and, with `--hosts-dir`, by hoist).
    fn write_config(&self, sandbox_image: &str, hosts_toml: &str) {
        self.write_config_with(sandbox_image, hosts_toml, "hoist");
    }

    /// The config with another snapshotter (`overlayfs`: a node without hoist).
    fn write_config_with(&self, sandbox_image: &str, hosts_toml: &str, snapshotter: &str) {
        let certs = self.dir.join("certs.d").join(&self.registry_host);
        std::fs::create_dir_all(&certs).unwrap();
        std::fs::write(certs.join("hosts.toml"), hosts_toml).unwrap();
        let d = self.dir.display();
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[proxy_plugins.hoist]
  type = "snapshot"
  address = "{d}/snapshotter.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  # Containers may not lower their OOM score below containerd's own (this machine's
  # sandbox forbids it, as unprivileged hosts do).
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{snapshotter}"
    disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{d}/certs.d"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni/bin"
    conf_dir = "{d}/cni/conf"
"#
        );
        std::fs::write(self.dir.join("config.toml"), config).unwrap();
    }

    fn hoist(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_hoist"))
            .args(args)
            .env("HOIST_HOME", &self.home)
            .output()
            .unwrap()
    }

    /// The lazy mounts of hoist images under the snapshotter's root.
    fn image_mounts(&self) -> Vec<PathBuf> {
        let root = self.home.join("snapshots");
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|mp| mp.starts_with(&*root.to_string_lossy()) && mp.ends_with("/image"))
            .map(PathBuf::from)
            .collect()
    }
}

/// An image holding only a static busybox, whose entrypoint sleeps: the pod sandbox.
fn pause_layout(dir: &Path, busybox: &Path) {
    let mut tar = tar::Builder::new(Vec::new());
    tar.append_path_with_name(busybox, "bin/busybox").unwrap();
    let layer = tar.into_inner().unwrap();
    make_layout(dir, "pause", &[layer]);
    // The sandbox must keep running: its entrypoint sleeps.
    let index: Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let md = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let blob = |d: &str| {
        dir.join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let mut manifest: Value = serde_json::from_slice(&std::fs::read(blob(&md)).unwrap()).unwrap();
    let cd = manifest["config"]["digest"].as_str().unwrap().to_string();
    let mut config: Value = serde_json::from_slice(&std::fs::read(blob(&cd)).unwrap()).unwrap();
    config["config"] = serde_json::json!({
        "Entrypoint": ["/bin/busybox", "sleep", "2147483647"],
    });
    use sha2::Digest as _;
    let put = |bytes: Vec<u8>| {
        let d = format!("sha256:{:x}", sha2::Sha256::digest(&bytes));
        std::fs::write(blob(&d), &bytes).unwrap();
        (d, bytes.len())
    };
    let (cd, cs) = put(serde_json::to_vec(&config).unwrap());
    manifest["config"]["digest"] = cd.into();
    manifest["config"]["size"] = cs.into();
    let (md, ms) = put(serde_json::to_vec(&manifest).unwrap());
    let mut index = index;
    index["manifests"][0]["digest"] = md.into();
    index["manifests"][0]["size"] = ms.into();
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

/// `GET /metrics` from `addr`.
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// The container's log (CRI's format: one `TIME STREAM TAG TEXT` line per line).
/// `sh -c script`.
fn sh(script: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

fn log_text(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join("logs").join(format!("{name}.log"))).unwrap_or_default()
}

fn sha256_hex(path: &Path) -> String {
    use sha2::Digest as _;
    format!("{:x}", sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

#[test]
fn containerd_runs_hoist_images_lazily_and_ordinary_images_through_overlayfs() {
    let Some(layout) = setup() else { return };
    let dir = scratch().join("containerd");
    std::fs::create_dir_all(&dir).unwrap();
    let reg = Registry::start(&Auth::None);
    let proxy = FaultProxy::start(&reg.addr);
    let _stop = StopDaemon(dir.join("hoist"));
    let metrics_addr = format!("127.0.0.1:{}", hoist_testkit::free_port());
    let node = Node {
        dir: dir.clone(),
        home: dir.join("hoist"),
        registry_host: proxy.addr.clone(),
        registry_args: vec!["--plain-http".into()],
        snapshotter_args: vec!["--metrics-address".into(), metrics_addr.clone()],
    };

    // The images: tiny-v1 converted, tiny-v1 as it is, and a sandbox image.
    let reference = umoci_unpack(&layout, "tiny-v1", "containerd-ref");
    let want = sha256_hex(&reference.join("rootfs/app/data.bin"));
    let hello = std::fs::read_to_string(reference.join("rootfs/app/hello.txt")).unwrap();
    let hoist_image = format!("{}/hoist/tiny:v1", proxy.addr);
    hoist_env_ok(
        &[
            "--plain-http",
            "convert",
            &format!("oci:{}:tiny-v1", layout.display()),
            &format!("docker://{hoist_image}"),
        ],
        &[(
            "HOIST_HOME",
            &dir.join("convert-home").display().to_string(),
        )],
    );
    reg.push_with_skopeo(&layout, "tiny-v1", "plain/tiny", None);
    let plain_image = format!("{}/plain/tiny:tiny-v1", proxy.addr);
    let pause = dir.join("pause-layout");
    pause_layout(&pause, &reference.join("rootfs/bin/busybox"));
    reg.push_with_skopeo(&pause, "pause", "pause", None);
    node.write_config(
        &format!("{}/pause:pause", proxy.addr),
        &format!(
            "server = \"http://{h}\"\n[host.\"http://{h}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            h = proxy.addr
        ),
    );

    // The data blobs of the hoist image, which a lazy pull never downloads.
    let manifest: Value = serde_json::from_slice(
        &Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{hoist_image}"))
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let data_blobs = hoist_data_blobs(&manifest);
    assert!(!data_blobs.is_empty());

    let mut snapshotter = node.start_snapshotter();
    let mut containerd = node.start_containerd();
    let cri = Cri::new(&node.containerd_socket());

    // 1. A lazy pull: the manifest, the config and the metadata blob; no data blob.
    proxy.take_log();
    cri.pull(&hoist_image)
        .expect("PullImage of the hoist image");
    let pulled = proxy.take_log();
    let fetched: Vec<&String> = pulled
        .iter()
        .filter(|l| data_blobs.iter().any(|d| l.contains(d.as_str())))
        .collect();
    assert!(
        fetched.is_empty(),
        "data blobs fetched by the pull: {fetched:?}\n{pulled:?}"
    );
    assert!(
        pulled.iter().any(|l| l.contains("/manifests/")),
        "{pulled:?}"
    );
    let mounts = node.image_mounts();
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    let image_mp = mounts[0].clone();

    // 2. A pod (the sandbox image goes through the fallback) and a container that reads.
    let sandbox = sandbox_config(&dir.join("logs"), "pod");
    let pod = cri.run_pod(&sandbox).expect("RunPodSandbox");
    let script = "cat /app/hello.txt; sha256sum /app/data.bin; i=0; while true; do echo tick $i $(head -c 100 /app/hello.txt | wc -c); i=$((i+1)); sleep 0.2; done";
    let lazy = cri
        .start(&pod, &sandbox, "lazy", &hoist_image, &sh(script))
        .expect("starting the lazy container");
    wait_for(
        "the hoist container's output",
        Duration::from_secs(120),
        || log_text(&dir, "lazy").contains("tick 1 "),
    );
    let out = log_text(&dir, "lazy");
    assert!(out.contains(&want), "data.bin's hash not in {out}");
    assert!(out.contains(hello.trim()), "{out}");
    // Read lazily: what the container read was fetched, not the whole image.
    let stat: Value = serde_json::from_slice(
        &node
            .hoist(&["stat", "--json", &image_mp.display().to_string()])
            .stdout,
    )
    .unwrap();
    let (fetched, total) = (
        stat["bytes_fetched"].as_u64().unwrap(),
        stat["blob_bytes"].as_u64().unwrap(),
    );
    assert!(
        fetched > 0 && fetched < total,
        "fetched {fetched} of {total}: {stat}"
    );

    // The metrics endpoint reports the counters `hoist stat` shows.
    let labels = format!(
        "{{image=\"{}\",mountpoint=\"{}\",mode=\"fuse\"}}",
        stat["image"].as_str().unwrap(),
        image_mp.display()
    );
    let value = |text: &str, name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} not in the metrics:\n{text}"))
    };
    let before = scrape(&metrics_addr);
    let stat: Value = serde_json::from_slice(
        &node
            .hoist(&["stat", "--json", &image_mp.display().to_string()])
            .stdout,
    )
    .unwrap();
    let after = scrape(&metrics_addr);
    for (metric, field) in [
        ("hoist_fetched_bytes_total", "bytes_fetched"),
        ("hoist_fetch_requests_total", "requests"),
        ("hoist_cache_misses_total", "cache_misses"),
        ("hoist_reads_total", "reads"),
        ("hoist_libraries_total", "libraries"),
        ("hoist_modules_total", "modules"),
    ] {
        let name = format!("{metric}{labels}");
        let (lo, hi) = (value(&before, &name), value(&after, &name));
        let s = stat[field].as_f64().unwrap();
        assert!(lo <= s && s <= hi, "{metric}: {lo} / stat {s} / {hi}");
    }
    assert!(value(&after, &format!("hoist_read_latency_seconds_count{labels}")) > 0.0);
    assert_eq!(
        value(
            &after,
            "hoist_snapshots{kind=\"committed\",content=\"hoist_image\"}"
        ),
        1.0
    );
    assert_eq!(value(&after, "hoist_mounts"), 1.0);
    assert_eq!(value(&after, "hoist_daemon_takeovers_total"), 0.0);

    // 3. An ordinary image: containerd unpacks it into overlayfs snapshots.
    cri.pull(&plain_image)
        .expect("PullImage of the ordinary image");
    let plain = cri
        .start(
            &pod,
            &sandbox,
            "plain",
            &plain_image,
            &sh("sha256sum /app/data.bin"),
        )
        .expect("starting the plain container");
    wait_for(
        "the ordinary container's output",
        Duration::from_secs(60),
        || log_text(&dir, "plain").contains(&want),
    );

    // 4. containerd restarted, then the snapshotter: the container reads on, and a new
    //    container starts from the persisted snapshots.
    let ticks = |s: &str| s.matches(" tick ").count();
    for what in ["containerd", "the snapshotter"] {
        if what == "containerd" {
            containerd.stop();
            containerd = node.start_containerd();
        } else {
            snapshotter.stop();
            snapshotter = node.start_snapshotter();
        }
        let before = ticks(&log_text(&dir, "lazy"));
        wait_for(
            &format!("ticks after restarting {what}"),
            Duration::from_secs(30),
            || ticks(&log_text(&dir, "lazy")) >= before + 3,
        );
        let out = log_text(&dir, "lazy");
        let read = format!(" {}", hello.len().min(100));
        let bad: Vec<&str> = out
            .lines()
            .filter(|l| l.contains(" tick ") && !l.ends_with(&read))
            .collect();
        assert!(
            bad.is_empty(),
            "reads failed after restarting {what}: {bad:?}"
        );
    }
    let again = cri
        .start(
            &pod,
            &sandbox,
            "again",
            &hoist_image,
            &sh("sha256sum /app/data.bin"),
        )
        .expect("starting the again container");
    wait_for(
        "a container started after the restarts",
        Duration::from_secs(60),
        || log_text(&dir, "again").contains(&want),
    );

    // 5. Bad input straight to the snapshotter: clear errors, nothing left behind.
    bad_input(&node);

    // 6. The image removed: containers, pod, then RemoveImage; its snapshots and its
    //    lazy mount go, and its chunks are unpinned (the cache can shrink).
    let pinned = || -> u64 {
        let out = node.hoist(&["cache", "stat", "--json"]);
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["pinned"]
            .as_u64()
            .unwrap()
    };
    assert!(pinned() > 0, "the lazy image pins no chunk");
    for id in [&lazy, &plain, &again] {
        cri.remove_container(id).expect("RemoveContainer");
    }
    cri.remove_pod(&pod).expect("removing the pod");
    cri.remove_image(&hoist_image).expect("RemoveImage");
    wait_for(
        "the image's lazy mount to go",
        Duration::from_secs(60),
        || node.image_mounts().is_empty(),
    );
    assert_eq!(pinned(), 0, "chunks still pinned after RemoveImage");
    let records = std::fs::read_to_string(node.home.join("snapshots/snapshots.json")).unwrap();
    assert!(
        !records.contains("hoist_image") && !records.contains("hoist_layer"),
        "{records}"
    );
    let status: Value =
        serde_json::from_slice(&node.hoist(&["daemon", "status", "--json"]).stdout).unwrap();
    assert_eq!(
        status["mounts"].as_array().map_or(0, |m| m.len()),
        0,
        "{status}"
    );

    // 7. A hoist image whose metadata blob the registry cannot serve: the pull fails
    //    with the reason, and nothing is left.
    let meta = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["mediaType"] == hoist_oci_media_meta())
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    proxy.on("GET", &meta, u64::MAX, Fault::Status(503));
    // The node's cache has it from the first pull: empty it.
    std::fs::remove_dir_all(node.home.join("cache/meta")).unwrap();
    let e = cri
        .pull(&hoist_image)
        .expect_err("a pull without the metadata blob");
    assert!(
        e.message().contains("hoist") || e.message().contains("503"),
        "{e}"
    );
    eprintln!("pull with the metadata blob unavailable: {}", e.message());
    assert!(node.image_mounts().is_empty());
    let records = std::fs::read_to_string(node.home.join("snapshots/snapshots.json")).unwrap();
    assert!(!records.contains("hoist_image"), "{records}");
    proxy.clear();

    drop(containerd);
    drop(snapshotter);
}

/// Stops the hoist daemon of a state root when dropped, pass or fail.
struct StopDaemon(PathBuf);

impl Drop for StopDaemon {
    fn drop(&mut self) {
        let _ = Command::new(env!("CARGO_BIN_EXE_hoist"))
            .args(["daemon", "stop"])
            .env("HOIST_HOME", &self.0)
            .output();
    }
}

/// The data blobs of a hoist manifest.
fn hoist_data_blobs(manifest: &Value) -> Vec<String> {
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["mediaType"] == hoist_oci_media_blob())
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

fn hoist_oci_media_blob() -> &'static str {
    "application/vnd.oci.image.layer.hoist.blob.v1"
}

fn hoist_oci_media_meta() -> &'static str {
    "application/vnd.oci.image.layer.hoist.meta.v1.erofs"
}

/// An unknown key, a parent that does not exist: the snapshotter's gRPC errors.
fn bad_input(node: &Node) {
    let rt = rt();
    use containerd_client::services::v1::snapshots as pb;
    let mut c = pb::snapshots_client::SnapshotsClient::new(
        rt.block_on(channel(node.snapshotter_socket())).unwrap(),
    );
    let e = rt
        .block_on(c.stat(pb::StatSnapshotRequest {
            snapshotter: "hoist".into(),
            key: "no-such-key".into(),
        }))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    assert!(e.message().contains("no-such-key"), "{e}");
    let e = rt
        .block_on(c.prepare(pb::PrepareSnapshotRequest {
            snapshotter: "hoist".into(),
            key: "k".into(),
            parent: "no-such-parent".into(),
            labels: Default::default(),
        }))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    assert!(e.message().contains("no-such-parent"), "{e}");
    let e = rt
        .block_on(c.stat(pb::StatSnapshotRequest {
            snapshotter: "hoist".into(),
            key: "k".into(),
        }))
        .unwrap_err();
    assert_eq!(
        e.code(),
        tonic::Code::NotFound,
        "a failed Prepare left k behind"
    );
}

/// A registry behind TLS with a CA of its own, and two mirrors in front of it, one down
/// and one without the image, configured only in containerd's host file (`certs.d/HOST/hosts.toml`): `hoist convert`
/// pushes to it, `hoist mount` reads from it, and containerd with the snapshotter runs a
/// container from it. Without the file, hoist's error says the certificate is not
/// trusted and how to trust it.
#[test]
fn a_tls_registry_and_a_dead_mirror_from_certs_d_serve_convert_mount_and_containerd() {
    let Some(layout) = setup() else { return };
    let dir = scratch().join("containerd-tls");
    std::fs::create_dir_all(&dir).unwrap();
    let tls = hoist_testkit::TlsFiles::generate(&dir.join("tls"));
    let reg = Registry::start_tls(&Auth::None, &tls);
    let _stop = StopDaemon(dir.join("hoist"));
    // A port nothing listens on: the mirror is down.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    // A mirror that is up but has nothing: it answers 404, and the next one is asked.
    let empty = Registry::start(&Auth::None);
    let certs = dir.join("certs.d");
    let node = Node {
        dir: dir.clone(),
        home: dir.join("hoist"),
        registry_host: reg.addr.clone(),
        registry_args: vec!["--hosts-dir".into(), certs.display().to_string()],
        snapshotter_args: Vec::new(),
    };
    let reference = umoci_unpack(&layout, "tiny-v1", "tls-ref");
    let want = sha256_hex(&reference.join("rootfs/app/data.bin"));
    let pause = dir.join("pause-layout");
    pause_layout(&pause, &reference.join("rootfs/bin/busybox"));
    reg.push_with_skopeo(&pause, "pause", "pause", None);
    node.write_config(
        &format!("{}/pause:pause", reg.addr),
        &format!(
            "server = \"https://{r}\"\nca = \"{ca}\"\n[host.\"http://{dead_addr}\"]\n  capabilities = [\"pull\", \"resolve\"]\n[host.\"http://{empty}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            r = reg.addr,
            ca = tls.ca.display(),
            empty = empty.addr
        ),
    );
    let image = format!("{}/hoist/tiny:v1", reg.addr);
    let src = format!("oci:{}:tiny-v1", layout.display());
    let convert_home = dir.join("convert-home").display().to_string();
    let env = [("HOIST_HOME", convert_home.as_str())];

    // Without the host file: the certificate is not trusted, and the error says how.
    let err = hoist_err(
        &[
            "--hosts-dir",
            "/nonexistent",
            "convert",
            &src,
            &format!("docker://{image}"),
        ],
        &env,
    );
    assert!(
        err.contains("not trusted") && err.contains("hosts.toml"),
        "{err}"
    );
    // With it: convert pushes, over TLS.
    let certs_s = certs.display().to_string();
    hoist_env_ok(
        &[
            "--hosts-dir",
            &certs_s,
            "convert",
            &src,
            &format!("docker://{image}"),
        ],
        &env,
    );

    // hoist mount reads through the host file: one mirror is down, the other answers
    // 404, the registry serves.
    let mp = dir.join("mnt");
    std::fs::create_dir_all(&mp).unwrap();
    let out = node.hoist(&[
        "--hosts-dir",
        &certs_s,
        "mount",
        &format!("docker://{image}"),
        &mp.display().to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sha256_hex(&mp.join("app/data.bin")), want);
    assert!(node
        .hoist(&["umount", &mp.display().to_string()])
        .status
        .success());

    // containerd and the snapshotter, both configured by the same file.
    let _snapshotter = node.start_snapshotter();
    let _containerd = node.start_containerd();
    let cri = Cri::new(&node.containerd_socket());
    cri.pull(&image)
        .expect("PullImage over TLS through a dead mirror");
    let sandbox = sandbox_config(&dir.join("logs"), "tls-pod");
    let pod = cri.run_pod(&sandbox).expect("RunPodSandbox");
    let id = cri
        .start(
            &pod,
            &sandbox,
            "tls",
            &image,
            &sh("sha256sum /app/data.bin"),
        )
        .expect("starting the tls container");
    wait_for("the container's output", Duration::from_secs(60), || {
        log_text(&dir, "tls").contains(&want)
    });
    cri.remove_container(&id).expect("RemoveContainer");
    cri.remove_pod(&pod).expect("removing the pod");
}

/// Writes a two-platform image at `oci:DIR:multi`: tiny-v1 as linux/amd64, and the same
/// layers under an arm64 config as linux/arm64 (nothing runs it). Returns the layer
/// digests of tiny-v1.
fn two_platform_layout(layout: &Path, dir: &Path) -> Vec<String> {
    use sha2::Digest as _;
    let out = Command::new("skopeo")
        .args(["copy", "-q"])
        .arg(format!("oci:{}:tiny-v1", layout.display()))
        .arg(format!("oci:{}:amd", dir.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let blob = |d: &str| {
        dir.join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let put = |bytes: Vec<u8>| {
        let d = format!("sha256:{:x}", sha2::Sha256::digest(&bytes));
        std::fs::write(blob(&d), &bytes).unwrap();
        (d, bytes.len())
    };
    let mut index: Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let amd = index["manifests"][0].clone();
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(blob(amd["digest"].as_str().unwrap())).unwrap())
            .unwrap();
    let mut config: Value = serde_json::from_slice(
        &std::fs::read(blob(manifest["config"]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    config["architecture"] = "arm64".into();
    config["variant"] = "v8".into();
    let (cd, cs) = put(serde_json::to_vec(&config).unwrap());
    let mut arm = manifest.clone();
    arm["config"]["digest"] = cd.into();
    arm["config"]["size"] = cs.into();
    let (ad, asize) = put(serde_json::to_vec(&arm).unwrap());
    let entry = |d: &Value, size: &Value, arch: &str, variant: Option<&str>| {
        let mut p = serde_json::json!({ "os": "linux", "architecture": arch });
        if let Some(v) = variant {
            p["variant"] = v.into();
        }
        serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": d, "size": size, "platform": p,
        })
    };
    let multi = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            entry(&amd["digest"], &amd["size"], "amd64", None),
            entry(&ad.into(), &asize.into(), "arm64", Some("v8")),
        ],
    });
    let (id, isize) = put(serde_json::to_vec(&multi).unwrap());
    index["manifests"] = serde_json::json!([{
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": id, "size": isize,
        "annotations": { "org.opencontainers.image.ref.name": "multi" },
    }]);
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

/// `skopeo inspect --raw` of a registry image.
fn raw(image: &str) -> Value {
    let out = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{image}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{image}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Issue 16: `hoist convert` of a two-platform index converts both platforms and writes
/// an index (`--platform` chooses); with `--merge-platform` one tag holds the originals
/// and the hoist manifests. Through CRI, a node with hoist's snapshotter runs the merged
/// tag lazily (no layer of either kind is downloaded by the pull), and a node with
/// containerd's overlayfs snapshotter runs the original.
#[test]
fn a_multi_platform_index_converts_whole_and_a_merged_tag_serves_both_kinds_of_node() {
    let Some(layout) = setup() else { return };
    let dir = scratch().join("containerd-multi");
    std::fs::create_dir_all(&dir).unwrap();
    let multi = dir.join("multi-layout");
    let original_layers = two_platform_layout(&layout, &multi);
    let reg = Registry::start(&Auth::None);
    let proxy = FaultProxy::start(&reg.addr);
    let _stop = StopDaemon(dir.join("hoist"));
    let reference = umoci_unpack(&layout, "tiny-v1", "multi-ref");
    let want = sha256_hex(&reference.join("rootfs/app/data.bin"));
    let src = format!("oci:{}:multi", multi.display());
    let convert_home = dir.join("convert-home").display().to_string();
    let convert = |dst: &str, extra: &[&str]| {
        let mut args = vec!["--plain-http", "convert", &src, dst];
        args.extend_from_slice(extra);
        hoist_env_ok(&args, &[("HOIST_HOME", convert_home.as_str())])
    };
    let platforms = |index: &Value| -> Vec<String> {
        index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                let p = &m["platform"];
                format!(
                    "{}/{}",
                    p["os"].as_str().unwrap(),
                    p["architecture"].as_str().unwrap()
                )
            })
            .collect()
    };
    let repo = format!("{}/multi", proxy.addr);

    // Every platform, into an index of hoist manifests.
    convert(&format!("docker://{repo}:hoist"), &[]);
    let index = raw(&format!("{repo}:hoist"));
    assert_eq!(platforms(&index), ["linux/amd64", "linux/arm64"], "{index}");
    for m in index["manifests"].as_array().unwrap() {
        let manifest = raw(&format!("{repo}@{}", m["digest"].as_str().unwrap()));
        assert!(
            manifest["layers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|l| l["mediaType"].as_str().unwrap().contains(".hoist.")),
            "{manifest}"
        );
    }
    // One platform.
    convert(
        &format!("docker://{repo}:arm"),
        &["--platform", "linux/arm64"],
    );
    assert_eq!(platforms(&raw(&format!("{repo}:arm"))), ["linux/arm64"]);
    // Merged: the originals first, then the hoist manifests, marked.
    convert(&format!("docker://{repo}:merged"), &["--merge-platform"]);
    let merged = raw(&format!("{repo}:merged"));
    assert_eq!(
        platforms(&merged),
        ["linux/amd64", "linux/arm64", "linux/amd64", "linux/arm64"],
        "{merged}"
    );
    let entries = merged["manifests"].as_array().unwrap();
    for (k, hoist) in entries[2..].iter().enumerate() {
        assert_eq!(
            hoist["platform"]["os.features"],
            serde_json::json!(["hoist"]),
            "{hoist}"
        );
        assert_eq!(
            hoist["annotations"]["dev.hoist.source.manifest"], entries[k]["digest"],
            "{hoist}"
        );
    }
    let hoist_amd = raw(&format!(
        "{repo}@{}",
        entries[2]["digest"].as_str().unwrap()
    ));
    let hoist_blobs = hoist_data_blobs(&hoist_amd);

    // A node with hoist: the merged tag is served lazily.
    let pause = dir.join("pause-layout");
    pause_layout(&pause, &reference.join("rootfs/bin/busybox"));
    reg.push_with_skopeo(&pause, "pause", "pause", None);
    let hosts = format!(
        "server = \"http://{h}\"\n[host.\"http://{h}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
        h = proxy.addr
    );
    let node = Node {
        dir: dir.join("node-hoist"),
        home: dir.join("hoist"),
        registry_host: proxy.addr.clone(),
        registry_args: vec!["--plain-http".into()],
        snapshotter_args: Vec::new(),
    };
    std::fs::create_dir_all(&node.dir).unwrap();
    node.write_config(&format!("{}/pause:pause", proxy.addr), &hosts);
    let image = format!("{repo}:merged");
    {
        let _snapshotter = node.start_snapshotter();
        let _containerd = node.start_containerd();
        let cri = Cri::new(&node.containerd_socket());
        cri.pull(&format!("{}/pause:pause", proxy.addr))
            .expect("the pause image");
        proxy.take_log();
        cri.pull(&image).expect("PullImage of the merged tag");
        let log = proxy.take_log();
        let fetched: Vec<&String> = log
            .iter()
            .filter(|l| {
                l.contains("/blobs/")
                    && (original_layers
                        .iter()
                        .chain(&hoist_blobs)
                        .any(|d| l.contains(d.as_str())))
            })
            .collect();
        assert!(
            fetched.is_empty(),
            "layers fetched by the pull: {fetched:?}"
        );
        assert_eq!(node.image_mounts().len(), 1, "the hoist image's lazy mount");
        let sandbox = sandbox_config(&node.dir.join("logs"), "multi-pod");
        let pod = cri.run_pod(&sandbox).expect("RunPodSandbox");
        let id = cri
            .start(&pod, &sandbox, "m", &image, &sh("sha256sum /app/data.bin"))
            .expect("starting the container");
        wait_for("the container's output", Duration::from_secs(60), || {
            log_text(&node.dir, "m").contains(&want)
        });
        cri.remove_container(&id).expect("RemoveContainer");
        cri.remove_pod(&pod).expect("removing the pod");
    }

    // A node without hoist: containerd's overlayfs snapshotter gets the original.
    let plain = Node {
        dir: dir.join("node-plain"),
        home: dir.join("hoist-plain"),
        registry_host: proxy.addr.clone(),
        registry_args: Vec::new(),
        snapshotter_args: Vec::new(),
    };
    std::fs::create_dir_all(&plain.dir).unwrap();
    plain.write_config_with(&format!("{}/pause:pause", proxy.addr), &hosts, "overlayfs");
    let _containerd = plain.start_containerd();
    let cri = Cri::new(&plain.containerd_socket());
    proxy.take_log();
    cri.pull(&image)
        .expect("PullImage of the merged tag on a plain node");
    let log = proxy.take_log();
    assert!(
        original_layers
            .iter()
            .all(|d| log.iter().any(|l| l.contains(d.as_str()))),
        "the plain node did not download the original layers: {log:?}"
    );
    let sandbox = sandbox_config(&plain.dir.join("logs"), "plain-pod");
    let pod = cri.run_pod(&sandbox).expect("RunPodSandbox");
    let id = cri
        .start(&pod, &sandbox, "p", &image, &sh("sha256sum /app/data.bin"))
        .expect("starting the container");
    wait_for(
        "the plain node's container output",
        Duration::from_secs(60),
        || log_text(&plain.dir, "p").contains(&want),
    );
    cri.remove_container(&id).expect("RemoveContainer");
    cri.remove_pod(&pod).expect("removing the pod");
}
