//! The OCI distribution protocol for hoist: images in registries as
//! [`ImageSource`](hoist_oci::ImageSource) and [`ImageSink`](hoist_oci::ImageSink).
//!
//! What it does, on top of `reqwest` (HTTP/1.1 and HTTP/2, rustls with the system's
//! root certificates):
//! - resolves tags, pulls OCI and Docker v2 manifests and indexes (the host's platform
//!   is picked), streams blobs verified against their digest, and reads byte ranges of
//!   blobs (`Range` requests; a registry answering 200 instead of 206 is an error, never a
//!   silent whole-blob download);
//! - pushes blobs (one `PUT` when small and missing, else a chunked `PATCH` upload;
//!   existing blobs are skipped; blobs of another repository on the same registry are
//!   mounted) and manifests;
//! - authenticates as `docker` does (anonymous, Basic, Bearer tokens from the
//!   `WWW-Authenticate` challenge; credentials from `--creds` or the auth files) and renews
//!   tokens that expire in the middle of an operation;
//! - retries connection errors, timeouts, 429 and 5xx with backoff, bounded in count and
//!   time, and resumes a broken blob stream from where it stopped.
//!
//! Why not `oci-client`: it is async-only, has no per-read stall timeout, no retries, does
//! not resume broken streams and does not re-authenticate when a token expires in the
//! middle of an operation; the lazy mount's fetchers need all of those, synchronously
//! from worker threads. The protocol part written here is small (`client.rs`, `remote.rs`).

pub mod auth;
pub mod client;
pub mod hosts;
pub mod remote;

pub use auth::Credentials;
pub use client::Client;
pub use remote::RemoteImage;

use hoist_oci::layout::LayoutImage;
use hoist_oci::{ImageRef, ImageSink, ImageSource, OciError};
use std::sync::Arc;
use std::time::Duration;

/// How to reach registries.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Talk plain HTTP instead of HTTPS (for registries on loopback or a lab network).
    pub plain_http: bool,
    /// Credentials for every registry of the command; when `None` they are looked up in
    /// the auth files per registry.
    pub creds: Option<Credentials>,
    /// Bound on establishing a connection.
    pub connect_timeout: Duration,
    /// Bound on waiting for a response or for the next bytes of a body.
    pub stall_timeout: Duration,
    /// Resends after a transient failure, per request.
    pub retries: u32,
    /// Bound on the time spent retrying one request.
    pub retry_budget: Duration,
    /// First backoff; it doubles per retry.
    pub backoff: Duration,
    /// Bytes per `PATCH` of a chunked upload.
    pub upload_chunk: usize,
    /// containerd's host files (`HOST[:PORT]/hosts.toml`: mirrors, CAs, client
    /// certificates), as in containerd's `config_path`; `None` reads none.
    pub hosts_dir: Option<std::path::PathBuf>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            plain_http: false,
            creds: None,
            connect_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(30),
            retries: 5,
            retry_budget: Duration::from_secs(60),
            backoff: Duration::from_millis(200),
            upload_chunk: 16 << 20,
            hosts_dir: None,
        }
    }
}

/// Errors talking to a registry. Each names the operation and the repository.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry answered with an error status.
    #[error("{what}: {detail}")]
    Status {
        /// Operation and repository.
        what: String,
        /// HTTP status.
        status: u16,
        /// Status and the registry's error codes.
        detail: String,
    },
    /// Authentication failed.
    #[error("401 for {what}: {why}")]
    Unauthorized {
        /// Operation and repository.
        what: String,
        /// Why, and what to do.
        why: String,
    },
    /// The connection failed, timed out or was reset, after all retries; or the
    /// registry's TLS certificate is not trusted.
    #[error("{what}: {}", transport_message(cause, *attempts))]
    Transport {
        /// Operation and repository.
        what: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure (its causes are in the message).
        cause: reqwest::Error,
    },
    /// Reading a response body failed.
    #[error("{what}: {source}")]
    Body {
        /// Operation and repository.
        what: String,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// A blob stream stalled (no bytes within the stall timeout) until the retry budget
    /// was spent.
    #[error(
        "blob {digest} of {repository}: the registry sent no data for {:.1} s (at byte {at} \
         of {size}, after {resumes} resumes). Check \
         the registry (and any proxy in front of it); for a slow registry raise the timeout \
         (--timeout, and --read-timeout for a mount)",
        stalled.as_secs_f64()
    )]
    Stalled {
        /// The blob.
        digest: String,
        /// `HOST/REPO`.
        repository: String,
        /// How long no byte arrived.
        stalled: std::time::Duration,
        /// Bytes received.
        at: u64,
        /// The blob's size.
        size: u64,
        /// Resumes tried.
        resumes: u32,
    },
    /// The registry broke the protocol (missing headers, wrong ranges, wrong digests).
    #[error("{what}: {why}")]
    Protocol {
        /// Operation and repository.
        what: String,
        /// What was wrong.
        why: String,
    },
    /// The client could not be set up.
    #[error("{0}")]
    Config(String),
}

/// The message of a transport error: for a certificate hoist does not trust, what it
/// was and how to trust it; otherwise the error and its causes, and the attempts made.
fn transport_message(e: &reqwest::Error, attempts: u32) -> String {
    let detail = client::describe_transport(e);
    if client::is_tls(e) {
        let host = e
            .url()
            .and_then(|u| {
                u.host_str()
                    .map(|h| u.port().map_or(h.to_string(), |p| format!("{h}:{p}")))
            })
            .unwrap_or_else(|| "HOST".into());
        format!(
            "the registry's TLS certificate is not trusted ({detail}). Trust its CA: write `ca = \"/path/to/ca.pem\"` in /etc/containerd/certs.d/{host}/hosts.toml (containerd reads the same file; `--hosts-dir` names another directory), or add the CA to the system's store (update-ca-certificates); use --plain-http for a registry without TLS"
        )
    } else {
        format!("{detail} (after {attempts} attempts)")
    }
}

/// Opens an image reference (`oci:` or `docker://`) for reading.
pub fn open_source(r: &ImageRef, cfg: &RegistryConfig) -> Result<Box<dyn ImageSource>, OciError> {
    Ok(match r {
        ImageRef::Layout { dir, tag } => Box::new(LayoutImage::open(dir, tag.clone())?),
        ImageRef::Registry { .. } => Box::new(open_remote(r, "pull", cfg)?),
    })
}

/// Opens an image reference for writing (an image layout is created if missing).
pub fn open_sink(r: &ImageRef, cfg: &RegistryConfig) -> Result<Box<dyn ImageSink>, OciError> {
    Ok(match r {
        ImageRef::Layout { dir, tag } => {
            let tag = tag.clone().ok_or_else(|| OciError::BadReference {
                reference: r.to_string(),
                why: "a destination needs a tag".into(),
            })?;
            Box::new(LayoutImage::create(dir, tag)?)
        }
        ImageRef::Registry { tag: None, .. } => {
            return Err(OciError::BadReference {
                reference: r.to_string(),
                why: "a destination needs a tag".into(),
            })
        }
        ImageRef::Registry { .. } => Box::new(open_remote(r, "pull,push", cfg)?),
    })
}

/// A registry image; `actions` is the token scope (`pull` or `pull,push`).
pub fn open_remote(
    r: &ImageRef,
    actions: &str,
    cfg: &RegistryConfig,
) -> Result<RemoteImage, OciError> {
    let ImageRef::Registry {
        registry,
        repository,
        tag,
        digest,
    } = r
    else {
        return Err(OciError::BadReference {
            reference: r.to_string(),
            why: "not a registry reference".into(),
        });
    };
    let client = Client::new(registry, repository, actions, cfg)?;
    Ok(RemoteImage::new(
        Arc::new(client),
        tag.clone(),
        digest.clone(),
    ))
}
