//! Serialises a [`Tree`] into an EROFS image whose regular files are chunk-based.
//!
//! Layout of the image (4 KiB blocks):
//!
//! ```text
//! block 0    [0, 1024) left to the caller (hoist puts its header there)
//!            [1024, 1152) superblock, then the device table (128 bytes a device)
//! block M..  inodes, in depth-first order, each followed by its inline xattrs and then
//!            either its chunk indexes (files) or its inline tail (dirs, symlinks)
//! then       full directory/symlink blocks that do not fit inline
//! ```
//!
//! An inode is compact (32 bytes) when its fields fit one: 16-bit owner, group and link
//! count, a 32-bit size, and the image's most common mtime, which goes in the superblock
//! (compact inodes carry none; every kernel reads theirs from there). Any other inode is
//! extended (64 bytes), so mtimes, 32-bit ids and 64-bit sizes are kept exactly. Inline
//! tails never cross a block boundary (the kernel rejects that): an inode whose tail
//! would cross is moved to the next block.

use super::ondisk::*;
use crate::tree::{ChunkRef, NodeId, NodeKind, Tree};
use crate::FormatError;
use std::collections::HashMap;
use zerocopy::IntoBytes;

/// The entries (name, node) of one directory block.
type DirBlock = Vec<(Vec<u8>, NodeId)>;

/// A data blob as the EROFS device table describes it.
#[derive(Debug, Clone)]
pub struct Device {
    /// Device tag (hoist: the blob's sha256 in hex, exactly 64 bytes).
    pub tag: [u8; 64],
    /// Size of the blob's uncompressed address space in blocks.
    pub blocks: u32,
}

/// Options of [`write_image`].
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// log2 of the chunk size of chunk-based files; at least [`BLOCK_BITS`].
    pub chunk_bits: u8,
}

/// What an inode's data looks like on disk.
enum Data {
    /// No data, or device/fifo/socket.
    None,
    /// Chunk indexes for a regular file.
    Chunks(Vec<ChunkRef>),
    /// Directory or symlink bytes; `inline` bytes at the end go after the inode.
    Bytes { bytes: Vec<u8>, inline: usize },
}

struct Plan {
    id: NodeId,
    /// Byte offset of the inode within the inode area.
    pos: u64,
    xattrs: Vec<u8>,
    data: Data,
    /// First block of the non-inline data blocks.
    raw_blkaddr: u32,
    size: u64,
    nlink: u32,
    /// Written as a compact (32-byte) inode.
    compact: bool,
}

/// Writes `tree` as an EROFS image. Bytes `[0, 1024)` of the result are zero.
pub fn write_image(
    tree: &Tree,
    devices: &[Device],
    opts: &WriteOptions,
) -> Result<Vec<u8>, FormatError> {
    if !(BLOCK_BITS..=crate::chunk::MAX_CHUNK_BITS).contains(&opts.chunk_bits) {
        return Err(FormatError::invalid(format!(
            "chunk size 2^{} is outside 4 KiB..64 MiB",
            opts.chunk_bits
        )));
    }
    let extra_devices = u16::try_from(devices.len())
        .map_err(|_| FormatError::invalid("more than 65535 blob devices"))?;
    let (order, parents, nlinks) = walk(tree)?;

    // Device table right after the superblock; the inode area starts at the next block.
    let devt_start = SUPER_OFFSET + size_of::<SuperBlock>() as u64;
    let devt_end = devt_start + DEVICE_SLOT_SIZE * devices.len() as u64;
    let meta_blkaddr = devt_end.div_ceil(BLOCK_SIZE);

    // Pass 1: sizes and positions of every inode.
    let mut plans = Vec::with_capacity(order.len());
    let mut pos = 0u64;
    for &id in &order {
        let node = &tree.nodes[id];
        let xattrs = encode_xattrs(&node.meta.xattrs)?;
        let (data, size) = match &node.kind {
            // Directory bytes are encoded once nids are known; only their size matters here.
            NodeKind::Dir(_) => (
                Data::Bytes {
                    inline: 0,
                    bytes: Vec::new(),
                },
                0,
            ),
            NodeKind::Symlink(target) => {
                if target.is_empty() || target.len() >= 4096 {
                    return Err(FormatError::invalid(format!(
                        "symlink target of {} bytes (1..4095 allowed)",
                        target.len()
                    )));
                }
                (
                    Data::Bytes {
                        inline: 0,
                        bytes: target.clone(),
                    },
                    target.len() as u64,
                )
            }
            NodeKind::File { size, chunks } => {
                let expected = size.div_ceil(1u64 << opts.chunk_bits);
                if chunks.len() as u64 != expected {
                    return Err(FormatError::invalid(format!(
                        "file of {size} bytes has {} chunks, expected {expected}",
                        chunks.len()
                    )));
                }
                if *size == 0 {
                    (Data::None, 0)
                } else {
                    (Data::Chunks(chunks.clone()), *size)
                }
            }
            _ => (Data::None, 0),
        };
        plans.push(Plan {
            id,
            pos: 0,
            xattrs,
            data,
            raw_blkaddr: NULL_ADDR,
            size,
            nlink: nlinks[&id],
            compact: false,
        });
    }
    let epoch = common_mtime(tree, &order);
    // Directory contents depend on names only until nids are known; lay them out now.
    let dir_layouts: HashMap<NodeId, Vec<DirBlock>> = plans
        .iter()
        .filter_map(|p| {
            tree.dir(p.id)
                .map(|e| (p.id, dir_blocks(p.id, parents[&p.id], e)))
        })
        .collect();
    for plan in &mut plans {
        if let Some(blocks) = dir_layouts.get(&plan.id) {
            let last = blocks.last().map_or(0, |b| block_used(b));
            plan.size = (blocks.len() as u64 - 1) * BLOCK_SIZE + last as u64;
        }
        let meta = &tree.nodes[plan.id].meta;
        plan.compact = (meta.mtime, meta.mtime_nsec) == epoch
            && meta.uid <= u32::from(u16::MAX)
            && meta.gid <= u32::from(u16::MAX)
            && plan.nlink <= u32::from(u16::MAX)
            && plan.size <= u64::from(u32::MAX);
        let isize = inode_size(plan) + plan.xattrs.len() as u64;
        pos = pos.next_multiple_of(32);
        match &mut plan.data {
            Data::Bytes { inline, .. } => {
                let tail = (plan.size % BLOCK_SIZE) as usize;
                if tail != 0 && isize + tail as u64 <= BLOCK_SIZE {
                    if (pos + isize) % BLOCK_SIZE + tail as u64 > BLOCK_SIZE {
                        pos = pos.next_multiple_of(BLOCK_SIZE);
                    }
                    *inline = tail;
                }
                plan.pos = pos;
                pos += isize + *inline as u64;
            }
            Data::Chunks(chunks) => {
                plan.pos = pos;
                pos = (pos + isize).next_multiple_of(8) + 8 * chunks.len() as u64;
            }
            Data::None => {
                plan.pos = pos;
                pos += isize;
            }
        }
    }
    // Pass 2: non-inline data blocks after the inode area.
    let mut next_block = meta_blkaddr + pos.div_ceil(BLOCK_SIZE);
    for plan in &mut plans {
        if let Data::Bytes { inline, .. } = &plan.data {
            let full = (plan.size - *inline as u64).div_ceil(BLOCK_SIZE);
            if full > 0 {
                plan.raw_blkaddr = block_u32(next_block)?;
                next_block += full;
            }
        }
    }
    let total_blocks = block_u32(next_block)?;
    let nid_of: HashMap<NodeId, u64> = plans.iter().map(|p| (p.id, p.pos >> ISLOT_BITS)).collect();
    if nid_of[&Tree::ROOT] > u64::from(u16::MAX) {
        return Err(FormatError::invalid("root inode beyond nid 65535"));
    }

    let meta_off = meta_blkaddr * BLOCK_SIZE;
    let mut img = vec![0u8; (u64::from(total_blocks) * BLOCK_SIZE) as usize];
    let sb = SuperBlock {
        magic: EROFS_MAGIC.into(),
        blkszbits: BLOCK_BITS,
        root_nid: (nid_of[&Tree::ROOT] as u16).into(),
        inos: (plans.len() as u64).into(),
        blocks: total_blocks.into(),
        meta_blkaddr: block_u32(meta_blkaddr)?.into(),
        feature_incompat: (FEATURE_INCOMPAT_CHUNKED_FILE
            | if devices.is_empty() {
                0
            } else {
                FEATURE_INCOMPAT_DEVICE_TABLE
            })
        .into(),
        extra_devices: extra_devices.into(),
        devt_slotoff: ((devt_start / DEVICE_SLOT_SIZE) as u16).into(),
        build_time: epoch.0.into(),
        build_time_nsec: epoch.1.into(),
        ..Default::default()
    };
    put(&mut img, SUPER_OFFSET, sb.as_bytes());
    for (i, dev) in devices.iter().enumerate() {
        let slot = DeviceSlot {
            tag: dev.tag,
            blocks: dev.blocks.into(),
            mapped_blkaddr: 0.into(),
            reserved: [0; 56],
        };
        put(
            &mut img,
            devt_start + i as u64 * DEVICE_SLOT_SIZE,
            slot.as_bytes(),
        );
    }

    for (ino, plan) in plans.iter().enumerate() {
        let node = &tree.nodes[plan.id];
        let at = meta_off + plan.pos;
        let i_u: u32;
        let layout = match &plan.data {
            Data::None => {
                i_u = match node.kind {
                    NodeKind::CharDev { major, minor } | NodeKind::BlockDev { major, minor } => {
                        if major > 0xfff || minor > 0xf_ffff {
                            return Err(FormatError::invalid(format!(
                                "device {major}:{minor} does not fit EROFS (12-bit major, 20-bit minor)"
                            )));
                        }
                        encode_dev(major, minor)
                    }
                    NodeKind::File { .. } => NULL_ADDR,
                    _ => 0,
                };
                LAYOUT_FLAT_PLAIN
            }
            Data::Chunks(chunks) => {
                i_u = u32::from(CHUNK_FORMAT_INDEXES | u16::from(opts.chunk_bits - BLOCK_BITS));
                let mut idx_at =
                    (at + inode_size(plan) + plan.xattrs.len() as u64).next_multiple_of(8);
                for c in chunks {
                    let index = match *c {
                        ChunkRef::Hole => ChunkIndex {
                            blkaddr: NULL_ADDR.into(),
                            ..Default::default()
                        },
                        ChunkRef::Mapped { device, blkaddr } => {
                            if device == 0 || device > extra_devices || blkaddr == NULL_ADDR {
                                return Err(FormatError::invalid(format!(
                                    "chunk on device {device} at block {blkaddr}, but the image has {extra_devices} devices"
                                )));
                            }
                            ChunkIndex {
                                advise: 0.into(),
                                device_id: device.into(),
                                blkaddr: blkaddr.into(),
                            }
                        }
                    };
                    put(&mut img, idx_at, index.as_bytes());
                    idx_at += 8;
                }
                LAYOUT_CHUNK_BASED
            }
            Data::Bytes { bytes, inline } => {
                let content = match dir_layouts.get(&plan.id) {
                    Some(blocks) => encode_dir(blocks, &nid_of, tree),
                    None => bytes.clone(),
                };
                let full_len = content.len() - inline;
                i_u = plan.raw_blkaddr;
                if full_len > 0 {
                    put(
                        &mut img,
                        u64::from(plan.raw_blkaddr) * BLOCK_SIZE,
                        &content[..full_len],
                    );
                }
                if *inline > 0 {
                    put(
                        &mut img,
                        at + inode_size(plan) + plan.xattrs.len() as u64,
                        &content[full_len..],
                    );
                    LAYOUT_FLAT_INLINE
                } else {
                    LAYOUT_FLAT_PLAIN
                }
            }
        };
        let icount = if plan.xattrs.is_empty() {
            0
        } else {
            (plan.xattrs.len() - 12) / 4 + 1
        };
        let i_mode = ((node.kind.type_bits() | (node.meta.mode & 0o7777)) as u16).into();
        if plan.compact {
            // The fields were checked to fit when the plan was made.
            let inode = InodeCompact {
                i_format: (layout << 1).into(),
                i_xattr_icount: (icount as u16).into(),
                i_mode,
                i_nlink: (plan.nlink as u16).into(),
                i_size: (plan.size as u32).into(),
                i_u: i_u.into(),
                i_ino: ((ino + 1) as u32).into(),
                i_uid: (node.meta.uid as u16).into(),
                i_gid: (node.meta.gid as u16).into(),
                ..Default::default()
            };
            put(&mut img, at, inode.as_bytes());
        } else {
            let inode = InodeExtended {
                i_format: (INODE_VERSION_EXTENDED | (layout << 1)).into(),
                i_xattr_icount: (icount as u16).into(),
                i_mode,
                i_size: plan.size.into(),
                i_u: i_u.into(),
                i_ino: ((ino + 1) as u32).into(),
                i_uid: node.meta.uid.into(),
                i_gid: node.meta.gid.into(),
                i_mtime: node.meta.mtime.into(),
                i_mtime_nsec: node.meta.mtime_nsec.into(),
                i_nlink: plan.nlink.into(),
                ..Default::default()
            };
            put(&mut img, at, inode.as_bytes());
        }
        put(&mut img, at + inode_size(plan), &plan.xattrs);
    }
    Ok(img)
}

/// Bytes of a plan's inode, before its xattrs.
fn inode_size(plan: &Plan) -> u64 {
    if plan.compact {
        32
    } else {
        64
    }
}

/// The mtime most inodes share (the earliest of the most common), which compact
/// inodes take from the superblock.
fn common_mtime(tree: &Tree, order: &[NodeId]) -> (u64, u32) {
    let mut counts: HashMap<(u64, u32), usize> = HashMap::new();
    for &id in order {
        let m = &tree.nodes[id].meta;
        *counts.entry((m.mtime, m.mtime_nsec)).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
        .map_or((0, 0), |(t, _)| t)
}

fn put(img: &mut [u8], at: u64, bytes: &[u8]) {
    let at = at as usize;
    img[at..at + bytes.len()].copy_from_slice(bytes);
}

fn block_u32(block: u64) -> Result<u32, FormatError> {
    u32::try_from(block).map_err(|_| FormatError::invalid("metadata image larger than 16 TiB"))
}

/// Depth-first order of reachable nodes, the parent of each directory, and link counts.
#[allow(clippy::type_complexity)]
fn walk(
    tree: &Tree,
) -> Result<(Vec<NodeId>, HashMap<NodeId, NodeId>, HashMap<NodeId, u32>), FormatError> {
    let mut order = Vec::new();
    let mut parents = HashMap::from([(Tree::ROOT, Tree::ROOT)]);
    let mut nlinks: HashMap<NodeId, u32> = HashMap::new();
    // Node and, for a directory, how many levels below the root it is.
    let mut stack = vec![(Tree::ROOT, 0usize)];
    if tree.dir(Tree::ROOT).is_none() {
        return Err(FormatError::invalid("the root is not a directory"));
    }
    while let Some((id, depth)) = stack.pop() {
        order.push(id);
        let Some(entries) = tree.dir(id) else {
            continue;
        };
        let mut subdirs = 0;
        for (name, &child) in entries.iter().rev() {
            if name.is_empty()
                || name.len() > NAME_LEN_MAX
                || name.contains(&b'/')
                || name == b"."
                || name == b".."
            {
                return Err(FormatError::invalid(format!(
                    "invalid entry name {:?}",
                    String::from_utf8_lossy(name)
                )));
            }
            let node = tree
                .nodes
                .get(child)
                .ok_or_else(|| FormatError::invalid("dangling node id"))?;
            if matches!(node.kind, NodeKind::Dir(_)) {
                subdirs += 1;
                if parents.insert(child, id).is_some() {
                    return Err(FormatError::invalid("a directory is linked twice"));
                }
                if depth + 1 >= super::read::MAX_DEPTH {
                    return Err(FormatError::invalid(format!(
                        "directories nested {} levels deep; readers follow at most {}",
                        depth + 1,
                        super::read::MAX_DEPTH - 1
                    )));
                }
                stack.push((child, depth + 1));
            } else {
                let n = nlinks.entry(child).or_insert(0);
                if *n == 0 {
                    stack.push((child, depth));
                }
                *n += 1;
            }
        }
        nlinks.insert(id, 2 + subdirs);
    }
    // A hardlinked file is pushed only when first seen, so every node appears once.
    Ok((order, parents, nlinks))
}

fn encode_xattrs(
    xattrs: &std::collections::BTreeMap<Vec<u8>, Vec<u8>>,
) -> Result<Vec<u8>, FormatError> {
    if xattrs.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = vec![0u8; 12];
    for (name, value) in xattrs {
        let (index, suffix) = split_xattr_name(name).ok_or_else(|| {
            FormatError::invalid(format!(
                "xattr {:?} has a prefix EROFS cannot encode",
                String::from_utf8_lossy(name)
            ))
        })?;
        let name_len = u8::try_from(suffix.len())
            .map_err(|_| FormatError::invalid("xattr name longer than 255 bytes"))?;
        let value_size = u16::try_from(value.len())
            .map_err(|_| FormatError::invalid("xattr value longer than 65535 bytes"))?;
        let entry = XattrEntry {
            e_name_len: name_len,
            e_name_index: index,
            e_value_size: value_size.into(),
        };
        out.extend_from_slice(entry.as_bytes());
        out.extend_from_slice(suffix);
        out.extend_from_slice(value);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    if (out.len() - 12) / 4 + 1 > usize::from(u16::MAX) {
        return Err(FormatError::invalid("xattrs of one inode exceed 256 KiB"));
    }
    Ok(out)
}

/// Splits a full xattr name into its EROFS prefix index and the rest.
pub fn split_xattr_name(name: &[u8]) -> Option<(u8, &[u8])> {
    XATTR_PREFIXES
        .iter()
        .find(|(_, p)| name.starts_with(p))
        .map(|(i, p)| (*i, &name[p.len()..]))
}

/// Packs the entries of a directory (with `.` and `..`) into directory blocks.
fn dir_blocks(
    id: NodeId,
    parent: NodeId,
    entries: &std::collections::BTreeMap<Vec<u8>, NodeId>,
) -> Vec<DirBlock> {
    let mut all: Vec<(Vec<u8>, NodeId)> = entries.iter().map(|(n, &c)| (n.clone(), c)).collect();
    all.push((b".".to_vec(), id));
    all.push((b"..".to_vec(), parent));
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let mut blocks = vec![Vec::new()];
    let mut used = 0usize;
    for entry in all {
        let need = size_of::<Dirent>() + entry.0.len();
        if used + need > BLOCK_SIZE as usize {
            blocks.push(Vec::new());
            used = 0;
        }
        used += need;
        blocks
            .last_mut()
            .expect("blocks is never empty")
            .push(entry);
    }
    blocks
}

fn block_used(block: &[(Vec<u8>, NodeId)]) -> usize {
    block
        .iter()
        .map(|(n, _)| size_of::<Dirent>() + n.len())
        .sum()
}

fn encode_dir(
    blocks: &[Vec<(Vec<u8>, NodeId)>],
    nid_of: &HashMap<NodeId, u64>,
    tree: &Tree,
) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, block) in blocks.iter().enumerate() {
        let start = out.len();
        let mut nameoff = size_of::<Dirent>() * block.len();
        for (name, child) in block {
            let d = Dirent {
                nid: nid_of[child].into(),
                nameoff: (nameoff as u16).into(),
                file_type: tree.nodes[*child].kind.file_type(),
                reserved: 0,
            };
            out.extend_from_slice(d.as_bytes());
            nameoff += name.len();
        }
        for (name, _) in block {
            out.extend_from_slice(name);
        }
        if i + 1 < blocks.len() {
            out.resize(start + BLOCK_SIZE as usize, 0);
        }
    }
    out
}
