//! Runs a container on a mounted hoist image.
//!
//! `hoist run` mounts an image lazily and then needs what `docker run` does: a writable
//! layer and a process started the way the image's config says. This crate does that
//! part, and leaves running the container to `runc`, the reference OCI runtime:
//!
//! - [`ImageConfig`] reads the run settings of an OCI image config (entrypoint, cmd,
//!   env, working directory, user), untrusted input, with docker's rules for combining
//!   them with a command line ([`ImageConfig::process`]).
//! - [`user::resolve`] turns the config's `User` (`name`, `uid`, `name:group`,
//!   `uid:gid`) into ids through the image's own `/etc/passwd` and `/etc/group`, as
//!   runc's libcontainer does (no library reads another root's user database).
//! - [`spec::build`] writes the OCI runtime spec (`config.json`), starting from the
//!   defaults of the `oci-spec` crate (runc's defaults: namespaces, mounts, masked
//!   paths) with docker's default capabilities and the host's network.
//! - [`overlay`] puts an overlayfs writable layer on top of the read-only image mount.
//! - [`containers`] keeps a record of each container that outlives the command, with
//!   ownership held as a lock, so that a container whose `hoist run` died is found and
//!   reaped; [`runc`] queries, signals and deletes containers.

pub mod containers;
pub mod overlay;
pub mod runc;
pub mod spec;
pub mod user;

use serde_json::Value;

/// Errors preparing a container.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The image config is unusable.
    #[error("image config: {0}")]
    Config(String),
    /// The user cannot be resolved in the image.
    #[error("user {user:?}: {why}")]
    User {
        /// The config's or command line's user.
        user: String,
        /// Why.
        why: String,
    },
    /// Building the runtime spec failed.
    #[error("runtime spec: {0}")]
    Spec(String),
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
}

/// Longest list (env, args) taken from an image config, to prevent denial of service.
const MAX_LIST: usize = 4096;

/// The run settings of an OCI image config (`config` object of the image config JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env`, `NAME=VALUE`.
    pub env: Vec<String>,
    /// `WorkingDir`.
    pub working_dir: String,
    /// `User`.
    pub user: String,
}

impl ImageConfig {
    /// Reads the run settings from an image config document (the whole JSON; a missing
    /// `config` object means an image without settings).
    pub fn from_json(doc: &Value) -> Result<ImageConfig, RuntimeError> {
        let c = &doc["config"];
        if !(c.is_object() || c.is_null()) {
            return Err(RuntimeError::Config("`config` is not an object".into()));
        }
        let list = |key: &str| -> Result<Vec<String>, RuntimeError> {
            match &c[key] {
                Value::Null => Ok(Vec::new()),
                Value::Array(a) if a.len() <= MAX_LIST => a
                    .iter()
                    .map(|v| {
                        v.as_str().map(str::to_string).ok_or_else(|| {
                            RuntimeError::Config(format!("`{key}` holds a non-string"))
                        })
                    })
                    .collect(),
                _ => Err(RuntimeError::Config(format!(
                    "`{key}` is not a list of at most {MAX_LIST} strings"
                ))),
            }
        };
        let string = |key: &str| -> Result<String, RuntimeError> {
            match &c[key] {
                Value::Null => Ok(String::new()),
                Value::String(s) => Ok(s.clone()),
                _ => Err(RuntimeError::Config(format!("`{key}` is not a string"))),
            }
        };
        Ok(ImageConfig {
            entrypoint: list("Entrypoint")?,
            cmd: list("Cmd")?,
            env: list("Env")?,
            working_dir: string("WorkingDir")?,
            user: string("User")?,
        })
    }

    /// The process to run, by docker's rules: the entrypoint (or `entrypoint` when
    /// given; an empty one clears it) followed by `cmd` when given, else by the image's
    /// cmd when the entrypoint was not replaced.
    pub fn process(
        &self,
        entrypoint: Option<&str>,
        cmd: &[String],
    ) -> Result<Vec<String>, RuntimeError> {
        let mut args: Vec<String> = match entrypoint {
            Some("") => Vec::new(),
            Some(e) => vec![e.to_string()],
            None => self.entrypoint.clone(),
        };
        if !cmd.is_empty() {
            args.extend(cmd.iter().cloned());
        } else if entrypoint.is_none() {
            args.extend(self.cmd.iter().cloned());
        }
        if args.is_empty() {
            return Err(RuntimeError::Config(
                "the image has no entrypoint or cmd; name a command (hoist run IMAGE -- CMD...)"
                    .into(),
            ));
        }
        Ok(args)
    }
}

/// The environment of a process, and the entries left out of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Environment {
    /// `NAME=VALUE` entries, for the runtime spec.
    pub vars: Vec<String>,
    /// Entries without `=`, which runc refuses: left out (each unsets its name).
    pub dropped: Vec<String>,
}

/// The environment of the process: the image's, then `extra` (`NAME=VALUE`, replacing
/// a variable of the same name), with `PATH` and `HOME` added when missing (and `TERM`
/// with a terminal), as docker does.
///
/// An entry without `=` (`FOO` in an image config's `Env`) is not a variable: runc
/// refuses it. Docker's daemon leaves such entries out and lets them unset a variable of
/// that name (one of its defaults, in `ReplaceOrAppendEnvValues`, or the image's, when
/// `-e FOO` names it). This function does the same, in order: `FOO` removes a `FOO=`
/// listed before it and the default of that name, and is left out; the entries left
/// out are returned, for a warning.
pub fn environment(image: &[String], extra: &[String], home: &str, tty: bool) -> Environment {
    let name = |e: &str| e.split_once('=').map_or(e, |(n, _)| n).to_string();
    let mut env: Vec<String> = Vec::new();
    let mut dropped = Vec::new();
    let mut unset = std::collections::HashSet::new();
    for e in image.iter().chain(extra) {
        let n = name(e);
        env.retain(|x| name(x) != n);
        if e.contains('=') {
            unset.remove(&n);
            env.push(e.clone());
        } else {
            unset.insert(n);
            dropped.push(e.clone());
        }
    }
    let missing = |env: &[String], n: &str| !unset.contains(n) && !env.iter().any(|e| name(e) == n);
    if missing(&env, "PATH") {
        env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    if missing(&env, "HOME") {
        env.push(format!("HOME={home}"));
    }
    if tty && missing(&env, "TERM") {
        env.push("TERM=xterm".into());
    }
    Environment { vars: env, dropped }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(v: Value) -> ImageConfig {
        ImageConfig::from_json(&json!({ "config": v })).unwrap()
    }

    #[test]
    fn docker_rules_for_entrypoint_and_cmd() {
        let c = cfg(json!({"Entrypoint": ["/ep", "-x"], "Cmd": ["a", "b"]}));
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(c.process(None, &[]).unwrap(), s(&["/ep", "-x", "a", "b"]));
        assert_eq!(c.process(None, &s(&["c"])).unwrap(), s(&["/ep", "-x", "c"]));
        assert_eq!(c.process(Some("/other"), &[]).unwrap(), s(&["/other"]));
        assert_eq!(c.process(Some(""), &s(&["ls"])).unwrap(), s(&["ls"]));
        assert!(c.process(Some(""), &[]).is_err());
        let c = cfg(json!({"Cmd": ["sh"]}));
        assert_eq!(c.process(None, &[]).unwrap(), s(&["sh"]));
        assert!(cfg(json!({})).process(None, &[]).is_err());
    }

    #[test]
    fn bad_configs_are_errors_not_panics() {
        for bad in [
            json!({"config": 3}),
            json!({"config": {"Cmd": "sh"}}),
            json!({"config": {"Env": [1]}}),
            json!({"config": {"User": 0}}),
        ] {
            assert!(ImageConfig::from_json(&bad).is_err(), "{bad}");
        }
        assert_eq!(
            ImageConfig::from_json(&json!({})).unwrap(),
            ImageConfig::default()
        );
    }

    #[test]
    fn environment_merges_and_fills_in() {
        let env = environment(
            &["A=1".into(), "PATH=/x".into()],
            &["A=2".into(), "B=3".into()],
            "/root",
            false,
        );
        assert_eq!(env.vars, ["PATH=/x", "A=2", "B=3", "HOME=/root"]);
        assert!(env.dropped.is_empty());
        let env = environment(&[], &[], "/", true).vars;
        assert!(env.iter().any(|e| e.starts_with("PATH=/usr/local/sbin")));
        assert!(env.contains(&"TERM=xterm".to_string()));
    }

    /// Issue 19: image config `Env` entries without `=` reached runc, which refuses
    /// them. They are left out, as docker's daemon does, unsetting their name (what came
    /// before, or hoist's default), and reported.
    #[test]
    fn env_entries_without_equals_are_left_out_and_unset_their_name() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let env = environment(
            &s(&["A=1", "FOO", "A", "B=2", "HOME"]),
            &s(&["C"]),
            "/root",
            false,
        );
        assert_eq!(env.dropped, s(&["FOO", "A", "HOME", "C"]));
        assert!(env.vars.iter().all(|e| e.contains('=')), "{:?}", env.vars);
        // A is unset, HOME's default is not added; PATH's is.
        assert_eq!(env.vars[0], "B=2");
        assert!(env.vars[1].starts_with("PATH="));
        assert_eq!(env.vars.len(), 2, "{:?}", env.vars);
        // A later NAME=VALUE sets it again.
        let env = environment(&s(&["HOME"]), &s(&["HOME=/h"]), "/root", false);
        assert!(env.vars.contains(&"HOME=/h".to_string()), "{:?}", env.vars);
    }
}
