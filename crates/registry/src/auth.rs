//! Credentials and `WWW-Authenticate` challenges, as `docker` and `skopeo` handle them.
//!
//! Credentials come from `--creds`, else from the first auth file that names the
//! registry: `$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json`,
//! `$DOCKER_CONFIG/config.json`, `~/.docker/config.json`. Entries are the `auths` map of
//! those files, with a base64 `auth` of `user:password` (or `username` and `password`).
//! Credential helpers (`credsStore`, `credHelpers`) are not run.

use base64::Engine as _;
use serde_json::Value;
use std::fmt;
use std::path::PathBuf;

/// A user name and password (or token) for a registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub user: String,
    /// Password or personal access token.
    pub password: String,
    /// Where they came from, for messages (`--creds`, a file path).
    pub origin: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the password.
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Parses `USER:PASSWORD` as given to `--creds`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some((user, password)) if !user.is_empty() => Ok(Credentials {
                user: user.to_string(),
                password: password.to_string(),
                origin: "--creds".into(),
            }),
            _ => Err("credentials are USER:PASSWORD".into()),
        }
    }

    /// The `Authorization: Basic` value.
    pub fn basic(&self) -> String {
        let raw = format!("{}:{}", self.user, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }

    /// Credentials for `registry` from the auth files, if any names it.
    pub fn from_auth_files(registry: &str) -> Option<Credentials> {
        auth_files()
            .into_iter()
            .find_map(|path| from_file(&path, registry))
    }
}

fn auth_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let Some(p) = std::env::var_os("REGISTRY_AUTH_FILE") {
        files.push(PathBuf::from(p));
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        files.push(PathBuf::from(dir).join("containers/auth.json"));
    }
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        files.push(PathBuf::from(dir).join("config.json"));
    } else if let Some(home) = std::env::var_os("HOME") {
        files.push(PathBuf::from(home).join(".docker/config.json"));
    }
    files
}

/// The host part of an `auths` key: keys may be `host`, `host/path` or a URL.
fn key_host(key: &str) -> &str {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    key.split('/').next().unwrap_or(key)
}

fn same_registry(key: &str, registry: &str) -> bool {
    let host = key_host(key);
    let hub = ["docker.io", "index.docker.io", "registry-1.docker.io"];
    host == registry || (hub.contains(&host) && hub.contains(&registry))
}

fn from_file(path: &PathBuf, registry: &str) -> Option<Credentials> {
    // Auth files are small; anything over 1 MiB is not one.
    let meta = std::fs::metadata(path).ok()?;
    if meta.len() > 1 << 20 {
        tracing::warn!("ignoring {}: larger than 1 MiB", path.display());
        return None;
    }
    let text = std::fs::read(path).ok()?;
    let doc: Value = match serde_json::from_slice(&text) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!("ignoring {}: not valid JSON: {e}", path.display());
            return None;
        }
    };
    let auths = doc["auths"].as_object()?;
    let (_, entry) = auths.iter().find(|(k, _)| same_registry(k, registry))?;
    let origin = path.display().to_string();
    if let Some(b64) = entry["auth"].as_str().filter(|s| !s.is_empty()) {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .ok()?;
        let raw = String::from_utf8(raw).ok()?;
        let (user, password) = raw.split_once(':')?;
        return Some(Credentials {
            user: user.to_string(),
            password: password.to_string(),
            origin,
        });
    }
    Some(Credentials {
        user: entry["username"].as_str()?.to_string(),
        password: entry["password"].as_str()?.to_string(),
        origin,
    })
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// `Basic realm="..."`.
    Basic,
    /// `Bearer realm="...",service="...",scope="..."`.
    Bearer {
        /// Token endpoint.
        realm: String,
        /// Service name to ask the token for.
        service: Option<String>,
        /// Scope the registry asked for, if it said.
        scope: Option<String>,
    },
}

impl Challenge {
    /// Parses the header value; `None` for schemes other than Basic and Bearer.
    pub fn parse(header: &str) -> Option<Challenge> {
        let header = header.trim();
        let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
        let params = parse_params(rest);
        let get = |k: &str| {
            params
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(k))
                .map(|(_, v)| v.clone())
        };
        if scheme.eq_ignore_ascii_case("basic") {
            Some(Challenge::Basic)
        } else if scheme.eq_ignore_ascii_case("bearer") {
            Some(Challenge::Bearer {
                realm: get("realm")?,
                service: get("service"),
                scope: get("scope"),
            })
        } else {
            None
        }
    }
}

/// `key=value` or `key="quoted \" value"` pairs separated by commas.
fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            return out;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'=') {
            chars.next();
            while chars.peek().is_some_and(|c| c.is_whitespace()) {
                chars.next();
            }
            if chars.peek() == Some(&'"') {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => value.extend(chars.next()),
                        '"' => break,
                        c => value.push(c),
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ',' {
                        break;
                    }
                    value.push(c);
                    chars.next();
                }
            }
        }
        out.push((key.trim().to_string(), value.trim().to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_challenges() {
        assert_eq!(
            Challenge::parse(
                r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
            })
        );
        assert_eq!(
            Challenge::parse(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            Challenge::parse(r#"bearer realm=http://x/t , service = "s\"q""#),
            Some(Challenge::Bearer {
                realm: "http://x/t".into(),
                service: Some("s\"q".into()),
                scope: None,
            })
        );
        assert_eq!(Challenge::parse("Bearer service=x"), None);
        assert_eq!(Challenge::parse("Negotiate abc"), None);
        assert_eq!(Challenge::parse(""), None);
    }

    #[test]
    fn reads_auth_files() {
        let dir = std::env::temp_dir().join(format!("hoist-auth-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("auth.json");
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice:s3:cret");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths":{{"https://127.0.0.1:5000/v1/":{{"auth":"{b64}"}},
                "index.docker.io":{{"username":"bob","password":"pw"}}}}}}"#
            ),
        )
        .unwrap();
        let c = from_file(&path, "127.0.0.1:5000").unwrap();
        assert_eq!((c.user.as_str(), c.password.as_str()), ("alice", "s3:cret"));
        let c = from_file(&path, "docker.io").unwrap();
        assert_eq!((c.user.as_str(), c.password.as_str()), ("bob", "pw"));
        assert!(from_file(&path, "127.0.0.1:5001").is_none());
        assert!(!format!("{c:?}").contains("pw"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
