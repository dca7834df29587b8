//! The gRPC face of [`Snapshotter`]: containerd's `containerd.services.snapshots.v1.
//! Snapshots`, each call run on a blocking thread (mounting an image waits on the hoist
//! daemon, and a commit walks a directory).

use crate::grpc::snapshots_server::Snapshots;
use crate::grpc::Empty;
use crate::snapshotter::{Error, Info, Mount, Snapshotter};
use crate::store::{Kind, Time};
use containerd_client::services::v1::snapshots as pb;
use containerd_client::types::Mount as PbMount;
use std::collections::BTreeMap;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// How many snapshots one `List` message carries.
const LIST_BATCH: usize = 100;

/// The service containerd calls.
pub struct Service {
    inner: Arc<Snapshotter>,
}

impl Service {
    /// Serves `snapshotter`.
    pub fn new(snapshotter: Arc<Snapshotter>) -> Service {
        Service { inner: snapshotter }
    }

    async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Snapshotter) -> Result<R, Error> + Send + 'static,
    ) -> Result<R, Status> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| Status::internal(format!("snapshotter task: {e}")))?
            .map_err(status)
    }
}

/// The gRPC status of an error; containerd turns the code back into its own errors
/// (`errdefs.FromGRPC`), so NotFound and AlreadyExists keep their meaning.
pub fn status(e: Error) -> Status {
    match e {
        Error::NotFound(m) => Status::not_found(m),
        Error::AlreadyExists(m) => Status::already_exists(m),
        Error::InvalidArgument(m) => Status::invalid_argument(m),
        Error::FailedPrecondition(m) => Status::failed_precondition(m),
        Error::Unavailable(m) => Status::unavailable(m),
        Error::Internal(m) => Status::internal(m),
    }
}

fn mounts(m: Vec<Mount>) -> Vec<PbMount> {
    m.into_iter()
        .map(|m| PbMount {
            r#type: m.fs_type,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn labels(l: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    l.into_iter().collect()
}

fn timestamp(t: Time) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.secs,
        nanos: t.nanos,
    }
}

fn info(i: Info) -> pb::Info {
    let s = i.snapshot;
    pb::Info {
        name: i.name,
        parent: s.parent.unwrap_or_default(),
        kind: match s.kind {
            Kind::View => pb::Kind::View,
            Kind::Active => pb::Kind::Active,
            Kind::Committed => pb::Kind::Committed,
        } as i32,
        created_at: Some(timestamp(s.created)),
        updated_at: Some(timestamp(s.updated)),
        labels: s.labels.into_iter().collect(),
    }
}

#[tonic::async_trait]
impl Snapshots for Service {
    async fn prepare(
        &self,
        req: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = req.into_inner();
        let m = self
            .run(move |s| s.prepare(&r.key, &r.parent, labels(r.labels)))
            .await?;
        Ok(Response::new(pb::PrepareSnapshotResponse {
            mounts: mounts(m),
        }))
    }

    async fn view(
        &self,
        req: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = req.into_inner();
        let m = self
            .run(move |s| s.view(&r.key, &r.parent, labels(r.labels)))
            .await?;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: mounts(m),
        }))
    }

    async fn mounts(
        &self,
        req: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let r = req.into_inner();
        let m = self.run(move |s| s.mounts(&r.key)).await?;
        Ok(Response::new(pb::MountsResponse { mounts: mounts(m) }))
    }

    async fn commit(
        &self,
        req: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<Empty>, Status> {
        let r = req.into_inner();
        self.run(move |s| s.commit(&r.name, &r.key, labels(r.labels)))
            .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        req: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<Empty>, Status> {
        let r = req.into_inner();
        self.run(move |s| s.remove(&r.key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        req: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let r = req.into_inner();
        let i = self.run(move |s| s.stat(&r.key)).await?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(info(i)),
        }))
    }

    async fn update(
        &self,
        req: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let i = r
            .info
            .ok_or_else(|| Status::invalid_argument("update without a snapshot info"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let i = self
            .run(move |s| s.update(&i.name, labels(i.labels), &paths))
            .await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(info(i)),
        }))
    }

    type ListStream =
        tokio_stream::Iter<std::vec::IntoIter<Result<pb::ListSnapshotsResponse, Status>>>;

    async fn list(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = req.into_inner();
        let all = self.run(move |s| s.list(&r.filters)).await?;
        let mut batches = Vec::new();
        let mut it = all.into_iter().map(info).peekable();
        while it.peek().is_some() {
            batches.push(Ok(pb::ListSnapshotsResponse {
                info: it.by_ref().take(LIST_BATCH).collect(),
            }));
        }
        Ok(Response::new(tokio_stream::iter(batches)))
    }

    async fn usage(
        &self,
        req: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let r = req.into_inner();
        let (size, inodes) = self.run(move |s| s.usage(&r.key)).await?;
        Ok(Response::new(pb::UsageResponse { size, inodes }))
    }

    async fn cleanup(&self, _req: Request<pb::CleanupRequest>) -> Result<Response<Empty>, Status> {
        self.run(|s| s.cleanup()).await?;
        Ok(Response::new(()))
    }
}
