//! Ranged blob reads against a real registry, the primitive the lazy mount is built on.

use hoist_oci::{Digest, ImageRef, ImageSource};
use hoist_registry::{open_remote, RegistryConfig};
use hoist_testkit::{fixtures, require, Auth, Fault, FaultProxy, Need, Registry};

#[test]
fn ranged_reads_return_exact_bytes_and_refuse_whole_blob_answers() {
    require(
        "ranged reads",
        &[Need::tool("docker-registry"), Need::tool("skopeo")],
    );
    let layout = fixtures();
    let reg = Registry::start(&Auth::None);
    reg.push_with_skopeo(&layout, "tiny-v1", "src/tiny", None);
    let proxy = FaultProxy::start(&reg.addr);
    let cfg = RegistryConfig {
        plain_http: true,
        retries: 2,
        ..RegistryConfig::default()
    };
    let r = ImageRef::parse(&format!("docker://{}/src/tiny:tiny-v1", proxy.addr)).unwrap();
    let img = open_remote(&r, "pull", &cfg).unwrap();
    let (manifest, _) = img.manifest().unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let layer = &manifest["layers"][1];
    let digest = Digest::parse(layer["digest"].as_str().unwrap()).unwrap();
    let size = layer["size"].as_u64().unwrap();
    let local = std::fs::read(layout.join("blobs/sha256").join(digest.hex())).unwrap();
    assert_eq!(local.len() as u64, size);

    for (off, len) in [
        (0, 1),
        (0, size),
        (size - 1, 1),
        (12345, 65536),
        (size / 2, size / 2),
    ] {
        let got = img.read_blob_range(&digest, off, len).unwrap();
        assert_eq!(
            got,
            &local[off as usize..(off + len) as usize],
            "range {off}+{len}"
        );
    }
    assert!(img.read_blob_range(&digest, 0, 0).unwrap().is_empty());
    // A range past the end is an error naming the blob, not short data.
    let err = img
        .read_blob_range(&digest, size - 10, 20)
        .unwrap_err()
        .to_string();
    assert!(err.contains(digest.as_str()), "{err}");

    // A truncated range is asked again.
    proxy.on("GET", "/blobs/", 1, Fault::Truncate { after: 100 });
    let got = img.read_blob_range(&digest, 1000, 50_000).unwrap();
    assert_eq!(got, &local[1000..51_000]);

    // Streamed, a range that breaks off resumes where it broke: the same bytes, and
    // one more request.
    let retries = |img: &hoist_registry::RemoteImage| {
        img.client()
            .counters
            .retries
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = retries(&img);
    proxy.on("GET", "/blobs/", 1, Fault::Truncate { after: 100 });
    let mut got = Vec::new();
    std::io::Read::read_to_end(
        &mut img.open_blob_range(&digest, 2000, 40_000).unwrap(),
        &mut got,
    )
    .unwrap();
    assert_eq!(got, &local[2000..42_000]);
    assert_eq!(retries(&img), before + 1);

    // A registry that ignores Range answers 200: an error, never a silent full download.
    proxy.on("GET", "/blobs/", 1, Fault::DropRange);
    let err = img
        .read_blob_range(&digest, 1000, 100)
        .unwrap_err()
        .to_string();
    assert!(err.contains("ignored the Range header"), "{err}");

    // Streaming the whole blob verifies it; a corrupted byte fails at the end.
    proxy.on("GET", "/blobs/", 1, Fault::Corrupt { at: 5000 });
    let mut out = Vec::new();
    let res = std::io::Read::read_to_end(&mut img.open_blob(&digest, size).unwrap(), &mut out);
    assert!(res.is_err(), "a corrupted blob was accepted");
    let c = img.client();
    assert!(
        c.counters
            .requests
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 9
    );
}
