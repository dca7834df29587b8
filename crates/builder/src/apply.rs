//! Applies tar layers to a [`Tree`] with OCI layer semantics.
//!
//! Entries replace what a lower layer had at the same path (a directory entry over an
//! existing directory only updates its attributes); `.wh.NAME` removes `NAME` of lower
//! layers; `.wh..wh..opq` hides every lower-layer entry of its directory. Entries of the
//! same layer are never hidden by that layer's whiteouts, whatever their order in the tar.
//! Hardlinks name a path already in the merged tree and share its node.
//!
//! Paths are untrusted: absolute paths and `..` components are rejected, and nothing is
//! ever resolved through a symlink.

use crate::{BuildError, ChunkSink};
use hoist_format::erofs::read::MAX_DEPTH;
use hoist_format::tree::{Metadata, Node, NodeId, NodeKind, Tree};
use std::collections::{BTreeMap, HashSet};
use std::io::Read;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

/// Counts of one applied layer.
#[derive(Debug, Clone, Default)]
pub struct ApplyStats {
    /// Tar entries read.
    pub entries: u64,
    /// Bytes of regular file content.
    pub file_bytes: u64,
    /// Whiteouts and opaque markers applied.
    pub whiteouts: u64,
}

/// Applies layers, one after another, to a tree.
pub struct Applier<'a> {
    tree: &'a mut Tree,
    chunk_size: u64,
}

impl<'a> Applier<'a> {
    /// An applier adding to `tree`, splitting files into `chunk_size` chunks.
    pub fn new(tree: &'a mut Tree, chunk_size: u64) -> Self {
        Applier { tree, chunk_size }
    }

    /// Applies one uncompressed tar stream. `layer` names it in errors.
    pub fn apply<R: Read>(
        &mut self,
        tar: R,
        layer: &str,
        sink: &mut dyn ChunkSink,
    ) -> Result<(ApplyStats, R), BuildError> {
        let mut archive = tar::Archive::new(tar);
        let mut stats = ApplyStats::default();
        let mut added: HashSet<(NodeId, Vec<u8>)> = HashSet::new();
        let entries = archive
            .entries()
            .map_err(|e| BuildError::layer(layer, "reading tar", e))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| BuildError::layer(layer, "reading tar entry", e))?;
            stats.entries += 1;
            let raw_path = entry.path_bytes().into_owned();
            let path = String::from_utf8_lossy(&raw_path).into_owned();
            let err = |why: String| BuildError::Entry {
                layer: layer.to_string(),
                path: path.clone(),
                why,
            };
            let parts = split_path(&raw_path).map_err(|w| err(w.to_string()))?;
            let kind = entry.header().entry_type();
            if kind.is_pax_global_extensions() {
                continue;
            }
            check_pax_size(&mut entry).map_err(&err)?;
            // The deepest directory this entry makes: itself, or its parent.
            let depth = parts.len() - usize::from(!kind.is_dir() && !parts.is_empty());
            if depth >= MAX_DEPTH {
                return Err(err(format!(
                    "directories nested {depth} levels deep; hoist reads at most {} (check, \
                     unpack and mount would refuse the image)",
                    MAX_DEPTH - 1
                )));
            }
            let Some((name, parents)) = parts.split_last() else {
                // The root itself: only its attributes can change.
                if !kind.is_dir() {
                    return Err(err("the root must be a directory".into()));
                }
                self.tree.nodes[Tree::ROOT].meta = metadata(&mut entry).map_err(&err)?;
                continue;
            };
            let parent = self.ensure_dirs(parents).map_err(&err)?;
            if name.starts_with(WHITEOUT_PREFIX) {
                stats.whiteouts += 1;
                let entries = self
                    .tree
                    .dir_mut(parent)
                    .expect("ensure_dirs returns directories");
                if *name == OPAQUE {
                    entries.retain(|n, _| added.contains(&(parent, n.clone())));
                } else if !name.starts_with(b".wh..wh.") {
                    let target = name[WHITEOUT_PREFIX.len()..].to_vec();
                    if !added.contains(&(parent, target.clone())) {
                        entries.remove(&target);
                    }
                }
                continue;
            }
            let node = if kind.is_hard_link() {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| err("hardlink without a target".into()))?
                    .into_owned();
                let target_parts =
                    split_path(&target).map_err(|w| err(format!("hardlink target: {w}")))?;
                let id = self.lookup(&target_parts).ok_or_else(|| {
                    err(format!(
                        "hardlink to {:?}, which is not in this or a lower layer",
                        String::from_utf8_lossy(&target)
                    ))
                })?;
                if matches!(self.tree.nodes[id].kind, NodeKind::Dir(_)) {
                    return Err(err("hardlink to a directory".into()));
                }
                id
            } else {
                let meta = metadata(&mut entry).map_err(&err)?;
                let existing = self.tree.dir(parent).and_then(|d| d.get(*name)).copied();
                let node_kind = if kind.is_dir() {
                    if let Some(id) =
                        existing.filter(|id| matches!(self.tree.nodes[*id].kind, NodeKind::Dir(_)))
                    {
                        self.tree.nodes[id].meta = meta;
                        added.insert((parent, name.to_vec()));
                        continue;
                    }
                    NodeKind::Dir(BTreeMap::new())
                } else if kind.is_file()
                    || kind == tar::EntryType::Continuous
                    || kind.is_gnu_sparse()
                {
                    let size = entry.size();
                    if kind.is_gnu_sparse() {
                        // The archive stores only the data; the holes cost reading zeros,
                        // so a header may not make that cost unbounded.
                        let stored = entry.header().entry_size().unwrap_or(0);
                        let holes = size.saturating_sub(stored);
                        if holes > MAX_SPARSE_HOLES {
                            return Err(err(format!(
                                "a GNU sparse file of {size} bytes holding {stored} bytes of data: {holes} bytes of holes, more than the {} GiB hoist accepts",
                                MAX_SPARSE_HOLES >> 30
                            )));
                        }
                    }
                    let chunks = read_chunks(&mut entry, size, self.chunk_size, sink, &err)?;
                    stats.file_bytes += size;
                    NodeKind::File { size, chunks }
                } else if kind.is_symlink() {
                    let target = entry
                        .link_name_bytes()
                        .ok_or_else(|| err("symlink without a target".into()))?;
                    if target.is_empty() || target.len() >= 4096 {
                        return Err(err(format!("symlink target of {} bytes", target.len())));
                    }
                    NodeKind::Symlink(target.into_owned())
                } else if kind.is_character_special() || kind.is_block_special() {
                    let h = entry.header();
                    let major = h
                        .device_major()
                        .ok()
                        .flatten()
                        .ok_or_else(|| err("device without a major number".into()))?;
                    let minor = h
                        .device_minor()
                        .ok()
                        .flatten()
                        .ok_or_else(|| err("device without a minor number".into()))?;
                    if kind.is_character_special() {
                        NodeKind::CharDev { major, minor }
                    } else {
                        NodeKind::BlockDev { major, minor }
                    }
                } else if kind.is_fifo() {
                    NodeKind::Fifo
                } else {
                    return Err(err(format!("unsupported tar entry type {:?}", kind)));
                };
                self.tree.add(Node {
                    meta,
                    kind: node_kind,
                })
            };
            self.tree
                .dir_mut(parent)
                .expect("parent is a directory")
                .insert(name.to_vec(), node);
            added.insert((parent, name.to_vec()));
        }
        Ok((stats, archive.into_inner()))
    }

    /// Follows `parts` from the root through directories only.
    fn lookup(&self, parts: &[&[u8]]) -> Option<NodeId> {
        let mut id = Tree::ROOT;
        for part in parts {
            id = *self.tree.dir(id)?.get(*part)?;
        }
        Some(id)
    }

    /// Returns the directory at `parts`, creating missing ones (mode 0755, owned by root).
    fn ensure_dirs(&mut self, parts: &[&[u8]]) -> Result<NodeId, String> {
        let mut id = Tree::ROOT;
        for part in parts {
            let next = self.tree.dir(id).and_then(|d| d.get(*part)).copied();
            id = match next {
                Some(child) if matches!(self.tree.nodes[child].kind, NodeKind::Dir(_)) => child,
                Some(_) => {
                    return Err(format!(
                        "parent {:?} is not a directory (paths through symlinks are not followed)",
                        String::from_utf8_lossy(part)
                    ))
                }
                None => {
                    let meta = Metadata {
                        mode: 0o755,
                        ..Default::default()
                    };
                    let child = self.tree.add(Node {
                        meta,
                        kind: NodeKind::Dir(BTreeMap::new()),
                    });
                    self.tree
                        .dir_mut(id)
                        .expect("directory")
                        .insert(part.to_vec(), child);
                    child
                }
            };
        }
        Ok(id)
    }
}

/// Splits a tar path into its components, rejecting absolute paths and `..`.
pub fn split_path(path: &[u8]) -> Result<Vec<&[u8]>, &'static str> {
    if path.first() == Some(&b'/') {
        return Err("absolute path in a layer");
    }
    let mut parts = Vec::new();
    for part in path.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("path with a '..' component"),
            p if p.len() > hoist_format::erofs::ondisk::NAME_LEN_MAX => {
                return Err("name longer than 255 bytes")
            }
            p if p.contains(&0) => return Err("name with a NUL byte"),
            p => parts.push(p),
        }
    }
    Ok(parts)
}

fn metadata<R: Read>(entry: &mut tar::Entry<R>) -> Result<Metadata, String> {
    let h = entry.header();
    let mode = h.mode().map_err(|e| format!("bad mode: {e}"))? & 0o7777;
    let mut uid = u32::try_from(h.uid().map_err(|e| format!("bad uid: {e}"))?)
        .map_err(|_| "uid above 2^32")?;
    let mut gid = u32::try_from(h.gid().map_err(|e| format!("bad gid: {e}"))?)
        .map_err(|_| "gid above 2^32")?;
    let mut mtime = h.mtime().map_err(|e| format!("bad mtime: {e}"))?;
    let mut mtime_nsec = 0u32;
    let mut xattrs = BTreeMap::new();
    if let Some(exts) = entry
        .pax_extensions()
        .map_err(|e| format!("bad PAX header: {e}"))?
    {
        for ext in exts {
            let ext = ext.map_err(|e| format!("bad PAX record: {e}"))?;
            let key = ext.key_bytes();
            let value = ext.value_bytes();
            let text = || {
                std::str::from_utf8(value)
                    .map_err(|_| format!("PAX {} is not UTF-8", String::from_utf8_lossy(key)))
            };
            match key {
                b"uid" => uid = text()?.parse().map_err(|_| "bad PAX uid")?,
                b"gid" => gid = text()?.parse().map_err(|_| "bad PAX gid")?,
                b"mtime" => (mtime, mtime_nsec) = parse_pax_time(text()?).ok_or("bad PAX mtime")?,
                _ => {
                    if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                        xattrs.insert(name.to_vec(), value.to_vec());
                    }
                }
            }
        }
    }
    Ok(Metadata {
        mode,
        uid,
        gid,
        mtime,
        mtime_nsec,
        xattrs,
    })
}

/// Refuses a PAX `size` record that is not a decimal byte count of at most 2^64-1 (`-1`,
/// an overflowing or a non-numeric one). The tar crate would silently fall back to the
/// ustar header's size, where GNU tar refuses the archive: two readers would see two
/// different files (and the data of one as headers of the other).
fn check_pax_size<R: Read>(entry: &mut tar::Entry<R>) -> Result<(), String> {
    let Some(exts) = entry
        .pax_extensions()
        .map_err(|e| format!("bad PAX header: {e}"))?
    else {
        return Ok(());
    };
    for ext in exts {
        let ext = ext.map_err(|e| format!("bad PAX record: {e}"))?;
        if ext.key_bytes() != b"size" {
            continue;
        }
        let value = ext.value_bytes();
        let shown: String = String::from_utf8_lossy(value).chars().take(40).collect();
        let why = if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
            "is not a size in bytes"
        } else if std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .is_none()
        {
            "overflows 64 bits"
        } else {
            continue;
        };
        return Err(format!(
            "PAX size {shown:?} {why}; GNU tar refuses such an archive (rebuild the layer)"
        ));
    }
    Ok(())
}

/// Parses a PAX time (`1704067200` or `1704067200.5`); negative times clamp to 0.
fn parse_pax_time(s: &str) -> Option<(u64, u32)> {
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    if secs.starts_with('-') {
        return Some((0, 0));
    }
    let secs: u64 = secs.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
    Some((secs, digits.parse().ok()?))
}

/// The most bytes of holes a GNU sparse file may declare. Holes are read as zeros
/// (about 10 s for this much); a layer of a few KiB could otherwise declare terabytes
/// and keep a conversion busy for hours.
pub const MAX_SPARSE_HOLES: u64 = 64 << 30;

fn read_chunks<R: Read>(
    entry: &mut tar::Entry<R>,
    size: u64,
    chunk_size: u64,
    sink: &mut dyn ChunkSink,
    err: &dyn Fn(String) -> BuildError,
) -> Result<Vec<hoist_format::tree::ChunkRef>, BuildError> {
    if size > 0 && size <= sink.small_file_limit().min(chunk_size) {
        let mut buf = vec![0u8; size as usize];
        entry
            .read_exact(&mut buf)
            .map_err(|e| err(format!("reading file data ({size} bytes): {e}")))?;
        return Ok(vec![sink.put_small(buf)?]);
    }
    let mut chunks = Vec::with_capacity(size.div_ceil(chunk_size).min(1 << 16) as usize);
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk_size) as usize;
        let mut buf = vec![0u8; n];
        entry.read_exact(&mut buf).map_err(|e| {
            err(format!(
                "reading file data ({left} of {size} bytes left): {e}"
            ))
        })?;
        chunks.push(sink.put(buf)?);
        left -= n as u64;
    }
    Ok(chunks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_split_and_bad_ones_refused() {
        assert_eq!(
            split_path(b"./a//b/./c/").unwrap(),
            vec![&b"a"[..], b"b", b"c"]
        );
        assert!(split_path(b"./").unwrap().is_empty());
        assert!(split_path(b"/etc/passwd").is_err());
        assert!(split_path(b"a/../../etc").is_err());
        assert!(split_path(&[b'x'; 256]).is_err());
    }

    /// Counts stored chunks; nothing is kept.
    struct Discard;

    impl ChunkSink for Discard {
        fn put(&mut self, _: Vec<u8>) -> Result<hoist_format::tree::ChunkRef, BuildError> {
            Ok(hoist_format::tree::ChunkRef::Hole)
        }
    }

    fn apply_bytes(tar: &[u8]) -> Result<Tree, BuildError> {
        let mut tree = Tree::new(Metadata::default());
        Applier::new(&mut tree, 4096).apply(tar, "sha256:test", &mut Discard)?;
        Ok(tree)
    }

    /// A ustar header and its data, padded.
    fn raw(path: &[u8], kind: u8, data: &[u8]) -> Vec<u8> {
        let mut h = [0u8; 512];
        h[..path.len()].copy_from_slice(path);
        h[100..108].copy_from_slice(b"0000644\0");
        h[108..116].copy_from_slice(b"0000000\0");
        h[116..124].copy_from_slice(b"0000000\0");
        h[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
        h[136..148].copy_from_slice(b"00000000000\0");
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let mut out = h.to_vec();
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(512), 0);
        out
    }

    /// A PAX extended header of one `key=value` record.
    fn pax(key: &str, value: &[u8]) -> Vec<u8> {
        let body = [b" ", key.as_bytes(), b"=", value, b"\n"].concat();
        let mut n = body.len() + 1;
        while n.to_string().len() + body.len() != n {
            n = n.to_string().len() + body.len();
        }
        let record = [n.to_string().as_bytes(), &body].concat();
        raw(b"PaxHeaders/f", b'x', &record)
    }

    fn tar_of(entries: &[Vec<u8>]) -> Vec<u8> {
        let mut out = entries.concat();
        out.extend_from_slice(&[0u8; 1024]);
        out
    }

    /// Issue 19: a PAX `size` of -1, one that overflows and one that is not a number
    /// were ignored (the ustar size used); GNU tar refuses such archives. The fuzz seeds
    /// `fuzz/seeds/tar_tree/pax-size-*` are these layers.
    #[test]
    fn pax_sizes_that_are_not_byte_counts_are_refused() {
        for (seed, value, why) in [
            (
                &include_bytes!("../../../fuzz/seeds/tar_tree/pax-size-negative")[..],
                "-1",
                "is not a size in bytes",
            ),
            (
                &include_bytes!("../../../fuzz/seeds/tar_tree/pax-size-overflow")[..],
                "99999999999999999999999",
                "overflows 64 bits",
            ),
            (
                &include_bytes!("../../../fuzz/seeds/tar_tree/pax-size-not-a-number")[..],
                "12abc",
                "is not a size in bytes",
            ),
        ] {
            let built = tar_of(&[pax("size", value.as_bytes()), raw(b"f", b'0', b"hello")]);
            assert_eq!(seed, &built[..], "the seed for {value} is this layer");
            let err = apply_bytes(seed).unwrap_err().to_string();
            assert!(
                err.contains("entry \"f\"") && err.contains(&format!("PAX size {value:?} {why}")),
                "{err}"
            );
        }
        // A PAX size that is a byte count is used.
        let tree = apply_bytes(&tar_of(&[pax("size", b"5"), raw(b"f", b'0', b"hello")])).unwrap();
        let f = tree.dir(Tree::ROOT).unwrap()[&b"f"[..]];
        assert!(matches!(tree.nodes[f].kind, NodeKind::File { size: 5, .. }));
    }

    /// Issue 19: convert accepted trees 5,000 and 10,000 directories deep that check and
    /// mount refuse. The deepest tree the reader walks converts; one level more is
    /// refused, naming the entry. The fuzz seed `deep-tree-5000` is a 5,000-level tree.
    #[test]
    fn trees_deeper_than_the_reader_walks_are_refused() {
        let seed = include_bytes!("../../../fuzz/seeds/tar_tree/deep-tree-5000");
        let built = tar_of(&[
            pax("path", "d/".repeat(5000).as_bytes()),
            raw(b"deep/", b'5', b""),
        ]);
        assert_eq!(&seed[..], &built[..], "the seed is this layer");
        let err = apply_bytes(seed).unwrap_err().to_string();
        assert!(
            err.contains("entry \"d/d/d/") && err.contains("nested 5000 levels deep"),
            "{err}"
        );
        let deepest = "d/".repeat(MAX_DEPTH - 1);
        for (path, kind, ok) in [
            (deepest.clone(), b'5', true),
            (format!("{deepest}f"), b'0', true),
            (format!("{deepest}d/"), b'5', false),
            (format!("{deepest}d/f"), b'0', false),
        ] {
            let layer = tar_of(&[pax("path", path.as_bytes()), raw(b"x", kind, b"")]);
            let res = apply_bytes(&layer);
            assert_eq!(
                res.is_ok(),
                ok,
                "{} levels, type {}",
                path.matches('/').count(),
                kind as char
            );
        }
    }

    #[test]
    fn pax_times_parse() {
        assert_eq!(parse_pax_time("1704067200"), Some((1704067200, 0)));
        assert_eq!(
            parse_pax_time("1704067200.5"),
            Some((1704067200, 500_000_000))
        );
        assert_eq!(parse_pax_time("-5"), Some((0, 0)));
        assert_eq!(parse_pax_time("x"), None);
    }
}
