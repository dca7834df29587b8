//! The in-memory filesystem tree that the EROFS writer serialises.
//!
//! Nodes live in an arena ([`Tree::nodes`]); directories map names to node ids, so a
//! hardlinked file is one node referenced from several directory entries. Nodes that are
//! no longer reachable from the root (replaced or whited out by an upper layer) are simply
//! not written. Link counts are derived from reachability at write time, never stored.

use std::collections::BTreeMap;

/// Index of a node in [`Tree::nodes`]. The root is [`Tree::ROOT`].
pub type NodeId = usize;

/// Where one chunk of a regular file lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum ChunkRef {
    /// An all-zero chunk that is not stored (a hole).
    Hole,
    /// A chunk stored on a blob device.
    Mapped {
        /// Device id: `1..=n` for the `n` data blobs of the device table.
        device: u16,
        /// Block address of the chunk in the blob's uncompressed address space.
        blkaddr: u32,
    },
}

/// Attributes every node carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Metadata {
    /// Permission bits including setuid, setgid and sticky (`0o7777`); no type bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: u64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: u32,
    /// Extended attributes, full names (`user.foo`) to values, sorted by name.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// What a node is, with its type-specific payload.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum NodeKind {
    /// A directory: entry names (no `.` or `..`) to nodes.
    Dir(BTreeMap<Vec<u8>, NodeId>),
    /// A regular file: its size and one [`ChunkRef`] per chunk.
    File {
        /// Size in bytes.
        size: u64,
        /// `ceil(size / chunk_size)` chunk references.
        chunks: Vec<ChunkRef>,
    },
    /// A symbolic link and its target.
    Symlink(Vec<u8>),
    /// A character device.
    CharDev {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A block device.
    BlockDev {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A named pipe.
    Fifo,
    /// A unix socket.
    Socket,
}

/// One node of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Node {
    /// Attributes.
    pub meta: Metadata,
    /// Type and payload.
    pub kind: NodeKind,
}

/// A filesystem tree: an arena of nodes whose entry 0 is the root directory.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Tree {
    /// All nodes, reachable or not.
    pub nodes: Vec<Node>,
}

impl Tree {
    /// Id of the root directory.
    pub const ROOT: NodeId = 0;

    /// A tree holding only a root directory with the given attributes.
    pub fn new(root: Metadata) -> Self {
        Tree {
            nodes: vec![Node {
                meta: root,
                kind: NodeKind::Dir(BTreeMap::new()),
            }],
        }
    }

    /// Adds a node to the arena and returns its id (it is not linked anywhere yet).
    pub fn add(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// The entries of directory `id`, or `None` if it is not a directory.
    pub fn dir(&self, id: NodeId) -> Option<&BTreeMap<Vec<u8>, NodeId>> {
        match &self.nodes.get(id)?.kind {
            NodeKind::Dir(entries) => Some(entries),
            _ => None,
        }
    }

    /// Mutable entries of directory `id`, or `None` if it is not a directory.
    pub fn dir_mut(&mut self, id: NodeId) -> Option<&mut BTreeMap<Vec<u8>, NodeId>> {
        match &mut self.nodes.get_mut(id)?.kind {
            NodeKind::Dir(entries) => Some(entries),
            _ => None,
        }
    }
}

impl NodeKind {
    /// The `S_IF*` type bits of this kind.
    pub fn type_bits(&self) -> u32 {
        use crate::erofs::ondisk::mode::*;
        match self {
            NodeKind::Dir(_) => S_IFDIR,
            NodeKind::File { .. } => S_IFREG,
            NodeKind::Symlink(_) => S_IFLNK,
            NodeKind::CharDev { .. } => S_IFCHR,
            NodeKind::BlockDev { .. } => S_IFBLK,
            NodeKind::Fifo => S_IFIFO,
            NodeKind::Socket => S_IFSOCK,
        }
    }

    /// The directory entry file type of this kind.
    pub fn file_type(&self) -> u8 {
        use crate::erofs::ondisk::ft;
        match self {
            NodeKind::Dir(_) => ft::DIR,
            NodeKind::File { .. } => ft::REG,
            NodeKind::Symlink(_) => ft::SYMLINK,
            NodeKind::CharDev { .. } => ft::CHR,
            NodeKind::BlockDev { .. } => ft::BLK,
            NodeKind::Fifo => ft::FIFO,
            NodeKind::Socket => ft::SOCK,
        }
    }
}
