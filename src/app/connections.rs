//! Accepting and serving HTTP connections under hard bounds, so that no
//! connection pattern can deny service to the others.
//!
//! Owns the accept loop and every connection-level limit:
//!
//! - at most `server.max_connections` open connections (beyond that the
//!   listener stops accepting; the kernel backlog holds the rest);
//! - a request head must arrive within `server.header_read_timeout_ms`
//!   (hyper's header timer; it also runs while a kept-alive connection waits
//!   for its next request);
//! - a connection with no request in progress is closed after
//!   `server.keep_alive_timeout_ms`, and one whose response the client does
//!   not take is closed `server.body_read_timeout_ms` later, so unread
//!   response bodies cannot pile up;
//! - a request body must arrive within `server.body_read_timeout_ms` plus one
//!   second per `server.body_min_rate_bytes_per_s` bytes received, else 408;
//! - the body is read into memory *before* the request reaches the router,
//!   so the router's request permits (`server.max_concurrent_requests`) are
//!   only ever held by requests whose body has arrived; bodies being received
//!   are bounded on their own by `server.max_buffered_body_bytes` (429 above).
//!
//! It knows nothing of routes, models or batching: it hands complete
//! requests to the axum [`Router`] built by [`crate::http`].

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt;

use crate::config::ServerConfig;
use crate::http::error::ApiError;

/// The connection-level limits, from `[server]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub keep_alive_timeout: Duration,
    pub body_read_timeout: Duration,
    pub body_min_rate: u64,
    pub max_body_bytes: usize,
    pub max_buffered_body_bytes: usize,
}

impl ConnLimits {
    pub fn from_config(s: &ServerConfig) -> Self {
        ConnLimits {
            max_connections: s.max_connections.max(1),
            header_read_timeout: Duration::from_millis(s.header_read_timeout_ms),
            keep_alive_timeout: Duration::from_millis(s.keep_alive_timeout_ms),
            body_read_timeout: Duration::from_millis(s.body_read_timeout_ms),
            body_min_rate: s.body_min_rate_bytes_per_s.max(1),
            max_body_bytes: s.max_body_bytes,
            max_buffered_body_bytes: s.max_buffered_body_bytes,
        }
    }

    /// When a body that started at `start` and has `received` bytes so far
    /// must have made more progress.
    fn body_deadline(&self, start: Instant, received: usize) -> Instant {
        let earned = Duration::from_secs_f64(received as f64 / self.body_min_rate as f64);
        start + self.body_read_timeout + earned
    }
}

/// Bytes of request bodies held in memory by requests in progress.
#[derive(Debug, Default)]
struct BodyBudget {
    used: AtomicUsize,
}

/// Bytes reserved from the [`BodyBudget`]; returned on drop.
struct Reserved<'a> {
    budget: &'a BodyBudget,
    bytes: usize,
}

impl Reserved<'_> {
    fn grow(&mut self, n: usize, cap: usize) -> bool {
        let ok = self
            .budget
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|t| *t <= cap)
            })
            .is_ok();
        if ok {
            self.bytes += n;
        }
        ok
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// What a connection's watchdog needs to know about its requests.
#[derive(Debug)]
struct Activity {
    in_flight: AtomicUsize,
    last_done: Mutex<Instant>,
}

impl Activity {
    fn new() -> Self {
        Activity {
            in_flight: AtomicUsize::new(0),
            last_done: Mutex::new(Instant::now()),
        }
    }

    /// Since when the connection has had no request in progress, if so.
    fn idle_since(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(*self.last_done.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Counts a request in progress on its connection until dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(a: &Arc<Activity>) -> Self {
        a.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(a))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.last_done.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Shared by every connection.
/// Told of every request the connection layer answers itself (path, status),
/// so the layer above can count it; this module knows nothing of metrics.
pub type OnRefused = Arc<dyn Fn(&str, StatusCode) + Send + Sync>;

struct Shared {
    router: Router,
    limits: ConnLimits,
    budget: BodyBudget,
    on_refused: OnRefused,
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops
/// accepting, asks every connection to close once its request is answered,
/// and returns when all are closed (the caller bounds how long it waits).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    on_refused: OnRefused,
    shutdown: impl Future<Output = ()> + Send,
) {
    let shared = Arc::new(Shared {
        router,
        limits,
        budget: BodyBudget::default(),
        on_refused,
    });
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = Arc::clone(&slots).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: back off, do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        let stop = stop_rx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            serve_connection(stream, shared, stop).await;
            tracing::trace!(%peer, "connection closed");
        });
    }
    drop(listener);
    stop_tx.send_replace(true);
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    // Every connection task holds one slot until it ends.
    let _ = slots.acquire_many(all).await;
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity::new());
    let svc_activity = Arc::clone(&activity);
    let svc_shared = Arc::clone(&shared);
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let shared = Arc::clone(&svc_shared);
        let guard = InFlight::new(&svc_activity);
        async move {
            let res = handle(&shared, req).await;
            drop(guard);
            Ok::<_, Infallible>(res)
        }
    });
    let limits = shared.limits;
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Some(limits.header_read_timeout))
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let tick =
        (limits.keep_alive_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    // Once the connection is asked to close, how long it may take before it
    // is dropped (a response the client does not read).
    let mut close_by: Option<Instant> = None;
    let mut stopping = *stop.borrow();
    if stopping {
        conn.as_mut().graceful_shutdown();
        close_by = Some(Instant::now() + limits.body_read_timeout);
    }
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = stop.changed(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
                close_by = Some(Instant::now() + limits.body_read_timeout);
            }
            _ = tokio::time::sleep(tick) => {
                let now = Instant::now();
                if let Some(by) = close_by {
                    if now >= by {
                        tracing::debug!("dropping a connection that did not close in time");
                        return;
                    }
                } else if activity
                    .idle_since()
                    .is_some_and(|t| now.saturating_duration_since(t) >= limits.keep_alive_timeout)
                {
                    conn.as_mut().graceful_shutdown();
                    close_by = Some(now + limits.body_read_timeout);
                }
            }
        }
    }
}

/// Reads the body under the rate rule and the budget, then runs the router.
async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let limits = &shared.limits;
    let (parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body_bytes as u64) {
        return closing(
            shared,
            &parts,
            ApiError::too_large(too_large(limits.max_body_bytes)),
        )
        .await;
    }
    let mut reserved = Reserved {
        budget: &shared.budget,
        bytes: 0,
    };
    let bytes = match read_body(body, limits, &mut reserved).await {
        Ok(b) => b,
        Err(e) => return closing(shared, &parts, e).await,
    };
    let req = Request::from_parts(parts, Body::from(bytes));
    let res = match shared.router.clone().oneshot(req).await {
        Ok(res) => res,
        Err(never) => match never {},
    };
    drop(reserved);
    res
}

fn too_large(limit: usize) -> String {
    format!("the request body is over the limit of {limit} bytes (server.max_body_bytes)")
}

/// An error answer after which the connection closes (its body may be
/// partly unread). It carries the request id like the router's answers.
async fn closing(
    shared: &Shared,
    parts: &axum::http::request::Parts,
    e: ApiError,
) -> Response<Body> {
    let res = e.into_response();
    (shared.on_refused)(parts.uri.path(), res.status());
    let mut res = crate::http::access_log::attach_id(res, &parts.headers).await;
    res.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    res
}

async fn read_body(
    mut body: Incoming,
    limits: &ConnLimits,
    reserved: &mut Reserved<'_>,
) -> Result<Bytes, ApiError> {
    use hyper::body::Body as _;
    if body.is_end_stream() {
        return Ok(Bytes::new());
    }
    let start = Instant::now();
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let deadline = limits.body_deadline(start, buf.len());
        let frame = match tokio::time::timeout_at(deadline.into(), body.frame()).await {
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the request body arrived too slowly: {} bytes in {:.1} s; a body must \
                         arrive within server.body_read_timeout_ms ({} ms) plus one second per \
                         server.body_min_rate_bytes_per_s ({}) bytes",
                        buf.len(),
                        start.elapsed().as_secs_f64(),
                        limits.body_read_timeout.as_millis(),
                        limits.body_min_rate
                    ),
                ))
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(ApiError::bad_request(format!(
                    "cannot read the request body: {e}"
                )))
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        if buf.len().saturating_add(data.len()) > limits.max_body_bytes {
            return Err(ApiError::too_large(too_large(limits.max_body_bytes)));
        }
        if !reserved.grow(data.len(), limits.max_buffered_body_bytes) {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "too many request bodies are being received at once \
                     (server.max_buffered_body_bytes = {}); retry later",
                    limits.max_buffered_body_bytes
                ),
            )
            .retry_after(1));
        }
        buf.extend_from_slice(&data);
    }
    Ok(Bytes::from(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnLimits {
        ConnLimits {
            max_connections: 4,
            header_read_timeout: Duration::from_secs(1),
            keep_alive_timeout: Duration::from_secs(1),
            body_read_timeout: Duration::from_secs(2),
            body_min_rate: 1000,
            max_body_bytes: 100,
            max_buffered_body_bytes: 150,
        }
    }

    #[test]
    fn body_deadline_grows_with_the_bytes_received() {
        let l = limits();
        let t = Instant::now();
        assert_eq!(l.body_deadline(t, 0), t + Duration::from_secs(2));
        assert_eq!(l.body_deadline(t, 500), t + Duration::from_millis(2500));
    }

    #[test]
    fn budget_is_bounded_and_returned() {
        let budget = BodyBudget::default();
        let mut a = Reserved {
            budget: &budget,
            bytes: 0,
        };
        assert!(a.grow(100, 150));
        let mut b = Reserved {
            budget: &budget,
            bytes: 0,
        };
        assert!(!b.grow(60, 150));
        assert!(b.grow(50, 150));
        drop(a);
        assert_eq!(budget.used.load(Ordering::Acquire), 50);
        drop(b);
        assert_eq!(budget.used.load(Ordering::Acquire), 0);
    }

    #[test]
    fn activity_is_idle_only_without_requests() {
        let a = Arc::new(Activity::new());
        assert!(a.idle_since().is_some());
        let g = InFlight::new(&a);
        assert!(a.idle_since().is_none());
        drop(g);
        assert!(a.idle_since().is_some());
    }
}
