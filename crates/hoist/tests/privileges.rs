//! Issue 19, critical row: an image's setuid-root files and device nodes give no host
//! user privileges, through any path hoist creates. Tested as an unprivileged user
//! (setpriv to nobody) against `hoist mount` in both modes and against `hoist run`'s
//! image and rootfs mounts. Before the fix every probe below printed `0` (root) or
//! opened the device.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const NOBODY: &str = "65534";

/// Needs root, FUSE, umoci, runc, skopeo and setpriv; `None` (skipped) only without root
/// and with `HOIST_TESTS_UNPRIVILEGED`.
fn setup() -> Option<PathBuf> {
    require(
        "privilege tests",
        &[
            Need::Root,
            Need::Fuse,
            Need::tool("runc"),
            Need::tool("umoci"),
            Need::tool("skopeo"),
            Need::Tool {
                command: "setpriv",
                package: "util-linux",
            },
        ],
    )
    .then(fixtures)
}

fn sh(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A directory every user can traverse (0755, under /var/tmp), so that only the modes
/// and mount options hoist sets stand between nobody and the image; removed like the
/// scratch directory.
fn open_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = removed_unless_failed("hoist-priv-");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    })
}

/// Puts a setuid-root copy of the host's `id` at `dir/rootid` and a world-readable
/// character device (1:3, the host's /dev/null) at `dir/nulldev`.
fn plant(dir: &Path) {
    let id = dir.join("rootid");
    std::fs::copy("/usr/bin/id", &id).unwrap();
    std::os::unix::fs::chown(&id, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&id, std::fs::Permissions::from_mode(0o4755)).unwrap();
    sh(Command::new("mknod")
        .args(["-m", "0666"])
        .arg(dir.join("nulldev"))
        .args(["c", "1", "3"]));
}

/// tiny-v1 plus the planted files, converted; returns the hoist image.
fn image(layout: &Path) -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let s = scratch().join("priv-image");
        std::fs::create_dir_all(&s).unwrap();
        let oci = s.join("oci");
        sh(Command::new("skopeo").args([
            "copy",
            "-q",
            &format!("oci:{}:tiny-v1", layout.display()),
            &format!("oci:{}:priv", oci.display()),
        ]));
        let bundle = s.join("bundle");
        let src = format!("{}:priv", oci.display());
        sh(Command::new("umoci")
            .args(["unpack", "--image", &src])
            .arg(&bundle));
        plant(&bundle.join("rootfs"));
        sh(Command::new("umoci")
            .args(["repack", "--image", &src])
            .arg(&bundle));
        let hoisted = format!("oci:{}:priv", s.join("hoist").display());
        hoist_ok(&["convert", &format!("oci:{src}"), &hoisted]);
        hoisted
    })
}

fn as_nobody(args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
        ])
        .args(args)
        .output()
        .unwrap()
}

/// What nobody's run of `path -u` prints as its effective uid, or its error. A shell
/// running as nobody looks the path up: setpriv itself still holds root's capabilities
/// when it calls execve, so a path it execs directly is resolved past directories that
/// nobody could enter.
fn euid_via(path: &Path) -> Result<String, String> {
    let out = as_nobody(&["/bin/sh", "-c", "exec \"$0\" -u", path.to_str().unwrap()]);
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).trim().to_string()),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

/// Whether nobody can open (and read) the device node at `path`; its error if not.
fn device_opens(path: &Path) -> Result<(), String> {
    let out = as_nobody(&["head", "-c", "1", path.to_str().unwrap()]);
    match out.status.success() {
        true => Ok(()),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

/// Asserts that nobody gains nothing through the planted files under `root`.
fn assert_no_privilege(root: &Path, what: &str) {
    match euid_via(&root.join("rootid")) {
        Ok(euid) => assert_eq!(euid, NOBODY, "setuid root honoured through {what}"),
        Err(e) => assert!(e.contains("Permission denied"), "{what}: {e}"),
    }
    let e = device_opens(&root.join("nulldev"))
        .expect_err(&format!("a device node of the image opened through {what}"));
    assert!(e.contains("Permission denied"), "{what}: {e}");
}

fn mount_flags(path: &Path) -> rustix::fs::StatVfsMountFlags {
    rustix::fs::statvfs(path).unwrap().f_flag
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn hoist_in(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hoist"))
        .args(args)
        .env("HOIST_HOME", home)
        .output()
        .unwrap()
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A state root in the open directory, made 0755 beforehand as a careless admin would;
/// its daemon is stopped when dropped.
struct Home(PathBuf);

impl Home {
    fn new(name: &str) -> Home {
        let p = open_dir().join(name);
        std::fs::create_dir_all(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        Home(p)
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        let _ = hoist_in(&self.0, &["daemon", "stop"]);
    }
}

/// A `hoist run` in the background, stopped (SIGTERM, bounded) when dropped, so that a
/// failed assertion leaves no container running.
struct Container(std::process::Child);

impl Container {
    /// Sends SIGTERM and waits up to 30 s; `None` if it is still running then.
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let pid = rustix::process::Pid::from_child(&self.0);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::Term);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(s) = self.0.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.stop();
        }
    }
}

#[test]
fn the_probes_detect_privilege_on_a_plain_directory() {
    // The control: the same files on an ordinary directory give nobody root and the
    // device, so the assertions of the other tests can fail.
    if setup().is_none() {
        return;
    }
    let dir = open_dir().join("control");
    std::fs::create_dir_all(&dir).unwrap();
    plant(&dir);
    assert_eq!(euid_via(&dir.join("rootid")).unwrap(), "0");
    device_opens(&dir.join("nulldev")).unwrap();
}

#[test]
fn mounts_in_both_modes_are_nosuid_and_nodev() {
    let Some(layout) = setup() else { return };
    let img = image(&layout);
    let home = Home::new("mount-home");
    for mode_arg in ["fuse", "erofs"] {
        let mp = open_dir().join(format!("mnt-{mode_arg}"));
        std::fs::create_dir_all(&mp).unwrap();
        std::fs::set_permissions(&mp, std::fs::Permissions::from_mode(0o755)).unwrap();
        let m = mp.to_str().unwrap();
        ok(
            hoist_in(&home.0, &["mount", "--mode", mode_arg, img, m]),
            "hoist mount",
        );
        // The files are there, setuid and a device, readable by every user.
        let meta = std::fs::metadata(mp.join("rootid")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o4755);
        assert_eq!(
            as_nobody(&["cat", mp.join("app/hello.txt").to_str().unwrap()]).stdout,
            b"hello from tiny-v1 upper\n"
        );
        let flags = mount_flags(&mp);
        assert!(
            flags.contains(
                rustix::fs::StatVfsMountFlags::NOSUID | rustix::fs::StatVfsMountFlags::NODEV
            ),
            "{mode_arg}: {flags:?}"
        );
        assert_no_privilege(&mp, &format!("hoist mount --mode {mode_arg}"));
        // --suid and --dev are refused where other users can reach the mount.
        let mp2 = open_dir().join(format!("mnt-{mode_arg}-suid"));
        std::fs::create_dir_all(&mp2).unwrap();
        let out = hoist_in(
            &home.0,
            &[
                "mount",
                "--mode",
                mode_arg,
                "--suid",
                img,
                mp2.to_str().unwrap(),
            ],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("only root can enter"),
            "{err}"
        );
        assert!(!mount_flags(&mp2).contains(rustix::fs::StatVfsMountFlags::RDONLY));
        // Accepted under a root-only directory, and then they are granted.
        let private = open_dir().join(format!("private-{mode_arg}"));
        std::fs::create_dir_all(private.join("mnt")).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        let pm = private.join("mnt");
        ok(
            hoist_in(
                &home.0,
                &[
                    "mount",
                    "--mode",
                    mode_arg,
                    "--suid",
                    "--dev",
                    img,
                    pm.to_str().unwrap(),
                ],
            ),
            "hoist mount --suid --dev",
        );
        let flags = mount_flags(&pm);
        assert!(
            !flags.intersects(
                rustix::fs::StatVfsMountFlags::NOSUID | rustix::fs::StatVfsMountFlags::NODEV
            ),
            "{flags:?}"
        );
        assert_no_privilege(&pm, "a --suid --dev mount under a root-only directory");
        ok(
            hoist_in(&home.0, &["umount", pm.to_str().unwrap()]),
            "umount",
        );
        ok(hoist_in(&home.0, &["umount", m]), "umount");
    }
    // The state root was made private, and so are the private mounts of erofs mode.
    assert_eq!(mode(&home.0), 0o700);
    assert_eq!(mode(&home.0.join("run")), 0o700);
}

#[test]
fn a_running_container_gives_no_host_user_privileges() {
    let Some(layout) = setup() else { return };
    let img = image(&layout);
    for mode_arg in ["fuse", "erofs"] {
        let home = Home::new(&format!("run-home-{mode_arg}"));
        let mut child = Container(Command::new(env!("CARGO_BIN_EXE_hoist"))
            .args(["run", "--rm", "--name", "t", "--mode", mode_arg])
            .args(["--entrypoint", "/bin/sh", img, "--", "-c"])
            // Inside, the container opens the image's device node (dev semantics kept).
            .arg("head -c 1 /nulldev && echo ready; trap 'exit 0' TERM; while :; do sleep 1; done")
            .env("HOIST_HOME", &home.0)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap());
        let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
        let first = lines.next().map(|l| l.unwrap());
        assert_eq!(
            first.as_deref(),
            Some("ready"),
            "{mode_arg}: container did not start"
        );
        let dir = home.0.join("containers/t");
        for sub in ["image", "rootfs"] {
            let mp = dir.join(sub);
            // Mounted with suid and dev for the container, behind root-only directories.
            let flags = mount_flags(&mp);
            assert!(
                !flags.intersects(
                    rustix::fs::StatVfsMountFlags::NOSUID | rustix::fs::StatVfsMountFlags::NODEV
                ),
                "{sub}: {flags:?}"
            );
            assert_eq!(
                std::fs::metadata(mp.join("rootid"))
                    .unwrap()
                    .permissions()
                    .mode()
                    & 0o7777,
                0o4755
            );
            assert_no_privilege(&mp, &format!("hoist run --mode {mode_arg}: {sub}/"));
        }
        for d in [&home.0, &home.0.join("containers"), &dir] {
            assert_eq!(mode(d), 0o700, "{}", d.display());
        }
        let status = child.stop().expect("the container ignored SIGTERM");
        assert!(status.success(), "{status:?}");
        assert!(!dir.exists(), "--rm");
    }
}
