//! `hoist export`: the files a kernel EROFS mount needs.

use super::Context;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub fn run(cx: &Context, image: &str, dir: &Path) -> anyhow::Result<()> {
    let img = cx.open_hoist(image)?;
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        anyhow::bail!(
            "{} is not empty; export into a new directory",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir)?;
    let meta_path = dir.join("meta.erofs");
    let meta = img.source().read_blob(
        &img.meta_digest,
        img.layers
            .iter()
            .find(|l| l.digest == img.meta_digest.as_str())
            .map_or(0, |l| l.size),
        hoist_reader::MAX_META_SIZE,
    )?;
    std::fs::write(&meta_path, &meta)?;
    let mut devices = Vec::new();
    for (b, info) in img.meta.blobs.iter().enumerate() {
        let digest = img
            .blob_digest((b + 1) as u16)
            .expect("one digest per blob");
        // Numbered so that sorting by name gives the device table order.
        let path = dir.join(format!("{:03}-{}.img", b + 1, digest.hex()));
        let f = File::create(&path)?;
        for index in 0..info.chunks.entries.len() {
            let data = img.read_chunk(b, index)?;
            f.write_all_at(&data, info.chunks.entries[index].uncompressed_offset)?;
        }
        f.set_len(info.uncompressed_size)?;
        devices.push(path);
    }
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
