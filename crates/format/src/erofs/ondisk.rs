//! EROFS on-disk structures, as defined by the Linux kernel's `fs/erofs/erofs_fs.h`.
//!
//! Only the subset hoist writes and reads is declared: the superblock, the device table,
//! compact and extended inodes, inline xattrs, chunk indexes and directory entries.
//! All fields are little-endian; the structs are `repr(C)` without padding so that
//! `zerocopy` can view them over raw bytes without `unsafe`.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Magic number at the start of the superblock.
pub const EROFS_MAGIC: u32 = 0xE0F5_E1E2;
/// Byte offset of the superblock in the image.
pub const SUPER_OFFSET: u64 = 1024;
/// log2 of the only block size hoist writes (4 KiB, the page size the kernel needs).
pub const BLOCK_BITS: u8 = 12;
/// The block size in bytes.
pub const BLOCK_SIZE: u64 = 1 << BLOCK_BITS;
/// log2 of the inode slot size: nids count 32-byte slots from `meta_blkaddr`.
pub const ISLOT_BITS: u32 = 5;
/// Size of one device table slot.
pub const DEVICE_SLOT_SIZE: u64 = 128;
/// The chunk index value of an unmapped chunk (a hole).
pub const NULL_ADDR: u32 = u32::MAX;
/// Longest name a directory entry may carry.
pub const NAME_LEN_MAX: usize = 255;

/// Incompatible feature: chunk-based files.
pub const FEATURE_INCOMPAT_CHUNKED_FILE: u32 = 0x0000_0004;
/// Incompatible feature: a device table follows the superblock.
pub const FEATURE_INCOMPAT_DEVICE_TABLE: u32 = 0x0000_0008;

/// Inode data layout: plain blocks at `raw_blkaddr`.
pub const LAYOUT_FLAT_PLAIN: u16 = 0;
/// Inode data layout: plain blocks with the tail inline after the inode.
pub const LAYOUT_FLAT_INLINE: u16 = 2;
/// Inode data layout: chunk-based, with chunk indexes after the inode.
pub const LAYOUT_CHUNK_BASED: u16 = 4;
/// Bit in `i_format` selecting the 64-byte extended inode.
pub const INODE_VERSION_EXTENDED: u16 = 1;

/// `chunk_info.format` bits holding `log2(chunk size) - log2(block size)`.
pub const CHUNK_FORMAT_BLKBITS_MASK: u16 = 0x001F;
/// `chunk_info.format` flag: 8-byte chunk indexes (with a device id) follow the inode.
pub const CHUNK_FORMAT_INDEXES: u16 = 0x0020;

/// Xattr name prefixes EROFS can encode by index (name index, prefix).
pub const XATTR_PREFIXES: [(u8, &[u8]); 5] = [
    (1, b"user."),
    (4, b"trusted."),
    (6, b"security."),
    (2, b"system.posix_acl_access"),
    (3, b"system.posix_acl_default"),
];

/// The superblock, 128 bytes at [`SUPER_OFFSET`].
#[derive(Debug, Clone, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct SuperBlock {
    /// [`EROFS_MAGIC`].
    pub magic: U32,
    /// crc32c of the superblock block when `FEATURE_COMPAT_SB_CHKSUM` is set (hoist: 0).
    pub checksum: U32,
    /// Compatible feature bits.
    pub feature_compat: U32,
    /// log2 of the block size.
    pub blkszbits: u8,
    /// Extra superblock slots of 16 bytes (hoist: 0).
    pub sb_extslots: u8,
    /// nid of the root directory.
    pub root_nid: U16,
    /// Number of inodes.
    pub inos: U64,
    /// Time base of compact inodes (seconds).
    pub build_time: U64,
    /// Time base of compact inodes (nanoseconds).
    pub build_time_nsec: U32,
    /// Blocks of the primary device (the metadata image).
    pub blocks: U32,
    /// First block of the inode area.
    pub meta_blkaddr: U32,
    /// First block of the shared xattr area (hoist writes no shared xattrs).
    pub xattr_blkaddr: U32,
    /// Volume UUID.
    pub uuid: [u8; 16],
    /// Volume name.
    pub volume_name: [u8; 16],
    /// Incompatible feature bits.
    pub feature_incompat: U32,
    /// Available compression algorithms (unused: hoist data is not EROFS-compressed).
    pub available_compr_algs: U16,
    /// Number of devices besides the primary one.
    pub extra_devices: U16,
    /// Byte offset of the device table divided by [`DEVICE_SLOT_SIZE`].
    pub devt_slotoff: U16,
    /// log2 of the directory block size minus the block size (hoist: 0).
    pub dirblkbits: u8,
    /// Number of long xattr name prefixes (hoist: 0).
    pub xattr_prefix_count: u8,
    /// Start of long xattr prefixes.
    pub xattr_prefix_start: U32,
    /// nid of the packed inode (hoist: 0, none).
    pub packed_nid: U64,
    /// Reserved for the xattr name filter.
    pub xattr_filter_reserved: u8,
    /// Reserved.
    pub reserved2: [u8; 23],
}

/// One slot of the device table: an extra device (a hoist data blob).
#[derive(Debug, Clone, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct DeviceSlot {
    /// Tag of the device; hoist writes the blob's sha256 digest in hex (64 bytes).
    pub tag: [u8; 64],
    /// Size of the device in blocks.
    pub blocks: U32,
    /// Start of the device in a flattened address space (hoist: 0, unused).
    pub mapped_blkaddr: U32,
    /// Reserved.
    pub reserved: [u8; 56],
}

/// The 32-byte compact inode.
#[derive(Debug, Clone, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct InodeCompact {
    /// Version and data layout bits.
    pub i_format: U16,
    /// Inline xattr size in 4-byte units (see [`xattr_ibody_size`]).
    pub i_xattr_icount: U16,
    /// File type and permission bits.
    pub i_mode: U16,
    /// Link count.
    pub i_nlink: U16,
    /// File size.
    pub i_size: U32,
    /// Reserved (mtime offset in newer kernels).
    pub i_reserved: U32,
    /// Layout-dependent word: raw block address, rdev or chunk info.
    pub i_u: U32,
    /// 32-bit inode number.
    pub i_ino: U32,
    /// Owner.
    pub i_uid: U16,
    /// Group.
    pub i_gid: U16,
    /// Reserved.
    pub i_reserved2: U32,
}

/// The 64-byte extended inode, which hoist writes when a compact one cannot hold the
/// fields.
#[derive(Debug, Clone, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct InodeExtended {
    /// Version and data layout bits.
    pub i_format: U16,
    /// Inline xattr size in 4-byte units (see [`xattr_ibody_size`]).
    pub i_xattr_icount: U16,
    /// File type and permission bits.
    pub i_mode: U16,
    /// Reserved.
    pub i_reserved: U16,
    /// File size.
    pub i_size: U64,
    /// Layout-dependent word: raw block address, rdev or chunk info.
    pub i_u: U32,
    /// 32-bit inode number.
    pub i_ino: U32,
    /// Owner.
    pub i_uid: U32,
    /// Group.
    pub i_gid: U32,
    /// Modification time, seconds.
    pub i_mtime: U64,
    /// Modification time, nanoseconds.
    pub i_mtime_nsec: U32,
    /// Link count.
    pub i_nlink: U32,
    /// Reserved.
    pub i_reserved2: [u8; 16],
}

/// Header of the inline xattr area.
#[derive(Debug, Clone, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct XattrIbodyHeader {
    /// Bloom filter of names (only with `FEATURE_COMPAT_XATTR_FILTER`; hoist: 0).
    pub h_name_filter: U32,
    /// Number of shared xattr ids that follow (hoist: 0).
    pub h_shared_count: u8,
    /// Reserved.
    pub h_reserved2: [u8; 7],
}

/// Header of one xattr entry; name and value follow, the whole padded to 4 bytes.
#[derive(Debug, Clone, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct XattrEntry {
    /// Length of the name without its prefix.
    pub e_name_len: u8,
    /// Prefix index (see [`XATTR_PREFIXES`]).
    pub e_name_index: u8,
    /// Length of the value.
    pub e_value_size: U16,
}

/// An 8-byte chunk index of a chunk-based inode.
#[derive(Debug, Clone, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct ChunkIndex {
    /// Reserved (0).
    pub advise: U16,
    /// Device holding the chunk: 0 is the primary device, `n` the `n`-th device table slot.
    pub device_id: U16,
    /// Block address of the chunk on that device, or [`NULL_ADDR`] for a hole.
    pub blkaddr: U32,
}

/// A 12-byte directory entry; names follow the entries of the block.
#[derive(Debug, Clone, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Dirent {
    /// Inode of the entry.
    pub nid: U64,
    /// Offset of the name within the directory block.
    pub nameoff: U16,
    /// One of the `FT_*` file types.
    pub file_type: u8,
    /// Reserved.
    pub reserved: u8,
}

/// Size of the inline xattr area for an `i_xattr_icount`.
pub fn xattr_ibody_size(icount: u16) -> u64 {
    if icount == 0 {
        0
    } else {
        12 + 4 * (u64::from(icount) - 1)
    }
}

/// Directory entry file types (`FT_*`).
pub mod ft {
    /// Unknown.
    pub const UNKNOWN: u8 = 0;
    /// Regular file.
    pub const REG: u8 = 1;
    /// Directory.
    pub const DIR: u8 = 2;
    /// Character device.
    pub const CHR: u8 = 3;
    /// Block device.
    pub const BLK: u8 = 4;
    /// FIFO.
    pub const FIFO: u8 = 5;
    /// Socket.
    pub const SOCK: u8 = 6;
    /// Symbolic link.
    pub const SYMLINK: u8 = 7;
}

/// `S_IF*` file type bits of `i_mode`.
pub mod mode {
    /// Mask of the type bits.
    pub const S_IFMT: u32 = 0o170000;
    /// Socket.
    pub const S_IFSOCK: u32 = 0o140000;
    /// Symbolic link.
    pub const S_IFLNK: u32 = 0o120000;
    /// Regular file.
    pub const S_IFREG: u32 = 0o100000;
    /// Block device.
    pub const S_IFBLK: u32 = 0o060000;
    /// Directory.
    pub const S_IFDIR: u32 = 0o040000;
    /// Character device.
    pub const S_IFCHR: u32 = 0o020000;
    /// FIFO.
    pub const S_IFIFO: u32 = 0o010000;
}

/// Encodes a device number the way the kernel's `new_encode_dev` does.
pub fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

/// Decodes a device number written by [`encode_dev`].
pub fn decode_dev(dev: u32) -> (u32, u32) {
    let major = (dev & 0xfff00) >> 8;
    let minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
    (major, minor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_sizes_match_the_kernel() {
        assert_eq!(size_of::<SuperBlock>(), 128);
        assert_eq!(size_of::<DeviceSlot>(), 128);
        assert_eq!(size_of::<InodeCompact>(), 32);
        assert_eq!(size_of::<InodeExtended>(), 64);
        assert_eq!(size_of::<XattrIbodyHeader>(), 12);
        assert_eq!(size_of::<XattrEntry>(), 4);
        assert_eq!(size_of::<ChunkIndex>(), 8);
        assert_eq!(size_of::<Dirent>(), 12);
    }

    #[test]
    fn device_numbers_round_trip() {
        for (ma, mi) in [(1, 3), (0, 0), (259, 65536), (4095, 0xfffff)] {
            assert_eq!(decode_dev(encode_dev(ma, mi)), (ma, mi));
        }
    }
}
