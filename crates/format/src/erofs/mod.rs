//! EROFS: on-disk structures, a writer for chunk-based images and a reader.

pub mod ondisk;
pub mod read;
pub mod write;

pub use read::{DeviceInfo, DirEntry, Image, Inode};
pub use write::{write_image, Device, WriteOptions};
