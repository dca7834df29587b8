//! The few runc commands hoist needs besides `runc run`: the state of a container, a
//! signal to it, and deleting what runc keeps of it.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::Command;

/// runc, with its state under `root`.
#[derive(Debug, Clone)]
pub struct Runc {
    root: PathBuf,
}

/// What `runc state` says of a container.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct State {
    /// `created`, `running`, `paused` or `stopped`.
    pub status: String,
    /// The pid of its init process (0 once stopped).
    #[serde(default)]
    pub pid: i32,
}

impl State {
    /// Whether its processes may still run.
    pub fn is_alive(&self) -> bool {
        self.status != "stopped"
    }
}

/// A runc command failed.
#[derive(Debug, thiserror::Error)]
#[error("runc {what} {name}: {why}")]
pub struct RuncError {
    what: &'static str,
    name: String,
    why: String,
}

impl Runc {
    /// runc with its state in `root` (`--root`).
    pub fn new(root: impl Into<PathBuf>) -> Runc {
        Runc { root: root.into() }
    }

    /// The state directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("runc");
        c.arg("--root").arg(&self.root);
        c
    }

    fn run(&self, what: &'static str, name: &str, args: &[&str]) -> Result<Vec<u8>, RuncError> {
        let out = self.cmd().args(args).output().map_err(|e| RuncError {
            what,
            name: name.into(),
            why: format!("{e} (install the runc package)"),
        })?;
        if !out.status.success() {
            return Err(RuncError {
                what,
                name: name.into(),
                why: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(out.stdout)
    }

    /// The container's state, or None if runc does not know it.
    pub fn state(&self, name: &str) -> Result<Option<State>, RuncError> {
        if !self.root.join(name).exists() {
            return Ok(None);
        }
        match self.run("state", name, &["state", name]) {
            Ok(out) => serde_json::from_slice(&out)
                .map(Some)
                .map_err(|e| RuncError {
                    what: "state",
                    name: name.into(),
                    why: e.to_string(),
                }),
            Err(e) if e.why.contains("does not exist") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sends SIGKILL to every process of the container.
    pub fn kill(&self, name: &str) -> Result<(), RuncError> {
        match self.run("kill", name, &["kill", "--all", name, "KILL"]) {
            Err(e) if e.why.contains("not running") || e.why.contains("does not exist") => Ok(()),
            r => r.map(|_| ()),
        }
    }

    /// Removes what runc keeps of the container, killing it first if it runs.
    pub fn delete(&self, name: &str) -> Result<(), RuncError> {
        match self.run("delete", name, &["delete", "--force", name]) {
            Err(e) if e.why.contains("does not exist") => Ok(()),
            r => r.map(|_| ()),
        }
    }
}
