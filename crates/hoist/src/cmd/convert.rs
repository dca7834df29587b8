//! `hoist convert`.

use super::{human, Context};
use crate::args::{CompressorArg, ConvertArgs};
use hoist_builder::cache::Opener;
use hoist_builder::convert::Progress;
use hoist_builder::{ConvertCache, ConvertOptions, ConvertReport};
use hoist_format::chunk::Compressor;
use hoist_oci::ImageRef;
use hoist_registry::{Credentials, RegistryConfig};
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::Arc;
use std::time::Instant;

fn with_creds(
    cfg: &RegistryConfig,
    creds: Option<&str>,
    flag: &str,
) -> anyhow::Result<RegistryConfig> {
    let mut cfg = cfg.clone();
    if let Some(c) = creds {
        cfg.creds = Some(Credentials::parse(c).map_err(|e| anyhow::anyhow!("{flag}: {e}"))?);
    }
    Ok(cfg)
}

pub fn run(cx: &Context, a: &ConvertArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let (src, dst) = (a.src.as_str(), a.dst.as_str());
    let src_cfg = with_creds(&cx.registry, a.src_creds.as_deref(), "--src-creds")?;
    let dst_cfg = with_creds(&cx.registry, a.dest_creds.as_deref(), "--dest-creds")?;
    let source = hoist_registry::open_source(&ImageRef::parse(src)?, &src_cfg)?;
    let sink = hoist_registry::open_sink(&ImageRef::parse(dst)?, &dst_cfg)?;
    let dict = a
        .chunk_dict
        .as_deref()
        .map(|d| cx.open_source(d))
        .transpose()?;
    let spool = cx.home.join("tmp");
    let dst_registry = match ImageRef::parse(dst)? {
        ImageRef::Registry { registry, .. } => Some(registry),
        ImageRef::Layout { .. } => None,
    };
    let cache = (!a.no_cache).then(|| {
        let cfg = dst_cfg.clone();
        let open: Opener = Arc::new(move |r: &str| {
            let reference = ImageRef::parse(r)?;
            // Explicit destination credentials go to the destination's registry only;
            // other registries get theirs from the auth files.
            let mut cfg = cfg.clone();
            if let ImageRef::Registry { registry, .. } = &reference {
                if Some(registry) != dst_registry.as_ref() {
                    cfg.creds = None;
                }
            }
            hoist_registry::open_source(&reference, &cfg)
        });
        ConvertCache {
            dir: cx.home.join("convert"),
            max_bytes: 4 << 30,
            open: Some(open),
        }
    });
    let opts = ConvertOptions {
        compressor: match a.compressor {
            CompressorArg::Zstd => Compressor::Zstd,
            CompressorArg::Lz4 => Compressor::Lz4,
            CompressorArg::None => Compressor::None,
        },
        chunk_size: a.chunk_size,
        fetch_jobs: a.jobs.max(1),
        // Spool under HOIST_HOME when it can be created, else in the temporary directory.
        spool_dir: std::fs::create_dir_all(&spool).is_ok().then_some(spool),
        cache,
        trace: super::trace_arg(a.prefetch_trace.as_deref(), a.prefetch_files.as_deref())?
            .map(|t| t.to_json()),
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
        Progress::Reused { count } => bar.println(format!(
            "reusing the conversion of {count} layer(s) from the cache"
        )),
    };
    let report = hoist_builder::convert(
        source.as_ref(),
        sink.as_ref(),
        dict.as_deref(),
        &opts,
        &on_progress,
    )
    .map_err(|e| anyhow::anyhow!("converting {src} to {dst}: {e}"))?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    if a.json {
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
    let reused = if r.reused_layers > 0 {
        format!(" ({} reused from the conversion cache)", r.reused_layers)
    } else {
        String::new()
    };
    format!(
        "{src} -> {dst}: {} layers{reused}, {} in, {} out (meta {}), dedup saved {}{dict_note}, holes {}, {secs:.2} s, manifest {}",
        r.layers.len(),
        human(r.bytes_in),
        human(r.bytes_out),
        human(r.meta.1),
        human(saved),
        human(holes),
        r.manifest
    )
}
