//! The hoist daemon: one process serving any number of lazy mounts, driven over a local
//! API (a unix socket speaking JSON lines, [`api`]) that the `hoist` command and later
//! the containerd snapshotter use.
//!
//! Its state lives under one root (`$HOIST_HOME`, else `/var/lib/hoist`):
//!
//! ```text
//! daemon.sock     the API socket (0600)
//! daemon.lock     held while a daemon runs: one daemon per root
//! daemon.log      the daemon's log
//! cache/          the chunk cache (hoist-cache), unless a mount names another
//! mounts/         one record per live mount, to clean up after a daemon that died
//! run/            private mount points (the blob device files of erofs mounts, which
//!                 loop devices read until the blobs' views replace them)
//! ```
//!
//! (`hoist run` adds `containers/` and `runc/` beside these; the daemon only mounts.)
//!
//! Lifecycle: a daemon starts (cleaning up mounts a dead predecessor left), serves, and
//! on SIGTERM, SIGINT or a `shutdown` request unmounts everything and exits. A mount is
//! *ready* once the kernel serves it, and goes away on `umount` (lazily: a busy mount is
//! detached at once and released by its last user).

pub mod api;
mod home;
mod image;
mod plan;
mod record;
mod served;
mod server;

pub use home::Home;
pub use served::Served;
pub use server::{detach_orphan, forget, remember, run, spawn_and_wait, Daemon};
