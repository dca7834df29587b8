//! The files a process about to start reads first, fetched before it starts.
//!
//! Whoever starts a container knows its process before the runtime execs it:
//! `hoist run` has the command line, the `PATH` and the working directory once the
//! image is mounted, and runc takes about 0.1 s more (its own start, the overlay, the
//! namespaces) before the kernel reads the program's header. [`Fetcher::will_run`]
//! fetches in that time what the process's start reads first, each file's first chunk
//! alone, after readers and ahead of readahead:
//!
//! - the program, found as `execvp` finds it; its header is a program's
//!   ([`crate::elf`]), so its interpreter, its dynamic section, its libraries and its
//!   mapped range follow;
//! - each argument that names a file of the image (a script, a configuration file),
//!   absolute or relative to the working directory; a python script is read as a
//!   module ([`crate::python`]), so its imports follow, and the modules beside it
//!   (its directory is first on python's search path, a path only the command line
//!   gives).
//!
//! What it costs: the first chunk of a file an argument names and the process never
//! reads. A mount with no process given (`hoist mount`, the containerd snapshotter,
//! which does not see the container's command) fetches nothing ahead of its reads.
//!
//! [`Fetcher::will_run`]: crate::Fetcher::will_run

use super::modules::Module;
use super::Inner;
use std::sync::atomic::Ordering::Relaxed;

/// The most arguments looked at (a lookup each), and the longest one.
const MAX_ARGS: usize = 16;
const MAX_ARG: usize = 4096;
/// `PATH` when the process's environment has none: the one runc's and docker's
/// default environment give.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The most `PATH` entries tried.
const MAX_PATH_DIRS: usize = 32;

/// A process about to start in the image (also the daemon's typed request for it).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Process {
    /// Its command line; the first is the program.
    pub args: Vec<String>,
    /// The `PATH` of its environment (`None`: [`DEFAULT_PATH`]).
    #[serde(default)]
    pub path: Option<String>,
    /// Its working directory, absolute.
    pub cwd: String,
}

/// `name` relative to `dir` (absolute as is).
fn join(dir: &str, name: &str) -> String {
    match (name.starts_with('/'), dir.ends_with('/')) {
        (true, _) => name.to_owned(),
        (false, true) => format!("{dir}{name}"),
        (false, false) => format!("{dir}/{name}"),
    }
}

/// The paths `execvp` tries for `program`, first to last: a name with a `/` is a path
/// (relative to `cwd`); otherwise each directory of `path`, an empty entry meaning
/// the working directory.
pub fn program_paths(program: &str, path: Option<&str>, cwd: &str) -> Vec<String> {
    if program.is_empty() || program.len() > MAX_ARG || program.contains('\0') {
        return Vec::new();
    }
    if program.contains('/') {
        return vec![join(cwd, program)];
    }
    path.unwrap_or(DEFAULT_PATH)
        .split(':')
        .take(MAX_PATH_DIRS)
        .map(|d| join(if d.is_empty() { cwd } else { d }, program))
        .collect()
}

/// The paths of the arguments after the program that may name files: not options,
/// not empty, not too long; relative ones under `cwd`.
pub fn argument_paths<'a>(args: &'a [String], cwd: &'a str) -> impl Iterator<Item = String> + 'a {
    args.iter()
        .skip(1)
        .take(MAX_ARGS)
        .filter(|a| !a.is_empty() && !a.starts_with('-') && a.len() <= MAX_ARG && !a.contains('\0'))
        .map(|a| join(cwd, a))
}

impl Inner {
    /// Fetches the start of `process`'s program and of the files its arguments name,
    /// on a thread of its own (a lookup may have to fetch a block of the metadata).
    pub(super) fn will_run(&self, process: Process) {
        if self.libraries.files().is_none() || process.args.is_empty() {
            return;
        }
        let Some(me) = self.me.upgrade() else {
            return;
        };
        let spawned = std::thread::Builder::new()
            .name("hoist-process".into())
            .spawn(move || me.start_process(&process));
        if let Err(e) = spawned {
            tracing::warn!("starting the thread that fetches a process's files: {e}");
        }
    }

    fn start_process(&self, process: &Process) {
        let Some(files) = self.libraries.files().cloned() else {
            return;
        };
        let t0 = std::time::Instant::now();
        let cwd = if process.cwd.starts_with('/') {
            process.cwd.as_str()
        } else {
            "/"
        };
        let mut asked = Vec::new();
        let program = program_paths(&process.args[0], process.path.as_deref(), cwd)
            .into_iter()
            .find_map(|p| files.first_chunk(&p).map(|c| (p, c)));
        if let Some((path, (blob, index))) = program {
            // A script run as the program is read as a module too.
            if let Some(l) = files.locate(&path) {
                self.watch_module(Module::script(l, path.clone()));
            }
            if self.fetch_named(blob, index, &self.counters.process_files) {
                asked.push(path);
            }
        }
        for path in argument_paths(&process.args, cwd) {
            if self.stop.load(Relaxed) {
                return;
            }
            let (blob, index) = match files.locate(&path) {
                Some(l) => {
                    self.watch_module(Module::script(l, path.clone()));
                    (l.blob, l.index)
                }
                None => match files.first_chunk(&path) {
                    Some(c) => c,
                    None => continue,
                },
            };
            if self.fetch_named(blob, index, &self.counters.process_files) {
                asked.push(path);
            }
        }
        tracing::debug!(
            "the process {:?} is about to start: fetching {asked:?} (found in {:.2} ms)",
            process.args,
            t0.elapsed().as_secs_f64() * 1e3
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_is_looked_up_as_execvp_does() {
        assert_eq!(
            program_paths("python3", Some("/usr/local/bin:/usr/bin"), "/app"),
            ["/usr/local/bin/python3", "/usr/bin/python3"]
        );
        assert_eq!(
            program_paths("sh", None, "/"),
            DEFAULT_PATH
                .split(':')
                .map(|d| format!("{d}/sh"))
                .collect::<Vec<_>>()
        );
        // An empty entry is the working directory; a name with a slash is a path.
        assert_eq!(
            program_paths("x", Some(":/bin"), "/app"),
            ["/app/x", "/bin/x"]
        );
        assert_eq!(
            program_paths("./run.sh", Some("/bin"), "/app"),
            ["/app/./run.sh"]
        );
        assert_eq!(
            program_paths("/bin/sh", Some("/usr/bin"), "/app"),
            ["/bin/sh"]
        );
        assert!(program_paths("", None, "/").is_empty());
        assert!(program_paths("a\0b", None, "/").is_empty());
        let long = "/d".repeat(MAX_PATH_DIRS * 2).replace("/d", "/d:");
        assert_eq!(program_paths("x", Some(&long), "/").len(), MAX_PATH_DIRS);
    }

    #[test]
    fn arguments_that_may_be_files() {
        let args: Vec<String> = ["python3", "main.py", "-u", "", "/etc/app.conf", "a b"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            argument_paths(&args, "/app").collect::<Vec<_>>(),
            ["/app/main.py", "/etc/app.conf", "/app/a b"]
        );
        let many: Vec<String> = (0..100).map(|k| format!("f{k}")).collect();
        assert_eq!(argument_paths(&many, "/").count(), MAX_ARGS);
    }
}
