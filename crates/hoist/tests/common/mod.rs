//! Shared helpers of the integration tests: fixtures, the `hoist` binary, referees.
#![allow(dead_code, missing_docs)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

// Not every test file uses every one of them.
#[allow(unused_imports)]
pub use hoist_testkit::{fixtures, is_root, require, Need};

/// Tags of the fixture layout.
pub fn tags(layout: &Path) -> Vec<String> {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            m["annotations"]["org.opencontainers.image.ref.name"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// Runs hoist with `HOIST_HOME` in this test process's scratch directory.
pub fn hoist(args: &[&str]) -> Output {
    hoist_env(args, &[])
}

/// Runs hoist with extra environment variables (`HOIST_HOME` defaults to the scratch
/// directory's `home`).
pub fn hoist_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hoist"));
    cmd.args(args).env("HOIST_HOME", scratch().join("home"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running hoist")
}

/// Runs hoist with extra environment variables; panics with its output unless it succeeds.
pub fn hoist_env_ok(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = hoist_env(args, env);
    assert!(
        out.status.success(),
        "hoist {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs hoist expecting failure; returns its stderr.
pub fn hoist_err(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = hoist_env(args, env);
    assert!(
        !out.status.success(),
        "hoist {args:?} should have failed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs hoist and panics with its output unless it succeeds.
pub fn hoist_ok(args: &[&str]) -> String {
    hoist_env_ok(args, &[])
}

/// A scratch directory for the whole test process (`/var/tmp/hoist-test-*`, 0700), removed
/// when the process ends unless a test failed ([`removed_unless_failed`]).
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| removed_unless_failed("hoist-test-"))
}

/// A new directory `/var/tmp/PREFIX*` (0700) that a watcher process removes once this test
/// process has ended, unless a test of it failed (panicked: the failure's output names the
/// directory, kept for debugging) or something is still mounted under it (the watcher says
/// so on the terminal).
pub fn removed_unless_failed(prefix: &str) -> PathBuf {
    static DIRS: Mutex<Vec<(PathBuf, std::process::Child)>> = Mutex::new(Vec::new());
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default(info);
            for (dir, _) in DIRS.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                let _ = std::fs::write(dir.join(FAILED), "");
                eprintln!(
                    "test scratch directory kept for debugging: {}",
                    dir.display()
                );
            }
        }));
    });
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/var/tmp")
        .expect("a directory under /var/tmp")
        .keep();
    // Its standard input is a pipe that this process alone holds open (std's pipes are
    // close-on-exec): end of file means this process has ended, however it ended. It
    // outlives this process, so nothing waits for it.
    let watcher = Command::new("sh")
        .args(["-c", WATCHER, "watcher"])
        .arg(&dir)
        .arg(FAILED)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("starting sh");
    DIRS.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((dir.clone(), watcher));
    dir
}

/// The mark a failed test leaves in its scratch directories.
const FAILED: &str = ".test-failed";

/// Waits for the test process to end, then removes `$1` unless it holds the mark `$2` or a
/// mount (a daemon a test left behind, a mount it did not detach).
const WATCHER: &str = r#"
cat >/dev/null
[ -e "$1/$2" ] && exit 0
if awk -v d="$1/" 'index($5 "/", d) == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo; then
  echo "test scratch directory kept: $1 has mounts under it" >&2
  exit 0
fi
rm -rf --one-file-system "$1"
"#;

/// `umoci unpack` of a fixture tag, made once per test process; returns the treedump.
pub fn reference_dump(layout: &Path, tag: &str) -> Vec<String> {
    static CACHE: OnceLock<Mutex<HashMap<String, Vec<String>>>> = OnceLock::new();
    // Held while computing, so concurrent tests wait for one umoci run.
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(d) = cache.get(tag) {
        return d.clone();
    }
    let bundle = umoci_unpack(layout, tag, &format!("umoci-{tag}"));
    let dump = hoist_treedump::dump(&bundle.join("rootfs")).unwrap();
    std::fs::remove_dir_all(&bundle).unwrap();
    cache.insert(tag.to_string(), dump.clone());
    dump
}

/// `umoci unpack` of a fixture tag into a new bundle `name` under the scratch directory
/// (rootfs and umoci's runtime config of the image).
pub fn umoci_unpack(layout: &Path, tag: &str, name: &str) -> PathBuf {
    let bundle = scratch().join(name);
    let out = Command::new("umoci")
        .args(["unpack", "--image", &format!("{}:{tag}", layout.display())])
        .arg(&bundle)
        .output()
        .expect("umoci is installed (apt-get install umoci)");
    assert!(
        out.status.success(),
        "umoci unpack {tag}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    bundle
}

/// Asserts that the tree at `dir` equals the reference rootfs of `tag`.
pub fn assert_same_tree(layout: &Path, tag: &str, dir: &Path, what: &str) {
    let reference = reference_dump(layout, tag);
    let got = hoist_treedump::dump(dir).unwrap();
    assert!(
        reference.len() > 10,
        "reference of {tag} is suspiciously small"
    );
    let (missing, extra) = hoist_treedump::diff(&reference, &got);
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what} of {tag} differs from umoci unpack:\n{}\n{}",
        missing
            .iter()
            .take(20)
            .map(|l| format!("- {l}"))
            .collect::<Vec<_>>()
            .join("\n"),
        extra
            .iter()
            .take(20)
            .map(|l| format!("+ {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Converts `tag` with `extra` options into a fresh layout; returns the reference.
pub fn convert(layout: &Path, tag: &str, name: &str, extra: &[&str]) -> String {
    let dst = scratch().join(name);
    let dst_ref = format!("oci:{}:{tag}", dst.display());
    let src_ref = format!("oci:{}:{tag}", layout.display());
    let mut args = vec!["convert", &src_ref, &dst_ref];
    args.extend_from_slice(extra);
    hoist_ok(&args);
    dst_ref
}

/// Writes an OCI layout at `dir` holding one image `tag` whose layers are `layers` (raw
/// blob bytes, stored as given); returns the layer digests.
pub fn make_layout(dir: &Path, tag: &str, layers: &[Vec<u8>]) -> Vec<String> {
    make_layout_as(dir, tag, layers, false)
}

/// Like [`make_layout`]; with `docker`, the manifest and media types are Docker v2's.
pub fn make_layout_as(dir: &Path, tag: &str, layers: &[Vec<u8>], docker: bool) -> Vec<String> {
    let diff_ids: Vec<String> = layers.iter().map(|l| diff_id(l)).collect();
    make_layout_full(dir, tag, layers, docker, &diff_ids)
}

/// The `diff_id` of a layer blob: the digest of its uncompressed tar stream (gzip and
/// zstd are recognised by their magic bytes, anything else is taken as a plain tar). A
/// layer that does not decompress (a test of broken streams) gets the digest of what
/// came out before the error.
pub fn diff_id(layer: &[u8]) -> String {
    use sha2::Digest as _;
    use std::io::Read;
    let mut tar = Vec::new();
    if layer.starts_with(&[0x1f, 0x8b]) {
        let _ = flate2::read::MultiGzDecoder::new(layer).read_to_end(&mut tar);
    } else if layer.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let _ = zstd::stream::read::Decoder::new(layer).and_then(|mut d| d.read_to_end(&mut tar));
    } else {
        tar = layer.to_vec();
    }
    format!("sha256:{:x}", sha2::Sha256::digest(&tar))
}

/// Like [`make_layout_as`], with the config's `rootfs.diff_ids` as given (right or not).
pub fn make_layout_full(
    dir: &Path,
    tag: &str,
    layers: &[Vec<u8>],
    docker: bool,
    diff_ids: &[String],
) -> Vec<String> {
    let (manifest_type, config_type, layer_type) = if docker {
        (
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.container.image.v1+json",
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
        )
    } else {
        (
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.oci.image.config.v1+json",
            "application/vnd.oci.image.layer.v1.tar",
        )
    };
    use sha2::Digest as _;
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let hex = format!("{:x}", sha2::Sha256::digest(bytes));
        std::fs::write(blobs.join(&hex), bytes).unwrap();
        (format!("sha256:{hex}"), bytes.len())
    };
    let digests: Vec<(String, usize)> = layers.iter().map(|l| put(l)).collect();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": { "Env": ["PATH=/bin"], "Cmd": ["/bin/sh"] },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    });
    let (cd, cs) = put(&serde_json::to_vec(&config).unwrap());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": { "mediaType": config_type, "digest": cd, "size": cs },
        "layers": digests.iter().map(|(d, s)| serde_json::json!({
            "mediaType": layer_type, "digest": d, "size": s })).collect::<Vec<_>>(),
    });
    let (md, ms) = put(&serde_json::to_vec(&manifest).unwrap());
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = serde_json::json!({ "schemaVersion": 2, "manifests": [{
        "mediaType": manifest_type, "digest": md, "size": ms,
        "annotations": { "org.opencontainers.image.ref.name": tag } }] });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    digests.into_iter().map(|d| d.0).collect()
}

/// A tar entry written byte by byte, so that even invalid paths can be produced.
pub fn raw_entry(path: &[u8], kind: u8, link: &[u8], data: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..path.len()].copy_from_slice(path);
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    set_checksum(&mut h);
    let mut out = h.to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(512), 0);
    out
}

/// A PAX extended header (type `x`) holding `key=value` records, which apply to the
/// entry that follows it.
pub fn pax_header(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut data = Vec::new();
    for (key, value) in records {
        // "LEN key=value\n", LEN counting itself.
        let body = [b" ", key.as_bytes(), b"=", value, b"\n"].concat();
        let mut len = body.len() + 1;
        while len.to_string().len() + body.len() != len {
            len = len.to_string().len() + body.len();
        }
        data.extend_from_slice(len.to_string().as_bytes());
        data.extend_from_slice(&body);
    }
    raw_entry(b"PaxHeaders/entry", b'x', b"", &data)
}

/// Writes the checksum of a tar header (after changing its fields).
pub fn set_checksum(h: &mut [u8]) {
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h[..512].iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

/// A tar archive of entries, with its end marker.
pub fn tar_of(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut out: Vec<u8> = entries.concat();
    out.extend_from_slice(&[0u8; 1024]);
    out
}

/// The loop devices bound to a file under `dir`.
pub fn loops_under(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let backing = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            backing
                .starts_with(&*dir.to_string_lossy())
                .then(|| format!("{:?}: {}", e.file_name(), backing.trim()))
        })
        .collect()
}

/// The sum of field `field` over the layers of a `hoist convert --json` report.
pub fn layers_sum(report: &str, field: &str) -> u64 {
    let report: serde_json::Value = serde_json::from_str(report).unwrap();
    report["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l[field].as_u64().unwrap())
        .sum()
}

/// The manifest of the one image in the OCI layout of `image` (`oci:DIR:TAG`), and a
/// reader of that layout's blobs by digest.
pub fn layout_manifest(image: &str) -> (serde_json::Value, impl Fn(&str) -> Vec<u8>) {
    let dir = image.trim_start_matches("oci:").rsplit_once(':').unwrap().0;
    let index = std::fs::read(format!("{dir}/index.json")).unwrap();
    let index: serde_json::Value = serde_json::from_slice(&index).unwrap();
    let dir = dir.to_string();
    let blob = move |digest: &str| {
        let hex = digest.trim_start_matches("sha256:");
        std::fs::read(format!("{dir}/blobs/sha256/{hex}")).unwrap()
    };
    let manifest = blob(index["manifests"][0]["digest"].as_str().unwrap());
    (serde_json::from_slice(&manifest).unwrap(), blob)
}
