//! The config's `User` resolved in the image's own user database.
//!
//! Written by hand: user-database crates read the host's database through libc, and a
//! container's user is named in the image's `/etc/passwd` and `/etc/group`. The rules are
//! those of runc's libcontainer (`GetExecUser`), which docker and containerd follow:
//! `""` is root; `NAME` or `UID`, optionally `:GROUP` or `:GID`; a name must exist, a
//! number need not (then the group is 0 and home is `/`); supplementary groups are the
//! groups that list the user by name.

use crate::RuntimeError;
use rustix::fs::{Mode, OFlags, ResolveFlags};
use std::io::Read;
use std::path::Path;

/// Largest `/etc/passwd` or `/etc/group` read, to prevent denial of service.
const MAX_DB: u64 = 4 << 20;

/// A resolved user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary group ids.
    pub additional_gids: Vec<u32>,
    /// Home directory.
    pub home: String,
}

/// Resolves `spec` (the config's `User`) against the databases of the root `rootfs`.
pub fn resolve(rootfs: &Path, spec: &str) -> Result<User, RuntimeError> {
    // Read both at once: on a lazy mount each read may wait for a fetch.
    let (passwd, group) = std::thread::scope(|s| {
        let group = s.spawn(|| read_in_root(rootfs, "etc/group"));
        let passwd = read_in_root(rootfs, "etc/passwd");
        (passwd, group.join())
    });
    let passwd = passwd?;
    let group = group.unwrap_or_else(|p| std::panic::resume_unwind(p))?;
    resolve_in(&passwd, &group, spec)
}

/// Resolves `spec` against the text of a passwd and a group file.
pub fn resolve_in(passwd: &str, group: &str, spec: &str) -> Result<User, RuntimeError> {
    let err = |why: String| RuntimeError::User {
        user: spec.to_string(),
        why,
    };
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user_part = if user_part.is_empty() { "0" } else { user_part };
    let users: Vec<Vec<&str>> = passwd
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 7)
        .collect();
    let numeric = user_part.parse::<u32>().ok();
    let entry = users.iter().find(|f| match numeric {
        Some(n) => f[2].parse::<u32>().ok() == Some(n),
        None => f[0] == user_part,
    });
    let (uid, mut gid, home, name) = match (entry, numeric) {
        (Some(f), _) => (
            f[2].parse::<u32>()
                .map_err(|_| err(format!("bad uid {:?} in /etc/passwd", f[2])))?,
            f[3].parse::<u32>()
                .map_err(|_| err(format!("bad gid {:?} in /etc/passwd", f[3])))?,
            f[5].to_string(),
            Some(f[0]),
        ),
        (None, Some(n)) => (n, 0, "/".to_string(), None),
        (None, None) => {
            return Err(err(format!(
                "no user {user_part:?} in the image's /etc/passwd"
            )))
        }
    };
    let groups: Vec<Vec<&str>> = group
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4)
        .collect();
    if let Some(g) = group_part.filter(|g| !g.is_empty()) {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => groups
                .iter()
                .find(|f| f[0] == g)
                .and_then(|f| f[2].parse::<u32>().ok())
                .ok_or_else(|| err(format!("no group {g:?} in the image's /etc/group")))?,
        };
    }
    let mut additional_gids: Vec<u32> = match name {
        Some(name) => groups
            .iter()
            .filter(|f| f[3].split(',').any(|m| m == name))
            .filter_map(|f| f[2].parse::<u32>().ok())
            .filter(|g| *g != gid)
            .collect(),
        None => Vec::new(),
    };
    additional_gids.sort_unstable();
    additional_gids.dedup();
    Ok(User {
        uid,
        gid,
        additional_gids,
        home: if home.is_empty() { "/".into() } else { home },
    })
}

/// Reads `rel` inside `root`, resolving symlinks as if `root` were `/` (a link in the
/// image cannot point the read at the host's files). A missing file reads as empty; a
/// device, FIFO or socket there is refused without being read (an image can hold any).
fn read_in_root(root: &Path, rel: &str) -> Result<String, RuntimeError> {
    let io = |source: std::io::Error| RuntimeError::Io {
        path: root.join(rel).display().to_string(),
        source,
    };
    let dir = rustix::fs::open(root, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())
        .map_err(|e| io(e.into()))?;
    let fd = match rustix::fs::openat2(
        &dir,
        rel,
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY,
        Mode::empty(),
        ResolveFlags::IN_ROOT,
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(String::new()),
        Err(e) => return Err(io(e.into())),
    };
    let st = rustix::fs::fstat(&fd).map_err(|e| io(e.into()))?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(RuntimeError::User {
            user: String::new(),
            why: format!("/{rel} in the image is not a regular file"),
        });
    }
    let mut text = String::new();
    std::fs::File::from(fd)
        .take(MAX_DB)
        .read_to_string(&mut text)
        .map_err(io)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        app:x:1000:1000::/home/app:/bin/sh\n\
        broken:x:abc:0::/:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:app\napp:x:1000:\naudio:x:29:app,daemon\n";

    fn user(uid: u32, gid: u32, extra: &[u32], home: &str) -> User {
        User {
            uid,
            gid,
            additional_gids: extra.to_vec(),
            home: home.into(),
        }
    }

    #[test]
    fn names_and_numbers_resolve_like_runc() {
        let r = |s: &str| resolve_in(PASSWD, GROUP, s);
        assert_eq!(r("").unwrap(), user(0, 0, &[], "/root"));
        assert_eq!(r("app").unwrap(), user(1000, 1000, &[29, 50], "/home/app"));
        assert_eq!(r("1000").unwrap(), user(1000, 1000, &[29, 50], "/home/app"));
        assert_eq!(r("app:staff").unwrap(), user(1000, 50, &[29], "/home/app"));
        assert_eq!(r("daemon:7").unwrap(), user(1, 7, &[29], "/usr/sbin"));
        assert_eq!(r("4242").unwrap(), user(4242, 0, &[], "/"));
        assert_eq!(r("4242:4243").unwrap(), user(4242, 4243, &[], "/"));
        assert!(r("nobody").is_err());
        assert!(r("app:nogroup").is_err());
        assert!(r("broken").is_err());
    }

    #[test]
    fn databases_are_read_inside_the_root() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        // An absolute link resolves inside the root, not to the host's file.
        std::fs::write(root.path().join("passwd.real"), "x:x:7:8::/x:/bin/sh\n").unwrap();
        std::os::unix::fs::symlink("/passwd.real", root.path().join("etc/passwd")).unwrap();
        assert_eq!(resolve(root.path(), "x").unwrap(), user(7, 8, &[], "/x"));
        // No group file: no supplementary groups, and numeric groups still work.
        assert_eq!(resolve(root.path(), "x:9").unwrap(), user(7, 9, &[], "/x"));
        // A FIFO (or a device) there is refused at once, not read or waited on.
        std::fs::remove_file(root.path().join("etc/passwd")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.path().join("etc/passwd"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        let err = resolve(root.path(), "x").unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }
}
