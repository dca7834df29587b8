//! Python modules: what a module imports, and where the interpreter finds it.
//!
//! A python program's start-up imports module after module, one after the other, and
//! each first read of a module not cached is a round trip: python's start-up in the
//! benchmark waited on about 28 of them in turn, with the link idle in between. Which
//! modules come next is written in the module just read. A compiled module (`.pyc`, what
//! the interpreter reads when it is there, as in every distribution's packages) is a
//! marshalled code object, and its module-level code imports with `IMPORT_NAME`
//! instructions whose operands name the module, the `from` list and the level of a
//! relative import. [`compiled`] reads them; [`source_imports`] reads the `import`
//! statements of a source file that starts with one (a script such as `main.py`), and
//! [`resolve`] finds the files the interpreter will read for them, in its search order
//! (the importer's own tree, the standard library, `lib-dynload`, the site packages),
//! so the fetcher can ask for all of them at once, and for theirs as they come in.
//!
//! Only module-level code is read: a function's imports run when it is called, if ever.
//! Modules the interpreter has built in or frozen (python 3.11 and later freeze `os`,
//! `site`, `codecs` and a few more) have no file to fetch. What it costs: a module-level
//! import that a condition skips, or that an `except ImportError` replaces, is fetched
//! for nothing.
//!
//! The marshal reader is written here, not taken from a crate: the ones published
//! (`marshal-parser`, `py-marshal`) follow nesting without a bound (a stack overflow on
//! crafted input), allocate what a length field says before reading it, and leave
//! back-references unresolved, where a module's names are mostly back-references. This
//! one reads only what finding imports needs, from untrusted bytes: every length is
//! checked against the input, nesting and object counts are bounded, and anything
//! malformed means "no imports", never an error or a panic.

use std::collections::HashSet;
use std::rc::Rc;
use std::sync::Arc;

/// The deepest nesting of marshalled objects followed (to prevent stack exhaustion; a
/// compiled module nests a few levels: code in a tuple in code).
pub const MAX_DEPTH: usize = 64;
/// The most objects read from one module (to prevent denial of service).
pub const MAX_OBJECTS: usize = 1 << 20;
/// The most imports taken from one module, and files found for them (to prevent
/// denial of service).
pub const MAX_IMPORTS: usize = 256;
/// The most lines of a source file read (to prevent denial of service).
pub const MAX_LINES: usize = 20_000;
/// The most names taken from one `from` list (to prevent denial of service).
pub const MAX_NAMES: usize = 64;
/// The deepest relative import followed (to prevent denial of service; a path has no
/// more levels than this to go up in practice).
pub const MAX_LEVEL: u32 = 32;
/// The longest statement continued over lines that is read.
const MAX_STATEMENT: usize = 4096;

/// One import statement of a module's top level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Import {
    /// The module named: `a.b` in `import a.b`, `b` in `from ..b import c`, empty in
    /// `from . import c`.
    pub module: String,
    /// The leading dots of a relative import; 0 for an absolute one.
    pub level: u32,
    /// The names of a `from` import (`c` above): those that are submodules of a
    /// package are imported too.
    pub names: Vec<String>,
}

/// What a compiled module says of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    /// The python version that compiled it (from its magic number).
    pub version: (u8, u8),
    /// The path of its source when it was compiled (`co_filename`).
    pub source: String,
    /// Its module-level imports, in order.
    pub imports: Vec<Import>,
}

/// The python version whose compiled modules start with `head`, for the versions this
/// reader knows (3.8 to 3.12); `None` for anything else.
pub fn compiled_version(head: &[u8]) -> Option<(u8, u8)> {
    let magic = u16::from_le_bytes([*head.first()?, *head.get(1)?]);
    if head.get(2..4)? != b"\r\n" {
        return None;
    }
    // Lib/importlib/_bootstrap_external.py lists each version's magic numbers.
    Some(match magic {
        3400..=3413 => (3, 8),
        3420..=3425 => (3, 9),
        3430..=3439 => (3, 10),
        3450..=3495 => (3, 11),
        3500..=3531 => (3, 12),
        _ => return None,
    })
}

/// Reads a compiled module (a `.pyc` file, header included; bytes after its end are
/// ignored). `None` if it is not one this reader knows, or is malformed.
pub fn compiled(data: &[u8]) -> Option<Compiled> {
    let version = compiled_version(data)?;
    // Magic, flags, and the source's mtime and size (or its hash): 16 bytes since 3.7.
    let mut r = Reader {
        data: data.get(16..)?,
        at: 0,
        refs: Vec::new(),
        objects: 0,
        version,
    };
    let Obj::Code(code) = r.object(0)? else {
        return None;
    };
    let Obj::Str(source) = &code.filename else {
        return None;
    };
    Some(Compiled {
        version,
        source: source.to_string(),
        imports: code.imports(),
    })
}

/// Where python `version` keeps the compiled form of the source at `source`:
/// `dir/__pycache__/stem.cpython-3N.pyc` for `dir/stem.py`; `None` for a path that is
/// not an absolute one to a `.py` file.
pub fn compiled_path(source: &str, (major, minor): (u8, u8)) -> Option<String> {
    let stem = source.strip_suffix(".py")?;
    let (dir, stem) = stem.rsplit_once('/')?;
    if !source.starts_with('/') || stem.is_empty() {
        return None;
    }
    Some(format!(
        "{dir}/__pycache__/{stem}.cpython-{major}{minor}.pyc"
    ))
}

/// An object as far as finding imports needs it.
#[derive(Clone)]
enum Obj {
    /// The end of a dict.
    Null,
    None,
    Int(i64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<[Obj]>),
    Code(Rc<Code>),
    /// Anything else (numbers, lists, sets, dicts, booleans).
    Other,
}

/// The fields of a code object that say what it imports.
struct Code {
    code: Obj,
    consts: Obj,
    names: Obj,
    filename: Obj,
}

/// Python's opcodes from 3.8 to 3.12 (Lib/opcode.py).
mod op {
    pub const CACHE: u8 = 0;
    pub const LOAD_CONST: u8 = 100;
    pub const IMPORT_NAME: u8 = 108;
    pub const EXTENDED_ARG: u8 = 144;
}

impl Code {
    /// The `IMPORT_NAME` instructions of this code (not of the functions and classes
    /// it defines), with the level and `from` list the two `LOAD_CONST`s before each
    /// push.
    fn imports(&self) -> Vec<Import> {
        let (Obj::Bytes(ops), Obj::Tuple(names)) = (&self.code, &self.names) else {
            return Vec::new();
        };
        let consts: &[Obj] = match &self.consts {
            Obj::Tuple(t) => t,
            _ => &[],
        };
        let mut out = Vec::new();
        let mut ext: u32 = 0;
        // The constants the last two instructions loaded.
        let mut loaded: [Option<&Obj>; 2] = [None, None];
        for pair in ops.chunks_exact(2) {
            let arg = (ext << 8) | u32::from(pair[1]);
            ext = 0;
            match pair[0] {
                op::EXTENDED_ARG => ext = arg,
                // Inline caches (3.11 and later) sit between instructions.
                op::CACHE => {}
                op::LOAD_CONST => loaded = [loaded[1], consts.get(arg as usize)],
                op::IMPORT_NAME => {
                    let Some(Obj::Str(module)) = names.get(arg as usize) else {
                        continue;
                    };
                    let level = match loaded[0] {
                        Some(Obj::Int(l)) => u32::try_from(*l).unwrap_or(0),
                        _ => 0,
                    };
                    if level > MAX_LEVEL {
                        loaded = [None, None];
                        continue;
                    }
                    let names = match loaded[1] {
                        Some(Obj::Tuple(t)) => t
                            .iter()
                            .filter_map(|n| match n {
                                Obj::Str(s) => Some(s.to_string()),
                                _ => None,
                            })
                            .take(MAX_NAMES)
                            .collect(),
                        _ => Vec::new(),
                    };
                    out.push(Import {
                        module: module.to_string(),
                        level,
                        names,
                    });
                    if out.len() >= MAX_IMPORTS {
                        break;
                    }
                    loaded = [None, None];
                }
                _ => loaded = [None, None],
            }
        }
        out
    }
}

/// A marshal reader over untrusted bytes (Python/marshal.c, `r_object`).
struct Reader<'a> {
    data: &'a [u8],
    at: usize,
    /// Objects flagged for back-reference, in the order their reading started.
    refs: Vec<Obj>,
    objects: usize,
    version: (u8, u8),
}

/// The flag of an object later ones may refer back to.
const FLAG_REF: u8 = 0x80;

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.data.get(self.at..end)?;
        self.at = end;
        Some(s)
    }

    fn byte(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u32(&mut self) -> Option<u32> {
        let b = self.take(4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A count of items that each take a byte at least: no more than the bytes left.
    fn count(&mut self, small: bool) -> Option<usize> {
        let n = match small {
            true => usize::from(self.byte()?),
            false => usize::try_from(self.u32()?).ok()?,
        };
        (n <= self.data.len() - self.at).then_some(n)
    }

    fn string(&mut self, small: bool) -> Option<Obj> {
        let n = match small {
            true => usize::from(self.byte()?),
            false => usize::try_from(self.u32()?).ok()?,
        };
        let s = self.take(n)?;
        Some(Obj::Str(String::from_utf8_lossy(s).into()))
    }

    fn object(&mut self, depth: usize) -> Option<Obj> {
        self.objects += 1;
        if depth > MAX_DEPTH || self.objects > MAX_OBJECTS {
            return None;
        }
        let b = self.byte()?;
        let flagged = b & FLAG_REF != 0;
        // A container's (and a code object's) slot is taken before its items are read,
        // as marshal.c does; a scalar's after.
        let slot = match (flagged, b & !FLAG_REF) {
            (true, b'(' | b')' | b'[' | b'{' | b'<' | b'>' | b'c') => {
                self.refs.push(Obj::Other);
                Some(self.refs.len() - 1)
            }
            _ => None,
        };
        let obj = match b & !FLAG_REF {
            b'0' => Obj::Null,
            b'N' => Obj::None,
            b'F' | b'T' | b'S' | b'.' => Obj::Other,
            b'i' => Obj::Int(i64::from(self.u32()? as i32)),
            b'I' | b'g' => {
                self.take(8)?;
                Obj::Other
            }
            b'y' => {
                self.take(16)?;
                Obj::Other
            }
            b'f' => {
                let n = self.byte()?;
                self.take(usize::from(n))?;
                Obj::Other
            }
            b'x' => {
                for _ in 0..2 {
                    let n = self.byte()?;
                    self.take(usize::from(n))?;
                }
                Obj::Other
            }
            b'l' => {
                let digits = (self.u32()? as i32).unsigned_abs() as usize;
                self.take(digits.checked_mul(2)?)?;
                Obj::Other
            }
            b's' => {
                let n = usize::try_from(self.u32()?).ok()?;
                Obj::Bytes(self.take(n)?.into())
            }
            b't' | b'u' | b'a' | b'A' => self.string(false)?,
            b'z' | b'Z' => self.string(true)?,
            c @ (b'(' | b')') => {
                let n = self.count(c == b')')?;
                // Each item takes a byte of input at least, but more room here.
                let mut items = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    items.push(self.object(depth + 1)?);
                }
                Obj::Tuple(items.into())
            }
            b'[' | b'<' | b'>' => {
                let n = self.count(false)?;
                for _ in 0..n {
                    self.object(depth + 1)?;
                }
                Obj::Other
            }
            b'{' => {
                while !matches!(self.object(depth + 1)?, Obj::Null) {
                    self.object(depth + 1)?;
                }
                Obj::Other
            }
            b'r' => {
                let i = usize::try_from(self.u32()?).ok()?;
                return self.refs.get(i).cloned();
            }
            b'c' => self.code(depth)?,
            _ => return None,
        };
        match slot {
            Some(i) => self.refs[i] = obj.clone(),
            None if flagged => self.refs.push(obj.clone()),
            None => {}
        }
        Some(obj)
    }

    /// A code object's fields, as each version lays them out.
    fn code(&mut self, depth: usize) -> Option<Obj> {
        let v311 = self.version >= (3, 11);
        // argcount, posonlyargcount, kwonlyargcount, [nlocals before 3.11], stacksize,
        // flags.
        self.take(if v311 { 5 * 4 } else { 6 * 4 })?;
        let code = self.object(depth + 1)?;
        let consts = self.object(depth + 1)?;
        let names = self.object(depth + 1)?;
        // localsplusnames and localspluskinds; before 3.11 varnames, freevars, cellvars.
        for _ in 0..if v311 { 2 } else { 3 } {
            self.object(depth + 1)?;
        }
        let filename = self.object(depth + 1)?;
        // name, and qualname since 3.11.
        for _ in 0..if v311 { 2 } else { 1 } {
            self.object(depth + 1)?;
        }
        self.take(4)?; // firstlineno
                       // The line table, and the exception table since 3.11.
        for _ in 0..if v311 { 2 } else { 1 } {
            self.object(depth + 1)?;
        }
        Some(Obj::Code(Rc::new(Code {
            code,
            consts,
            names,
            filename,
        })))
    }
}

/// The module-level imports of python source that starts (after comments and a
/// docstring) with an import statement, as a script or module usually does; `None`
/// for text that does not, which is not taken for python. Reads up to the first NUL
/// byte (what follows a file in its chunk). Imports in a function or class body are
/// left out; those under a module-level `if`, `try` or `with` are kept.
pub fn source_imports(data: &[u8]) -> Option<Vec<Import>> {
    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let text = match std::str::from_utf8(&data[..end]) {
        Ok(text) => text,
        // Cut in the middle of a character (the end of what was read): up to it.
        Err(e) if e.error_len().is_none() => std::str::from_utf8(&data[..e.valid_up_to()]).ok()?,
        Err(_) => return None,
    };
    let mut out = Vec::new();
    let mut in_string: Option<&str> = None;
    let mut in_body = false;
    let mut started = false;
    // A statement continued over lines (parentheses or a backslash).
    let mut pending: Option<String> = None;
    for line in text.lines().take(MAX_LINES) {
        if let Some(quote) = in_string {
            if line.contains(quote) {
                in_string = None;
            }
            continue;
        }
        let code = line.split('#').next().unwrap_or("");
        if let Some(p) = pending.as_mut() {
            p.push(' ');
            p.push_str(code.trim_end_matches('\\'));
            if p.len() > MAX_STATEMENT {
                pending = None;
            } else if !continued(code, p) {
                out.extend(parse_import(&pending.take()?));
            }
            if out.len() >= MAX_IMPORTS {
                out.truncate(MAX_IMPORTS);
                break;
            }
            continue;
        }
        let trimmed = code.trim_start();
        if trimmed.trim().is_empty() {
            continue;
        }
        let opens = ["\"\"\"", "'''"].into_iter().find(|q| {
            trimmed
                .trim_start_matches(['r', 'R', 'b', 'B', 'u', 'U', 'f', 'F'])
                .starts_with(q)
        });
        if !line.starts_with([' ', '\t']) {
            // A statement at the top level: a body starts or ends here.
            in_body = ["def ", "async def ", "class ", "@"]
                .iter()
                .any(|k| trimmed.starts_with(k));
        }
        let is_import = trimmed.starts_with("import ") || trimmed.starts_with("from ");
        if !started && opens.is_none() {
            if !is_import {
                return None;
            }
            started = true;
        }
        // A string left open on this line (a docstring over several lines).
        for q in ["\"\"\"", "'''"] {
            if line.matches(q).count() % 2 == 1 {
                in_string = Some(q);
            }
        }
        if in_string.is_some() || !is_import || in_body {
            continue;
        }
        let statement = trimmed.trim_end().trim_end_matches('\\').to_string();
        if continued(code, &statement) {
            pending = Some(statement);
        } else {
            out.extend(parse_import(&statement));
        }
        if out.len() >= MAX_IMPORTS {
            out.truncate(MAX_IMPORTS);
            break;
        }
    }
    started.then_some(out)
}

/// Whether a statement goes on after `line`: a backslash at its end, or a parenthesis
/// `statement` opened and has not closed.
fn continued(line: &str, statement: &str) -> bool {
    line.trim_end().ends_with('\\')
        || statement.matches('(').count() > statement.matches(')').count()
}

/// One `import` or `from ... import` statement; nothing for one malformed.
fn parse_import(statement: &str) -> Vec<Import> {
    let ident = |s: &str| {
        !s.is_empty()
            && s.split('.')
                .all(|p| !p.is_empty() && p.chars().all(|c| c.is_alphanumeric() || c == '_'))
    };
    // `a.b as c` is `a.b`.
    let first_word = |s: &str| s.split_whitespace().next().unwrap_or("").to_string();
    if let Some(rest) = statement.strip_prefix("import ") {
        return rest
            .split(',')
            .map(first_word)
            .filter(|m| ident(m))
            .map(|module| Import {
                module,
                level: 0,
                names: Vec::new(),
            })
            .collect();
    }
    let Some(rest) = statement.strip_prefix("from ") else {
        return Vec::new();
    };
    let Some((from, names)) = rest.split_once(" import") else {
        return Vec::new();
    };
    let from = from.trim();
    let module = from.trim_start_matches('.');
    let level = (from.len() - module.len()) as u32;
    // `from . sib import x` is `from .sib import x`.
    let module = module.trim_start();
    if !(module.is_empty() && level > 0 || ident(module)) {
        return Vec::new();
    }
    if level > MAX_LEVEL {
        return Vec::new();
    }
    let names = names
        .replace(['(', ')'], " ")
        .split(',')
        .map(first_word)
        .filter(|n| ident(n) && !n.contains('.'))
        .take(MAX_NAMES)
        .collect();
    vec![Import {
        module: module.to_string(),
        level,
        names,
    }]
}

/// The directories of an image, as the interpreter's finders list them.
pub trait Dirs {
    /// The names in the directory at the absolute path `dir` (symlinks followed),
    /// sorted; `None` if there is no such directory.
    fn list(&self, dir: &str) -> Option<Arc<[String]>>;
}

/// The python versions an image has a standard library for (`python3.N` in
/// `/usr/lib` or `/usr/local/lib`), newest first.
pub fn versions(dirs: &dyn Dirs) -> Vec<(u8, u8)> {
    let mut found: Vec<(u8, u8)> = ["/usr/lib", "/usr/local/lib"]
        .iter()
        .filter_map(|d| dirs.list(d))
        .flat_map(|names| names.to_vec())
        .filter_map(|n| n.strip_prefix("python3.")?.parse::<u8>().ok())
        .map(|minor| (3, minor))
        .collect();
    found.sort_unstable_by(|a, b| b.cmp(a));
    found.dedup();
    found
}

/// Modules python 3.11 and later have frozen into the interpreter: importing them
/// reads no file (`_imp._frozen_module_names()`).
const FROZEN: &[&str] = &[
    "_collections_abc",
    "_sitebuiltins",
    "abc",
    "codecs",
    "genericpath",
    "importlib._bootstrap",
    "importlib._bootstrap_external",
    "importlib.machinery",
    "importlib.util",
    "io",
    "ntpath",
    "os",
    "os.path",
    "posixpath",
    "runpy",
    "site",
    "stat",
    "zipimport",
];

/// Whether a program named `name` (a path or a file name) is CPython's interpreter:
/// `python`, `python3` or `python3.N`.
pub fn is_interpreter(name: &str) -> bool {
    let name = name.rsplit('/').next().unwrap_or(name);
    match name.strip_prefix("python") {
        Some("" | "3") => true,
        Some(v) => v.strip_prefix("3.").is_some_and(|m| {
            !m.is_empty() && m.len() <= 3 && m.bytes().all(|b| b.is_ascii_digit())
        }),
        None => false,
    }
}

/// The modules CPython's initialization imports before it runs any code of the
/// command line's, which no module names: the codec registry's package
/// (`encodings`, whose own imports follow from it), the codec of the file system and
/// standard streams (`utf_8`: the locale's, which [`ctype_locales`] makes UTF-8
/// unless the environment asks otherwise), `site` (frozen from 3.11) and the hooks it
/// imports when the image has them.
pub fn startup_imports() -> Vec<Import> {
    [
        "encodings",
        "encodings.utf_8",
        "site",
        "sitecustomize",
        "usercustomize",
    ]
    .map(|m| Import {
        module: m.to_string(),
        level: 0,
        names: Vec::new(),
    })
    .to_vec()
}

/// The locales CPython's initialization sets `LC_CTYPE` to, first to last, given the
/// environment (`var`): the one `LC_ALL`, `LC_CTYPE` or `LANG` names (the first that
/// is set), then, if it is the C locale or missing, C.UTF-8 ("locale coercion", PEP
/// 538), unless `LC_ALL` forces the C locale or `PYTHONCOERCECLOCALE=0` turns it off.
pub fn ctype_locales<'a>(var: impl Fn(&str) -> Option<&'a str>) -> Vec<String> {
    let set = |n: &str| var(n).filter(|v| !v.is_empty());
    let all = set("LC_ALL");
    let name = all.or_else(|| set("LC_CTYPE")).or_else(|| set("LANG"));
    let c = |n: &str| n == "C" || n == "POSIX";
    let mut out: Vec<String> = name
        .filter(|n| !c(n))
        .map(str::to_owned)
        .into_iter()
        .collect();
    if all.is_none() && var("PYTHONCOERCECLOCALE") != Some("0") {
        out.push("C.UTF-8".into());
    }
    out
}

/// The site directories of python `v` that `site` adds to the search path and reads
/// the `.pth` files of, as the python image (`/usr/local`), Debian and Fedora lay them
/// out, in the order of the search path.
fn site_dirs((major, minor): (u8, u8)) -> [String; 5] {
    let py = format!("python{major}.{minor}");
    [
        format!("/usr/local/lib/{py}/site-packages"),
        format!("/usr/local/lib/{py}/dist-packages"),
        format!("/usr/lib/python{major}/dist-packages"),
        format!("/usr/lib64/{py}/site-packages"),
        format!("/usr/lib/{py}/site-packages"),
    ]
}

/// The most `.pth` files taken (a lookup each).
pub const MAX_PTH: usize = 32;

/// The path configuration files (`*.pth`) `site` reads at every start of python, for
/// the newest of `versions` that has a site directory: each directory's in name
/// order, at most [`MAX_PTH`] in all. (A `.pth` line that starts with `import` is run,
/// and what it imports is not looked for.)
pub fn path_files(versions: &[(u8, u8)], dirs: &dyn Dirs) -> Vec<String> {
    for &v in versions {
        let mut found = false;
        let mut out = Vec::new();
        for dir in site_dirs(v) {
            let Some(names) = dirs.list(&dir) else {
                continue;
            };
            found = true;
            out.extend(
                names
                    .iter()
                    .filter(|n| n.ends_with(".pth") && !n.starts_with('.'))
                    .map(|n| join(&dir, n)),
            );
        }
        if found {
            out.truncate(MAX_PTH);
            return out;
        }
    }
    Vec::new()
}

/// Who imports: where its source is, and which python runs it.
#[derive(Debug, Clone, Copy)]
pub struct Importer<'a> {
    /// The path of the importing module's source (`co_filename`, or the script's
    /// path), if known: relative imports and the importer's own tree need it.
    pub source: Option<&'a str>,
    /// Whether it is the script python runs (its directory is first on the search
    /// path), not a module it imports.
    pub script: bool,
    /// The versions of python that may run it: a compiled module's own, or those the
    /// image has ([`versions`]).
    pub versions: &'a [(u8, u8)],
}

/// A module found: the file the interpreter reads for it (the compiled one when
/// there is one), and the directory of its submodules if it is a package.
struct Found {
    file: Option<String>,
    package: Option<String>,
}

fn join(dir: &str, name: &str) -> String {
    match dir {
        "/" => format!("/{name}"),
        _ => format!("{dir}/{name}"),
    }
}

fn parent(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) => "/",
        Some(i) => &path[..i],
        None => path,
    }
}

fn has(names: &[String], name: &str) -> bool {
    names.binary_search_by(|n| n.as_str().cmp(name)).is_ok()
}

/// The files the interpreter reads for `imports`, in the order it reads them (a
/// package before its submodules), at most [`MAX_IMPORTS`], none twice.
pub fn resolve(importer: &Importer, imports: &[Import], dirs: &dyn Dirs) -> Vec<String> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut push = |found: &Found, out: &mut Vec<String>| {
        if let Some(f) = &found.file {
            if out.len() < MAX_IMPORTS && seen.insert(f.clone()) {
                out.push(f.clone());
            }
        }
    };
    for &v in importer.versions {
        let roots = roots(importer, v, dirs);
        for imp in imports {
            if v >= (3, 11) && imp.level == 0 {
                let top = imp.module.split('.').next().unwrap_or("");
                if FROZEN.contains(&imp.module.as_str()) || FROZEN.contains(&top) {
                    continue;
                }
            }
            // Where the first part of the name is looked for.
            let base: Vec<String> = match (imp.level, importer.source) {
                (0, _) => roots.clone(),
                (_, None) => continue,
                (level, Some(source)) => {
                    let mut dir = parent(source);
                    for _ in 1..level.min(MAX_LEVEL) {
                        dir = parent(dir);
                    }
                    vec![dir.to_string()]
                }
            };
            let mut package = None;
            let mut dirs_to_search = base;
            for part in imp.module.split('.').filter(|p| !p.is_empty()) {
                let Some(found) = dirs_to_search.iter().find_map(|d| find(d, part, v, dirs)) else {
                    package = None;
                    break;
                };
                push(&found, &mut out);
                package = found.package.clone();
                let Some(p) = found.package else { break };
                dirs_to_search = vec![p];
            }
            if imp.module.is_empty() {
                package = dirs_to_search.first().cloned();
            }
            if let Some(p) = package {
                for name in imp.names.iter().filter(|n| *n != "*") {
                    if let Some(found) = find(&p, name, v, dirs) {
                        push(&found, &mut out);
                    }
                }
            }
        }
        if !out.is_empty() {
            break;
        }
    }
    out
}

/// The interpreter's search path for version `v`: a script's directory first, then
/// the standard library, its extension modules and the site packages, as the python
/// image (`/usr/local`, whose interpreter comes first on its `PATH`) and distributions
/// lay them out; then the importer's own tree (the directory above its top package: a
/// virtual environment's or an application's packages) when it is none of those.
fn roots(importer: &Importer, (major, minor): (u8, u8), dirs: &dyn Dirs) -> Vec<String> {
    let mut roots = Vec::new();
    let own = importer.source.map(|source| {
        let mut dir = parent(source);
        while dir != "/" && dirs.list(dir).is_some_and(|n| has(&n, "__init__.py")) {
            dir = parent(dir);
        }
        dir.to_string()
    });
    if importer.script {
        roots.extend(own.clone());
    }
    let py = format!("python{major}.{minor}");
    for r in [
        format!("/usr/local/lib/{py}"),
        format!("/usr/local/lib/{py}/lib-dynload"),
        format!("/usr/lib/{py}"),
        format!("/usr/lib/{py}/lib-dynload"),
    ]
    .into_iter()
    .chain(site_dirs((major, minor)))
    .chain(own)
    {
        if !roots.contains(&r) && dirs.list(&r).is_some() {
            roots.push(r);
        }
    }
    roots
}

/// Module `name` in directory `dir`, as python `v`'s path finder looks: a package
/// (a directory with `__init__.py`), an extension module, a source module (read
/// through its compiled file in `__pycache__` when there is one), a module compiled
/// without source; a directory without `__init__.py` (a namespace package) last.
fn find(dir: &str, name: &str, (major, minor): (u8, u8), dirs: &dyn Dirs) -> Option<Found> {
    let names = dirs.list(dir)?;
    let compiled_or_source = |dir: &str, stem: &str| {
        let cached = format!("{stem}.cpython-{major}{minor}.pyc");
        let pycache = join(dir, "__pycache__");
        match dirs.list(&pycache).is_some_and(|n| has(&n, &cached)) {
            true => join(&pycache, &cached),
            false => join(dir, &format!("{stem}.py")),
        }
    };
    let mut namespace = None;
    if has(&names, name) {
        let sub = join(dir, name);
        if let Some(inner) = dirs.list(&sub) {
            let file = if has(&inner, "__init__.py") {
                Some(compiled_or_source(&sub, "__init__"))
            } else if has(&inner, "__init__.pyc") {
                Some(join(&sub, "__init__.pyc"))
            } else {
                None
            };
            if file.is_some() {
                return Some(Found {
                    file,
                    package: Some(sub),
                });
            }
            namespace = Some(sub);
        }
    }
    let tag = format!("{name}.cpython-{major}{minor}-");
    let prefix = format!("{name}.");
    let from = names.partition_point(|n| n.as_str() < prefix.as_str());
    let extension = names[from..]
        .iter()
        .take_while(|n| n.starts_with(&prefix))
        .find(|n| {
            n.ends_with(".so")
                && (n.starts_with(&tag)
                    || **n == format!("{name}.abi3.so")
                    || **n == format!("{name}.so"))
        });
    let file = match extension {
        Some(e) => Some(join(dir, e)),
        None if has(&names, &format!("{name}.py")) => Some(compiled_or_source(dir, name)),
        None if has(&names, &format!("{name}.pyc")) => Some(join(dir, &format!("{name}.pyc"))),
        None => None,
    };
    match (file, namespace) {
        (Some(file), _) => Some(Found {
            file: Some(file),
            package: None,
        }),
        (None, Some(ns)) => Some(Found {
            file: None,
            package: Some(ns),
        }),
        (None, None) => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// Marshals strings, tuples and code objects as CPython does, for the tests.
    #[derive(Default)]
    struct Writer {
        out: Vec<u8>,
        /// Back-reference slots taken so far.
        slots: u32,
        /// Strings written with a slot, by value.
        interned: HashMap<String, u32>,
    }

    impl Writer {
        fn u32(&mut self, v: u32) {
            self.out.extend_from_slice(&v.to_le_bytes());
        }

        /// A string, flagged the first time and referred back to after.
        fn str(&mut self, s: &str) {
            if let Some(&i) = self.interned.get(s) {
                self.out.push(b'r');
                return self.u32(i);
            }
            self.interned.insert(s.to_owned(), self.slots);
            self.slots += 1;
            self.out.push(b'Z' | FLAG_REF);
            self.out.push(s.len() as u8);
            self.out.extend_from_slice(s.as_bytes());
        }

        /// A flagged tuple of strings (its slot is taken before its items').
        fn tuple(&mut self, items: &[&str]) {
            self.slots += 1;
            match u8::try_from(items.len()) {
                Ok(n) => self.out.extend_from_slice(&[b')' | FLAG_REF, n]),
                Err(_) => {
                    self.out.push(b'(' | FLAG_REF);
                    self.u32(items.len() as u32);
                }
            }
            for s in items {
                self.str(s);
            }
        }
    }

    /// A compiled module of python `version` from `source` whose module-level code
    /// runs `imports` (module, level, from list; `None` for a plain import), after
    /// `padding` constants loaded and dropped (past 255, operands need `EXTENDED_ARG`).
    pub(crate) fn pyc(
        version: (u8, u8),
        source: &str,
        imports: &[(&str, u32, Option<&[&str]>)],
        padding: u32,
    ) -> Vec<u8> {
        let magic: u16 = match version {
            (3, 8) => 3413,
            (3, 9) => 3425,
            (3, 10) => 3439,
            (3, 11) => 3495,
            _ => 3531,
        };
        let mut w = Writer::default();
        w.out.extend_from_slice(&magic.to_le_bytes());
        w.out.extend_from_slice(b"\r\n");
        w.out.extend_from_slice(&[0; 12]);
        // The code object takes the first slot.
        w.out.push(b'c' | FLAG_REF);
        w.slots += 1;
        let ints = if version >= (3, 11) { 5 } else { 6 };
        for _ in 0..ints {
            w.u32(0);
        }
        // Constants: the padding ints, then each import's level and from list.
        let mut consts: Vec<Option<&[&str]>> = Vec::new();
        let mut code = Vec::new();
        let op = |code: &mut Vec<u8>, opcode: u8, arg: u32| {
            for shift in [24, 16, 8] {
                if arg >> shift != 0 {
                    code.extend_from_slice(&[op::EXTENDED_ARG, (arg >> shift) as u8]);
                }
            }
            code.extend_from_slice(&[opcode, arg as u8]);
            if version >= (3, 11) && opcode == op::LOAD_CONST {
                // An inline cache entry, as 3.11 puts after some instructions.
                code.extend_from_slice(&[op::CACHE, 0]);
            }
        };
        for i in 0..padding {
            op(&mut code, op::LOAD_CONST, i);
            op(&mut code, 1, 0); // POP_TOP
        }
        let mut names: Vec<&str> = Vec::new();
        for (module, _, from) in imports {
            let level_at = padding + consts.len() as u32 * 2;
            consts.push(*from);
            op(&mut code, op::LOAD_CONST, level_at);
            op(&mut code, op::LOAD_CONST, level_at + 1);
            op(&mut code, op::IMPORT_NAME, names.len() as u32);
            op(&mut code, 90, names.len() as u32); // STORE_NAME
            names.push(module);
        }
        w.out.push(b's');
        w.u32(code.len() as u32);
        w.out.extend_from_slice(&code);
        // The consts tuple.
        let n = padding + 2 * consts.len() as u32;
        w.out.push(b'(');
        w.u32(n);
        for i in 0..padding {
            w.out.push(b'i');
            w.u32(i + 1000);
        }
        for ((_, level, _), from) in imports.iter().zip(&consts) {
            w.out.push(b'i');
            w.u32(*level);
            match from {
                Some(items) => w.tuple(items),
                None => w.out.push(b'N'),
            }
        }
        w.out.push(b'(');
        w.u32(names.len() as u32);
        for n in &names {
            w.str(n);
        }
        for _ in 0..if version >= (3, 11) { 2 } else { 3 } {
            w.out.extend_from_slice(&[b')', 0]);
        }
        w.str(source);
        w.str("<module>");
        if version >= (3, 11) {
            w.str("<module>");
        }
        w.u32(1);
        for _ in 0..if version >= (3, 11) { 2 } else { 1 } {
            w.out.push(b's');
            w.u32(0);
        }
        w.out
    }

    fn import(module: &str, level: u32, names: &[&str]) -> Import {
        Import {
            module: module.into(),
            level,
            names: names.iter().map(|n| n.to_string()).collect(),
        }
    }

    #[test]
    fn a_compiled_modules_imports_are_read_in_each_version_layout() {
        let imports: &[(&str, u32, Option<&[&str]>)] = &[
            ("os", 0, None),
            ("decoder", 1, Some(&["JSONDecoder", "os"])),
            ("", 2, Some(&["sibling"])),
            ("a.b.c", 0, Some(&["*"])),
        ];
        for v in [(3, 8), (3, 9), (3, 10), (3, 11), (3, 12)] {
            for padding in [0, 3, 300, 70_000] {
                let data = pyc(v, "/usr/lib/python3.11/json/__init__.py", imports, padding);
                let c = compiled(&data).unwrap_or_else(|| panic!("{v:?} {padding}"));
                assert_eq!(c.version, v);
                assert_eq!(c.source, "/usr/lib/python3.11/json/__init__.py");
                assert_eq!(
                    c.imports,
                    vec![
                        import("os", 0, &[]),
                        import("decoder", 1, &["JSONDecoder", "os"]),
                        import("", 2, &["sibling"]),
                        import("a.b.c", 0, &["*"]),
                    ],
                    "{v:?} {padding}"
                );
                // Bytes after the module (the next file in its chunk) change nothing.
                let mut more = data.clone();
                more.extend_from_slice(&[0x55; 5000]);
                assert_eq!(compiled(&more), Some(c));
            }
        }
    }

    #[test]
    fn anything_but_a_whole_compiled_module_gives_no_imports() {
        let data = pyc((3, 11), "/m.py", &[("os", 0, None)], 0);
        for end in 0..data.len() {
            assert_eq!(compiled(&data[..end]), None, "cut at {end}");
        }
        // An unknown version (3.13 renumbered the opcodes).
        let mut other = data.clone();
        other[..2].copy_from_slice(&3571u16.to_le_bytes());
        assert_eq!(compiled(&other), None);
        // Nesting without end: refused at the depth bound, not a stack overflow.
        let mut deep = data[..16].to_vec();
        deep.extend(std::iter::repeat_n([b')', 1], 1 << 20).flatten());
        assert_eq!(compiled(&deep), None);
        // A length past the input: refused before anything is allocated for it.
        let mut long = data[..16].to_vec();
        long.extend_from_slice(&[b'(', 0xff, 0xff, 0xff, 0x7f]);
        assert_eq!(compiled(&long), None);
        // A back-reference to a slot not taken.
        let mut dangling = data[..16].to_vec();
        dangling.extend_from_slice(&[b'r', 9, 0, 0, 0]);
        assert_eq!(compiled(&dangling), None);
    }

    #[test]
    fn from_lists_and_levels_are_bounded() {
        let many: Vec<String> = (0..1000).map(|i| format!("n{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let data = pyc(
            (3, 11),
            "/m.py",
            &[
                ("a", 0, Some(&many)),
                ("b", i32::MAX as u32, None),
                ("c", 3, None),
            ],
            0,
        );
        let c = compiled(&data).unwrap();
        assert_eq!(c.imports.len(), 2);
        assert_eq!(c.imports[0].names.len(), MAX_NAMES);
        assert_eq!(c.imports[1], import("c", 3, &[]));
        let text = format!(
            "from {} import x\nfrom a import {}\n",
            ".".repeat(1000),
            many.join(", ")
        );
        let got = source_imports(text.as_bytes()).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].names.len(), MAX_NAMES);
        // A statement left open runs no further than its bound.
        let open = format!("import a\nfrom b import (c,\n{}", "d,\n".repeat(100_000));
        assert_eq!(
            source_imports(open.as_bytes()).unwrap(),
            vec![import("a", 0, &[])]
        );
    }

    proptest! {
        #[test]
        fn any_bytes_give_an_answer_and_no_panic(
            v in 0usize..5,
            body in proptest::collection::vec(any::<u8>(), 0..2048),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        ) {
            let v = [(3, 8), (3, 9), (3, 10), (3, 11), (3, 12)][v];
            let mut data = pyc(v, "/usr/lib/x.py", &[("os", 0, None), ("y", 1, Some(&["z"]))], 2);
            let _ = compiled(&[&data[..16], &body].concat());
            for (at, b) in flips {
                let n = data.len();
                data[16 + at % (n - 16)] ^= b;
            }
            let _ = compiled(&data);
            let _ = source_imports(&body);
        }
    }

    /// The referee: python's own `dis` finding a code object's module-level imports
    /// (`imports(pyc_path)`, as JSON `[[module, level, [names]]]`), for the scripts of
    /// [`python`].
    const REFEREE: &str = r#"
import dis, json, marshal
def imports(pyc):
    code = marshal.loads(open(pyc, "rb").read()[16:])
    out, consts = [], []
    for i in dis.get_instructions(code):
        if i.opname == "LOAD_CONST":
            consts = (consts + [i.argval])[-2:]
        elif i.opname == "IMPORT_NAME":
            level, names = consts if len(consts) == 2 else (0, None)
            out.append([i.argval, level, list(names or ())])
            consts = []
        elif i.opname not in ("CACHE", "EXTENDED_ARG"):
            consts = []
    return json.dumps(out)
"#;

    /// What the host's python prints running [`REFEREE`] and then `script` with `args`.
    fn python(script: &str, args: &[&std::path::Path]) -> String {
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg(format!("{REFEREE}{script}"))
            .args(args)
            .output()
            .expect("python3 (the referee of these tests) is not installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The imports of the referee's JSON.
    fn refereed(json: &str) -> Vec<Import> {
        serde_json_lite(json.as_bytes())
            .into_iter()
            .map(|(module, level, names)| Import {
                module,
                level,
                names,
            })
            .collect()
    }

    /// What the host's python compiles `source` to, and the imports its own `dis`
    /// finds in the module-level code.
    fn python_compiles(dir: &std::path::Path, name: &str, source: &str) -> (Vec<u8>, Vec<Import>) {
        let src = dir.join(format!("{name}.py"));
        std::fs::write(&src, source).unwrap();
        let script = r#"
import py_compile, sys
print(imports(py_compile.compile(sys.argv[1], cfile=sys.argv[1] + "c", doraise=True)))
"#;
        let expected = refereed(&python(script, &[&src]));
        let pyc = std::fs::read(dir.join(format!("{name}.pyc"))).unwrap();
        (pyc, expected)
    }

    /// Parses python's `json.dumps` of `[[str, int, [str]]]` (no serde_json here).
    fn serde_json_lite(bytes: &[u8]) -> Vec<(String, u32, Vec<String>)> {
        let text = std::str::from_utf8(bytes).unwrap().trim();
        let mut out = Vec::new();
        let inner = text.strip_prefix('[').unwrap().strip_suffix(']').unwrap();
        for item in inner.split("], [").filter(|s| !s.is_empty()) {
            let item = item.trim_start_matches('[').trim_end_matches(']');
            let (name, rest) = item.split_once(", ").unwrap();
            let (level, names) = rest.split_once(", [").unwrap();
            let names = names
                .trim_end_matches(']')
                .split(", ")
                .filter(|s| !s.is_empty())
                .map(|s| s.trim_matches('"').to_string())
                .collect();
            out.push((
                name.trim_matches('"').to_string(),
                level.parse().unwrap(),
                names,
            ));
        }
        out
    }

    #[test]
    fn the_imports_read_are_those_python_compiles() {
        let dir = tempfile::tempdir().unwrap();
        let mut source = String::from(
            "\"\"\"A module.\"\"\"\nimport os, sys as system\nfrom . import a\nfrom ..pkg.mod import (x,\n    y as z)\ntry:\n    import json\nexcept ImportError:\n    json = None\nif system.platform == 'win32':\n    import nt\ndef f():\n    import never\nclass C:\n    import inclass\n",
        );
        // Enough constants for the last import's operands to need EXTENDED_ARG.
        for i in 0..300 {
            source.push_str(&format!("X{i} = 'c{i}'\n"));
        }
        source.push_str("from collections import abc, OrderedDict\nimport xml.etree.ElementTree\n");
        let (pyc, expected) = python_compiles(dir.path(), "m", &source);
        let c = compiled(&pyc).expect("the host python's version is one this reader knows");
        assert!(c.source.ends_with("/m.py"), "{}", c.source);
        assert_eq!(c.imports, expected);
        let modules: Vec<&str> = c.imports.iter().map(|i| i.module.as_str()).collect();
        assert_eq!(
            modules,
            [
                "os",
                "sys",
                "",
                "pkg.mod",
                "json",
                "nt",
                "collections",
                "xml.etree.ElementTree"
            ]
        );
        // The source, read as source, gives the same module-level imports (but the
        // class body's, which the compiled module runs in a code object of its own).
        let from_source = source_imports(source.as_bytes()).unwrap();
        assert_eq!(from_source, expected);
    }

    #[test]
    fn the_imports_read_of_the_hosts_standard_library_are_those_python_finds() {
        // The compiled modules of the host's standard library (its top level and the
        // packages under it), read by this reader and by python's own `dis`.
        let script = r#"
import glob, sysconfig
std = sysconfig.get_path("stdlib")
for p in sorted(glob.glob(std + "/__pycache__/*.cpython-*.pyc") + glob.glob(std + "/*/__pycache__/*.cpython-*.pyc")):
    print(p + "\t" + imports(p))
"#;
        let text = python(script, &[]);
        let mut checked = 0;
        for line in text.lines() {
            let (path, list) = line.split_once('\t').unwrap();
            let expected = refereed(list);
            let c = compiled(&std::fs::read(path).unwrap()).unwrap_or_else(|| panic!("{path}"));
            assert_eq!(c.imports, expected, "{path}");
            checked += 1;
        }
        assert!(
            checked > 100,
            "only {checked} compiled modules found on the host"
        );
    }

    #[test]
    fn source_that_starts_with_an_import_is_read_as_python() {
        let text = b"#!/usr/bin/env python3\n# a comment\n'''Doc\nimport nothing\n'''\nimport hashlib, json as j  # why\nfrom os.path import (join,\n   exists)\nfrom .. import up\nfrom . sib import x\nimport a.b \\\n, c\n\ndef main():\n    import inside\n\nif True:\n    import conditional\n@decorated\nclass K:\n    import body\nimport last\n\0from after import nul\n";
        assert_eq!(
            source_imports(text).unwrap(),
            vec![
                import("hashlib", 0, &[]),
                import("json", 0, &[]),
                import("os.path", 0, &["join", "exists"]),
                import("", 2, &["up"]),
                import("sib", 1, &["x"]),
                import("a.b", 0, &[]),
                import("c", 0, &[]),
                import("conditional", 0, &[]),
                import("last", 0, &[]),
            ]
        );
        // Text whose first statement is not an import is not taken for python.
        for other in [
            &b"x = 1\nimport os\n"[..],
            b"#!/bin/sh\nexec foo\n",
            b"[section]\nimport = yes\n",
            b"",
            b"\xff\xfeimport os\n",
        ] {
            assert_eq!(
                source_imports(other),
                None,
                "{:?}",
                String::from_utf8_lossy(other)
            );
        }
    }

    /// A tree of directories: path → sorted names.
    pub(crate) struct Tree(HashMap<String, Vec<String>>);

    impl Tree {
        /// The files of the tree (the names that are no directory).
        pub(crate) fn files(&self) -> Vec<String> {
            let mut out: Vec<String> = (self.0.iter())
                .flat_map(|(d, names)| names.iter().map(move |n| join(d, n)))
                .filter(|p| !self.0.contains_key(p))
                .collect();
            out.sort();
            out
        }

        /// A tree holding these files (and their directories).
        pub(crate) fn of(files: &[&str]) -> Tree {
            let mut dirs: HashMap<String, Vec<String>> = HashMap::new();
            for f in files {
                let mut path = f.to_string();
                while path != "/" {
                    let p = parent(&path).to_string();
                    let name = path[p.len()..].trim_start_matches('/').to_string();
                    let names = dirs.entry(p.clone()).or_default();
                    if !names.contains(&name) {
                        names.push(name);
                    }
                    path = p;
                }
            }
            for names in dirs.values_mut() {
                names.sort();
            }
            Tree(dirs)
        }
    }

    impl Dirs for Tree {
        fn list(&self, dir: &str) -> Option<Arc<[String]>> {
            self.0.get(dir).map(|n| n.clone().into())
        }
    }

    const STD: &str = "/usr/lib/python3.11";

    fn std_tree(more: &[&str]) -> Tree {
        let mut files: Vec<String> = [
            "json/__init__.py",
            "json/decoder.py",
            "json/scanner.py",
            "json/__pycache__/__init__.cpython-311.pyc",
            "json/__pycache__/decoder.cpython-311.pyc",
            "re/__init__.py",
            "re/__pycache__/__init__.cpython-311.pyc",
            "os.py",
            "__pycache__/os.cpython-311.pyc",
            "enum.py",
            "__pycache__/enum.cpython-311.pyc",
            "__pycache__/enum.cpython-310.pyc",
            "lib-dynload/_json.cpython-311-x86_64-linux-gnu.so",
            "lib-dynload/_jsonx.cpython-311-x86_64-linux-gnu.so",
            "xml/etree/ElementTree.py",
            "xml/__init__.py",
        ]
        .iter()
        .map(|f| format!("{STD}/{f}"))
        .collect();
        files.extend(more.iter().map(|f| f.to_string()));
        Tree::of(&files.iter().map(String::as_str).collect::<Vec<_>>())
    }

    #[test]
    fn the_interpreter_by_name() {
        for n in [
            "python",
            "python3",
            "/usr/bin/python3.11",
            "/usr/local/bin/python3.13",
        ] {
            assert!(is_interpreter(n), "{n}");
        }
        for n in [
            "python2",
            "python3.",
            "python3.x",
            "python3-config",
            "pythonista",
            "sh",
            "",
        ] {
            assert!(!is_interpreter(n), "{n}");
        }
    }

    #[test]
    fn the_interpreters_start_up_imports_resolve_to_its_files() {
        let tree = std_tree(&[
            "/usr/lib/python3.11/encodings/__init__.py",
            "/usr/lib/python3.11/encodings/__pycache__/__init__.cpython-311.pyc",
            "/usr/lib/python3.11/encodings/utf_8.py",
            "/usr/lib/python3.11/encodings/__pycache__/utf_8.cpython-311.pyc",
            "/usr/lib/python3.11/site.py",
            "/usr/lib/python3.11/sitecustomize.py",
        ]);
        let v = versions(&tree);
        let interpreter = Importer {
            script: false,
            source: None,
            versions: &v,
        };
        // site is frozen in 3.11; there is no usercustomize.
        assert_eq!(
            resolve(&interpreter, &startup_imports(), &tree),
            [
                "/usr/lib/python3.11/encodings/__pycache__/__init__.cpython-311.pyc",
                "/usr/lib/python3.11/encodings/__pycache__/utf_8.cpython-311.pyc",
                "/usr/lib/python3.11/sitecustomize.py",
            ]
        );
    }

    #[test]
    fn the_path_files_site_reads() {
        let tree = std_tree(&[
            "/usr/local/lib/python3.11/site-packages/distutils-precedence.pth",
            "/usr/local/lib/python3.11/site-packages/a.pth",
            "/usr/local/lib/python3.11/site-packages/.hidden.pth",
            "/usr/local/lib/python3.11/site-packages/pkg/__init__.py",
            "/usr/lib/python3/dist-packages/z.pth",
            "/usr/lib/python3.10/site-packages/old.pth",
        ]);
        assert_eq!(
            path_files(&[(3, 11), (3, 10)], &tree),
            [
                "/usr/local/lib/python3.11/site-packages/a.pth",
                "/usr/local/lib/python3.11/site-packages/distutils-precedence.pth",
                "/usr/lib/python3/dist-packages/z.pth",
            ]
        );
        // The newest version with a site directory (Debian's python3 one is every
        // version's); none at all: nothing.
        assert_eq!(
            path_files(&[(3, 10)], &tree),
            [
                "/usr/lib/python3/dist-packages/z.pth",
                "/usr/lib/python3.10/site-packages/old.pth"
            ]
        );
        assert!(path_files(&[(3, 12)], &std_tree(&[])).is_empty());
        let many: Vec<String> = (0..100)
            .map(|k| format!("/usr/lib/python3.11/site-packages/p{k:03}.pth"))
            .collect();
        let tree = Tree::of(&many.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(path_files(&[(3, 11)], &tree).len(), MAX_PTH);
    }

    #[test]
    fn the_locale_the_interpreter_sets_lc_ctype_to() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |n: &str| vars.iter().find(|(k, _)| *k == n).map(|(_, v)| *v)
        };
        // Unset, or the C locale: coerced to C.UTF-8.
        assert_eq!(ctype_locales(env(&[])), ["C.UTF-8"]);
        assert_eq!(ctype_locales(env(&[("LANG", "C")])), ["C.UTF-8"]);
        // A locale of its own, C.UTF-8 if the image lacks it.
        assert_eq!(
            ctype_locales(env(&[("LANG", "C"), ("LC_CTYPE", "fr_FR.UTF-8")])),
            ["fr_FR.UTF-8", "C.UTF-8"]
        );
        assert_eq!(
            ctype_locales(env(&[("LANG", "de_DE.UTF-8"), ("LC_CTYPE", "")])),
            ["de_DE.UTF-8", "C.UTF-8"]
        );
        // LC_ALL wins, and no coercion under it; nor when it is turned off.
        assert_eq!(
            ctype_locales(env(&[("LANG", "de_DE.UTF-8"), ("LC_ALL", "en_GB.UTF-8")])),
            ["en_GB.UTF-8"]
        );
        assert!(ctype_locales(env(&[("LC_ALL", "C")])).is_empty());
        assert!(ctype_locales(env(&[("PYTHONCOERCECLOCALE", "0")])).is_empty());
    }

    #[test]
    fn imports_resolve_to_the_files_the_interpreter_reads() {
        let tree = std_tree(&[
            "/usr/lib/python3/dist-packages/yaml/__init__.py",
            "/usr/lib/python3/dist-packages/yaml/error.py",
            "/app/main.py",
            "/app/helpers.py",
            "/app/enum.py",
            "/app/pkg/__init__.py",
            "/app/pkg/sub.py",
            "/app/pkg/inner/__init__.py",
            "/app/pkg/inner/deep.py",
            "/app/ns/only.py",
        ]);
        let v = versions(&tree);
        assert_eq!(v, [(3, 11)]);
        let script = Importer {
            script: true,
            source: Some("/app/main.py"),
            versions: &v,
        };
        let got = resolve(
            &script,
            &[
                import("json", 0, &["decoder", "dumps"]),
                import("_json", 0, &[]),
                import("os", 0, &[]),
                import("yaml", 0, &[]),
                import("helpers", 0, &[]),
                import("enum", 0, &[]),
                import("xml.etree.ElementTree", 0, &[]),
                import("pkg.inner.deep", 0, &[]),
                import("ns.only", 0, &[]),
                import("missing", 0, &[]),
                import("json", 0, &[]),
            ],
            &tree,
        );
        assert_eq!(
            got,
            [
                // A package, read through its compiled file, and a submodule in its
                // from list; `dumps` is no module.
                format!("{STD}/json/__pycache__/__init__.cpython-311.pyc"),
                format!("{STD}/json/__pycache__/decoder.cpython-311.pyc"),
                // An extension module (not its longer-named neighbour).
                format!("{STD}/lib-dynload/_json.cpython-311-x86_64-linux-gnu.so"),
                // `os` is frozen into 3.11: no file.
                "/usr/lib/python3/dist-packages/yaml/__init__.py".into(),
                "/app/helpers.py".into(),
                // The script's directory comes first, as on sys.path.
                "/app/enum.py".into(),
                format!("{STD}/xml/__init__.py"),
                format!("{STD}/xml/etree/ElementTree.py"),
                "/app/pkg/__init__.py".into(),
                "/app/pkg/inner/__init__.py".into(),
                "/app/pkg/inner/deep.py".into(),
                // A namespace package has no file of its own.
                "/app/ns/only.py".into(),
            ]
        );
        // Relative imports from a package's submodule; the module's own tree is the
        // directory above its top package.
        let deep = Importer {
            script: false,
            source: Some("/app/pkg/inner/deep.py"),
            versions: &v,
        };
        let got = resolve(
            &deep,
            &[
                import("", 1, &["deep"]),
                import("sub", 2, &["x"]),
                import("", 2, &["sub", "inner"]),
                import("helpers", 0, &[]),
                import("nothing", 3, &[]),
            ],
            &tree,
        );
        assert_eq!(
            got,
            [
                "/app/pkg/inner/deep.py".to_string(),
                "/app/pkg/sub.py".into(),
                "/app/pkg/inner/__init__.py".into(),
                "/app/helpers.py".into(),
            ]
        );
        // Without the importer's path, relative imports are skipped; the version
        // picks the compiled files.
        let unknown = Importer {
            script: false,
            source: None,
            versions: &[(3, 10)],
        };
        assert_eq!(
            resolve(
                &unknown,
                &[
                    import("x", 1, &[]),
                    import("enum", 0, &[]),
                    import("os", 0, &[])
                ],
                &tree
            ),
            Vec::<String>::new(),
            "3.10 has no standard library in this tree"
        );
        let tree10 = Tree::of(&[
            "/usr/lib/python3.10/enum.py",
            "/usr/lib/python3.10/__pycache__/enum.cpython-310.pyc",
            "/usr/lib/python3.10/os.py",
        ]);
        assert_eq!(
            resolve(
                &unknown,
                &[import("enum", 0, &[]), import("os", 0, &[])],
                &tree10
            ),
            [
                "/usr/lib/python3.10/__pycache__/enum.cpython-310.pyc".to_string(),
                // Not frozen before 3.11.
                "/usr/lib/python3.10/os.py".into(),
            ]
        );
    }

    #[test]
    fn a_compiled_module_lives_in_its_sources_pycache() {
        assert_eq!(
            compiled_path("/usr/lib/python3.11/json/decoder.py", (3, 11)).as_deref(),
            Some("/usr/lib/python3.11/json/__pycache__/decoder.cpython-311.pyc")
        );
        assert_eq!(compiled_path("relative/x.py", (3, 11)), None);
        assert_eq!(compiled_path("/x.pyc", (3, 11)), None);
        assert_eq!(compiled_path("/.py", (3, 11)), None);
    }
}
