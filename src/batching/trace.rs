//! What one request carries through batching, for logs and the access log.
//!
//! Owns [`RequestTrace`]: the request id (so the workers' batch log lines can
//! name every request a batch served) and where the request's time went
//! (preprocessing, queue wait, forward passes). The HTTP layer creates one per
//! request; the batcher and workers only record into it. No HTTP types here.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

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

    /// The request id.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn set_inputs(&self, n: usize) {
        self.inputs.store(n, Ordering::Relaxed);
    }

    pub fn add_preprocess(&self, d: Duration) {
        self.preprocess_us.fetch_add(micros(d), Ordering::Relaxed);
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

    pub fn timings(&self) -> Timings {
        Timings {
            inputs: self.inputs.load(Ordering::Relaxed),
            preprocess: Duration::from_micros(self.preprocess_us.load(Ordering::Relaxed)),
            queue: Duration::from_micros(self.queue_us.load(Ordering::Relaxed)),
            inference: Duration::from_micros(self.inference_us.load(Ordering::Relaxed)),
            batches: self.batches.load(Ordering::Relaxed),
        }
    }
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
