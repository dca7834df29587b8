//! Readahead that follows the access pattern, in a blob's chunk order.
//!
//! A converted blob holds the chunks of its layer's files in the layer's order, so a
//! reader going through a file, or a tree walker (tar, `cp -a`, an interpreter
//! importing the modules of a package) going through the files of a directory, reads
//! chunks of a blob in increasing order, with small gaps (files it skips, chunks cached
//! already). The kernel's readahead does the same for one file's pages; this does it
//! for the blob, which spans files, and across the network, where a round trip costs
//! far more than a disk seek.
//!
//! [`Streams`] tracks a few streams per fetcher. An access continues a stream when it
//! lands after the stream's last one with at most [`SKIP`] used chunks between them;
//! anything else starts a new stream (the least recently used one is replaced). The
//! rule is strict on purpose: a tar reads every chunk of a region, an interpreter
//! importing modules reads one file here and one there, and fetching ahead of the
//! second one would fetch the files it never imports (measured: python's start-up
//! fetched 48% more with a rule that let a reader skip 256 KiB). A new stream fetches what a miss always
//! fetches ([`crate::FetchConfig::min_fetch`]) and nothing ahead: a lone or random
//! reader pays nothing. Each access that continues a stream doubles its window, up to
//! [`crate::FetchConfig::readahead_max`]; once [`CONFIRM`] accesses have continued it,
//! the stream keeps a window of compressed bytes fetched ahead of the reader, topping
//! it up when the reader is past half of it (the kernel's asynchronous readahead marker), so the next
//! ranges are in flight before they are read. What to fetch is returned as a [`Plan`];
//! the fetcher turns it into jobs below readers' priority.
//!
//! A stream that has only read one large file (chunks of the full chunk size, one after
//! the other) reads ahead no further than that file's end: the first chunk smaller than
//! the chunk size, which is the file's tail or a frame of the small files after it.
//! Until it crosses such a chunk it is a reader of one file, as the kernel's readahead
//! stops at a file's size; once it has, it is a walker, whose window runs on across
//! files. Measured on an image of one layer, where python's 8 MiB `data.bin` lies
//! before /etc and /usr/bin: its reader's window fetched 6.7 MB of programs after it,
//! and python's start-up moved 23.5 MB for the 16.4 MB it needed.
//!
//! Pure logic over the chunk table: no I/O, no threads; the fetcher holds it in a mutex.

use hoist_format::chunk::ChunkEntry;

/// Used chunks an access may skip after a stream's last one and still continue it: a
/// file whose content is stored earlier (deduplicated), or a small file a walker
/// passes over.
pub const SKIP: usize = 2;
/// Accesses that must continue a stream before it fetches ahead: a few files read in
/// order (a package's modules) are not yet a walk.
pub const CONFIRM: u32 = 3;
/// Accesses that must continue a stream of adjacent chunks of the full chunk size (one
/// large file read from chunk to chunk) before it fetches ahead. Two chunks of one
/// file read one after the other are a sequential reader already, and it reads ahead
/// no further than the file's end: EROFS reads a file through its blob device one
/// request at a time, and python's 8 MiB `data.bin` waited a round trip for each of
/// its first three chunks before its stream was confirmed.
pub const CONFIRM_LARGE: u32 = 1;
/// The smallest chunk size for [`CONFIRM_LARGE`]: twice the default frame size, so
/// that frames of small files (which a blob without large files has as its largest
/// chunks, some of them of the same size) are never taken for a large file.
pub const LARGE: u32 = 512 << 10;
/// Streams tracked at once (readers in parallel, each on its own stream).
pub const STREAMS: usize = 16;

#[derive(Debug, Clone, Copy)]
struct Stream {
    blob: usize,
    /// The last chunk accessed.
    last: usize,
    /// Compressed offset up to which the stream has asked for chunks ahead.
    ahead: u64,
    /// Its readahead window, in compressed bytes.
    window: u64,
    /// Accesses that continued it.
    hits: u32,
    /// Whether every chunk it has read is of the full chunk size and follows the one
    /// before (one large file, read in order).
    large: bool,
    /// Whether it has gone past the end of a file (a chunk smaller than the chunk
    /// size): a walker, whose readahead runs across files.
    walker: bool,
    /// When it was last used (a counter), to replace the least recently used.
    used: u64,
}

impl Stream {
    /// Whether it reads ahead of its reader: enough accesses have continued it.
    fn confirmed(&self) -> bool {
        self.hits >= if self.large { CONFIRM_LARGE } else { CONFIRM }
    }
}

/// What an access should fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Plan {
    /// Compressed bytes a demand job for the accessed chunk should take, at least.
    pub demand: u64,
    /// Chunks to fetch ahead: from this compressed offset of the blob up to the second
    /// (exclusive), when the stream's window needs topping up.
    pub ahead: Option<(u64, u64)>,
    /// Whether the access continues a confirmed stream (one that reads ahead of its
    /// reader): what the reader reads next is fetched already, so its chunks need not
    /// say.
    pub confirmed: bool,
}

/// The streams of one fetcher.
#[derive(Debug)]
pub struct Streams {
    streams: Vec<Stream>,
    clock: u64,
    min_fetch: u64,
    max_window: u64,
    /// The full chunk size of each blob seen (its largest chunk), by blob.
    full: Vec<Option<u32>>,
}

impl Streams {
    /// Streams whose new ones fetch `min_fetch` bytes and whose windows grow to
    /// `max_window`.
    pub fn new(min_fetch: u64, max_window: u64) -> Self {
        Streams {
            streams: Vec::new(),
            clock: 0,
            min_fetch,
            max_window: max_window.max(min_fetch),
            full: Vec::new(),
        }
    }

    /// Whether a walker (a confirmed stream that has gone past the end of a file)
    /// reads blob `blob`: a tree walk, whose stream fetches what it reads next.
    pub fn walked(&self, blob: usize) -> bool {
        self.streams
            .iter()
            .any(|s| s.blob == blob && s.walker && s.confirmed())
    }

    /// The full chunk size of blob `blob` (its largest chunk), found once.
    fn full_size(&mut self, blob: usize, entries: &[ChunkEntry]) -> u32 {
        let largest = || {
            entries
                .iter()
                .map(|e| e.uncompressed_size)
                .max()
                .unwrap_or(0)
        };
        // Blob indexes are few (an image's layers); a stray large one is not kept.
        if blob >= 1 << 16 {
            return largest();
        }
        if self.full.len() <= blob {
            self.full.resize(blob + 1, None);
        }
        *self.full[blob].get_or_insert_with(largest)
    }

    /// Notes an access to chunk `index` of blob `blob`, whose chunk table is
    /// `entries` and whose used chunks are those for which `used` holds, and says what
    /// to fetch for it.
    pub fn access(
        &mut self,
        blob: usize,
        index: usize,
        entries: &[ChunkEntry],
        used: &dyn Fn(usize) -> bool,
    ) -> Plan {
        let Some(e) = entries.get(index) else {
            return Plan::default();
        };
        self.clock += 1;
        let clock = self.clock;
        let full = self.full_size(blob, entries);
        // A chunk smaller than the chunk size ends a file (its tail), or holds small
        // files (a frame).
        let ends_file = |i: usize| entries.get(i).is_some_and(|e| e.uncompressed_size < full);
        let at = e.compressed_offset;
        let end_of = |i: usize| {
            entries
                .get(i)
                .map_or(0, |e| e.compressed_offset + u64::from(e.compressed_size))
        };
        // At most SKIP used chunks between the stream's last access and this one.
        let follows = |last: usize| {
            index > last
                // A long run of unused chunks (files an upper layer removed) is not
                // scanned: the walk, if it is one, starts again after it.
                && index - last <= 256
                && (last + 1..index)
                    .filter(|&k| used(k))
                    .take(SKIP + 1)
                    .count()
                    <= SKIP
        };
        let found = self
            .streams
            .iter_mut()
            .find(|s| s.blob == blob && (index == s.last || follows(s.last)));
        let Some(s) = found else {
            let s = Stream {
                blob,
                last: index,
                ahead: end_of(index),
                window: self.min_fetch,
                hits: 0,
                large: full >= LARGE && e.uncompressed_size == full,
                walker: false,
                used: clock,
            };
            if self.streams.len() < STREAMS {
                self.streams.push(s);
            } else if let Some(lru) = self.streams.iter_mut().min_by_key(|s| s.used) {
                *lru = s;
            }
            return Plan {
                demand: self.min_fetch,
                ahead: None,
                confirmed: false,
            };
        };
        s.used = clock;
        if index == s.last {
            // Another read within the same chunk: nothing new is learned.
            return Plan {
                demand: s.window.min(self.max_window),
                ahead: None,
                confirmed: s.confirmed(),
            };
        }
        if (s.last..index).any(ends_file) {
            s.walker = true;
        }
        s.large &= index == s.last + 1 && e.uncompressed_size == full;
        s.last = index;
        s.hits += 1;
        s.window = (s.window * 2).min(self.max_window);
        let confirmed = s.confirmed();
        let mut plan = Plan {
            demand: s.window,
            ahead: None,
            confirmed,
        };
        // Top the window up once the reader is past half of what was asked ahead.
        let end = end_of(index);
        if s.ahead < end {
            s.ahead = end;
        }
        // A window of less than three of the chunks read would not reach past the
        // next one: a reader of a file of 1 MiB chunks (EROFS through a blob device,
        // one request at a time) got nothing ahead until its window had grown to 4 MiB.
        let window = s.window.max(3 * u64::from(e.compressed_size));
        if confirmed && s.ahead < at + window / 2 {
            let mut to = at + window;
            if !s.walker {
                // No further than the end of the file being read.
                let tail = (index..entries.len())
                    .take_while(|&k| entries[k].compressed_offset < to)
                    .find(|&k| ends_file(k));
                if let Some(k) = tail {
                    to = to.min(end_of(k));
                }
            }
            if to > s.ahead {
                plan.ahead = Some((s.ahead, to));
                s.ahead = to;
            }
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` chunks of `size` compressed bytes each, back to back.
    fn table(n: usize, size: u32) -> Vec<ChunkEntry> {
        (0..n)
            .map(|i| ChunkEntry {
                compressed_offset: i as u64 * u64::from(size),
                compressed_size: size,
                uncompressed_offset: i as u64 * u64::from(size),
                uncompressed_size: size,
                compressor: hoist_format::chunk::Compressor::None,
                digest: [i as u8; 32],
            })
            .collect()
    }

    /// Chunks of these uncompressed sizes, each compressed to half, back to back.
    fn sized(sizes: &[u32]) -> Vec<ChunkEntry> {
        let (mut u, mut c) = (0, 0);
        sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                let e = ChunkEntry {
                    compressed_offset: c,
                    compressed_size: size / 2,
                    uncompressed_offset: u,
                    uncompressed_size: size,
                    compressor: hoist_format::chunk::Compressor::Zstd,
                    digest: [i as u8; 32],
                };
                (u, c) = (u + u64::from(size), c + u64::from(size / 2));
                e
            })
            .collect()
    }

    #[test]
    fn a_reader_of_one_large_file_reads_ahead_no_further_than_its_end() {
        // A file of twelve 1 MiB chunks and a tail, then frames of small files, then
        // another large file.
        let mut sizes = vec![1 << 20; 12];
        sizes.push(300 << 10);
        sizes.extend([256 << 10; 40]);
        sizes.extend([1 << 20; 12]);
        let t = sized(&sizes);
        let end = |i: usize| t[i].compressed_offset + u64::from(t[i].compressed_size);
        let mut s = Streams::new(64 << 10, 8 << 20);
        let mut furthest = 0;
        for i in 0..=12 {
            if let Some((_, to)) = s.access(0, i, &t, &|_| true).ahead {
                furthest = furthest.max(to);
            }
        }
        // It was read ahead (the window reached the tail) and not past the tail.
        assert_eq!(furthest, end(12));
        // Once the reader goes on into the small files, it is a walker: its window
        // runs on across them and into the next large file.
        for i in 13..=20 {
            if let Some((_, to)) = s.access(0, i, &t, &|_| true).ahead {
                furthest = furthest.max(to);
            }
        }
        assert!(furthest > end(53), "{furthest} <= {}", end(53));
        // A file of full chunks only (no tail) is bounded by the first small chunk
        // after it.
        let mut sizes = vec![1 << 20; 8];
        sizes.extend([256 << 10; 40]);
        let t = sized(&sizes);
        let mut s = Streams::new(64 << 10, 8 << 20);
        let furthest = (0..8)
            .filter_map(|i| s.access(0, i, &t, &|_| true).ahead)
            .map(|(_, to)| to)
            .max();
        assert_eq!(
            furthest,
            Some(t[8].compressed_offset + u64::from(t[8].compressed_size))
        );
    }

    #[test]
    fn a_blob_is_walked_once_a_confirmed_stream_goes_past_files() {
        let mut sizes = vec![1 << 20; 4];
        sizes.extend([64 << 10; 40]);
        let t = sized(&sizes);
        let mut s = Streams::new(64 << 10, 8 << 20);
        // One large file read through: no walk.
        for i in 0..4 {
            s.access(0, i, &t, &|_| true);
        }
        assert!(!s.walked(0));
        // On into the small files: a walk, of this blob only.
        for i in 4..8 {
            s.access(0, i, &t, &|_| true);
        }
        assert!(s.walked(0));
        assert!(!s.walked(1));
        // Scattered reads of small files are none.
        let mut s = Streams::new(64 << 10, 8 << 20);
        for i in [10, 30, 5, 20, 40] {
            s.access(0, i, &t, &|_| true);
        }
        assert!(!s.walked(0));
    }

    #[test]
    fn a_lone_access_fetches_the_minimum_and_nothing_ahead() {
        let t = table(1000, 16 << 10);
        let mut s = Streams::new(64 << 10, 8 << 20);
        let p = s.access(0, 500, &t, &|_| true);
        assert_eq!(
            p,
            Plan {
                demand: 64 << 10,
                ahead: None,
                confirmed: false
            }
        );
        // Random accesses far apart never start fetching ahead.
        for i in [10, 900, 200, 700, 50] {
            assert_eq!(s.access(0, i, &t, &|_| true).ahead, None, "access {i}");
        }
    }

    #[test]
    fn a_sequential_reader_gets_a_window_that_doubles_and_stays_ahead() {
        let t = table(10_000, 16 << 10);
        let mut s = Streams::new(64 << 10, 4 << 20);
        s.access(0, 0, &t, &|_| true);
        let mut windows = Vec::new();
        let mut asked_to = 0;
        for i in 1..2000 {
            let p = s.access(0, i, &t, &|_| true);
            windows.push(p.demand);
            if let Some((from, to)) = p.ahead {
                // Each top-up continues where the last one stopped: nothing twice.
                assert!(
                    from >= asked_to,
                    "chunk {i}: asked {from}..{to} after {asked_to}"
                );
                asked_to = to;
            }
            let at = t[i].compressed_offset;
            // Once ramped up, the reader always has fetches under way ahead of it.
            if i > 20 {
                assert!(
                    asked_to > at + (16 << 10),
                    "chunk {i}: only {asked_to} asked at {at}"
                );
            }
        }
        assert_eq!(&windows[..4], &[128 << 10, 256 << 10, 512 << 10, 1 << 20]);
        assert_eq!(*windows.last().unwrap(), 4 << 20, "capped at the maximum");
    }

    #[test]
    fn a_reader_of_large_chunks_gets_the_next_ones_from_its_second_chunk() {
        let t = table(64, 1 << 20);
        let mut s = Streams::new(64 << 10, 8 << 20);
        let first = s.access(0, 0, &t, &|_| true);
        assert_eq!(
            first.ahead, None,
            "one chunk is not yet a sequential reader"
        );
        // The second adjacent chunk: the next two are asked for, and a reader going on
        // through the file always has the next chunk asked for before it reads it.
        let mut asked_to = 0;
        for i in 1..32 {
            let p = s.access(0, i, &t, &|_| true);
            assert!(p.confirmed, "chunk {i}");
            if let Some((from, to)) = p.ahead {
                assert!(from >= asked_to, "chunk {i}: {from}..{to} after {asked_to}");
                asked_to = to;
            }
            let next = (i as u64 + 2) << 20;
            assert!(asked_to >= next, "chunk {i}: only {asked_to} asked");
        }
        // Large chunks read with a gap between them (a file read here and there), a
        // file's chunk after a small one, or frames of small files as large as the
        // largest chunk of a blob that has no large file, wait for CONFIRM accesses as
        // any stream.
        let mut sizes = vec![1 << 20; 8];
        sizes.push(4 << 10);
        sizes.extend([1 << 20; 8]);
        let t = sized(&sizes);
        let frames = table(64, 256 << 10);
        for (t, reads) in [
            (&t, [0, 2, 4, 6]),
            (&t, [8, 9, 10, 11]),
            (&frames, [0, 1, 2, 3]),
        ] {
            let mut s = Streams::new(64 << 10, 8 << 20);
            let plans: Vec<Plan> = reads
                .iter()
                .map(|&i| s.access(0, i, t, &|_| true))
                .collect();
            assert!(
                plans[..CONFIRM as usize].iter().all(|p| p.ahead.is_none()),
                "{reads:?}: {plans:?}"
            );
            assert!(
                plans[CONFIRM as usize].ahead.is_some(),
                "{reads:?}: {plans:?}"
            );
        }
    }

    #[test]
    fn a_walker_that_skips_a_few_files_is_still_a_stream() {
        let t = table(1000, 4 << 10);
        let mut s = Streams::new(64 << 10, 8 << 20);
        s.access(2, 0, &t, &|_| true);
        // Every third chunk: two skipped each time.
        let ahead: Vec<_> = (1..20)
            .map(|k| s.access(2, k * 3, &t, &|_| true).ahead)
            .collect();
        assert!(
            ahead.iter().any(|a| a.is_some()),
            "never fetched ahead: {ahead:?}"
        );
    }

    #[test]
    fn a_reader_picking_one_file_in_four_never_fetches_ahead() {
        // An interpreter importing some modules of a directory, in order.
        let t = table(1000, 4 << 10);
        let mut s = Streams::new(64 << 10, 8 << 20);
        for k in 0..100 {
            let p = s.access(0, k * 4, &t, &|_| true);
            assert_eq!(
                p,
                Plan {
                    demand: 64 << 10,
                    ahead: None,
                    confirmed: false
                },
                "access {k}"
            );
        }
    }

    #[test]
    fn unused_chunks_between_two_reads_do_not_break_a_stream() {
        let t = table(1000, 4 << 10);
        let mut s = Streams::new(64 << 10, 8 << 20);
        // Chunks 1..=99 belong to files an upper layer removed.
        let used = |k: usize| k == 0 || k >= 100;
        s.access(0, 0, &t, &used);
        let ahead: Vec<bool> = [100, 101, 102]
            .iter()
            .map(|&k| s.access(0, k, &t, &used).ahead.is_some())
            .collect();
        assert_eq!(ahead, [false, false, true]);
    }

    #[test]
    fn a_few_files_read_in_order_are_not_yet_a_walk() {
        // A package's modules (small chunks in a blob that has large files too):
        // CONFIRM accesses in order fetch nothing ahead.
        let mut sizes = vec![1 << 20];
        sizes.extend([8 << 10; 1000]);
        let t = sized(&sizes);
        let mut s = Streams::new(64 << 10, 8 << 20);
        let plans: Vec<Plan> = (0..=CONFIRM as usize)
            .map(|k| s.access(0, 10 + k, &t, &|_| true))
            .collect();
        assert!(
            plans[..CONFIRM as usize].iter().all(|p| p.ahead.is_none()),
            "{plans:?}"
        );
        assert!(plans[CONFIRM as usize].ahead.is_some(), "{plans:?}");
    }

    #[test]
    fn re_reading_a_chunk_neither_grows_nor_fetches() {
        let t = table(100, 1 << 20);
        let mut s = Streams::new(64 << 10, 8 << 20);
        s.access(0, 3, &t, &|_| true);
        let p = s.access(0, 3, &t, &|_| true);
        assert_eq!(
            p,
            Plan {
                demand: 64 << 10,
                ahead: None,
                confirmed: false
            }
        );
    }

    #[test]
    fn parallel_readers_keep_their_own_streams() {
        let t = table(100_000, 16 << 10);
        let mut s = Streams::new(64 << 10, 8 << 20);
        // Two readers interleaved, far apart in one blob, and one in another blob.
        let (mut a, mut b, mut c) = (0, 50_000, 0);
        let mut ahead = [false; 3];
        for _ in 0..50 {
            ahead[0] |= s.access(0, a, &t, &|_| true).ahead.is_some();
            ahead[1] |= s.access(0, b, &t, &|_| true).ahead.is_some();
            ahead[2] |= s.access(1, c, &t, &|_| true).ahead.is_some();
            (a, b, c) = (a + 1, b + 1, c + 1);
        }
        assert_eq!(ahead, [true; 3]);
    }

    #[test]
    fn the_least_recently_used_stream_gives_way() {
        let t = table(1_000_000, 16 << 10);
        let mut s = Streams::new(64 << 10, 8 << 20);
        s.access(0, 0, &t, &|_| true);
        s.access(0, 1, &t, &|_| true);
        // STREAMS other streams push the first one out.
        for k in 0..STREAMS {
            s.access(0, 10_000 * (k + 1), &t, &|_| true);
        }
        assert_eq!(s.streams.len(), STREAMS);
        assert_eq!(
            s.access(0, 2, &t, &|_| true),
            Plan {
                demand: 64 << 10,
                ahead: None,
                confirmed: false
            }
        );
    }

    #[test]
    fn accesses_past_the_table_are_ignored() {
        let t = table(3, 16 << 10);
        let mut s = Streams::new(64 << 10, 8 << 20);
        assert_eq!(s.access(0, 3, &t, &|_| true), Plan::default());
        assert_eq!(s.access(0, usize::MAX, &t, &|_| true), Plan::default());
    }
}
