//! Bad input gives a clear error naming the object, never a panic, never a write outside
//! the destination, and never a tagged half-written image.

mod common;
use common::*;
use std::io::Write;

/// Converts the single image of a crafted layout; returns (success, stderr).
fn convert_crafted(name: &str, layers: &[Vec<u8>]) -> (bool, String, std::path::PathBuf) {
    let src = scratch().join(format!("bad-src-{name}"));
    make_layout(&src, "t", layers);
    let dst = scratch().join(format!("bad-dst-{name}"));
    let out = hoist(&[
        "convert",
        &format!("oci:{}:t", src.display()),
        &format!("oci:{}:t", dst.display()),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !stderr.contains("panicked"),
        "{name}: hoist panicked: {stderr}"
    );
    (out.status.success(), stderr, dst)
}

fn assert_rejected(name: &str, layers: &[Vec<u8>], expect: &[&str]) {
    let (ok, stderr, dst) = convert_crafted(name, layers);
    assert!(!ok, "{name}: bad input was accepted");
    for e in expect {
        assert!(
            stderr.contains(e),
            "{name}: error {stderr:?} does not mention {e:?}"
        );
    }
    // Nothing tagged: the destination index names no image.
    if let Ok(index) = std::fs::read(dst.join("index.json")) {
        let index: serde_json::Value = serde_json::from_slice(&index).unwrap();
        assert_eq!(
            index["manifests"].as_array().map(Vec::len),
            Some(0),
            "{name}: a failed conversion tagged an image"
        );
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[test]
fn a_good_crafted_layer_converts() {
    // The control: the same helpers produce a layer that converts and unpacks.
    let layer = tar_of(&[
        raw_entry(b"etc/", b'5', b"", b""),
        raw_entry(b"etc/hosts", b'0', b"", b"127.0.0.1 localhost\n"),
    ]);
    let (ok, stderr, dst) = convert_crafted("good", &[gzip(&layer)]);
    assert!(ok, "{stderr}");
    hoist_ok(&["check", &format!("oci:{}:t", dst.display())]);
}

#[test]
fn zstd_and_plain_tar_layers_and_docker_manifests_convert() {
    let lower = tar_of(&[
        raw_entry(b"etc/", b'5', b"", b""),
        raw_entry(b"etc/a", b'0', b"", &vec![1u8; 200_000]),
    ]);
    let upper = tar_of(&[
        raw_entry(b"etc/.wh.a", b'0', b"", b""),
        raw_entry(b"etc/b", b'0', b"", b"bee\n"),
    ]);
    let zst = zstd::encode_all(&lower[..], 3).unwrap();
    for (name, docker) in [("mixed-oci", false), ("mixed-docker", true)] {
        let src = scratch().join(format!("src-{name}"));
        make_layout_as(&src, "t", &[zst.clone(), gzip(&upper)], docker);
        let image = format!("oci:{}:t", scratch().join(format!("dst-{name}")).display());
        hoist_ok(&["convert", &format!("oci:{}:t", src.display()), &image]);
        hoist_ok(&["check", &image]);
        let dir = scratch().join(format!("unpacked-{name}"));
        hoist_ok(&["unpack", &image, dir.to_str().unwrap()]);
        assert!(
            !dir.join("etc/a").exists(),
            "{name}: the whiteout removed etc/a"
        );
        assert_eq!(std::fs::read(dir.join("etc/b")).unwrap(), b"bee\n");
    }
    let plain = scratch().join("src-plain");
    make_layout(&plain, "t", &[lower]);
    hoist_ok(&[
        "convert",
        &format!("oci:{}:t", plain.display()),
        &format!("oci:{}:t", scratch().join("dst-plain").display()),
    ]);
}

#[test]
fn dot_dot_and_absolute_paths_are_refused() {
    assert_rejected(
        "dotdot",
        &[tar_of(&[raw_entry(b"../escape", b'0', b"", b"x")])],
        &["../escape", "'..'"],
    );
    assert_rejected(
        "absolute",
        &[tar_of(&[raw_entry(b"/etc/passwd", b'0', b"", b"x")])],
        &["/etc/passwd", "absolute"],
    );
    assert_rejected(
        "hardlink-escape",
        &[tar_of(&[raw_entry(
            b"evil",
            b'1',
            b"../../etc/shadow",
            b"",
        )])],
        &["evil", "hardlink target"],
    );
    assert_rejected(
        "hardlink-missing",
        &[tar_of(&[raw_entry(b"a", b'1', b"nothere", b"")])],
        &["nothere"],
    );
    assert!(!std::path::Path::new("/escape").exists());
}

#[test]
fn truncated_and_malformed_streams_name_the_layer() {
    let good = tar_of(&[raw_entry(b"big", b'0', b"", &vec![7u8; 300_000])]);
    let gz = gzip(&good);
    let digests = make_layout(
        &scratch().join("probe"),
        "t",
        &[gz[..gz.len() / 2].to_vec()],
    );
    assert_rejected(
        "truncated-gzip",
        &[gz[..gz.len() / 2].to_vec()],
        &[&digests[0]],
    );
    assert_rejected("truncated-tar", &[good[..100_000].to_vec()], &["big"]);
    let mut garbage = gz.clone();
    garbage[20] ^= 0xff;
    garbage[21] ^= 0xff;
    assert_rejected("corrupt-gzip", &[garbage], &["layer sha256:"]);
    // A header claiming an absurd size: the data runs out, the error says so.
    let mut absurd = raw_entry(b"huge", b'0', b"", b"");
    absurd[124..136].copy_from_slice(b"77777777777\0");
    let sum: u32 = absurd[..512]
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(b)
            }
        })
        .sum();
    absurd[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    assert_rejected("absurd-size", &[tar_of(&[absurd])], &["huge"]);
}

#[test]
fn a_layer_whose_bytes_do_not_match_its_digest_is_refused() {
    let layer = gzip(&tar_of(&[raw_entry(b"f", b'0', b"", b"hello")]));
    let src = scratch().join("bad-src-digest");
    let digests = make_layout(&src, "t", &[layer]);
    // Replace the blob's bytes behind its digest.
    let path = src
        .join("blobs/sha256")
        .join(digests[0].trim_start_matches("sha256:"));
    std::fs::write(
        &path,
        gzip(&tar_of(&[raw_entry(b"f", b'0', b"", b"HELLO")])),
    )
    .unwrap();
    let dst = scratch().join("bad-dst-digest");
    let out = hoist(&[
        "convert",
        &format!("oci:{}:t", src.display()),
        &format!("oci:{}:t", dst.display()),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&digests[0]) && stderr.contains("digest"),
        "{stderr}"
    );
}

#[test]
fn a_corrupted_byte_in_any_data_blob_is_caught_by_check() {
    let layout = fixtures();
    let image = convert(&layout, "tiny-v1", "corrupt", &[]);
    let dir = scratch().join("corrupt");
    let manifest_of = |dir: &std::path::Path| -> serde_json::Value {
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
        let d = index["manifests"][0]["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:")
            .to_string();
        serde_json::from_slice(&std::fs::read(dir.join("blobs/sha256").join(d)).unwrap()).unwrap()
    };
    let manifest = manifest_of(&dir);
    let blobs: Vec<(String, u64)> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["mediaType"] == "application/vnd.oci.image.layer.hoist.blob.v1")
        .map(|l| {
            (
                l["digest"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("sha256:")
                    .to_string(),
                l["size"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(!blobs.is_empty());
    for (hex, size) in blobs {
        // First byte, middle, and last byte (the trailer) of each blob.
        for at in [0, size / 2, size - 1] {
            let path = dir.join("blobs/sha256").join(&hex);
            let original = std::fs::read(&path).unwrap();
            let mut bad = original.clone();
            bad[at as usize] ^= 0x01;
            std::fs::write(&path, &bad).unwrap();
            let out = hoist(&["check", &image]);
            std::fs::write(&path, &original).unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success(),
                "byte {at} of blob {hex} flipped, check passed"
            );
            assert!(stderr.contains(&hex), "error names the blob: {stderr}");
            assert!(!stderr.contains("panicked"), "{stderr}");
        }
    }
    hoist_ok(&["check", &image]);
    // A chunk error names the chunk and a file that uses it.
    let path = dir.join("blobs/sha256");
    let data_blob = std::fs::read_dir(&path)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| p.metadata().unwrap().len())
        .unwrap();
    let original = std::fs::read(&data_blob).unwrap();
    let mut bad = original.clone();
    bad[100] ^= 0x80;
    std::fs::write(&data_blob, &bad).unwrap();
    let out = hoist(&["check", &image]);
    std::fs::write(&data_blob, &original).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("chunk ")
            && stderr.contains(" of blob sha256:")
            && stderr.contains("used by /"),
        "{stderr}"
    );
}

#[test]
fn converting_a_hoist_image_again_is_refused() {
    let layout = fixtures();
    let image = convert(&layout, "tiny-v1", "reconvert", &[]);
    let out = hoist(&[
        "convert",
        &image,
        &format!("oci:{}:x", scratch().join("reconvert2").display()),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already a hoist image"));
}

#[test]
fn a_failed_conversion_leaves_no_blob_behind() {
    let good = gzip(&tar_of(&[raw_entry(b"ok", b'0', b"", &vec![3u8; 100_000])]));
    // The failing layer stores a chunk before its bad entry.
    let bad = tar_of(&[
        raw_entry(b"stored", b'0', b"", &vec![5u8; 100_000]),
        raw_entry(b"../escape", b'0', b"", b"x"),
    ]);
    let (ok, _, dst) = convert_crafted("litter", &[good, bad]);
    assert!(!ok);
    let stored: Vec<_> = std::fs::read_dir(dst.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    // The first layer's finished blob may stay (content-addressed, untagged); the failed
    // layer's partial blob and any temporary file must not.
    assert!(stored.len() <= 1, "left behind: {stored:?}");
    assert!(
        stored
            .iter()
            .all(|n| !n.to_string_lossy().starts_with(".tmp")),
        "{stored:?}"
    );
}

/// A GNU sparse entry (old GNU format, type `S`): `regions` are (offset, length) of the
/// data stored, `real_size` the file's size (base-256 encoded, as GNU tar writes sizes
/// beyond 8 GiB).
fn gnu_sparse(path: &[u8], real_size: u64, regions: &[(u64, u64)], data: &[u8]) -> Vec<u8> {
    let mut out = raw_entry(path, b'S', b"", data);
    let h = &mut out[..512];
    // GNU's magic, not POSIX's.
    h[257..263].copy_from_slice(b"ustar ");
    h[263..265].copy_from_slice(b" \0");
    // A 12-byte number: octal, or base-256 (0x80, then big-endian) beyond 8 GiB.
    let num = |field: &mut [u8], v: u64| {
        if v < 1 << 33 {
            field.copy_from_slice(format!("{v:011o}\0").as_bytes());
        } else {
            field.fill(0);
            field[0] = 0x80;
            field[4..12].copy_from_slice(&v.to_be_bytes());
        }
    };
    // The map ends with an empty region at the real size, as GNU tar writes it.
    let map: Vec<(u64, u64)> = regions.iter().copied().chain([(real_size, 0)]).collect();
    assert!(map.len() <= 4, "no extension headers here");
    for (k, (off, len)) in map.iter().enumerate() {
        let at = 386 + k * 24;
        num(&mut h[at..at + 12], *off);
        num(&mut h[at + 12..at + 24], *len);
    }
    num(&mut h[483..495], real_size);
    set_checksum(h);
    out
}

/// Issue 19: a 2 KiB layer whose GNU sparse entry declares 4 TiB kept `hoist convert`
/// busy for hours (its time grew with the declared size). It is refused at once, with
/// the sizes; a sparse file of sane size converts to the right bytes.
#[test]
fn a_sparse_file_declaring_terabytes_is_refused_at_once() {
    let huge = gzip(&tar_of(&[gnu_sparse(
        b"huge",
        4 << 40,
        &[(0, 512)],
        &[7u8; 512],
    )]));
    assert!(huge.len() < 4096, "{} bytes", huge.len());
    let t = std::time::Instant::now();
    assert_rejected(
        "sparse-4tib",
        &[huge],
        &["huge", "GNU sparse", "4398046511104 bytes", "holes"],
    );
    eprintln!("refused in {:?}", t.elapsed());

    // 3 MiB with 512 bytes of data at 1 MiB: converts, and unpacks to the same bytes.
    let sparse = tar_of(&[gnu_sparse(b"s", 3 << 20, &[(1 << 20, 512)], &[9u8; 512])]);
    let (ok, stderr, dst) = convert_crafted("sparse-small", &[sparse]);
    assert!(ok, "{stderr}");
    let out = scratch().join("sparse-small-unpacked");
    let unpack = hoist(&[
        "unpack",
        &format!("oci:{}:t", dst.display()),
        &out.display().to_string(),
    ]);
    assert!(
        unpack.status.success(),
        "{}",
        String::from_utf8_lossy(&unpack.stderr)
    );
    let got = std::fs::read(out.join("s")).unwrap();
    let mut want = vec![0u8; 3 << 20];
    want[1 << 20..(1 << 20) + 512].fill(9);
    assert!(got == want, "the sparse file's bytes differ");
}

/// Issue 19: a conversion killed mid-write left a `.tmp-*` file in the destination's
/// blobs directory that nothing removed. Temporary files carry their writer's pid; the
/// next writer to the layout removes those of processes that are gone, once untouched
/// for an hour (a pid it cannot see may be a writer in another pid namespace).
#[test]
fn a_killed_writers_temporary_files_are_removed_by_the_next_conversion() {
    let good = gzip(&tar_of(&[raw_entry(b"ok", b'0', b"", b"fine")]));
    let (ok, stderr, dst) = convert_crafted("stale-tmp", &[good]);
    assert!(ok, "{stderr}");
    // A pid that is not running: one past the kernel's limit.
    let max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let stale = dst.join(format!("blobs/sha256/.tmp-{}-abc123", max + 1));
    let live = dst.join(format!("blobs/sha256/.tmp-{}-def456", std::process::id()));
    std::fs::write(&stale, b"partial").unwrap();
    std::fs::write(&live, b"in progress").unwrap();
    // Both untouched for two hours: only the dead writer's goes.
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
    for f in [&stale, &live] {
        std::fs::File::options()
            .write(true)
            .open(f)
            .unwrap()
            .set_modified(old)
            .unwrap();
    }
    let src = scratch().join("bad-src-stale-tmp");
    let out = hoist(&[
        "convert",
        &format!("oci:{}:t", src.display()),
        &format!("oci:{}:t2", dst.display()),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stale.exists(), "the dead writer's temporary file stayed");
    assert!(live.exists(), "a live writer's temporary file was removed");
}

/// Issue 19: `convert` accepted trees 5,000 and 10,000 directories deep that `check` and
/// `mount` then refused ("nested too deep") and `unpack` failed half-way through.
/// Convert refuses them, naming the entry and the limit; the deepest tree the readers
/// walk (4,095 levels) converts and checks.
#[test]
fn a_tree_deeper_than_check_and_mount_read_is_refused_by_convert() {
    for levels in [5000usize, 10_000] {
        let path = "d/".repeat(levels);
        let layer = tar_of(&[
            pax_header(&[("path", path.as_bytes())]),
            raw_entry(b"deep/", b'5', b"", b""),
        ]);
        assert_rejected(
            &format!("deep-{levels}"),
            &[gzip(&layer)],
            &[
                "entry \"d/d/d/",
                &format!("nested {levels} levels deep"),
                "at most 4095",
            ],
        );
    }
    let deepest = "d/".repeat(4095);
    let layer = tar_of(&[
        pax_header(&[("path", deepest.as_bytes())]),
        raw_entry(b"deepest/", b'5', b"", b""),
        pax_header(&[("path", format!("{deepest}f").as_bytes())]),
        raw_entry(b"f", b'0', b"", b"at the bottom\n"),
    ]);
    let (ok, stderr, dst) = convert_crafted("deepest", &[gzip(&layer)]);
    assert!(ok, "the deepest tree check reads was refused: {stderr}");
    hoist_ok(&["check", &format!("oci:{}:t", dst.display())]);
}

/// Issue 19: wrong or empty `rootfs.diff_ids` in the config were accepted (and replaced
/// in the converted config). They are checked against the uncompressed layers, as the
/// OCI image spec requires, also when the layers come from the conversion cache; the
/// error names the layer, the expected and the actual digest.
#[test]
fn config_diff_ids_are_checked_against_the_uncompressed_layers() {
    let layer = gzip(&tar_of(&[raw_entry(
        b"diff-id-check",
        b'0',
        b"",
        b"a layer of this test only\n",
    )]));
    let actual = diff_id(&layer);
    let convert = |name: &str, diff_ids: &[String]| {
        let src = scratch().join(format!("diffid-src-{name}"));
        let digests = make_layout_full(&src, "t", std::slice::from_ref(&layer), false, diff_ids);
        let out = hoist(&[
            "convert",
            &format!("oci:{}:t", src.display()),
            &format!(
                "oci:{}:t",
                scratch().join(format!("diffid-dst-{name}")).display()
            ),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!stderr.contains("panicked"), "{stderr}");
        (out.status.success(), stderr, digests[0].clone())
    };
    // The digest of the compressed blob (a common mistake) in place of the diff_id.
    let compressed = format!("sha256:{}", hex_sha256(&layer));
    let wrong = |name: &str| {
        let (ok, stderr, layer_digest) = convert(name, std::slice::from_ref(&compressed));
        assert!(!ok, "{name}: a wrong diff_id was accepted");
        for want in [
            layer_digest.as_str(),
            &compressed,
            &actual,
            "rootfs.diff_ids[0]",
        ] {
            assert!(
                stderr.contains(want),
                "{name}: {stderr:?} does not name {want}"
            );
        }
    };
    wrong("wrong");
    let (ok, stderr, _) = convert("empty", &[]);
    assert!(!ok, "empty diff_ids were accepted");
    assert!(
        stderr.contains("rootfs.diff_ids lists 0 digests for 1 layers"),
        "{stderr}"
    );
    // The right one converts (and fills the conversion cache); the wrong one is still
    // refused when the layer would come from that cache.
    let (ok, stderr, _) = convert("right", std::slice::from_ref(&actual));
    assert!(ok, "{stderr}");
    wrong("wrong-cached");
}

fn hex_sha256(data: &[u8]) -> String {
    use sha2::Digest as _;
    format!("{:x}", sha2::Sha256::digest(data))
}

/// Issue 19: a PAX `size` of -1, or one that overflows, or one that is not a number,
/// was ignored and the ustar header's size used; GNU tar refuses such archives. Convert
/// refuses them too, naming the entry.
#[test]
fn pax_sizes_gnu_tar_refuses_are_refused() {
    for (name, value, why) in [
        ("pax-size-negative", "-1", "is not a size in bytes"),
        (
            "pax-size-overflow",
            "99999999999999999999999",
            "overflows 64 bits",
        ),
        ("pax-size-nan", "12abc", "is not a size in bytes"),
    ] {
        let layer = tar_of(&[
            pax_header(&[("size", value.as_bytes())]),
            raw_entry(b"victim", b'0', b"", b"hello"),
        ]);
        assert_rejected(
            name,
            &[gzip(&layer)],
            &["entry \"victim\"", &format!("PAX size \"{value}\" {why}")],
        );
    }
}

/// Converts a crafted layer that must convert; returns the image reference.
fn converted(name: &str, layer: &[u8]) -> String {
    let (ok, stderr, dst) = convert_crafted(name, &[gzip(layer)]);
    assert!(ok, "{name}: {stderr}");
    format!("oci:{}:t", dst.display())
}

/// Issue 19: `hoist unpack` of an xattr the target filesystem cannot hold said "No space
/// left on device", and of a malformed `security.capability` "Invalid argument", naming
/// neither the file nor the xattr, and left a partial tree. The error names both and
/// says what to do; a failed unpack leaves nothing (a directory it made is removed, an
/// empty one the user gave is emptied again).
#[test]
fn an_xattr_the_target_refuses_is_named_and_no_partial_tree_stays() {
    let with_xattr = |name: &str, value: &[u8]| {
        tar_of(&[
            raw_entry(b"a-first", b'0', b"", b"written before the failure\n"),
            raw_entry(b"app/", b'5', b"", b""),
            pax_header(&[(&format!("SCHILY.xattr.{name}"), value)]),
            raw_entry(b"app/victim", b'0', b"", b"data\n"),
        ])
    };
    let unpack = |image: &str, dir: &std::path::Path| {
        let out = hoist(&["unpack", image, &dir.display().to_string()]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!stderr.contains("panicked"), "{stderr}");
        (out.status.success(), stderr)
    };

    // 8 KiB: more than ext4 holds, less than EROFS and the VFS do.
    let big = vec![b'x'; 8192];
    let image = converted("xattr-big", &with_xattr("user.big", &big));
    let probe = scratch().join("xattr-probe");
    std::fs::write(&probe, b"").unwrap();
    let fits = rustix::fs::setxattr(&probe, "user.big", &big, rustix::fs::XattrFlags::empty());
    let dir = scratch().join("unpack-xattr-big");
    let (ok, stderr) = unpack(&image, &dir);
    if fits.is_ok() {
        // This filesystem holds it: the value comes out whole.
        assert!(ok, "{stderr}");
        let mut value = vec![0u8; 16384];
        let n = rustix::fs::getxattr(dir.join("app/victim"), "user.big", &mut value).unwrap();
        assert_eq!(&value[..n], &big[..]);
    } else {
        assert!(!ok, "unpack succeeded where setxattr fails: {fits:?}");
        for want in [
            &format!("{}/app/victim", dir.display()),
            "setting xattr user.big",
            "cannot hold an xattr of 8192 bytes",
            "filesystem with larger xattrs",
        ] {
            assert!(stderr.contains(want), "{stderr:?} does not say {want:?}");
        }
        assert!(!dir.exists(), "a partial tree stayed in {}", dir.display());
    }

    // A malformed file capability: the kernel refuses it (EINVAL), or refuses anyone
    // but root to set it (EPERM).
    let image = converted("xattr-cap", &with_xattr("security.capability", b"bad"));
    let dir = scratch().join("unpack-xattr-cap/new/dir");
    let (ok, stderr) = unpack(&image, &dir);
    assert!(!ok, "a malformed security.capability was set");
    let hint = if is_root() {
        "file capability (3 bytes) is malformed"
    } else {
        "run hoist unpack as root"
    };
    for want in [
        &format!("{}/app/victim", dir.display()),
        "setting xattr security.capability",
        hint,
    ] {
        assert!(stderr.contains(want), "{stderr:?} does not say {want:?}");
    }
    assert!(
        !scratch().join("unpack-xattr-cap").exists(),
        "the directories made for the unpack stayed"
    );
    // Into an empty directory the user made: it stays, empty.
    let given = scratch().join("unpack-xattr-given");
    std::fs::create_dir(&given).unwrap();
    let (ok, _) = unpack(&image, &given);
    assert!(!ok);
    assert_eq!(std::fs::read_dir(&given).unwrap().count(), 0, "left behind");
}

/// Issue 19: a failed `hoist export` left `meta.erofs` and an empty `.img` behind. It
/// writes temporary names, renames them when all is written, and on failure leaves
/// nothing new: no files, and no directory it made.
#[test]
fn a_failed_export_leaves_nothing_behind() {
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let image = converted(
        "export-fail",
        &tar_of(&[raw_entry(b"data", b'0', b"", &data)]),
    );
    let dst = scratch().join("bad-dst-export-fail");
    // The control: it exports.
    let good = scratch().join("export-good");
    hoist_ok(&["export", &image, &good.display().to_string()]);
    let names: Vec<String> = std::fs::read_dir(&good)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().any(|n| n == "meta.erofs"), "{names:?}");
    assert!(names.iter().any(|n| n.ends_with(".img")), "{names:?}");
    assert!(names.iter().all(|n| !n.starts_with(".tmp")), "{names:?}");
    // Corrupt the data blob's first chunk: export fails after the metadata is written.
    let blob = dst.join("blobs/sha256").join(data_blob_hex(&dst));
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&blob, &bytes).unwrap();
    for (dir, made) in [
        (scratch().join("export-fail/new"), false),
        (scratch().join("export-fail-given"), true),
    ] {
        if made {
            std::fs::create_dir(&dir).unwrap();
        }
        let err = hoist_err(&["export", &image, &dir.display().to_string()], &[]);
        assert!(err.contains("chunk 0 of blob sha256:"), "{err}");
        if made {
            let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
            assert!(
                left.is_empty(),
                "left behind in {}: {left:?}",
                dir.display()
            );
        } else {
            assert!(
                !scratch().join("export-fail").exists(),
                "the directories made for the export stayed"
            );
        }
    }
}

/// The hex digest of the one data blob of the single image of a converted layout.
fn data_blob_hex(layout: &std::path::Path) -> String {
    let read = |p: std::path::PathBuf| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let index = read(layout.join("index.json"));
    let digest = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest = read(layout.join("blobs/sha256").join(&digest[7..]));
    let blobs: Vec<&str> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["mediaType"] == "application/vnd.oci.image.layer.hoist.blob.v1")
        .map(|l| &l["digest"].as_str().unwrap()[7..])
        .collect();
    assert_eq!(blobs.len(), 1, "{manifest}");
    blobs[0].to_string()
}

/// Issue 19: `hoist mount foo /tmp` started a daemon under `$HOIST_HOME` (by default
/// /var/lib/hoist) before it rejected the reference. The reference and the mount point
/// are checked first: nothing is started, `$HOIST_HOME` is not even created.
#[test]
fn a_bad_mount_or_run_starts_no_daemon_and_creates_nothing() {
    let home = scratch().join("never-made-home");
    let home_s = home.display().to_string();
    let env = [("HOIST_HOME", home_s.as_str())];
    let dir = scratch().display().to_string();
    let file = scratch().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let file_s = file.display().to_string();
    let cases: [(&[&str], &str); 5] = [
        (&["mount", "foo", &dir], "invalid image reference \"foo\""),
        (
            &["mount", "docker://Bad/Repo:x", &dir],
            "invalid image reference",
        ),
        (
            &["mount", "oci:/nowhere:t", "/no/such/mount/point"],
            "mount point /no/such/mount/point",
        ),
        (&["mount", "oci:/nowhere:t", &file_s], "is not a directory"),
        (&["run", "foo"], "invalid image reference \"foo\""),
    ];
    for (args, expect) in cases {
        let out = hoist_env(args, &env);
        let made = home.exists();
        if made {
            // Stop what the failure started before asserting.
            let _ = hoist_env(&["daemon", "stop"], &env);
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
        assert!(
            !made,
            "{args:?} created {} (a daemon was started)",
            home.display()
        );
    }
}
