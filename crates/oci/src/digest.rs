//! sha256 content digests and a reader that verifies them.

use crate::OciError;
use sha2::{Digest as _, Sha256};
use std::fmt;
use std::io::{self, Read};

/// A validated `sha256:<64 hex>` digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// Parses and validates a digest string.
    pub fn parse(s: &str) -> Result<Self, OciError> {
        let hex = s.strip_prefix("sha256:").ok_or_else(|| {
            OciError::Invalid(format!("digest {s:?}: only sha256 digests are supported"))
        })?;
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(OciError::Invalid(format!(
                "digest {s:?} is not 64 lower-case hex digits"
            )));
        }
        Ok(Digest(s.to_string()))
    }
    /// The digest of raw sha256 bytes.
    pub fn from_sha256(bytes: [u8; 32]) -> Self {
        Digest(format!("sha256:{}", hex::encode(bytes)))
    }
    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self::from_sha256(Sha256::digest(data).into())
    }
    /// The hex part.
    pub fn hex(&self) -> &str {
        &self.0[7..]
    }
    /// The raw 32 bytes.
    pub fn bytes(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        hex::decode_to_slice(self.hex(), &mut out).expect("validated at construction");
        out
    }
    /// The full string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Passes bytes through and fails at the end of the stream if they do not hash to the
/// expected digest or do not have the expected size (also fails early on excess bytes).
pub struct VerifyingReader<R> {
    inner: R,
    hasher: Sha256,
    expected: Digest,
    size: u64,
    read: u64,
    done: bool,
}

impl<R: Read> VerifyingReader<R> {
    /// Wraps `inner`, expecting `size` bytes hashing to `expected`.
    pub fn new(inner: R, expected: Digest, size: u64) -> Self {
        VerifyingReader {
            inner,
            hasher: Sha256::new(),
            expected,
            size,
            read: 0,
            done: false,
        }
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "blob {} is longer than its descriptor's {} bytes",
                    self.expected, self.size
                ),
            ));
        }
        self.hasher.update(&buf[..n]);
        if n == 0 && !buf.is_empty() {
            self.done = true;
            if self.read != self.size {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "blob {} ended after {} of {} bytes",
                        self.expected, self.read, self.size
                    ),
                ));
            }
            let got = Digest::from_sha256(std::mem::take(&mut self.hasher).finalize().into());
            if got != self.expected {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "blob {} does not match its digest (its bytes hash to {got})",
                        self.expected
                    ),
                ));
            }
        }
        Ok(n)
    }
}

/// Passes bytes through and hashes them: the digest of an uncompressed layer stream (its
/// `diff_id`), which has no size or digest to check against until it has been read.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R> HashingReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
        }
    }

    /// The digest of the bytes read so far.
    pub fn digest(&self) -> Digest {
        Digest::from_sha256(self.hasher.clone().finalize().into())
    }

    /// The wrapped reader.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_malformed_digests() {
        for bad in [
            "",
            "sha256:",
            "sha512:00",
            "sha256:XYZ",
            &format!("sha256:{}", "A".repeat(64)),
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad}");
        }
        let ok = Digest::of(b"x");
        assert_eq!(Digest::parse(ok.as_str()).unwrap(), ok);
        assert_eq!(Digest::from_sha256(ok.bytes()), ok);
    }

    #[test]
    fn verifying_reader_catches_wrong_bytes_and_sizes() {
        let data = b"hello world".to_vec();
        let d = Digest::of(&data);
        let mut out = Vec::new();
        VerifyingReader::new(&data[..], d.clone(), 11)
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, data);
        let bad = b"hello worle".to_vec();
        assert!(VerifyingReader::new(&bad[..], d.clone(), 11)
            .read_to_end(&mut Vec::new())
            .is_err());
        assert!(VerifyingReader::new(&data[..5], d.clone(), 11)
            .read_to_end(&mut Vec::new())
            .is_err());
        assert!(VerifyingReader::new(&data[..], d, 5)
            .read_to_end(&mut Vec::new())
            .is_err());
    }

    #[test]
    fn hashing_reader_hashes_what_passes() {
        let data = b"hello world".to_vec();
        let mut r = HashingReader::new(&data[..]);
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, data);
        assert_eq!(r.digest(), Digest::of(&data));
    }
}
