//! Metadata read on demand (format version 3).
//!
//! A version 3 metadata layer is a chunked blob (64 KiB chunks, each compressed and
//! BLAKE3-verified), and the manifest pins the BLAKE3 of its chunk table and trailer
//! (`dev.hoist.meta.table`). [`ChunkedMeta`] fetches that table with one ranged read,
//! checks it against the manifest, and from then on serves positioned reads of the
//! metadata by fetching, verifying and keeping just the chunks they touch. A mount then
//! moves the header, the chunk tables and the blocks its lookups need, not the whole
//! tree: the cost of a mount no longer grows with the number of files in the image.
//!
//! Each read that misses fetches the missing chunks it needs in one ranged request, and
//! the next few missing ones with them ([`READAHEAD_CHUNKS`]). A miss right where an
//! earlier fetch ended continues a stream, and its window doubles, up to
//! [`MAX_READAHEAD_CHUNKS`]: a tree walk reads the inode area and the directory blocks
//! after it in order, two streams at once.

use crate::ReadError;
use hoist_format::chunk::{parse_blob_tail, ChunkTable, BLOB_TRAILER_SIZE, CHUNK_ENTRY_SIZE};
use hoist_format::meta::{MAX_META_SIZE, META_CHUNK_SIZE};
use hoist_format::ReadAt;
use hoist_oci::{media, Digest, ImageSource};
use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Chunks fetched after the ones a read needs, when they are missing too.
pub const READAHEAD_CHUNKS: usize = 4;
/// The most chunks a stream of sequential misses fetches ahead (4 MiB of metadata).
pub const MAX_READAHEAD_CHUNKS: usize = 64;
/// Streams of sequential misses followed at once.
const STREAMS: usize = 4;
/// The longest a read waits for a chunk another read is fetching (the fetch itself is
/// bounded by the source's timeouts, well within this).
const WAIT_FOR_FETCH: Duration = Duration::from_secs(120);
/// Ranged reads a prefetch keeps in flight.
const PREFETCH_STREAMS: usize = 4;
/// Chunks not asked for that a prefetch fetches to join two ranges into one request
/// (128 KiB of metadata, a few KiB compressed: less than a round trip costs).
const PREFETCH_GAP: usize = 2;

/// Where decoded metadata chunks are kept between mounts and daemons (the chunk cache),
/// so that a remount or a takeover needs no registry for what was read before.
pub trait MetaChunkCache: Send + Sync {
    /// The bytes cached for `digest`, if any (the caller verifies them).
    fn get(&self, digest: &[u8; 32], size: u32) -> Option<Vec<u8>>;
    /// Keeps verified bytes.
    fn put(&self, digest: &[u8; 32], data: &[u8]);
}

/// The metadata of a version 3 image, read by ranges.
pub struct ChunkedMeta {
    src: Arc<dyn ImageSource>,
    digest: Digest,
    table: ChunkTable,
    len: u64,
    cache: Option<Arc<dyn MetaChunkCache>>,
    chunks: Mutex<HashMap<usize, Arc<Vec<u8>>>>,
    /// Where recent fetches ended and their windows, most recent last.
    streams: Mutex<Vec<(usize, usize)>>,
    fetched: AtomicU64,
    requests: AtomicU64,
    /// Chunks being fetched, so that concurrent reads of one chunk fetch it once; the
    /// condition variable is signalled when a fetch ends.
    inflight: Mutex<HashSet<usize>>,
    fetch_ended: Condvar,
    recording: AtomicBool,
    /// Chunks read since recording started, in the order first read.
    recorded: Mutex<(Vec<usize>, HashSet<usize>)>,
}

impl ChunkedMeta {
    /// Opens the metadata layer `digest` of `size` bytes whose descriptor carries
    /// `annotations`: fetches its chunk table and checks it against the pinned digest.
    /// `None` when the descriptor pins no table (images before version 3).
    pub fn open(
        src: Arc<dyn ImageSource>,
        digest: &Digest,
        size: u64,
        annotations: &serde_json::Map<String, serde_json::Value>,
        cache: Option<Arc<dyn MetaChunkCache>>,
    ) -> Result<Option<ChunkedMeta>, ReadError> {
        let text = |k: &str| annotations.get(k).and_then(|v| v.as_str());
        let Some(pinned) = text(media::ANNOTATION_META_TABLE) else {
            return Ok(None);
        };
        let bad = |why: String| ReadError::Meta {
            digest: digest.to_string(),
            source: hoist_format::FormatError::Corrupt(why),
        };
        let number = |k: &str| {
            text(k)
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| bad(format!("its descriptor has no valid {k}")))
        };
        let count = number(media::ANNOTATION_CHUNKS)?;
        let len = number(media::ANNOTATION_UNCOMPRESSED_SIZE)?;
        let expected = pinned
            .strip_prefix("blake3:")
            .and_then(|h| {
                let mut d = [0u8; 32];
                hex::decode_to_slice(h, &mut d).ok().map(|_| d)
            })
            .ok_or_else(|| {
                bad(format!(
                    "{} is not blake3:<hex>",
                    media::ANNOTATION_META_TABLE
                ))
            })?;
        let tail_len = count
            .checked_mul(CHUNK_ENTRY_SIZE as u64)
            .and_then(|n| n.checked_add(BLOB_TRAILER_SIZE as u64))
            .filter(|n| *n <= size && len <= MAX_META_SIZE)
            .ok_or_else(|| {
                bad(format!(
                    "{count} chunks of {len} bytes do not fit the layer"
                ))
            })?;
        // The table is kept in the cache under the digest that pins it, so that a
        // takeover opens the image without the registry.
        let cached = u32::try_from(tail_len).ok().and_then(|n| {
            let t = cache.as_ref()?.get(&expected, n)?;
            (hoist_codec::digest(&t) == expected).then_some(t)
        });
        let (tail, fetched) = match cached {
            Some(t) => (t, 0),
            None => {
                let t = src.read_blob_range(digest, size - tail_len, tail_len)?;
                if hoist_codec::digest(&t) != expected {
                    return Err(bad(
                        "its chunk table does not match the digest its manifest pins".into(),
                    ));
                }
                if let Some(c) = &cache {
                    c.put(&expected, &t);
                }
                (t, tail_len)
            }
        };
        let (_, table) = parse_blob_tail(&tail, size).map_err(|e| bad(e.to_string()))?;
        let end = table.end();
        let regular = table.entries.iter().enumerate().all(|(i, e)| {
            e.uncompressed_offset == (i * META_CHUNK_SIZE) as u64
                && (e.uncompressed_size as usize == META_CHUNK_SIZE || i + 1 == table.entries.len())
        });
        if end != len || !regular {
            return Err(bad(
                "its chunks are not the 64 KiB pieces of the metadata".into()
            ));
        }
        Ok(Some(ChunkedMeta {
            src,
            digest: digest.clone(),
            table,
            len,
            cache,
            chunks: Mutex::new(HashMap::new()),
            streams: Mutex::new(Vec::new()),
            fetched: AtomicU64::new(fetched),
            requests: AtomicU64::new(u64::from(fetched > 0)),
            inflight: Mutex::new(HashSet::new()),
            fetch_ended: Condvar::new(),
            recording: AtomicBool::new(false),
            recorded: Mutex::new((Vec::new(), HashSet::new())),
        }))
    }

    /// Compressed bytes fetched so far (the chunk table included), and requests sent.
    pub fn fetched(&self) -> (u64, u64) {
        (self.fetched.load(Relaxed), self.requests.load(Relaxed))
    }

    fn loaded(&self, i: usize) -> Option<Arc<Vec<u8>>> {
        self.chunks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&i)
            .cloned()
    }

    fn keep(&self, i: usize, data: Vec<u8>) -> Arc<Vec<u8>> {
        let data = Arc::new(data);
        self.chunks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(i, data.clone());
        data
    }

    /// Chunk `i` from memory or the cache, verified; `None` if it must be fetched.
    fn local(&self, i: usize) -> Option<Arc<Vec<u8>>> {
        if let Some(d) = self.loaded(i) {
            return Some(d);
        }
        let e = &self.table.entries[i];
        let data = self.cache.as_ref()?.get(&e.digest, e.uncompressed_size)?;
        (data.len() == e.uncompressed_size as usize && hoist_codec::digest(&data) == e.digest)
            .then(|| self.keep(i, data))
    }

    /// Fetches chunks `first..last` (missing, contiguous) with one ranged read and keeps
    /// them, each verified.
    fn fetch(&self, first: usize, last: usize) -> io::Result<()> {
        let entries = &self.table.entries[first..last];
        let start = entries[0].compressed_offset;
        let end = entries
            .iter()
            .map(|e| e.compressed_offset + u64::from(e.compressed_size))
            .max()
            .unwrap_or(start);
        let bytes = self
            .src
            .read_blob_range(&self.digest, start, end - start)
            .map_err(|e| io::Error::other(format!("metadata {}: {e}", self.digest)))?;
        self.fetched.fetch_add(end - start, Relaxed);
        self.requests.fetch_add(1, Relaxed);
        for (k, e) in entries.iter().enumerate() {
            let stored = e
                .stored_in(&bytes, start)
                .ok_or_else(|| io::Error::other("metadata chunks out of order in their table"))?;
            let data = hoist_codec::decode_verified(e, stored).map_err(|err| {
                io::Error::other(format!(
                    "metadata {} chunk {}: {err}",
                    self.digest,
                    first + k
                ))
            })?;
            if let Some(c) = &self.cache {
                c.put(&e.digest, &data);
            }
            self.keep(first + k, data);
        }
        Ok(())
    }

    /// Chunk `i`, fetching it (and the missing chunks after it, up to the readahead) if
    /// needed; `until` is the chunk after the last the caller needs.
    fn chunk(&self, i: usize, until: usize) -> io::Result<Arc<Vec<u8>>> {
        if self.recording.load(Relaxed) {
            let mut r = self.recorded.lock().unwrap_or_else(|p| p.into_inner());
            if r.1.insert(i) {
                r.0.push(i);
            }
        }
        let deadline = Instant::now() + WAIT_FOR_FETCH;
        loop {
            if let Some(d) = self.local(i) {
                return Ok(d);
            }
            let window = self.window(i);
            let limit = (until + window).min(self.table.entries.len());
            let mut last = i + 1;
            while last < limit && self.local(last).is_none() {
                last += 1;
            }
            let Some(last) = self.claim(i, last, deadline)? else {
                // Another read fetched chunk `i` meanwhile.
                continue;
            };
            let fetched = self.fetch(i, last);
            self.release(i, last);
            fetched?;
            self.ended(i, last, window);
            return self
                .loaded(i)
                .ok_or_else(|| io::Error::other("metadata chunk lost after its fetch"));
        }
    }

    /// Ends the caller's fetch of chunks `i..last`, and wakes the reads waiting for them.
    fn release(&self, i: usize, last: usize) {
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|c| !(i..last).contains(c));
        self.fetch_ended.notify_all();
    }

    /// Marks chunks `i..last` as being fetched by the caller, up to the first that
    /// another read is fetching, and returns the end of what it marked; `None` once
    /// chunk `i` itself was being fetched by another read and that fetch has ended
    /// (waiting for it until `deadline`).
    fn claim(&self, i: usize, last: usize, deadline: Instant) -> io::Result<Option<usize>> {
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if inflight.contains(&i) {
            while inflight.contains(&i) {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "metadata {} chunk {i}: waited too long for its fetch",
                            self.digest
                        ),
                    ));
                }
                inflight = self
                    .fetch_ended
                    .wait_timeout(inflight, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            return Ok(None);
        }
        let end = (i..last).find(|c| inflight.contains(c)).unwrap_or(last);
        inflight.extend(i..end);
        Ok(Some(end))
    }

    /// The readahead window of a miss at chunk `i`: doubled if it continues a stream.
    fn window(&self, i: usize) -> usize {
        let streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        streams
            .iter()
            .find(|(end, _)| *end == i)
            .map_or(READAHEAD_CHUNKS, |(_, w)| (w * 2).min(MAX_READAHEAD_CHUNKS))
    }

    /// Notes that a fetch of window `window` for a miss at `start` ended at `end`.
    fn ended(&self, start: usize, end: usize, window: usize) {
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        streams.retain(|(e, _)| *e != start);
        if streams.len() == STREAMS {
            streams.remove(0);
        }
        streams.push((end, window));
    }

    /// Starts noting which chunks reads touch (for a start-up trace).
    pub fn start_recording(&self) {
        self.recording.store(true, Relaxed);
    }

    /// The chunks reads touched since [`ChunkedMeta::start_recording`], in the order
    /// first touched.
    pub fn recorded(&self) -> Vec<usize> {
        self.recorded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    /// Fetches the chunks of `wanted` (a start-up trace's) that are neither in memory
    /// nor in the cache: neighbours joined into one ranged read, up to
    /// `PREFETCH_STREAMS` (4) reads in flight. Indices past the end are ignored. A range
    /// whose first chunk a read is fetching already is left to the reads. Returns how
    /// many chunks were missing (the ranges it set out to fetch).
    pub fn prefetch(&self, wanted: &[usize]) -> io::Result<usize> {
        let count = self.table.entries.len();
        let mut missing: Vec<usize> = wanted
            .iter()
            .copied()
            .filter(|&i| i < count && self.local(i).is_none())
            .collect();
        missing.sort_unstable();
        missing.dedup();
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for i in missing {
            match runs.last_mut() {
                Some((_, end)) if i <= *end + PREFETCH_GAP => *end = i + 1,
                _ => runs.push((i, i + 1)),
            }
        }
        let fetched = runs.iter().map(|(a, b)| b - a).sum();
        let next = Mutex::new(runs.into_iter());
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..PREFETCH_STREAMS)
                .map(|_| {
                    scope.spawn(|| loop {
                        let run = next.lock().unwrap_or_else(|p| p.into_inner()).next();
                        let Some((first, last)) = run else {
                            return Ok(());
                        };
                        // What a read is fetching already is left to it.
                        let deadline = Instant::now() + WAIT_FOR_FETCH;
                        if let Some(end) = self.claim(first, last, deadline)? {
                            let fetched = self.fetch(first, end);
                            self.release(first, end);
                            fetched?;
                        }
                    })
                })
                .collect();
            workers.into_iter().try_for_each(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(io::Error::other("prefetch panicked")))
            })
        })?;
        Ok(fetched)
    }

    /// Whether every chunk has been read (the metadata is all in memory).
    pub fn complete(&self) -> bool {
        self.chunks.lock().unwrap_or_else(|p| p.into_inner()).len() == self.table.entries.len()
    }

    /// Takes `whole`, all of the metadata as read from a local file, if every chunk of
    /// it matches its digest in the pinned table: then nothing more is fetched. Returns
    /// whether it was taken; a file that differs anywhere is not used at all.
    pub fn adopt(&self, whole: &[u8]) -> bool {
        if whole.len() as u64 != self.len {
            return false;
        }
        let pieces: Vec<&[u8]> = whole.chunks(META_CHUNK_SIZE).collect();
        let matches = pieces.len() == self.table.entries.len()
            && pieces
                .iter()
                .zip(&self.table.entries)
                .all(|(p, e)| hoist_codec::digest(p) == e.digest);
        if matches {
            let mut chunks = self.chunks.lock().unwrap_or_else(|p| p.into_inner());
            for (i, p) in pieces.into_iter().enumerate() {
                chunks.entry(i).or_insert_with(|| Arc::new(p.to_vec()));
            }
        }
        matches
    }

    /// All of the metadata (for the kernel, which mounts a file).
    pub fn read_all(&self) -> io::Result<Vec<u8>> {
        let mut out = vec![0u8; self.len as usize];
        self.read_exact_at(&mut out, 0)?;
        Ok(out)
    }
}

impl ReadAt for ChunkedMeta {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|e| *e <= self.len)
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        if buf.is_empty() {
            return Ok(());
        }
        let size = META_CHUNK_SIZE as u64;
        let until = end.div_ceil(size) as usize;
        let mut pos = offset;
        while pos < end {
            let i = (pos / size) as usize;
            let data = self.chunk(i, until)?;
            let within = (pos - i as u64 * size) as usize;
            let n = ((end - pos) as usize).min(data.len() - within);
            let at = (pos - offset) as usize;
            buf[at..at + n].copy_from_slice(&data[within..within + n]);
            pos += n as u64;
        }
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hoist_format::chunk::Compressor;
    use hoist_oci::OciError;
    use std::io::Read;

    /// A metadata blob served from memory, counting ranged reads; `flip` damages one
    /// byte of what it serves.
    struct Mem {
        blob: Vec<u8>,
        reads: AtomicU64,
        flip: Option<usize>,
        /// Each ranged read takes this long (a network's latency).
        latency: Duration,
    }

    impl ImageSource for Mem {
        fn describe(&self) -> String {
            "memory".into()
        }
        fn manifest(&self) -> Result<(Vec<u8>, Digest), OciError> {
            Err(OciError::Invalid("no manifest".into()))
        }
        fn open_blob(&self, _: &Digest, _: u64) -> Result<Box<dyn Read + Send>, OciError> {
            Err(OciError::Invalid("no whole reads".into()))
        }
        fn read_blob_range(&self, _: &Digest, offset: u64, len: u64) -> Result<Vec<u8>, OciError> {
            self.reads.fetch_add(1, Relaxed);
            std::thread::sleep(self.latency);
            let mut out = self.blob[offset as usize..(offset + len) as usize].to_vec();
            if let Some(at) = self.flip.and_then(|f| f.checked_sub(offset as usize)) {
                if let Some(b) = out.get_mut(at) {
                    *b ^= 0x55;
                }
            }
            Ok(out)
        }
    }

    #[derive(Default)]
    struct MemCache(Mutex<HashMap<[u8; 32], Vec<u8>>>);

    impl MetaChunkCache for MemCache {
        fn get(&self, digest: &[u8; 32], _: u32) -> Option<Vec<u8>> {
            self.0.lock().unwrap().get(digest).cloned()
        }
        fn put(&self, digest: &[u8; 32], data: &[u8]) {
            self.0.lock().unwrap().insert(*digest, data.to_vec());
        }
    }

    /// 20 chunks and a bit of metadata-like bytes, as a chunked blob, and the
    /// annotations its descriptor carries.
    fn sample() -> (Vec<u8>, Vec<u8>, serde_json::Map<String, serde_json::Value>) {
        let data: Vec<u8> = (0..20 * META_CHUNK_SIZE + 1000)
            .map(|i| (i / 7 % 251) as u8)
            .collect();
        let blob = hoist_codec::encode_blob(&data, META_CHUNK_SIZE, Compressor::Zstd).unwrap();
        let chunks = data.len().div_ceil(META_CHUNK_SIZE);
        let table = hoist_codec::table_digest(&blob, chunks).unwrap();
        let annotations = serde_json::json!({
            media::ANNOTATION_CHUNKS: chunks.to_string(),
            media::ANNOTATION_UNCOMPRESSED_SIZE: data.len().to_string(),
            media::ANNOTATION_META_TABLE: format!("blake3:{}", hex::encode(table)),
        });
        (data, blob, annotations.as_object().unwrap().clone())
    }

    fn open(
        blob: &[u8],
        annotations: &serde_json::Map<String, serde_json::Value>,
        flip: Option<usize>,
        cache: Option<Arc<dyn MetaChunkCache>>,
    ) -> (Arc<Mem>, Result<Option<ChunkedMeta>, ReadError>) {
        let src = Arc::new(Mem {
            blob: blob.to_vec(),
            reads: AtomicU64::new(0),
            flip,
            latency: Duration::ZERO,
        });
        let digest = Digest::of(blob);
        let meta = ChunkedMeta::open(src.clone(), &digest, blob.len() as u64, annotations, cache);
        (src, meta)
    }

    #[test]
    fn a_read_fetches_the_chunks_it_needs_and_a_few_after_them() {
        let (data, blob, ann) = sample();
        let (src, meta) = open(&blob, &ann, None, None);
        let meta = meta.unwrap().unwrap();
        assert_eq!(src.reads.load(Relaxed), 1, "the chunk table");
        let mut buf = vec![0u8; 100];
        let at = 10 * META_CHUNK_SIZE as u64 + 5;
        meta.read_exact_at(&mut buf, at).unwrap();
        assert_eq!(buf, data[at as usize..at as usize + 100]);
        assert_eq!(src.reads.load(Relaxed), 2, "one ranged read");
        assert_eq!(meta.chunks.lock().unwrap().len(), 1 + READAHEAD_CHUNKS);
        // Those are kept: reading them again sends nothing.
        let next = 12 * META_CHUNK_SIZE as u64;
        meta.read_exact_at(&mut buf, next).unwrap();
        assert_eq!(buf, data[next as usize..next as usize + 100]);
        assert_eq!(src.reads.load(Relaxed), 2);
        assert_eq!(meta.read_all().unwrap(), data);
        let mut past = [0u8; 2];
        assert!(meta
            .read_exact_at(&mut past, data.len() as u64 - 1)
            .is_err());
    }

    #[test]
    fn a_damaged_chunk_is_never_served_and_a_table_not_pinned_is_refused() {
        let (data, blob, ann) = sample();
        // A byte in the middle of chunk 3's stored bytes.
        let (_, clean) = open(&blob, &ann, None, None);
        let e = clean.unwrap().unwrap().table.entries[3];
        let flip = (e.compressed_offset + u64::from(e.compressed_size) / 2) as usize;
        let (_, meta) = open(&blob, &ann, Some(flip), None);
        let meta = meta.unwrap().unwrap();
        let bad = 3;
        let mut buf = vec![0u8; 10];
        let err = meta
            .read_exact_at(&mut buf, (bad * META_CHUNK_SIZE) as u64)
            .unwrap_err();
        assert!(err.to_string().contains("chunk 3:"), "{err}");
        assert!(meta.loaded(bad).is_none());
        let good = 15;
        meta.read_exact_at(&mut buf, (good * META_CHUNK_SIZE) as u64)
            .unwrap();
        assert_eq!(
            buf,
            data[good * META_CHUNK_SIZE..good * META_CHUNK_SIZE + 10]
        );

        // The table itself damaged: its digest no longer matches the manifest's.
        let (_, meta) = open(&blob, &ann, Some(blob.len() - 100), None);
        let err = meta.err().unwrap().to_string();
        assert!(
            err.contains("does not match the digest its manifest pins"),
            "{err}"
        );
        // No pinned table (images before version 3): not read on demand.
        let (_, meta) = open(&blob, &serde_json::Map::new(), None, None);
        assert!(meta.unwrap().is_none());
    }

    #[test]
    fn chunks_read_before_come_from_the_cache() {
        let (data, blob, ann) = sample();
        let cache: Arc<dyn MetaChunkCache> = Arc::new(MemCache::default());
        let (_, first) = open(&blob, &ann, None, Some(cache.clone()));
        assert_eq!(first.unwrap().unwrap().read_all().unwrap(), data);
        let (src, again) = open(&blob, &ann, None, Some(cache));
        assert_eq!(again.unwrap().unwrap().read_all().unwrap(), data);
        assert_eq!(src.reads.load(Relaxed), 0, "the table is cached too");
    }

    #[test]
    fn a_recorded_read_is_prefetched_in_few_requests_and_then_read_locally() {
        let (data, blob, ann) = sample();
        let (_, meta) = open(&blob, &ann, None, None);
        let meta = meta.unwrap().unwrap();
        meta.start_recording();
        let mut buf = vec![0u8; 10];
        for i in [9, 2, 9, 17] {
            meta.read_exact_at(&mut buf, (i * META_CHUNK_SIZE) as u64)
                .unwrap();
        }
        let trace = meta.recorded();
        assert_eq!(trace, vec![9, 2, 17], "first reads, in order");

        // A new mount: the trace's chunks come in one request per range, 2 with its
        // neighbour 3 (one chunk between), and 30 (past the end) is ignored.
        let (src, meta) = open(&blob, &ann, None, None);
        let meta = meta.unwrap().unwrap();
        assert_eq!(meta.prefetch(&[9, 2, 4, 17, 30]).unwrap(), 1 + 3 + 1);
        assert_eq!(
            src.reads.load(Relaxed),
            1 + 3,
            "the table, then three ranges"
        );
        for i in [2, 3, 4, 9, 17] {
            let at = i * META_CHUNK_SIZE;
            meta.read_exact_at(&mut buf, at as u64).unwrap();
            assert_eq!(buf, data[at..at + 10]);
        }
        assert_eq!(src.reads.load(Relaxed), 4, "read from memory");
        assert_eq!(meta.prefetch(&[2, 9]).unwrap(), 0, "nothing missing");
    }

    #[test]
    fn concurrent_reads_fetch_each_chunk_once() {
        let (data, blob, ann) = sample();
        let src = Arc::new(Mem {
            blob: blob.clone(),
            reads: AtomicU64::new(0),
            flip: None,
            latency: Duration::from_millis(20),
        });
        let meta = ChunkedMeta::open(
            src.clone(),
            &Digest::of(&blob),
            blob.len() as u64,
            &ann,
            None,
        )
        .unwrap()
        .unwrap();
        let table = meta.fetched().0;
        // Eight readers through the whole metadata at once, each from its own start, and
        // a prefetch of all of it beside them.
        let all: Vec<usize> = (0..meta.table.entries.len()).collect();
        std::thread::scope(|scope| {
            scope.spawn(|| meta.prefetch(&all).unwrap());
            for r in 0..8 {
                let (meta, data) = (&meta, &data);
                scope.spawn(move || {
                    let mut buf = vec![0u8; 4096];
                    for k in 0..data.len() / 4096 {
                        let at = ((k + r * 37) % (data.len() / 4096)) * 4096;
                        meta.read_exact_at(&mut buf, at as u64).unwrap();
                        assert_eq!(buf, data[at..at + 4096]);
                    }
                });
            }
        });
        let stored: u64 = meta
            .table
            .entries
            .iter()
            .map(|e| u64::from(e.compressed_size))
            .sum();
        assert_eq!(meta.fetched().0 - table, stored, "every chunk fetched once");
    }

    #[test]
    fn a_local_copy_is_taken_only_if_every_chunk_matches() {
        let (data, blob, ann) = sample();
        let (src, meta) = open(&blob, &ann, None, None);
        let meta = meta.unwrap().unwrap();
        assert!(!meta.complete());
        // One byte off in the last chunk, or one byte short: refused, nothing kept.
        let mut damaged = data.clone();
        *damaged.last_mut().unwrap() ^= 1;
        assert!(!meta.adopt(&damaged));
        assert!(!meta.adopt(&data[..data.len() - 1]));
        assert!(meta.loaded(0).is_none());
        assert!(meta.adopt(&data));
        assert!(meta.complete());
        assert_eq!(meta.read_all().unwrap(), data);
        assert_eq!(
            src.reads.load(Relaxed),
            1,
            "only the chunk table was fetched"
        );
    }
}
