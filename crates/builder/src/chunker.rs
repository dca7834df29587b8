//! Deduplicates chunks and writes new ones into data blobs through a compression pipeline.
//!
//! The tar reader thread hashes each chunk and decides, in stream order, whether it is a
//! hole (all zeros), a duplicate (its digest is already stored in this image, a lower
//! layer or the chunk dictionary) or new. A new chunk gets its place in the blob's
//! uncompressed address space right away, so placement is deterministic; only the
//! compression runs on worker threads, and a writer thread puts the results back in order.
//! At most a few chunks are in flight, which bounds memory.

use crate::{BuildError, ChunkSink};
use crossbeam_channel::{bounded, Receiver, Sender};
use hoist_codec::{digest, Encoder};
use hoist_format::chunk::{BlobTrailer, ChunkEntry, ChunkTable, Compressor};
use hoist_format::erofs::ondisk::BLOCK_SIZE;
use hoist_format::meta::BlobInfo;
use hoist_format::tree::ChunkRef;
use hoist_oci::{BlobWriter, Digest};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::thread::JoinHandle;

/// Where a stored chunk lives: provisional blob index and block address.
#[derive(Debug, Clone, Copy)]
struct Loc {
    blob: u16,
    blkaddr: u32,
}

/// Dedup counters.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ChunkStats {
    /// Chunks referenced by files.
    pub chunks: u64,
    /// Chunks stored anew.
    pub stored_chunks: u64,
    /// Uncompressed bytes stored anew.
    pub stored_bytes: u64,
    /// Chunks found already stored (same layer, lower layer or dictionary).
    pub dedup_chunks: u64,
    /// Uncompressed bytes not stored again thanks to dedup.
    pub dedup_bytes: u64,
    /// Of those, bytes found in the chunk dictionary.
    pub dict_bytes: u64,
    /// All-zero bytes kept as holes.
    pub hole_bytes: u64,
}

struct Job {
    seq: u64,
    uoffset: u64,
    digest: [u8; 32],
    data: Vec<u8>,
}

struct Encoded {
    seq: u64,
    uoffset: u64,
    usize: u32,
    digest: [u8; 32],
    compressor: Compressor,
    stored: Vec<u8>,
}

/// What the writer thread hands back: the open blob, its table, its chunk area size.
type Written = (Box<dyn BlobWriter>, ChunkTable, u64);

/// A blob being filled.
struct Pipeline {
    blob: u16,
    tx: Option<Sender<Job>>,
    workers: Vec<JoinHandle<Result<(), BuildError>>>,
    writer: JoinHandle<Result<Written, BuildError>>,
    seq: u64,
    next_uoffset: u64,
}

/// A finished data blob.
#[derive(Debug, Clone)]
pub struct FinishedBlob {
    /// The blob as the metadata blob records it.
    pub info: BlobInfo,
    /// Its OCI digest.
    pub digest: Digest,
}

/// The dedup map and the blob currently being written.
pub struct Chunker {
    compressor: Compressor,
    workers: usize,
    dedup: HashMap<[u8; 32], Loc>,
    dict_blobs: u16,
    current: Option<Pipeline>,
    /// Counters since the last [`Chunker::take_stats`].
    pub stats: ChunkStats,
}

impl Chunker {
    /// A chunker with `workers` compression threads.
    pub fn new(compressor: Compressor, workers: usize) -> Self {
        Chunker {
            compressor,
            workers: workers.max(1),
            dedup: HashMap::new(),
            dict_blobs: 0,
            current: None,
            stats: ChunkStats::default(),
        }
    }

    /// Registers the chunks of a dictionary blob; returns its provisional index.
    pub fn add_dict_blob(&mut self, blob: &BlobInfo) -> Result<u16, BuildError> {
        let index = self.dict_blobs;
        self.dict_blobs = self
            .dict_blobs
            .checked_add(1)
            .ok_or_else(|| BuildError::Invalid("too many dictionary blobs".into()))?;
        self.add_stored_blob(index, blob)?;
        Ok(index)
    }

    /// Registers the chunks of a blob stored before (a layer blob restored from the
    /// conversion cache, or a dictionary blob) under provisional index `index`.
    pub fn add_stored_blob(&mut self, index: u16, blob: &BlobInfo) -> Result<(), BuildError> {
        for e in &blob.chunks.entries {
            let blkaddr = u32::try_from(e.blkaddr())
                .map_err(|_| BuildError::Invalid("a blob over 16 TiB".into()))?;
            self.dedup.entry(e.digest).or_insert(Loc {
                blob: index,
                blkaddr,
            });
        }
        Ok(())
    }

    /// Starts the blob with provisional index `blob`, written to `out`.
    pub fn start_blob(&mut self, blob: u16, out: Box<dyn BlobWriter>) {
        let (tx, rx) = bounded::<Job>(self.workers * 2);
        let (etx, erx) = bounded::<Result<Encoded, BuildError>>(self.workers * 2);
        let workers = (0..self.workers)
            .map(|_| {
                let (rx, etx) = (rx.clone(), etx.clone());
                let compressor = self.compressor;
                std::thread::spawn(move || encode_worker(compressor, rx, etx))
            })
            .collect();
        drop(etx);
        let writer = std::thread::spawn(move || write_blob(out, erx));
        self.current = Some(Pipeline {
            blob,
            tx: Some(tx),
            workers,
            writer,
            seq: 0,
            next_uoffset: 0,
        });
    }

    /// Finishes the current blob: waits for the pipeline, writes table and trailer, and
    /// commits it. Returns `None` if it stored no chunk (nothing is committed then).
    pub fn finish_blob(&mut self) -> Result<Option<FinishedBlob>, BuildError> {
        let Some(mut p) = self.current.take() else {
            return Ok(None);
        };
        drop(p.tx.take());
        let mut first_err = None;
        for w in p.workers {
            if let Err(e) = w
                .join()
                .map_err(|_| BuildError::Invalid("a compression thread panicked".into()))?
            {
                first_err.get_or_insert(e);
            }
        }
        let (mut out, table, data_size) = p
            .writer
            .join()
            .map_err(|_| BuildError::Invalid("the blob writer thread panicked".into()))??;
        if let Some(e) = first_err {
            return Err(e);
        }
        if table.entries.is_empty() {
            return Ok(None);
        }
        let uncompressed_size = p.next_uoffset;
        let table_bytes = table.to_bytes();
        let trailer = BlobTrailer {
            chunk_count: table.entries.len() as u64,
            table_offset: data_size,
            uncompressed_size,
        };
        out.write_all(&table_bytes)
            .and_then(|_| out.write_all(&trailer.to_bytes()))
            .map_err(BuildError::write)?;
        let (digest, size) = out.commit()?;
        Ok(Some(FinishedBlob {
            info: BlobInfo {
                digest: digest.bytes(),
                compressed_size: size,
                data_size,
                uncompressed_size,
                chunks: table,
            },
            digest,
        }))
    }

    /// Stops the current blob without committing it: its temporary file is deleted.
    pub fn abort_blob(&mut self) {
        if let Some(mut p) = self.current.take() {
            drop(p.tx.take());
            for w in p.workers {
                let _ = w.join();
            }
            // Dropping the uncommitted writer removes its temporary file.
            let _ = p.writer.join();
        }
    }

    /// Returns and resets the counters.
    pub fn take_stats(&mut self) -> ChunkStats {
        std::mem::take(&mut self.stats)
    }

    /// The provisional blob index of the blob being written.
    pub fn current_blob(&self) -> Option<u16> {
        self.current.as_ref().map(|p| p.blob)
    }
}

impl ChunkSink for Chunker {
    fn put(&mut self, data: Vec<u8>) -> Result<ChunkRef, BuildError> {
        let len = data.len() as u64;
        self.stats.chunks += 1;
        if is_zero(&data) {
            self.stats.hole_bytes += len;
            return Ok(ChunkRef::Hole);
        }
        let d = digest(&data);
        if let Some(loc) = self.dedup.get(&d) {
            self.stats.dedup_chunks += 1;
            self.stats.dedup_bytes += len;
            if loc.blob < self.dict_blobs {
                self.stats.dict_bytes += len;
            }
            return Ok(ChunkRef::Mapped {
                device: loc.blob + 1,
                blkaddr: loc.blkaddr,
            });
        }
        let p = self
            .current
            .as_mut()
            .ok_or_else(|| BuildError::Invalid("chunk outside a layer".into()))?;
        let uoffset = p.next_uoffset;
        let blkaddr = u32::try_from(uoffset / BLOCK_SIZE)
            .map_err(|_| BuildError::Invalid("a layer over 16 TiB".into()))?;
        p.next_uoffset = (uoffset + len).next_multiple_of(BLOCK_SIZE);
        let job = Job {
            seq: p.seq,
            uoffset,
            digest: d,
            data,
        };
        p.seq += 1;
        let loc = Loc {
            blob: p.blob,
            blkaddr,
        };
        if p.tx
            .as_ref()
            .expect("open while current")
            .send(job)
            .is_err()
        {
            // The writer or a worker stopped on an error; finish_blob reports it.
            return Err(self
                .finish_blob()
                .err()
                .unwrap_or_else(|| BuildError::Invalid("blob pipeline stopped".into())));
        }
        self.dedup.insert(d, loc);
        self.stats.stored_chunks += 1;
        self.stats.stored_bytes += len;
        Ok(ChunkRef::Mapped {
            device: loc.blob + 1,
            blkaddr,
        })
    }
}

/// Whether a chunk is all zeros (checked 64 bytes at a time so it vectorises).
fn is_zero(data: &[u8]) -> bool {
    let blocks = data.chunks_exact(64);
    let rest = blocks.remainder();
    blocks
        .into_iter()
        .all(|b| b.iter().fold(0u8, |acc, &x| acc | x) == 0)
        && rest.iter().all(|&b| b == 0)
}

fn encode_worker(
    compressor: Compressor,
    rx: Receiver<Job>,
    tx: Sender<Result<Encoded, BuildError>>,
) -> Result<(), BuildError> {
    let mut enc = Encoder::new(compressor).map_err(|e| BuildError::Invalid(e.to_string()))?;
    for job in rx {
        let res = enc
            .encode(&job.data)
            .map(|(compressor, stored)| Encoded {
                seq: job.seq,
                uoffset: job.uoffset,
                usize: job.data.len() as u32,
                digest: job.digest,
                compressor,
                stored,
            })
            .map_err(|e| BuildError::Invalid(e.to_string()));
        let failed = res.is_err();
        if tx.send(res).is_err() || failed {
            break;
        }
    }
    Ok(())
}

fn write_blob(
    mut out: Box<dyn BlobWriter>,
    rx: Receiver<Result<Encoded, BuildError>>,
) -> Result<Written, BuildError> {
    let mut pending: BTreeMap<u64, Encoded> = BTreeMap::new();
    let mut next = 0u64;
    let mut offset = 0u64;
    let mut table = ChunkTable::default();
    for res in rx {
        let enc = res?;
        pending.insert(enc.seq, enc);
        while let Some(enc) = pending.remove(&next) {
            out.write_all(&enc.stored).map_err(BuildError::write)?;
            table.entries.push(ChunkEntry {
                uncompressed_offset: enc.uoffset,
                compressed_offset: offset,
                uncompressed_size: enc.usize,
                compressed_size: enc.stored.len() as u32,
                compressor: enc.compressor,
                digest: enc.digest,
            });
            offset += enc.stored.len() as u64;
            next += 1;
        }
    }
    if !pending.is_empty() {
        return Err(BuildError::Invalid(
            "compression pipeline lost a chunk".into(),
        ));
    }
    Ok((out, table, offset))
}
