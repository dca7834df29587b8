//! Where and how to reach a registry, from containerd's host files: `DIR/HOST[:PORT]/
//! hosts.toml` (else `DIR/_default/hosts.toml`), where DIR is containerd's
//! `config_path`, `/etc/containerd/certs.d` on most nodes. hoist reads the files a node
//! already has, so that every hoist command and the snapshotter reach registries the
//! way containerd does: mirrors first, then the registry itself; a CA of the registry's
//! own, client certificates, `skip_verify`, plain HTTP for an `http://` host.
//!
//! ```toml
//! server = "https://registry.example"          # the registry itself (default: https://HOST)
//! ca = "/etc/certs/registry-ca.pem"           # for the server: a path or a list
//! [host."https://mirror.example:5000"]         # mirrors, tried in file order
//!   capabilities = ["pull", "resolve"]         # `push` for a host that takes pushes
//!   ca = ["/etc/certs/mirror-ca.pem"]
//!   client = [["/etc/certs/c.pem", "/etc/certs/c.key"]]
//!   skip_verify = false
//!   override_path = false                      # true: the URL's path replaces `/v2`
//! ```
//!
//! Parsed here with the `toml` crate; the semantics follow containerd's
//! `docs/hosts.md`. Headers and the `dial_timeout` key are not used.

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The largest hosts.toml read, in bytes.
const MAX_FILE: u64 = 1 << 20;

/// One place to reach a registry: a mirror, or the registry itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Scheme, host and port: `https://mirror.example:5000`.
    pub origin: String,
    /// What comes before `REPO/...` in request URLs: `ORIGIN/v2` (or the URL's path with
    /// `override_path`).
    pub api: String,
    /// Pulls (and resolving tags) may go here.
    pub pull: bool,
    /// Pushes may go here.
    pub push: bool,
    /// Whether this is the registry itself (not a mirror).
    pub server: bool,
    /// TLS settings.
    pub tls: Tls,
}

/// TLS settings of an endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tls {
    /// Extra CA certificates (PEM) to trust.
    pub ca: Vec<PathBuf>,
    /// Client certificates: (certificate, key); the key may sit in the certificate file.
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
    /// Do not verify the server's certificate.
    pub skip_verify: bool,
}

/// Why a hosts.toml could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {why}")]
pub struct HostsError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub why: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    server: Option<String>,
    #[serde(default)]
    ca: Option<OneOrMany>,
    #[serde(default)]
    client: Option<Clients>,
    #[serde(default)]
    skip_verify: Option<bool>,
    #[serde(default)]
    capabilities: Option<Vec<String>>,
    #[serde(default)]
    override_path: Option<bool>,
    #[serde(default)]
    header: Option<toml::Table>,
    #[serde(default)]
    dial_timeout: Option<String>,
    #[serde(default)]
    host: toml::Table,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Host {
    #[serde(default)]
    ca: Option<OneOrMany>,
    #[serde(default)]
    client: Option<Clients>,
    #[serde(default)]
    skip_verify: Option<bool>,
    #[serde(default)]
    capabilities: Option<Vec<String>>,
    #[serde(default)]
    override_path: Option<bool>,
    #[serde(default)]
    header: Option<toml::Table>,
    #[serde(default)]
    dial_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn paths(self) -> Vec<PathBuf> {
        match self {
            OneOrMany::One(s) => vec![s.into()],
            OneOrMany::Many(v) => v.into_iter().map(PathBuf::from).collect(),
        }
    }
}

/// containerd accepts `"cert+key.pem"`, `["cert", "key"]` and `[["cert", "key"], ...]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Clients {
    One(String),
    Pair(Vec<String>),
    Pairs(Vec<Vec<String>>),
}

impl Clients {
    fn pairs(self) -> Result<Vec<(PathBuf, Option<PathBuf>)>, String> {
        let pair = |v: Vec<String>| match v.as_slice() {
            [c] => Ok((PathBuf::from(c), None)),
            [c, k] => Ok((PathBuf::from(c), Some(PathBuf::from(k)))),
            _ => Err(format!("client: {v:?} is not [certificate, key]")),
        };
        match self {
            Clients::One(c) => Ok(vec![(c.into(), None)]),
            Clients::Pair(v) => Ok(vec![pair(v)?]),
            Clients::Pairs(v) => v.into_iter().map(pair).collect(),
        }
    }
}

/// The endpoints of `registry` (`host[:port]`), in the order to try them: the mirrors of
/// its hosts.toml under `dir`, then the registry itself. With no file (or no `dir`),
/// only the registry, over HTTPS, or HTTP with `plain_http`.
pub fn endpoints(
    dir: Option<&Path>,
    registry: &str,
    plain_http: bool,
) -> Result<Vec<Endpoint>, HostsError> {
    let default_scheme = if plain_http { "http" } else { "https" };
    let host = match registry {
        "docker.io" | "index.docker.io" => "registry-1.docker.io",
        other => other,
    };
    let default = Endpoint {
        origin: format!("{default_scheme}://{host}"),
        api: format!("{default_scheme}://{host}/v2"),
        pull: true,
        push: true,
        server: true,
        tls: Tls::default(),
    };
    let Some(dir) = dir else {
        return Ok(vec![default]);
    };
    let file = [registry, "_default"]
        .iter()
        .map(|name| dir.join(name).join("hosts.toml"))
        .find(|p| p.is_file());
    let Some(path) = file else {
        return Ok(vec![default]);
    };
    parse(&path, registry, default)
}

fn parse(path: &Path, registry: &str, default: Endpoint) -> Result<Vec<Endpoint>, HostsError> {
    let err = |why: String| HostsError {
        path: path.to_path_buf(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if meta.len() > MAX_FILE {
        return Err(err(format!("larger than {MAX_FILE} bytes")));
    }
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let file: File = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
    let _ = (&file.header, &file.dial_timeout);
    let mut out = Vec::new();
    for (url, value) in file.host {
        let host: Host = value
            .try_into()
            .map_err(|e: toml::de::Error| err(format!("[host.{url:?}]: {e}")))?;
        let _ = (&host.header, &host.dial_timeout);
        let caps = host
            .capabilities
            .unwrap_or_else(|| vec!["pull".into(), "resolve".into()]);
        let (origin, api) = split_url(&url, host.override_path.unwrap_or(false))
            .map_err(|why| err(format!("[host.{url:?}]: {why}")))?;
        out.push(Endpoint {
            server: false,
            pull: caps.iter().any(|c| c == "pull" || c == "resolve"),
            push: caps.iter().any(|c| c == "push"),
            tls: Tls {
                ca: host.ca.map(OneOrMany::paths).unwrap_or_default(),
                client: host
                    .client
                    .map(Clients::pairs)
                    .transpose()
                    .map_err(|why| err(format!("[host.{url:?}]: {why}")))?
                    .unwrap_or_default(),
                skip_verify: host.skip_verify.unwrap_or(false),
            },
            origin,
            api,
        });
    }
    let mut server = default;
    if let Some(url) = &file.server {
        let (origin, api) = split_url(url, file.override_path.unwrap_or(false))
            .map_err(|why| err(format!("server {url:?}: {why}")))?;
        (server.origin, server.api) = (origin, api);
    }
    if let Some(caps) = file.capabilities {
        server.pull = caps.iter().any(|c| c == "pull" || c == "resolve");
        server.push = caps.iter().any(|c| c == "push");
    }
    server.tls = Tls {
        ca: file.ca.map(OneOrMany::paths).unwrap_or_default(),
        client: file
            .client
            .map(Clients::pairs)
            .transpose()
            .map_err(err)?
            .unwrap_or_default(),
        skip_verify: file.skip_verify.unwrap_or(false),
    };
    out.push(server);
    tracing::debug!("{registry}: endpoints from {}: {out:?}", path.display());
    Ok(out)
}

/// `https://host:port/path` → (`https://host:port`, the API prefix).
fn split_url(url: &str, override_path: bool) -> Result<(String, String), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| "not a URL (scheme://host[:port][/path])".to_string())?;
    if scheme != "http" && scheme != "https" {
        return Err(format!("scheme {scheme:?}, not http or https"));
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    if authority.is_empty() {
        return Err("no host".into());
    }
    let origin = format!("{scheme}://{authority}");
    let api = if override_path {
        format!("{origin}{path}")
    } else {
        format!("{origin}{path}/v2")
    };
    Ok((origin, api))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, host: &str, text: &str) {
        std::fs::create_dir_all(dir.join(host)).unwrap();
        std::fs::write(dir.join(host).join("hosts.toml"), text).unwrap();
    }

    #[test]
    fn mirrors_in_file_order_then_the_server_with_their_tls_settings() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "reg.example:5000",
            r#"
server = "https://reg.example:5000"
ca = "/c/reg.pem"
[host."http://z-first.example:1"]
  capabilities = ["pull", "resolve"]
[host."https://mirror.example/base"]
  ca = ["/c/m1.pem", "/c/m2.pem"]
  client = [["/c/c.pem", "/c/c.key"]]
  skip_verify = true
[host."https://push.example"]
  capabilities = ["pull", "resolve", "push"]
  override_path = true
"#,
        );
        let e = endpoints(Some(dir.path()), "reg.example:5000", false).unwrap();
        let apis: Vec<&str> = e.iter().map(|e| e.api.as_str()).collect();
        assert_eq!(
            apis,
            [
                "http://z-first.example:1/v2",
                "https://mirror.example/base/v2",
                "https://push.example",
                "https://reg.example:5000/v2"
            ]
        );
        assert!(!e[0].push && e[0].pull && !e[0].server);
        assert_eq!(e[1].tls.ca.len(), 2);
        assert_eq!(
            e[1].tls.client,
            [("/c/c.pem".into(), Some("/c/c.key".into()))]
        );
        assert!(e[1].tls.skip_verify);
        assert!(e[2].push);
        assert!(e[3].server && e[3].push && e[3].pull);
        assert_eq!(e[3].tls.ca, [PathBuf::from("/c/reg.pem")]);
    }

    #[test]
    fn defaults_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        // No file: the registry itself.
        let e = endpoints(Some(dir.path()), "a:1", true).unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].api, "http://a:1/v2");
        assert_eq!(
            endpoints(None, "docker.io", false).unwrap()[0].origin,
            "https://registry-1.docker.io"
        );
        // _default applies to registries with no file of their own.
        write(dir.path(), "_default", "[host.\"https://m\"]\n");
        let e = endpoints(Some(dir.path()), "b:2", false).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[1].api, "https://b:2/v2");
        // Errors name the file.
        for bad in [
            "server = 1",
            "[host.\"ftp://x\"]",
            "unknown = true",
            "client = [[\"a\",\"b\",\"c\"]]",
        ] {
            write(dir.path(), "c:3", bad);
            let e = endpoints(Some(dir.path()), "c:3", false).unwrap_err();
            assert!(e.to_string().contains("c:3/hosts.toml"), "{bad}: {e}");
        }
    }
}
