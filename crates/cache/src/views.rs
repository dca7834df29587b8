//! Views: cached chunks copied into one local file, laid out as a file of the image or
//! as a blob's uncompressed address space, so that the kernel reads them without hoist.
//!
//! FUSE passthrough hands the kernel one backing file per open file, and the kernel's
//! EROFS reads a device file per blob; the store's one-file-per-chunk layout gives
//! neither for data larger than a chunk. A view is that file, built from verified chunk
//! files once all of them are cached:
//!
//! ```text
//! views/<key>   the pieces at their offsets, holes elsewhere (sparse, reads as zeros)
//! ```
//!
//! The key is the BLAKE3 digest of the view's length and pieces, so the same file in two
//! images is one view, and a view is found again after a restart. A view is written in
//! `tmp/`, flushed to disk (`fsync`) and only then renamed into place.
//!
//! A view found on disk is not trusted: the kernel reads it without hoist (FUSE
//! passthrough, EROFS on a loop device or file), so a damaged one would be served as it
//! is. Each process verifies a view before it first hands it out: every piece is hashed
//! against its chunk's digest and every byte between pieces must read as zero (holes are
//! skipped with `SEEK_DATA`). A view that fails is removed and built again from verified
//! chunks. Views this process built or verified are remembered with their inode, so a
//! file put in the place of one is verified again. This costs a read of the view once
//! per daemon (not per mount or open), in the background: until then the data is served
//! by hoist from verified chunks. (fs-verity would let the kernel check every page
//! instead; it needs a kernel and filesystem built with it, and the machines hoist runs
//! on often have neither.)
//!
//! Views are derived data: they count against the cache size and are evicted first.
//! Evicting one that the kernel holds open is safe (the open file keeps its data).

use crate::store::{ChunkDigest, ChunkStore};
use std::fs::{self, File};
use std::io;
use std::path::PathBuf;

/// One chunk of a view: `size` bytes of chunk `digest` at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Where the chunk's bytes start in the view.
    pub offset: u64,
    /// The chunk.
    pub digest: ChunkDigest,
    /// Its uncompressed size.
    pub size: u32,
}

/// A view's layout: its length and its pieces, by offset, not overlapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// Length of the view.
    pub len: u64,
    /// Its pieces, by offset; the bytes between them are zeros.
    pub pieces: Vec<Piece>,
}

/// What [`ChunkStore::build_view`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Built {
    /// Nothing: this process had verified or built it already.
    Known,
    /// It was on disk, and its contents were verified.
    Verified,
    /// It was built from its chunks.
    Built,
    /// It was on disk but damaged: removed, and built again from its chunks.
    Repaired,
}

/// Why a view cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// A chunk of the view is not in the cache (it is built once all are).
    #[error("chunk {0} of the view is not cached")]
    Missing(String),
    /// The layout is not a view: pieces overlap, are out of order or pass its end.
    #[error("pieces overlap or pass the end of the view")]
    Layout,
    /// The view would not fit in the cache's size limit beside the chunks.
    #[error("a view of {0} bytes does not fit in the cache's size limit")]
    NoRoom(u64),
    /// The build was stopped (the mount is going away).
    #[error("stopped")]
    Stopped,
    /// Reading chunks or writing the view failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl View {
    /// The view's name in the store: BLAKE3 of its length and pieces.
    pub fn key(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(b"hoist view v1\0");
        h.update(&self.len.to_le_bytes());
        for p in &self.pieces {
            h.update(&p.offset.to_le_bytes());
            h.update(&p.digest);
            h.update(&p.size.to_le_bytes());
        }
        h.finalize().to_hex().to_string()
    }

    fn is_well_formed(&self) -> bool {
        let mut end = 0u64;
        for p in &self.pieces {
            match p.offset.checked_add(u64::from(p.size)) {
                Some(e) if p.offset >= end && e <= self.len => end = e,
                _ => return false,
            }
        }
        true
    }
}

impl ChunkStore {
    /// Path of a view's file.
    pub fn view_path(&self, view: &View) -> PathBuf {
        self.root().join("views").join(view.key())
    }

    /// Opens a view if it is built and this process has built or verified it. A view
    /// on disk that is not verified yet gives None: [`ChunkStore::build_view`] verifies
    /// it (or builds it again).
    pub fn open_view(&self, view: &View) -> io::Result<Option<File>> {
        let f = match File::open(self.view_path(view)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let md = f.metadata()?;
        Ok((md.len() == view.len && self.is_verified_view(&view.key(), &md)).then_some(f))
    }

    /// Whether a view's file is on disk, verified or not.
    pub fn has_view_file(&self, view: &View) -> bool {
        fs::metadata(self.view_path(view)).is_ok_and(|m| m.len() == view.len)
    }

    /// Makes sure a verified view is built: one this process built or verified is kept;
    /// one on disk is verified, and removed and built again from its cached chunks
    /// (each verified as it is opened) if it is damaged; a missing one is built. Fails
    /// with [`ViewError::Missing`] when a chunk is not cached, and with
    /// [`ViewError::Stopped`] as soon as `stop` says so (checked between chunks: a
    /// blob's view can take seconds).
    pub fn build_view(&self, view: &View, stop: &dyn Fn() -> bool) -> Result<Built, ViewError> {
        if !view.is_well_formed() {
            return Err(ViewError::Layout);
        }
        let (path, key) = (self.view_path(view), view.key());
        let mut damaged = false;
        match File::open(&path) {
            Ok(f) => {
                let md = f.metadata()?;
                if md.len() == view.len && self.is_verified_view(&key, &md) {
                    return Ok(Built::Known);
                }
                if md.len() == view.len {
                    match first_difference(&f, view, stop)? {
                        None => {
                            self.note_verified_view(key, &md);
                            return Ok(Built::Verified);
                        }
                        Some(at) => tracing::warn!(
                            "view {} is damaged at byte {at}; building it again from verified chunks",
                            path.display()
                        ),
                    }
                }
                // Another length (only tampering gets here) or damaged: replace it.
                damaged = true;
                fs::remove_file(&path)?;
                self.sub_view_bytes(allocated(&md));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        let bytes: u64 = view.pieces.iter().map(|p| u64::from(p.size)).sum();
        if !self.has_room_for(bytes) {
            return Err(ViewError::NoRoom(bytes));
        }
        let tmp = self.temp_file()?;
        tmp.as_file().set_len(view.len)?;
        for p in &view.pieces {
            if stop() {
                return Err(ViewError::Stopped);
            }
            let chunk = self
                .open_chunk(&p.digest, p.size)?
                .ok_or_else(|| ViewError::Missing(hex::encode(p.digest)))?;
            copy_range(&chunk, tmp.as_file(), p.offset, u64::from(p.size))?;
        }
        tmp.as_file().sync_all()?;
        let md = tmp.as_file().metadata()?;
        match tmp.persist_noclobber(&path) {
            Ok(file) => {
                self.add_view_bytes(allocated(&md))?;
                // After the rename, which changed its ctime.
                self.note_verified_view(key, &file.metadata()?);
            }
            // Built meanwhile by another builder: counted (and verified) by it.
            Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e.error.into()),
        }
        Ok(if damaged {
            Built::Repaired
        } else {
            Built::Built
        })
    }
}

/// Where `f` first differs from what `view` says it holds, or None if it holds exactly
/// that: each piece's bytes hash to the piece's digest, and the rest reads as zeros.
fn first_difference(
    f: &File,
    view: &View,
    stop: &dyn Fn() -> bool,
) -> Result<Option<u64>, ViewError> {
    use std::os::unix::fs::FileExt;
    let mut buf = Vec::new();
    let mut pos = 0u64;
    for p in &view.pieces {
        if stop() {
            return Err(ViewError::Stopped);
        }
        if let Some(at) = nonzero_between(f, pos, p.offset)? {
            return Ok(Some(at));
        }
        buf.resize(p.size as usize, 0);
        f.read_exact_at(&mut buf, p.offset)?;
        if hoist_codec::digest(&buf) != p.digest {
            return Ok(Some(p.offset));
        }
        pos = p.offset + u64::from(p.size);
    }
    Ok(nonzero_between(f, pos, view.len)?)
}

/// The first byte in `from..to` of `f` that is not zero, skipping holes.
fn nonzero_between(f: &File, from: u64, to: u64) -> io::Result<Option<u64>> {
    use rustix::fs::{seek, SeekFrom};
    use std::os::unix::fs::FileExt;
    let mut at = from;
    let mut buf = vec![0u8; 64 * 1024];
    while at < to {
        let data = match seek(f, SeekFrom::Data(i64::try_from(at).unwrap_or(i64::MAX))) {
            Ok(d) => d,
            // No data after `at`: holes to the end.
            Err(rustix::io::Errno::NXIO) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if data >= to {
            return Ok(None);
        }
        let end = seek(f, SeekFrom::Hole(i64::try_from(data).unwrap_or(i64::MAX)))?.min(to);
        let mut pos = data;
        while pos < end {
            let n = usize::try_from(end - pos)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            f.read_exact_at(&mut buf[..n], pos)?;
            if let Some(i) = buf[..n].iter().position(|b| *b != 0) {
                return Ok(Some(pos + i as u64));
            }
            pos += n as u64;
        }
        at = end;
    }
    Ok(None)
}

/// Bytes a file takes on disk (a view is sparse).
pub(crate) fn allocated(md: &fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    md.blocks().saturating_mul(512)
}

/// Copies `len` bytes from the start of `from` to `at` in `to`, inside the kernel.
fn copy_range(from: &File, to: &File, at: u64, len: u64) -> io::Result<()> {
    let (mut off_in, mut off_out) = (0u64, at);
    while off_in < len {
        let want = usize::try_from(len - off_in).unwrap_or(usize::MAX);
        let n = rustix::fs::copy_file_range(from, Some(&mut off_in), to, Some(&mut off_out), want)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "a chunk file is shorter than its chunk",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, ChunkStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), 1 << 30).unwrap();
        (dir, store)
    }

    fn put(store: &ChunkStore, data: &[u8]) -> Piece {
        let digest = hoist_codec::digest(data);
        store.put_chunk(&digest, data).unwrap();
        Piece {
            offset: 0,
            digest,
            size: data.len() as u32,
        }
    }

    #[test]
    fn a_view_holds_its_pieces_at_their_offsets_and_zeros_between() {
        let (_d, store) = store();
        let (view, want) = two_piece_view(&store, 1_000_000);
        store.build_view(&view, &|| false).unwrap();
        assert_eq!(contents(&store, &view), want);
        // Sparse: the zeros take no room, and the store counts what the file takes.
        let on_disk = allocated(&fs::metadata(store.view_path(&view)).unwrap());
        assert!(on_disk < 100_000, "{on_disk} bytes on disk");
        assert_eq!(store.stats().unwrap().view_bytes, on_disk);
        // Built once: a second build finds it.
        store.build_view(&view, &|| false).unwrap();
        assert_eq!(store.stats().unwrap().views, 1);
    }

    #[test]
    fn a_view_is_not_built_while_a_chunk_is_missing() {
        let (_d, store) = store();
        let a = put(&store, b"present");
        let absent = Piece {
            offset: 100,
            digest: [7; 32],
            size: 10,
        };
        let view = View {
            len: 110,
            pieces: vec![a, absent],
        };
        assert!(matches!(
            store.build_view(&view, &|| false),
            Err(ViewError::Missing(_))
        ));
        assert!(store.open_view(&view).unwrap().is_none());
        // Nothing is left behind in tmp/.
        assert_eq!(fs::read_dir(store.root().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn overlapping_or_overlong_layouts_are_refused() {
        let (_d, store) = store();
        let a = put(&store, b"0123456789");
        for pieces in [
            vec![a, Piece { offset: 5, ..a }],
            vec![Piece { offset: 95, ..a }],
        ] {
            let view = View { len: 100, pieces };
            assert!(matches!(
                store.build_view(&view, &|| false),
                Err(ViewError::Layout)
            ));
        }
    }

    #[test]
    fn a_view_that_does_not_fit_is_not_built_and_pushes_no_chunk_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), 10_000).unwrap();
        let a = put(&store, &[5u8; 4096]);
        let view = View {
            len: 8192,
            pieces: vec![a, Piece { offset: 4096, ..a }],
        };
        assert!(matches!(
            store.build_view(&view, &|| false),
            Err(ViewError::NoRoom(8192))
        ));
        assert!(store.contains(&a.digest));
        assert_eq!(store.stats().unwrap().views, 0);
    }

    #[test]
    fn a_stopped_build_leaves_nothing() {
        let (_d, store) = store();
        let a = put(&store, b"data");
        let view = View {
            len: 4,
            pieces: vec![a],
        };
        assert!(matches!(
            store.build_view(&view, &|| true),
            Err(ViewError::Stopped)
        ));
        assert!(store.open_view(&view).unwrap().is_none());
        assert_eq!(fs::read_dir(store.root().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn views_are_evicted_before_chunks_and_counted_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), 1 << 30).unwrap();
        let a = put(&store, &[3u8; 4096]);
        let view = View {
            len: 8192,
            pieces: vec![a, Piece { offset: 4096, ..a }],
        };
        store.build_view(&view, &|| false).unwrap();
        drop(store);
        let store = ChunkStore::open(dir.path(), 1 << 30).unwrap();
        let st = store.stats().unwrap();
        assert_eq!((st.views, st.view_bytes, st.chunks), (1, 8192, 1));
        // Room for the chunk but not the view as well: the view goes, the chunk stays.
        let report = store.evict_to(5000).unwrap();
        assert_eq!((report.removed, report.freed, report.left), (1, 8192, 4096));
        assert!(store.open_view(&view).unwrap().is_none());
        assert!(store.contains(&a.digest));
    }

    /// A view and its expected contents: a piece, a hole, a piece.
    fn two_piece_view(store: &ChunkStore, len: u64) -> (View, Vec<u8>) {
        let a = put(store, &[1u8; 5000]);
        let b = put(store, b"tail");
        let view = View {
            len,
            pieces: vec![
                Piece { offset: 0, ..a },
                Piece {
                    offset: len - 4,
                    ..b
                },
            ],
        };
        let mut want = vec![1u8; 5000];
        want.resize(len as usize - 4, 0);
        want.extend_from_slice(b"tail");
        (view, want)
    }

    fn contents(store: &ChunkStore, view: &View) -> Vec<u8> {
        let mut f = store.open_view(view).unwrap().expect("a verified view");
        let mut got = Vec::new();
        io::Read::read_to_end(&mut f, &mut got).unwrap();
        got
    }

    #[test]
    fn a_view_found_on_disk_is_verified_before_it_is_handed_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), 1 << 30).unwrap();
        let (view, want) = two_piece_view(&store, 300_000);
        assert_eq!(store.build_view(&view, &|| false).unwrap(), Built::Built);
        assert_eq!(store.build_view(&view, &|| false).unwrap(), Built::Known);
        drop(store);
        // Another process (a restarted daemon): found, but not handed out unverified.
        let store = ChunkStore::open(dir.path(), 1 << 30).unwrap();
        assert!(store.has_view_file(&view));
        assert!(store.open_view(&view).unwrap().is_none());
        assert_eq!(store.build_view(&view, &|| false).unwrap(), Built::Verified);
        assert_eq!(contents(&store, &view), want);
    }

    #[test]
    fn a_damaged_view_is_built_again_and_never_handed_out() {
        use std::os::unix::fs::FileExt;
        // A byte flipped in a piece, and a byte written into a hole.
        for at in [4321u64, 150_000] {
            let dir = tempfile::tempdir().unwrap();
            let store = ChunkStore::open(dir.path(), 1 << 30).unwrap();
            let (view, want) = two_piece_view(&store, 300_000);
            store.build_view(&view, &|| false).unwrap();
            drop(store);
            let f = fs::OpenOptions::new()
                .write(true)
                .open(dir.path().join("views").join(view.key()))
                .unwrap();
            f.write_all_at(&[0x5a], at).unwrap();
            drop(f);
            let store = ChunkStore::open(dir.path(), 1 << 30).unwrap();
            assert!(store.open_view(&view).unwrap().is_none(), "byte {at}");
            assert_eq!(
                store.build_view(&view, &|| false).unwrap(),
                Built::Repaired,
                "byte {at}"
            );
            assert_eq!(contents(&store, &view), want, "byte {at}");
            // Still sparse, and counted once.
            assert_eq!(store.stats().unwrap().views, 1);
        }
    }

    #[test]
    fn a_file_put_in_the_place_of_a_verified_view_is_verified_again() {
        let (_d, store) = store();
        let (view, want) = two_piece_view(&store, 300_000);
        store.build_view(&view, &|| false).unwrap();
        let path = store.view_path(&view);
        let mut bad = want.clone();
        bad[10] = 0;
        fs::write(path.with_extension("new"), &bad).unwrap();
        fs::rename(path.with_extension("new"), &path).unwrap();
        assert!(store.open_view(&view).unwrap().is_none());
        assert_eq!(store.build_view(&view, &|| false).unwrap(), Built::Repaired);
        assert_eq!(contents(&store, &view), want);
    }
}
