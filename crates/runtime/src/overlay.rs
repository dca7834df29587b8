//! The container's writable layer: overlayfs over the read-only image mount.

use crate::RuntimeError;
use rustix::mount::{MountFlags, UnmountFlags};
use std::path::Path;

/// Mounts overlayfs on `target` with the image mount `lower` below and `upper` (with its
/// work directory `work`, on the same filesystem) taking the writes.
pub fn mount(lower: &Path, upper: &Path, work: &Path, target: &Path) -> Result<(), RuntimeError> {
    let mut data = String::new();
    for (key, p) in [("lowerdir", lower), ("upperdir", upper), ("workdir", work)] {
        let s = p.to_str().filter(|s| !s.contains([',', ':', '\\'])).ok_or_else(|| {
            RuntimeError::Spec(format!(
                "{}: overlayfs cannot take a path with ',', ':' or '\\' (choose another HOIST_HOME)",
                p.display()
            ))
        })?;
        if !data.is_empty() {
            data.push(',');
        }
        data.push_str(key);
        data.push('=');
        data.push_str(s);
    }
    rustix::mount::mount(
        "overlay",
        target,
        "overlay",
        MountFlags::empty(),
        data.as_str(),
    )
    .map_err(|e| RuntimeError::Io {
        path: target.display().to_string(),
        source: std::io::Error::new(
            std::io::Error::from(e).kind(),
            format!("mount -t overlay -o {data}: {e}"),
        ),
    })
}

/// Detaches the overlay at `target` (lazily: a process still inside keeps it).
pub fn unmount(target: &Path) -> Result<(), RuntimeError> {
    rustix::mount::unmount(target, UnmountFlags::DETACH).map_err(|e| RuntimeError::Io {
        path: target.display().to_string(),
        source: e.into(),
    })
}
