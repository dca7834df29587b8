//! A CRI client for `bench/coldstart.py`'s containerd rows (crictl is not packaged on
//! Debian), over `hoist_testkit::cri`.
//!
//! ```text
//! cri version SOCKET
//! cri pull SOCKET IMAGE
//! cri start SOCKET IMAGE LOGDIR EXPECT TIMEOUT_SECS -- ARGV...
//! ```
//!
//! `start` pulls IMAGE, runs a pod (host network) and a container running ARGV in it,
//! and prints one JSON line: seconds from the pull's start to the pull's end
//! (`pull_s`), to the first log line equal to EXPECT (`ready_s`, null if none came),
//! and to the container's exit (`exit_s`). Then it removes the container and the pod.

use hoist_testkit::cri::{log_lines, sandbox_config, Cri};
use std::path::Path;
use std::time::{Duration, Instant};

fn start(cri: &Cri, args: &[String]) -> Result<String, String> {
    let [image, logdir, expect, timeout, dashdash, argv @ ..] = args else {
        return Err("start SOCKET IMAGE LOGDIR EXPECT TIMEOUT_SECS -- ARGV...".into());
    };
    if dashdash != "--" || argv.is_empty() {
        return Err("start: `-- ARGV...` expected".into());
    }
    let timeout = Duration::from_secs_f64(timeout.parse().map_err(|_| "TIMEOUT_SECS")?);
    let err = |e: tonic::Status| e.message().to_string();
    let t0 = Instant::now();
    cri.pull(image).map_err(err)?;
    let pull_s = t0.elapsed().as_secs_f64();
    let sandbox = sandbox_config(Path::new(logdir), "bench");
    let pod = cri.run_pod(&sandbox).map_err(err)?;
    let result = (|| {
        let id = cri
            .start(&pod, &sandbox, "work", image, argv)
            .map_err(err)?;
        let log = Path::new(logdir).join("work.log");
        let (mut ready, mut exit) = (None, None);
        // Polled every 10 ms (the resolution of the figures), for at most TIMEOUT_SECS.
        while t0.elapsed() < timeout && exit.is_none() {
            let exited = cri.exited(&id).map_err(err)?;
            // After the status: the last lines may land just before the exit is seen.
            let lines = log_lines(&log);
            if ready.is_none() && lines.iter().any(|l| l == expect) {
                ready = Some(t0.elapsed().as_secs_f64());
            }
            if exited {
                exit = Some(t0.elapsed().as_secs_f64());
            } else {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let first = log_lines(&log).into_iter().next();
        let _ = cri.remove_container(&id);
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
    })();
    let _ = cri.remove_pod(&pod);
    result
}

fn run(args: &[String]) -> Result<String, String> {
    let [cmd, socket, rest @ ..] = args else {
        return Err("usage: cri version|pull|start SOCKET ...".into());
    };
    let cri = Cri::new(Path::new(socket));
    match (cmd.as_str(), rest) {
        ("version", []) => cri.version().map_err(|e| e.message().to_string()),
        ("pull", [image]) => cri
            .pull(image)
            .map(|id| format!("pulled {image}: {id}"))
            .map_err(|e| e.message().to_string()),
        ("start", rest) => start(&cri, rest),
        _ => Err("usage: cri version|pull|start SOCKET ...".into()),
    }
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
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
