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
//! `tmp/`, flushed to disk (`fsync`) and only then renamed into place: unlike a chunk
//! file, a named view never has lost contents after a crash, so it is trusted without
//! hashing it again (hashing a whole blob at every mount would cost more than it saves).
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

    /// Opens a view if it is built.
    pub fn open_view(&self, view: &View) -> io::Result<Option<File>> {
        match File::open(self.view_path(view)) {
            Ok(f) if f.metadata()?.len() == view.len => Ok(Some(f)),
            // A file of another length is not this view (its name is a hash of the
            // layout, so only tampering gets here): build it again.
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Builds a view from its cached chunks (each verified as it is opened), unless it
    /// is built already. Fails with [`ViewError::Missing`] when a chunk is not cached,
    /// and with [`ViewError::Stopped`] as soon as `stop` says so (checked between
    /// chunks: a blob's view can take seconds).
    pub fn build_view(&self, view: &View, stop: &dyn Fn() -> bool) -> Result<(), ViewError> {
        if !view.is_well_formed() {
            return Err(ViewError::Layout);
        }
        let path = self.view_path(view);
        match File::open(&path) {
            Ok(f) if f.metadata()?.len() == view.len => return Ok(()),
            // Another length: not this view (only tampering gets here); replace it.
            Ok(f) => {
                let old = allocated(&f.metadata()?);
                fs::remove_file(&path)?;
                self.sub_view_bytes(old);
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
        let on_disk = allocated(&tmp.as_file().metadata()?);
        match tmp.persist_noclobber(&path) {
            Ok(_) => self.add_view_bytes(on_disk)?,
            // Built meanwhile by another builder: counted by it.
            Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e.error.into()),
        }
        Ok(())
    }
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
        let a = put(&store, &[1u8; 5000]);
        let b = put(&store, b"tail");
        let view = View {
            len: 1_000_000,
            pieces: vec![
                Piece { offset: 0, ..a },
                Piece {
                    offset: 999_996,
                    ..b
                },
            ],
        };
        store.build_view(&view, &|| false).unwrap();
        let mut f = store.open_view(&view).unwrap().expect("built");
        let mut got = Vec::new();
        io::Read::read_to_end(&mut f, &mut got).unwrap();
        let mut want = vec![1u8; 5000];
        want.resize(999_996, 0);
        want.extend_from_slice(b"tail");
        assert_eq!(got, want);
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
}
