//! Prometheus metrics, with the names and labels fixed by the API contract.
//!
//! Owns the registry and every metric; other modules record into the
//! [`Metrics`] they are handed and never create metrics of their own. Knows
//! nothing of HTTP beyond rendering the text exposition format.

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
    /// `vlembed_rejected_total{model, reason}`
    pub rejected: IntCounterVec,
    /// `vlembed_model_ready{model}`: 1 when loaded with a live worker.
    pub model_ready: IntGaugeVec,
    /// `vlembed_worker_restarts_total{model}`: workers rebuilt after a panic.
    pub worker_restarts: IntCounterVec,
}

/// Reasons for `vlembed_rejected_total`.
pub mod reason {
    pub const QUEUE_FULL: &str = "queue_full";
    pub const TIMEOUT: &str = "timeout";
    pub const INVALID: &str = "invalid";
    pub const UNAUTHORIZED: &str = "unauthorized";
    pub const TOO_LARGE: &str = "too_large";
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
                registry: registry.clone(),
            })
        };
        match build() {
            Ok(m) => m,
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
        String::from_utf8(buf).unwrap_or_default()
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
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
