//! Optional OpenTelemetry trace export: OTLP over HTTP with JSON encoding.
//!
//! Owns W3C `traceparent` parsing, span and trace ids, the span records and
//! the exporter: a bounded channel drained by one background thread that
//! POSTs batches to `{server.otlp_endpoint}/v1/traces`. Spans are dropped (and
//! counted in the log) rather than ever blocking a request or a worker. Off
//! unless [`init`] is called; [`export`] is then a no-op. It knows no HTTP
//! framework types and no model code; the HTTP layer and the workers hand it
//! finished spans.

use std::collections::hash_map::RandomState;
use std::fmt::Write as _;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

/// Spans waiting for export at most; more are dropped.
const QUEUE: usize = 8192;
/// Most spans per POST.
const BATCH: usize = 512;
/// Longest a finished span waits before it is sent.
const INTERVAL: Duration = Duration::from_millis(500);
/// Timeout of one POST.
const POST_TIMEOUT: Duration = Duration::from_secs(5);

pub type TraceId = [u8; 16];
pub type SpanId = [u8; 8];

/// A span's place in a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: TraceId,
    pub span_id: SpanId,
}

/// A W3C `traceparent` header: `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    pub parent_id: SpanId,
    pub sampled: bool,
}

fn hex_bytes<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Parses a `traceparent` header; `None` when it is malformed (then a new
/// trace starts, as the W3C spec says).
pub fn parse_traceparent(v: &str) -> Option<TraceParent> {
    let mut parts = v.trim().split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let parent = parts.next()?;
    let flags = parts.next()?;
    // Version 00 has exactly four fields; later versions may append more.
    if version == "ff"
        || hex_bytes::<1>(version).is_none()
        || (version == "00" && parts.next().is_some())
    {
        return None;
    }
    let trace_id = hex_bytes::<16>(trace)?;
    let parent_id = hex_bytes::<8>(parent)?;
    let flags = hex_bytes::<1>(flags)?[0];
    if trace_id == [0; 16] || parent_id == [0; 8] {
        return None;
    }
    Some(TraceParent {
        trace_id,
        parent_id,
        sampled: flags & 1 == 1,
    })
}

fn random_u64() -> u64 {
    static SEED: OnceLock<RandomState> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = SEED.get_or_init(RandomState::new).build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

/// A new non-zero span id.
pub fn new_span_id() -> SpanId {
    loop {
        let id = random_u64().to_be_bytes();
        if id != [0; 8] {
            return id;
        }
    }
}

/// A new non-zero trace id.
pub fn new_trace_id() -> TraceId {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&random_u64().to_be_bytes());
    id[8..].copy_from_slice(&new_span_id());
    id
}

pub fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// OTLP span kinds used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Internal = 1,
    Server = 2,
}

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    Str(String),
    Int(i64),
}

/// A finished span.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub context: SpanContext,
    pub parent: Option<SpanId>,
    pub name: String,
    pub kind: Kind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, Attr)>,
    pub links: Vec<SpanContext>,
    pub error: bool,
}

fn nanos(t: SystemTime) -> String {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
        .to_string()
}

impl Span {
    /// The span in OTLP/JSON form.
    pub fn to_json(&self) -> Value {
        let attributes: Vec<Value> = self
            .attributes
            .iter()
            .map(|(k, v)| match v {
                Attr::Str(s) => json!({"key": k, "value": {"stringValue": s}}),
                Attr::Int(i) => json!({"key": k, "value": {"intValue": i.to_string()}}),
            })
            .collect();
        let mut v = json!({
            "traceId": hex(&self.context.trace_id),
            "spanId": hex(&self.context.span_id),
            "name": self.name,
            "kind": self.kind as u8,
            "startTimeUnixNano": nanos(self.start),
            "endTimeUnixNano": nanos(self.end),
            "attributes": attributes,
            "status": {"code": if self.error { 2 } else { 0 }},
        });
        if let Some(p) = self.parent {
            v["parentSpanId"] = json!(hex(&p));
        }
        if !self.links.is_empty() {
            v["links"] = self
                .links
                .iter()
                .map(|l| json!({"traceId": hex(&l.trace_id), "spanId": hex(&l.span_id)}))
                .collect();
        }
        v
    }
}

/// The body of one export request.
pub fn export_body(spans: &[Span]) -> Value {
    json!({"resourceSpans": [{
        "resource": {"attributes": [
            {"key": "service.name", "value": {"stringValue": "vlembed"}},
            {"key": "service.version", "value": {"stringValue": env!("CARGO_PKG_VERSION")}},
        ]},
        "scopeSpans": [{
            "scope": {"name": "vlembed", "version": env!("CARGO_PKG_VERSION")},
            "spans": spans.iter().map(Span::to_json).collect::<Vec<_>>(),
        }],
    }]})
}

struct Exporter {
    tx: SyncSender<Span>,
    dropped: AtomicU64,
}

static EXPORTER: OnceLock<Exporter> = OnceLock::new();

/// The traces URL of an endpoint (`http://host:4318` → `.../v1/traces`).
pub fn traces_url(endpoint: &str) -> String {
    let e = endpoint.trim_end_matches('/');
    if e.ends_with("/v1/traces") {
        e.to_string()
    } else {
        format!("{e}/v1/traces")
    }
}

/// Starts exporting to `endpoint` (once per process; later calls with
/// another endpoint are ignored with a warning).
pub fn init(endpoint: &str) -> std::io::Result<()> {
    let url = traces_url(endpoint);
    if EXPORTER.get().is_some() {
        tracing::warn!(%url, "the OTLP exporter is already running; keeping the first endpoint");
        return Ok(());
    }
    let (tx, rx) = mpsc::sync_channel(QUEUE);
    let thread_url = url.clone();
    std::thread::Builder::new()
        .name("vlembed-otlp".into())
        .spawn(move || run(&thread_url, &rx))?;
    let _ = EXPORTER.set(Exporter {
        tx,
        dropped: AtomicU64::new(0),
    });
    tracing::info!(%url, "exporting traces (OTLP/HTTP JSON)");
    Ok(())
}

/// Whether spans are exported.
pub fn enabled() -> bool {
    EXPORTER.get().is_some()
}

/// Hands a finished span to the exporter; never blocks.
pub fn export(span: Span) {
    let Some(e) = EXPORTER.get() else { return };
    match e.tx.try_send(span) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            let n = e.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(dropped = n, "OTLP export queue full; spans dropped");
            }
        }
        Err(TrySendError::Disconnected(_)) => {}
    }
}

fn run(url: &str, rx: &Receiver<Span>) {
    let agent = ureq::AgentBuilder::new().timeout(POST_TIMEOUT).build();
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let first = match rx.recv() {
            Ok(s) => s,
            Err(_) => return,
        };
        batch.push(first);
        let deadline = std::time::Instant::now() + INTERVAL;
        while batch.len() < BATCH {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(s) => batch.push(s),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let body = export_body(&batch);
        if let Err(e) = agent
            .post(url)
            .set("Content-Type", "application/json")
            .send_string(&body.to_string())
        {
            tracing::warn!(%url, spans = batch.len(), error = %e, "OTLP export failed; spans dropped");
        }
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_parsing() {
        let tp =
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(hex(&tp.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&tp.parent_id), "00f067aa0ba902b7");
        assert!(tp.sampled);
        let tp =
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(!tp.sampled);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
        // A later version may carry more fields.
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x")
                .is_some()
        );
    }

    #[test]
    fn span_json_is_otlp() {
        let ctx = SpanContext {
            trace_id: new_trace_id(),
            span_id: new_span_id(),
        };
        let s = Span {
            context: ctx,
            parent: Some([1; 8]),
            name: "x".into(),
            kind: Kind::Server,
            start: UNIX_EPOCH + Duration::from_secs(1),
            end: UNIX_EPOCH + Duration::from_secs(2),
            attributes: vec![("a", Attr::Str("b".into())), ("n", Attr::Int(3))],
            links: vec![ctx],
            error: true,
        };
        let v = export_body(&[s]);
        let span = &v["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(span["traceId"].as_str().unwrap().len(), 32);
        assert_eq!(span["parentSpanId"], "0101010101010101");
        assert_eq!(span["startTimeUnixNano"], "1000000000");
        assert_eq!(span["kind"], 2);
        assert_eq!(span["status"]["code"], 2);
        assert_eq!(span["attributes"][1]["value"]["intValue"], "3");
        assert_eq!(span["links"][0]["spanId"], hex(&ctx.span_id));
        assert_eq!(traces_url("http://h:4318/"), "http://h:4318/v1/traces");
        assert_eq!(
            traces_url("http://h:4318/v1/traces"),
            "http://h:4318/v1/traces"
        );
    }
}
