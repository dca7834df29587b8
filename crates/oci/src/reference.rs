//! Image references on the command line.

use crate::{Digest, OciError};
use std::fmt;
use std::path::PathBuf;

/// Where an image is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// `oci:DIR[:TAG]`: an OCI image layout directory and a tag in its index.
    Layout {
        /// The layout directory.
        dir: PathBuf,
        /// The tag (`org.opencontainers.image.ref.name`); `None` picks the only image.
        tag: Option<String>,
    },
    /// `docker://[HOST[:PORT]/]REPO[:TAG][@DIGEST]`: an image in a registry.
    Registry {
        /// `HOST[:PORT]` as the registry is addressed (`docker.io` when not given).
        registry: String,
        /// Repository path, e.g. `library/debian`.
        repository: String,
        /// Tag; `latest` when neither tag nor digest is given.
        tag: Option<String>,
        /// Manifest digest; when given it is what is fetched, and the fetched bytes must
        /// hash to it.
        digest: Option<Digest>,
    },
}

/// The registry a reference without a host names, as Docker does.
pub const DEFAULT_REGISTRY: &str = "docker.io";

fn valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !tag.starts_with(['.', '-'])
}

/// A repository path component: lowercase alphanumerics separated by `.`, `_`, `__` or
/// runs of `-` (the distribution grammar, slightly relaxed).
fn valid_component(c: &str) -> bool {
    !c.is_empty()
        && c.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && c.starts_with(|ch: char| ch.is_ascii_alphanumeric())
        && c.ends_with(|ch: char| ch.is_ascii_alphanumeric())
}

fn parse_registry(s: &str, rest: &str) -> Result<ImageRef, OciError> {
    let bad = |why: &str| OciError::BadReference {
        reference: s.to_string(),
        why: why.to_string(),
    };
    let (name, digest) = match rest.split_once('@') {
        Some((name, d)) => (
            name,
            Some(Digest::parse(d).map_err(|e| bad(&e.to_string()))?),
        ),
        None => (rest, None),
    };
    let (name, tag) = match name.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => (n, Some(t)),
        _ => (name, None),
    };
    if let Some(t) = tag {
        if !valid_tag(t) {
            return Err(bad(
                "a tag is 1-128 of [A-Za-z0-9._-], not starting with . or -",
            ));
        }
    }
    let (registry, repository) = match name.split_once('/') {
        Some((host, repo)) if host.contains('.') || host.contains(':') || host == "localhost" => {
            (host.to_string(), repo.to_string())
        }
        _ => (DEFAULT_REGISTRY.to_string(), name.to_string()),
    };
    if registry.is_empty() || registry.contains(['@', '?', '#']) {
        return Err(bad("invalid registry host"));
    }
    let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') {
        format!("library/{repository}")
    } else {
        repository
    };
    if repository.len() > 255 || !repository.split('/').all(valid_component) {
        return Err(bad(
            "a repository is lowercase [a-z0-9] components separated by / (and . _ - inside)",
        ));
    }
    let tag = match (tag, &digest) {
        (Some(t), _) => Some(t.to_string()),
        (None, Some(_)) => None,
        (None, None) => Some("latest".to_string()),
    };
    Ok(ImageRef::Registry {
        registry,
        repository,
        tag,
        digest,
    })
}

impl ImageRef {
    /// Parses `oci:DIR[:TAG]` or `docker://[HOST[:PORT]/]REPO[:TAG][@sha256:HEX]`.
    pub fn parse(s: &str) -> Result<Self, OciError> {
        let bad = |why: &str| OciError::BadReference {
            reference: s.to_string(),
            why: why.to_string(),
        };
        if let Some(rest) = s.strip_prefix("docker://") {
            return parse_registry(s, rest);
        }
        let Some(rest) = s.strip_prefix("oci:") else {
            return Err(bad("unknown transport"));
        };
        let (dir, tag) = match rest.rsplit_once(':') {
            Some((dir, tag)) if !tag.contains('/') => (dir, Some(tag)),
            _ => (rest, None),
        };
        if dir.is_empty() {
            return Err(bad("empty directory"));
        }
        if let Some(tag) = tag {
            if !valid_tag(tag) {
                return Err(bad(
                    "a tag is 1-128 of [A-Za-z0-9._-], not starting with . or -",
                ));
            }
        }
        Ok(ImageRef::Layout {
            dir: PathBuf::from(dir),
            tag: tag.map(str::to_string),
        })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageRef::Layout { dir, tag: Some(t) } => write!(f, "oci:{}:{t}", dir.display()),
            ImageRef::Layout { dir, tag: None } => write!(f, "oci:{}", dir.display()),
            ImageRef::Registry {
                registry,
                repository,
                tag,
                digest,
            } => {
                write!(f, "docker://{registry}/{repository}")?;
                if let Some(t) = tag {
                    write!(f, ":{t}")?;
                }
                if let Some(d) = digest {
                    write!(f, "@{d}")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_layout_references() {
        assert_eq!(
            ImageRef::parse("oci:/tmp/x:v1").unwrap(),
            ImageRef::Layout {
                dir: "/tmp/x".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            ImageRef::parse("oci:rel/dir").unwrap(),
            ImageRef::Layout {
                dir: "rel/dir".into(),
                tag: None
            }
        );
        for bad in [
            "docker://127.0.0.1:5000/Foo:v1",
            "docker://127.0.0.1:5000/foo:-v1",
            "docker://127.0.0.1:5000/foo@sha256:12",
            "docker://127.0.0.1:5000/",
            "docker://127.0.0.1:5000/a//b",
            "docker-archive:x",
            "oci:",
            "oci::",
            "oci:/x:bad tag",
            "/tmp/x",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_registry_references() {
        let d = "sha256:".to_string() + &"ab".repeat(32);
        let cases = [
            (
                "docker://127.0.0.1:5000/foo/bar:v1",
                "127.0.0.1:5000",
                "foo/bar",
                Some("v1"),
            ),
            ("docker://localhost/foo", "localhost", "foo", Some("latest")),
            (
                "docker://debian:bookworm",
                "docker.io",
                "library/debian",
                Some("bookworm"),
            ),
            ("docker://quay.io/a/b/c", "quay.io", "a/b/c", Some("latest")),
        ];
        for (s, registry, repository, tag) in cases {
            let r = ImageRef::parse(s).unwrap();
            assert_eq!(
                r,
                ImageRef::Registry {
                    registry: registry.into(),
                    repository: repository.into(),
                    tag: tag.map(str::to_string),
                    digest: None,
                },
                "{s}"
            );
        }
        let with_digest = format!("docker://h.io:1/x@{d}");
        match ImageRef::parse(&with_digest).unwrap() {
            ImageRef::Registry { tag, digest, .. } => {
                assert_eq!(tag, None);
                assert_eq!(digest.unwrap().as_str(), d);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            ImageRef::parse(&with_digest).unwrap().to_string(),
            with_digest
        );
    }
}
