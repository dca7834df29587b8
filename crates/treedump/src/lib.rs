//! A referee for root filesystems: dumps a tree as one line per entry with every field an
//! OCI rootfs must keep, so two trees compare as text (`hoist unpack` against
//! `umoci unpack`, a FUSE mount against the kernel's).
//!
//! Each line: `path type mode uid gid mtime [size hash | target | rdev] link=GROUP xattrs`.
//! Hardlinks are shown as a group name (the first path, in sorted order, of that inode),
//! so identity is compared, not inode numbers. Directory sizes and link counts are left
//! out: they depend on the filesystem, not the image. Timestamps are whole seconds (tar
//! keeps no more).

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// Dumps the tree under `root` as sorted lines.
pub fn dump(root: &Path) -> io::Result<Vec<String>> {
    let mut entries: BTreeMap<Vec<u8>, fs::Metadata> = BTreeMap::new();
    collect(root, b"", &mut entries)?;
    let mut groups: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    for (path, meta) in &entries {
        if !meta.is_dir() && meta.nlink() > 1 {
            groups
                .entry((meta.dev(), meta.ino()))
                .or_insert_with(|| path.clone());
        }
    }
    let mut out = Vec::with_capacity(entries.len());
    for (rel, meta) in &entries {
        let full = root.join(OsStr::from_bytes(rel.strip_prefix(b"/").unwrap_or(rel)));
        let ft = meta.file_type();
        let kind = if ft.is_dir() {
            "dir".to_string()
        } else if ft.is_symlink() {
            let target = fs::read_link(&full)?;
            format!("symlink target={}", escape(target.as_os_str().as_bytes()))
        } else if ft.is_file() {
            format!("file size={} blake3={}", meta.len(), hash_file(&full)?)
        } else if ft.is_char_device() || ft.is_block_device() {
            let rdev = meta.rdev();
            let (major, minor) = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
            let c = if ft.is_char_device() {
                "chardev"
            } else {
                "blockdev"
            };
            format!("{c} rdev={major},{minor}")
        } else if ft.is_fifo() {
            "fifo".to_string()
        } else {
            "socket".to_string()
        };
        let link = groups
            .get(&(meta.dev(), meta.ino()))
            .map(|g| format!(" link={}", escape(g)))
            .unwrap_or_default();
        out.push(format!(
            "{} {kind} mode={:o} uid={} gid={} mtime={}{link} xattrs={}",
            escape(rel),
            meta.mode() & 0o7777,
            meta.uid(),
            meta.gid(),
            meta.mtime(),
            xattrs(&full)?
        ));
    }
    Ok(out)
}

/// Lines that differ between two dumps: (only in `a`, only in `b`).
pub fn diff(a: &[String], b: &[String]) -> (Vec<String>, Vec<String>) {
    let sa: std::collections::BTreeSet<&String> = a.iter().collect();
    let sb: std::collections::BTreeSet<&String> = b.iter().collect();
    (
        sa.difference(&sb).map(|s| s.to_string()).collect(),
        sb.difference(&sa).map(|s| s.to_string()).collect(),
    )
}

fn collect(root: &Path, rel: &[u8], out: &mut BTreeMap<Vec<u8>, fs::Metadata>) -> io::Result<()> {
    let dir = root.join(OsStr::from_bytes(rel.strip_prefix(b"/").unwrap_or(rel)));
    let meta = fs::symlink_metadata(&dir)?;
    out.insert(
        if rel.is_empty() {
            b"/".to_vec()
        } else {
            rel.to_vec()
        },
        meta,
    );
    for entry in fs::read_dir(&dir)? {
        let entry = entry?;
        let mut child = rel.to_vec();
        child.push(b'/');
        child.extend_from_slice(entry.file_name().as_bytes());
        let meta = entry.metadata()?;
        if meta.is_dir() {
            collect(root, &child, out)?;
        } else {
            out.insert(child, meta);
        }
    }
    Ok(())
}

fn hash_file(path: &Path) -> io::Result<String> {
    let mut h = blake3::Hasher::new();
    let mut f = fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().to_hex()[..16].to_string())
}

fn xattrs(path: &Path) -> io::Result<String> {
    let mut names = vec![0u8; 65536];
    let n = rustix::fs::llistxattr(path, &mut names).map_err(io::Error::from)?;
    let mut pairs = Vec::new();
    for name in names[..n].split(|&b| b == 0).filter(|s| !s.is_empty()) {
        // security.selinux labels belong to the host, not the image.
        if name == b"security.selinux" {
            continue;
        }
        let mut value = vec![0u8; 65536];
        let len = rustix::fs::lgetxattr(path, OsStr::from_bytes(name), &mut value)
            .map_err(io::Error::from)?;
        pairs.push(format!("{}={}", escape(name), escape(&value[..len])));
    }
    pairs.sort();
    Ok(if pairs.is_empty() {
        "-".into()
    } else {
        pairs.join(",")
    })
}

/// Printable form of arbitrary bytes: ASCII graphics as is, the rest as `\xNN`.
fn escape(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| {
            if b.is_ascii_graphic() && b != b'\\' {
                (b as char).to_string()
            } else {
                format!("\\x{b:02x}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn base() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("sub")).unwrap();
        fs::write(d.path().join("sub/a"), b"hello").unwrap();
        fs::hard_link(d.path().join("sub/a"), d.path().join("b")).unwrap();
        symlink("sub/a", d.path().join("link")).unwrap();
        for p in ["sub/a", "sub", "link", ""] {
            set_mtime(&d.path().join(p), 1_700_000_000);
        }
        d
    }

    fn set_mtime(path: &Path, secs: i64) {
        let t = rustix::fs::Timespec {
            tv_sec: secs,
            tv_nsec: 0,
        };
        let ts = rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        };
        rustix::fs::utimensat(
            rustix::fs::CWD,
            path,
            &ts,
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .unwrap();
    }

    fn differs_after(change: impl Fn(&Path)) -> usize {
        let a = base();
        let b = base();
        change(b.path());
        let (x, y) = diff(&dump(a.path()).unwrap(), &dump(b.path()).unwrap());
        x.len() + y.len()
    }

    #[test]
    fn identical_trees_compare_equal() {
        assert_eq!(differs_after(|_| {}), 0);
    }

    #[test]
    fn each_known_difference_is_seen() {
        assert!(
            differs_after(|p| fs::write(p.join("sub/a"), b"hellO").unwrap()) > 0,
            "content"
        );
        assert!(
            differs_after(|p| fs::set_permissions(
                p.join("sub/a"),
                fs::Permissions::from_mode(0o4755)
            )
            .unwrap())
                > 0,
            "mode"
        );
        assert!(
            differs_after(|p| std::os::unix::fs::lchown(p.join("link"), Some(7), None).unwrap())
                > 0,
            "owner"
        );
        assert!(
            differs_after(|p| {
                fs::remove_file(p.join("link")).unwrap();
                symlink("sub/b", p.join("link")).unwrap();
            }) > 0,
            "symlink target"
        );
        assert!(
            differs_after(|p| {
                fs::remove_file(p.join("b")).unwrap();
                fs::copy(p.join("sub/a"), p.join("b")).unwrap();
            }) > 0,
            "hardlink broken"
        );
        assert!(
            differs_after(|p| {
                rustix::fs::setxattr(
                    p.join("sub/a"),
                    "user.x",
                    b"1",
                    rustix::fs::XattrFlags::empty(),
                )
                .unwrap()
            }) > 0,
            "xattr"
        );
        assert!(differs_after(|p| set_mtime(&p.join("sub"), 5)) > 0, "mtime");
        assert!(
            differs_after(|p| fs::write(p.join("new"), b"").unwrap()) > 0,
            "extra file"
        );
    }
}
