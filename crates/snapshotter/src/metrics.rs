//! A Prometheus endpoint (`--metrics-address`): per mount point, what `hoist stat` shows
//! (bytes and requests fetched, cache hits and misses, reads and their latency as FUSE
//! and the blob devices see them, prefetch progress), the snapshots by kind, and the
//! daemon's takeovers. Values are read from the daemon at each scrape, so the endpoint
//! and `hoist stat` report the same counters. Mount points of one served image (the same
//! image with the same options) share its counters, and `hoist_mount_points` says how
//! many do.
//!
//! Encoded with `prometheus-client` through a [`Collector`] that writes each family from
//! the daemon's answer (the counters live in the daemon, not in this process). Served
//! with hyper.

use crate::snapshotter::Snapshotter;
use crate::store::{Content, Kind};
use hoist_daemon::api::{LatencyStats, Stats};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use std::collections::BTreeMap;
use std::sync::Arc;

/// What the daemon serves, as the endpoint reports it.
pub trait DaemonView: std::fmt::Debug + Send + Sync + 'static {
    /// The mounts' statistics and the takeovers so far, if the daemon answers.
    fn mounts(&self) -> Option<(Vec<Stats>, u64)>;
}

/// The metrics of a snapshotter and the daemon it mounts images with.
#[derive(Debug)]
pub struct Metrics {
    snapshotter: Arc<Snapshotter>,
    daemon: Box<dyn DaemonView>,
}

impl std::fmt::Debug for Snapshotter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Snapshotter")
    }
}

impl Metrics {
    /// Metrics of `snapshotter` and `daemon`.
    pub fn new(snapshotter: Arc<Snapshotter>, daemon: Box<dyn DaemonView>) -> Metrics {
        Metrics {
            snapshotter,
            daemon,
        }
    }

    /// The exposition text, as a scrape gets it.
    pub fn render(self: &Arc<Self>) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(self.clone()));
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            tracing::warn!("encoding metrics: {e}");
        }
        out
    }
}

type Labels = Vec<(&'static str, String)>;

/// A metric read from a mount's statistics: name, help, value.
type Field = (&'static str, &'static str, fn(&Stats) -> u64);

fn mount_labels(s: &Stats) -> Labels {
    vec![
        ("image", s.image.clone()),
        ("mountpoint", s.mountpoint.display().to_string()),
        ("mode", s.mode.to_string()),
    ]
}

/// One family: name, help, type, and a value per label set.
fn family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    values: &[(Labels, f64)],
) -> Result<(), std::fmt::Error> {
    let mut e = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in values {
        let m = e.encode_family(labels)?;
        match kind {
            MetricType::Counter => {
                let mut m = m;
                m.encode_counter::<NoLabelSet, _, u64>(v, None)?
            }
            _ => {
                let mut m = m;
                m.encode_gauge(v)?
            }
        }
    }
    Ok(())
}

fn histogram(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: &[(Labels, &LatencyStats)],
) -> Result<(), std::fmt::Error> {
    let mut e = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, h) in values {
        let mut cumulative = 0;
        let mut buckets: Vec<(f64, u64)> = Vec::with_capacity(h.counts.len());
        for (k, c) in h.counts.iter().enumerate() {
            cumulative += c;
            let bound = h.bounds_secs.get(k).copied().unwrap_or(f64::INFINITY);
            buckets.push((bound, cumulative));
        }
        let mut m = e.encode_family(labels)?;
        m.encode_histogram::<NoLabelSet>(h.sum_secs, cumulative, &buckets, None)?;
    }
    Ok(())
}

impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let daemon = self.daemon.mounts();
        family(
            &mut encoder,
            "hoist_daemon_up",
            "Whether the hoist daemon answered this scrape (its counters are left out when not)",
            MetricType::Gauge,
            &[(Vec::new(), if daemon.is_some() { 1.0 } else { 0.0 })],
        )?;
        let Some((mounts, takeovers)) = daemon else {
            return self.encode_snapshots(&mut encoder);
        };
        let per_mount = |f: fn(&Stats) -> u64| -> Vec<(Labels, f64)> {
            mounts
                .iter()
                .map(|s| (mount_labels(s), f(s) as f64))
                .collect()
        };
        use MetricType::{Counter, Gauge};
        let counters: [Field; 17] = [
            (
                "hoist_fetched_bytes",
                "Bytes fetched from the registry",
                |s| s.bytes_fetched,
            ),
            (
                "hoist_fetch_requests",
                "Ranged requests sent to the registry",
                |s| s.requests,
            ),
            ("hoist_fetch_errors", "Fetches that failed", |s| {
                s.fetch_errors
            }),
            (
                "hoist_cache_hits",
                "Chunk reads served from the cache",
                |s| s.cache_hits,
            ),
            ("hoist_cache_misses", "Chunk reads that had to fetch", |s| {
                s.cache_misses
            }),
            ("hoist_reads", "Read requests that reached hoist", |s| {
                s.reads
            }),
            ("hoist_read_bytes", "Bytes those reads returned", |s| {
                s.read_bytes
            }),
            ("hoist_read_errors", "Reads answered with EIO", |s| {
                s.read_errors
            }),
            (
                "hoist_read_timeouts",
                "Reads that waited past the read bound",
                |s| s.timeouts,
            ),
            (
                "hoist_fetch_corrupt",
                "Chunks a source answered damaged (discarded, fetched again)",
                |s| s.corrupt,
            ),
            (
                "hoist_readaheads",
                "Readahead jobs for readers going forward",
                |s| s.readaheads,
            ),
            (
                "hoist_libraries",
                "Libraries fetched for the programs that load them",
                |s| s.libraries,
            ),
            (
                "hoist_modules",
                "Python modules fetched for the modules that import them",
                |s| s.modules,
            ),
            (
                "hoist_cache_evictions",
                "Chunks the mount's cache evicted (all its mounts)",
                |s| s.cache_evictions,
            ),
            (
                "hoist_cache_refetches",
                "Evicted chunks fetched again (all mounts of the cache)",
                |s| s.cache_refetches,
            ),
            (
                "hoist_views_verified",
                "Views found on disk and hashed before first use",
                |s| s.views_verified,
            ),
            (
                "hoist_views_damaged",
                "Views found damaged on disk and rebuilt from verified chunks",
                |s| s.views_damaged,
            ),
        ];
        for (name, help, f) in counters {
            family(&mut encoder, name, help, Counter, &per_mount(f))?;
        }
        let gauges: [Field; 7] = [
            (
                "hoist_mount_points",
                "Mount points sharing this one's served image, this one included; the image's counters are repeated on each of them",
                |s| s.mountpoints,
            ),
            (
                "hoist_chunks_cached",
                "Chunks of the image in the cache",
                |s| s.chunks_cached,
            ),
            ("hoist_chunks", "Chunks of the image", |s| s.chunks_total),
            (
                "hoist_prefetch_chunks_done",
                "Chunks the prefetch has cached",
                |s| s.prefetch.done,
            ),
            (
                "hoist_prefetch_chunks",
                "Chunks the prefetch will cache",
                |s| s.prefetch.total,
            ),
            (
                "hoist_prefetch_views_done",
                "Views the prefetch has built",
                |s| s.prefetch.views_done,
            ),
            (
                "hoist_prefetch_views",
                "Views the prefetch will build",
                |s| s.prefetch.views_total,
            ),
        ];
        for (name, help, f) in gauges {
            family(&mut encoder, name, help, Gauge, &per_mount(f))?;
        }
        let latency: Vec<(Labels, &LatencyStats)> = mounts
            .iter()
            .map(|s| (mount_labels(s), &s.read_latency))
            .collect();
        histogram(
            &mut encoder,
            "hoist_read_latency_seconds",
            "How long read requests took to answer, as FUSE and the blob devices see them",
            &latency,
        )?;
        family(
            &mut encoder,
            "hoist_mounts",
            "Lazy mounts the daemon serves",
            Gauge,
            &[(Vec::new(), mounts.len() as f64)],
        )?;
        family(
            &mut encoder,
            "hoist_daemon_takeovers",
            "Times a new server took the mounts over from one that died or was restarted",
            Counter,
            &[(Vec::new(), takeovers as f64)],
        )?;
        self.encode_snapshots(&mut encoder)
    }
}

impl Metrics {
    fn encode_snapshots(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut snapshots: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for info in self.snapshotter.list(&[]).unwrap_or_default() {
            let kind = match info.snapshot.kind {
                Kind::View => "view",
                Kind::Active => "active",
                Kind::Committed => "committed",
            };
            let content = match info.snapshot.content {
                Content::Dir => "directory",
                Content::HoistLayer => "hoist_layer",
                Content::HoistImage { .. } => "hoist_image",
            };
            *snapshots.entry((kind, content)).or_default() += 1;
        }
        let values: Vec<(Labels, f64)> = snapshots
            .into_iter()
            .map(|((k, c), n)| {
                (
                    vec![("kind", k.to_string()), ("content", c.to_string())],
                    n as f64,
                )
            })
            .collect();
        family(
            encoder,
            "hoist_snapshots",
            "containerd snapshots, by kind and by what they hold",
            MetricType::Gauge,
            &values,
        )
    }
}

/// Serves the metrics at `http://ADDR/metrics` until `shutdown` completes.
pub async fn serve(
    addr: std::net::SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    use http_body_util::Full;
    use hyper::body::Bytes;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("metrics address {addr}: {e}"))?;
    tracing::info!("metrics on http://{addr}/metrics");
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => r.map_err(|e| format!("metrics address {addr}: {e}"))?,
            () = &mut shutdown => return Ok(()),
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    async move {
                        let resp = if req.uri().path() == "/metrics" {
                            let text = tokio::task::spawn_blocking(move || metrics.render())
                                .await
                                .unwrap_or_default();
                            hyper::Response::builder()
                                .header(
                                    "Content-Type",
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )
                                .body(Full::new(Bytes::from(text)))
                        } else {
                            hyper::Response::builder()
                                .status(404)
                                .body(Full::new(Bytes::from_static(b"see /metrics\n")))
                        };
                        resp.map_err(|e| e.to_string())
                    }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!("metrics connection: {e}");
            }
        });
    }
}
