//! Command-line arguments: plain data, parsed by clap.

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// hoist: container images that start lazily.
///
/// Images are named as `oci:DIR[:TAG]` (an OCI image layout, as skopeo and umoci use).
#[derive(Debug, Parser)]
#[command(name = "hoist", version, about, long_about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Chunk compressor.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CompressorArg {
    /// Zstandard (level 3): the best ratio at gzip-decoding speed.
    Zstd,
    /// LZ4: fastest to decode, larger.
    Lz4,
    /// Stored uncompressed.
    None,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Convert an OCI image (gzip, zstd or plain tar layers) into a hoist image.
    ///
    /// Writes one data blob per layer (deduplicated, compressed chunks), a metadata blob
    /// (an EROFS image of the merged tree plus the chunk tables), the original config, and
    /// a manifest tagged in DST. The source config is kept (env, cmd, entrypoint, history);
    /// only its `rootfs.diff_ids` name the new layers. Prints a one-line summary; `--json` prints a report.
    Convert {
        /// Source image, e.g. oci:./images:app-v1.
        src: String,
        /// Destination, e.g. oci:./out:app-v1 (the layout is created if missing).
        dst: String,
        /// Chunk compressor.
        #[arg(long, value_enum, default_value = "zstd")]
        compressor: CompressorArg,
        /// Chunk size in bytes: a power of two from 4096 to 67108864 (suffixes K and M allowed).
        #[arg(long, default_value = "1M", value_parser = parse_size)]
        chunk_size: u64,
        /// A hoist image whose chunks are reused instead of stored again.
        #[arg(long, value_name = "IMAGE")]
        chunk_dict: Option<String>,
        /// Print the conversion report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Materialise the root filesystem of a hoist image in a new or empty directory.
    Unpack {
        /// The hoist image.
        image: String,
        /// Target directory.
        dir: PathBuf,
    },
    /// Verify a hoist image: metadata, every file's chunks, every chunk's digest.
    ///
    /// Exits non-zero and names the first bad chunk, blob and file on corruption.
    Check {
        /// The hoist image.
        image: String,
    },
    /// Show layers, blobs, files, chunks, dedup ratio and sizes of a hoist image.
    Inspect {
        /// The hoist image.
        image: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write the files the kernel needs to mount a hoist image without hoist.
    ///
    /// DIR receives `meta.erofs` (the metadata blob) and `NNN-<digest>.img` per data blob, NNN
    /// being its device number (1-based; pass them as device= in that order), holding its
    /// uncompressed address space, sparse). Prints a mount command using loop devices.
    Export {
        /// The hoist image.
        image: String,
        /// Output directory (new or empty).
        dir: PathBuf,
    },
}

/// Parses `4096`, `64K`, `1M`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 1M, 256K, 4096)"))
}
