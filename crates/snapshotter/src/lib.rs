//! hoist's containerd snapshotter: containerd's snapshots API (gRPC) on a unix socket,
//! plugged into containerd as a proxy plugin
//! (`[proxy_plugins.hoist] type = "snapshot" address = "…"`).
//!
//! The main design choice: a hoist image is one lazy mount, not a stack of unpacked
//! layers. containerd hands every layer of an image to the snapshotter before it would
//! download it; hoist's layers carry a label (`containerd.io/snapshot/hoist.layer`,
//! from the annotation `hoist convert` writes), and for those `Prepare` commits the
//! snapshot itself and answers `AlreadyExists`, so containerd downloads nothing. The
//! metadata layer's snapshot mounts the whole image through the hoist daemon (its mount
//! survives the snapshotter's restarts and the daemon's takeovers); a container's root is
//! an overlay over it. Everything else (the sandbox image, any ordinary image) is
//! served as containerd's own overlayfs snapshotter would, from directories containerd
//! unpacks into. See [`snapshotter`] for the logic and [`service`] for the gRPC face.
//!
//! The server code is generated in `build.rs` with tonic's manual builder over the
//! message types of `containerd-client` (containerd's own Rust crate, which generates
//! clients only); `containerd-snapshots`, the crate with a server trait, is bound to
//! tonic 0.9, and one current tonic serves this and the CRI client of the tests.

pub mod filter;
pub mod metrics;
pub mod service;
pub mod snapshotter;
pub mod store;

pub mod grpc {
    //! The generated server of containerd's snapshots API.
    #![allow(missing_docs, clippy::all)]
    /// google.protobuf.Empty, as prost maps it.
    pub type Empty = ();
    include!(concat!(
        env!("OUT_DIR"),
        "/containerd.services.snapshots.v1.Snapshots.rs"
    ));
}

pub use snapshotter::{Counterpart, Error, ImageMounter, Snapshotter};

use std::path::Path;
use std::sync::Arc;

/// Serves `snapshotter` on the unix socket `socket` until `shutdown` completes. A stale
/// socket file is replaced; the socket is made 0600 (containerd runs as root).
pub async fn serve(
    socket: &Path,
    snapshotter: Arc<Snapshotter>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("removing the old socket {}: {e}", socket.display())),
    }
    let listener = tokio::net::UnixListener::bind(socket)
        .map_err(|e| format!("binding {}: {e}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(grpc::snapshots_server::SnapshotsServer::new(
            service::Service::new(snapshotter),
        ))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| format!("serving {}: {e}", socket.display()))
}
