//! A small CRI client, as kubelet drives containerd (crictl is not packaged on Debian):
//! for the containerd tests and the benchmark's containerd rows. Calls block; errors are
//! returned as the gRPC status, with the call named.

use k8s_cri::v1 as cri;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

pub use k8s_cri::v1;

/// A channel to a unix socket.
pub async fn channel(socket: PathBuf) -> Result<Channel, tonic::transport::Error> {
    tonic::transport::Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
}

/// A pod with the host's network (no CNI needed) and its logs in `log_dir`.
pub fn sandbox_config(log_dir: &Path, name: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}-{}", std::process::id()),
            namespace: "hoist-test".into(),
            attempt: 0,
        }),
        log_directory: log_dir.display().to_string(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Node as i32,
                    pid: cri::NamespaceMode::Container as i32,
                    ipc: cri::NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The lines a container printed, from its CRI log file (`TIME STREAM TAG TEXT`).
pub fn log_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.splitn(4, ' ').nth(3).map(String::from))
        .collect()
}

fn image(name: &str) -> Option<cri::ImageSpec> {
    Some(cri::ImageSpec {
        image: name.into(),
        ..Default::default()
    })
}

fn named(call: &str, e: tonic::Status) -> tonic::Status {
    tonic::Status::new(e.code(), format!("{call}: {}", e.message()))
}

/// A CRI client of one containerd.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    socket: PathBuf,
}

impl Cri {
    /// A client of the CRI socket `socket`.
    pub fn new(socket: &Path) -> Cri {
        Cri {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime"),
            socket: socket.to_path_buf(),
        }
    }

    fn channel(&self) -> Result<Channel, tonic::Status> {
        self.rt
            .block_on(channel(self.socket.clone()))
            .map_err(|e| tonic::Status::unavailable(format!("{}: {e}", self.socket.display())))
    }

    /// Runs a future on the client's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    fn images(
        &self,
    ) -> Result<cri::image_service_client::ImageServiceClient<Channel>, tonic::Status> {
        Ok(cri::image_service_client::ImageServiceClient::new(
            self.channel()?,
        ))
    }

    fn runtime(
        &self,
    ) -> Result<cri::runtime_service_client::RuntimeServiceClient<Channel>, tonic::Status> {
        Ok(cri::runtime_service_client::RuntimeServiceClient::new(
            self.channel()?,
        ))
    }

    /// The runtime's name and version.
    pub fn version(&self) -> Result<String, tonic::Status> {
        let v = self
            .rt
            .block_on(self.runtime()?.version(cri::VersionRequest::default()))?
            .into_inner();
        Ok(format!("{} {}", v.runtime_name, v.runtime_version))
    }

    /// PullImage; the image's id.
    pub fn pull(&self, name: &str) -> Result<String, tonic::Status> {
        self.rt
            .block_on(self.images()?.pull_image(cri::PullImageRequest {
                image: image(name),
                ..Default::default()
            }))
            .map(|r| r.into_inner().image_ref)
            .map_err(|e| named(&format!("PullImage {name}"), e))
    }

    /// RemoveImage.
    pub fn remove_image(&self, name: &str) -> Result<(), tonic::Status> {
        self.rt
            .block_on(
                self.images()?
                    .remove_image(cri::RemoveImageRequest { image: image(name) }),
            )
            .map(|_| ())
            .map_err(|e| named(&format!("RemoveImage {name}"), e))
    }

    /// RunPodSandbox; the pod's id.
    pub fn run_pod(&self, config: &cri::PodSandboxConfig) -> Result<String, tonic::Status> {
        self.rt
            .block_on(self.runtime()?.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            }))
            .map(|r| r.into_inner().pod_sandbox_id)
            .map_err(|e| named("RunPodSandbox", e))
    }

    /// StopPodSandbox and RemovePodSandbox.
    pub fn remove_pod(&self, pod: &str) -> Result<(), tonic::Status> {
        let mut c = self.runtime()?;
        self.rt
            .block_on(c.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.into(),
            }))
            .map_err(|e| named("StopPodSandbox", e))?;
        self.rt
            .block_on(c.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod.into(),
            }))
            .map(|_| ())
            .map_err(|e| named("RemovePodSandbox", e))
    }

    /// Stops and removes every pod (and so its containers), ignoring errors: the
    /// cleanup of a test that failed half-way, so that no shim or container outlives it.
    pub fn remove_all_pods(&self) {
        let Ok(mut c) = self.runtime() else {
            return;
        };
        let Ok(pods) = self
            .rt
            .block_on(c.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None }))
        else {
            return;
        };
        for pod in pods.into_inner().items {
            let _ = self.remove_pod(&pod.id);
        }
    }

    /// CreateContainer and StartContainer of `argv` from `image` in `pod`, logging to
    /// `NAME.log` in the pod's log directory; its id. containerd answers Unavailable while
    /// it reconnects to a restarted snapshotter (its gRPC backoff, at most 3 s): retried
    /// for up to 20 s, as kubelet retries.
    pub fn start(
        &self,
        pod: &str,
        sandbox: &cri::PodSandboxConfig,
        name: &str,
        image_name: &str,
        argv: &[String],
    ) -> Result<String, tonic::Status> {
        let mut c = self.runtime()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let id = loop {
            let r = self
                .rt
                .block_on(c.create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: pod.into(),
                    config: Some(cri::ContainerConfig {
                        metadata: Some(cri::ContainerMetadata {
                            name: name.into(),
                            attempt: 0,
                        }),
                        image: image(image_name),
                        command: argv.to_vec(),
                        log_path: format!("{name}.log"),
                        ..Default::default()
                    }),
                    sandbox_config: Some(sandbox.clone()),
                }));
            match r {
                Ok(r) => break r.into_inner().container_id,
                Err(e) if e.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(named(&format!("CreateContainer {name}"), e)),
            }
        };
        self.rt
            .block_on(c.start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            }))
            .map_err(|e| named(&format!("StartContainer {name}"), e))?;
        Ok(id)
    }

    /// Whether the container has exited.
    pub fn exited(&self, id: &str) -> Result<bool, tonic::Status> {
        let s = self
            .rt
            .block_on(
                self.runtime()?
                    .container_status(cri::ContainerStatusRequest {
                        container_id: id.into(),
                        verbose: false,
                    }),
            )
            .map_err(|e| named("ContainerStatus", e))?
            .into_inner()
            .status;
        Ok(s.is_some_and(|s| s.state == cri::ContainerState::ContainerExited as i32))
    }

    /// StopContainer (5 s) and RemoveContainer. containerd may still report a container
    /// that just exited as running: the removal is retried until it has seen the exit
    /// (at most 10 s).
    pub fn remove_container(&self, id: &str) -> Result<(), tonic::Status> {
        let mut c = self.runtime()?;
        // A container that exits while it is being stopped may fail the stop (its shim
        // goes away): that is no error once it has exited.
        if let Err(e) = self
            .rt
            .block_on(c.stop_container(cri::StopContainerRequest {
                container_id: id.into(),
                timeout: 5,
            }))
        {
            // containerd records the exit a moment later: wait for it (10 s at most).
            let deadline = Instant::now() + Duration::from_secs(10);
            while !self.exited(id).unwrap_or(false) {
                if Instant::now() > deadline {
                    return Err(named("StopContainer", e));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self
                .rt
                .block_on(c.remove_container(cri::RemoveContainerRequest {
                    container_id: id.into(),
                })) {
                Ok(_) => return Ok(()),
                Err(e) if e.message().contains("still running") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(named("RemoveContainer", e)),
            }
        }
    }
}
