//! Generates the server side of containerd's snapshots API (`containerd.services.
//! snapshots.v1.Snapshots`) with tonic's manual service builder, over the message types
//! `containerd-client` generates from containerd's protos. containerd-client builds
//! clients only, and `containerd-snapshots` (the crate that has a server) is tied to
//! tonic 0.9; this keeps one current tonic and needs no `.proto` file here.

use tonic_build::manual::{Builder, Method, Service};

fn main() {
    const MSG: &str = "containerd_client::services::v1::snapshots";
    let method = |name: &str, route: &str, input: &str, output: &str| {
        Method::builder()
            .name(name)
            .route_name(route)
            .input_type(format!("{MSG}::{input}"))
            .output_type(output)
            .codec_path("tonic_prost::ProstCodec")
    };
    // google.protobuf.Empty, which prost maps to `()` (a path is needed here).
    let empty = "crate::grpc::Empty";
    let service = Service::builder()
        .name("Snapshots")
        .package("containerd.services.snapshots.v1")
        .method(
            method(
                "prepare",
                "Prepare",
                "PrepareSnapshotRequest",
                &format!("{MSG}::PrepareSnapshotResponse"),
            )
            .build(),
        )
        .method(
            method(
                "view",
                "View",
                "ViewSnapshotRequest",
                &format!("{MSG}::ViewSnapshotResponse"),
            )
            .build(),
        )
        .method(
            method(
                "mounts",
                "Mounts",
                "MountsRequest",
                &format!("{MSG}::MountsResponse"),
            )
            .build(),
        )
        .method(method("commit", "Commit", "CommitSnapshotRequest", empty).build())
        .method(method("remove", "Remove", "RemoveSnapshotRequest", empty).build())
        .method(
            method(
                "stat",
                "Stat",
                "StatSnapshotRequest",
                &format!("{MSG}::StatSnapshotResponse"),
            )
            .build(),
        )
        .method(
            method(
                "update",
                "Update",
                "UpdateSnapshotRequest",
                &format!("{MSG}::UpdateSnapshotResponse"),
            )
            .build(),
        )
        .method(
            method(
                "list",
                "List",
                "ListSnapshotsRequest",
                &format!("{MSG}::ListSnapshotsResponse"),
            )
            .server_streaming()
            .build(),
        )
        .method(
            method(
                "usage",
                "Usage",
                "UsageRequest",
                &format!("{MSG}::UsageResponse"),
            )
            .build(),
        )
        .method(method("cleanup", "Cleanup", "CleanupRequest", empty).build())
        .build();
    Builder::new()
        .build_client(false)
        .build_transport(false)
        .compile(&[service]);
}
