//! The hoist on-disk format.
//!
//! A converted image is one **metadata blob** and one **data blob** per converted layer.
//! The metadata blob is a valid EROFS image (see [`erofs`]) whose regular files are
//! chunk-based: each chunk index names a device (a data blob) and a block address in that
//! blob's *uncompressed* address space. After the EROFS image it carries the chunk table
//! of every blob ([`meta`]), so a mount needs nothing but this blob to map any file
//! offset to a compressed byte range of a data blob ([`chunk`]).
//!
//! The main design choice: the tree is plain EROFS, so the Linux kernel can mount the
//! metadata blob itself with one `device=` per data blob, each device presenting that
//! blob's uncompressed address space (`hoist export` writes them; the lazy mount serves
//! them on demand). Chunk compression and verification live in hoist's own tables beside
//! the EROFS image, where the kernel never looks.
//!
//! This crate does no I/O beyond [`ReadAt`], no async, and no `unsafe`. Everything it
//! decodes is treated as untrusted: bounded, checked, never a panic.

pub mod chunk;
pub mod erofs;
pub mod meta;
pub mod tree;

use std::io;

/// Errors of encoding and decoding.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The input to an encoder cannot be represented.
    #[error("cannot encode: {0}")]
    Invalid(String),
    /// The bytes are of a format version this code does not read.
    #[error("unsupported format: {0}")]
    Unsupported(String),
    /// Decoded bytes violate the format.
    #[error("corrupt metadata: {0}")]
    Corrupt(String),
    /// The underlying reader failed.
    #[error("reading {0}: {1}")]
    Io(String, #[source] io::Error),
}

impl FormatError {
    pub(crate) fn invalid(what: impl Into<String>) -> Self {
        FormatError::Invalid(what.into())
    }
}

impl From<io::Error> for FormatError {
    fn from(e: io::Error) -> Self {
        FormatError::Io("image".into(), e)
    }
}

/// Positioned reads: the only I/O this crate needs.
pub trait ReadAt {
    /// Fills `buf` from `offset`, or fails.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Total size in bytes.
    fn size(&self) -> io::Result<u64>;
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
}

impl ReadAt for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.as_slice().read_exact_at(buf, offset)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for &T {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }
}

impl<T: ReadAt + ?Sized> ReadAt for std::sync::Arc<T> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }
}

impl ReadAt for std::fs::File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}
