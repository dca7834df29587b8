//! The containers `hoist run` starts, as records on disk that outlive the command.
//!
//! A container lives in `containers/NAME/` under hoist's state root:
//!
//! ```text
//! containers/NAME/state.json   its record (image, options, status), replaced atomically
//! containers/NAME/lock         flocked by the `hoist run` that owns it, for its whole life
//! containers/NAME/{image,upper,work,rootfs,config.json,log}
//! ```
//!
//! Ownership is a `flock` on `lock`, not a pid: the kernel drops the lock when its owner
//! dies, however it dies (`kill -9` included), and a pid can be reused. Whoever takes
//! the lock of a container whose record says it is running knows its `hoist run` is
//! gone: the container is then either detached (it was asked to outlive the command) or
//! orphaned, and orphans are reaped (see [`Reap`]).
//!
//! A name is claimed atomically: the directory is made, with its record and its lock
//! taken, under a temporary name, then renamed into place with `RENAME_NOREPLACE`. No
//! one ever sees a container directory without a record or an unowned new container.

use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// Largest record read back, to prevent denial of service by a damaged file.
const MAX_RECORD: u64 = 64 * 1024;

/// Where a container stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Status {
    /// Being set up: mounts, runtime spec.
    Created,
    /// runc runs it.
    Running,
    /// It exited; `code` when its exit status was seen (a detached container's is not).
    Exited {
        /// The exit code (128 + the signal when a signal ended it).
        code: Option<i32>,
    },
    /// Stopped by hoist because the `hoist run` that owned it died.
    Reaped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Status::Created => f.write_str("created"),
            Status::Running => f.write_str("running"),
            Status::Exited { code: Some(c) } => write!(f, "exited ({c})"),
            Status::Exited { code: None } => f.write_str("exited"),
            Status::Reaped => f.write_str("stopped (its hoist run died)"),
        }
    }
}

/// A container's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The image reference it runs.
    pub image: String,
    /// When it was created, seconds since the epoch.
    pub created: u64,
    /// Remove its directory when it stops (`--rm`).
    pub rm: bool,
    /// It may outlive the `hoist run` that started it (`--detach`).
    pub detach: bool,
    /// The pid of the `hoist run` that started it (for people: ownership is the lock).
    pub owner: u32,
    /// Where it stands.
    pub status: Status,
}

/// Errors of the container records.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The name is taken.
    #[error("container {name} exists ({}); remove it with `hoist rm {name}` or choose another --name", .dir.display())]
    Exists {
        /// The name.
        name: String,
        /// Its directory.
        dir: PathBuf,
    },
    /// No container has this name.
    #[error("no container {name} (`hoist ps` lists them)")]
    NotFound {
        /// The name.
        name: String,
    },
    /// The record cannot be read.
    #[error("{}: {why} (remove the directory to forget the container)", .path.display())]
    BadRecord {
        /// The record.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A file operation failed.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> ContainerError + '_ {
    move |source| ContainerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The containers' directory, `containers/` under the state root.
#[derive(Debug, Clone)]
pub struct Containers {
    dir: PathBuf,
}

/// A container's directory, with its lock held: its owner (a `hoist run`, or whoever
/// reaps or removes it) holds this for as long as it acts on the container.
#[derive(Debug)]
pub struct Held {
    /// The container's name.
    pub name: String,
    /// Its directory.
    pub dir: PathBuf,
    _lock: File,
}

impl Held {
    /// Reads the record.
    pub fn record(&self) -> Result<Record, ContainerError> {
        read_record(&self.dir)
    }

    /// Replaces the record, atomically.
    pub fn set_record(&self, record: &Record) -> Result<(), ContainerError> {
        write_record(&self.dir, record)
    }

    /// Sets the status in the record.
    pub fn set_status(&self, status: Status) -> Result<(), ContainerError> {
        let mut r = self.record()?;
        r.status = status;
        self.set_record(&r)
    }
}

/// One entry of [`Containers::list`].
#[derive(Debug)]
pub struct Entry {
    /// The name.
    pub name: String,
    /// Its record, or why it cannot be read.
    pub record: Result<Record, ContainerError>,
    /// Whether a live process holds its lock (its `hoist run`, or a reaper at work).
    pub owned: bool,
}

impl Containers {
    /// The containers under `dir` (which is created by [`Containers::claim`]).
    pub fn new(dir: impl Into<PathBuf>) -> Containers {
        Containers { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads container `name`'s record, without its lock (it may be changing).
    pub fn record(&self, name: &str) -> Result<Record, ContainerError> {
        read_record(&self.dir.join(name))
    }

    /// Claims `name`: makes its directory (mode 0700) with `record` and the lock held,
    /// atomically, or fails with [`ContainerError::Exists`]. The containers' directory
    /// must exist.
    pub fn claim(&self, name: &str, record: &Record) -> Result<Held, ContainerError> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = self.dir.join(name);
        if dir.exists() {
            return Err(ContainerError::Exists {
                name: name.into(),
                dir,
            });
        }
        let tmp = self.dir.join(format!(".new-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(io_at(&tmp))?;
        let made = (|| {
            write_record(&tmp, record)?;
            let lock = open_lock(&tmp)?;
            rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
                .map_err(|e| ContainerError::Io {
                    path: tmp.join("lock"),
                    source: e.into(),
                })?;
            let renamed = rustix::fs::renameat_with(
                rustix::fs::CWD,
                &tmp,
                rustix::fs::CWD,
                &dir,
                rustix::fs::RenameFlags::NOREPLACE,
            );
            match renamed {
                Ok(()) => Ok(lock),
                Err(rustix::io::Errno::EXIST) | Err(rustix::io::Errno::NOTEMPTY) => {
                    Err(ContainerError::Exists {
                        name: name.into(),
                        dir: dir.clone(),
                    })
                }
                Err(e) => Err(ContainerError::Io {
                    path: dir.clone(),
                    source: e.into(),
                }),
            }
        })();
        match made {
            Ok(lock) => Ok(Held {
                name: name.into(),
                dir,
                _lock: lock,
            }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }

    /// Takes the lock of container `name` if no live process holds it: `Ok(None)` when
    /// one does.
    pub fn try_hold(&self, name: &str) -> Result<Option<Held>, ContainerError> {
        let dir = self.dir.join(name);
        if !dir.is_dir() {
            return Err(ContainerError::NotFound { name: name.into() });
        }
        let lock = open_lock(&dir)?;
        match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => return Ok(None),
            Err(e) => {
                return Err(ContainerError::Io {
                    path: dir.join("lock"),
                    source: e.into(),
                })
            }
        }
        // Removed while we waited: not a container any more.
        if !dir.is_dir() {
            return Err(ContainerError::NotFound { name: name.into() });
        }
        Ok(Some(Held {
            name: name.into(),
            dir,
            _lock: lock,
        }))
    }

    /// Waits, blocking, until no one else holds container `name`'s lock, and takes it
    /// (for a watcher: it returns when the owner is gone, however it went).
    pub fn hold(&self, name: &str) -> Result<Held, ContainerError> {
        let dir = self.dir.join(name);
        let lock = open_lock(&dir)?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).map_err(|e| {
            ContainerError::Io {
                path: dir.join("lock"),
                source: e.into(),
            }
        })?;
        if !dir.is_dir() {
            return Err(ContainerError::NotFound { name: name.into() });
        }
        Ok(Held {
            name: name.into(),
            dir,
            _lock: lock,
        })
    }

    /// The containers, by name. Temporary directories of claims in progress, and of
    /// claims whose process died, are skipped (and the latter removed).
    pub fn list(&self) -> Result<Vec<Entry>, ContainerError> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_at(&self.dir)(e)),
        };
        let mut out = Vec::new();
        for e in rd {
            let e = e.map_err(io_at(&self.dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(rest) = name.strip_prefix(".new-") {
                remove_stale_claim(&e.path(), rest);
                continue;
            }
            if !e.path().is_dir() {
                continue;
            }
            let owned = match open_lock(&e.path()) {
                Ok(f) => matches!(
                    rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockShared),
                    Err(rustix::io::Errno::WOULDBLOCK)
                ),
                Err(_) => false,
            };
            out.push(Entry {
                record: read_record(&e.path()),
                name,
                owned,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

/// Removes the temporary directory of a claim whose process is gone.
fn remove_stale_claim(path: &Path, rest: &str) {
    let pid = rest
        .rsplit_once('-')
        .and_then(|(_, p)| p.parse::<i32>().ok());
    let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
    if !alive {
        let _ = std::fs::remove_dir_all(path);
    }
}

fn open_lock(dir: &Path) -> Result<File, ContainerError> {
    let path = dir.join("lock");
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ContainerError::NotFound {
                name: dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            },
            _ => ContainerError::Io { path, source: e },
        })
}

fn read_record(dir: &Path) -> Result<Record, ContainerError> {
    use std::io::Read;
    let path = dir.join("state.json");
    let mut bytes = Vec::new();
    File::open(&path)
        .and_then(|f| f.take(MAX_RECORD + 1).read_to_end(&mut bytes))
        .map_err(io_at(&path))?;
    if bytes.len() as u64 > MAX_RECORD {
        return Err(ContainerError::BadRecord {
            path,
            why: format!("larger than {MAX_RECORD} bytes"),
        });
    }
    serde_json::from_slice(&bytes).map_err(|e| ContainerError::BadRecord {
        path,
        why: e.to_string(),
    })
}

fn write_record(dir: &Path, record: &Record) -> Result<(), ContainerError> {
    let path = dir.join("state.json");
    let tmp = dir.join("state.json.tmp");
    let bytes = serde_json::to_vec_pretty(record).map_err(|e| ContainerError::BadRecord {
        path: path.clone(),
        why: e.to_string(),
    })?;
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(io_at(&path))
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            image: "oci:/x:y".into(),
            created: 1,
            rm: false,
            detach: false,
            owner: std::process::id(),
            status: Status::Created,
        }
    }

    #[test]
    fn a_name_is_claimed_once_and_held_until_its_owner_lets_go() {
        let d = tempfile::tempdir().unwrap();
        let cs = Containers::new(d.path());
        let held = cs.claim("a", &record()).unwrap();
        assert!(matches!(
            cs.claim("a", &record()),
            Err(ContainerError::Exists { .. })
        ));
        // flock is per open file: another open of the lock sees it held.
        assert!(cs.try_hold("a").unwrap().is_none());
        let listed = cs.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert!(listed[0].owned);
        assert_eq!(listed[0].record.as_ref().unwrap(), &record());
        held.set_status(Status::Exited { code: Some(3) }).unwrap();
        drop(held);
        let again = cs.try_hold("a").unwrap().expect("free once dropped");
        assert_eq!(
            again.record().unwrap().status,
            Status::Exited { code: Some(3) }
        );
        assert!(cs.list().unwrap()[0].owned);
        drop(again);
        assert!(!cs.list().unwrap()[0].owned);
        assert!(matches!(
            cs.try_hold("b"),
            Err(ContainerError::NotFound { .. })
        ));
    }

    #[test]
    fn damaged_records_and_dead_claims_do_not_break_the_list() {
        let d = tempfile::tempdir().unwrap();
        let cs = Containers::new(d.path());
        std::fs::create_dir(d.path().join("bad")).unwrap();
        std::fs::write(d.path().join("bad/state.json"), b"{not json").unwrap();
        // A claim left by a process that cannot exist.
        let stale = d.path().join(".new-x-999999999");
        std::fs::create_dir(&stale).unwrap();
        let listed = cs.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert!(matches!(
            listed[0].record,
            Err(ContainerError::BadRecord { .. })
        ));
        assert!(!stale.exists());
    }
}
