//! Python modules fetched before the interpreter imports them.
//!
//! python's start-up imports module after module, and each module it reads names the
//! next ones ([`crate::python`]). When a reader reads the start of a compiled module
//! (a `.pyc`, known by its magic number) or of python source that starts with an
//! import, the fetcher reads the module's imports, finds the files the interpreter will
//! read for them in the image's tree ([`Files`]), and fetches those each alone,
//! after readers and ahead of readahead; as each comes in, its own imports are fetched in turn. So a
//! chain of imports costs about one round trip per level of the import graph, not one
//! per module. An extension module is fetched as a program ([`crate::elf`]): its
//! mapped range is read ahead and its libraries are found.
//!
//! The parsing and the lookups run on a thread of their own, never on a reader's or a
//! fetch worker's: a lookup may have to fetch a block of the image's metadata. What it
//! costs is in [`crate::python`]: module-level imports that are never run.

use super::{lock, Inner};
use crate::fetch::libraries::{Files, Located};
use crate::python::{self, Dirs, Importer};
use crate::store::ChunkDigest;
use crate::Process;
use std::collections::{HashMap, HashSet, VecDeque};
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

/// The most module files looked at per image (to bound the memory the feature uses).
const MAX_SEEN: usize = 16_384;
/// The most modules waiting for their chunk (past it, a module is read when the
/// interpreter reads it).
const MAX_WAITING: usize = 4096;
/// The most directory listings kept, and names in them (to bound the memory the
/// feature uses).
const MAX_DIRS: usize = 4096;
const MAX_DIR_NAMES: usize = 1 << 20;
/// Files start on these boundaries in their chunk (the image's block size).
const FILE_ALIGN: u64 = 4096;

/// The modules seen, those waiting for their chunk, and those to read.
#[derive(Default)]
pub(super) struct Modules {
    state: Mutex<State>,
    /// Directory listings, for the modules thread only.
    dirs: Mutex<Listings>,
}

#[derive(Default)]
struct State {
    /// Files looked at: (blob, uncompressed offset).
    seen: HashSet<(usize, u64)>,
    /// Modules whose chunk is being fetched, by the chunk's digest (the chunk may
    /// come in under another index, or through another image's fetcher).
    waiting: HashMap<ChunkDigest, Vec<Module>>,
    waiting_count: usize,
    /// Modules whose chunk is in, to read.
    todo: VecDeque<Module>,
    /// Whether the modules thread runs.
    running: bool,
    /// The python versions the image has, once looked up.
    versions: Option<Arc<[(u8, u8)]>>,
}

/// A module file: where it starts, and its path when the fetcher found it by name.
#[derive(Debug, Clone)]
pub(super) struct Module {
    blob: usize,
    index: usize,
    skip: u64,
    path: Option<String>,
    /// A file a process's command line names ([`super::process`]): read only if it
    /// is a module, as the script python runs.
    script: bool,
    /// The process that runs it as its program: if it is a script (`#!`), its
    /// interpreter is fetched ([`Inner::script_runs`]).
    program: Option<Arc<Process>>,
}

impl Module {
    /// The file at `path`, which lies at `l`, named on a process's command line; run
    /// as the program of `program`, if given.
    pub(super) fn script(l: Located, path: String, program: Option<Arc<Process>>) -> Module {
        Module {
            blob: l.blob,
            index: l.index,
            skip: l.skip,
            path: Some(path),
            script: true,
            program,
        }
    }
}

/// Whether bytes read at the start of a file are a python module's: a compiled one's
/// magic number, or python source whose first statement (in its first 4 KiB) is an
/// import. Text that starts otherwise (a configuration file, a shell script) costs
/// no more than a look at its first lines.
fn is_module(head: &[u8]) -> bool {
    python::compiled_version(head).is_some()
        || ([&b"import "[..], b"from ", b"#", b"\"\"\"", b"'''"]
            .iter()
            .any(|p| head.starts_with(p))
            && python::source_imports(&head[..head.len().min(4096)]).is_some())
}

impl Inner {
    /// A reader read `head` at `offset` of chunk `index` of blob `blob`: if a python
    /// module starts there, its imports are fetched.
    pub(super) fn module_read(&self, blob: usize, index: usize, offset: u64, head: &[u8]) {
        if !offset.is_multiple_of(FILE_ALIGN)
            || self.libraries.files().is_none()
            || !is_module(head)
        {
            return;
        }
        // A trace knows what start-up imports.
        if lock(&self.foreseen).contains(&(blob, index)) {
            return;
        }
        let Some(at) = self.blobs[blob].entries[index]
            .uncompressed_offset
            .checked_add(offset)
        else {
            return;
        };
        let digest = self.blobs[blob].entries[index].digest;
        let mut s = lock(&self.modules.state);
        if s.seen.contains(&(blob, at)) {
            // Found by name and waiting for a chunk that came in another way: read now.
            let Some(w) = s.waiting.get_mut(&digest) else {
                return;
            };
            let Some(i) = w.iter().position(|m| m.skip == offset) else {
                return;
            };
            let m = w.swap_remove(i);
            if w.is_empty() {
                s.waiting.remove(&digest);
            }
            s.waiting_count -= 1;
            s.todo.push_back(m);
            return self.start_modules(&mut s);
        }
        if s.seen.len() >= MAX_SEEN {
            return;
        }
        s.seen.insert((blob, at));
        s.todo.push_back(Module {
            blob,
            index,
            skip: offset,
            path: None,
            script: false,
            program: None,
        });
        self.start_modules(&mut s);
    }

    /// Chunk `index` of blob `blob` is in: the modules waiting for it are read.
    pub(super) fn module_chunk_in(&self, blob: usize, index: usize) {
        let mut s = lock(&self.modules.state);
        if s.waiting.is_empty() {
            return;
        }
        let digest = self.blobs[blob].entries[index].digest;
        let Some(ready) = s.waiting.remove(&digest) else {
            return;
        };
        s.waiting_count -= ready.len();
        s.todo.extend(ready);
        self.start_modules(&mut s);
    }

    /// Starts the modules thread unless it runs.
    fn start_modules(&self, s: &mut State) {
        if s.running || s.todo.is_empty() || self.stop.load(Relaxed) {
            return;
        }
        let Some(me) = self.me.upgrade() else {
            return;
        };
        let spawned = std::thread::Builder::new()
            .name("hoist-modules".into())
            .spawn(move || me.read_modules());
        match spawned {
            Ok(_) => s.running = true,
            Err(e) => {
                tracing::warn!("starting the python modules thread: {e}");
                s.todo.clear();
            }
        }
    }

    /// The modules thread: reads modules while there are some.
    fn read_modules(&self) {
        loop {
            let m = {
                let mut s = lock(&self.modules.state);
                match s.todo.pop_front().filter(|_| !self.stop.load(Relaxed)) {
                    Some(m) => m,
                    None => {
                        s.running = false;
                        s.todo.clear();
                        return;
                    }
                }
            };
            // A bug must not stop the thread with `running` set: the module is skipped.
            let read =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.read_module(m)));
            if read.is_err() {
                tracing::warn!("reading a python module's imports failed (see the log above)");
            }
        }
    }

    /// Reads module `m`'s imports and fetches the files found for them.
    fn read_module(&self, m: Module) {
        let Some(files) = self.libraries.files().cloned() else {
            return;
        };
        // A tree walk (tar) reads modules one after the other, and its stream fetches
        // them ahead: their imports, fetched alone, would only split its requests.
        let walked = |blob| lock(&self.streams).walked(blob);
        if walked(m.blob) {
            return;
        }
        // A trace that holds the module holds what start-up imports from it, too: its
        // imports read by name would only add requests (python's start-up at 1 Gbit/s
        // fetched 8 files the trace leaves out, 160 KB, one request each).
        if lock(&self.foreseen).contains(&(m.blob, m.index)) {
            return;
        }
        let t0 = std::time::Instant::now();
        let Some(data) = self.chunk_tail(m.blob, m.index, m.skip) else {
            return;
        };
        if let Some(process) = &m.program {
            self.script_runs(files.as_ref(), &data, process);
        }
        if m.script && !is_module(&data) {
            return;
        }
        let dirs = Listing {
            files: files.as_ref(),
            cache: &self.modules.dirs,
        };
        let (imports, source, versions, script): (_, _, Arc<[(u8, u8)]>, _) =
            if let Some(c) = python::compiled(&data) {
                // The source path it was compiled from is trusted when the image has the
                // module compiled there: relative imports and its own tree need it.
                let here = (m.blob, m.index, m.skip);
                let known =
                    python::compiled_path(&c.source, c.version).is_some_and(|p| match &m.path {
                        Some(path) => *path == p,
                        None => files
                            .locate(&p)
                            .is_some_and(|l| (l.blob, l.index, l.skip) == here),
                    });
                (
                    c.imports,
                    known.then_some(c.source),
                    Arc::new([c.version]),
                    false,
                )
            } else if let Some(imports) = python::source_imports(&data) {
                // Source read before any module named it, or named on the command
                // line: the script python runs.
                let script = m.script || m.path.is_none();
                let source = m.path.clone().filter(|p| script || p.ends_with(".py"));
                (imports, source, self.python_versions(&dirs), script)
            } else {
                return;
            };
        let importer = Importer {
            script,
            source: source.as_deref(),
            versions: &versions,
        };
        let found = python::resolve(&importer, &imports, &dirs);
        let asked = self.fetch_modules(files.as_ref(), &found);
        tracing::debug!(
            "the python module at {} (chunk {} of blob {}) imports {} modules: {} files found, fetching {asked:?} (in {:.2} ms)",
            source.as_deref().unwrap_or("?"),
            m.index,
            self.blobs[m.blob].digest,
            imports.len(),
            found.len(),
            t0.elapsed().as_secs_f64() * 1e3,
        );
    }

    /// Fetches the files `found` for imports (each watched as a module, so its own
    /// imports follow), but those of a blob a tree walk reads; the paths asked for.
    fn fetch_modules(&self, files: &dyn Files, found: &[String]) -> Vec<String> {
        let walked = |blob| lock(&self.streams).walked(blob);
        let mut asked = Vec::new();
        for path in found {
            let (blob, index) = match files.locate(path) {
                Some(l) => {
                    if path.ends_with(".py") || path.ends_with(".pyc") {
                        self.watch_module(Module {
                            blob: l.blob,
                            index: l.index,
                            skip: l.skip,
                            path: Some(path.clone()),
                            script: false,
                            program: None,
                        });
                    }
                    (l.blob, l.index)
                }
                // An extension module of several chunks: its header, as a program's.
                None => match files.first_chunk(path) {
                    Some(first) => first,
                    None => continue,
                },
            };
            if !walked(blob) && self.fetch_named(blob, index, &self.counters.modules) {
                asked.push(path.clone());
            }
        }
        asked
    }

    /// The interpreter is about to start: fetches the modules its initialization
    /// imports ([`python::startup_imports`]) and the path configuration files `site`
    /// reads ([`python::path_files`]); the paths asked for.
    pub(super) fn fetch_startup_modules(&self, files: &dyn Files) -> Vec<String> {
        let dirs = Listing {
            files,
            cache: &self.modules.dirs,
        };
        let versions = self.python_versions(&dirs);
        let interpreter = Importer {
            script: false,
            source: None,
            versions: &versions,
        };
        let mut found = python::resolve(&interpreter, &python::startup_imports(), &dirs);
        found.extend(python::path_files(&versions, &dirs));
        self.fetch_modules(files, &found)
    }

    /// Module `m` is to be read once its chunk is in (now, if it is cached).
    pub(super) fn watch_module(&self, m: Module) {
        let Some(e) = self.blobs.get(m.blob).and_then(|b| b.entries.get(m.index)) else {
            return;
        };
        let Some(at) = e.uncompressed_offset.checked_add(m.skip) else {
            return;
        };
        let mut s = lock(&self.modules.state);
        if s.seen.len() >= MAX_SEEN || s.seen.contains(&(m.blob, at)) {
            return;
        }
        // Checked under the lock: a chunk that comes in after this finds `m` waiting.
        if self.store.contains(&e.digest) {
            s.seen.insert((m.blob, at));
            s.todo.push_back(m);
            return self.start_modules(&mut s);
        }
        // Past the bound it is left to the interpreter's read of it.
        if s.waiting_count >= MAX_WAITING {
            return;
        }
        s.seen.insert((m.blob, at));
        s.waiting.entry(e.digest).or_default().push(m);
        s.waiting_count += 1;
    }

    /// The bytes of cached chunk `index` of blob `blob` from `skip` to its end.
    fn chunk_tail(&self, blob: usize, index: usize, skip: u64) -> Option<Vec<u8>> {
        let e = self.blobs.get(blob)?.entries.get(index)?;
        let len = u64::from(e.uncompressed_size).checked_sub(skip)?;
        let f = self
            .store
            .open_chunk(&e.digest, e.uncompressed_size)
            .ok()??;
        let mut buf = vec![0; usize::try_from(len).ok()?];
        f.read_exact_at(&mut buf, skip).ok()?;
        Some(buf)
    }

    /// The python versions the image has, looked up once.
    fn python_versions(&self, dirs: &Listing) -> Arc<[(u8, u8)]> {
        if let Some(v) = &lock(&self.modules.state).versions {
            return v.clone();
        }
        let v: Arc<[(u8, u8)]> = python::versions(dirs).into();
        lock(&self.modules.state).versions = Some(v.clone());
        v
    }
}

/// The image's directories, listed through its tree and kept.
struct Listing<'a> {
    files: &'a dyn Files,
    cache: &'a Mutex<Listings>,
}

/// Directory listings kept, and the names in them.
#[derive(Default)]
struct Listings {
    dirs: HashMap<String, Option<Arc<[String]>>>,
    names: usize,
}

impl Dirs for Listing<'_> {
    fn list(&self, dir: &str) -> Option<Arc<[String]>> {
        if let Some(l) = lock(self.cache).dirs.get(dir) {
            return l.clone();
        }
        // Not under the lock: it may fetch a block of metadata.
        let l = self.files.list(dir);
        let mut c = lock(self.cache);
        let n = l.as_ref().map_or(0, |l| l.len());
        if c.dirs.len() < MAX_DIRS && c.names + n <= MAX_DIR_NAMES {
            c.names += n;
            c.dirs.insert(dir.to_string(), l.clone());
        }
        l
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{chunk, program_chunks, read, setup_chunks, Fake, Setup, CHUNK};
    use super::*;
    use crate::python::tests::{pyc, Tree};
    use crate::Process;
    use crate::{FetchConfig, Located};
    use std::time::{Duration, Instant};

    /// An image tree: the files' locations, and the directories holding them.
    struct PyTree {
        files: HashMap<String, Located>,
        dirs: Tree,
    }

    impl Files for PyTree {
        fn first_chunk(&self, path: &str) -> Option<(usize, usize)> {
            self.files.get(path).map(|l| (l.blob, l.index))
        }
        fn locate(&self, path: &str) -> Option<Located> {
            self.files.get(path).copied()
        }
        fn list(&self, path: &str) -> Option<Arc<[String]>> {
            self.dirs.list(path)
        }
    }

    const STD: &str = "/usr/lib/python3.11";

    /// Chunks 0..12 of a blob with python modules in some of them, and the tree of
    /// the image: `/app/main.py` (chunk 2) imports json (chunk 5, whose decoder at
    /// 4 KiB into the same chunk imports the extension `_json`, chunk 9) and re
    /// (chunk 8), which imports the frozen os (chunk 6) and enum (chunk 10), which
    /// imports functools (chunk 11); the script also imports a module the image lacks,
    /// and `helpers` beside it (chunk 1), which only its path finds.
    fn image() -> (Vec<Vec<u8>>, PyTree) {
        let mut chunks: Vec<Vec<u8>> = (0..12).map(|i| chunk(i, CHUNK as usize)).collect();
        let mut files = HashMap::new();
        // A file at `skip` into chunk `index`, holding `data` (if any).
        let mut file = |path: &str, index: usize, skip: usize, data: &[u8]| {
            if !data.is_empty() {
                chunks[index][skip..skip + data.len()].copy_from_slice(data);
                chunks[index][skip + data.len()] = 0;
            }
            let l = Located {
                blob: 0,
                index,
                skip: skip as u64,
            };
            files.insert(path.to_string(), l);
        };
        let module = |name: &str, imports: &[(&str, u32, Option<&[&str]>)]| {
            pyc((3, 11), &format!("{STD}/{name}.py"), imports, 0)
        };
        let cached = |name: &str| format!("{STD}/{name}.cpython-311.pyc");
        file(
            "/app/main.py",
            2,
            0,
            b"import json\nimport missing, re\nimport helpers\n",
        );
        file("/app/helpers.py", 1, 0, b"VALUE = 1\n");
        let json = module("json/__init__", &[("decoder", 1, Some(&["JSONDecoder"]))]);
        file(&cached("json/__pycache__/__init__"), 5, 0, &json);
        let decoder = module("json/decoder", &[("_json", 0, None)]);
        file(&cached("json/__pycache__/decoder"), 5, 4096, &decoder);
        file(&cached("__pycache__/os"), 6, 0, &module("os", &[]));
        let re = module("re/__init__", &[("os", 0, None), ("enum", 0, None)]);
        file(&cached("re/__pycache__/__init__"), 8, 0, &re);
        let extension = format!("{STD}/lib-dynload/_json.cpython-311-x86_64-linux-gnu.so");
        file(&extension, 9, 0, &[]);
        let enum_ = module("enum", &[("functools", 0, None)]);
        file(&cached("__pycache__/enum"), 10, 0, &enum_);
        file(
            &cached("__pycache__/functools"),
            11,
            0,
            &module("functools", &[]),
        );
        let mut paths: Vec<String> = files.keys().cloned().collect();
        for source in [
            "json/__init__",
            "json/decoder",
            "os",
            "re/__init__",
            "enum",
            "functools",
        ] {
            paths.push(format!("{STD}/{source}.py"));
        }
        let dirs = Tree::of(&paths.iter().map(String::as_str).collect::<Vec<_>>());
        (chunks, PyTree { files, dirs })
    }

    /// Waits (bounded) until chunks `want` are cached, and the modules thread and the
    /// fetch workers are idle.
    fn settle(s: &Setup, want: &[usize]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let inner = &s.fetcher.inner;
        loop {
            let cached = want
                .iter()
                .all(|&i| inner.store.contains(&inner.blobs[0].entries[i].digest));
            let idle = {
                let st = lock(&inner.modules.state);
                !st.running && st.todo.is_empty()
            };
            let fetching = {
                let q = inner.lock();
                !q.demand.is_empty()
                    || q.background.iter().any(|b| !b.is_empty())
                    || q.idle < q.workers
            };
            if cached && idle && !fetching {
                return;
            }
            assert!(Instant::now() < deadline, "chunks {want:?} never came in");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The image of [`image`], its tree given, fetched a chunk per miss.
    fn mounted() -> Setup {
        let (chunks, tree) = image();
        let cfg = FetchConfig {
            min_fetch: CHUNK.into(),
            ..FetchConfig::default()
        };
        let s = setup_chunks(chunks, Fake::default(), cfg);
        s.fetcher.set_files(Arc::new(tree));
        s
    }

    #[test]
    fn the_modules_a_script_imports_are_fetched_level_by_level_before_it_asks() {
        let s = mounted();
        let c = u64::from(CHUNK);
        // The interpreter reads the script.
        assert_eq!(read(&s, 2), s.chunks[2]);
        settle(&s, &[5, 8, 9, 10, 11]);
        let mut asked = s.fake.asked.lock().unwrap().clone();
        asked.sort();
        // Each alone, once; not the frozen os, nor anything for the missing module.
        assert_eq!(
            asked,
            [2, 5, 8, 9, 10, 11].map(|i| (i * c, c)),
            "{:?}",
            s.fake.asked.lock().unwrap()
        );
        assert_eq!(s.fetcher.counters().modules.load(Relaxed), 5);
        // The interpreter's reads of them are hits.
        for i in [5, 8, 9, 10, 11] {
            assert_eq!(read(&s, i), s.chunks[i]);
        }
        assert_eq!(s.fetcher.counters().misses.load(Relaxed), 1);
        assert_eq!(s.fake.requests(), 6);
    }

    /// The image of [`image`] with a program at chunk 3, `python3`, run by glibc's
    /// loader at chunk 4, which loads libz (chunk 7); the C library's files python's
    /// start reads (chunks 12-15: the loader's cache, C.UTF-8's `LC_CTYPE`, the
    /// conversions' cache, the time zone); the modules it imports first (16-19:
    /// encodings, whose own import aliases is in 17, utf_8 and sitecustomize) and a
    /// path configuration file (20).
    fn python_image() -> (Vec<Vec<u8>>, PyTree) {
        let (mut chunks, mut tree) = image();
        chunks[3] =
            program_chunks(3, &["libz.so.1"], 1, Some("/lib64/ld-linux-x86-64.so.2")).remove(0);
        chunks.extend((12..21).map(|i| chunk(i, CHUNK as usize)));
        let module = |name: &str, imports: &[(&str, u32, Option<&[&str]>)]| {
            pyc((3, 11), &format!("{STD}/{name}.py"), imports, 0)
        };
        let encodings = module("encodings/__init__", &[("", 1, Some(&["aliases"]))]);
        let utf_8 = module("encodings/utf_8", &[]);
        let aliases = module("encodings/aliases", &[]);
        for (data, index) in [(&encodings, 16), (&aliases, 17), (&utf_8, 18)] {
            chunks[index][..data.len()].copy_from_slice(data);
        }
        let pycache = |p: &str| format!("{STD}/encodings/__pycache__/{p}.cpython-311.pyc");
        let mut paths: Vec<String> = tree.dirs.files();
        for (path, index) in [
            ("/usr/bin/python3".to_string(), 3),
            ("/lib64/ld-linux-x86-64.so.2".into(), 4),
            ("/lib/x86_64-linux-gnu/libz.so.1".into(), 7),
            ("/etc/ld.so.cache".into(), 12),
            ("/usr/lib/locale/C.utf8/LC_CTYPE".into(), 13),
            (
                "/usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache".into(),
                14,
            ),
            ("/etc/localtime".into(), 15),
            (pycache("__init__"), 16),
            (pycache("aliases"), 17),
            (pycache("utf_8"), 18),
            (format!("{STD}/sitecustomize.py"), 19),
            ("/usr/lib/python3/dist-packages/setuptools.pth".into(), 20),
        ] {
            let l = Located {
                blob: 0,
                index,
                skip: 0,
            };
            tree.files.insert(path.clone(), l);
            paths.push(path);
        }
        for source in ["__init__", "aliases", "utf_8"] {
            paths.push(format!("{STD}/encodings/{source}.py"));
        }
        tree.dirs = Tree::of(&paths.iter().map(String::as_str).collect::<Vec<_>>());
        (chunks, tree)
    }

    /// The chunks asked of the source (each alone), in order of index.
    fn chunks_asked(s: &Setup) -> Vec<usize> {
        let c = u64::from(CHUNK);
        let asked = s.fake.asked.lock().unwrap();
        let mut chunks: Vec<usize> = asked.iter().map(|&(at, _)| (at / c) as usize).collect();
        chunks.sort();
        chunks
    }

    #[test]
    fn a_process_about_to_start_has_its_program_script_and_start_up_files_fetched_before_it_reads()
    {
        let (chunks, tree) = python_image();
        let cfg = FetchConfig {
            min_fetch: CHUNK.into(),
            ..FetchConfig::default()
        };
        let s = setup_chunks(chunks, Fake::default(), cfg);
        s.fetcher.set_files(Arc::new(tree));
        let args = ["python3", "main.py", "-u", "/absent"].map(String::from);
        let env = ["PATH=/usr/local/bin:/usr/bin", "HOME=/root", "SECRET=x"].map(String::from);
        let process = Process::new(args.to_vec(), &env, "/app".into());
        // Only the variables that say where files are reach the fetcher.
        assert_eq!(process.env, ["PATH=/usr/local/bin:/usr/bin"]);
        s.fetcher.will_run(process);
        let all: Vec<usize> = (1..21).filter(|&i| i != 6).collect();
        settle(&s, &all);
        // Each alone, once, before any read: the program, its loader, the loader's
        // cache and the library; the script, its imports and the module beside it;
        // python's C library files, first modules and path configuration file.
        let c = u64::from(CHUNK);
        let mut asked = s.fake.asked.lock().unwrap().clone();
        asked.sort();
        assert_eq!(
            asked,
            all.iter().map(|&i| (i as u64 * c, c)).collect::<Vec<_>>()
        );
        let counters = s.fetcher.counters();
        assert_eq!(counters.process_files.load(Relaxed), 5);
        assert_eq!(counters.libraries.load(Relaxed), 3);
        assert_eq!(counters.modules.load(Relaxed), 11);
        // The process's reads are all hits (backwards: reads in order would be a
        // stream, which reads ahead).
        for &i in all.iter().rev() {
            assert_eq!(read(&s, i), s.chunks[i]);
        }
        assert_eq!(counters.misses.load(Relaxed), 0);
        assert_eq!(s.fake.requests(), all.len());

        // Another program is not python: none of python's start-up files.
        let (chunks, mut tree) = python_image();
        let sh = tree.files["/usr/bin/python3"];
        tree.files.insert("/bin/sh".into(), sh);
        let s = setup_chunks(chunks, Fake::default(), FetchConfig::default());
        s.fetcher.set_files(Arc::new(tree));
        let args = ["sh", "-c", "true"].map(String::from).to_vec();
        let env = ["PATH=/bin".to_string()];
        s.fetcher
            .will_run(Process::new(args.clone(), &env, "/".into()));
        settle(&s, &[3, 4, 7, 12]);
        assert_eq!(chunks_asked(&s), [3, 4, 7, 12]);

        // A script run as the program (chunk 0): its interpreter, found on the PATH
        // as `env` finds it, and python's start-up with it; the script's imports.
        let (mut chunks, mut tree) = python_image();
        let script = b"#!/usr/bin/env python3\nimport json\n";
        chunks[0][..script.len()].copy_from_slice(script);
        chunks[0][script.len()] = 0;
        let l = Located {
            blob: 0,
            index: 0,
            skip: 0,
        };
        tree.files.insert("/usr/local/bin/tool".into(), l);
        let s = setup_chunks(chunks, Fake::default(), FetchConfig::default());
        s.fetcher.set_files(Arc::new(tree));
        let args = ["tool", "serve"].map(String::from).to_vec();
        let env = ["PATH=/usr/local/bin:/usr/bin".to_string()];
        s.fetcher
            .will_run(Process::new(args.clone(), &env, "/".into()));
        let all = [0, 3, 4, 5, 7, 9, 12, 13, 14, 15, 16, 17, 18, 19, 20];
        settle(&s, &all);
        assert_eq!(chunks_asked(&s), all);
        assert_eq!(s.fetcher.counters().process_files.load(Relaxed), 5);

        // A start-up trace foresees the program's chunk: it has the runtime's files,
        // in their order, and its loader and libraries. The program and the script
        // are fetched by name all the same (they come sooner so).
        let (chunks, tree) = python_image();
        let s = setup_chunks(chunks, Fake::default(), FetchConfig::default());
        s.fetcher.set_files(Arc::new(tree));
        s.fetcher.foresee([(0, 3)]);
        let args = ["python3", "main.py"].map(String::from).to_vec();
        s.fetcher
            .inner
            .start_process(&Process::new(args.clone(), &env, "/app".into()));
        let want = [1, 2, 3, 5, 8, 9, 10, 11];
        settle(&s, &want);
        assert_eq!(chunks_asked(&s), want);
        assert_eq!(s.fetcher.counters().process_files.load(Relaxed), 2);

        // The trace holds the script too: what it imports is the trace's to fetch, so
        // only the two files named are asked for, and the script is not read.
        let (chunks, tree) = python_image();
        let s = setup_chunks(chunks, Fake::default(), FetchConfig::default());
        s.fetcher.set_files(Arc::new(tree));
        s.fetcher.foresee([(0, 2), (0, 3)]);
        s.fetcher
            .inner
            .start_process(&Process::new(args.clone(), &env, "/app".into()));
        settle(&s, &[2, 3]);
        assert_eq!(chunks_asked(&s), [2, 3]);
        assert_eq!(s.fetcher.counters().modules.load(Relaxed), 0);

        // No tree, or no program: nothing.
        let (chunks, _) = image();
        let s = setup_chunks(chunks, Fake::default(), FetchConfig::default());
        s.fetcher
            .will_run(Process::new(args.to_vec(), &[], "/app".into()));
        settle(&s, &[]);
        assert_eq!(s.fake.requests(), 0);
        let s = mounted();
        s.fetcher.will_run(Process::default());
        settle(&s, &[]);
        assert_eq!(s.fake.requests(), 0);
    }

    #[test]
    fn a_module_whose_chunk_another_fetcher_brings_is_read_when_the_interpreter_reads_it() {
        let s = mounted();
        // Another image's fetcher (sharing the store and the chunks in flight) is
        // fetching json's chunk.
        let inner = &s.fetcher.inner;
        let json = inner.blobs[0].entries[5].digest;
        let crate::Claim::Mine(theirs) = inner.inflight.claim(&json) else {
            panic!("json's chunk is in flight already");
        };
        assert_eq!(read(&s, 2), s.chunks[2]);
        settle(&s, &[8, 10, 11]);
        // Not fetched twice; the other fetcher brings it in.
        assert_eq!(s.fetcher.counters().modules.load(Relaxed), 3);
        inner.store.put_chunk(&json, &s.chunks[5]).unwrap();
        inner.inflight.finish(&json, &theirs, Ok(()));
        // The interpreter reads json: its decoder (in the same chunk) is read, and
        // `_json` fetched.
        assert_eq!(read(&s, 5), s.chunks[5]);
        settle(&s, &[9]);
        assert_eq!(s.fetcher.counters().modules.load(Relaxed), 4);
        let c = u64::from(CHUNK);
        let mut asked = s.fake.asked.lock().unwrap().clone();
        asked.sort();
        assert_eq!(asked, [2, 8, 9, 10, 11].map(|i| (i * c, c)));
    }

    #[test]
    fn a_walker_reading_modules_has_no_imports_fetched() {
        // tar reading the tree: its stream reads ahead of it, module or not.
        let s = mounted();
        let mut buf = vec![0; 4096];
        for i in 0..5 {
            s.fetcher.read_at(0, i, 4096, &mut buf).unwrap();
        }
        for i in [5, 8] {
            assert_eq!(read(&s, i), s.chunks[i]);
        }
        settle(&s, &[]);
        assert!(lock(&s.fetcher.inner.modules.state).seen.is_empty());
        assert_eq!(s.fetcher.counters().modules.load(Relaxed), 0);
        // The same reads one by one, a module at a time, are looked at.
        let s = mounted();
        for i in [5, 8] {
            assert_eq!(read(&s, i), s.chunks[i]);
        }
        settle(&s, &[9, 10, 11]);
        assert!(!lock(&s.fetcher.inner.modules.state).seen.is_empty());
    }

    #[test]
    fn a_read_that_is_no_modules_start_fetches_nothing() {
        let (chunks, tree) = image();
        // With no tree given, nothing.
        let s = setup_chunks(chunks.clone(), Fake::default(), FetchConfig::default());
        let mut buf = vec![0; 100];
        s.fetcher.read_at(0, 2, 0, &mut buf).unwrap();
        settle(&s, &[]);
        assert_eq!(s.fetcher.counters().modules.load(Relaxed), 0);
        // With one: a read in the middle of a file, a file that is not python, and a
        // compiled module cut short or damaged fetch nothing either.
        let mut chunks = chunks;
        chunks[3][..11].copy_from_slice(b"x = 1\nimpor");
        let damaged = pyc((3, 11), "/usr/lib/python3.11/x.py", &[("enum", 0, None)], 0);
        chunks[7][..damaged.len()].copy_from_slice(&damaged);
        // The code's length says it runs past the module.
        chunks[7][16 + 1 + 20 + 1..16 + 1 + 20 + 5].copy_from_slice(&u32::MAX.to_le_bytes());
        let cfg = FetchConfig {
            min_fetch: CHUNK.into(),
            ..FetchConfig::default()
        };
        let s = setup_chunks(chunks, Fake::default(), cfg);
        s.fetcher.set_files(Arc::new(tree));
        s.fetcher.read_at(0, 2, 4096, &mut buf).unwrap();
        s.fetcher.read_at(0, 2, 1, &mut buf).unwrap();
        assert_eq!(read(&s, 3), s.chunks[3]);
        assert_eq!(read(&s, 7), s.chunks[7]);
        settle(&s, &[]);
        assert_eq!(s.fetcher.counters().modules.load(Relaxed), 0);
        let c = u64::from(CHUNK);
        // Only what was read (and the chunk after chunk 3, read ahead of a reader going
        // forward): none of the modules' chunks (5, 6, 8 to 11).
        let asked = s.fake.asked.lock().unwrap().clone();
        let chunks: Vec<u64> = asked
            .iter()
            .flat_map(|&(at, len)| at / c..(at + len) / c)
            .collect();
        assert!(chunks.iter().all(|i| [2, 3, 4, 7].contains(i)), "{asked:?}");
    }
}
