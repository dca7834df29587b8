//! A recording mount's answer: the chunks and files read since the mount, in order, as
//! a start-up trace.

use crate::api::DaemonError;
use crate::served::Served;
use hoist_reader::trace::{FileIndex, Trace, TraceChunk, TRACE_VERSION};
use std::collections::HashSet;

impl Served {
    /// What the workload read since the mount, as a start-up trace (a mount with
    /// `record`).
    pub fn trace(&self) -> Result<Trace, DaemonError> {
        if !self.spec.record {
            return Err(DaemonError::InvalidArgument(format!(
                "{} was not mounted to record a trace (mount it with record, as `hoist record` does)",
                self.spec.mountpoint.display()
            )));
        }
        // Before the file index, whose walk of the tree reads the rest of the metadata.
        let meta_chunks = self.image.recorded_meta();
        let index = FileIndex::build(&self.image)
            .map_err(|e| DaemonError::Internal(format!("indexing the image's files: {e}")))?;
        let mut files = Vec::new();
        let mut seen_files = HashSet::new();
        let chunks = self
            .fetcher
            .recorded()
            .into_iter()
            .filter_map(|(blob, i)| {
                let e = self.fetcher.entry(blob, i).ok()?;
                let owner = index.owner.get(&(blob, i));
                if let Some((path, _)) = owner {
                    if seen_files.insert(path.clone()) {
                        files.push(path.clone());
                    }
                }
                Some(TraceChunk {
                    blob,
                    index: i,
                    digest: hex::encode(e.digest),
                    offset: e.compressed_offset,
                    size: u64::from(e.compressed_size),
                    file: owner.map(|(p, _)| p.clone()),
                    file_offset: owner.map_or(0, |(_, o)| *o),
                })
            })
            .collect();
        Ok(Trace {
            version: TRACE_VERSION,
            image: self.spec.image.clone(),
            manifest: self.image.manifest_digest.to_string(),
            chunk_size: 1 << self.image.meta.chunk_bits,
            meta_bytes: self.meta_layer_bytes(),
            chunks,
            meta_digest: match meta_chunks.is_empty() {
                true => String::new(),
                false => self.image.meta_digest.to_string(),
            },
            meta_chunks,
            files,
        })
    }
}
