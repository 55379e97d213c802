//! Prometheus metrics, with the names and labels fixed by the API contract.
//!
//! Owns the registry and every metric; other modules record into the
//! [`Metrics`] they are handed and never create metrics of their own. Also
//! owns `vlembed_build_info` and the standard `process_*` metrics (read from
//! `/proc` on Linux at each scrape). Knows nothing of HTTP beyond rendering
//! the text exposition format.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric the server exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `vlembed_requests_total{endpoint, model, status}`
    pub requests: IntCounterVec,
    /// `vlembed_request_duration_seconds{endpoint, model}`
    pub request_duration: HistogramVec,
    /// `vlembed_queue_duration_seconds{model}`: time an input waited for a batch.
    pub queue_duration: HistogramVec,
    /// `vlembed_inference_duration_seconds{model}`: one batch's forward pass.
    pub inference_duration: HistogramVec,
    /// `vlembed_preprocess_duration_seconds{model, modality}`
    pub preprocess_duration: HistogramVec,
    /// `vlembed_batch_size{model}`: inputs per batch.
    pub batch_size: HistogramVec,
    /// `vlembed_queue_depth{model}`: inputs waiting.
    pub queue_depth: IntGaugeVec,
    /// `vlembed_inputs_total{model, modality}`
    pub inputs: IntCounterVec,
    /// `vlembed_text_tokens_total{model}`: text tokens embedded (special tokens included).
    pub text_tokens: IntCounterVec,
    /// `vlembed_images_total{model}`: images embedded.
    pub images: IntCounterVec,
    /// `vlembed_rejected_total{model, reason}`
    pub rejected: IntCounterVec,
    /// `vlembed_model_ready{model}`: 1 when loaded with a live worker.
    pub model_ready: IntGaugeVec,
    /// `vlembed_worker_restarts_total{model}`: workers rebuilt after a panic.
    pub worker_restarts: IntCounterVec,
    /// `vlembed_build_info{version, commit, features}`: always 1.
    pub build_info: IntGaugeVec,
    /// `vlembed_cpu_backend{model, backend}`: 1 for the backend a model's
    /// CPU matrix products run on (`native` or `onednn`).
    pub cpu_backend: IntGaugeVec,
    /// `vlembed_embedding_cache_hits_total{model}`: inputs answered from the cache.
    pub embedding_cache_hits: IntCounterVec,
    /// `vlembed_embedding_cache_misses_total{model}`: inputs looked up and not found.
    pub embedding_cache_misses: IntCounterVec,
    /// `vlembed_embedding_cache_evictions_total{model}`: entries evicted for room.
    pub embedding_cache_evictions: IntCounterVec,
    /// `vlembed_embedding_cache_bytes{model}`: bytes the cache holds.
    pub embedding_cache_bytes: IntGaugeVec,
    /// `vlembed_image_fetches_total{outcome}`: image URL fetches by outcome.
    pub image_fetches: IntCounterVec,
    /// `vlembed_image_fetch_duration_seconds{outcome}`: one image fetch.
    pub image_fetch_duration: HistogramVec,
}

/// The source commit the binary was built from (see build.rs).
pub const COMMIT: &str = env!("VLEMBED_COMMIT");

/// Cargo features compiled in, comma separated ("" for none).
pub fn features() -> String {
    let mut f = Vec::new();
    if cfg!(feature = "cuda") {
        f.push("cuda");
    }
    if cfg!(feature = "onednn") {
        f.push("onednn");
    }
    f.join(",")
}

/// Reasons for `vlembed_rejected_total`.
pub mod reason {
    pub const QUEUE_FULL: &str = "queue_full";
    pub const TIMEOUT: &str = "timeout";
    pub const INVALID: &str = "invalid";
    pub const UNAUTHORIZED: &str = "unauthorized";
    pub const TOO_LARGE: &str = "too_large";
    /// A request body that arrived too slowly (408 from the connection layer).
    pub const BODY_TIMEOUT: &str = "body_timeout";
}

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        // Metric definitions are static and valid; registering distinct names
        // in a fresh registry cannot fail.
        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
            if let Err(e) = r.register(Box::new(m.clone())) {
                tracing::error!(error = %e, "metric registration failed");
            }
            m
        }
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).map(|m| reg(&registry, m))
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels).map(|m| reg(&registry, m))
        };
        let hist = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                labels,
            )
            .map(|m| reg(&registry, m))
        };
        let build = || -> prometheus::Result<Metrics> {
            Ok(Metrics {
                requests: counter(
                    "vlembed_requests_total",
                    "HTTP requests by endpoint, model and status code",
                    &["endpoint", "model", "status"],
                )?,
                request_duration: hist(
                    "vlembed_request_duration_seconds",
                    "Time to answer a request",
                    &["endpoint", "model"],
                    LATENCY_BUCKETS,
                )?,
                queue_duration: hist(
                    "vlembed_queue_duration_seconds",
                    "Time an input waited in the queue for a batch",
                    &["model"],
                    LATENCY_BUCKETS,
                )?,
                inference_duration: hist(
                    "vlembed_inference_duration_seconds",
                    "Time of one batch's forward pass",
                    &["model"],
                    LATENCY_BUCKETS,
                )?,
                preprocess_duration: hist(
                    "vlembed_preprocess_duration_seconds",
                    "Time to decode, resize and tokenize one input",
                    &["model", "modality"],
                    LATENCY_BUCKETS,
                )?,
                batch_size: hist(
                    "vlembed_batch_size",
                    "Inputs per batch",
                    &["model"],
                    BATCH_BUCKETS,
                )?,
                queue_depth: gauge(
                    "vlembed_queue_depth",
                    "Inputs waiting in the queue",
                    &["model"],
                )?,
                inputs: counter(
                    "vlembed_inputs_total",
                    "Inputs embedded, by modality",
                    &["model", "modality"],
                )?,
                text_tokens: counter(
                    "vlembed_text_tokens_total",
                    "Text tokens embedded, special tokens included",
                    &["model"],
                )?,
                images: counter("vlembed_images_total", "Images embedded", &["model"])?,
                rejected: counter(
                    "vlembed_rejected_total",
                    "Requests or inputs rejected, by reason",
                    &["model", "reason"],
                )?,
                model_ready: gauge(
                    "vlembed_model_ready",
                    "1 when the model is loaded and has a live worker",
                    &["model"],
                )?,
                worker_restarts: counter(
                    "vlembed_worker_restarts_total",
                    "Model workers rebuilt (fresh replica) after a panic",
                    &["model"],
                )?,
                build_info: gauge(
                    "vlembed_build_info",
                    "Build facts as labels; always 1",
                    &["version", "commit", "features"],
                )?,
                cpu_backend: gauge(
                    "vlembed_cpu_backend",
                    "1 for the backend the model's CPU matrix products run on",
                    &["model", "backend"],
                )?,
                embedding_cache_hits: counter(
                    "vlembed_embedding_cache_hits_total",
                    "Inputs answered from the embedding cache (no forward pass)",
                    &["model"],
                )?,
                embedding_cache_misses: counter(
                    "vlembed_embedding_cache_misses_total",
                    "Inputs looked up in the embedding cache and not found",
                    &["model"],
                )?,
                embedding_cache_evictions: counter(
                    "vlembed_embedding_cache_evictions_total",
                    "Embedding cache entries evicted to make room",
                    &["model"],
                )?,
                embedding_cache_bytes: gauge(
                    "vlembed_embedding_cache_bytes",
                    "Bytes held by the embedding cache (vectors plus a fixed overhead per entry)",
                    &["model"],
                )?,
                image_fetches: counter(
                    "vlembed_image_fetches_total",
                    "Image URL fetches by outcome (ok, refused_url, refused_address, \
                     resolve_failed, connect_failed, timeout, http_status, redirects, too_large, \
                     bad_content, busy)",
                    &["outcome"],
                )?,
                image_fetch_duration: hist(
                    "vlembed_image_fetch_duration_seconds",
                    "Time of one image URL fetch, waiting for a slot included",
                    &["outcome"],
                    LATENCY_BUCKETS,
                )?,
                registry: registry.clone(),
            })
        };
        match build() {
            Ok(m) => {
                m.build_info
                    .with_label_values(&[env!("CARGO_PKG_VERSION"), COMMIT, &features()])
                    .set(1);
                m
            }
            // Only reachable if a definition above is malformed, which the
            // unit test below rules out.
            Err(e) => unreachable!("invalid metric definition: {e}"),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        let mut text = String::from_utf8(buf).unwrap_or_default();
        process::render(&mut text);
        text
    }
}

/// The standard `process_*` metrics of the Prometheus client libraries,
/// read from `/proc/self` (Linux). Elsewhere, or when a file cannot be read,
/// the metrics it feeds are left out.
pub mod process {
    use std::fmt::Write;

    /// Clock ticks per second of `/proc/self/stat` times (USER_HZ, 100 on
    /// every Linux architecture's user interface).
    const TICKS_PER_SECOND: f64 = 100.0;

    /// The process's facts, each when readable.
    #[derive(Debug, Default, Clone, PartialEq)]
    pub struct Sample {
        pub cpu_seconds: Option<f64>,
        pub resident_bytes: Option<u64>,
        pub virtual_bytes: Option<u64>,
        pub open_fds: Option<u64>,
        pub max_fds: Option<u64>,
        pub start_time_seconds: Option<f64>,
        pub threads: Option<u64>,
    }

    /// Reads the current process.
    pub fn sample() -> Sample {
        let mut s = Sample::default();
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the command name (which may hold spaces), from field 3.
            if let Some((_, rest)) = stat.rsplit_once(')') {
                let f: Vec<&str> = rest.split_whitespace().collect();
                let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
                if let (Some(u), Some(sy)) = (num(11), num(12)) {
                    s.cpu_seconds = Some((u + sy) as f64 / TICKS_PER_SECOND);
                }
                s.threads = num(17);
                s.virtual_bytes = num(20);
                let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|t| {
                    t.lines()
                        .find_map(|l| l.strip_prefix("btime "))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                });
                if let (Some(boot), Some(start)) = (boot, num(19)) {
                    s.start_time_seconds = Some(boot as f64 + start as f64 / TICKS_PER_SECOND);
                }
            }
        }
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            s.resident_bytes = status.lines().find_map(|l| {
                let kb = l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?;
                kb.trim().parse::<u64>().ok().map(|k| k * 1024)
            });
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            // The directory handle itself is one of the entries.
            s.open_fds = Some(dir.count().saturating_sub(1) as u64);
        }
        if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
            s.max_fds = limits.lines().find_map(|l| {
                let rest = l.strip_prefix("Max open files")?;
                rest.split_whitespace().next()?.parse::<u64>().ok()
            });
        }
        s
    }

    fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: Option<String>) {
        if let Some(v) = value {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
            );
        }
    }

    /// Appends the process metrics to a text exposition.
    pub fn render(out: &mut String) {
        let s = sample();
        let int = |v: Option<u64>| v.map(|v| v.to_string());
        let float = |v: Option<f64>| v.map(|v| format!("{v}"));
        metric(
            out,
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            float(s.cpu_seconds),
        );
        metric(
            out,
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            int(s.resident_bytes),
        );
        metric(
            out,
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            int(s.virtual_bytes),
        );
        metric(
            out,
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            int(s.open_fds),
        );
        metric(
            out,
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            int(s.max_fds),
        );
        metric(
            out,
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            float(s.start_time_seconds),
        );
        metric(
            out,
            "process_threads",
            "gauge",
            "Number of OS threads in the process.",
            int(s.threads),
        );
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_contract_metric_is_exported() {
        let m = Metrics::new();
        m.requests.with_label_values(&["/embed", "m", "200"]).inc();
        m.request_duration
            .with_label_values(&["/embed", "m"])
            .observe(0.1);
        m.queue_duration.with_label_values(&["m"]).observe(0.01);
        m.inference_duration.with_label_values(&["m"]).observe(0.02);
        m.preprocess_duration
            .with_label_values(&["m", "image"])
            .observe(0.003);
        m.batch_size.with_label_values(&["m"]).observe(4.0);
        m.queue_depth.with_label_values(&["m"]).set(3);
        m.inputs.with_label_values(&["m", "text"]).inc();
        m.rejected
            .with_label_values(&["m", reason::QUEUE_FULL])
            .inc();
        m.model_ready.with_label_values(&["m"]).set(1);
        m.cpu_backend.with_label_values(&["m", "onednn"]).set(1);
        let text = m.render();
        for name in [
            "vlembed_requests_total{endpoint=\"/embed\",model=\"m\",status=\"200\"} 1",
            "vlembed_request_duration_seconds_bucket",
            "vlembed_queue_duration_seconds_bucket",
            "vlembed_inference_duration_seconds_bucket",
            "vlembed_preprocess_duration_seconds_bucket{modality=\"image\",model=\"m\"",
            "vlembed_batch_size_bucket",
            "vlembed_queue_depth{model=\"m\"} 3",
            "vlembed_inputs_total{modality=\"text\",model=\"m\"} 1",
            "vlembed_rejected_total{model=\"m\",reason=\"queue_full\"} 1",
            "vlembed_model_ready{model=\"m\"} 1",
            "vlembed_cpu_backend{backend=\"onednn\",model=\"m\"} 1",
            "vlembed_build_info{commit=",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn process_metrics_come_from_proc() {
        let s = process::sample();
        let rss = s.resident_bytes.expect("VmRSS");
        assert!(rss > 1 << 20, "{rss}");
        assert!(s.cpu_seconds.is_some());
        assert!(s.open_fds.unwrap() >= 3);
        assert!(s.max_fds.unwrap() >= s.open_fds.unwrap());
        assert!(s.threads.unwrap() >= 1);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = s.start_time_seconds.unwrap();
        assert!(
            start <= now + 1.0 && start > now - 86_400.0 * 30.0,
            "{start} vs {now}"
        );
        let text = Metrics::new().render();
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_start_time_seconds ",
            "# TYPE process_cpu_seconds_total counter",
        ] {
            assert!(text.contains(name), "missing {name}");
        }
    }
}
