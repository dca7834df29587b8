//! The snapshots' records, kept in one JSON file that is replaced atomically on every
//! change: a restart of the snapshotter (or of the node) finds what it had.
//!
//! A snapshot's own files live in `<root>/<id>/`: `fs` (what containerd unpacks a layer
//! into, or a container's upper directory), `work` (overlayfs's work directory) and, for
//! a hoist image, `image` (its lazy mount).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The records file.
const RECORDS: &str = "snapshots.json";
/// Its format version.
const VERSION: u32 = 1;

/// What a snapshot is, as containerd sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Read-only, of a committed parent.
    View,
    /// Writable: a layer being unpacked, or a container's root.
    Active,
    /// Immutable, a parent for others.
    Committed,
}

/// Where a snapshot's files come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Content {
    /// A directory of its own (`fs`), filled by containerd or by a container.
    Dir,
    /// A layer of a hoist image with no files of its own: the image's mount, in the
    /// snapshot of its metadata layer, holds the whole tree.
    HoistLayer,
    /// A hoist image, mounted lazily by the hoist daemon at `image`.
    HoistImage {
        /// The reference it was mounted from (`docker://REPO@DIGEST`).
        image: String,
    },
}

/// A moment, as seconds and nanoseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Time {
    /// Seconds.
    pub secs: i64,
    /// Nanoseconds.
    pub nanos: i32,
}

impl Time {
    /// Now.
    pub fn now() -> Time {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Time {
            secs: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nanos: d.subsec_nanos() as i32,
        }
    }
}

/// One snapshot's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Names its directory under the root.
    pub id: u64,
    /// Its kind.
    pub kind: Kind,
    /// The committed snapshot below it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// containerd's labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// When it was made.
    pub created: Time,
    /// When it last changed.
    pub updated: Time,
    /// Where its files come from.
    pub content: Content,
    /// Bytes and inodes of its directory, measured when it was committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<(i64, i64)>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Records {
    version: u32,
    next_id: u64,
    snapshots: BTreeMap<String, Snapshot>,
}

/// Why the records could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The records file does not parse.
    #[error("{path}: {why} (move it away to start with no snapshots; containerd then pulls its images again)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

/// The records of every snapshot, and the directory that holds their files.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    records: Records,
}

impl Store {
    /// Opens (or starts) the records under `root`, a directory only root can enter.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        use std::os::unix::fs::DirBuilderExt;
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(io_err(root))?;
        let path = root.join(RECORDS);
        let records = match fs::read(&path) {
            Ok(bytes) => {
                let r: Records =
                    serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                        path: path.clone(),
                        why: e.to_string(),
                    })?;
                if r.version != VERSION {
                    return Err(StoreError::Corrupt {
                        path,
                        why: format!("format version {}, not {VERSION}", r.version),
                    });
                }
                r
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Records {
                version: VERSION,
                next_id: 1,
                snapshots: BTreeMap::new(),
            },
            Err(e) => return Err(io_err(&path)(e)),
        };
        Ok(Store {
            root: root.to_path_buf(),
            records,
        })
    }

    /// The directory of snapshot `id`'s files.
    pub fn dir(&self, id: u64) -> PathBuf {
        self.root.join(id.to_string())
    }

    /// The root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A snapshot by key or name.
    pub fn get(&self, key: &str) -> Option<&Snapshot> {
        self.records.snapshots.get(key)
    }

    /// Every snapshot, by key or name.
    pub fn all(&self) -> impl Iterator<Item = (&String, &Snapshot)> {
        self.records.snapshots.iter()
    }

    /// Whether some snapshot has `key` as its parent.
    pub fn has_children(&self, key: &str) -> bool {
        self.records
            .snapshots
            .values()
            .any(|s| s.parent.as_deref() == Some(key))
    }

    /// The snapshot's ancestors, nearest first.
    pub fn ancestors(&self, snap: &Snapshot) -> Vec<&Snapshot> {
        let mut out = Vec::new();
        let mut next = snap.parent.as_deref();
        while let Some(p) = next.and_then(|k| self.get(k)) {
            // Records are acyclic by construction (a parent exists before its child);
            // the bound only guards a hand-edited file.
            if out.len() > self.records.snapshots.len() {
                break;
            }
            out.push(p);
            next = p.parent.as_deref();
        }
        out
    }

    /// Applies `change` to the records and writes them; on any failure the records are
    /// as they were.
    pub fn change<R, E: From<StoreError>>(
        &mut self,
        change: impl FnOnce(&mut Changes<'_>) -> Result<R, E>,
    ) -> Result<R, E> {
        let before = (self.records.next_id, self.records.snapshots.clone());
        let r = change(&mut Changes {
            records: &mut self.records,
        })
        .and_then(|r| self.save().map(|()| r).map_err(E::from));
        if r.is_err() {
            (self.records.next_id, self.records.snapshots) = before;
        }
        r
    }

    fn save(&self) -> Result<(), StoreError> {
        let path = self.root.join(RECORDS);
        let io_err = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(&self.records).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            why: e.to_string(),
        })?;
        let mut tmp = tempfile::NamedTempFile::new_in(&self.root).map_err(io_err)?;
        tmp.write_all(&bytes).map_err(io_err)?;
        tmp.as_file().sync_all().map_err(io_err)?;
        tmp.persist(&path).map_err(|e| io_err(e.error))?;
        fs::File::open(&self.root)
            .and_then(|d| d.sync_all())
            .map_err(io_err)
    }
}

/// The records while a change is made to them.
pub struct Changes<'a> {
    records: &'a mut Records,
}

impl Changes<'_> {
    /// A new snapshot id.
    pub fn next_id(&mut self) -> u64 {
        let id = self.records.next_id;
        self.records.next_id += 1;
        id
    }

    /// Adds or replaces a snapshot.
    pub fn insert(&mut self, key: &str, snap: Snapshot) {
        self.records.snapshots.insert(key.to_string(), snap);
    }

    /// Removes a snapshot.
    pub fn remove(&mut self, key: &str) -> Option<Snapshot> {
        self.records.snapshots.remove(key)
    }

    /// A snapshot, to change.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Snapshot> {
        self.records.snapshots.get_mut(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: u64, parent: Option<&str>) -> Snapshot {
        Snapshot {
            id,
            kind: Kind::Committed,
            parent: parent.map(String::from),
            labels: BTreeMap::new(),
            created: Time::now(),
            updated: Time::now(),
            content: Content::Dir,
            usage: None,
        }
    }

    #[test]
    fn records_survive_a_reopen_and_a_failed_change_leaves_them_as_they_were() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("s");
        let mut store = Store::open(&root).unwrap();
        store
            .change(|c| {
                let id = c.next_id();
                c.insert("a", snap(id, None));
                let id = c.next_id();
                c.insert("b", snap(id, Some("a")));
                Ok::<_, StoreError>(())
            })
            .unwrap();
        let r: Result<(), StoreError> = store.change(|c| {
            c.remove("a");
            Err(StoreError::Corrupt {
                path: PathBuf::new(),
                why: "refused".into(),
            })
        });
        assert!(r.is_err());
        assert!(store.get("a").is_some());
        let again = Store::open(&root).unwrap();
        assert_eq!(again.get("b"), store.get("b"));
        assert_eq!(again.ancestors(again.get("b").unwrap()).len(), 1);
        assert!(again.has_children("a"));
        assert_eq!(again.records.next_id, 3);
    }

    #[test]
    fn a_damaged_records_file_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(RECORDS), b"{not json").unwrap();
        let e = Store::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains(RECORDS), "{e}");
    }
}
