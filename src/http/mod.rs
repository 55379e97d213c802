//! The HTTP layer: the axum router, its middleware and handlers.
//!
//! Owns routes ([`Endpoint::ALL`] is the one list the router is built from,
//! and the OpenAPI test checks it against `openapi.yaml`), API-key auth,
//! request ids, the access log and CORS, request metrics, turning every error (axum's own rejections and panics
//! included) into `{"error": {"type", "message"}}`, and serving the OpenAPI
//! document. It knows nothing of tensors or devices: it turns requests into
//! [`crate::input::Input`]s (image URLs fetched through [`crate::fetch`]
//! when `server.fetch_image_urls` is on) and hands them to a model's batcher.

pub mod access_log;
pub mod body;
pub mod cors;
pub mod error;
pub mod handlers;
pub mod inputs;
pub mod request_id;
pub mod requests;
pub mod responses;
pub mod ui;

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use tokio::sync::Semaphore;
use tower_http::catch_panic::CatchPanicLayer;

use crate::metrics::reason;
use crate::registry::Registry;
use error::{ApiError, ModelLabel};

/// The OpenAPI document (the contract), as written.
pub const OPENAPI_YAML: &str = include_str!("../../openapi.yaml");

/// What every handler gets.
#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
    /// `openapi.yaml` rendered as JSON.
    pub openapi: Bytes,
    /// Slots for embedding requests in progress (`server.max_concurrent_requests`).
    pub in_flight: Arc<Semaphore>,
    /// Extra slots for small requests once `in_flight` is taken (see
    /// [`small_request_slots`]).
    pub small_in_flight: Arc<Semaphore>,
    /// Fetches image URLs; `None` when `server.fetch_image_urls` is off.
    pub fetcher: Option<Arc<crate::fetch::Fetcher>>,
}

/// Every route the server serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Embed,
    Score,
    OpenAiEmbeddings,
    Health,
    Ready,
    Info,
    Metrics,
    OpenApi,
    Playground,
    Docs,
}

impl Endpoint {
    pub const ALL: [Endpoint; 10] = [
        Endpoint::Embed,
        Endpoint::Score,
        Endpoint::OpenAiEmbeddings,
        Endpoint::Health,
        Endpoint::Ready,
        Endpoint::Info,
        Endpoint::Metrics,
        Endpoint::OpenApi,
        Endpoint::Playground,
        Endpoint::Docs,
    ];

    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Embed => "/embed",
            Endpoint::Score => "/score",
            Endpoint::OpenAiEmbeddings => "/v1/embeddings",
            Endpoint::Health => "/health",
            Endpoint::Ready => "/ready",
            Endpoint::Info => "/info",
            Endpoint::Metrics => "/metrics",
            Endpoint::OpenApi => "/openapi.json",
            Endpoint::Playground => "/",
            Endpoint::Docs => "/docs",
        }
    }

    pub fn method(self) -> Method {
        match self {
            Endpoint::Embed | Endpoint::Score | Endpoint::OpenAiEmbeddings => Method::POST,
            _ => Method::GET,
        }
    }

    /// Whether the route embeds (and counts against `max_concurrent_requests`).
    pub fn embeds(self) -> bool {
        matches!(
            self,
            Endpoint::Embed | Endpoint::Score | Endpoint::OpenAiEmbeddings
        )
    }

    /// Whether the route needs an API key (when keys are configured).
    pub fn needs_key(self) -> bool {
        matches!(
            self,
            Endpoint::Embed | Endpoint::Score | Endpoint::OpenAiEmbeddings | Endpoint::Info
        )
    }

    fn handler(self) -> MethodRouter<AppState> {
        match self {
            Endpoint::Embed => post(handlers::embed),
            Endpoint::Score => post(handlers::score),
            Endpoint::OpenAiEmbeddings => post(handlers::openai_embeddings),
            Endpoint::Health => get(handlers::health),
            Endpoint::Ready => get(handlers::ready),
            Endpoint::Info => get(handlers::info),
            Endpoint::Metrics => get(handlers::metrics),
            Endpoint::OpenApi => get(handlers::openapi),
            Endpoint::Playground => get(ui::playground),
            Endpoint::Docs => get(ui::docs),
        }
    }

    /// Whether the configuration serves the route (the pages can be off).
    pub fn enabled(self, server: &crate::config::ServerConfig) -> bool {
        match self {
            Endpoint::Playground => server.playground,
            Endpoint::Docs => server.docs,
            _ => true,
        }
    }
}

/// The OpenAPI document compiled in cannot be served (a build defect).
#[derive(Debug, thiserror::Error)]
pub enum OpenApiError {
    #[error("openapi.yaml does not parse: {0}")]
    Yaml(#[from] serde_norway::Error),
    #[error("openapi.yaml cannot be written as JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Parses the OpenAPI document into JSON.
pub fn openapi_json() -> Result<serde_json::Value, OpenApiError> {
    Ok(serde_norway::from_str::<serde_json::Value>(OPENAPI_YAML)?)
}

/// Builds the router over `registry`; image URLs are fetched with `fetcher`
/// (refused when `None`).
pub fn router(
    registry: Arc<Registry>,
    fetcher: Option<Arc<crate::fetch::Fetcher>>,
) -> Result<Router, OpenApiError> {
    let doc = openapi_json()?;
    let openapi = Bytes::from(serde_json::to_vec(&doc)?);
    let body_limit = registry.server.max_body_bytes;
    let in_flight = Arc::new(Semaphore::new(registry.server.max_concurrent_requests));
    let small_in_flight = Arc::new(Semaphore::new(small_request_slots(
        registry.server.max_concurrent_requests,
    )));
    let state = AppState {
        registry,
        openapi,
        in_flight,
        small_in_flight,
        fetcher,
    };
    let cors = cors::layer(&state.registry.server.cors_allowed_origins);
    let mut router = Router::new();
    for ep in Endpoint::ALL {
        if !ep.enabled(&state.registry.server) {
            continue;
        }
        let mut route = ep.handler();
        // The last layer added runs first: auth, then the concurrency limit.
        if ep.embeds() {
            route = route.route_layer(middleware::from_fn_with_state(state.clone(), limit));
        }
        if ep.needs_key() {
            route = route.route_layer(middleware::from_fn_with_state(state.clone(), auth));
        }
        router = router.route(ep.path(), route);
    }
    // Layers run outermost (last added) first: ids and the access log see
    // everything, CORS answers preflights, panics become 500s, then metrics.
    let mut router = router
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(DefaultBodyLimit::max(body_limit));
    if let Some(cors) = cors {
        router = router.layer(cors);
    }
    Ok(router
        .layer(middleware::from_fn_with_state(
            state.clone(),
            access_log::track,
        ))
        .with_state(state))
}

/// Bodies of at most this many bytes may use the small-request slots: a
/// text query or an image URL, not an upload.
pub const SMALL_REQUEST_BYTES: u64 = 4096;

/// Slots for small requests beyond `max_concurrent_requests`: an eighth of
/// it, at least 4. Bulk clients that hold every regular slot (32 image
/// uploaders against the default 32) would otherwise lock queries out with
/// 429 before their priority is even read; the class is in the body, which
/// is not parsed here, so a small body stands for it (a small request costs
/// little to parse, and its inputs still pass the queue's admission).
pub fn small_request_slots(max_concurrent_requests: usize) -> usize {
    (max_concurrent_requests / 8).max(4)
}

/// Refuses embedding requests over `server.max_concurrent_requests` at once
/// (small ones over that plus [`small_request_slots`]), before their bodies
/// are parsed or any of their inputs is preprocessed.
/// Bodies are already in memory here (the connection layer,
/// `app::connections`, reads each one before the router sees the request,
/// bounded by `server.max_buffered_body_bytes`), so a permit is only ever
/// held by a request whose body has arrived: slow uploads cannot take them
/// all.
async fn limit(State(st): State<AppState>, req: Request, next: Next) -> Response {
    use http_body::Body as _;
    let small = req
        .body()
        .size_hint()
        .upper()
        .is_some_and(|n| n <= SMALL_REQUEST_BYTES);
    let permit = Arc::clone(&st.in_flight).try_acquire_owned().or_else(|e| {
        if small {
            Arc::clone(&st.small_in_flight).try_acquire_owned()
        } else {
            Err(e)
        }
    });
    match permit {
        Ok(permit) => {
            let res = next.run(req).await;
            drop(permit);
            res
        }
        Err(_) => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many requests in progress (server.max_concurrent_requests = {}); retry later",
                st.registry.server.max_concurrent_requests
            ),
        )
        .retry_after(st.registry.server.retry_after_s)
        .into_response(),
    }
}

async fn no_route(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no route {} {}; see /openapi.json",
            req.method(),
            req.uri().path()
        ),
    )
}

async fn wrong_method(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "method {} is not allowed on {}",
            req.method(),
            req.uri().path()
        ),
    )
}

fn panic_response(_panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    ApiError::internal("internal error while handling the request").into_response()
}

/// Compares without leaking where the first difference is.
fn same_key(given: &[u8], key: &[u8]) -> bool {
    if given.len() != key.len() {
        return false;
    }
    given.iter().zip(key).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

async fn auth(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let keys = &st.registry.server.api_keys;
    if keys.is_empty() {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    match given {
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing API key: send the header Authorization: Bearer <key>",
        )
        .into_response(),
        Some(token) => {
            let ok = keys.iter().fold(false, |found, k| {
                found | same_key(token.as_bytes(), k.as_bytes())
            });
            if ok {
                next.run(req).await
            } else {
                ApiError::new(StatusCode::UNAUTHORIZED, "invalid API key").into_response()
            }
        }
    }
}

/// The `vlembed_rejected_total` reason of an error status.
fn rejection_reason(status: StatusCode) -> Option<&'static str> {
    match status.as_u16() {
        400 | 415 | 422 => Some(reason::INVALID),
        401 => Some(reason::UNAUTHORIZED),
        413 => Some(reason::TOO_LARGE),
        429 => Some(reason::QUEUE_FULL),
        504 => Some(reason::TIMEOUT),
        _ => None,
    }
}

/// Records a request the connection layer answered itself, before the router
/// saw it (a body over the limit, too slow, or over the buffered-body budget):
/// it counts in `vlembed_requests_total` and `vlembed_rejected_total` like an
/// answer of the router, so a slow-upload or oversized-body flood is visible.
/// `path` is labelled as its route when it is one, else `unmatched`.
pub fn record_refused(metrics: &crate::metrics::Metrics, path: &str, status: StatusCode) {
    let endpoint = Endpoint::ALL
        .iter()
        .map(|ep| ep.path())
        .find(|p| *p == path)
        .unwrap_or("unmatched");
    metrics
        .requests
        .with_label_values(&[endpoint, NO_MODEL, status.as_str()])
        .inc();
    let reason = if status == StatusCode::REQUEST_TIMEOUT {
        Some(reason::BODY_TIMEOUT)
    } else {
        rejection_reason(status)
    };
    if let Some(r) = reason {
        metrics.rejected.with_label_values(&[NO_MODEL, r]).inc();
    }
}

/// Label of requests that concern no (known) model.
const NO_MODEL: &str = "-";

/// Records request metrics and rewrites non-JSON error bodies (axum's own
/// rejections) into the API's error format.
async fn observe(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched".to_string(), |p| p.as_str().to_string());
    let mut res = next.run(req).await;
    let status = res.status();
    if (status.is_client_error() || status.is_server_error()) && !is_json(&res) {
        res = to_json_error(res).await;
    }
    let model = res
        .extensions()
        .get::<ModelLabel>()
        .map_or(NO_MODEL.to_string(), |m| m.0.clone());
    let m = &st.registry.metrics;
    m.requests
        .with_label_values(&[&endpoint, &model, status.as_str()])
        .inc();
    m.request_duration
        .with_label_values(&[&endpoint, &model])
        .observe(start.elapsed().as_secs_f64());
    if let Some(r) = rejection_reason(status) {
        m.rejected.with_label_values(&[&model, r]).inc();
    }
    res
}

fn is_json(res: &Response) -> bool {
    res.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

async fn to_json_error(res: Response) -> Response {
    let (mut parts, body) = res.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        parts
            .status
            .canonical_reason()
            .unwrap_or("error")
            .to_string()
    } else {
        text
    };
    let err = ApiError::new(parts.status, message);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(err.body()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_parses_and_lists_every_route() {
        let doc = openapi_json().unwrap();
        for ep in Endpoint::ALL {
            let method = ep.method().as_str().to_ascii_lowercase();
            assert!(
                doc["paths"][ep.path()][&method].is_object(),
                "{} {} missing from openapi.yaml",
                ep.method(),
                ep.path()
            );
        }
    }

    #[test]
    fn key_comparison() {
        assert!(same_key(b"abc", b"abc"));
        assert!(!same_key(b"abc", b"abd"));
        assert!(!same_key(b"abc", b"abcd"));
    }

    #[test]
    fn rejection_reasons() {
        assert_eq!(
            rejection_reason(StatusCode::TOO_MANY_REQUESTS),
            Some("queue_full")
        );
        assert_eq!(
            rejection_reason(StatusCode::GATEWAY_TIMEOUT),
            Some("timeout")
        );
        assert_eq!(rejection_reason(StatusCode::NOT_FOUND), None);
    }
}
