//! The outermost request middleware: request ids, the request's tracing span,
//! and the access log.
//!
//! Owns giving every request an id ([`super::request_id`]), the `request`
//! span every log line about it is emitted in, the `x-request-id` response
//! header, adding `request_id` to JSON error bodies, counting body bytes, the
//! one access-log line per request (target `vlembed::access`), and, when
//! traces are exported, the request's server span (child of an incoming W3C
//! `traceparent`). It records no metrics (that is `observe` in [`super`]) and
//! decides no status.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tracing::Instrument;

use super::error::ModelLabel;
use super::request_id::{self, Incoming};
use super::AppState;
use crate::batching::RequestTrace;
use crate::otlp::{self, Attr, Kind, SpanContext};

/// Largest error body rewritten to carry the request id.
const MAX_ERROR_BODY: usize = 1 << 20;

/// A request body that counts the bytes read through it.
struct Counting {
    inner: Body,
    count: Arc<AtomicU64>,
}

impl HttpBody for Counting {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Gives the request its id and span, runs it, and logs it.
pub async fn track(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let (id, incoming) = request_id::for_request(req.headers());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched".to_string(), |p| p.as_str().to_string());
    let method = req.method().clone();
    let span = tracing::info_span!("request", request_id = %id, method = %method, route = %route);
    if incoming == Incoming::Refused {
        tracing::warn!(
            parent: &span,
            "x-request-id refused (1 to {} bytes of letters, digits and -_.:/+=@); using a generated id",
            request_id::MAX_LEN
        );
    }
    let started_at = SystemTime::now();
    // The request's span: a child of the caller's traceparent when valid
    // (its sampled flag honoured), else the root of a new trace.
    let parent = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(otlp::parse_traceparent);
    let sampled = parent.is_none_or(|p| p.sampled);
    let span_ctx = (otlp::enabled() && sampled).then(|| SpanContext {
        trace_id: parent.map_or_else(otlp::new_trace_id, |p| p.trace_id),
        span_id: otlp::new_span_id(),
    });
    let mut trace = RequestTrace::new(id.as_str());
    if let Some(ctx) = span_ctx {
        trace = trace.with_span(ctx);
    }
    let trace = Arc::new(trace);
    let bytes_in = Arc::new(AtomicU64::new(0));
    let mut req = req.map(|inner| {
        Body::new(Counting {
            inner,
            count: Arc::clone(&bytes_in),
        })
    });
    req.extensions_mut().insert(Arc::clone(&trace));
    let mut res = next.run(req).instrument(span.clone()).await;
    if res.status().is_client_error() || res.status().is_server_error() {
        res = add_id_to_error(res, &id).await;
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert(request_id::HEADER, v);
    }
    if let Some(ctx) = span_ctx {
        let model = res.extensions().get::<ModelLabel>().map(|m| m.0.clone());
        let mut attributes = vec![
            ("http.request.method", Attr::Str(method.to_string())),
            ("http.route", Attr::Str(route.clone())),
            (
                "http.response.status_code",
                Attr::Int(i64::from(res.status().as_u16())),
            ),
            ("vlembed.request_id", Attr::Str(id.clone())),
            (
                "vlembed.inputs",
                Attr::Int(i64::try_from(trace.timings().inputs).unwrap_or(i64::MAX)),
            ),
        ];
        if let Some(m) = model {
            attributes.push(("vlembed.model", Attr::Str(m)));
        }
        otlp::export(otlp::Span {
            context: ctx,
            parent: parent.map(|p| p.parent_id),
            name: format!("{method} {route}"),
            kind: Kind::Server,
            start: started_at,
            end: SystemTime::now(),
            attributes,
            links: Vec::new(),
            error: res.status().is_server_error(),
        });
    }
    let server = &st.registry.server;
    if server.access_log && !server.access_log_exclude.iter().any(|r| r == &route) {
        let model = res
            .extensions()
            .get::<ModelLabel>()
            .map_or("-", |m| m.0.as_str());
        let bytes_out = res.body().size_hint().exact();
        let t = trace.timings();
        let _in_span = span.enter();
        tracing::info!(
            target: "vlembed::access",
            method = %method,
            route = %route,
            model,
            status = res.status().as_u16(),
            inputs = t.inputs,
            bytes_in = bytes_in.load(Ordering::Relaxed),
            bytes_out,
            preprocess_ms = ms(t.preprocess),
            queue_ms = ms(t.queue),
            inference_ms = ms(t.inference),
            batches = t.batches,
            cached = t.cached,
            total_ms = ms(start.elapsed()),
            request_id = %id,
            "request"
        );
    }
    res
}

/// Gives an error answered before the router ran (by the connection layer,
/// e.g. a body over the limit or too slow) the request id every other answer
/// carries: in the `x-request-id` header and in the error body.
pub async fn attach_id(res: Response, headers: &axum::http::HeaderMap) -> Response {
    let (id, _) = request_id::for_request(headers);
    let mut res = add_id_to_error(res, &id).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert(request_id::HEADER, v);
    }
    res
}

/// Adds `"request_id"` to the `error` object of a JSON error body.
async fn add_id_to_error(res: Response, id: &str) -> Response {
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !is_json {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_ERROR_BODY).await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read an error body to add its request id");
            parts.headers.remove(header::CONTENT_LENGTH);
            return Response::from_parts(parts, Body::empty());
        }
    };
    let out = match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(mut v) => match v.get_mut("error").and_then(|e| e.as_object_mut()) {
            Some(err) => {
                err.insert("request_id".into(), serde_json::Value::from(id));
                serde_json::to_vec(&v).map_or(bytes, Bytes::from)
            }
            None => bytes,
        },
        Err(_) => bytes,
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(out))
}
