//! OCI image layouts (`oci:DIR:TAG`), as `skopeo` and `umoci` read and write them.
//!
//! Blobs are written to a temporary file in `blobs/sha256/` and renamed to their digest
//! when complete; `index.json` is replaced atomically. A crash leaves at most a stray
//! temporary file, never a truncated blob under a digest name or a tag pointing at a
//! missing manifest.

use crate::digest::{Digest, VerifyingReader};
use crate::media;
use crate::{BlobWriter, ImageSink, ImageSource, OciError, MAX_MANIFEST_SIZE};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// One image (one tag) of an OCI image layout.
#[derive(Debug, Clone)]
pub struct LayoutImage {
    dir: PathBuf,
    tag: Option<String>,
}

impl LayoutImage {
    /// Opens an existing layout.
    pub fn open(dir: &Path, tag: Option<String>) -> Result<Self, OciError> {
        let marker = dir.join("oci-layout");
        if !marker.is_file() {
            return Err(OciError::NotFound(format!(
                "{} is not an OCI image layout (no oci-layout file)",
                dir.display()
            )));
        }
        Ok(LayoutImage {
            dir: dir.to_path_buf(),
            tag,
        })
    }

    /// Opens a layout for writing, creating it if it does not exist.
    pub fn create(dir: &Path, tag: String) -> Result<Self, OciError> {
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).map_err(|e| OciError::io(blobs.display(), e))?;
        remove_stale_temp_files(&blobs);
        remove_stale_temp_files(dir);
        let marker = dir.join("oci-layout");
        if !marker.exists() {
            write_atomic(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        let index = dir.join("index.json");
        if !index.exists() {
            write_atomic(&index, br#"{"schemaVersion":2,"manifests":[]}"#)?;
        }
        Ok(LayoutImage {
            dir: dir.to_path_buf(),
            tag: Some(tag),
        })
    }

    /// `oci:DIR[:TAG]`.
    pub fn name(&self) -> String {
        match &self.tag {
            Some(t) => format!("oci:{}:{t}", self.dir.display()),
            None => format!("oci:{}", self.dir.display()),
        }
    }

    /// Path of a blob in the layout.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(digest.hex())
    }

    fn read_json(&self, path: &Path) -> Result<Value, OciError> {
        let bytes = read_bounded(path, MAX_MANIFEST_SIZE)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| OciError::Invalid(format!("{}: not valid JSON: {e}", path.display())))
    }

    /// The index entry the tag names.
    fn index_entry(&self) -> Result<Value, OciError> {
        let path = self.dir.join("index.json");
        let index = self.read_json(&path)?;
        let manifests = index["manifests"]
            .as_array()
            .ok_or_else(|| OciError::Invalid(format!("{}: no manifests array", path.display())))?;
        let found: Vec<&Value> = match &self.tag {
            Some(tag) => manifests
                .iter()
                .filter(|m| m["annotations"][media::ANNOTATION_REF_NAME].as_str() == Some(tag))
                .collect(),
            None => manifests.iter().collect(),
        };
        match (found.as_slice(), &self.tag) {
            ([one], _) => Ok((*one).clone()),
            ([], Some(tag)) => Err(OciError::NotFound(format!(
                "no image tagged {tag:?} in {} (tags: {})",
                self.dir.display(),
                tags(manifests).join(", ")
            ))),
            (_, Some(tag)) => Err(OciError::Invalid(format!(
                "tag {tag:?} appears twice in {}",
                path.display()
            ))),
            (_, None) => Err(OciError::NotFound(format!(
                "{} holds {} images; name one with oci:DIR:TAG (tags: {})",
                self.dir.display(),
                found.len(),
                tags(manifests).join(", ")
            ))),
        }
    }
}

fn tags(manifests: &[Value]) -> Vec<String> {
    manifests
        .iter()
        .filter_map(|m| {
            m["annotations"][media::ANNOTATION_REF_NAME]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, OciError> {
    let f = File::open(path).map_err(|e| OciError::io(path.display(), e))?;
    let mut out = Vec::new();
    f.take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| OciError::io(path.display(), e))?;
    if out.len() as u64 > limit {
        return Err(OciError::Invalid(format!(
            "{} is larger than {limit} bytes",
            path.display()
        )));
    }
    Ok(out)
}

/// The prefix of this process's temporary files: `.tmp-PID-`, so that a later writer
/// can tell the files of a process that was killed (which nothing else will remove)
/// from those of a writer still at work.
fn temp_prefix() -> String {
    format!(".tmp-{}-", std::process::id())
}

/// How long a temporary file must have been left alone before it counts as abandoned.
const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

/// Removes the temporary files under `dir` of processes that no longer exist.
fn remove_stale_temp_files(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(".tmp-"))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        // A pid this namespace cannot see may be a writer in another one sharing the
        // directory: only files untouched for an hour go.
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_AFTER);
        if old && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_file(e.path());
        }
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), OciError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(&temp_prefix())
        .tempfile_in(dir)
        .map_err(|e| OciError::io(dir.display(), e))?;
    tmp.write_all(bytes)
        .map_err(|e| OciError::io(path.display(), e))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| OciError::io(path.display(), e))?;
    tmp.persist(path)
        .map_err(|e| OciError::io(path.display(), e.error))?;
    Ok(())
}

impl ImageSource for LayoutImage {
    fn describe(&self) -> String {
        self.name()
    }

    fn top(&self) -> Result<(Vec<u8>, Digest, String), OciError> {
        let entry = self.index_entry()?;
        let (digest, size, media_type) = crate::descriptor(&entry, &self.name())?;
        let bytes = self.read_blob(&digest, size, MAX_MANIFEST_SIZE)?;
        let media_type = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|d| d["mediaType"].as_str().map(String::from))
            .unwrap_or(media_type);
        Ok((bytes, digest, media_type))
    }

    fn manifest(&self) -> Result<(Vec<u8>, Digest), OciError> {
        let mut entry = self.index_entry()?;
        // Follow image indexes to the manifest of this host's platform.
        for _ in 0..4 {
            let (digest, size, media_type) = crate::descriptor(&entry, &self.name())?;
            let bytes = self.read_blob(&digest, size, MAX_MANIFEST_SIZE)?;
            let doc: Value = serde_json::from_slice(&bytes).map_err(|e| {
                OciError::Invalid(format!("manifest {digest}: not valid JSON: {e}"))
            })?;
            if !crate::is_index(&doc, &media_type) {
                return Ok((bytes, digest));
            }
            entry = crate::select_platform(&doc, &digest)?;
        }
        Err(OciError::Invalid(format!(
            "{}: image indexes nested too deep",
            self.name()
        )))
    }

    fn open_blob(&self, digest: &Digest, size: u64) -> Result<Box<dyn Read + Send>, OciError> {
        let path = self.blob_path(digest);
        let f = File::open(&path).map_err(|e| {
            OciError::io(
                format!("blob {digest} of {} ({})", self.name(), path.display()),
                e,
            )
        })?;
        Ok(Box::new(VerifyingReader::new(
            io::BufReader::with_capacity(1 << 20, f),
            digest.clone(),
            size,
        )))
    }

    fn read_blob_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Vec<u8>, OciError> {
        let path = self.blob_path(digest);
        let f = File::open(&path).map_err(|e| OciError::io(path.display(), e))?;
        let mut buf = vec![
            0u8;
            usize::try_from(len)
                .map_err(|_| OciError::Invalid("range too large".into()))?
        ];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, offset).map_err(|e| {
            OciError::io(
                format!(
                    "blob {digest} bytes {offset}..{}",
                    offset.saturating_add(len)
                ),
                e,
            )
        })?;
        Ok(buf)
    }
}

struct LayoutBlobWriter {
    blobs: PathBuf,
    out: BufWriter<tempfile::NamedTempFile>,
    hasher: Sha256,
    size: u64,
}

impl Write for LayoutBlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

impl BlobWriter for LayoutBlobWriter {
    fn commit(self: Box<Self>) -> Result<(Digest, u64), OciError> {
        let this = *self;
        let digest = Digest::from_sha256(this.hasher.finalize().into());
        let tmp = this
            .out
            .into_inner()
            .map_err(|e| OciError::io(this.blobs.display(), e.into_error()))?;
        let dest = this.blobs.join(digest.hex());
        tmp.as_file()
            .sync_all()
            .map_err(|e| OciError::io(dest.display(), e))?;
        tmp.persist(&dest)
            .map_err(|e| OciError::io(dest.display(), e.error))?;
        Ok((digest, this.size))
    }
}

impl ImageSink for LayoutImage {
    fn describe(&self) -> String {
        self.name()
    }

    fn blob_writer(&self) -> Result<Box<dyn BlobWriter>, OciError> {
        let blobs = self.dir.join("blobs/sha256");
        let tmp = tempfile::Builder::new()
            .prefix(&temp_prefix())
            .tempfile_in(&blobs)
            .map_err(|e| OciError::io(blobs.display(), e))?;
        Ok(Box::new(LayoutBlobWriter {
            blobs,
            out: BufWriter::with_capacity(1 << 20, tmp),
            hasher: Sha256::new(),
            size: 0,
        }))
    }

    fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    fn put_manifest_untagged(&self, bytes: &[u8], _media_type: &str) -> Result<Digest, OciError> {
        let mut w = self.blob_writer()?;
        w.write_all(bytes)
            .map_err(|e| OciError::io(self.dir.display(), e))?;
        Ok(w.commit()?.0)
    }

    fn put_manifest(&self, bytes: &[u8], media_type: &str) -> Result<Digest, OciError> {
        let digest = self.put_manifest_untagged(bytes, media_type)?;
        let size = bytes.len() as u64;
        let tag = self.tag.clone().unwrap_or_default();
        let path = self.dir.join("index.json");
        let mut index = self.read_json(&path)?;
        let manifests = index["manifests"]
            .as_array_mut()
            .ok_or_else(|| OciError::Invalid(format!("{}: no manifests array", path.display())))?;
        manifests.retain(|m| m["annotations"][media::ANNOTATION_REF_NAME].as_str() != Some(&tag));
        manifests.push(json!({
            "mediaType": media_type,
            "digest": digest.as_str(),
            "size": size,
            "annotations": { media::ANNOTATION_REF_NAME: tag },
        }));
        let bytes = serde_json::to_vec(&index).map_err(|e| OciError::Invalid(e.to_string()))?;
        write_atomic(&path, &bytes)?;
        Ok(digest)
    }
}
