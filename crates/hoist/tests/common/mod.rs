//! Shared helpers of the integration tests: fixtures, the `hoist` binary, referees.
#![allow(dead_code, missing_docs)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

/// The OCI layout of real images (../shared/fixtures/oci), or `HOIST_FIXTURES`.
/// Returns `None` (after saying so) when absent, unless `HOIST_REQUIRE_FIXTURES` is set.
pub fn fixtures() -> Option<PathBuf> {
    let dir = std::env::var_os("HOIST_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/oci")
        });
    if dir.join("index.json").is_file() {
        return Some(dir);
    }
    if std::env::var_os("HOIST_REQUIRE_FIXTURES").is_some() {
        panic!(
            "fixture images not found at {} (set HOIST_FIXTURES)",
            dir.display()
        );
    }
    eprintln!(
        "SKIPPED: fixture images not found at {} (set HOIST_FIXTURES)",
        dir.display()
    );
    None
}

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

/// Whether tests that need root (chown, mknod, mount) can run.
pub fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

pub fn hoist(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hoist"))
        .args(args)
        .output()
        .expect("running hoist")
}

/// Runs hoist and panics with its output unless it succeeds.
pub fn hoist_ok(args: &[&str]) -> String {
    let out = hoist(args);
    assert!(
        out.status.success(),
        "hoist {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A scratch directory for the whole test process.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("hoist-test-")
            .tempdir_in("/var/tmp")
            .unwrap()
    })
    .path()
}

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
    let bundle = scratch().join(format!("umoci-{tag}"));
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
    let dump = hoist_treedump::dump(&bundle.join("rootfs")).unwrap();
    std::fs::remove_dir_all(&bundle).unwrap();
    cache.insert(tag.to_string(), dump.clone());
    dump
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
