//! An image in a registry as an [`ImageSource`] and [`ImageSink`].

use crate::client::{Client, Idempotent};
use crate::RegistryError;
use hoist_oci::{BlobWriter, Digest, ImageSink, ImageSource, OciError, VerifyingReader};
use reqwest::blocking::Response;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE};
use reqwest::StatusCode;
use sha2::{Digest as _, Sha256};
use std::io::{self, Read, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// Media types accepted for manifests, in order of preference.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

/// One image (a tag or a digest) in a registry repository.
#[derive(Debug, Clone)]
pub struct RemoteImage {
    client: Arc<Client>,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl RemoteImage {
    /// The image `tag` or `digest` of the repository `client` talks to.
    pub fn new(client: Arc<Client>, tag: Option<String>, digest: Option<Digest>) -> Self {
        RemoteImage {
            client,
            tag,
            digest,
        }
    }

    /// The client, for its counters.
    pub fn client(&self) -> &Arc<Client> {
        &self.client
    }

    fn reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".into(),
        }
    }

    /// Fetches one manifest or index by tag or digest; bytes and their digest.
    fn fetch_manifest(&self, reference: &str) -> Result<(Vec<u8>, Digest, String), RegistryError> {
        let what = format!("manifest {reference}");
        let resp = self.client.send(&what, Idempotent::Yes, |h| {
            h.get(self.client.url(&format!("manifests/{reference}")))
                .header("Accept", MANIFEST_ACCEPT)
        })?;
        if !resp.status().is_success() {
            return Err(status_error(&self.client, &what, resp));
        }
        let media_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let bytes = read_limited(resp, hoist_oci::MAX_MANIFEST_SIZE, &what)?;
        let digest = Digest::of(&bytes);
        if reference.starts_with("sha256:") && digest.as_str() != reference {
            return Err(RegistryError::Protocol {
                what: format!("{what} of {}", self.client.name()),
                why: format!("the registry sent bytes that hash to {digest}"),
            });
        }
        Ok((bytes, digest, media_type))
    }

    fn get_blob(
        &self,
        digest: &Digest,
        range: Option<(u64, u64)>,
    ) -> Result<Response, RegistryError> {
        let what = match range {
            Some((start, end)) => format!("blob {digest} bytes {start}..{end}"),
            None => format!("blob {digest}"),
        };
        let url = self.client.url(&format!("blobs/{digest}"));
        let resp = self.client.send(&what, Idempotent::Yes, |h| {
            let req = h.get(&url);
            match range {
                Some((start, end)) => req.header(RANGE, format!("bytes={start}-{}", end - 1)),
                None => req,
            }
        })?;
        let status = resp.status();
        if range.is_some() && status == StatusCode::OK {
            return Err(RegistryError::Protocol {
                what: format!("{what} of {}", self.client.name()),
                why: "the registry ignored the Range header and answered 200 with the whole blob \
                      (ranged reads are required for lazy loading)"
                    .into(),
            });
        }
        if !status.is_success() {
            return Err(status_error(&self.client, &what, resp));
        }
        if let Some((start, end)) = range {
            check_content_range(&resp, start, end).map_err(|why| RegistryError::Protocol {
                what: format!("{what} of {}", self.client.name()),
                why,
            })?;
        }
        Ok(resp)
    }

    fn start_upload(&self, mount: Option<(&Digest, &str)>) -> Result<Upload, RegistryError> {
        let url = self.client.url("blobs/uploads/");
        let what = "starting a blob upload";
        let resp = self.client.send(what, Idempotent::No, |h| {
            let req = h.post(&url).header(CONTENT_LENGTH, "0");
            match mount {
                Some((d, from)) => req.query(&[("mount", d.as_str()), ("from", from)]),
                None => req,
            }
        })?;
        match resp.status() {
            StatusCode::CREATED if mount.is_some() => Ok(Upload::Mounted),
            StatusCode::ACCEPTED => Ok(Upload::Session(location(&self.client, &resp)?)),
            _ => Err(status_error(&self.client, what, resp)),
        }
    }

    /// Best effort: one `DELETE` with a short timeout (the registry expires abandoned
    /// uploads by itself).
    fn cancel_upload(&self, location: &reqwest::Url) {
        self.client.send_once(|h| h.delete(location.clone()));
    }
}

enum Upload {
    Mounted,
    Session(reqwest::Url),
}

fn location(client: &Client, resp: &Response) -> Result<reqwest::Url, RegistryError> {
    let loc = resp
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| RegistryError::Protocol {
            what: client.name(),
            why: format!("{} without a Location header", resp.status()),
        })?;
    client.resolve(loc)
}

/// Checks `Content-Range: bytes START-END/TOTAL` against the range asked for.
fn check_content_range(resp: &Response, start: u64, end: u64) -> Result<(), String> {
    let header = resp
        .headers()
        .get(CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .ok_or("206 without a Content-Range header")?;
    let parsed = header
        .strip_prefix("bytes ")
        .and_then(|r| r.split_once('/'))
        .and_then(|(range, _)| range.split_once('-'))
        .and_then(|(a, b)| Some((a.trim().parse::<u64>().ok()?, b.trim().parse::<u64>().ok()?)));
    match parsed {
        Some((a, b)) if a == start && b.checked_add(1) == Some(end) => Ok(()),
        Some((a, b)) if a == start && b < end => Err(format!(
            "the registry returned bytes {a}-{b}: the blob is shorter than its chunk table says"
        )),
        _ => Err(format!(
            "asked for bytes {start}-{}, got Content-Range {header:?}",
            end - 1
        )),
    }
}

/// Reads a whole response body of at most `limit` bytes.
pub(crate) fn read_limited(
    resp: Response,
    limit: u64,
    what: &str,
) -> Result<Vec<u8>, RegistryError> {
    if resp.content_length().is_some_and(|n| n > limit) {
        return Err(RegistryError::Protocol {
            what: what.to_string(),
            why: format!(
                "{} bytes, more than the {limit} allowed",
                resp.content_length().unwrap_or_default()
            ),
        });
    }
    let mut out = Vec::new();
    resp.take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| RegistryError::Body {
            what: what.to_string(),
            source: e,
        })?;
    if out.len() as u64 > limit {
        return Err(RegistryError::Protocol {
            what: what.to_string(),
            why: format!("more than the {limit} bytes allowed"),
        });
    }
    Ok(out)
}

/// The registry's error text from a failed response: `CODE message` of its JSON errors.
pub(crate) fn error_detail(resp: Response) -> String {
    let status = resp.status();
    let body = read_limited(resp, 64 << 10, "error body").unwrap_or_default();
    let parsed: Option<Vec<String>> = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            v["errors"].as_array().map(|es| {
                es.iter()
                    .map(|e| {
                        format!(
                            "{} {}",
                            e["code"].as_str().unwrap_or("?"),
                            e["message"].as_str().unwrap_or("")
                        )
                    })
                    .collect()
            })
        });
    match parsed {
        Some(es) if !es.is_empty() => format!("{status}: {}", es.join("; ")),
        _ => status.to_string(),
    }
}

fn status_error(client: &Client, what: &str, resp: Response) -> RegistryError {
    let status = resp.status().as_u16();
    RegistryError::Status {
        what: format!("{what} of {}", client.name()),
        status,
        detail: error_detail(resp),
    }
}

impl From<RegistryError> for OciError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Status { status: 404, .. } => OciError::NotFound(e.to_string()),
            other => OciError::Remote(Box::new(other)),
        }
    }
}

impl ImageSource for RemoteImage {
    fn describe(&self) -> String {
        format!("docker://{}:{}", self.client.name(), self.reference())
            .replace(":sha256:", "@sha256:")
    }

    fn registry_repository(&self) -> Option<(String, String)> {
        Some((self.client.registry.clone(), self.client.repository.clone()))
    }

    fn top(&self) -> Result<(Vec<u8>, Digest, String), OciError> {
        let (bytes, digest, media_type) = self.fetch_manifest(&self.reference())?;
        Ok((bytes, digest, media_type))
    }

    fn manifest_at(&self, digest: &Digest, size: u64) -> Result<Vec<u8>, OciError> {
        let (bytes, got, _) = self.fetch_manifest(digest.as_str())?;
        if &got != digest || bytes.len() as u64 != size {
            return Err(OciError::DigestMismatch {
                digest: digest.to_string(),
                why: format!(
                    "{} answered {} bytes hashing to {got}",
                    ImageSource::describe(self),
                    bytes.len()
                ),
            });
        }
        Ok(bytes)
    }

    fn manifest(&self) -> Result<(Vec<u8>, Digest), OciError> {
        let mut reference = self.reference();
        for _ in 0..4 {
            let (bytes, digest, media_type) = self.fetch_manifest(&reference)?;
            let doc: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
                OciError::Invalid(format!(
                    "manifest {digest} of {}: not valid JSON: {e}",
                    ImageSource::describe(self)
                ))
            })?;
            if !hoist_oci::is_index(&doc, &media_type) {
                return Ok((bytes, digest));
            }
            let entry = hoist_oci::select_platform(&doc, &digest)?;
            let (d, _, _) = hoist_oci::descriptor(&entry, &format!("index {digest}"))?;
            reference = d.to_string();
        }
        Err(OciError::Invalid(format!(
            "{}: image indexes nested too deep",
            ImageSource::describe(self)
        )))
    }

    fn read_blob(&self, digest: &Digest, size: u64, limit: u64) -> Result<Vec<u8>, OciError> {
        if size > limit {
            return Err(OciError::Invalid(format!(
                "blob {digest} is {size} bytes, more than the {limit} allowed"
            )));
        }
        let mut out = Vec::with_capacity(size as usize);
        self.open_blob(digest, size)?
            .read_to_end(&mut out)
            .map_err(|e| {
                // A stall names the blob and the registry itself.
                if e.get_ref().is_some_and(|i| i.is::<RegistryError>()) {
                    let inner = e.into_inner().expect("get_ref found an inner error");
                    return OciError::Remote(inner);
                }
                OciError::io(format!("blob {digest}"), e)
            })?;
        Ok(out)
    }

    fn open_blob(&self, digest: &Digest, size: u64) -> Result<Box<dyn Read + Send>, OciError> {
        let resp = self.get_blob(digest, None)?;
        let stream = BlobStream {
            image: self.clone(),
            digest: digest.clone(),
            end: size,
            resp: Some(resp),
            pos: 0,
            resumes: 0,
            progress: Instant::now(),
        };
        Ok(Box::new(VerifyingReader::new(stream, digest.clone(), size)))
    }

    fn read_blob_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Vec<u8>, OciError> {
        let what = || {
            format!(
                "blob {digest} bytes {offset}..{} of {}",
                offset + len,
                self.client.name()
            )
        };
        let mut buf = Vec::with_capacity(len.min(64 << 20) as usize);
        self.open_blob_range(digest, offset, len)?
            .read_to_end(&mut buf)
            .map_err(|source| RegistryError::Body {
                what: what(),
                source,
            })?;
        if buf.len() as u64 != len {
            return Err(RegistryError::Protocol {
                what: what(),
                why: format!("response ended after {} bytes", buf.len()),
            }
            .into());
        }
        Ok(buf)
    }

    /// One ranged request whose body resumes from where it broke off (as a whole
    /// blob's does), within the retry bounds.
    fn open_blob_range(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Box<dyn Read + Send>, OciError> {
        if len == 0 {
            return Ok(Box::new(io::empty()));
        }
        let end = offset
            .checked_add(len)
            .ok_or_else(|| OciError::Invalid(format!("range of blob {digest} overflows")))?;
        let resp = self.get_blob(digest, Some((offset, end)))?;
        let stream = BlobStream {
            image: self.clone(),
            digest: digest.clone(),
            end,
            resp: Some(resp),
            pos: offset,
            resumes: 0,
            progress: Instant::now(),
        };
        Ok(Box::new(stream.take(len)))
    }
}

/// A blob body that resumes with a `Range` request from where it broke off when the
/// connection drops or stalls: at most [`RegistryConfig::retries`] times, and only while
/// the time since the last byte arrived, plus the backoff, is within
/// [`RegistryConfig::retry_budget`], so a registry that stalls for good is given up on
/// within the budget (a mount's read timeout), not after one stall timeout per resume.
///
/// [`RegistryConfig::retries`]: crate::RegistryConfig::retries
/// [`RegistryConfig::retry_budget`]: crate::RegistryConfig::retry_budget
struct BlobStream {
    image: RemoteImage,
    digest: Digest,
    /// Where the bytes asked for end: the size the descriptor gives for a whole blob
    /// (the verifier checks it too), or the end of a range.
    end: u64,
    resp: Option<Response>,
    pos: u64,
    resumes: u32,
    /// When the last bytes arrived (or the stream opened).
    progress: Instant,
}

/// Whether a body read failed because no bytes came within the stall timeout.
fn is_stall(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::TimedOut
        || e.get_ref()
            .and_then(|inner| inner.downcast_ref::<reqwest::Error>())
            .is_some_and(reqwest::Error::is_timeout)
}

impl Read for BlobStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let err = match self.resp.as_mut() {
                Some(r) => match r.read(buf) {
                    Ok(n) => {
                        self.pos += n as u64;
                        self.progress = Instant::now();
                        self.image
                            .client
                            .counters
                            .bytes_in
                            .fetch_add(n as u64, Ordering::Relaxed);
                        return Ok(n);
                    }
                    // All bytes arrived and only the end of the response broke: done.
                    Err(_) if self.pos >= self.end => return Ok(0),
                    Err(e) => e,
                },
                None => io::Error::other("no response"),
            };
            let client = &self.image.client;
            let idle = self.progress.elapsed();
            let out_of_budget = idle + client.backoff(self.resumes) > client.cfg.retry_budget;
            if self.resumes >= client.cfg.retries || out_of_budget {
                if is_stall(&err) {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        RegistryError::Stalled {
                            digest: self.digest.to_string(),
                            repository: client.name(),
                            stalled: idle,
                            at: self.pos,
                            size: self.end,
                            resumes: self.resumes,
                        },
                    ));
                }
                return Err(io::Error::new(
                    err.kind(),
                    format!(
                        "blob {} of {} at byte {} after {} resumes: {err}",
                        self.digest,
                        client.name(),
                        self.pos,
                        self.resumes
                    ),
                ));
            }
            tracing::debug!(
                "blob {} broke off at {}: {err}; resuming",
                self.digest,
                self.pos
            );
            std::thread::sleep(client.backoff(self.resumes));
            self.resumes += 1;
            client.counters.retries.fetch_add(1, Ordering::Relaxed);
            self.resp = None;
            let url = client.url(&format!("blobs/{}", self.digest));
            let (pos, end) = (self.pos, self.end);
            if pos >= end {
                return Ok(0);
            }
            let resp = client
                .send("resuming a blob", Idempotent::Yes, |h| {
                    h.get(&url)
                        .header(RANGE, format!("bytes={pos}-{}", end - 1))
                })
                .map_err(io::Error::other)?;
            let starts_at_pos = resp
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("bytes "))
                .and_then(|v| v.split_once('-'))
                .is_some_and(|(a, _)| a.trim().parse::<u64>().ok() == Some(pos));
            if resp.status() != StatusCode::PARTIAL_CONTENT || !starts_at_pos {
                return Err(io::Error::other(format!(
                    "blob {} of {}: resuming at byte {pos} got {} instead of 206",
                    self.digest,
                    client.name(),
                    resp.status()
                )));
            }
            self.resp = Some(resp);
        }
    }
}

impl ImageSink for RemoteImage {
    fn describe(&self) -> String {
        ImageSource::describe(self)
    }

    fn blob_writer(&self) -> Result<Box<dyn BlobWriter>, OciError> {
        let chunk = self.client.cfg.upload_chunk.max(64 << 10);
        Ok(Box::new(UploadWriter {
            image: self.clone(),
            buf: Vec::with_capacity(chunk.min(1 << 20)),
            chunk,
            session: None,
            offset: 0,
            hasher: Sha256::new(),
            done: false,
        }))
    }

    fn has_blob(&self, digest: &Digest) -> bool {
        let url = self.client.url(&format!("blobs/{digest}"));
        match self
            .client
            .send(&format!("checking blob {digest}"), Idempotent::Yes, |h| {
                h.head(&url)
            }) {
            Ok(resp) => resp.status().is_success(),
            Err(e) => {
                tracing::debug!("HEAD blob {digest}: {e}");
                false
            }
        }
    }

    fn copy_blob_from(
        &self,
        source: &dyn ImageSource,
        digest: &Digest,
        size: u64,
    ) -> Result<(), OciError> {
        if self.has_blob(digest) {
            return Ok(());
        }
        if let Some((registry, repo)) = source.registry_repository() {
            if registry == self.client.registry && repo != self.client.repository {
                self.client.add_scope(format!("repository:{repo}:pull"));
                match self.start_upload(Some((digest, &repo))) {
                    Ok(Upload::Mounted) => return Ok(()),
                    // The registry declined the mount and opened an upload instead.
                    Ok(Upload::Session(url)) => self.cancel_upload(&url),
                    // Not allowed to read `repo`, say: copy the bytes instead.
                    Err(e) => tracing::info!("mounting {digest} from {repo} failed: {e}"),
                }
            }
        }
        hoist_oci::copy_blob(self, source, digest, size)
    }

    fn put_manifest_untagged(&self, bytes: &[u8], media_type: &str) -> Result<Digest, OciError> {
        self.push_manifest(bytes, media_type, None)
    }

    fn put_manifest(&self, bytes: &[u8], media_type: &str) -> Result<Digest, OciError> {
        self.push_manifest(bytes, media_type, self.tag.clone())
    }
}

impl RemoteImage {
    /// PUTs a manifest under `tag`, or under its digest.
    fn push_manifest(
        &self,
        bytes: &[u8],
        media_type: &str,
        tag: Option<String>,
    ) -> Result<Digest, OciError> {
        let digest = Digest::of(bytes);
        let reference = tag.unwrap_or_else(|| digest.to_string());
        let url = self.client.url(&format!("manifests/{reference}"));
        let what = format!("pushing manifest {digest} as {reference}");
        let resp = self.client.send(&what, Idempotent::Yes, |h| {
            h.put(&url)
                .header(CONTENT_TYPE, media_type)
                .body(bytes.to_vec())
        })?;
        if !resp.status().is_success() {
            return Err(status_error(&self.client, &what, resp).into());
        }
        self.client
            .counters
            .bytes_out
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(digest)
    }
}

/// Uploads a blob as it is written: `POST` opens a session, each full chunk is sent with
/// `PATCH`, and `PUT ?digest=` closes it. A blob smaller than a chunk is checked with
/// `HEAD` first and sent in one `PUT` when missing. Dropping the writer before
/// [`BlobWriter::commit`] cancels the session, so no half-written blob appears.
struct UploadWriter {
    image: RemoteImage,
    buf: Vec<u8>,
    chunk: usize,
    session: Option<reqwest::Url>,
    offset: u64,
    hasher: Sha256,
    done: bool,
}

impl UploadWriter {
    fn client(&self) -> &Client {
        &self.image.client
    }

    fn send_chunk(&mut self) -> Result<(), RegistryError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let url = match &self.session {
            Some(u) => u.clone(),
            None => match self.image.start_upload(None)? {
                Upload::Session(u) => u,
                Upload::Mounted => unreachable!("no mount was asked"),
            },
        };
        // Recorded first, so that Drop cancels the session if this chunk fails.
        self.session = Some(url.clone());
        let (start, end) = (self.offset, self.offset + self.buf.len() as u64 - 1);
        let what = format!("uploading bytes {start}-{end}");
        let body = std::mem::take(&mut self.buf);
        let timeout = self.client().upload_timeout(body.len());
        let resp = self.client().send(&what, Idempotent::Yes, |h| {
            h.patch(url.clone())
                .timeout(timeout)
                .header(CONTENT_TYPE, "application/octet-stream")
                .header(CONTENT_RANGE, format!("{start}-{end}"))
                .body(body.clone())
        })?;
        let next = match resp.status() {
            StatusCode::ACCEPTED | StatusCode::NO_CONTENT => location(self.client(), &resp)?,
            // A resent PATCH whose first copy arrived: ask where the upload stands.
            StatusCode::RANGE_NOT_SATISFIABLE => self.reconcile(&url, end)?,
            _ => return Err(status_error(self.client(), &what, resp)),
        };
        self.client()
            .counters
            .bytes_out
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        self.offset = end + 1;
        self.session = Some(next);
        self.buf = body;
        self.buf.clear();
        Ok(())
    }

    /// The upload's location if the registry holds exactly bytes `0..=end`.
    fn reconcile(&self, url: &reqwest::Url, end: u64) -> Result<reqwest::Url, RegistryError> {
        let resp = self
            .client()
            .send("upload status", Idempotent::Yes, |h| h.get(url.clone()))?;
        let received = resp
            .headers()
            .get(RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|r| r.rsplit_once('-'))
            .and_then(|(_, b)| b.parse::<u64>().ok());
        if received != Some(end) {
            return Err(RegistryError::Protocol {
                what: format!("upload to {}", self.client().name()),
                why: format!("the registry holds up to byte {received:?}, expected {end}"),
            });
        }
        location(self.client(), &resp)
    }

    fn finish(&mut self) -> Result<(Digest, u64), RegistryError> {
        let digest = Digest::from_sha256(self.hasher.clone().finalize().into());
        let size = self.offset + self.buf.len() as u64;
        if self.session.is_none() && self.image.has_blob(&digest) {
            self.done = true;
            return Ok((digest, size));
        }
        let url = match self.session.take() {
            Some(u) => u,
            None => match self.image.start_upload(None)? {
                Upload::Session(u) => u,
                Upload::Mounted => unreachable!("no mount was asked"),
            },
        };
        self.session = Some(url.clone());
        let mut put = url.clone();
        put.query_pairs_mut().append_pair("digest", digest.as_str());
        let what = format!("finishing upload of blob {digest}");
        let body = std::mem::take(&mut self.buf);
        let start = self.offset;
        let timeout = self.client().upload_timeout(body.len());
        let resp = self.client().send(&what, Idempotent::Yes, |h| {
            let req = h
                .put(put.clone())
                .timeout(timeout)
                .header(CONTENT_TYPE, "application/octet-stream");
            if body.is_empty() {
                req.header(CONTENT_LENGTH, "0")
            } else {
                req.header(
                    CONTENT_RANGE,
                    format!("{start}-{}", start + body.len() as u64 - 1),
                )
                .body(body.clone())
            }
        })?;
        let status = resp.status();
        // A resent PUT whose first copy completed the upload finds the session gone.
        let landed = status.is_success()
            || (status == StatusCode::NOT_FOUND && self.image.has_blob(&digest));
        if !landed {
            return Err(status_error(self.client(), &what, resp));
        }
        if let Some(sent) = resp
            .headers()
            .get("Docker-Content-Digest")
            .and_then(|v| v.to_str().ok())
        {
            if sent != digest.as_str() {
                return Err(RegistryError::Protocol {
                    what: format!("{what} of {}", self.client().name()),
                    why: format!("the registry stored it as {sent}"),
                });
            }
        }
        self.client()
            .counters
            .bytes_out
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        self.done = true;
        Ok((digest, size))
    }
}

impl Write for UploadWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = self.chunk - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        self.hasher.update(&data[..n]);
        if self.buf.len() >= self.chunk {
            self.send_chunk().map_err(io::Error::other)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl BlobWriter for UploadWriter {
    fn commit(mut self: Box<Self>) -> Result<(Digest, u64), OciError> {
        Ok(self.finish()?)
    }
}

impl Drop for UploadWriter {
    fn drop(&mut self) {
        if !self.done {
            if let Some(url) = self.session.take() {
                self.image.cancel_upload(&url);
            }
        }
    }
}
