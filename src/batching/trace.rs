//! What one request carries through batching, for logs, the access log and
//! trace export.
//!
//! Owns [`RequestTrace`]: the request id (so the workers' batch log lines can
//! name every request a batch served), where the request's time went
//! (preprocessing, queue wait, forward passes), and, when traces are exported,
//! the request's span context, under which the preprocessing and queue-wait
//! spans are exported; the batch span links to every request it served. The
//! HTTP layer creates one per request; the batcher and workers only record
//! into it. No HTTP types here.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::otlp::{self, Attr, Kind, Span, SpanContext};

/// One request's id and timings. Shared (`Arc`) by the request and the queue
/// items of its inputs; every field is updated atomically.
#[derive(Debug, Default)]
pub struct RequestTrace {
    id: Arc<str>,
    inputs: AtomicUsize,
    preprocess_us: AtomicU64,
    queue_us: AtomicU64,
    inference_us: AtomicU64,
    batches: AtomicUsize,
    /// Inputs answered from the embedding cache.
    cached: AtomicUsize,
    /// The request's span, when its trace is exported.
    span: Option<SpanContext>,
}

/// A snapshot of a [`RequestTrace`]'s timings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    pub inputs: usize,
    /// Time its inputs spent being preprocessed (the request's wall time of
    /// that stage, not the sum over inputs).
    pub preprocess: Duration,
    /// The longest wait of one of its inputs between queueing and its batch.
    pub queue: Duration,
    /// Forward passes of the batches that held its inputs, each counted once.
    pub inference: Duration,
    /// How many batches held its inputs.
    pub batches: usize,
    /// How many of its inputs were answered from the embedding cache (no
    /// batch, no queue wait).
    pub cached: usize,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl RequestTrace {
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        RequestTrace {
            id: id.into(),
            ..Default::default()
        }
    }

    /// Exports this request's stage spans as children of `span`.
    pub fn with_span(mut self, span: SpanContext) -> Self {
        self.span = Some(span);
        self
    }

    /// The request's span, when its trace is exported.
    pub fn span(&self) -> Option<SpanContext> {
        self.span
    }

    fn child(&self, name: &str, start: SystemTime, end: SystemTime) {
        if let Some(parent) = self.span {
            otlp::export(Span {
                context: SpanContext {
                    trace_id: parent.trace_id,
                    span_id: otlp::new_span_id(),
                },
                parent: Some(parent.span_id),
                name: name.to_string(),
                kind: Kind::Internal,
                start,
                end,
                attributes: vec![("vlembed.request_id", Attr::Str(self.id.to_string()))],
                links: Vec::new(),
                error: false,
            });
        }
    }

    /// The request id.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn set_inputs(&self, n: usize) {
        self.inputs.store(n, Ordering::Relaxed);
    }

    /// Records the request's preprocessing, which just ended after `d`.
    pub fn add_preprocess(&self, d: Duration) {
        self.preprocess_us.fetch_add(micros(d), Ordering::Relaxed);
        let end = SystemTime::now();
        self.child("preprocess", end.checked_sub(d).unwrap_or(end), end);
    }

    /// Records one input's queue wait (the longest is kept).
    pub fn record_queue(&self, d: Duration) {
        self.queue_us.fetch_max(micros(d), Ordering::Relaxed);
    }

    /// Records one batch that held some of its inputs.
    pub fn add_batch(&self, d: Duration) {
        self.inference_us.fetch_add(micros(d), Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
    }

    /// Records `n` inputs answered from the embedding cache.
    pub fn add_cached(&self, n: usize) {
        self.cached.fetch_add(n, Ordering::Relaxed);
    }

    pub fn timings(&self) -> Timings {
        Timings {
            inputs: self.inputs.load(Ordering::Relaxed),
            preprocess: Duration::from_micros(self.preprocess_us.load(Ordering::Relaxed)),
            queue: Duration::from_micros(self.queue_us.load(Ordering::Relaxed)),
            inference: Duration::from_micros(self.inference_us.load(Ordering::Relaxed)),
            batches: self.batches.load(Ordering::Relaxed),
            cached: self.cached.load(Ordering::Relaxed),
        }
    }
}

/// Records a batch that just finished after `took`: each request's queue
/// wait (`waits`: one entry per item, its trace and its wait) and the
/// forward pass, and exports the queue-wait spans and the batch span (linked
/// to every request span). Returns the ids of the requests it served.
pub fn record_batch(
    model: &str,
    waits: &[(&Arc<RequestTrace>, Duration)],
    took: Duration,
    size: usize,
    failed: bool,
) -> Vec<String> {
    let traces = distinct(waits.iter().map(|(t, _)| *t));
    let end = SystemTime::now();
    let start = end.checked_sub(took).unwrap_or(end);
    for t in &traces {
        let wait = waits
            .iter()
            .filter(|(o, _)| Arc::ptr_eq(o, t))
            .map(|(_, w)| *w)
            .max()
            .unwrap_or_default();
        t.record_queue(wait);
        t.add_batch(took);
        t.child("queue", start.checked_sub(wait).unwrap_or(start), start);
    }
    if otlp::enabled() {
        let links: Vec<SpanContext> = traces.iter().filter_map(|t| t.span).collect();
        if !links.is_empty() {
            otlp::export(Span {
                context: SpanContext {
                    trace_id: otlp::new_trace_id(),
                    span_id: otlp::new_span_id(),
                },
                parent: None,
                name: "batch".into(),
                kind: Kind::Internal,
                start,
                end,
                attributes: vec![
                    ("vlembed.model", Attr::Str(model.to_string())),
                    (
                        "vlembed.batch_size",
                        Attr::Int(i64::try_from(size).unwrap_or(i64::MAX)),
                    ),
                    (
                        "vlembed.requests",
                        Attr::Int(i64::try_from(traces.len()).unwrap_or(i64::MAX)),
                    ),
                ],
                links,
                error: failed,
            });
        }
    }
    traces.iter().map(|t| t.id().to_string()).collect()
}

/// The distinct traces among `traces` (one batch may hold several inputs of
/// the same request), in first-seen order.
pub fn distinct<'a>(
    traces: impl IntoIterator<Item = &'a Arc<RequestTrace>>,
) -> Vec<&'a Arc<RequestTrace>> {
    let mut out: Vec<&Arc<RequestTrace>> = Vec::new();
    for t in traces {
        if !out.iter().any(|o| Arc::ptr_eq(o, t)) {
            out.push(t);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_dedups() {
        let a = Arc::new(RequestTrace::new("a"));
        let b = Arc::new(RequestTrace::new("b"));
        let all = [a.clone(), b.clone(), a.clone()];
        let d = distinct(all.iter());
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].id(), "a");
        a.record_queue(Duration::from_millis(3));
        a.record_queue(Duration::from_millis(1));
        a.add_batch(Duration::from_millis(10));
        a.add_batch(Duration::from_millis(5));
        let t = a.timings();
        assert_eq!(t.queue, Duration::from_millis(3));
        assert_eq!(t.inference, Duration::from_millis(15));
        assert_eq!(t.batches, 2);
        assert_eq!(b.timings(), Timings::default());
    }
}
