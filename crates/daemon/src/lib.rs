//! The hoist daemon: two processes serving any number of lazy mounts, driven over a
//! local API (a unix socket, one JSON line each way, typed in [`api`]) that the `hoist`
//! command and later the containerd snapshotter use. An image is served once per set of
//! options, at a private mount point, and every mount point of it is a bind mount of
//! that (see [`Daemon`]). The [`holder`] keeps each served image's FUSE connection and
//! runs the server as its child; the server ([`serve`]) opens images, fetches and
//! serves, and when it dies or is restarted the next one takes every mount over without
//! remounting (`hoist_fs::takeover`).
//!
//! Its state lives under one root (`$HOIST_HOME`, else `/var/lib/hoist`, mode 0700):
//!
//! ```text
//! daemon.sock     the API socket (0600), bound by the holder
//! holder.sock     the servers' socket to the holder (0600)
//! daemon.lock     held while a daemon runs: one daemon per root
//! start.lock      taken by clients starting a daemon: one starts it, the others wait
//! daemon.log      the daemon's log
//! cache/          the chunk cache (hoist-cache), unless a mount names another
//! mounts/         one record per mount point and per served image, to clean up after
//!                 a daemon that died
//! run/images/     the served images' private mount points
//! run/<id>/       per served image: private mount points (the blob device files of
//!                 erofs mounts, which loop devices read until the blobs' views replace
//!                 them) and the record of how its inodes are open (for a successor)
//! ```
//!
//! (`hoist run` adds `containers/` and `runc/` beside these; the daemon only mounts.)
//!
//! Lifecycle: a daemon starts (cleaning up mounts a dead daemon left), serves, and on
//! SIGTERM, SIGINT or a `shutdown` request unmounts everything and exits. A server that
//! dies otherwise is replaced at once, its mounts kept. A mount is *ready* once the
//! kernel serves it, and goes away on `umount` (lazily: a busy mount is detached at once
//! and released by its last user).

pub mod api;
pub mod holder;
mod home;
mod image;
mod metadev;
mod plan;
mod record;
mod served;
mod server;

pub use holder::run;
pub use home::Home;
pub use served::Served;
pub use server::{detach_orphan, forget, remember, serve, spawn_and_wait, wait_stopped, Daemon};
