//! Opening a layer blob as a tar stream: compression detected from its first bytes.

use std::io::{self, BufRead, BufReader, Read};

/// A decompressed layer stream.
pub enum TarStream<R: Read> {
    /// gzip (possibly multi-member).
    Gzip(Box<flate2::bufread::MultiGzDecoder<BufReader<R>>>),
    /// zstd (possibly multi-frame).
    Zstd(zstd::Decoder<'static, BufReader<R>>),
    /// Uncompressed tar.
    Plain(BufReader<R>),
}

impl<R: Read> TarStream<R> {
    /// Detects the compression of `r` and wraps it.
    pub fn open(r: R) -> io::Result<Self> {
        let mut br = BufReader::with_capacity(1 << 20, r);
        let head = br.fill_buf()?;
        Ok(if head.starts_with(&[0x1f, 0x8b]) {
            TarStream::Gzip(Box::new(flate2::bufread::MultiGzDecoder::new(br)))
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            TarStream::Zstd(zstd::Decoder::with_buffer(br)?)
        } else {
            TarStream::Plain(br)
        })
    }

    /// Reads whatever follows the tar archive to the end of the blob, so that the blob's
    /// digest is checked over all of its bytes.
    pub fn drain(mut self) -> io::Result<()> {
        io::copy(&mut self, &mut io::sink())?;
        let mut inner = match self {
            TarStream::Gzip(d) => d.into_inner(),
            TarStream::Zstd(d) => d.finish(),
            TarStream::Plain(r) => r,
        };
        io::copy(&mut inner, &mut io::sink())?;
        Ok(())
    }
}

impl<R: Read> Read for TarStream<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            TarStream::Gzip(d) => d.read(buf),
            TarStream::Zstd(d) => d.read(buf),
            TarStream::Plain(r) => r.read(buf),
        }
    }
}

/// Counts bytes read and reports them.
pub struct Counting<'a, R> {
    /// The wrapped reader.
    pub inner: R,
    /// Called with each read's byte count.
    pub report: &'a (dyn Fn(u64) + Sync),
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        (self.report)(n as u64);
        Ok(n)
    }
}
