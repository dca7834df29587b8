//! `hoist snapshotter`: containerd's snapshots API, with hoist images mounted by the
//! daemon.

use super::mount::{home, mount_spec, start_daemon};
use super::Context;
use crate::args::{RegistryArgs, SnapshotterArgs};
use anyhow::{anyhow, Context as _};
use hoist_daemon::api::{ClientError, DaemonError, MountSpec};
use hoist_daemon::Home;
use hoist_snapshotter::{Error, ImageMounter, Snapshotter};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Mounts images through the hoist daemon of a state root, with one set of options.
struct Daemon {
    home: Home,
    template: MountSpec,
}

fn error(e: ClientError) -> Error {
    match e {
        ClientError::Refused(DaemonError::NotFound(m)) => Error::NotFound(m),
        ClientError::Refused(DaemonError::AlreadyExists(m)) => Error::AlreadyExists(m),
        ClientError::Refused(DaemonError::InvalidArgument(m)) => Error::InvalidArgument(m),
        ClientError::Refused(DaemonError::Unavailable(m)) => Error::Unavailable(m),
        ClientError::Refused(DaemonError::Internal(m)) => Error::Internal(m),
        other => Error::Unavailable(other.to_string()),
    }
}

impl Daemon {
    fn client(&self) -> Result<hoist_daemon::api::Client, Error> {
        start_daemon(&self.home).map_err(|e| Error::Unavailable(format!("{e:#}")))
    }
}

impl ImageMounter for Daemon {
    fn mount(&self, image: &str, mountpoint: &Path) -> Result<(), Error> {
        let spec = MountSpec {
            image: image.to_string(),
            mountpoint: mountpoint.to_path_buf(),
            // A container's image: its setuid files and device nodes work, under the
            // snapshotter's root-only directory.
            suid: true,
            dev: true,
            ..self.template.clone()
        };
        self.client()?
            .mount(spec)
            .map(|_| ())
            .map_err(|e| match error(e) {
                Error::NotFound(m) => Error::NotFound(format!("image {image}: {m}")),
                Error::Unavailable(m) => Error::Unavailable(format!("image {image}: {m}")),
                other => other,
            })
    }

    fn umount(&self, mountpoint: &Path) -> Result<(), Error> {
        if !hoist_fs::kernel::is_mountpoint(mountpoint) {
            return Ok(());
        }
        match self.client()?.umount(mountpoint) {
            Ok(()) | Err(ClientError::Refused(DaemonError::NotFound(_))) => Ok(()),
            Err(e) => Err(error(e)),
        }
    }

    fn counterpart(
        &self,
        image_ref: &str,
        manifest_digest: &str,
    ) -> Result<Option<hoist_snapshotter::Counterpart>, Error> {
        use hoist_oci::{media, ImageSource};
        let bad = |e: String| Error::Unavailable(format!("{image_ref}: {e}"));
        let reference = hoist_oci::ImageRef::parse(&format!("docker://{image_ref}"))
            .map_err(|e| bad(e.to_string()))?;
        let hoist_oci::ImageRef::Registry {
            registry,
            repository,
            ..
        } = &reference
        else {
            return Ok(None);
        };
        let r = &self.template.registry;
        let cfg = hoist_registry::RegistryConfig {
            plain_http: r.plain_http,
            creds: r
                .creds
                .as_deref()
                .map(hoist_registry::Credentials::parse)
                .transpose()
                .map_err(|e| bad(e.to_string()))?,
            retries: r.retries,
            stall_timeout: std::time::Duration::from_secs(r.timeout_secs.max(1)),
            hosts_dir: r.hosts_dir.clone(),
            ..hoist_registry::RegistryConfig::default()
        };
        let image = hoist_registry::open_remote(&reference, "pull", &cfg)
            .map_err(|e| bad(e.to_string()))?;
        let (top, _, media_type) = image.top().map_err(|e| bad(e.to_string()))?;
        let doc: serde_json::Value =
            serde_json::from_slice(&top).map_err(|e| bad(e.to_string()))?;
        if !hoist_oci::is_index(&doc, &media_type) {
            return Ok(None);
        }
        let entries = doc["manifests"].as_array().cloned().unwrap_or_default();
        let Some(hoist) = entries.iter().find(|m| {
            m["annotations"][media::ANNOTATION_SOURCE_MANIFEST].as_str() == Some(manifest_digest)
        }) else {
            return Ok(None);
        };
        let Some(original) = entries
            .iter()
            .find(|m| m["digest"].as_str() == Some(manifest_digest))
        else {
            return Ok(None);
        };
        let (digest, size, _) =
            hoist_oci::descriptor(original, "index entry").map_err(|e| bad(e.to_string()))?;
        let manifest: serde_json::Value = serde_json::from_slice(
            &image
                .manifest_at(&digest, size)
                .map_err(|e| bad(e.to_string()))?,
        )
        .map_err(|e| bad(e.to_string()))?;
        let layers = manifest["layers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["digest"].as_str().map(String::from))
            .collect();
        let (hoist_digest, _, _) =
            hoist_oci::descriptor(hoist, "hoist index entry").map_err(|e| bad(e.to_string()))?;
        Ok(Some(hoist_snapshotter::Counterpart {
            image: format!("docker://{registry}/{repository}@{hoist_digest}"),
            layers,
        }))
    }

    fn is_mounted(&self, mountpoint: &Path) -> bool {
        hoist_fs::kernel::is_mountpoint(mountpoint)
            && hoist_daemon::api::Client::connect(&self.home.socket())
                .and_then(|mut c| c.list())
                .is_ok_and(|l| l.iter().any(|s| s.mountpoint == mountpoint))
    }
}

pub fn run(cx: &Context, registry: &RegistryArgs, args: &SnapshotterArgs) -> anyhow::Result<()> {
    let home = home(cx);
    home.create()
        .with_context(|| format!("creating {}", home.root.display()))?;
    let root = home.root.join("snapshots");
    let socket: PathBuf = args
        .socket
        .clone()
        .unwrap_or_else(|| home.root.join("snapshotter.sock"));
    let template = mount_spec(&home, registry, "", PathBuf::new(), &args.opts)?;
    let images = Daemon {
        home: Home {
            root: home.root.clone(),
        },
        template,
    };
    let snapshotter = Arc::new(
        Snapshotter::open(&root, Box::new(images))
            .map_err(|e| anyhow!("opening the snapshots in {}: {e}", root.display()))?,
    );
    let metrics = args.metrics_address.map(|addr| {
        let view = DaemonStats {
            home: Home {
                root: home.root.clone(),
            },
        };
        (
            addr,
            Arc::new(hoist_snapshotter::metrics::Metrics::new(
                snapshotter.clone(),
                Box::new(view),
            )),
        )
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("a SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("stopping: the mounts stay, served by the hoist daemon");
            let _ = stop.send(true);
        });
        let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        if let Some((addr, metrics)) = metrics {
            let rx = stopped.clone();
            tokio::spawn(async move {
                if let Err(e) =
                    hoist_snapshotter::metrics::serve(addr, metrics, until_stopped(rx)).await
                {
                    tracing::error!("{e}");
                }
            });
        }
        tracing::info!(
            "serving containerd's snapshots API on {} (snapshots in {})",
            socket.display(),
            root.display()
        );
        hoist_snapshotter::serve(&socket, snapshotter, until_stopped(stopped))
            .await
            .map_err(|e| anyhow!(e))
    })
}

/// The daemon's mounts and takeovers, for the metrics endpoint; never starts a daemon.
#[derive(Debug)]
struct DaemonStats {
    home: Home,
}

impl hoist_snapshotter::metrics::DaemonView for DaemonStats {
    fn mounts(&self) -> Option<(Vec<hoist_daemon::api::Stats>, u64)> {
        let mut c = hoist_daemon::api::Client::connect(&self.home.socket()).ok()?;
        let takeovers = c.ping().ok()?.holder.map_or(0, |h| h.takeovers);
        Some((c.list().ok()?, takeovers))
    }
}
