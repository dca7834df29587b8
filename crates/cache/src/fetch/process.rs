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
//!   gives);
//! - when the program is python's interpreter, what its initialization reads before
//!   any code of the command line's, which nothing read so far names: the C library's
//!   locale, conversions' cache and time zone ([`crate::glibc`], found from the
//!   process's environment, [`Process::ENV`]), and the modules it imports first
//!   ([`crate::python::startup_imports`]); left to a start-up trace that has the
//!   program, which has them in their order.
//!
//! What it costs: the first chunk of a file an argument names and the process never
//! reads, and of a start-up file a python that is not CPython on glibc (or one told
//! otherwise by its options, such as `-I` or `-S`) does not read. A mount with no
//! process given (`hoist mount`, the containerd snapshotter, which does not see the
//! container's command) fetches nothing ahead of its reads but what a program's header
//! names.
//!
//! [`Fetcher::will_run`]: crate::Fetcher::will_run

use super::modules::Module;
use super::Inner;
use crate::fetch::libraries::Files;
use crate::glibc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

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
    /// The variables of its environment that say where its files are (`NAME=value`,
    /// those of [`Process::ENV`]; [`Process::new`] keeps only those).
    #[serde(default)]
    pub env: Vec<String>,
    /// Its working directory, absolute.
    pub cwd: String,
}

impl Process {
    /// The variables that say which files a process's start reads: where programs
    /// are (`PATH`; [`DEFAULT_PATH`] when unset), its locale and time zone (read by
    /// the C library, [`crate::glibc`]), and whether python coerces the locale. No
    /// other variable leaves the caller: an environment holds secrets.
    pub const ENV: &'static [&'static str] = &[
        "PATH",
        "LANG",
        "LC_ALL",
        "LC_CTYPE",
        "TZ",
        "PYTHONCOERCECLOCALE",
    ];

    /// The process running `args` in `cwd`, with the variables of `env` (`NAME=value`)
    /// that are in [`Process::ENV`].
    pub fn new(args: Vec<String>, env: &[String], cwd: String) -> Process {
        let env = env
            .iter()
            .filter(|v| {
                v.split_once('=')
                    .is_some_and(|(n, _)| Process::ENV.contains(&n))
            })
            .cloned()
            .collect();
        Process { args, env, cwd }
    }

    /// Its working directory: `/` if the one given is not absolute.
    fn dir(&self) -> &str {
        match self.cwd.starts_with('/') {
            true => &self.cwd,
            false => "/",
        }
    }

    /// The value of variable `name` (the first one given, as `getenv` finds).
    pub fn var(&self, name: &str) -> Option<&str> {
        self.env.iter().find_map(|v| {
            v.split_once('=')
                .filter(|(n, _)| *n == name)
                .map(|(_, value)| value)
        })
    }
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

    /// Fetches what `process`'s start reads first (see the module's docs), on the
    /// caller's thread.
    pub(super) fn start_process(&self, process: &Process) {
        let Some(files) = self.libraries.files().cloned() else {
            return;
        };
        let t0 = std::time::Instant::now();
        let cwd = process.dir();
        let mut asked = Vec::new();
        let program = program_paths(&process.args[0], process.var("PATH"), cwd)
            .into_iter()
            .find_map(|p| files.first_chunk(&p).map(|c| (p, c)));
        let mut python = false;
        if let Some((path, (blob, index))) = program {
            // A script run as the program is read as a module too, and its `#!` line.
            if let Some(l) = files.locate(&path) {
                let program = Some(Arc::new(process.clone()));
                self.watch_module(Module::script(l, path.clone(), program));
            }
            // A start-up trace of the program has the runtime's files, in their order.
            python = crate::python::is_interpreter(&path) && !self.foresees(blob, index);
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
                    self.watch_module(Module::script(l, path.clone(), None));
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
        if python {
            asked.extend(self.python_starts(files.as_ref(), process));
        }
        tracing::debug!(
            "the process {:?} is about to start: fetching {asked:?} (found in {:.2} ms)",
            process.args,
            t0.elapsed().as_secs_f64() * 1e3
        );
    }
}

/// The files CPython's initialization reads, on glibc, before any code of the command
/// line's runs, in its order (python 3.11's, as `strace` shows it), that `files` has:
/// the locale of `setlocale(LC_CTYPE, "")` after the locale coercion, the character
/// set conversions' cache, the time zone (the `time` module's `tzset`).
pub fn python_c_library_files(files: &dyn Files, process: &Process) -> Vec<String> {
    let mut out = Vec::new();
    let mut push = |path: String| {
        if !out.contains(&path) && files.first_chunk(&path).is_some() {
            out.push(path);
        }
    };
    let mut locale = None;
    for name in crate::python::ctype_locales(|n| process.var(n)) {
        for path in glibc::locale_files(&name, "LC_CTYPE") {
            match path.ends_with("/LC_CTYPE") {
                // The first locale directory found is the one it reads.
                true if locale.is_none() && files.first_chunk(&path).is_some() => {
                    locale = Some(path)
                }
                true => {}
                false => push(path),
            }
        }
    }
    if let Some(path) = locale {
        push(path);
    }
    let conversions =
        glibc::conversions_cache(&crate::elf::library_dirs(crate::elf::host_machine()));
    if let Some(path) = conversions
        .into_iter()
        .find(|p| files.first_chunk(p).is_some())
    {
        push(path);
    }
    if let Some(path) = glibc::time_zone_file(process.var("TZ")) {
        push(path);
    }
    out
}

/// The longest `#!` line the kernel reads (`BINPRM_BUF_SIZE`).
const MAX_SHEBANG: usize = 256;

/// The paths of the interpreter a script's first bytes `head` name (`#!` and a path,
/// as the kernel reads them), first to last: the path itself, or, for `env` (`#!
/// /usr/bin/env python3`), the program `env` runs, found on `path` as `execvp` finds
/// it. Empty for a file that is no script.
pub fn shebang(head: &[u8], path: Option<&str>, cwd: &str) -> Vec<String> {
    let Some(rest) = head.strip_prefix(b"#!") else {
        return Vec::new();
    };
    let line = &rest[..rest.len().min(MAX_SHEBANG - 2)];
    let line = match line.iter().position(|&b| b == b'\n') {
        Some(end) => &line[..end],
        // Cut short: the kernel takes what it read only if a word ended in it.
        None => line,
    };
    let Ok(line) = std::str::from_utf8(line) else {
        return Vec::new();
    };
    let mut words = line.split([' ', '\t']).filter(|w| !w.is_empty());
    let Some(interpreter) = words.next() else {
        return Vec::new();
    };
    if interpreter.rsplit('/').next() != Some("env") {
        // The kernel opens it as a path, relative to the working directory.
        return vec![join(cwd, interpreter)];
    }
    // env's options (`-S` splits the rest into words) and its assignments come first.
    match words.find(|w| !w.starts_with('-') && !w.contains('=')) {
        Some(program) => program_paths(program, path, cwd),
        None => Vec::new(),
    }
}

impl Inner {
    /// The program of `process` is a file whose first bytes are `head`: if it is a
    /// script, its interpreter is fetched (python's start-up with it).
    pub(super) fn script_runs(&self, files: &dyn Files, head: &[u8], process: &Process) {
        let found = shebang(head, process.var("PATH"), process.dir())
            .into_iter()
            .find_map(|p| files.first_chunk(&p).map(|c| (p, c)));
        let Some((path, (blob, index))) = found else {
            return;
        };
        let mut asked = Vec::new();
        if self.fetch_named(blob, index, &self.counters.process_files) {
            asked.push(path.clone());
        }
        if crate::python::is_interpreter(&path) && !self.foresees(blob, index) {
            asked.extend(self.python_starts(files, process));
        }
        tracing::debug!(
            "the program {:?} is a script run by {path}: fetching {asked:?}",
            process.args.first()
        );
    }

    /// Whether a start-up trace fetches chunk `index` of blob `blob`.
    fn foresees(&self, blob: usize, index: usize) -> bool {
        super::lock(&self.foreseen).contains(&(blob, index))
    }

    /// CPython is about to start: fetches what its initialization reads before the
    /// command line's code, which nothing read so far names, each one round trip
    /// with the link idle when fetched as it asks (seven of them for python 3.11:
    /// 0.2-0.3 s at 20 ms): the C library's files ([`python_c_library_files`]), then
    /// the modules it imports first ([`crate::python::startup_imports`]), whose own
    /// imports follow, and the path configuration files `site` reads. The paths
    /// fetched.
    fn python_starts(&self, files: &dyn Files, process: &Process) -> Vec<String> {
        let mut asked = Vec::new();
        for path in python_c_library_files(files, process) {
            if let Some((blob, index)) = files.first_chunk(&path) {
                if self.fetch_named(blob, index, &self.counters.process_files) {
                    asked.push(path);
                }
            }
        }
        asked.extend(self.fetch_startup_modules(files));
        asked
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
    fn a_scripts_interpreter() {
        let path = Some("/usr/local/bin:/usr/bin");
        assert_eq!(
            shebang(b"#!/usr/bin/python3 -u\nimport x", path, "/"),
            ["/usr/bin/python3"]
        );
        assert_eq!(shebang(b"#! /bin/sh\n", path, "/"), ["/bin/sh"]);
        assert_eq!(
            shebang(b"#!/usr/bin/env python3\n", path, "/"),
            ["/usr/local/bin/python3", "/usr/bin/python3"]
        );
        assert_eq!(
            shebang(b"#!/usr/bin/env -S A=1 python3 -u\n", Some("/bin"), "/"),
            ["/bin/python3"]
        );
        // Relative to the working directory, as the kernel opens it.
        assert_eq!(shebang(b"#!bin/tool\n", path, "/app"), ["/app/bin/tool"]);
        for head in [
            &b"import os\n"[..],
            b"#!",
            b"#!\n",
            b"#!/usr/bin/env\n",
            b"#!\xff\xfe\n",
            b"",
        ] {
            assert!(shebang(head, path, "/").is_empty(), "{head:?}");
        }
        // Only the kernel's first 256 bytes count.
        let long = format!("#!/{}/x\n", "d".repeat(300));
        assert!(shebang(long.as_bytes(), path, "/")[0].len() < MAX_SHEBANG);
    }

    proptest::proptest! {
        /// A script's first bytes are untrusted: no panic, and at most one path but
        /// for `env`'s lookup.
        #[test]
        fn any_first_bytes(head in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let found = shebang(&head, Some("/a:/b"), "/");
            proptest::prop_assert!(found.len() <= 2);
        }
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
