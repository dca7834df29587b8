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
        frame_size: a
            .frame_size
            .unwrap_or(hoist_builder::convert::DEFAULT_FRAME_SIZE.min(a.chunk_size)),
        fetch_jobs: a.jobs.max(1),
        // Spool under HOIST_HOME when it can be created, else in the temporary directory.
        spool_dir: std::fs::create_dir_all(&spool).is_ok().then_some(spool),
        cache,
        trace: super::trace_arg(a.prefetch_trace.as_deref(), a.prefetch_files.as_deref())?,
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
    let (top, top_digest, top_type) = source.top()?;
    let top_doc: serde_json::Value = serde_json::from_slice(&top)
        .map_err(|e| anyhow::anyhow!("{src}: manifest {top_digest} is not JSON: {e}"))?;
    if hoist_oci::is_index(&top_doc, &top_type) {
        let convert_one = |pinned: &hoist_oci::Pinned<'_>| {
            hoist_builder::convert(
                pinned,
                &hoist_oci::Untagged(sink.as_ref()),
                dict.as_deref(),
                &opts,
                &on_progress,
            )
            .map_err(|e| {
                anyhow::anyhow!(
                    "converting {} to {dst}: {e}",
                    hoist_oci::ImageSource::describe(pinned)
                )
            })
        };
        let out = convert_index(a, source.as_ref(), sink.as_ref(), &top_doc, &convert_one)?;
        bar.finish_and_clear();
        let secs = started.elapsed().as_secs_f64();
        if a.json {
            let reports: Vec<serde_json::Value> = out
                .reports
                .iter()
                .map(|(p, r)| {
                    let mut v = serde_json::to_value(r).unwrap_or_default();
                    v["platform"] = p.clone();
                    v
                })
                .collect();
            let v =
                serde_json::json!({ "index": out.index, "platforms": reports, "seconds": secs });
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            for (p, r) in &out.reports {
                println!(
                    "{}",
                    summary(&format!("{src} ({})", platform_name(p)), dst, r, secs)
                );
            }
            println!(
                "{src} -> {dst}: index {} of {} platform(s){}",
                out.index,
                out.reports.len(),
                if a.merge_platform {
                    " with the original manifests first"
                } else {
                    ""
                }
            );
        }
        return Ok(());
    }
    if !a.platform.is_empty() || a.merge_platform {
        anyhow::bail!(
            "{src} is a single-platform image (manifest {top_digest}); --platform and --merge-platform apply to image indexes"
        );
    }
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
    let small: u64 = r.layers.iter().map(|l| l.chunks.small_files).sum();
    let frames: u64 = r.layers.iter().map(|l| l.chunks.frames).sum();
    let frames_note = if small > 0 {
        format!(", {small} small files in {frames} frames")
    } else {
        String::new()
    };
    let dict_note = if dict > 0 {
        format!(" ({} from the chunk dictionary)", human(dict))
    } else {
        String::new()
    };
    let first: u64 = r.layers.iter().map(|l| l.trace_first).sum();
    let trace_note = if first > 0 {
        format!(", {first} chunks of the trace stored first")
    } else {
        String::new()
    };
    let reused = if r.reused_layers > 0 {
        format!(" ({} reused from the conversion cache)", r.reused_layers)
    } else {
        String::new()
    };
    format!(
        "{src} -> {dst}: {} layers{reused}, {} in, {} out (meta {}), dedup saved {}{dict_note}, holes {}{frames_note}{trace_note}, {secs:.2} s, manifest {}",
        r.layers.len(),
        human(r.bytes_in),
        human(r.bytes_out),
        human(r.meta.1),
        human(saved),
        human(holes),
        r.manifest
    )
}

/// What converting an index produced.
struct IndexOut {
    index: String,
    reports: Vec<(serde_json::Value, ConvertReport)>,
}

/// `os/arch[/variant]` of an index entry's platform.
fn platform_name(p: &serde_json::Value) -> String {
    let mut s = format!(
        "{}/{}",
        p["os"].as_str().unwrap_or("?"),
        p["architecture"].as_str().unwrap_or("?")
    );
    if let Some(v) = p["variant"].as_str() {
        s.push('/');
        s.push_str(v);
    }
    s
}

/// The manifest an index entry names: its digest, bytes and document. Nested indexes
/// are refused.
fn read_entry(
    source: &dyn hoist_oci::ImageSource,
    m: &serde_json::Value,
    src: &str,
) -> anyhow::Result<(hoist_oci::Digest, Vec<u8>, serde_json::Value)> {
    let (digest, size, media_type) = hoist_oci::descriptor(m, &format!("index of {src}"))?;
    let bytes = source.manifest_at(&digest, size)?;
    let doc: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| anyhow::anyhow!("{src}: manifest {digest} is not JSON: {e}"))?;
    if hoist_oci::is_index(&doc, &media_type) {
        anyhow::bail!(
            "{src}: manifest {digest} is itself an index; nested indexes are not converted"
        );
    }
    Ok((digest, bytes, doc))
}

/// Whether an index entry is an image of a platform: not an attestation or another
/// artifact (buildx lists those as `unknown/unknown`, with a reference-type annotation).
fn is_image(m: &serde_json::Value) -> bool {
    let p = &m["platform"];
    p.is_object()
        && p["os"].as_str().is_some_and(|os| os != "unknown")
        && p["architecture"].as_str().is_some_and(|a| a != "unknown")
        && m["annotations"]["vnd.docker.reference.type"].is_null()
}

/// Whether `--platform` wants an index entry's platform (all when none is given).
fn wanted(wanted: &[String], p: &serde_json::Value) -> bool {
    let name = platform_name(p);
    wanted.is_empty()
        || wanted.iter().any(|w| {
            name == *w || (w.matches('/').count() == 1 && name.starts_with(&format!("{w}/")))
        })
}

/// Converts the wanted platforms of the index `doc` of `source`, each manifest stored
/// untagged; then tags an index of them (after the originals, with --merge-platform).
fn convert_index(
    a: &ConvertArgs,
    source: &dyn hoist_oci::ImageSource,
    sink: &dyn hoist_oci::ImageSink,
    doc: &serde_json::Value,
    convert_one: &dyn Fn(&hoist_oci::Pinned<'_>) -> anyhow::Result<ConvertReport>,
) -> anyhow::Result<IndexOut> {
    use hoist_oci::media;
    let src = &a.src;
    let entries = doc["manifests"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("{src}: an index without manifests"))?;
    let chosen: Vec<&serde_json::Value> = entries
        .iter()
        .filter(|m| is_image(m) && wanted(&a.platform, &m["platform"]))
        .collect();
    if chosen.is_empty() {
        let offered: Vec<String> = entries
            .iter()
            .map(|m| platform_name(&m["platform"]))
            .collect();
        anyhow::bail!(
            "{src}: no platform of its index matches --platform {} (it offers {})",
            a.platform.join(","),
            offered.join(", ")
        );
    }
    let mut originals: Vec<serde_json::Value> = Vec::new();
    let mut converted = Vec::new();
    let mut reports = Vec::new();
    for m in chosen {
        let (digest, bytes, _doc) = read_entry(source, m, src)?;
        let pinned = hoist_oci::Pinned {
            inner: source,
            manifest: bytes.clone(),
            digest: digest.clone(),
        };
        let report = convert_one(&pinned)?;
        let mut platform = m["platform"].clone();
        if a.merge_platform {
            let features = platform["os.features"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let mut features = features;
            features.push(serde_json::json!("hoist"));
            platform["os.features"] = serde_json::Value::Array(features);
        }
        converted.push(serde_json::json!({
            "mediaType": media::OCI_MANIFEST,
            "digest": report.manifest,
            "size": report.manifest_size,
            "platform": platform,
            "annotations": { media::ANNOTATION_SOURCE_MANIFEST: digest.as_str() },
        }));
        reports.push((m["platform"].clone(), report));
    }
    if a.merge_platform {
        // Every entry of the source, converted or not (other platforms, attestations),
        // so that a plain node finds what it found before; copied unless the
        // destination has it.
        for m in entries {
            let (digest, bytes, doc) = read_entry(source, m, src)?;
            let media_type = m["mediaType"].as_str().unwrap_or(media::OCI_MANIFEST);
            for d in std::iter::once(&doc["config"])
                .chain(doc["layers"].as_array().into_iter().flatten())
            {
                let (bd, bs, _) = hoist_oci::descriptor(d, &format!("manifest {digest}"))?;
                sink.copy_blob_from(source, &bd, bs)?;
            }
            sink.put_manifest_untagged(&bytes, media_type)?;
            originals.push(m.clone());
        }
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_INDEX,
        "manifests": originals.into_iter().chain(converted).collect::<Vec<_>>(),
    });
    let bytes = serde_json::to_vec(&index)?;
    let digest = sink.put_manifest(&bytes, media::OCI_INDEX)?;
    Ok(IndexOut {
        index: digest.to_string(),
        reports,
    })
}
