//! `hoist unpack`, `hoist check`, `hoist inspect`.

use super::{human, Context};
use std::path::Path;
use std::time::Instant;

pub fn unpack(cx: &Context, image: &str, dir: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut img = cx.open_hoist(image)?;
    if image.starts_with("docker://") {
        // Unpack reads every chunk: fetch whole blobs instead of a request per chunk.
        img.fetch_blobs(&cx.home.join("tmp"))
            .map_err(|e| anyhow::anyhow!("downloading the blobs of {image}: {e}"))?;
    }
    let stats =
        hoist_reader::unpack(&img, dir).map_err(|e| anyhow::anyhow!("unpacking {image}: {e}"))?;
    println!(
        "unpacked {image} into {}: {} entries, {}, {:.2} s",
        dir.display(),
        stats.entries,
        human(stats.bytes),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn check(cx: &Context, image: &str) -> anyhow::Result<()> {
    let img = cx.open_hoist(image)?;
    let r = hoist_reader::check(&img).map_err(|e| anyhow::anyhow!("{image} is corrupt: {e}"))?;
    println!(
        "{image}: ok ({} inodes, {} blobs, {} chunks, {} verified)",
        r.inodes,
        r.blobs,
        r.chunks,
        human(r.bytes)
    );
    Ok(())
}

pub fn inspect(cx: &Context, image: &str, json: bool) -> anyhow::Result<()> {
    let img = cx.open_hoist(image)?;
    let r = hoist_reader::inspect(&img)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!("image      {image}");
    println!("manifest   {}", r.manifest);
    if let Some(s) = &r.source_manifest {
        println!("source     {s}");
    }
    if let Some(o) = &r.options {
        println!("options    {o}");
    }
    println!("layers     {}", r.layers.len());
    for l in &r.layers {
        println!("  {:<40} {} {:>10}", l.media_type, l.digest, human(l.size));
    }
    println!(
        "blobs      {} ({} compressed)",
        r.blobs.len(),
        human(r.stored_bytes)
    );
    for b in &r.blobs {
        let from = if b.source_layer.is_some() {
            "new"
        } else {
            "reused"
        };
        println!(
            "  {} {:>10} {:>7} chunks, {:>10} of chunk data ({from})",
            b.digest,
            human(b.size),
            b.chunks,
            human(b.chunk_bytes)
        );
    }
    println!("metadata   {}", human(r.meta_size));
    let kinds: Vec<String> = r.inodes.iter().map(|(k, v)| format!("{v} {k}")).collect();
    println!("inodes     {} ({} names)", kinds.join(", "), r.entries);
    println!(
        "file data  {} ({} in holes)",
        human(r.file_bytes),
        human(r.hole_bytes)
    );
    println!(
        "chunks     {} references, {} unique ({})",
        r.chunk_refs,
        r.unique_chunks,
        human(r.unique_chunk_bytes)
    );
    println!("dedup      {:.3}x", r.dedup_ratio);
    if r.reused_chunk_bytes > 0 {
        println!(
            "reused     {} of chunk data from {} of blobs stored by another image (not stored again)",
            human(r.reused_chunk_bytes),
            human(r.reused_blob_bytes)
        );
    }
    Ok(())
}
