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
//! Parsing uses the `object` crate; the header is untrusted and only bounds a
//! readahead, so a malformed one means "no hint", never an error.

use object::elf;
use object::read::elf::{FileHeader, ProgramHeader};

/// The length of an ELF file's prefix that its loadable segments map (the end of the
/// last `PT_LOAD` segment's file bytes), if `data` starts with an ELF header whose
/// program headers lie within `data`. `None` for anything else.
pub fn mapped_len(data: &[u8]) -> Option<u64> {
    if !data.starts_with(&elf::ELFMAG) {
        return None;
    }
    // e_ident[EI_CLASS]: 32 or 64 bits.
    match *data.get(4)? {
        elf::ELFCLASS64 => loaded_end::<elf::FileHeader64<object::Endianness>>(data),
        elf::ELFCLASS32 => loaded_end::<elf::FileHeader32<object::Endianness>>(data),
        _ => None,
    }
}

fn loaded_end<H: FileHeader<Endian = object::Endianness>>(data: &[u8]) -> Option<u64> {
    let header = H::parse(data).ok()?;
    let endian = header.endian().ok()?;
    header
        .program_headers(endian, data)
        .ok()?
        .iter()
        .filter(|p| p.p_type(endian) == elf::PT_LOAD)
        .map(|p| {
            let offset: u64 = p.p_offset(endian).into();
            offset.saturating_add(p.p_filesz(endian).into())
        })
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A 64-bit little-endian ELF header with program headers `(type, offset, filesz)`.
    fn elf64(phdrs: &[(u32, u64, u64)]) -> Vec<u8> {
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
    fn a_real_program_maps_most_of_itself() {
        // This test's own executable, as the loader saw it.
        let exe = std::fs::read("/proc/self/exe").unwrap();
        let head = &exe[..exe.len().min(1 << 20)];
        let len = mapped_len(head).expect("the test binary is an ELF file");
        assert!(len <= exe.len() as u64, "{len} > {}", exe.len());
        assert!(len > 0);
    }

    proptest! {
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
        fn segments_anywhere_give_the_largest_end(
            segs in prop::collection::vec((0u64..1 << 40, 0u64..1 << 40), 1..8),
        ) {
            let phdrs: Vec<_> = segs.iter().map(|&(o, l)| (elf::PT_LOAD, o, l)).collect();
            let want = segs.iter().map(|&(o, l)| o + l).max();
            prop_assert_eq!(mapped_len(&elf64(&phdrs)), want);
        }
    }
}
