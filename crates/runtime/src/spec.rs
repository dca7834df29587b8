//! The OCI runtime spec (`config.json`) of a container.
//!
//! It starts from the `oci-spec` crate's defaults, which are runc's (`runc spec`): pid,
//! ipc, uts, mount and cgroup namespaces; /proc, /dev, /dev/pts, /dev/shm, /dev/mqueue
//! and a read-only /sys; masked and read-only kernel paths; no new privileges; 1024
//! open files. On top come the image's process settings, docker's default capability
//! set (runc's is too small for ordinary images: no chown, no setuid), and the host's
//! network: no network namespace, with the host's resolv.conf and hosts bound read-only,
//! so a container reaches what its host reaches.

use crate::user::User;
use crate::RuntimeError;
use oci_spec::runtime::{
    Capability, LinuxCapabilitiesBuilder, LinuxNamespaceType, Mount, MountBuilder, ProcessBuilder,
    RootBuilder, Spec, UserBuilder,
};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// What the container runs.
#[derive(Debug, Clone)]
pub struct Container {
    /// The process's argv.
    pub args: Vec<String>,
    /// Its environment.
    pub env: Vec<String>,
    /// Its working directory (absolute; `/` when the image names none).
    pub cwd: String,
    /// Its user.
    pub user: User,
    /// The root filesystem.
    pub rootfs: PathBuf,
    /// The host name inside.
    pub hostname: String,
    /// Give it a terminal.
    pub terminal: bool,
    /// Its cgroup (runc's `cgroupsPath`). runc's default, the container's name at the
    /// top of each hierarchy, is shared by containers of one name in two hoist homes,
    /// and by a container and the processes its namesake left behind.
    pub cgroup: String,
}

/// docker's default capabilities (moby `oci/caps/defaults.go`).
const DOCKER_CAPS: [Capability; 14] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// Host files bound read-only into a container that shares the host's network.
const HOST_NETWORK_FILES: [&str; 2] = ["/etc/resolv.conf", "/etc/hosts"];

/// Builds the runtime spec of `c`.
pub fn build(c: &Container) -> Result<Spec, RuntimeError> {
    let err = |e: oci_spec::OciSpecError| RuntimeError::Spec(e.to_string());
    let caps: HashSet<Capability> = DOCKER_CAPS.into_iter().collect();
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        .build()
        .map_err(err)?;
    let user = UserBuilder::default()
        .uid(c.user.uid)
        .gid(c.user.gid)
        .additional_gids(c.user.additional_gids.clone())
        .build()
        .map_err(err)?;
    let cwd = if c.cwd.starts_with('/') {
        c.cwd.clone()
    } else {
        format!("/{}", c.cwd)
    };
    let mut process = ProcessBuilder::default()
        .terminal(c.terminal)
        .args(c.args.clone())
        .env(c.env.clone())
        .cwd(cwd)
        .user(user)
        .capabilities(capabilities)
        .no_new_privileges(true)
        .build()
        .map_err(err)?;
    if let Some(d) = oci_spec::runtime::Process::default().rlimits() {
        process.set_rlimits(Some(d.clone()));
    }
    let mut spec = Spec::default();
    spec.set_process(Some(process));
    spec.set_root(Some(
        RootBuilder::default()
            .path(c.rootfs.clone())
            .readonly(false)
            .build()
            .map_err(err)?,
    ));
    spec.set_hostname(Some(c.hostname.clone()));
    let mut mounts: Vec<Mount> = spec.mounts().clone().unwrap_or_default();
    for f in HOST_NETWORK_FILES {
        if Path::new(f).exists() {
            mounts.push(
                MountBuilder::default()
                    .destination(f)
                    .typ("bind")
                    .source(f)
                    .options(vec!["rbind".into(), "ro".into()])
                    .build()
                    .map_err(err)?,
            );
        }
    }
    spec.set_mounts(Some(mounts));
    if let Some(linux) = spec.linux_mut() {
        if let Some(ns) = linux.namespaces_mut() {
            ns.retain(|n| n.typ() != LinuxNamespaceType::Network);
        }
        linux.set_cgroups_path(Some(c.cgroup.clone().into()));
    }
    Ok(spec)
}

/// Writes `spec` as `BUNDLE/config.json`.
pub fn write(bundle: &Path, spec: &Spec) -> Result<(), RuntimeError> {
    let path = bundle.join("config.json");
    let json = serde_json::to_vec_pretty(spec).map_err(|e| RuntimeError::Spec(e.to_string()))?;
    std::fs::write(&path, json).map_err(|source| RuntimeError::Io {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_carries_the_process_and_shares_the_network() {
        let c = Container {
            args: vec!["python3".into(), "/app/main.py".into()],
            env: vec!["PATH=/usr/bin".into(), "A=1".into()],
            cwd: "app".into(),
            user: User {
                uid: 1000,
                gid: 50,
                additional_gids: vec![29],
                home: "/home/app".into(),
            },
            rootfs: "/tmp/rootfs".into(),
            hostname: "box".into(),
            terminal: false,
            cgroup: "/hoist-0123-box".into(),
        };
        let v = serde_json::to_value(build(&c).unwrap()).unwrap();
        let p = &v["process"];
        assert_eq!(p["args"], serde_json::json!(["python3", "/app/main.py"]));
        assert_eq!(p["env"], serde_json::json!(["PATH=/usr/bin", "A=1"]));
        assert_eq!(p["cwd"], "/app");
        assert_eq!(p["user"]["uid"], 1000);
        assert_eq!(p["user"]["gid"], 50);
        assert_eq!(p["user"]["additionalGids"], serde_json::json!([29]));
        assert_eq!(p["terminal"], false);
        assert!(p["capabilities"]["bounding"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("CAP_CHOWN")));
        assert_eq!(v["root"]["path"], "/tmp/rootfs");
        assert_eq!(v["root"]["readonly"], false);
        assert_eq!(v["hostname"], "box");
        assert_eq!(v["linux"]["cgroupsPath"], "/hoist-0123-box");
        let ns: Vec<&str> = v["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert!(ns.contains(&"pid") && ns.contains(&"mount") && !ns.contains(&"network"));
        assert!(v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["destination"] == "/proc"));
    }
}
