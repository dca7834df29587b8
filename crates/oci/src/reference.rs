//! Image references on the command line.

use crate::OciError;
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
}

impl ImageRef {
    /// Parses `oci:DIR[:TAG]`.
    pub fn parse(s: &str) -> Result<Self, OciError> {
        let bad = |why: &str| OciError::BadReference {
            reference: s.to_string(),
            why: why.to_string(),
        };
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
            let valid = !tag.is_empty()
                && tag.len() <= 128
                && tag
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !valid {
                return Err(bad("a tag is 1-128 of [A-Za-z0-9._-]"));
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
            "docker-archive:x",
            "oci:",
            "oci::",
            "oci:/x:bad tag",
            "/tmp/x",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad}");
        }
    }
}
