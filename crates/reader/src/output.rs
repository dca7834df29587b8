//! The directory a command writes an image into (`unpack`, `export`): new or empty, and
//! put back the way it was found when the command fails, so that a failure leaves no
//! partial tree behind.
//!
//! A directory that did not exist is removed with every parent made for it. One that
//! existed (it was empty: nothing else is accepted) is emptied again and gets back its
//! owner, mode and times, which an unpack sets from the image's root.

use crate::ReadError;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A directory being written.
#[derive(Debug)]
pub struct OutputDir {
    path: PathBuf,
    /// The topmost directory made for it, when it did not exist.
    created: Option<PathBuf>,
    /// Owner, group, mode and mtime of a directory that existed.
    found: Option<(u32, u32, u32, fs::FileTimes)>,
}

impl OutputDir {
    /// Takes `path` for output: it must be missing (it is created, with its missing
    /// parents) or an empty directory. `verb` names the command in the error (`unpack`).
    pub fn new(path: &Path, verb: &str) -> Result<OutputDir, ReadError> {
        let io_err = |source| ReadError::Io {
            path: path.display().to_string(),
            source,
        };
        match fs::read_dir(path) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(ReadError::Invalid(format!(
                        "{} is not empty; {verb} into a new directory",
                        path.display()
                    )));
                }
                let m = fs::metadata(path).map_err(io_err)?;
                let times = fs::FileTimes::new()
                    .set_accessed(m.accessed().map_err(io_err)?)
                    .set_modified(m.modified().map_err(io_err)?);
                Ok(OutputDir {
                    path: path.to_path_buf(),
                    created: None,
                    found: Some((m.uid(), m.gid(), m.mode() & 0o7777, times)),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let absolute = std::path::absolute(path).map_err(io_err)?;
                let mut top = absolute.clone();
                while let Some(parent) = top.parent() {
                    if fs::symlink_metadata(parent).is_ok() {
                        break;
                    }
                    top = parent.to_path_buf();
                }
                fs::create_dir_all(path).map_err(io_err)?;
                Ok(OutputDir {
                    path: path.to_path_buf(),
                    created: Some(top),
                    found: None,
                })
            }
            Err(e) => Err(io_err(e)),
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Puts the directory back as it was found: removes what was written (and the
    /// directories made for it), restores the attributes of one that existed.
    pub fn discard(self) -> io::Result<()> {
        if let Some(top) = &self.created {
            return remove_all(top);
        }
        for entry in fs::read_dir(&self.path)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                remove_all(&entry.path())?;
            } else {
                fs::remove_file(entry.path())?;
            }
        }
        if let Some((uid, gid, mode, times)) = self.found {
            std::os::unix::fs::chown(&self.path, Some(uid), Some(gid))?;
            fs::set_permissions(&self.path, fs::Permissions::from_mode(mode))?;
            fs::File::open(&self.path)?.set_times(times)?;
        }
        Ok(())
    }
}

/// Removes a directory tree; directories an unprivileged user cannot enter or change
/// (an image's mode-000 directories) are made accessible first.
fn remove_all(dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            make_accessible(dir);
            fs::remove_dir_all(dir)
        }
        other => other,
    }
}

fn make_accessible(dir: &Path) {
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                make_accessible(&entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_directory_and_its_parents_are_removed() {
        let base = tempfile::tempdir().unwrap();
        let target = base.path().join("a/b/c");
        let out = OutputDir::new(&target, "unpack").unwrap();
        fs::create_dir(target.join("sub")).unwrap();
        fs::write(target.join("sub/f"), b"x").unwrap();
        fs::set_permissions(target.join("sub"), fs::Permissions::from_mode(0o000)).unwrap();
        out.discard().unwrap();
        assert!(!base.path().join("a").exists());
        assert!(base.path().exists());
    }

    #[test]
    fn an_existing_empty_directory_is_emptied_and_restored() {
        let base = tempfile::tempdir().unwrap();
        let target = base.path().join("t");
        fs::create_dir(&target).unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o751)).unwrap();
        let out = OutputDir::new(&target, "unpack").unwrap();
        fs::write(target.join("f"), b"x").unwrap();
        fs::create_dir(target.join("d")).unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o700)).unwrap();
        out.discard().unwrap();
        assert_eq!(fs::read_dir(&target).unwrap().count(), 0);
        let mode = fs::metadata(&target).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o751);
        // A directory holding anything is refused, and left alone.
        fs::write(target.join("mine"), b"user data").unwrap();
        let err = OutputDir::new(&target, "unpack").unwrap_err().to_string();
        assert!(
            err.contains("is not empty; unpack into a new directory"),
            "{err}"
        );
        assert!(target.join("mine").exists());
    }
}
