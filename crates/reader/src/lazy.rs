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
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// Chunks fetched after the ones a read needs, when they are missing too.
pub const READAHEAD_CHUNKS: usize = 4;
/// The most chunks a stream of sequential misses fetches ahead (4 MiB of metadata).
pub const MAX_READAHEAD_CHUNKS: usize = 64;
/// Streams of sequential misses followed at once.
const STREAMS: usize = 4;

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
            // The table need not list compressed ranges in order (it is untrusted).
            let stored = e
                .compressed_offset
                .checked_sub(start)
                .map(|at| at as usize)
                .and_then(|at| bytes.get(at..at + e.compressed_size as usize))
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
        if let Some(d) = self.local(i) {
            return Ok(d);
        }
        let window = self.window(i);
        let limit = (until + window).min(self.table.entries.len());
        let mut last = i + 1;
        while last < limit && self.local(last).is_none() {
            last += 1;
        }
        self.fetch(i, last)?;
        self.ended(i, last, window);
        self.loaded(i)
            .ok_or_else(|| io::Error::other("metadata chunk lost after its fetch"))
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
