//! `hoist export`: the files a kernel EROFS mount needs.

use super::Context;
use anyhow::Context as _;
use hoist_reader::output::OutputDir;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub fn run(cx: &Context, image: &str, dir: &Path) -> anyhow::Result<()> {
    let img = cx.open_hoist(image)?;
    let out = OutputDir::new(dir, "export")?;
    let (meta_path, devices) = match write_files(&img, dir) {
        Ok(written) => written,
        Err(e) => {
            // Nothing new is left behind: not the files, nor a directory made for them.
            if let Err(cleanup) = out.discard() {
                return Err(e.context(format!(
                    "exporting {image} to {}; removing what was written failed too: {cleanup}",
                    dir.display()
                )));
            }
            return Err(e.context(format!("exporting {image} to {}", dir.display())));
        }
    };
    println!("exported {image} to {}", dir.display());
    let mut cmd = String::from("# as root:\n");
    let mut opts = Vec::new();
    for (i, p) in devices.iter().enumerate() {
        cmd.push_str(&format!(
            "dev{i}=$(losetup --find --show --read-only {})\n",
            p.display()
        ));
        opts.push(format!("device=$dev{i}"));
    }
    cmd.push_str(&format!(
        "meta=$(losetup --find --show --read-only {})\n",
        meta_path.display()
    ));
    let opts = if opts.is_empty() {
        String::new()
    } else {
        format!("-o {} ", opts.join(","))
    };
    cmd.push_str(&format!("mount -t erofs {opts}$meta /mnt"));
    println!("{cmd}");
    Ok(())
}

/// Writes the metadata blob and one file per data blob into `dir`, each under a
/// temporary name renamed once every file is complete (a killed export leaves only
/// `.tmp-` names); returns the final paths.
fn write_files(
    img: &hoist_reader::HoistImage,
    dir: &Path,
) -> anyhow::Result<(PathBuf, Vec<PathBuf>)> {
    let temp = |path: &Path| {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        dir.join(format!(".tmp-{name}"))
    };
    let meta_path = dir.join("meta.erofs");
    // The metadata itself, which the kernel mounts (decoded if stored as a chunked blob).
    std::fs::write(temp(&meta_path), img.meta_all()?)
        .with_context(|| format!("writing {}", temp(&meta_path).display()))?;
    let mut devices = Vec::new();
    for (b, info) in img.meta.blobs.iter().enumerate() {
        let digest = img
            .blob_digest((b + 1) as u16)
            .expect("one digest per blob");
        // Numbered so that sorting by name gives the device table order.
        let path = dir.join(format!("{:03}-{}.img", b + 1, digest.hex()));
        let tmp = temp(&path);
        let f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        for index in 0..info.chunks.entries.len() {
            let data = img.read_chunk(b, index)?;
            f.write_all_at(&data, info.chunks.entries[index].uncompressed_offset)
                .with_context(|| format!("writing {}", tmp.display()))?;
        }
        f.set_len(info.uncompressed_size)
            .with_context(|| format!("writing {}", tmp.display()))?;
        devices.push(path);
    }
    for path in devices.iter().chain([&meta_path]) {
        std::fs::rename(temp(path), path)
            .with_context(|| format!("renaming {} to {}", temp(path).display(), path.display()))?;
    }
    Ok((meta_path, devices))
}
