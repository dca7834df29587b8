//! One expectation over every path: for every fixture image and every compressor, the
//! converted image passes `hoist check`, and `hoist unpack` gives exactly the tree
//! `umoci unpack` gives from the original; the kernel mounts the metadata blob and shows
//! the same tree; `fsck.erofs` reads every inode and chunk.

mod common;
use common::*;
use std::process::Command;

/// Whether `hoist unpack` can be compared with umoci here (root keeps owners and device
/// files).
fn can_unpack() -> bool {
    require(
        "hoist unpack against umoci",
        &[Need::Root, Need::tool("umoci")],
    )
}

#[test]
fn unpack_equals_umoci_for_every_image_and_compressor() {
    if !can_unpack() {
        return;
    }
    let layout = fixtures();
    // Small files in frames (the default) with each compressor, and without frames.
    let variants: [(&str, &[&str]); 4] = [
        ("zstd", &["--compressor", "zstd"]),
        ("lz4", &["--compressor", "lz4"]),
        ("none", &["--compressor", "none"]),
        ("noframes", &["--frame-size", "0"]),
    ];
    for tag in tags(&layout) {
        for (name, args) in variants {
            let image = convert(&layout, &tag, &format!("rt-{tag}-{name}"), args);
            let out = hoist_ok(&["check", &image]);
            assert!(out.contains(": ok"), "{out}");
            let dir = scratch().join(format!("unpack-{tag}-{name}"));
            hoist_ok(&["unpack", &image, dir.to_str().unwrap()]);
            assert_same_tree(&layout, &tag, &dir, &format!("hoist unpack ({name})"));
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}

#[test]
fn a_chunk_dictionary_of_the_same_image_leaves_next_to_nothing_to_store() {
    if !can_unpack() {
        return;
    }
    let layout = fixtures();
    let dict = convert(&layout, "tiny-v1", "dict-base", &[]);
    // Every chunk and small file is found in the dictionary (the small files one by one,
    // in its frames), but for a few bytes: the dictionary's tree is the merged one, so a
    // lower layer's file that an upper layer replaced is not among its files.
    let dst = format!("oci:{}:tiny-v1", scratch().join("dict-again").display());
    let src = format!("oci:{}:tiny-v1", layout.display());
    let out = hoist_ok(&["convert", &src, &dst, "--chunk-dict", &dict, "--json"]);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let layers = report["layers"].as_array().unwrap();
    assert!(!layers.is_empty());
    let sum = |key: &str| -> u64 {
        layers
            .iter()
            .map(|l| l["chunks"][key].as_u64().unwrap())
            .sum()
    };
    let (stored, found) = (sum("stored_bytes"), sum("dict_bytes"));
    assert!(
        found > 0 && stored * 10_000 < found,
        "{stored} bytes stored again, {found} found in the dictionary: {out}"
    );
    assert!(sum("small_files") > 0, "{out}");
    assert!(!report["dict_blobs"].as_array().unwrap().is_empty());
    let outp = hoist_ok(&["check", &dst]);
    assert!(outp.contains(": ok"), "{outp}");
    let dir = scratch().join("unpack-dict-again");
    hoist_ok(&["unpack", &dst, dir.to_str().unwrap()]);
    assert_same_tree(&layout, "tiny-v1", &dir, "hoist unpack (chunk dictionary)");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Issue 20: small files share frames, and a frame is found in a chunk dictionary only
/// whole; the dictionary's chunks are keyed at every block where a small file can
/// start, so that an image with a few changed files stores those files, not every
/// frame around them.
#[test]
fn a_chunk_dictionary_dedups_small_files_one_by_one() {
    if !can_unpack() {
        return;
    }
    let files = |changed: &[usize]| -> (Vec<u8>, u64) {
        let mut entries = vec![raw_entry(b"lib/", b'5', b"", b"")];
        let mut changed_bytes = 0;
        for i in 0..400usize {
            let mut body: Vec<u8> = (0..2000 + i % 7 * 300)
                .map(|k| b"abcdefghij"[(k * 7 + i * 13 + k / 11) % 10])
                .collect();
            body.extend_from_slice(format!("\n// file {i}\n").as_bytes());
            if changed.contains(&i) {
                body.extend_from_slice(b"// changed\n");
                changed_bytes += body.len() as u64;
            }
            entries.push(raw_entry(
                format!("lib/m{i:03}.js").as_bytes(),
                b'0',
                b"",
                &body,
            ));
        }
        (tar_of(&entries), changed_bytes)
    };
    let base = scratch().join("dict-files-base");
    let (tar, _) = files(&[]);
    make_layout(&base, "v1", &[tar]);
    let update = scratch().join("dict-files-update");
    let changed: Vec<usize> = (0..400).step_by(50).collect();
    let (tar, changed_bytes) = files(&changed);
    make_layout(&update, "v2", &[tar]);
    let dict = convert(&base, "v1", "dict-files-dict", &[]);
    let dst = format!("oci:{}:v2", scratch().join("dict-files-out").display());
    let src = format!("oci:{}:v2", update.display());
    let out = hoist_ok(&["convert", &src, &dst, "--chunk-dict", &dict, "--json"]);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let stored: u64 = report["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["chunks"]["stored_bytes"].as_u64().unwrap())
        .sum();
    assert!(
        stored <= changed_bytes,
        "{stored} bytes stored for {} changed files of {changed_bytes} bytes: {out}",
        changed.len()
    );
    let outp = hoist_ok(&["check", &dst]);
    assert!(outp.contains(": ok"), "{outp}");
    let dir = scratch().join("unpack-dict-files");
    hoist_ok(&["unpack", &dst, dir.to_str().unwrap()]);
    assert_same_tree(
        &update,
        "v2",
        &dir,
        "hoist unpack (small files from the dictionary)",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn kernel_mounts_the_metadata_blob_and_fsck_erofs_reads_it() {
    let needs = [
        Need::Root,
        Need::LoopDevices,
        Need::tool("umoci"),
        Need::Tool {
            command: "fsck.erofs",
            package: "erofs-utils",
        },
    ];
    if !require("kernel EROFS mounts", &needs) {
        return;
    }
    let layout = fixtures();
    for tag in tags(&layout) {
        let image = convert(&layout, &tag, &format!("kernel-{tag}"), &[]);
        let exp = scratch().join(format!("export-{tag}"));
        hoist_ok(&["export", &image, exp.to_str().unwrap()]);
        let mut devices: Vec<_> = std::fs::read_dir(&exp)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "img"))
            .collect();
        devices.sort();
        let meta = exp.join("meta.erofs");

        // fsck.erofs --extract reads every inode and every chunk through the device table.
        let extract = scratch().join(format!("fsck-{tag}"));
        let mut fsck = Command::new("fsck.erofs");
        for d in &devices {
            fsck.arg(format!("--device={}", d.display()));
        }
        let out = fsck
            .arg(format!("--extract={}", extract.display()))
            .arg(&meta)
            .output()
            .expect("fsck.erofs (erofs-utils)");
        assert!(
            out.status.success(),
            "fsck.erofs {tag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::remove_dir_all(&extract).unwrap();

        let mount = Loops::attach(&devices, &meta);
        let mnt = scratch().join(format!("mnt-{tag}"));
        std::fs::create_dir_all(&mnt).unwrap();
        let opts: Vec<String> = mount
            .devices
            .iter()
            .map(|d| format!("device={d}"))
            .collect();
        let status = Command::new("mount")
            .args([
                "-t",
                "erofs",
                "-o",
                &format!("ro,{}", opts.join(",")),
                &mount.meta,
            ])
            .arg(&mnt)
            .status()
            .unwrap();
        assert!(status.success(), "mount -t erofs {tag}");
        let result = std::panic::catch_unwind(|| {
            assert_same_tree(&layout, &tag, &mnt, "kernel EROFS mount")
        });
        // Once left mounted (busy for a moment: its status was not looked at), it kept
        // the scratch directory; now retried, then detached lazily.
        let detached = (0..50).any(|_| {
            let ok = Command::new("umount").arg(&mnt).status().unwrap().success();
            if !ok {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            ok
        });
        if !detached {
            Command::new("umount").arg("-l").arg(&mnt).status().unwrap();
        }
        drop(mount);
        std::fs::remove_dir_all(&exp).unwrap();
        if let Err(e) = result {
            std::panic::resume_unwind(e);
        }
    }
}

/// Loop devices over the exported files, detached on drop.
struct Loops {
    devices: Vec<String>,
    meta: String,
}

impl Loops {
    fn attach(devices: &[std::path::PathBuf], meta: &std::path::Path) -> Self {
        let attach = |p: &std::path::Path| {
            let out = Command::new("losetup")
                .args(["--find", "--show", "--read-only"])
                .arg(p)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "losetup {}: {}",
                p.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        };
        Loops {
            devices: devices.iter().map(|d| attach(d)).collect(),
            meta: attach(meta),
        }
    }
}

impl Drop for Loops {
    fn drop(&mut self) {
        for d in self.devices.iter().chain([&self.meta]) {
            let _ = Command::new("losetup").args(["-d", d]).status();
        }
    }
}

#[test]
fn conversion_is_deterministic() {
    let layout = fixtures();
    let a = convert(&layout, "tiny-v1", "det-a", &[]);
    let b = convert(&layout, "tiny-v1", "det-b", &[]);
    let digest = |r: &str| {
        let dir = r
            .trim_start_matches("oci:")
            .rsplit_once(':')
            .unwrap()
            .0
            .to_string();
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(format!("{dir}/index.json")).unwrap()).unwrap();
        index["manifests"][0]["digest"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        digest(&a),
        digest(&b),
        "same input and options must give the same manifest"
    );
    let c = convert(&layout, "tiny-v1", "det-c", &["--chunk-size", "64K"]);
    assert_ne!(
        digest(&a),
        digest(&c),
        "different options give a different image"
    );
}

/// The chunk tables of the data blobs of `image`, in the manifest's order.
fn blob_tables(image: &str) -> Vec<hoist_format::chunk::ChunkTable> {
    let (manifest, blob) = layout_manifest(image);
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["mediaType"] == hoist_oci::media::HOIST_BLOB)
        .map(|l| {
            let bytes = blob(l["digest"].as_str().unwrap());
            let size = bytes.len() as u64;
            let trailer = &bytes[bytes.len() - hoist_format::chunk::BLOB_TRAILER_SIZE..];
            let t = hoist_format::chunk::BlobTrailer::parse(trailer, size).unwrap();
            let tail = &bytes[t.table_offset as usize..];
            hoist_format::chunk::parse_blob_tail(tail, size).unwrap().1
        })
        .collect()
}

/// The layout a start-up trace gives (the chunks it names first in each blob, in its
/// order) moves chunks, never what the files hold: for every fixture image, a trace
/// naming every chunk in reverse order gives blobs whose chunks are in that order, a
/// stored trace that names their new places, and the same tree as umoci's.
#[test]
fn blobs_laid_out_in_a_traces_order_lead_with_its_chunks_and_unpack_the_same() {
    if !can_unpack() {
        return;
    }
    let layout = fixtures();
    for tag in tags(&layout) {
        let plain = convert(&layout, &tag, &format!("lo-{tag}-plain"), &[]);
        let before = blob_tables(&plain);
        let chunks: Vec<serde_json::Value> = before
            .iter()
            .enumerate()
            .rev()
            .flat_map(|(b, t)| {
                t.entries.iter().enumerate().rev().map(move |(i, e)| {
                    let digest: String = e.digest.iter().map(|x| format!("{x:02x}")).collect();
                    serde_json::json!({ "blob": b, "index": i, "digest": digest })
                })
            })
            .collect();
        let total = chunks.len() as u64;
        let trace = scratch().join(format!("lo-{tag}-trace.json"));
        let body = serde_json::json!({ "version": 1, "chunks": chunks });
        std::fs::write(&trace, body.to_string()).unwrap();
        let laid = format!(
            "oci:{}:{tag}",
            scratch().join(format!("lo-{tag}-laid")).display()
        );
        let src = format!("oci:{}:{tag}", layout.display());
        let t = trace.display().to_string();
        let out = hoist_ok(&["convert", &src, &laid, "--prefetch-trace", &t, "--json"]);
        let first = layers_sum(&out, "trace_first");
        // Each blob's chunks, reversed (a blob whose only chunk leads already does not
        // count as laid out).
        let after = blob_tables(&laid);
        assert_eq!(after.len(), before.len(), "{tag}");
        let mut moved = 0;
        for (b, (t0, t1)) in before.iter().zip(&after).enumerate() {
            let want: Vec<[u8; 32]> = t0.entries.iter().rev().map(|e| e.digest).collect();
            let got: Vec<[u8; 32]> = t1.entries.iter().map(|e| e.digest).collect();
            assert_eq!(got, want, "{tag}: blob {b} is not in the trace's order");
            if t0.entries.len() > 1 {
                moved += t0.entries.len() as u64;
            }
        }
        assert_eq!(first, moved, "{tag}: {out}");
        assert!(moved > 0 || total < 2, "{tag}: nothing to lay out");
        // The stored trace names the chunks' places in this image.
        let (manifest, blob) = layout_manifest(&laid);
        let layer = manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["mediaType"] == hoist_oci::media::HOIST_TRACE)
            .expect("a trace layer");
        let stored: serde_json::Value =
            serde_json::from_slice(&blob(layer["digest"].as_str().unwrap())).unwrap();
        let stored = stored["chunks"].as_array().unwrap();
        assert_eq!(stored.len() as u64, total);
        for c in stored {
            let (b, i) = (c["blob"].as_u64().unwrap(), c["index"].as_u64().unwrap());
            let e = &after[b as usize].entries[i as usize];
            let digest: String = e.digest.iter().map(|x| format!("{x:02x}")).collect();
            assert_eq!(c["digest"], digest.as_str(), "{tag}: {c}");
            assert_eq!(c["offset"], e.compressed_offset, "{tag}: {c}");
        }
        let out = hoist_ok(&["check", &laid]);
        assert!(out.contains(": ok"), "{out}");
        let dir = scratch().join(format!("unpack-lo-{tag}"));
        hoist_ok(&["unpack", &laid, dir.to_str().unwrap()]);
        assert_same_tree(&layout, &tag, &dir, "hoist unpack (trace order)");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
