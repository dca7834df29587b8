//! One conversion: source manifest in, hoist manifest out.

use crate::apply::Applier;
use crate::cache::{chain_key, CachedBlob, CachedLayer, ConvertCache, SnapshotRef};
use crate::chunker::{ChunkStats, Chunker};
use crate::layer::{Counting, TarStream};
use crate::spool::Prefetcher;
use crate::BuildError;
use hoist_format::chunk::Compressor;
use hoist_format::erofs::{self, Device};
use hoist_format::meta::{self, BlobInfo};
use hoist_format::tree::{ChunkRef, Metadata, NodeKind, Tree};
use hoist_oci::{
    descriptor, media, Digest, HashingReader, ImageSink, ImageSource, MAX_CONFIG_SIZE,
};
use hoist_reader::trace::Trace;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::path::PathBuf;

/// Options of a conversion.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Chunk compressor.
    pub compressor: Compressor,
    /// Chunk size: a power of two from 4 KiB to 64 MiB.
    pub chunk_size: u64,
    /// Frame size: files up to an eighth of it are packed together into compressed frames
    /// of up to this many bytes. A multiple of 4 KiB, at most the chunk size; 0 stores
    /// every file in chunks of its own.
    pub frame_size: u64,
    /// Compression threads.
    pub workers: usize,
    /// Layers downloaded at once (the one being converted included).
    pub fetch_jobs: usize,
    /// Where layers fetched ahead of the converter are spooled (as unlinked files);
    /// the system's temporary directory when `None`.
    pub spool_dir: Option<PathBuf>,
    /// The conversion cache that makes conversions incremental; `None` disables it.
    pub cache: Option<ConvertCache>,
    /// A start-up trace to store in the image as a layer of media type
    /// `application/vnd.oci.image.layer.hoist.trace.v1+json`, after the metadata blob.
    /// Each data blob stores the chunks it names first, in its order
    /// ([`crate::layout`]), and the trace stored is pointed at their places.
    pub trace: Option<Trace>,
}

/// The default frame size (256 KiB): a frame holds at least 8 small files (up to 32 KiB
/// each) and usually dozens, and compresses to a few tens of KiB, one ranged read.
pub const DEFAULT_FRAME_SIZE: u64 = 256 << 10;

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            compressor: Compressor::Zstd,
            chunk_size: 1 << 20,
            frame_size: DEFAULT_FRAME_SIZE,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            fetch_jobs: 3,
            spool_dir: None,
            cache: None,
            trace: None,
        }
    }
}

impl ConvertOptions {
    /// The options as recorded in the manifest annotation.
    pub fn annotation(&self) -> String {
        format!(
            "compressor={},chunk-size={},frame-size={}",
            self.compressor.name(),
            self.chunk_size,
            self.frame_size
        )
    }
}

/// What happened to one source layer.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LayerReport {
    /// Digest of the source layer.
    pub source: String,
    /// Its compressed size.
    pub source_size: u64,
    /// Digest of its uncompressed tar stream, checked against the config's `diff_ids`.
    pub diff_id: String,
    /// Tar entries.
    pub entries: u64,
    /// Bytes of regular file content.
    pub file_bytes: u64,
    /// Dedup counters.
    pub chunks: ChunkStats,
    /// The data blob written for it, if it stored any chunk.
    pub blob: Option<(String, u64)>,
    /// Whether this conversion took it from the conversion cache instead of converting it.
    #[serde(default)]
    pub reused: bool,
    /// Chunks of the start-up trace stored first in its blob, in the trace's order.
    #[serde(default)]
    pub trace_first: u64,
}

/// What a conversion produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConvertReport {
    /// Digest of the source manifest.
    pub source_manifest: String,
    /// Digest of the new manifest.
    pub manifest: String,
    /// Its size in bytes.
    pub manifest_size: u64,
    /// Per source layer.
    pub layers: Vec<LayerReport>,
    /// Digest and size of the metadata blob.
    pub meta: (String, u64),
    /// Dictionary blobs referenced (digest, size).
    pub dict_blobs: Vec<(String, u64)>,
    /// Layers taken from the conversion cache.
    pub reused_layers: usize,
    /// Compressed bytes of the source layers that were read (reused layers are not).
    pub bytes_in: u64,
    /// Total bytes of the new data blobs and the metadata blob.
    pub bytes_out: u64,
}

/// Progress events of a conversion.
#[derive(Debug, Clone)]
pub enum Progress {
    /// Conversion starts; total compressed bytes of the layers to read.
    Start {
        /// Total.
        total: u64,
    },
    /// Bytes of layer input consumed.
    Read(u64),
    /// Layers `0..count` are taken from the conversion cache.
    Reused {
        /// How many.
        count: usize,
    },
    /// A layer starts.
    Layer {
        /// 0-based index.
        index: usize,
        /// Source digest.
        digest: String,
    },
}

struct SourceLayer {
    digest: Digest,
    size: u64,
}

fn parse_manifest(bytes: &[u8], name: &str) -> Result<Value, BuildError> {
    serde_json::from_slice(bytes)
        .map_err(|e| BuildError::Invalid(format!("manifest of {name} is not valid JSON: {e}")))
}

/// Converts the image of `src` into a hoist image in `dst`, deduplicating against the
/// hoist image `dict` if given. Nothing is tagged in `dst` unless everything succeeded.
pub fn convert(
    src: &dyn ImageSource,
    dst: &dyn ImageSink,
    dict: Option<&dyn ImageSource>,
    opts: &ConvertOptions,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<ConvertReport, BuildError> {
    if !opts.chunk_size.is_power_of_two() || !(4096..=64 << 20).contains(&opts.chunk_size) {
        return Err(BuildError::Invalid(format!(
            "chunk size {} is not a power of two from 4096 to 67108864",
            opts.chunk_size
        )));
    }
    if !opts.frame_size.is_multiple_of(4096) || opts.frame_size > opts.chunk_size {
        return Err(BuildError::Invalid(format!(
            "frame size {} is not a multiple of 4096 from 0 to the chunk size ({})",
            opts.frame_size, opts.chunk_size
        )));
    }
    let chunk_bits = opts.chunk_size.trailing_zeros() as u8;
    let name = src.describe();
    let (manifest_bytes, manifest_digest) = src.manifest()?;
    let manifest = parse_manifest(&manifest_bytes, &name)?;
    let layers_json = manifest["layers"].as_array().ok_or_else(|| {
        BuildError::Invalid(format!(
            "manifest {manifest_digest} of {name} has no layers"
        ))
    })?;
    let mut layers = Vec::new();
    for (i, l) in layers_json.iter().enumerate() {
        let (digest, size, media_type) = descriptor(l, &format!("layer {i} of {name}"))?;
        if media::is_hoist_meta(&media_type) || media::is_hoist_blob(&media_type) {
            return Err(BuildError::Invalid(format!(
                "{name} is already a hoist image"
            )));
        }
        if !media_type.is_empty() && !media_type.contains("tar") {
            return Err(BuildError::Invalid(format!(
                "layer {digest} of {name} has media type {media_type}, not a tar layer"
            )));
        }
        layers.push(SourceLayer { digest, size });
    }
    let (config_digest, config_size, _) =
        descriptor(&manifest["config"], &format!("config of {name}"))?;
    let config_bytes = src.read_blob(&config_digest, config_size, MAX_CONFIG_SIZE)?;
    let mut config: Value = serde_json::from_slice(&config_bytes).map_err(|e| {
        BuildError::Invalid(format!(
            "config {config_digest} of {name} is not valid JSON: {e}"
        ))
    })?;
    let diff_ids = diff_ids(&config, layers.len())
        .map_err(|why| BuildError::Invalid(format!("config {config_digest} of {name}: {why}")))?;

    let mut chunker = Chunker::new(opts.compressor, opts.workers, opts.frame_size);
    let mut provisional: Vec<Option<(BlobInfo, Digest)>> = Vec::new();
    let mut dict_key = "-".to_string();
    if let Some(dict) = dict {
        dict_key = dict.manifest()?.1.to_string();
        let dict_meta = load_meta(dict)?;
        if dict_meta.chunk_bits != chunk_bits {
            return Err(BuildError::Invalid(format!(
                "chunk dictionary {} uses {}-byte chunks, this conversion {}",
                dict.describe(),
                1u64 << dict_meta.chunk_bits,
                opts.chunk_size
            )));
        }
        if opts.frame_size > 0 {
            let limit = opts.frame_size / 8;
            let files = crate::dict::small_files(dict, &dict_meta, opts.frame_size, limit)?;
            tracing::info!(
                "chunk dictionary {}: {} places of small files keyed",
                dict.describe(),
                files.len()
            );
            chunker.add_dict_files(files);
        }
        for b in dict_meta.blobs {
            chunker.add_dict_blob(&b)?;
            let d = Digest::from_sha256(b.digest);
            provisional.push(Some((b, d)));
        }
    }
    let dict_count = provisional.len();
    let lead = opts
        .trace
        .as_ref()
        .map(crate::layout::trace_digests)
        .unwrap_or_default();
    let options_key = format!(
        "{};dict={dict_key}{}",
        opts.annotation(),
        crate::layout::cache_key(&lead)
    );
    if !lead.is_empty() {
        let dir = opts.spool_dir.clone().unwrap_or_else(std::env::temp_dir);
        chunker.lay_out_first(lead, dir);
    }
    // Per provisional blob laid out in the trace's order: the blob in layer order.
    let mut unordered: HashMap<usize, (BlobInfo, Digest)> = HashMap::new();
    let digests: Vec<&Digest> = layers.iter().map(|l| &l.digest).collect();

    let mut tree = Tree::new(Metadata {
        mode: 0o755,
        ..Default::default()
    });
    let mut reports = Vec::new();
    // What the conversion cache will hold for the layers converted so far.
    let mut cached: Vec<CachedLayer> = Vec::new();
    if let Some(cache) = &opts.cache {
        if let Some((snap, k)) = restore(cache, &options_key, &digests, dst) {
            for (i, layer) in snap.layers.iter().enumerate() {
                let entry = match &layer.blob {
                    Some(b) => {
                        let info = b.info()?;
                        chunker.add_stored_blob(blob_index(dict_count, i)?, &info)?;
                        Some((info, b.oci_digest()))
                    }
                    None => None,
                };
                if let Some(u) = &layer.unordered {
                    unordered.insert(provisional.len(), (u.info()?, u.oci_digest()));
                }
                provisional.push(entry);
                let mut report = layer.report.clone();
                report.reused = true;
                reports.push(report);
            }
            // Cached layers were checked against the config they were converted with;
            // this config must name the same uncompressed layers.
            for (i, layer) in snap.layers.iter().enumerate() {
                check_diff_id(i, &layers[i].digest, &diff_ids[i], &layer.report.diff_id)?;
            }
            tree = snap.tree;
            cached = snap.layers;
            for c in &mut cached {
                if let Some(b) = &mut c.blob {
                    if !b.locations.contains(&dst.describe()) {
                        b.locations.push(dst.describe());
                    }
                }
            }
            progress(Progress::Reused { count: k });
        }
    }
    let start = reports.len();

    let total: u64 = layers[start..].iter().map(|l| l.size).sum();
    progress(Progress::Start { total });
    let report_read = |n: u64| progress(Progress::Read(n));
    std::thread::scope(|scope| -> Result<(), BuildError> {
        // The first layer to convert is streamed; the later ones download meanwhile.
        let ahead: Vec<(Digest, u64)> = layers
            .iter()
            .skip(start + 1)
            .map(|l| (l.digest.clone(), l.size))
            .collect();
        let mut prefetch = None;
        if opts.fetch_jobs > 1 && !ahead.is_empty() {
            let dir = opts.spool_dir.clone().unwrap_or_else(std::env::temp_dir);
            let p =
                Prefetcher::start(scope, src, ahead, &dir, opts.fetch_jobs - 1).map_err(|e| {
                    BuildError::Invalid(format!("spooling layers in {}: {e}", dir.display()))
                })?;
            prefetch = Some(p);
        }
        let mut spooled = prefetch
            .as_mut()
            .map(|p| std::mem::take(&mut p.layers))
            .unwrap_or_default()
            .into_iter();
        for (i, layer) in layers.iter().enumerate().skip(start) {
            let ld = layer.digest.to_string();
            progress(Progress::Layer {
                index: i,
                digest: ld.clone(),
            });
            let blob = blob_index(dict_count, i)?;
            chunker.start_blob(blob, dst.blob_writer()?);
            // Layer `start` is streamed; each later one was spooled, in order.
            let spooled_layer = if i > start { spooled.next() } else { None };
            let input: Box<dyn Read + Send> = match spooled_layer {
                Some(s) => Box::new(s.reader()),
                None => src.open_blob(&layer.digest, layer.size)?,
            };
            let stream = Counting {
                inner: input,
                report: &report_read,
            };
            let applied = TarStream::open(stream)
                .map_err(|e| BuildError::layer(&ld, "opening", e))
                .and_then(|tar| {
                    let mut applier = Applier::new(&mut tree, opts.chunk_size);
                    applier.apply(HashingReader::new(tar), &ld, &mut chunker)
                })
                .and_then(|(stats, mut rest)| {
                    // The uncompressed stream to its end (its diff_id covers every byte),
                    // then whatever follows the compressed stream (its digest too).
                    std::io::copy(&mut rest, &mut std::io::sink())
                        .map_err(|e| BuildError::layer(&ld, "reading to the end", e))?;
                    let diff_id = rest.digest();
                    rest.into_inner()
                        .drain()
                        .map_err(|e| BuildError::layer(&ld, "reading to the end", e))?;
                    check_diff_id(i, &layer.digest, &diff_ids[i], diff_id.as_str())?;
                    Ok((stats, diff_id))
                });
            let (stats, diff_id) = match applied {
                Ok(stats) => stats,
                Err(e) => {
                    // The partial blob is dropped, never committed.
                    chunker.abort_blob();
                    return Err(e);
                }
            };
            let finished = chunker.finish_blob()?;
            crate::chunker::apply_remaps(&mut tree, &chunker.take_remaps());
            let report = LayerReport {
                source: ld,
                source_size: layer.size,
                diff_id: diff_id.to_string(),
                entries: stats.entries,
                file_bytes: stats.file_bytes,
                chunks: chunker.take_stats(),
                blob: finished
                    .as_ref()
                    .map(|f| (f.digest.to_string(), f.info.compressed_size)),
                reused: false,
                trace_first: chunker.take_laid_out(),
            };
            if let Some(cache) = &opts.cache {
                cached.push(CachedLayer {
                    report: report.clone(),
                    blob: finished
                        .as_ref()
                        .map(|f| CachedBlob::new(&f.info, dst.describe())),
                    unordered: finished
                        .as_ref()
                        .and_then(|f| f.unordered.as_ref())
                        .map(|(info, _)| CachedBlob::new(info, String::new())),
                });
                cache.store(&SnapshotRef {
                    version: crate::cache::VERSION,
                    key: chain_key(&options_key, &digests[..=i]),
                    layers: &cached,
                    tree: &tree,
                });
            }
            reports.push(report);
            if let Some(u) = finished.as_ref().and_then(|f| f.unordered.clone()) {
                unordered.insert(provisional.len(), u);
            }
            provisional.push(finished.map(|f| (f.info, f.digest)));
        }
        Ok(())
    })?;

    // Final device list: used dictionary blobs, then non-empty layer blobs.
    let reachable = reachable_devices(&tree);
    let mut remap: HashMap<u16, u16> = HashMap::new();
    let mut final_blobs: Vec<(BlobInfo, Digest, bool)> = Vec::new();
    // The final blobs laid out in the trace's order: (device id, the blob in layer order).
    let mut laid_out: Vec<(u16, (BlobInfo, Digest))> = Vec::new();
    for (i, entry) in provisional.into_iter().enumerate() {
        let Some((info, digest)) = entry else {
            continue;
        };
        let provisional_id = (i + 1) as u16;
        let is_dict = i < dict_count;
        if is_dict && !reachable.contains(&provisional_id) {
            continue;
        }
        final_blobs.push((info, digest, is_dict));
        remap.insert(provisional_id, final_blobs.len() as u16);
        if let Some(u) = unordered.remove(&i) {
            laid_out.push((final_blobs.len() as u16, u));
        }
    }
    for node in &mut tree.nodes {
        if let NodeKind::File { chunks, .. } = &mut node.kind {
            for c in chunks {
                if let ChunkRef::Mapped { device, .. } = c {
                    // Unreachable nodes may point at dropped blobs; they are never written.
                    *device = remap.get(device).copied().unwrap_or(0);
                }
            }
        }
    }
    let blobs: Vec<(BlobInfo, Digest)> = final_blobs
        .iter()
        .map(|(i, d, _)| (i.clone(), d.clone()))
        .collect();
    let (meta_bytes, meta_blob) = build_meta(&tree, &blobs, chunk_bits, opts.compressor)?;
    let infos: Vec<BlobInfo> = blobs.into_iter().map(|(i, _)| i).collect();
    let meta_chunks = meta_bytes.len().div_ceil(meta::META_CHUNK_SIZE);
    let meta_table = hoist_codec::table_digest(&meta_blob, meta_chunks)
        .ok_or_else(|| BuildError::Invalid("the metadata blob has no chunk table".into()))?;
    let meta_desc = write_blob(dst, &meta_blob)?;

    let mut layer_descs = Vec::new();
    let mut dict_blobs = Vec::new();
    for (info, digest, is_dict) in &final_blobs {
        if *is_dict {
            if let Some(dict) = dict {
                dst.copy_blob_from(dict, digest, info.compressed_size)?;
            }
            dict_blobs.push((digest.to_string(), info.compressed_size));
        }
        let source = reports
            .iter()
            .find(|r| r.blob.as_ref().is_some_and(|b| b.0 == digest.as_str()))
            .map(|r| r.source.clone());
        let mut annotations = BTreeMap::from([
            (
                media::ANNOTATION_UNCOMPRESSED_SIZE.to_string(),
                info.uncompressed_size.to_string(),
            ),
            (
                media::ANNOTATION_CHUNKS.to_string(),
                info.chunks.entries.len().to_string(),
            ),
            (
                media::ANNOTATION_SNAPSHOT_LAYER.to_string(),
                "blob".to_string(),
            ),
        ]);
        if let Some(source) = source {
            annotations.insert(media::ANNOTATION_SOURCE_LAYER.to_string(), source);
        }
        layer_descs.push(json!({
            "mediaType": media::HOIST_BLOB,
            "digest": digest.as_str(),
            "size": info.compressed_size,
            "annotations": annotations,
        }));
    }
    layer_descs.push(json!({
        "mediaType": media::HOIST_META,
        "digest": meta_desc.0.as_str(),
        "size": meta_desc.1,
        "annotations": {
            media::ANNOTATION_META_VERSION: hoist_format::meta::META_VERSION.to_string(),
            media::ANNOTATION_SNAPSHOT_LAYER: "meta",
            media::ANNOTATION_UNCOMPRESSED_SIZE: meta_bytes.len().to_string(),
            media::ANNOTATION_CHUNKS: meta_chunks.to_string(),
            media::ANNOTATION_META_TABLE: format!("blake3:{}", meta::hex(&meta_table)),
        },
    }));
    let mut trace_bytes = 0;
    if let Some(trace) = &opts.trace {
        let mut trace = trace.clone();
        trace.retarget(&infos);
        if !laid_out.is_empty() && !trace.meta_digest.is_empty() {
            let before = meta_in_layer_order(&tree, &final_blobs, laid_out, chunk_bits, opts)?;
            if before.0 == trace.meta_digest && before.1 == meta_bytes.len() {
                trace.meta_digest = meta_desc.0.to_string();
            }
        }
        let (digest, size) = write_blob(dst, &trace.to_json())?;
        trace_bytes = size;
        layer_descs.push(json!({
            "mediaType": media::HOIST_TRACE,
            "digest": digest.as_str(),
            "size": size,
            "annotations": { media::ANNOTATION_SNAPSHOT_LAYER: "trace" },
        }));
    }
    let diff_ids: Vec<Value> = layer_descs.iter().map(|d| d["digest"].clone()).collect();
    if !config.is_object() {
        return Err(BuildError::Invalid(format!(
            "config {config_digest} of {name} is not a JSON object"
        )));
    }
    config["rootfs"] = json!({ "type": "layers", "diff_ids": diff_ids });
    let config_out = serde_json::to_vec(&config).map_err(|e| BuildError::Invalid(e.to_string()))?;
    let config_desc = write_blob(dst, &config_out)?;
    let new_manifest = json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "config": { "mediaType": media::OCI_CONFIG, "digest": config_desc.0.as_str(), "size": config_desc.1 },
        "layers": layer_descs,
        "annotations": {
            media::ANNOTATION_SOURCE_MANIFEST: manifest_digest.as_str(),
            media::ANNOTATION_OPTIONS: opts.annotation(),
        },
    });
    let manifest_out =
        serde_json::to_vec(&new_manifest).map_err(|e| BuildError::Invalid(e.to_string()))?;
    let digest = dst.put_manifest(&manifest_out, media::OCI_MANIFEST)?;
    let bytes_out = reports
        .iter()
        .filter(|r| !r.reused)
        .filter_map(|r| r.blob.as_ref().map(|b| b.1))
        .sum::<u64>()
        + meta_desc.1
        + trace_bytes;
    Ok(ConvertReport {
        source_manifest: manifest_digest.to_string(),
        manifest: digest.to_string(),
        manifest_size: manifest_out.len() as u64,
        layers: reports,
        meta: (meta_desc.0.to_string(), meta_desc.1),
        dict_blobs,
        reused_layers: start,
        bytes_in: total,
        bytes_out,
    })
}

/// The digest of the metadata blob, and the size of the metadata, that a
/// conversion would have written with every blob in layer order: `tree` and `blobs`
/// with the blobs of `laid_out` (device id, the blob in layer order) put back. A trace
/// whose metadata chunks were recorded on that metadata names the same pieces of the
/// new one ([`crate::layout`]).
fn meta_in_layer_order(
    tree: &Tree,
    blobs: &[(BlobInfo, Digest, bool)],
    laid_out: Vec<(u16, (BlobInfo, Digest))>,
    chunk_bits: u8,
    opts: &ConvertOptions,
) -> Result<(String, usize), BuildError> {
    let mut tree = tree.clone();
    let mut blobs: Vec<(BlobInfo, Digest)> = blobs
        .iter()
        .map(|(i, d, _)| (i.clone(), d.clone()))
        .collect();
    let mut back = Vec::new();
    for (device, before) in laid_out {
        let at = usize::from(device) - 1;
        back.extend(crate::layout::back_to_layer_order(
            device,
            &blobs[at].0,
            &before.0,
        ));
        blobs[at] = before;
    }
    crate::chunker::apply_remaps(&mut tree, &back);
    let (bytes, blob) = build_meta(&tree, &blobs, chunk_bits, opts.compressor)?;
    Ok((Digest::of(&blob).to_string(), bytes.len()))
}

/// The metadata of `tree` whose data blobs are `blobs` (device 1 first): its bytes,
/// and the metadata blob that stores them.
fn build_meta(
    tree: &Tree,
    blobs: &[(BlobInfo, Digest)],
    chunk_bits: u8,
    compressor: Compressor,
) -> Result<(Vec<u8>, Vec<u8>), BuildError> {
    let devices = blobs
        .iter()
        .map(|(info, digest)| {
            let mut tag = [0u8; 64];
            tag.copy_from_slice(digest.hex().as_bytes());
            let blocks =
                u32::try_from(info.uncompressed_size / hoist_format::erofs::ondisk::BLOCK_SIZE)
                    .map_err(|_| BuildError::Invalid("a blob over 16 TiB".into()))?;
            Ok(Device { tag, blocks })
        })
        .collect::<Result<Vec<_>, BuildError>>()?;
    let image = erofs::write_image(tree, &devices, &erofs::WriteOptions { chunk_bits })?;
    let infos: Vec<BlobInfo> = blobs.iter().map(|(i, _)| i.clone()).collect();
    let used = referenced_chunks(tree, &infos)?;
    let meta_bytes = meta::assemble(image, chunk_bits, &infos, &used)?;
    let meta_blob = hoist_codec::encode_blob(&meta_bytes, meta::META_CHUNK_SIZE, compressor)
        .map_err(|e| BuildError::Invalid(format!("compressing the metadata: {e}")))?;
    Ok((meta_bytes, meta_blob))
}

/// The config's `rootfs.diff_ids`: one sha256 digest per layer, as the OCI image spec
/// requires (each the digest of the layer's uncompressed tar stream).
fn diff_ids(config: &Value, layers: usize) -> Result<Vec<Digest>, String> {
    let list = config["rootfs"]["diff_ids"]
        .as_array()
        .ok_or("no rootfs.diff_ids (the OCI image spec requires one per layer)")?;
    if list.len() != layers {
        return Err(format!(
            "rootfs.diff_ids lists {} digests for {layers} layers (the OCI image spec requires \
             one per layer, the digest of its uncompressed tar stream)",
            list.len()
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, d)| {
            d.as_str()
                .ok_or_else(|| format!("rootfs.diff_ids[{i}] is not a string"))
                .and_then(|d| Digest::parse(d).map_err(|e| format!("rootfs.diff_ids[{i}]: {e}")))
        })
        .collect()
}

fn check_diff_id(
    index: usize,
    layer: &Digest,
    expected: &Digest,
    actual: &str,
) -> Result<(), BuildError> {
    if expected.as_str() == actual {
        return Ok(());
    }
    Err(BuildError::DiffId {
        layer: layer.to_string(),
        index,
        expected: expected.to_string(),
        actual: actual.to_string(),
    })
}

/// Provisional blob index of layer `i`: dictionary blobs come first.
fn blob_index(dict_count: usize, i: usize) -> Result<u16, BuildError> {
    u16::try_from(dict_count + i).map_err(|_| BuildError::Invalid("too many layers".into()))
}

/// The longest cached prefix of `layers` whose blobs the destination has or can get.
fn restore(
    cache: &ConvertCache,
    options_key: &str,
    layers: &[&Digest],
    dst: &dyn ImageSink,
) -> Option<(crate::cache::Snapshot, usize)> {
    for k in (1..=layers.len()).rev() {
        let Some(snap) = cache.load(&chain_key(options_key, &layers[..k])) else {
            continue;
        };
        if snap.layers.len() != k {
            continue;
        }
        let usable = snap
            .layers
            .iter()
            .filter_map(|l| l.blob.as_ref())
            .all(|b| cache.obtain(b, dst));
        if usable {
            return Some((snap, k));
        }
        tracing::info!("cached conversion of {k} layers is not usable: a blob is out of reach");
    }
    None
}

fn write_blob(dst: &dyn ImageSink, bytes: &[u8]) -> Result<(Digest, u64), BuildError> {
    let mut w = dst.blob_writer()?;
    w.write_all(bytes).map_err(BuildError::Write)?;
    Ok(w.commit()?)
}

/// Devices referenced by files reachable from the root.
fn reachable_devices(tree: &Tree) -> HashSet<u16> {
    let mut out = HashSet::new();
    for_each_reachable_chunk(tree, |device, _| {
        out.insert(device);
    });
    out
}

/// Calls `f(device, blkaddr)` for every stored chunk a file reachable from the root
/// references (a hardlinked file once).
fn for_each_reachable_chunk(tree: &Tree, mut f: impl FnMut(u16, u32)) {
    let mut stack = vec![Tree::ROOT];
    let mut seen = HashSet::new();
    while let Some(id) = stack.pop() {
        if !seen.insert(id) {
            continue;
        }
        match &tree.nodes[id].kind {
            NodeKind::Dir(entries) => stack.extend(entries.values()),
            NodeKind::File { chunks, .. } => {
                for c in chunks {
                    if let ChunkRef::Mapped { device, blkaddr } = c {
                        f(*device, *blkaddr);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Which chunks of each final blob a reachable file references (`[blob][index]`),
/// stored in the metadata so that a mount need not walk the tree to know.
fn referenced_chunks(tree: &Tree, blobs: &[BlobInfo]) -> Result<Vec<Vec<bool>>, BuildError> {
    let mut used: Vec<Vec<bool>> = blobs
        .iter()
        .map(|b| vec![false; b.chunks.entries.len()])
        .collect();
    let mut missing = None;
    for_each_reachable_chunk(tree, |device, blkaddr| {
        let offset = u64::from(blkaddr) * hoist_format::erofs::ondisk::BLOCK_SIZE;
        let at = usize::from(device).checked_sub(1).and_then(|b| {
            let index = blobs.get(b)?.chunks.containing(offset)?;
            Some((b, index))
        });
        match at {
            Some((b, index)) => used[b][index] = true,
            None => missing = Some((device, blkaddr)),
        }
    });
    if let Some((device, blkaddr)) = missing {
        return Err(BuildError::Invalid(format!(
            "a file points at block {blkaddr} of device {device}, where no chunk is stored"
        )));
    }
    Ok(used)
}

/// Reads and parses the metadata blob of a hoist image.
pub fn load_meta(src: &dyn ImageSource) -> Result<meta::Meta, BuildError> {
    let (bytes, digest) = src.manifest()?;
    let manifest = parse_manifest(&bytes, &src.describe())?;
    let layer = manifest["layers"]
        .as_array()
        .and_then(|ls| {
            ls.iter()
                .find(|l| l["mediaType"].as_str().is_some_and(media::is_hoist_meta))
        })
        .ok_or_else(|| {
            BuildError::Invalid(format!(
                "{} (manifest {digest}) is not a hoist image: no metadata layer",
                src.describe()
            ))
        })?;
    let (d, size, _) = descriptor(layer, "metadata layer")?;
    let blob = src.read_blob(&d, size, meta::MAX_META_SIZE)?;
    let bytes = hoist_codec::metadata_of(blob, meta::MAX_META_SIZE).map_err(|e| {
        BuildError::Invalid(format!("metadata blob {d} of {}: {e}", src.describe()))
    })?;
    Ok(meta::parse(&bytes)?)
}
