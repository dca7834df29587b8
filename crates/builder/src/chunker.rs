//! Deduplicates chunks and writes new ones into data blobs through a compression pipeline.
//!
//! The tar reader thread hashes each chunk and decides, in stream order, whether it is a
//! hole (all zeros), a duplicate (its digest is already stored in this image, a lower
//! layer or the chunk dictionary) or new. A new chunk gets its place in the blob's
//! uncompressed address space right away, so placement is deterministic; only the
//! compression runs on worker threads, and a writer thread puts the results back in order.
//! At most a few chunks are in flight, which bounds memory.
//!
//! Small files (up to an eighth of the frame size) are not chunks of their own: they are
//! packed, in stream order, into **frames** of up to the frame size, each file at a
//! 4 KiB boundary, and a frame is compressed and verified as one chunk (format version
//! 2). zstd then sees across the files of a frame, and one ranged read serves all of them.
//! A frame also ends after a file whose digest says so (one in 16, once the
//! frame is half full): the same files end the same frames whatever came before them.
//! A small file is deduplicated by its own digest against the small files of its layer and
//! against every stored chunk (of lower layers and of the dictionary, whose tables are
//! all a conversion that starts above cached layers knows: so an incremental conversion
//! decides exactly as a full one). A whole frame is deduplicated by its digest: a frame
//! already stored is not stored again, and its files are pointed at the stored copy when
//! the layer ends ([`Chunker::take_remaps`]).
//!
//! Given a start-up trace's chunks ([`Chunker::lay_out_first`]), a blob's compressed chunks
//! are spooled to a local file, and when the layer ends they are written out with the
//! trace's first ([`crate::layout`]); the files are pointed at the chunks' new places
//! through the same remaps.

use crate::{BuildError, ChunkSink};
use crossbeam_channel::{bounded, Receiver, Sender};
use hoist_codec::{digest, Encoder};
use hoist_format::chunk::{BlobTrailer, ChunkEntry, ChunkTable, Compressor};
use hoist_format::erofs::ondisk::BLOCK_SIZE;
use hoist_format::meta::BlobInfo;
use hoist_format::tree::ChunkRef;
use hoist_oci::{BlobWriter, Digest, HashingReader};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Seek, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
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
    /// Small files stored in frames (or found stored), counted in `chunks` too.
    #[serde(default)]
    pub small_files: u64,
    /// Frames stored anew, counted in `stored_chunks` too.
    #[serde(default)]
    pub frames: u64,
    /// Frames found already stored.
    #[serde(default)]
    pub dedup_frames: u64,
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

/// What the writer thread hands back: the open blob, its table, its chunk area size,
/// and the spool that holds the chunk area instead of the blob, if any.
type Written = (Box<dyn BlobWriter>, ChunkTable, u64, Option<File>);

/// A blob being filled.
struct Pipeline {
    blob: u16,
    tx: Option<Sender<Job>>,
    workers: Vec<JoinHandle<Result<(), BuildError>>>,
    writer: JoinHandle<Result<Written, BuildError>>,
    seq: u64,
    next_uoffset: u64,
    /// The frame of small files being filled; it starts at `next_uoffset`.
    frame: Option<Frame>,
}

/// A frame being filled: its bytes so far, each member file at a 4 KiB boundary.
#[derive(Default)]
struct Frame {
    data: Vec<u8>,
    /// Digest of each member file and its offset in `data`, in order.
    members: Vec<([u8; 32], u64)>,
    /// Bytes of the member files (`data` less the padding between them).
    bytes: u64,
}

impl Frame {
    /// Offset of a member file already in the frame with digest `d`.
    fn offset_of(&self, d: &[u8; 32]) -> Option<u64> {
        self.members.iter().find(|m| &m.0 == d).map(|m| m.1)
    }
}

/// Block range `[start, start + blocks)` of device `device` (provisional, 1-based)
/// that files were pointed at before its frame turned out to be stored already at
/// `to_blkaddr` of device `to_device`, or before its chunk moved there when its blob
/// was laid out in a trace's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remap {
    /// Provisional device id of the frame's blob.
    pub device: u16,
    /// First block of the frame.
    pub start: u32,
    /// Its length in blocks.
    pub blocks: u32,
    /// Device id of the stored copy.
    pub to_device: u16,
    /// First block of the stored copy.
    pub to_blkaddr: u32,
}

/// A finished data blob.
#[derive(Debug, Clone)]
pub struct FinishedBlob {
    /// The blob as the metadata blob records it.
    pub info: BlobInfo,
    /// Its OCI digest.
    pub digest: Digest,
    /// For a blob laid out in a trace's order: the blob it would have been in layer
    /// order (not written; its digest computed), which the trace's metadata chunks may
    /// have been recorded on ([`crate::layout`]).
    pub unordered: Option<(BlobInfo, Digest)>,
}

/// The dedup map and the blob currently being written.
pub struct Chunker {
    compressor: Compressor,
    workers: usize,
    frame_size: u64,
    /// Digests of the chunks (and frames) stored in the blobs so far.
    dedup: HashMap<[u8; 32], Loc>,
    /// Digests of the small files of the current layer stored in its frames.
    layer_files: HashMap<[u8; 32], Loc>,
    /// Where the dictionary's chunks hold small files ([`crate::dict`]).
    dict_files: crate::dict::DictFiles,
    dict_blobs: u16,
    current: Option<Pipeline>,
    remaps: Vec<Remap>,
    /// The rank of each chunk a start-up trace reads, by digest: stored first in its
    /// blob ([`Chunker::lay_out_first`]).
    order: HashMap<[u8; 32], u64>,
    /// Where blobs are spooled while `order` is not empty.
    spool_dir: PathBuf,
    /// Chunks stored at the head of their blob since the last [`Chunker::take_stats`].
    laid_out: u64,
    /// Counters since the last [`Chunker::take_stats`].
    pub stats: ChunkStats,
}

impl Chunker {
    /// A chunker with `workers` compression threads that packs small files into frames
    /// of up to `frame_size` bytes (0: every file is chunked on its own). `frame_size`
    /// must be a multiple of 4 KiB, at most the chunk size.
    pub fn new(compressor: Compressor, workers: usize, frame_size: u64) -> Self {
        Chunker {
            compressor,
            workers: workers.max(1),
            frame_size,
            dedup: HashMap::new(),
            layer_files: HashMap::new(),
            dict_files: crate::dict::DictFiles::default(),
            dict_blobs: 0,
            current: None,
            remaps: Vec::new(),
            order: HashMap::new(),
            spool_dir: std::env::temp_dir(),
            laid_out: 0,
            stats: ChunkStats::default(),
        }
    }

    /// Stores the chunks of `digests` (a start-up trace's, in its order) first in each
    /// blob that holds them, in that order ([`crate::layout`]). The blobs written from
    /// then on are spooled in `spool_dir` until their layer ends.
    pub fn lay_out_first(
        &mut self,
        digests: impl IntoIterator<Item = [u8; 32]>,
        spool_dir: PathBuf,
    ) {
        for d in digests {
            let next = self.order.len() as u64;
            self.order.entry(d).or_insert(next);
        }
        self.spool_dir = spool_dir;
    }

    /// Chunks stored at the head of their blob, in a trace's order, since the last call.
    pub fn take_laid_out(&mut self) -> u64 {
        std::mem::take(&mut self.laid_out)
    }

    /// The frames found stored already since the last call, whose files must be pointed
    /// at the stored copies ([`apply_remaps`]) before the tree is written or cached.
    pub fn take_remaps(&mut self) -> Vec<Remap> {
        std::mem::take(&mut self.remaps)
    }

    /// Registers where the dictionary's chunks hold small files (their blobs numbered
    /// as [`Chunker::add_dict_blob`] numbers them).
    pub fn add_dict_files(&mut self, files: crate::dict::DictFiles) {
        self.dict_files = files;
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
        let spool = (!self.order.is_empty()).then(|| self.spool_dir.clone());
        let writer = std::thread::spawn(move || write_blob(out, spool, erx));
        self.layer_files.clear();
        self.current = Some(Pipeline {
            blob,
            tx: Some(tx),
            workers,
            writer,
            seq: 0,
            next_uoffset: 0,
            frame: None,
        });
    }

    /// Finishes the current blob: waits for the pipeline, writes table and trailer, and
    /// commits it. Returns `None` if it stored no chunk (nothing is committed then).
    pub fn finish_blob(&mut self) -> Result<Option<FinishedBlob>, BuildError> {
        if self.current.is_some() {
            if let Err(e) = self.seal_frame() {
                self.abort_blob();
                return Err(e);
            }
        }
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
        let (mut out, mut table, data_size, spool) = p
            .writer
            .join()
            .map_err(|_| BuildError::Invalid("the blob writer thread panicked".into()))??;
        if let Some(e) = first_err {
            return Err(e);
        }
        if table.entries.is_empty() {
            return Ok(None);
        }
        let mut uncompressed_size = p.next_uoffset;
        let mut unordered = None;
        if let Some(spool) = spool {
            let plan = crate::layout::plan(&table.entries, &self.order)?;
            if plan.is_some() {
                let info = BlobInfo {
                    digest: [0; 32],
                    compressed_size: 0,
                    data_size,
                    uncompressed_size,
                    chunks: table.clone(),
                };
                unordered = Some(self.digest_spooled(&spool, info)?);
            }
            let order: Vec<usize> = match &plan {
                Some(plan) => plan.order.clone(),
                None => (0..table.entries.len()).collect(),
            };
            copy_chunks(
                &spool,
                &self.spool_dir,
                &table.entries,
                &order,
                out.as_mut(),
            )?;
            if let Some(plan) = plan {
                self.laid_out += plan
                    .entries
                    .iter()
                    .take_while(|e| self.order.contains_key(&e.digest))
                    .count() as u64;
                self.moved(p.blob, &plan.moves);
                uncompressed_size = plan.uncompressed_size;
                table = ChunkTable {
                    entries: plan.entries,
                };
            }
        }
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
            unordered,
        }))
    }

    /// The blob `info` describes (its chunks in `spool`, its table and trailer after
    /// them), digested and sized without being written.
    fn digest_spooled(
        &self,
        spool: &File,
        mut info: BlobInfo,
    ) -> Result<(BlobInfo, Digest), BuildError> {
        let mut tail = info.chunks.to_bytes();
        tail.extend_from_slice(
            &BlobTrailer {
                chunk_count: info.chunks.entries.len() as u64,
                table_offset: info.data_size,
                uncompressed_size: info.uncompressed_size,
            }
            .to_bytes(),
        );
        let mut data = spool;
        let read = data
            .seek(std::io::SeekFrom::Start(0))
            .and_then(|_| {
                let mut h = HashingReader::new(std::io::Read::chain(
                    std::io::Read::take(data, info.data_size),
                    &tail[..],
                ));
                let n = std::io::copy(&mut h, &mut std::io::sink())?;
                Ok((h.digest(), n))
            })
            .map_err(|source| BuildError::Spool {
                dir: self.spool_dir.display().to_string(),
                source,
            })?;
        let (digest, size) = read;
        info.digest = digest.bytes();
        info.compressed_size = size;
        Ok((info, digest))
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

    /// The chunks of blob `blob` moved (`(old first block, blocks, new first block)`):
    /// the dedup map and the frames' remaps point at their new places, and the files
    /// pointed at their old ones are remapped.
    fn moved(&mut self, blob: u16, moves: &[(u32, u32, u32)]) {
        let to: HashMap<u32, u32> = moves.iter().map(|&(old, _, new)| (old, new)).collect();
        for loc in self.dedup.values_mut().filter(|l| l.blob == blob) {
            if let Some(&new) = to.get(&loc.blkaddr) {
                loc.blkaddr = new;
            }
        }
        for r in self.remaps.iter_mut().filter(|r| r.to_device == blob + 1) {
            if let Some(&new) = to.get(&r.to_blkaddr) {
                r.to_blkaddr = new;
            }
        }
        // Small files are found in the layer's frames while it is converted only.
        self.layer_files.clear();
        // A file points into a chunk, or into the place of a frame stored elsewhere
        // (remapped above): never both, so one pass of remaps serves both.
        self.remaps
            .extend(moves.iter().map(|&(start, blocks, to_blkaddr)| Remap {
                device: blob + 1,
                start,
                blocks,
                to_device: blob + 1,
                to_blkaddr,
            }));
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
        if let Some(loc) = self.dedup.get(&d).copied() {
            self.count_dedup(loc, len);
            return Ok(loc.chunk_ref());
        }
        self.seal_frame()?;
        let loc = self.store(d, data)?;
        self.stats.stored_chunks += 1;
        self.stats.stored_bytes += len;
        Ok(loc.chunk_ref())
    }

    fn small_file_limit(&self) -> u64 {
        self.frame_size / 8
    }

    fn put_small(&mut self, data: Vec<u8>) -> Result<ChunkRef, BuildError> {
        let len = data.len() as u64;
        self.stats.chunks += 1;
        self.stats.small_files += 1;
        if is_zero(&data) {
            self.stats.hole_bytes += len;
            return Ok(ChunkRef::Hole);
        }
        let d = digest(&data);
        let in_dict = || {
            let p = self.dict_files.find(&data)?;
            Some(Loc {
                blob: p.blob,
                blkaddr: p.blkaddr,
            })
        };
        let found = self.dedup.get(&d).or(self.layer_files.get(&d)).copied();
        if let Some(loc) = found.or_else(in_dict) {
            self.count_dedup(loc, len);
            return Ok(loc.chunk_ref());
        }
        let frame_size = self.frame_size;
        let p = self
            .current
            .as_mut()
            .ok_or_else(|| BuildError::Invalid("file outside a layer".into()))?;
        let in_frame = |p: &Pipeline, offset: u64| Loc {
            blob: p.blob,
            // The blob's size was checked when the frame was opened.
            blkaddr: ((p.next_uoffset + offset) / BLOCK_SIZE) as u32,
        };
        if let Some(offset) = p.frame.as_ref().and_then(|f| f.offset_of(&d)) {
            self.stats.dedup_chunks += 1;
            self.stats.dedup_bytes += len;
            return Ok(in_frame(p, offset).chunk_ref());
        }
        let full = p
            .frame
            .as_ref()
            .is_some_and(|f| (f.data.len() as u64).next_multiple_of(BLOCK_SIZE) + len > frame_size);
        if full {
            self.seal_frame()?;
        }
        let p = self.current.as_mut().expect("checked above");
        if p.frame.is_none() {
            // The frame's last block must have a 32-bit address, like any chunk's.
            let end = p.next_uoffset + frame_size;
            if end / BLOCK_SIZE > u64::from(u32::MAX) {
                return Err(BuildError::Invalid("a layer over 16 TiB".into()));
            }
            p.frame = Some(Frame::default());
        }
        let frame = p.frame.as_mut().expect("opened above");
        let offset = (frame.data.len() as u64).next_multiple_of(BLOCK_SIZE);
        frame.data.resize(offset as usize, 0);
        frame.data.extend_from_slice(&data);
        frame.members.push((d, offset));
        frame.bytes += len;
        self.stats.stored_bytes += len;
        let half = frame.data.len() as u64 >= frame_size / 2;
        let placed = in_frame(p, offset).chunk_ref();
        // A content-defined boundary: the same files close the same frames whatever came
        // before them, so after a file added or changed the frames line up again with a
        // lower layer's or the dictionary's, and dedup. Not before the frame is half
        // full, so that frames stay large enough to compress well.
        if half && u32::from(d[31]) % FRAME_CUT == 0 {
            self.seal_frame()?;
        }
        Ok(placed)
    }
}

/// One small file in this many (by its digest) ends its frame.
const FRAME_CUT: u32 = 16;

impl Loc {
    fn chunk_ref(self) -> ChunkRef {
        ChunkRef::Mapped {
            device: self.blob + 1,
            blkaddr: self.blkaddr,
        }
    }
}

impl Chunker {
    fn count_dedup(&mut self, loc: Loc, len: u64) {
        self.stats.dedup_chunks += 1;
        self.stats.dedup_bytes += len;
        if loc.blob < self.dict_blobs {
            self.stats.dict_bytes += len;
        }
    }

    /// Places new chunk bytes at the end of the current blob and queues them for
    /// compression; registers their digest.
    fn store(&mut self, d: [u8; 32], data: Vec<u8>) -> Result<Loc, BuildError> {
        let len = data.len() as u64;
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
        Ok(loc)
    }

    /// Closes the open frame, if any: stores it, or, if its bytes are stored already,
    /// records where its files must point instead. Its files' digests are registered
    /// at their final places either way.
    fn seal_frame(&mut self) -> Result<(), BuildError> {
        let Some(p) = self.current.as_mut() else {
            return Ok(());
        };
        let Some(frame) = p.frame.take() else {
            return Ok(());
        };
        let start = p.next_uoffset;
        let start_blk = (start / BLOCK_SIZE) as u32;
        let blob = p.blob;
        let len = frame.data.len() as u64;
        let d = digest(&frame.data);
        let base = match self.dedup.get(&d).copied() {
            Some(stored) => {
                // Its place stays unused (a gap in the address space, read by nobody).
                p.next_uoffset = (start + len).next_multiple_of(BLOCK_SIZE);
                self.remaps.push(Remap {
                    device: blob + 1,
                    start: start_blk,
                    blocks: len.div_ceil(BLOCK_SIZE) as u32,
                    to_device: stored.blob + 1,
                    to_blkaddr: stored.blkaddr,
                });
                self.stats.dedup_frames += 1;
                // Its files were counted as stored when they joined it.
                self.stats.stored_bytes = self.stats.stored_bytes.saturating_sub(frame.bytes);
                self.stats.dedup_bytes += frame.bytes;
                if stored.blob < self.dict_blobs {
                    self.stats.dict_bytes += frame.bytes;
                }
                stored
            }
            None => {
                let loc = self.store(d, frame.data)?;
                self.stats.stored_chunks += 1;
                self.stats.frames += 1;
                loc
            }
        };
        for (fd, offset) in frame.members {
            self.layer_files.entry(fd).or_insert(Loc {
                blob: base.blob,
                blkaddr: base.blkaddr + (offset / BLOCK_SIZE) as u32,
            });
        }
        Ok(())
    }
}

/// Points every file chunk that falls in a remapped frame at the stored copy.
pub fn apply_remaps(tree: &mut hoist_format::tree::Tree, remaps: &[Remap]) {
    if remaps.is_empty() {
        return;
    }
    let by_start: BTreeMap<(u16, u32), Remap> =
        remaps.iter().map(|r| ((r.device, r.start), *r)).collect();
    for node in &mut tree.nodes {
        let hoist_format::tree::NodeKind::File { chunks, .. } = &mut node.kind else {
            continue;
        };
        for c in chunks {
            let ChunkRef::Mapped { device, blkaddr } = *c else {
                continue;
            };
            let Some((_, r)) = by_start.range(..=(device, blkaddr)).next_back() else {
                continue;
            };
            if r.device == device && blkaddr - r.start < r.blocks {
                *c = ChunkRef::Mapped {
                    device: r.to_device,
                    blkaddr: r.to_blkaddr + (blkaddr - r.start),
                };
            }
        }
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

/// Writes the compressed chunks in order to `out`, or to a spool in `spool_dir` if given.
fn write_blob(
    mut out: Box<dyn BlobWriter>,
    spool_dir: Option<PathBuf>,
    rx: Receiver<Result<Encoded, BuildError>>,
) -> Result<Written, BuildError> {
    let dir = spool_dir
        .as_ref()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    let mut spool = match spool_dir {
        Some(dir) => Some(
            tempfile::tempfile_in(&dir).map_err(|source| BuildError::Spool {
                dir: dir.display().to_string(),
                source,
            })?,
        ),
        None => None,
    };
    let mut pending: BTreeMap<u64, Encoded> = BTreeMap::new();
    let mut next = 0u64;
    let mut offset = 0u64;
    let mut table = ChunkTable::default();
    for res in rx {
        let enc = res?;
        pending.insert(enc.seq, enc);
        while let Some(enc) = pending.remove(&next) {
            match spool.as_mut() {
                Some(f) => f
                    .write_all(&enc.stored)
                    .map_err(|source| BuildError::Spool {
                        dir: dir.clone(),
                        source,
                    }),
                None => out.write_all(&enc.stored).map_err(BuildError::write),
            }?;
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
    Ok((out, table, offset, spool))
}

/// Copies the compressed chunks `entries` of a spooled blob (in `dir`) to `out`, in
/// `order`.
fn copy_chunks(
    spool: &File,
    dir: &std::path::Path,
    entries: &[ChunkEntry],
    order: &[usize],
    out: &mut dyn BlobWriter,
) -> Result<(), BuildError> {
    let mut buf = Vec::new();
    for &i in order {
        let e = &entries[i];
        buf.resize(e.compressed_size as usize, 0);
        spool
            .read_exact_at(&mut buf, e.compressed_offset)
            .map_err(|source| BuildError::Spool {
                dir: dir.display().to_string(),
                source,
            })?;
        out.write_all(&buf).map_err(BuildError::write)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
