//! `hoist convert`.

use super::{human, open_source};
use crate::args::CompressorArg;
use hoist_builder::convert::Progress;
use hoist_builder::{ConvertOptions, ConvertReport};
use hoist_format::chunk::Compressor;
use hoist_oci::ImageRef;
use indicatif::{ProgressBar, ProgressStyle};
use std::time::Instant;

pub fn run(
    src: &str,
    dst: &str,
    compressor: CompressorArg,
    chunk_size: u64,
    chunk_dict: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let source = open_source(src)?;
    let sink = hoist_oci::open_sink(&ImageRef::parse(dst)?)?;
    let dict = chunk_dict.map(open_source).transpose()?;
    let opts = ConvertOptions {
        compressor: match compressor {
            CompressorArg::Zstd => Compressor::Zstd,
            CompressorArg::Lz4 => Compressor::Lz4,
            CompressorArg::None => Compressor::None,
        },
        chunk_size,
        ..ConvertOptions::default()
    };
    // Draws only on a terminal (indicatif hides itself otherwise).
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template(
            "{msg:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    let on_progress = |p: Progress| match p {
        Progress::Start { total } => bar.set_length(total),
        Progress::Read(n) => bar.inc(n),
        Progress::Layer { index, .. } => bar.set_message(format!("layer {}", index + 1)),
    };
    let report = hoist_builder::convert(
        source.as_ref(),
        sink.as_ref(),
        dict.as_deref(),
        &opts,
        &on_progress,
    )
    .map_err(|e| anyhow::anyhow!("converting {src}: {e}"))?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    if json {
        let mut v = serde_json::to_value(&report)?;
        v["seconds"] = serde_json::json!(secs);
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{}", summary(src, dst, &report, secs));
    }
    Ok(())
}

fn summary(src: &str, dst: &str, r: &ConvertReport, secs: f64) -> String {
    let saved: u64 = r.layers.iter().map(|l| l.chunks.dedup_bytes).sum();
    let dict: u64 = r.layers.iter().map(|l| l.chunks.dict_bytes).sum();
    let holes: u64 = r.layers.iter().map(|l| l.chunks.hole_bytes).sum();
    let dict_note = if dict > 0 {
        format!(" ({} from the chunk dictionary)", human(dict))
    } else {
        String::new()
    };
    format!(
        "{src} -> {dst}: {} layers, {} in, {} out (meta {}), dedup saved {}{dict_note}, holes {}, {secs:.2} s, manifest {}",
        r.layers.len(),
        human(r.bytes_in),
        human(r.bytes_out),
        human(r.meta.1),
        human(saved),
        human(holes),
        r.manifest
    )
}
