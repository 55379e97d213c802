//! CORS: which browser origins may call the API.
//!
//! Owns turning `server.cors_allowed_origins` into a [`CorsLayer`]. Off (no
//! layer) when the list is empty. It decides nothing about authentication:
//! a cross-origin call still needs its API key.

use std::time::Duration;

use axum::http::{header, HeaderName, HeaderValue, Method};
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::request_id;

/// How long browsers may cache a preflight answer.
const MAX_AGE: Duration = Duration::from_secs(600);

/// The CORS layer for `origins`, or `None` when CORS is off. Invalid origins
/// (not a header value) are skipped with a warning; the configuration check
/// refuses empty entries and `*` mixed with origins.
pub fn layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let list: Vec<HeaderValue> = origins
            .iter()
            .filter_map(|o| match HeaderValue::from_str(o.trim_end_matches('/')) {
                Ok(v) => Some(v),
                Err(_) => {
                    tracing::warn!(origin = %o, "server.cors_allowed_origins: not a valid origin; skipped");
                    None
                }
            })
            .collect();
        AllowOrigin::list(list)
    };
    let exposed: [HeaderName; 3] = [
        request_id::HEADER,
        header::RETRY_AFTER,
        HeaderName::from_static(super::handlers::FINGERPRINT_HEADER),
    ];
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                request_id::HEADER,
            ])
            .expose_headers(exposed)
            .max_age(MAX_AGE),
    )
}
