//! One module per subcommand.

mod containers;
mod convert;
mod export;
mod mount;
mod read;
mod run;
mod snapshotter;

use crate::args::{Command, DaemonOp, RegistryArgs};
use hoist_oci::ImageRef;
use hoist_registry::{Credentials, RegistryConfig};
use std::path::PathBuf;
use std::time::Duration;

/// What every command needs besides its own arguments.
pub struct Context {
    /// How to reach registries.
    pub registry: RegistryConfig,
    /// The root of hoist's state: `$HOIST_HOME`, else `/var/lib/hoist`.
    pub home: PathBuf,
}

impl Context {
    fn new(args: &RegistryArgs) -> anyhow::Result<Context> {
        let creds = args
            .creds
            .as_deref()
            .map(Credentials::parse)
            .transpose()
            .map_err(|e| anyhow::anyhow!("--creds: {e}"))?;
        let home = hoist_daemon::Home::from_env().root;
        Ok(Context {
            registry: RegistryConfig {
                plain_http: args.plain_http,
                creds,
                stall_timeout: Duration::from_secs(args.timeout.max(1)),
                retries: args.retries,
                hosts_dir: Some(args.hosts_dir.clone()),
                ..RegistryConfig::default()
            },
            home,
        })
    }

    /// Opens an image for reading.
    pub fn open_source(&self, reference: &str) -> anyhow::Result<Box<dyn hoist_oci::ImageSource>> {
        Ok(hoist_registry::open_source(
            &ImageRef::parse(reference)?,
            &self.registry,
        )?)
    }

    fn open_hoist(&self, reference: &str) -> anyhow::Result<hoist_reader::HoistImage> {
        Ok(hoist_reader::HoistImage::open(
            self.open_source(reference)?,
        )?)
    }
}

/// Runs a subcommand.
pub fn run(command: Command, registry: &RegistryArgs) -> anyhow::Result<()> {
    let cx = Context::new(registry)?;
    // Any command that works on hoist's state first reaps the containers whose `hoist
    // run` died (its watcher normally has already); `run`, `ps` and `rm` do it themselves.
    if matches!(
        command,
        Command::Mount(_)
            | Command::Umount { .. }
            | Command::Stat { .. }
            | Command::Daemon {
                op: DaemonOp::Stop | DaemonOp::Status { .. } | DaemonOp::Restart
            }
            | Command::Cache { .. }
    ) {
        containers::reap_all(&hoist_daemon::Home {
            root: cx.home.clone(),
        });
    }
    match command {
        Command::Convert(args) => convert::run(&cx, &args),
        Command::Unpack { image, dir } => read::unpack(&cx, &image, &dir),
        Command::Check { image } => read::check(&cx, &image),
        Command::Inspect { image, json } => read::inspect(&cx, &image, json),
        Command::Export { image, dir } => export::run(&cx, &image, &dir),
        Command::Mount(args) => mount::mount(&cx, registry, &args),
        Command::Run(args) => run::run(&cx, registry, &args),
        Command::Record(args) => run::record(&cx, registry, &args),
        Command::Ps { json } => containers::ps(&cx, json),
        Command::Rm { names, force } => containers::rm(&cx, &names, force),
        Command::WatchContainer { name } => containers::watch(&cx, &name),
        Command::Umount { mountpoint } => mount::umount(&cx, &mountpoint),
        Command::Stat { mountpoint, json } => mount::stat(&cx, &mountpoint, json),
        Command::Cache { op } => mount::cache(&cx, op),
        Command::Daemon { op } => mount::daemon(&cx, op),
        Command::Snapshotter(args) => snapshotter::run(&cx, registry, &args),
    }
}

/// `12.3 MB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// The trace named by `--prefetch-trace FILE` (a `hoist record` trace) or
/// `--prefetch-files FILE` (paths, one per line), checked.
pub fn trace_arg(
    trace: Option<&std::path::Path>,
    files: Option<&std::path::Path>,
) -> anyhow::Result<Option<hoist_reader::trace::Trace>> {
    use anyhow::Context as _;
    use hoist_reader::trace::Trace;
    if let Some(p) = trace {
        let bytes =
            std::fs::read(p).with_context(|| format!("--prefetch-trace {}", p.display()))?;
        let t = Trace::parse(&bytes).with_context(|| {
            format!(
                "--prefetch-trace {}: expected a trace written by `hoist record`",
                p.display()
            )
        })?;
        return Ok(Some(t));
    }
    if let Some(p) = files {
        let text = std::fs::read_to_string(p)
            .with_context(|| format!("--prefetch-files {}", p.display()))?;
        return Ok(Some(
            Trace::from_file_list(&text)
                .with_context(|| format!("--prefetch-files {}", p.display()))?,
        ));
    }
    Ok(None)
}
