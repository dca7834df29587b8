//! Arbitrary bytes as a metadata blob: parsing the hoist tables and walking the EROFS tree
//! (directories, xattrs, symlinks, chunk indexes) must return errors, never panic.
#![no_main]

use hoist_format::erofs::Image;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = hoist_format::meta::parse(data);
    let Ok(img) = Image::open(data) else { return };
    let mut budget = 10_000;
    let _ = img.walk(|_, inode| {
        budget -= 1;
        if budget == 0 {
            return Err(hoist_format::FormatError::Corrupt("enough".into()));
        }
        let _ = img.xattrs(inode);
        if inode.is_file() {
            let _ = img.chunks(inode);
        } else if !inode.is_dir() {
            let _ = img.read_link(inode);
        }
        Ok(())
    });
});
