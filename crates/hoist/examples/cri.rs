//! A minimal CRI client, as kubelet drives containerd, for `bench/coldstart.py`'s
//! containerd rows (crictl is not packaged on Debian).
//!
//! ```text
//! cri version SOCKET
//! cri pull SOCKET IMAGE
//! cri start SOCKET IMAGE LOGDIR EXPECT TIMEOUT_SECS -- ARGV...
//! ```
//!
//! `start` pulls IMAGE, runs a pod (host network) and a container running ARGV in it,
//! and prints one JSON line: seconds from the pull's start to the pull's end
//! (`pull_s`), to the first log line equal to EXPECT (`ready_s`; else the first line),
//! and to the container's exit (`exit_s`). Then it removes the container and the pod.

use k8s_cri::v1 as cri;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

async fn channel(socket: PathBuf) -> Result<Channel, String> {
    tonic::transport::Endpoint::try_from("http://[::]:50051")
        .map_err(|e| e.to_string())?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .map_err(|e| format!("connecting: {e}"))
}

fn image(name: &str) -> Option<cri::ImageSpec> {
    Some(cri::ImageSpec {
        image: name.into(),
        ..Default::default()
    })
}

/// Lines of a CRI log file (`TIME STREAM TAG TEXT`), as the container printed them.
fn log_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.splitn(4, ' ').nth(3).map(String::from))
        .collect()
}

async fn start(socket: PathBuf, args: &[String]) -> Result<String, String> {
    let [img, logdir, expect, timeout, dashdash, argv @ ..] = args else {
        return Err("start SOCKET IMAGE LOGDIR EXPECT TIMEOUT_SECS -- ARGV...".into());
    };
    if dashdash != "--" || argv.is_empty() {
        return Err("start: `-- ARGV...` expected".into());
    }
    let timeout = Duration::from_secs_f64(timeout.parse().map_err(|_| "TIMEOUT_SECS")?);
    let ch = channel(socket).await?;
    let mut images = cri::image_service_client::ImageServiceClient::new(ch.clone());
    let mut rt = cri::runtime_service_client::RuntimeServiceClient::new(ch);
    let t0 = Instant::now();
    images
        .pull_image(cri::PullImageRequest {
            image: image(img),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("PullImage {img}: {}", e.message()))?;
    let pull_s = t0.elapsed().as_secs_f64();
    let sandbox = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "bench".into(),
            uid: format!("bench-{}", std::process::id()),
            namespace: "bench".into(),
            attempt: 0,
        }),
        log_directory: logdir.clone(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Node as i32,
                    pid: cri::NamespaceMode::Container as i32,
                    ipc: cri::NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(sandbox.clone()),
            runtime_handler: String::new(),
        })
        .await
        .map_err(|e| format!("RunPodSandbox: {}", e.message()))?
        .into_inner()
        .pod_sandbox_id;
    let result = async {
        let id = rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(cri::ContainerConfig {
                    metadata: Some(cri::ContainerMetadata {
                        name: "work".into(),
                        attempt: 0,
                    }),
                    image: image(img),
                    command: argv.to_vec(),
                    log_path: "work.log".into(),
                    ..Default::default()
                }),
                sandbox_config: Some(sandbox.clone()),
            })
            .await
            .map_err(|e| format!("CreateContainer: {}", e.message()))?
            .into_inner()
            .container_id;
        rt.start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .map_err(|e| format!("StartContainer: {}", e.message()))?;
        let log = Path::new(logdir).join("work.log");
        let (mut ready, mut exit, mut first) = (None, None, None);
        while t0.elapsed() < timeout && (ready.is_none() || exit.is_none()) {
            let lines = log_lines(&log);
            if first.is_none() {
                first = lines.first().cloned();
            }
            if ready.is_none() && lines.iter().any(|l| l == expect) {
                ready = Some(t0.elapsed().as_secs_f64());
            }
            let status = rt
                .container_status(cri::ContainerStatusRequest {
                    container_id: id.clone(),
                    verbose: false,
                })
                .await
                .map_err(|e| format!("ContainerStatus: {}", e.message()))?
                .into_inner()
                .status;
            if exit.is_none()
                && status.is_some_and(|s| s.state == cri::ContainerState::ContainerExited as i32)
            {
                exit = Some(t0.elapsed().as_secs_f64());
                // The last lines may land after the exit is seen.
                let lines = log_lines(&log);
                first = first.or_else(|| lines.first().cloned());
                if ready.is_none() && lines.iter().any(|l| l == expect) {
                    ready = exit;
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = rt
            .remove_container(cri::RemoveContainerRequest { container_id: id })
            .await;
        Ok::<_, String>(
            serde_json::json!({
                "pull_s": pull_s,
                "ready_s": ready,
                "exit_s": exit,
                "first_line": first,
                "output_ok": ready.is_some(),
            })
            .to_string(),
        )
    }
    .await;
    let _ = rt
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await;
    let _ = rt
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await;
    result
}

async fn run(args: Vec<String>) -> Result<String, String> {
    let (cmd, socket, rest) = match args.as_slice() {
        [cmd, socket, rest @ ..] => (cmd.as_str(), PathBuf::from(socket), rest),
        _ => return Err("usage: cri version|pull|start SOCKET ...".into()),
    };
    match cmd {
        "version" => {
            let mut rt =
                cri::runtime_service_client::RuntimeServiceClient::new(channel(socket).await?);
            let v = rt
                .version(cri::VersionRequest::default())
                .await
                .map_err(|e| e.message().to_string())?
                .into_inner();
            Ok(format!("{} {}", v.runtime_name, v.runtime_version))
        }
        "pull" => {
            let [img] = rest else {
                return Err("pull SOCKET IMAGE".into());
            };
            let mut images =
                cri::image_service_client::ImageServiceClient::new(channel(socket).await?);
            images
                .pull_image(cri::PullImageRequest {
                    image: image(img),
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("PullImage {img}: {}", e.message()))?;
            Ok(format!("pulled {img}"))
        }
        "start" => start(socket, rest).await,
        other => Err(format!("unknown command {other}")),
    }
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    match rt.block_on(run(args)) {
        Ok(out) => {
            println!("{out}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cri: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
