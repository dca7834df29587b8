//! What an integration test needs from the machine: the real test images, root, FUSE, loop
//! devices, commands. A test that cannot have one fails, naming what is missing and how to
//! get it; the one exception is [`UNPRIVILEGED`], for a machine without root.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// Set (to anything) on a machine without root, the tests that need root are skipped, each
/// saying so on the terminal, instead of failing (README, "Tests").
pub const UNPRIVILEGED: &str = "HOIST_TESTS_UNPRIVILEGED";

/// A real component a test uses.
#[derive(Debug, Clone, Copy)]
pub enum Need {
    /// Root: mounts, loop devices, device files, owners.
    Root,
    /// `/dev/fuse`.
    Fuse,
    /// The loop driver's control device, `/dev/loop-control`, opened for writing.
    LoopDevices,
    /// A command on `PATH`, with the Debian package that has it.
    Tool {
        /// The command.
        command: &'static str,
        /// The package to install.
        package: &'static str,
    },
}

impl Need {
    /// A command from the Debian package of the same name.
    pub const fn tool(command: &'static str) -> Need {
        Need::Tool {
            command,
            package: command,
        }
    }

    /// What is missing and how to get it, or `None` when this machine has it.
    fn missing(&self) -> Option<String> {
        let lacks = match self {
            Need::Root => !is_root(),
            Need::Fuse => !Path::new("/dev/fuse").exists(),
            Need::LoopDevices => std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/loop-control")
                .is_err(),
            Need::Tool { command, .. } => find_tool(command).is_none(),
        };
        lacks.then(|| match self {
            Need::Root => "root (run the tests as root: sudo bash .ci/run)".to_string(),
            Need::Fuse => "/dev/fuse (apt-get install fuse3; modprobe fuse)".to_string(),
            Need::LoopDevices => {
                "loop devices, /dev/loop-control (modprobe loop; and root)".to_string()
            }
            Need::Tool { command, package } => {
                format!("{command} on PATH (apt-get install {package})")
            }
        })
    }
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The file `command` names on `PATH`.
pub fn find_tool(command: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(command))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| {
                m.is_file()
                    && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
            })
        })
}

/// Checks that the machine has everything `what` (a test or a group of tests) needs. Fails
/// the test with the list of what is missing and how to get each; returns `false`, after
/// saying so on the terminal, only when root is among them and [`UNPRIVILEGED`] is set.
pub fn require(what: &str, needs: &[Need]) -> bool {
    let missing: Vec<String> = needs.iter().filter_map(Need::missing).collect();
    if missing.is_empty() {
        return true;
    }
    let lacks_root = !is_root() && needs.iter().any(|n| matches!(n, Need::Root));
    if lacks_root && std::env::var_os(UNPRIVILEGED).is_some() {
        // Past cargo's capture of passing tests' output, so that a skip is seen.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED ({UNPRIVILEGED}): {what} need {}",
            missing.join("; ")
        );
        return false;
    }
    panic!(
        "{what} need what this machine lacks: {}{}",
        missing.join("; "),
        if lacks_root {
            format!(". On a machine without root, {UNPRIVILEGED}=1 skips the tests that need it")
        } else {
            String::new()
        }
    );
}

/// The OCI layout of the real test images (`tiny-v1`, `debian-python-v1`,
/// `debian-python-v2`), as `scripts/test-images.sh` finds it: `HOIST_FIXTURES`, else
/// `../shared/fixtures/oci` beside the checkout, else the images it builds and caches (once,
/// about a minute; its progress shows on the terminal). Fails the test when there are none.
pub fn fixtures() -> PathBuf {
    static LAYOUT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match LAYOUT.get_or_init(find_or_build_fixtures) {
        Ok(layout) => layout.clone(),
        Err(e) => panic!("{e}"),
    }
}

fn find_or_build_fixtures() -> Result<PathBuf, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/test-images.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("running bash {}: {e}", script.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout.lines().last() {
        Some(layout) if out.status.success() => Ok(PathBuf::from(layout)),
        _ => Err(format!(
            "no test images: {} ({}; what it said is above) found none and could not build \
             them. It needs root and Debian's mirror; or set HOIST_FIXTURES to an OCI layout \
             holding tiny-v1, debian-python-v1 and debian-python-v2",
            script.display(),
            out.status
        )),
    }
}
