//! `docker://` images against a real registry (Debian's docker-registry, distribution 2.8)
//! started on a free loopback port: anonymous, htpasswd basic auth and token auth, with a
//! fault-injecting proxy in between. Results are compared with `umoci unpack` of the
//! original image.

mod common;

use common::*;
use hoist_testkit::{Auth, Fault, FaultProxy, Registry, TokenServer};
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Fixtures, a registry binary, skopeo and umoci.
fn setup() -> PathBuf {
    require(
        "registry tests",
        &[
            Need::tool("docker-registry"),
            Need::tool("skopeo"),
            Need::tool("umoci"),
        ],
    );
    fixtures()
}

fn home(name: &str) -> String {
    scratch().join(name).display().to_string()
}

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn unpack_and_compare(
    layout: &std::path::Path,
    tag: &str,
    image: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) {
    let dir = scratch().join(format!("unpack-{}", image.replace(['/', ':'], "_")));
    let dir_s = dir.display().to_string();
    let mut args = vec!["--plain-http", "unpack", image, &dir_s];
    args.extend_from_slice(extra);
    hoist_env_ok(&args, env);
    assert_same_tree(layout, tag, &dir, &format!("unpack of {image}"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn registry_to_registry_conversion_is_incremental_and_exact() {
    let layout = setup();
    let reg = Registry::start(&Auth::None);
    // All hoist traffic goes through a pass-through proxy that counts bytes.
    let proxy = FaultProxy::start(&reg.addr);
    let tags = ["tiny-v1", "debian-python-v1", "debian-python-v2"];
    for tag in tags {
        reg.push_with_skopeo(&layout, tag, "src/app", None);
    }
    let h = home("home-incremental");
    let env = [("HOIST_HOME", h.as_str())];
    let p = &proxy.addr;
    let convert = |tag: &str, dst_repo: &str, extra: &[&str]| -> Value {
        let src = format!("docker://{p}/src/app:{tag}");
        let dst = format!("docker://{p}/{dst_repo}:{tag}");
        let mut args = vec!["--plain-http", "convert", "--json", &src, &dst];
        args.extend_from_slice(extra);
        json(&hoist_env_ok(&args, &env))
    };

    let v1 = convert("debian-python-v1", "hoist/app", &[]);
    assert_eq!(v1["reused_layers"], 0);
    let v2 = convert("debian-python-v2", "hoist/app", &[]);
    // v2 shares its base layer with v1: only the layers above it are converted.
    assert!(v2["reused_layers"].as_u64().unwrap() >= 1, "{v2}");
    assert!(v2["bytes_in"].as_u64() < v1["bytes_in"].as_u64());
    assert_eq!(v2["layers"][0]["reused"], true);
    // Incremental output is byte-for-byte what a full conversion gives.
    let full = convert("debian-python-v2", "hoist/full", &["--no-cache"]);
    assert_eq!(full["reused_layers"], 0);
    assert_eq!(
        v2["manifest"], full["manifest"],
        "incremental and full conversions differ"
    );

    // Converting v1 into another repository of the same registry reuses everything and
    // mounts the blobs instead of uploading them.
    let up_before = proxy.bytes_up();
    let again = convert("debian-python-v1", "other/app", &[]);
    assert_eq!(again["reused_layers"], 3);
    assert_eq!(again["manifest"], v1["manifest"]);
    let uploaded = proxy.bytes_up() - up_before;
    assert!(
        uploaded < 4 << 20,
        "{uploaded} bytes uploaded: blobs were not mounted"
    );

    convert("tiny-v1", "hoist/app", &[]);
    for (tag, repo) in [
        ("tiny-v1", "hoist/app"),
        ("debian-python-v1", "hoist/app"),
        ("debian-python-v2", "hoist/app"),
        ("debian-python-v1", "other/app"),
    ] {
        let image = format!("docker://{p}/{repo}:{tag}");
        hoist_env_ok(&["--plain-http", "check", &image], &env);
        unpack_and_compare(&layout, tag, &image, &[], &env);
    }
    // A digest reference works too.
    let by_digest = format!(
        "docker://{p}/hoist/app@{}",
        v1["manifest"].as_str().unwrap()
    );
    hoist_env_ok(&["--plain-http", "inspect", &by_digest], &env);
}

#[test]
fn basic_auth_credentials_from_flags_and_auth_files() {
    let layout = setup();
    let reg = Registry::start(&Auth::Basic {
        user: "alice".into(),
        password: "wonderland".into(),
    });
    reg.push_with_skopeo(&layout, "tiny-v1", "src/tiny", Some("alice:wonderland"));
    let a = &reg.addr;
    let h = home("home-basic");
    let env = [("HOIST_HOME", h.as_str())];
    let src = format!("docker://{a}/src/tiny:tiny-v1");
    let dst = format!("docker://{a}/hoist/tiny:tiny-v1");

    let err = hoist_err(&["--plain-http", "convert", &src, &dst], &env);
    assert!(
        err.contains("401") && err.contains("no credentials found for this registry"),
        "{err}"
    );
    assert!(
        err.contains(&format!("{a}/src/tiny")),
        "the error names the repository: {err}"
    );
    let err = hoist_err(
        &[
            "--plain-http",
            "--creds",
            "alice:nope",
            "convert",
            &src,
            &dst,
        ],
        &env,
    );
    assert!(
        err.contains("refused the credentials of \"alice\""),
        "{err}"
    );

    hoist_env_ok(
        &[
            "--plain-http",
            "--creds",
            "alice:wonderland",
            "convert",
            &src,
            &dst,
        ],
        &env,
    );
    // Credentials from an auth file as `skopeo login` / `docker login` write it.
    let auth_file = scratch().join("auth.json");
    let b64 = "YWxpY2U6d29uZGVybGFuZA=="; // alice:wonderland
    std::fs::write(
        &auth_file,
        format!(r#"{{"auths":{{"{a}":{{"auth":"{b64}"}}}}}}"#),
    )
    .unwrap();
    let af = auth_file.display().to_string();
    let env2 = [
        ("HOIST_HOME", h.as_str()),
        ("REGISTRY_AUTH_FILE", af.as_str()),
    ];
    unpack_and_compare(&layout, "tiny-v1", &dst, &[], &env2);

    // Unknown tag and unknown repository: clear errors.
    let err = hoist_err(
        &[
            "--plain-http",
            "check",
            &format!("docker://{a}/hoist/tiny:nope"),
        ],
        &env2,
    );
    assert!(
        err.contains("MANIFEST_UNKNOWN") && err.contains("hoist/tiny"),
        "{err}"
    );
    let err = hoist_err(
        &["--plain-http", "check", &format!("docker://{a}/no/such:v1")],
        &env2,
    );
    assert!(
        err.contains("NAME_UNKNOWN") || err.contains("MANIFEST_UNKNOWN"),
        "{err}"
    );
}

#[test]
fn token_auth_renews_tokens_that_expire_during_a_conversion() {
    let layout = setup();
    // Tokens are announced as lasting 300 s; during the conversion they are accepted for
    // only 1-2 s, so the client learns that one expired from the registry's 401. (skopeo
    // does not renew tokens: the push runs with long-lived ones.)
    let tokens = TokenServer::start("bob", "builder", Duration::from_secs(300), 300);
    let reg = Registry::start(&Auth::Token {
        realm: tokens.realm.clone(),
        service: hoist_testkit::token::SERVICE.into(),
        issuer: hoist_testkit::token::ISSUER.into(),
        cert: tokens.cert.clone(),
    });
    reg.push_with_skopeo(&layout, "debian-python-v1", "src/app", Some("bob:builder"));
    tokens.set_lifetime(Duration::from_secs(1));
    let proxy = FaultProxy::start(&reg.addr);
    let p = &proxy.addr;
    let h = home("home-token");
    let env = [("HOIST_HOME", h.as_str())];
    let src = format!("docker://{p}/src/app:debian-python-v1");
    let dst = format!("docker://{p}/hoist/app:debian-python-v1");

    let err = hoist_err(&["--plain-http", "check", &src], &env);
    assert!(err.contains("no credentials found"), "{err}");

    // Layers arrive over a 15 MB/s link, so the conversion (77 MB in) outlives tokens.
    proxy.on(
        "GET",
        "/blobs/",
        u64::MAX,
        Fault::Throttle {
            bytes_per_sec: 15_000_000,
        },
    );
    let issued = tokens.issued.load(std::sync::atomic::Ordering::Relaxed);
    let rejected = proxy.rejected_tokens();
    hoist_env_ok(
        &[
            "--plain-http",
            "--creds",
            "bob:builder",
            "convert",
            &src,
            &dst,
        ],
        &env,
    );
    assert!(
        proxy.rejected_tokens() > rejected,
        "no token expired during the conversion ({} requests); the test proves nothing",
        proxy.requests()
    );
    let renewed = tokens.issued.load(std::sync::atomic::Ordering::Relaxed) - issued;
    assert!(
        renewed >= 3,
        "expired tokens were not renewed: {renewed} issued"
    );
    unpack_and_compare(
        &layout,
        "debian-python-v1",
        &dst,
        &["--creds", "bob:builder"],
        &env,
    );

    // A request that reaches the registry after its fresh token expired (held on the
    // way, as a loaded client or link may): renewed again, not taken for refused
    // credentials. The first two reads of the manifest are held past a token's life.
    proxy.clear();
    proxy.on("GET", "/manifests/", 2, Fault::Hold { ms: 2500 });
    let rejected = proxy.rejected_tokens();
    let out = hoist_env_ok(
        &["--plain-http", "--creds", "bob:builder", "inspect", &dst],
        &env,
    );
    assert!(out.contains("hoist"), "{out}");
    assert!(
        proxy.rejected_tokens() > rejected,
        "no token expired on the way; the test proves nothing"
    );
    // Refused credentials still fail at once, after one renewal.
    let err = hoist_err(
        &["--plain-http", "--creds", "bob:wrong", "inspect", &dst],
        &env,
    );
    assert!(err.contains("refused the credentials"), "{err}");
}

#[test]
fn faults_are_retried_bounded_and_never_accepted() {
    let layout = setup();
    let mut reg = Registry::start(&Auth::None);
    reg.push_with_skopeo(&layout, "tiny-v1", "src/tiny", None);
    let proxy = FaultProxy::start(&reg.addr);
    let p = &proxy.addr;
    let h = home("home-faults");
    let env = [("HOIST_HOME", h.as_str())];
    let src = format!("docker://{p}/src/tiny:tiny-v1");
    let dst = format!("docker://{p}/hoist/tiny:tiny-v1");
    hoist_env_ok(&["--plain-http", "convert", "--no-cache", &src, &dst], &env);

    // Connection resets, 5xx and truncated bodies are retried (truncated ones resumed).
    for (fault, count) in [
        (Fault::Reset, 2),
        (Fault::Status(503), 3),
        (Fault::Truncate { after: 1000 }, 2),
    ] {
        proxy.clear();
        let before = proxy.faults();
        proxy.on("GET", "/blobs/", count, fault.clone());
        hoist_env_ok(&["--plain-http", "check", &dst], &env);
        assert_eq!(proxy.faults() - before, count, "{fault:?} was not hit");
    }
    proxy.clear();
    proxy.on("GET", "/manifests/", 2, Fault::Status(502));
    hoist_env_ok(&["--plain-http", "inspect", &dst], &env);

    // A body that stalls fails within the configured bound: 2 s per attempt, 2 attempts,
    // plus backoff.
    proxy.clear();
    proxy.on("GET", "/blobs/", u64::MAX, Fault::Stall { after: 1000 });
    let started = Instant::now();
    let err = hoist_err(
        &[
            "--plain-http",
            "--timeout",
            "2",
            "--retries",
            "1",
            "check",
            &dst,
        ],
        &env,
    );
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "a stalled body took {took:?} to fail"
    );
    assert!(
        err.contains("blob sha256:"),
        "the error names the blob: {err}"
    );

    // Corrupted bytes are rejected by digest, in a hoist image and in a source layer;
    // a failed conversion tags nothing.
    proxy.clear();
    proxy.on("GET", "/blobs/", u64::MAX, Fault::Corrupt { at: 100 });
    let err = hoist_err(&["--plain-http", "check", &dst], &env);
    assert!(
        err.contains("does not match") || err.contains("digest"),
        "{err}"
    );
    let bad_dst = format!("docker://{p}/hoist/never:tiny-v1");
    let err = hoist_err(
        &["--plain-http", "convert", "--no-cache", &src, &bad_dst],
        &env,
    );
    assert!(
        err.contains("does not match") || err.contains("digest"),
        "{err}"
    );
    proxy.clear();
    let err = hoist_err(&["--plain-http", "inspect", &bad_dst], &env);
    assert!(
        err.contains("MANIFEST_UNKNOWN") || err.contains("NAME_UNKNOWN"),
        "{err}"
    );

    // A manifest over the size limit is refused.
    proxy.on(
        "GET",
        "/manifests/",
        1,
        Fault::Respond {
            status: 200,
            headers: vec!["Content-Type: application/vnd.oci.image.manifest.v1+json".into()],
            body: vec![b' '; 5 << 20],
        },
    );
    let err = hoist_err(&["--plain-http", "inspect", &dst], &env);
    assert!(err.contains("more than the 4194304"), "{err}");

    // A registry that goes away: bounded failure, clear error.
    proxy.clear();
    reg.stop();
    let started = Instant::now();
    let err = hoist_err(&["--plain-http", "--retries", "2", "check", &dst], &env);
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(err.contains(&format!("{p}/hoist/tiny")), "{err}");
}

#[test]
fn redirects_do_not_leak_credentials() {
    let layout = setup();
    let reg = Registry::start(&Auth::Basic {
        user: "carol".into(),
        password: "secret".into(),
    });
    reg.push_with_skopeo(&layout, "tiny-v1", "src/tiny", Some("carol:secret"));
    // "Blob storage": a proxy on another host name that authenticates to the registry
    // itself, the way a presigned URL would, and counts Authorization headers it receives.
    let storage = FaultProxy::start(&reg.addr);
    storage.inject_auth(Some("Basic Y2Fyb2w6c2VjcmV0".into())); // carol:secret
    let port = storage.addr.rsplit_once(':').unwrap().1.to_string();
    let front = FaultProxy::start(&reg.addr);
    front.on(
        "GET",
        "/blobs/",
        u64::MAX,
        Fault::Redirect {
            base: format!("http://localhost:{port}"),
        },
    );
    let h = home("home-redirect");
    let env = [("HOIST_HOME", h.as_str())];
    let src = format!("docker://{}/src/tiny:tiny-v1", front.addr);
    let dst = format!("docker://{}/hoist/tiny:tiny-v1", front.addr);
    hoist_env_ok(
        &[
            "--plain-http",
            "--creds",
            "carol:secret",
            "convert",
            &src,
            &dst,
        ],
        &env,
    );
    assert!(storage.requests() > 0, "no blob read was redirected");
    assert_eq!(
        storage.authorized(),
        0,
        "the registry's Authorization reached another host"
    );
    unpack_and_compare(&layout, "tiny-v1", &dst, &["--creds", "carol:secret"], &env);
}

/// Issue 19: a 401 with a 1 MiB `WWW-Authenticate` header was retried 6 times. An
/// oversized or malformed challenge is a permanent error: one request, a clear error.
#[test]
fn an_oversized_or_malformed_auth_challenge_fails_at_once() {
    setup();
    let reg = Registry::start(&Auth::None);
    let proxy = FaultProxy::start(&reg.addr);
    let h = home("home-challenge");
    let env = [("HOIST_HOME", h.as_str())];
    let image = format!("docker://{}/src/tiny:latest", proxy.addr);
    let realm = format!("http://{}/token", proxy.addr);
    for (what, header, expect) in [
        (
            "1 MiB, beyond what the HTTP client parses",
            format!(
                "WWW-Authenticate: Bearer realm=\"{realm}\",service=\"{}\"",
                "a".repeat(1 << 20)
            ),
            "response cannot be parsed",
        ),
        (
            "64 KiB",
            format!(
                "WWW-Authenticate: Bearer realm=\"{realm}\",service=\"{}\"",
                "a".repeat(64 << 10)
            ),
            "challenge is 65",
        ),
        (
            "without a realm",
            "WWW-Authenticate: Bearer service=\"registry\"".to_string(),
            "without a Basic or Bearer challenge",
        ),
    ] {
        proxy.clear();
        proxy.on(
            "GET",
            "/v2/",
            u64::MAX,
            Fault::Respond {
                status: 401,
                headers: vec![header],
                body: Vec::new(),
            },
        );
        let before = proxy.requests();
        let started = Instant::now();
        let err = hoist_err(&["--plain-http", "inspect", &image], &env);
        let took = started.elapsed();
        assert_eq!(proxy.requests() - before, 1, "{what}: resent: {err}");
        assert!(took < Duration::from_secs(10), "{what}: took {took:?}");
        assert!(err.contains(expect), "{what}: {err}");
        assert!(
            err.contains(&format!("{}/src/tiny", proxy.addr)),
            "{what}: {err}"
        );
    }
}
