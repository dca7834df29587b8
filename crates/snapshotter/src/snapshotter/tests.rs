//! The snapshotter's logic with a fake image mounter (the real daemon, containerd and
//! registry are exercised by `hoist`'s containerd tests).

use super::*;
use std::collections::HashSet;
use std::sync::Arc;

#[derive(Default)]
struct FakeImages {
    mounted: Mutex<HashSet<PathBuf>>,
    fail: Mutex<bool>,
}

impl ImageMounter for Arc<FakeImages> {
    fn mount(&self, _image: &str, mountpoint: &Path) -> Result<(), Error> {
        if *self.fail.lock().unwrap() {
            return Err(Error::Unavailable("registry down".into()));
        }
        self.mounted
            .lock()
            .unwrap()
            .insert(mountpoint.to_path_buf());
        Ok(())
    }
    fn umount(&self, mountpoint: &Path) -> Result<(), Error> {
        self.mounted.lock().unwrap().remove(mountpoint);
        Ok(())
    }
    fn is_mounted(&self, mountpoint: &Path) -> bool {
        self.mounted.lock().unwrap().contains(mountpoint)
    }
}

/// What is left under a snapshotter's root besides its records.
fn left_in(root: &Path) -> Vec<String> {
    std::fs::read_dir(root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "snapshots.json")
        .collect()
}

fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn open(root: &Path) -> (Snapshotter, Arc<FakeImages>) {
    let images = Arc::new(FakeImages::default());
    (
        Snapshotter::open(root, Box::new(images.clone())).unwrap(),
        images,
    )
}

#[test]
fn an_ordinary_layer_is_unpacked_committed_and_stacked() {
    let dir = tempfile::tempdir().unwrap();
    let (sn, _) = open(dir.path());
    let m = sn.prepare("ns/1/extract a", "", labels(&[])).unwrap();
    assert_eq!(m[0].fs_type, "bind");
    assert_eq!(m[0].options, ["rw", "rbind"]);
    std::fs::write(Path::new(&m[0].source).join("f"), b"x").unwrap();
    sn.commit("ns/2/a", "ns/1/extract a", labels(&[("l", "1")]))
        .unwrap();
    assert!(matches!(sn.stat("ns/1/extract a"), Err(Error::NotFound(_))));
    let info = sn.stat("ns/2/a").unwrap();
    assert_eq!(info.snapshot.kind, Kind::Committed);
    assert_eq!(info.snapshot.labels["l"], "1");
    let (bytes, inodes) = sn.usage("ns/2/a").unwrap();
    assert!(bytes > 0 && inodes == 2, "{bytes} {inodes}");

    sn.prepare("ns/3/extract b", "ns/2/a", labels(&[])).unwrap();
    sn.commit("ns/4/b", "ns/3/extract b", labels(&[])).unwrap();
    let m = sn.prepare("ns/5/ctr", "ns/4/b", labels(&[])).unwrap();
    assert_eq!(m[0].fs_type, "overlay");
    let lower = m[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .unwrap();
    // Nearest first.
    let (b, a) = lower.split_once(':').unwrap();
    assert!(b.ends_with(&format!("/{}/fs", sn.stat("ns/4/b").unwrap().snapshot.id)));
    assert!(a.ends_with(&format!("/{}/fs", sn.stat("ns/2/a").unwrap().snapshot.id)));
    assert_eq!(sn.mounts("ns/5/ctr").unwrap(), m);

    let v = sn.view("ns/6/v", "ns/2/a", labels(&[])).unwrap();
    assert_eq!(v[0].options, ["ro", "rbind"]);
    assert!(v[0].source.ends_with("/fs"));

    // Errors: a taken key, a missing or uncommitted parent, removal of a parent,
    // committing what is not active, mounts of a committed snapshot.
    assert!(matches!(
        sn.prepare("ns/5/ctr", "ns/4/b", labels(&[])),
        Err(Error::AlreadyExists(_))
    ));
    assert!(matches!(
        sn.prepare("k", "nope", labels(&[])),
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        sn.prepare("k", "ns/5/ctr", labels(&[])),
        Err(Error::FailedPrecondition(_))
    ));
    assert!(matches!(
        sn.remove("ns/2/a"),
        Err(Error::FailedPrecondition(_))
    ));
    assert!(matches!(
        sn.commit("x", "ns/6/v", labels(&[])),
        Err(Error::FailedPrecondition(_))
    ));
    assert!(matches!(
        sn.mounts("ns/2/a"),
        Err(Error::FailedPrecondition(_))
    ));
    assert!(matches!(sn.remove("nope"), Err(Error::NotFound(_))));
    assert!(sn.stat("k").is_err(), "a failed prepare left a record");

    // Removal from the top down leaves nothing.
    for k in ["ns/5/ctr", "ns/6/v", "ns/4/b", "ns/2/a"] {
        sn.remove(k).unwrap();
    }
    assert!(sn.list(&[]).unwrap().is_empty());
    assert_eq!(left_in(dir.path()), Vec::<String>::new());
}

fn hoist_labels(part: &str, chain: &str) -> BTreeMap<String, String> {
    labels(&[
        (REF_LABEL, chain),
        (LAYER_LABEL, part),
        (CRI_IMAGE_REF, "127.0.0.1:5000/hoist/app:v1"),
        (CRI_MANIFEST_DIGEST, "sha256:aaaa"),
    ])
}

#[test]
fn a_hoist_image_is_committed_at_prepare_and_mounted_once() {
    let dir = tempfile::tempdir().unwrap();
    let (sn, images) = open(dir.path());
    let chain = [
        ("blob", "sha256:c1"),
        ("meta", "sha256:c2"),
        ("trace", "sha256:c3"),
    ];
    let mut parent = String::new();
    for (part, c) in chain {
        let e = sn
            .prepare(
                &format!("k8s.io/1/extract-x {c}"),
                &parent,
                hoist_labels(part, c),
            )
            .unwrap_err();
        assert!(matches!(e, Error::AlreadyExists(_)), "{e}");
        // What containerd then looks for.
        let f = format!(r#"labels."{REF_LABEL}"=={c},parent=="{parent}""#);
        let found = sn.list(&[f]).unwrap();
        assert_eq!(found.len(), 1, "{c}");
        assert_eq!(found[0].name, c);
        assert_eq!(found[0].snapshot.kind, Kind::Committed);
        parent = c.to_string();
    }
    let meta = sn.stat("sha256:c2").unwrap().snapshot;
    assert_eq!(
        meta.content,
        Content::HoistImage {
            image: "docker://127.0.0.1:5000/hoist/app@sha256:aaaa".into()
        }
    );
    let mp = dir.path().join(meta.id.to_string()).join("image");
    assert!(images.is_mounted(&mp));
    // A second pull of the same image (another namespace) finds it.
    let e = sn
        .prepare(
            "default/9/extract-y sha256:c2",
            "sha256:c1",
            hoist_labels("meta", "sha256:c2"),
        )
        .unwrap_err();
    assert!(matches!(e, Error::AlreadyExists(_)));
    assert_eq!(images.mounted.lock().unwrap().len(), 1);

    // A container over it: the image's mount is the only lower directory.
    let m = sn
        .prepare("k8s.io/2/ctr", "sha256:c3", labels(&[]))
        .unwrap();
    assert!(
        m[0].options.contains(&format!("lowerdir={}", mp.display())),
        "{m:?}"
    );
    let v = sn.view("k8s.io/3/v", "sha256:c3", labels(&[])).unwrap();
    assert_eq!(v[0].source, mp.display().to_string());

    // Reopened (a restart): the records are there, and a lost mount is made again.
    drop(sn);
    images.mounted.lock().unwrap().clear();
    let sn = Snapshotter::open(dir.path(), Box::new(images.clone())).unwrap();
    assert!(images.is_mounted(&mp));
    assert_eq!(sn.mounts("k8s.io/2/ctr").unwrap(), m);

    // Removal unmounts the image.
    for k in [
        "k8s.io/2/ctr",
        "k8s.io/3/v",
        "sha256:c3",
        "sha256:c2",
        "sha256:c1",
    ] {
        sn.remove(k).unwrap();
    }
    assert!(!images.is_mounted(&mp));
    assert!(!mp.exists());
}

#[test]
fn a_hoist_layer_that_cannot_be_served_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (sn, images) = open(dir.path());
    *images.fail.lock().unwrap() = true;
    let e = sn
        .prepare("k/1/extract sha256:m", "", hoist_labels("meta", "sha256:m"))
        .unwrap_err();
    assert!(matches!(e, Error::Unavailable(_)), "{e}");
    // No CRI labels: a clear error naming the setting.
    let mut l = hoist_labels("meta", "sha256:m");
    l.remove(CRI_IMAGE_REF);
    let e = sn.prepare("k/2/extract sha256:m", "", l).unwrap_err();
    assert!(
        e.to_string().contains("disable_snapshot_annotations"),
        "{e}"
    );
    let e = sn
        .prepare("k/3/extract sha256:m", "", hoist_labels("what", "sha256:m"))
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert!(sn.list(&[]).unwrap().is_empty());
    sn.cleanup().unwrap();
    assert_eq!(left_in(dir.path()), Vec::<String>::new());
}

#[test]
fn update_changes_labels_by_path() {
    let dir = tempfile::tempdir().unwrap();
    let (sn, _) = open(dir.path());
    sn.prepare("a", "", labels(&[("x", "1"), ("y", "2")]))
        .unwrap();
    let i = sn
        .update(
            "a",
            labels(&[("x", "9")]),
            &["labels.x".into(), "labels.y".into()],
        )
        .unwrap();
    assert_eq!(i.snapshot.labels, labels(&[("x", "9")]));
    let i = sn.update("a", labels(&[("z", "3")]), &[]).unwrap();
    assert_eq!(i.snapshot.labels, labels(&[("z", "3")]));
    assert!(matches!(
        sn.update("a", labels(&[]), &["parent".into()]),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        sn.update("b", labels(&[]), &[]),
        Err(Error::NotFound(_))
    ));
}

#[test]
fn image_references_from_cri_labels() {
    for (r, want) in [
        (
            "127.0.0.1:5000/hoist/app:v1",
            "docker://127.0.0.1:5000/hoist/app@sha256:d",
        ),
        ("127.0.0.1:5000/app", "docker://127.0.0.1:5000/app@sha256:d"),
        ("reg/app@sha256:e", "docker://reg/app@sha256:d"),
        (
            "docker.io/library/busybox:1",
            "docker://docker.io/library/busybox@sha256:d",
        ),
    ] {
        let l = labels(&[(CRI_IMAGE_REF, r), (CRI_MANIFEST_DIGEST, "sha256:d")]);
        assert_eq!(image_of(&l).unwrap(), want, "{r}");
    }
}

#[test]
fn a_hoist_image_hides_what_is_below_it_and_a_bare_placeholder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (sn, _) = open(dir.path());
    // An ordinary base layer, then a hoist image over it (an index pairing an ordinary
    // manifest that shares that base with a hoist one).
    sn.prepare("u", "", labels(&[])).unwrap();
    sn.commit("base", "u", labels(&[])).unwrap();
    let e = sn
        .prepare("x", "base", hoist_labels("meta", "sha256:img"))
        .unwrap_err();
    assert!(matches!(e, Error::AlreadyExists(_)), "{e}");
    let m = sn.prepare("ctr", "sha256:img", labels(&[])).unwrap();
    let lower: Vec<&String> = m[0]
        .options
        .iter()
        .filter(|o| o.starts_with("lowerdir="))
        .collect();
    assert_eq!(lower.len(), 1);
    assert!(
        lower[0].ends_with("/image"),
        "the base leaked under the image: {m:?}"
    );
    // A placeholder shared by a chain with no hoist image: refused, with the layer named.
    let e = sn
        .prepare("y", "", hoist_labels("blob", "sha256:shared"))
        .unwrap_err();
    assert!(matches!(e, Error::AlreadyExists(_)), "{e}");
    let e = sn
        .prepare("plain", "sha256:shared", labels(&[]))
        .unwrap_err();
    assert!(
        matches!(&e, Error::FailedPrecondition(m) if m.contains("sha256:shared")),
        "{e}"
    );
    assert!(
        sn.stat("plain").is_err(),
        "the refused snapshot was recorded"
    );
}
