//! Programs and shared libraries: what a loader is about to map.
//!
//! A container's start runs programs, and each loads shared libraries: the kernel (for
//! the program) and the dynamic loader (for itself and each library) read the ELF
//! header, then map the file's loadable segments and run it. The page faults that
//! follow land all over the mapped range, in no order a stream of reads would show
//! (relocations, the symbol tables, the code start-up runs), so over a network each
//! fault would be one more round trip. Measured on python's start-up (python3.11,
//! libc, libm, libcrypto, libsqlite3): every chunk of each mapped range was read, in
//! an order such as 3, 9, 8, 5, 6, 4, 7, one round trip each.
//!
//! So when a fetched chunk starts with an ELF header, the fetcher reads ahead the rest
//! of the mapped range ([`mapped_len`]) at readahead priority (below readers). What it
//! costs: a file whose header alone is read (a scanner such as `file`) fetches its
//! mapped range for nothing; the fetcher bounds that by its readahead window.
//!
//! A program also names the libraries the loader will open next (`DT_NEEDED` in its
//! dynamic section), each one round trip after the other when fetched as the loader
//! asks: python's start-up opened libm, libz, libexpat and libc in turn, then
//! libcrypto after `_hashlib`'s header and libsqlite3 after `_sqlite3`'s. [`Program`]
//! reads those names once the chunk holding the dynamic section is in (it lies near
//! the end of the mapped range, which is being read ahead), and [`search_paths`] says
//! where the loader looks for them, so the fetcher can ask for all of them at once.
//!
//! Parsing uses the `object` crate; the header is untrusted and only bounds a
//! readahead, so a malformed one means "no hint", never an error.

use object::elf;
use object::read::elf::{FileHeader, ProgramHeader};

/// The length of an ELF file's prefix that its loadable segments map (the end of the
/// last `PT_LOAD` segment's file bytes), if `data` starts with an ELF header whose
/// program headers lie within `data`. `None` for anything else.
pub fn mapped_len(data: &[u8]) -> Option<u64> {
    Program::parse(data).map(|p| p.mapped)
}

/// What the loader needs of a program or library, as its header says: how much of it
/// is mapped, and where its dynamic section lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program {
    /// The length of the mapped prefix ([`mapped_len`]).
    pub mapped: u64,
    /// The file range of its dynamic section (`PT_DYNAMIC`), at most [`MAX_DYNAMIC`]
    /// bytes of it; `None` for a static program.
    pub dynamic: Option<(u64, u64)>,
    /// The machine it runs on (`e_machine`), which picks the library directories.
    pub machine: u16,
    /// The program interpreter (`PT_INTERP`: the dynamic loader the kernel maps with
    /// it), when its path lies within the parsed bytes, is absolute and at most
    /// [`MAX_INTERP`] bytes long.
    pub interp: Option<String>,
    /// Loadable segments: (virtual address, file offset, file size).
    loads: Vec<(u64, u64, u64)>,
    class64: bool,
    big_endian: bool,
}

/// The most of a dynamic section read (to prevent denial of service): 4096 entries.
pub const MAX_DYNAMIC: u64 = 64 << 10;
/// The most of a string table read for library names (to prevent denial of service).
pub const MAX_STRTAB: u64 = 1 << 20;
/// The most libraries taken from one program (to prevent denial of service).
pub const MAX_NEEDED: usize = 64;
/// The longest interpreter path taken (the kernel's limit is a page).
pub const MAX_INTERP: u64 = 4096;

/// What a program's dynamic section asks of the loader.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Needs {
    /// The libraries it loads (`DT_NEEDED`), in order.
    pub libraries: Vec<String>,
    /// Where it says to look first (`DT_RUNPATH`, or `DT_RPATH` without one), entries
    /// naming `$ORIGIN` left out (the fetcher sees chunks, not the program's path).
    pub search: Vec<String>,
}

impl Program {
    /// Parses the header at the start of `data`; `None` if it is not an ELF file whose
    /// program headers lie within `data`.
    pub fn parse(data: &[u8]) -> Option<Program> {
        if !data.starts_with(&elf::ELFMAG) {
            return None;
        }
        match *data.get(4)? {
            elf::ELFCLASS64 => program::<elf::FileHeader64<object::Endianness>>(data, true),
            elf::ELFCLASS32 => program::<elf::FileHeader32<object::Endianness>>(data, false),
            _ => None,
        }
    }

    /// The file offset that virtual address `vaddr` is loaded from.
    fn file_offset(&self, vaddr: u64) -> Option<u64> {
        self.loads
            .iter()
            .find(|&&(v, _, len)| vaddr >= v && vaddr - v < len)
            .and_then(|&(v, off, _)| off.checked_add(vaddr - v))
    }

    /// The libraries named by `dynamic` (the bytes of the dynamic section), reading their
    /// names with `read(file_offset, len)` (`None` when those bytes are not at hand).
    /// `None` when the section or the string table cannot be read.
    pub fn needs(
        &self,
        dynamic: &[u8],
        read: impl Fn(u64, u64) -> Option<Vec<u8>>,
    ) -> Option<Needs> {
        let word = if self.class64 { 8 } else { 4 };
        let uint = |b: &[u8]| -> u64 {
            let mut v = [0u8; 8];
            if self.big_endian {
                v[8 - b.len()..].copy_from_slice(b);
                u64::from_be_bytes(v)
            } else {
                v[..b.len()].copy_from_slice(b);
                u64::from_le_bytes(v)
            }
        };
        let (mut strtab, mut strsz) = (None, None);
        let (mut needed, mut runpath, mut rpath) = (Vec::new(), None, None);
        for entry in dynamic.chunks_exact(2 * word) {
            let (tag, val) = (uint(&entry[..word]), uint(&entry[word..]));
            match u32::try_from(tag).unwrap_or(u32::MAX) {
                elf::DT_NULL => break,
                elf::DT_NEEDED if needed.len() < MAX_NEEDED => needed.push(val),
                elf::DT_STRTAB => strtab = Some(val),
                elf::DT_STRSZ => strsz = Some(val),
                elf::DT_RUNPATH => runpath = Some(val),
                elf::DT_RPATH => rpath = Some(val),
                _ => {}
            }
        }
        let len = strsz?.min(MAX_STRTAB);
        let table = read(self.file_offset(strtab?)?, len)?;
        let string = |at: u64| -> Option<String> {
            let rest = table.get(usize::try_from(at).ok()?..)?;
            let end = rest.iter().position(|&b| b == 0)?;
            String::from_utf8(rest[..end].to_vec()).ok()
        };
        let search = runpath
            .or(rpath)
            .and_then(string)
            .map(|p| {
                p.split(':')
                    .filter(|d| d.starts_with('/') && !d.contains("$ORIGIN"))
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let libraries = needed
            .into_iter()
            .filter_map(string)
            .filter(|n| !n.is_empty())
            .collect();
        Some(Needs { libraries, search })
    }
}

fn program<H: FileHeader<Endian = object::Endianness>>(
    data: &[u8],
    class64: bool,
) -> Option<Program> {
    let header = H::parse(data).ok()?;
    let endian = header.endian().ok()?;
    let phdrs = header.program_headers(endian, data).ok()?;
    let mut loads = Vec::new();
    let (mut dynamic, mut interp) = (None, None);
    for p in phdrs {
        let (offset, filesz): (u64, u64) = (p.p_offset(endian).into(), p.p_filesz(endian).into());
        match p.p_type(endian) {
            elf::PT_LOAD => loads.push((p.p_vaddr(endian).into(), offset, filesz)),
            elf::PT_DYNAMIC => dynamic = Some((offset, filesz.min(MAX_DYNAMIC))),
            elf::PT_INTERP if filesz <= MAX_INTERP => interp = interp_path(data, offset, filesz),
            _ => {}
        }
    }
    let mapped = loads.iter().map(|&(_, o, l)| o.saturating_add(l)).max()?;
    Some(Program {
        mapped,
        dynamic,
        machine: header.e_machine(endian),
        interp,
        loads,
        class64,
        big_endian: endian == object::Endianness::Big,
    })
}

/// The NUL-terminated absolute path at `offset..offset + len` of `data`, if all of it
/// is there.
fn interp_path(data: &[u8], offset: u64, len: u64) -> Option<String> {
    let start = usize::try_from(offset).ok()?;
    let bytes = data.get(start..start.checked_add(usize::try_from(len).ok()?)?)?;
    let path = &bytes[..bytes.iter().position(|&b| b == 0)?];
    let path = std::str::from_utf8(path).ok()?;
    path.starts_with('/').then(|| path.to_owned())
}

/// The paths the dynamic loader would try for library `name`, first to last: a name
/// with a `/` is a path; otherwise each of `search` (the program's run path), then the
/// usual library directories of `machine`'s programs: Debian's multiarch ones, then
/// `/lib64` and `/usr/lib64` (Fedora), then `/lib` and `/usr/lib` (Alpine's musl, and
/// glibc's built-in default). The loader's cache (`/etc/ld.so.cache`) and
/// `LD_LIBRARY_PATH` are not read: a library found elsewhere is one the fetcher asks
/// for in vain, or fetches for nothing, within its readahead bounds.
pub fn search_paths(name: &str, search: &[String], machine: u16) -> Vec<String> {
    if name.contains('/') {
        return vec![name.to_owned()];
    }
    search
        .iter()
        .cloned()
        .chain(library_dirs(machine))
        .map(|d| format!("{}/{name}", d.trim_end_matches('/')))
        .collect()
}

/// The directories the loader looks in for `machine`'s libraries after a program's
/// own search path, in its order: Debian's multiarch ones, then the usual ones.
pub fn library_dirs(machine: u16) -> Vec<String> {
    let mut dirs = Vec::new();
    if let Some(t) = triplet(machine) {
        for d in ["/usr/local/lib", "/lib", "/usr/lib"] {
            dirs.push(format!("{d}/{t}"));
        }
    }
    dirs.extend(["/usr/local/lib", "/lib64", "/usr/lib64", "/lib", "/usr/lib"].map(str::to_owned));
    dirs
}

/// The machine (`e_machine`) of this host's programs: those of the containers hoist
/// runs here.
pub fn host_machine() -> u16 {
    match std::env::consts::ARCH {
        "x86_64" => elf::EM_X86_64,
        "aarch64" => elf::EM_AARCH64,
        "x86" => elf::EM_386,
        "arm" => elf::EM_ARM,
        "powerpc64" => elf::EM_PPC64,
        "s390x" => elf::EM_S390,
        "riscv64" => elf::EM_RISCV,
        _ => elf::EM_NONE,
    }
}

/// Debian's multiarch directory name for `machine`'s programs.
fn triplet(machine: u16) -> Option<&'static str> {
    Some(match machine {
        elf::EM_X86_64 => "x86_64-linux-gnu",
        elf::EM_AARCH64 => "aarch64-linux-gnu",
        elf::EM_386 => "i386-linux-gnu",
        elf::EM_ARM => "arm-linux-gnueabihf",
        elf::EM_PPC64 => "powerpc64le-linux-gnu",
        elf::EM_S390 => "s390x-linux-gnu",
        elf::EM_RISCV => "riscv64-linux-gnu",
        _ => return None,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A 64-bit little-endian ELF header with program headers `(type, offset, filesz)`.
    pub(crate) fn elf64(phdrs: &[(u32, u64, u64)]) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(&elf::ELFMAG);
        h[4] = elf::ELFCLASS64;
        h[5] = elf::ELFDATA2LSB;
        h[6] = elf::EV_CURRENT;
        h[16..18].copy_from_slice(&elf::ET_DYN.to_le_bytes());
        h[18..20].copy_from_slice(&elf::EM_X86_64.to_le_bytes());
        h[20..24].copy_from_slice(&1u32.to_le_bytes());
        h[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        h[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        h[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        h[56..58].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
        for &(kind, offset, filesz) in phdrs {
            let mut p = vec![0u8; 56];
            p[..4].copy_from_slice(&kind.to_le_bytes());
            p[8..16].copy_from_slice(&offset.to_le_bytes());
            p[32..40].copy_from_slice(&filesz.to_le_bytes());
            h.extend(p);
        }
        h
    }

    #[test]
    fn the_end_of_the_last_loaded_segment() {
        let h = elf64(&[
            (elf::PT_PHDR, 64, 1000),
            (elf::PT_LOAD, 0, 0x1000),
            (elf::PT_LOAD, 0x5000, 0x2345),
            (elf::PT_DYNAMIC, 0x9000_0000, 10),
            (elf::PT_LOAD, 0x2000, 0x100),
        ]);
        assert_eq!(mapped_len(&h), Some(0x7345));
    }

    #[test]
    fn no_hint_for_other_files_or_headers_cut_short() {
        assert_eq!(mapped_len(b""), None);
        assert_eq!(mapped_len(b"#!/bin/sh\n"), None);
        assert_eq!(mapped_len(&elf64(&[(elf::PT_DYNAMIC, 0, 10)])), None);
        let h = elf64(&[(elf::PT_LOAD, 0, 0x1000), (elf::PT_LOAD, 0x5000, 0x100)]);
        // The program headers run past the bytes at hand.
        assert_eq!(mapped_len(&h[..h.len() - 1]), None);
        let mut bad_class = h.clone();
        bad_class[4] = 9;
        assert_eq!(mapped_len(&bad_class), None);
    }

    #[test]
    fn the_interpreter_when_its_path_is_at_hand() {
        let with = |path: &[u8], len: u64| {
            let mut h = elf64(&[(elf::PT_INTERP, 0x200, len), (elf::PT_LOAD, 0, 0x1000)]);
            h.resize(0x200, 0);
            h.extend_from_slice(path);
            Program::parse(&h).map(|p| p.interp)
        };
        let ld = b"/lib64/ld-linux-x86-64.so.2\0";
        assert_eq!(
            with(ld, ld.len() as u64),
            Some(Some("/lib64/ld-linux-x86-64.so.2".into()))
        );
        // Cut short, unterminated, relative, or past the bound: no interpreter, the
        // rest of the header still read.
        assert_eq!(with(&ld[..10], ld.len() as u64), Some(None));
        assert_eq!(with(&ld[..ld.len() - 1], ld.len() as u64 - 1), Some(None));
        assert_eq!(with(b"ld.so\0", 6), Some(None));
        assert_eq!(with(ld, MAX_INTERP + 1), Some(None));
        // This test's own executable names the loader that runs it.
        let exe = std::fs::read("/proc/self/exe").unwrap();
        let p = Program::parse(&exe[..exe.len().min(1 << 20)]).unwrap();
        let interp = p.interp.expect("the test binary is dynamically linked");
        assert!(std::path::Path::new(&interp).exists(), "{interp}");
    }

    #[test]
    fn a_real_program_maps_most_of_itself() {
        // This test's own executable, as the loader saw it.
        let exe = std::fs::read("/proc/self/exe").unwrap();
        let head = &exe[..exe.len().min(1 << 20)];
        let len = mapped_len(head).expect("the test binary is an ELF file");
        assert!(len <= exe.len() as u64, "{len} > {}", exe.len());
        assert!(len > 0);
    }

    /// A program whose first segment (file offset 0, loaded at 0x400000) holds
    /// `strtab` at file offset 0x1000, and a dynamic section of `dynamic` (tag, value)
    /// entries at file offset 0x2000; returns the file.
    pub(crate) fn dynamic_program(strtab: &[u8], dynamic: &[(u64, u64)]) -> Vec<u8> {
        program_file(strtab, dynamic, 0x2000, 0x3000, None)
    }

    /// A program whose one loadable segment (file offset 0, loaded at 0x400000) maps
    /// its first `mapped` bytes (at least 0x3000), holding `strtab` at file offset
    /// 0x1000, a dynamic section of `dynamic` (tag, value) entries at file offset `at`
    /// (at least 0x2000), and the path of `interp` (if any) at 0x800; returns the file.
    pub(crate) fn program_file(
        strtab: &[u8],
        dynamic: &[(u64, u64)],
        at: u64,
        mapped: u64,
        interp: Option<&str>,
    ) -> Vec<u8> {
        let mut phdrs = vec![
            (elf::PT_LOAD, 0, mapped),
            (elf::PT_DYNAMIC, at, 16 * dynamic.len() as u64),
        ];
        if let Some(i) = interp {
            phdrs.push((elf::PT_INTERP, 0x800, i.len() as u64 + 1));
        }
        let mut f = elf64(&phdrs);
        // p_vaddr of the loadable segment.
        f[64 + 16..64 + 24].copy_from_slice(&0x40_0000u64.to_le_bytes());
        f.resize(mapped as usize, 0);
        if let Some(i) = interp {
            f[0x800..0x800 + i.len()].copy_from_slice(i.as_bytes());
        }
        f[0x1000..0x1000 + strtab.len()].copy_from_slice(strtab);
        for (k, &(tag, val)) in dynamic.iter().enumerate() {
            let e = at as usize + 16 * k;
            f[e..e + 8].copy_from_slice(&tag.to_le_bytes());
            f[e + 8..e + 16].copy_from_slice(&val.to_le_bytes());
        }
        f
    }

    fn needs_of(file: &[u8]) -> Option<Needs> {
        let p = Program::parse(file)?;
        let (at, len) = p.dynamic?;
        let dynamic = file.get(at as usize..(at + len) as usize)?;
        p.needs(dynamic, |at, len| {
            file.get(at as usize..(at.checked_add(len)?) as usize)
                .map(<[u8]>::to_vec)
        })
    }

    #[test]
    fn the_libraries_a_program_names_and_where_it_says_to_look() {
        let strtab = b"\0libfoo.so.1\0libbar.so\0/opt/x/lib:$ORIGIN/../lib:/usr/y\0";
        let needed = |at: u64| (u64::from(elf::DT_NEEDED), at);
        let f = dynamic_program(
            strtab,
            &[
                needed(1),
                (u64::from(elf::DT_STRTAB), 0x40_1000),
                needed(13),
                (u64::from(elf::DT_STRSZ), strtab.len() as u64),
                (u64::from(elf::DT_RUNPATH), 23),
                (u64::from(elf::DT_NULL), 0),
                needed(1),
            ],
        );
        let p = Program::parse(&f).unwrap();
        assert_eq!(
            (p.mapped, p.dynamic, p.machine),
            (0x3000, Some((0x2000, 112)), elf::EM_X86_64)
        );
        assert_eq!(
            needs_of(&f),
            Some(Needs {
                libraries: vec!["libfoo.so.1".into(), "libbar.so".into()],
                search: vec!["/opt/x/lib".into(), "/usr/y".into()],
            })
        );
        // A string table outside every loaded segment, or not at hand: no answer.
        let stray = dynamic_program(
            strtab,
            &[
                needed(1),
                (u64::from(elf::DT_STRTAB), 0x9000),
                (u64::from(elf::DT_STRSZ), 10),
            ],
        );
        assert_eq!(needs_of(&stray), None);
        let p = Program::parse(&f).unwrap();
        assert_eq!(p.needs(&f[0x2000..0x2070], |_, _| None), None);
        // A name running off the end of the table is left out.
        let cut = dynamic_program(
            strtab,
            &[
                needed(1),
                needed(13),
                (u64::from(elf::DT_STRTAB), 0x40_1000),
                (u64::from(elf::DT_STRSZ), 15),
            ],
        );
        assert_eq!(
            needs_of(&cut).unwrap().libraries,
            vec!["libfoo.so.1".to_owned()]
        );
    }

    #[test]
    fn a_real_program_needs_libc() {
        // This test's own executable: Rust links the C library dynamically.
        let exe = std::fs::read("/proc/self/exe").unwrap();
        let needs = needs_of(&exe).expect("the test binary has a dynamic section");
        assert!(
            needs.libraries.iter().any(|l| l.starts_with("libc.so")),
            "{needs:?}"
        );
    }

    #[test]
    fn the_loader_looks_in_the_run_path_then_the_usual_directories() {
        let paths = search_paths("libz.so.1", &["/opt/lib/".to_owned()], elf::EM_X86_64);
        assert_eq!(
            paths[..3],
            [
                "/opt/lib/libz.so.1",
                "/usr/local/lib/x86_64-linux-gnu/libz.so.1",
                "/lib/x86_64-linux-gnu/libz.so.1"
            ]
        );
        assert_eq!(paths.last().unwrap(), "/usr/lib/libz.so.1");
        assert!(paths.contains(&"/lib64/libz.so.1".to_owned()));
        // An unknown machine: no multiarch directory.
        assert!(search_paths("libz.so.1", &[], 0xffff)
            .iter()
            .all(|p| !p.contains("-linux-")));
        assert_eq!(
            search_paths("/opt/libq.so", &[], elf::EM_X86_64),
            ["/opt/libq.so"]
        );
    }

    proptest! {
        #[test]
        fn any_dynamic_section_and_string_table_give_an_answer_not_a_panic(
            dynamic in prop::collection::vec(any::<u8>(), 0..400),
            table in prop::collection::vec(any::<u8>(), 0..400),
            class64 in any::<bool>(),
            big_endian in any::<bool>(),
            loads in prop::collection::vec((any::<u64>(), any::<u64>(), any::<u64>()), 0..4),
        ) {
            let mut loads = loads;
            loads.push((0, 0, 0x3000));
            let p = Program {
                mapped: 0x3000,
                dynamic: Some((0, dynamic.len() as u64)),
                machine: elf::EM_X86_64,
                interp: None,
                loads,
                class64,
                big_endian,
            };
            let _ = p.needs(&dynamic, |at, len| {
                table.get(at as usize..(at.checked_add(len)? as usize).min(table.len())).map(<[u8]>::to_vec)
            });
        }

        #[test]
        fn any_bytes_after_the_magic_give_an_answer_not_a_panic(
            class in prop::sample::select(vec![elf::ELFCLASS32, elf::ELFCLASS64, 0, 7]),
            rest in prop::collection::vec(any::<u8>(), 0..600),
        ) {
            let mut data = elf::ELFMAG.to_vec();
            data.push(class);
            data.extend(rest);
            let _ = mapped_len(&data);
        }

        #[test]
        fn an_interpreter_anywhere_gives_an_answer_not_a_panic(
            offset in prop_oneof![0u64..0x300, any::<u64>()],
            len in prop_oneof![0u64..0x300, any::<u64>()],
            tail in prop::collection::vec(any::<u8>(), 0..0x200),
        ) {
            let mut h = elf64(&[(elf::PT_INTERP, offset, len), (elf::PT_LOAD, 0, 0x1000)]);
            h.extend(tail);
            let p = Program::parse(&h).expect("the header is whole");
            if let Some(i) = p.interp {
                prop_assert!(i.starts_with('/') && i.len() as u64 <= MAX_INTERP);
            }
        }

        #[test]
        fn segments_anywhere_give_the_largest_end(
            segs in prop::collection::vec((0u64..1 << 40, 0u64..1 << 40), 1..8),
        ) {
            let phdrs: Vec<_> = segs.iter().map(|&(o, l)| (elf::PT_LOAD, o, l)).collect();
            let want = segs.iter().map(|&(o, l)| o + l).max();
            prop_assert_eq!(mapped_len(&elf64(&phdrs)), want);
        }
    }
}
