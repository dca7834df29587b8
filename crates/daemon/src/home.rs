//! Where hoist keeps its state: `$HOIST_HOME`, private to root.

use std::path::{Path, PathBuf};

/// The layout of hoist's state root.
#[derive(Debug, Clone)]
pub struct Home {
    /// The root.
    pub root: PathBuf,
}

impl Home {
    /// `$HOIST_HOME`, else `/var/lib/hoist`.
    pub fn from_env() -> Home {
        let root = std::env::var_os("HOIST_HOME")
            .filter(|h| !h.is_empty())
            .map_or_else(|| PathBuf::from("/var/lib/hoist"), PathBuf::from);
        Home { root }
    }
    /// The API socket.
    pub fn socket(&self) -> PathBuf {
        self.root.join("daemon.sock")
    }
    /// The default chunk cache.
    pub fn cache(&self) -> PathBuf {
        self.root.join("cache")
    }
    /// Mount records.
    pub fn mounts(&self) -> PathBuf {
        self.root.join("mounts")
    }
    /// Private mount points.
    pub fn run(&self) -> PathBuf {
        self.root.join("run")
    }
    /// The daemon log.
    pub fn log(&self) -> PathBuf {
        self.root.join("daemon.log")
    }

    /// Creates the root, or makes an existing one private: mode 0700, so that no other
    /// user reaches the mounts, containers and cache below it (an image's setuid files
    /// and device nodes work inside its containers, and credentials pass the socket).
    pub fn create(&self) -> std::io::Result<()> {
        private_dir(&self.root)
    }

    /// Creates `dir` (under the root, which is created first) with mode 0700, or makes
    /// an existing one 0700.
    pub fn private_dir(&self, dir: &Path) -> std::io::Result<()> {
        self.create()?;
        private_dir(dir)
    }
}

/// Creates `dir` and its missing parents, then makes `dir` mode 0700 if group or others
/// had any access to it. Errors name the directory.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let named =
        |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", dir.display()));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(named)?;
    let mode = std::fs::metadata(dir).map_err(named)?.permissions().mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o700))
            .map_err(named)?;
    }
    Ok(())
}
