//! The one error type of the HTTP layer and its JSON form
//! `{"error": {"type", "message"}}`.
//!
//! Owns the mapping from every failure (body parsing, auth, model lookup,
//! admission, preprocessing, batch failures, timeouts) to a status, a stable
//! error type and a message naming the input, field and limit. It does not
//! decide *when* those failures happen.
//!
//! Client strings never come back in bulk: messages quote them through
//! [`quote`] / [`cut`] (the first [`ECHO_CHARS`] characters, marked as cut),
//! and no message is longer than [`MAX_MESSAGE_BYTES`].

use std::borrow::Cow;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::batching::{AdmitError, EmbedError, ItemError};
use crate::preprocess::PreprocessError;
use crate::registry::{ResolveError, Unavailable};

/// Which model a response concerns, for the metrics middleware.
#[derive(Debug, Clone)]
pub struct ModelLabel(pub String);

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub retry_after: Option<u64>,
    pub model: Option<String>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    message: &'a str,
}

/// How many characters of a client string a message may echo.
pub const ECHO_CHARS: usize = 64;

/// The longest message an error carries, in bytes (a last guard: client
/// strings are already cut by [`quote`] and [`cut`]).
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// A client string for a message: its first [`ECHO_CHARS`] characters, then
/// `…(cut, N bytes in all)` when it is longer.
pub fn cut(s: &str) -> Cow<'_, str> {
    match s.char_indices().nth(ECHO_CHARS) {
        None => Cow::Borrowed(s),
        Some((i, _)) => Cow::Owned(format!("{}…(cut, {} bytes in all)", &s[..i], s.len())),
    }
}

/// A client string quoted for a message (Rust/JSON-style escapes), cut like
/// [`cut`].
pub fn quote(s: &str) -> String {
    match s.char_indices().nth(ECHO_CHARS) {
        None => format!("{s:?}"),
        Some((i, _)) => format!("{:?}…(cut, {} bytes in all)", &s[..i], s.len()),
    }
}

fn bounded(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_BYTES {
        let end = message.floor_char_boundary(MAX_MESSAGE_BYTES);
        message.truncate(end);
        message.push_str("…(message cut)");
    }
    message
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind: kind_of(status),
            message: bounded(message.into()),
            retry_after: None,
            model: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, message)
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    pub fn unavailable(message: impl Into<String>, retry_after: u64) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message).retry_after(retry_after)
    }

    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    pub fn for_model(mut self, model: &str) -> Self {
        self.model = Some(model.to_string());
        self
    }

    /// The JSON body alone.
    pub fn body(&self) -> String {
        serde_json::to_string(&Body {
            error: Inner {
                kind: self.kind,
                message: &self.message,
            },
        })
        .unwrap_or_else(|_| {
            r#"{"error":{"type":"internal","message":"cannot encode the error"}}"#.into()
        })
    }

    /// Maps a preprocessing failure of the input at `at` (`inputs[2]`).
    pub fn preprocess(at: &str, e: &PreprocessError) -> Self {
        let status = match e {
            PreprocessError::EmptyText
            | PreprocessError::InvalidImage(_)
            | PreprocessError::ImageTooLarge { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            PreprocessError::TextTooLong { .. }
            | PreprocessError::ImageTokens { .. }
            | PreprocessError::PromptTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            PreprocessError::Tokenizer(_)
            | PreprocessError::Prompt(_)
            | PreprocessError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let field = match e {
            PreprocessError::EmptyText
            | PreprocessError::TextTooLong { .. }
            | PreprocessError::PromptTooLarge { .. } => ".text",
            PreprocessError::InvalidImage(_)
            | PreprocessError::ImageTooLarge { .. }
            | PreprocessError::ImageTokens { .. } => ".image",
            _ => "",
        };
        Self::new(status, format!("{at}{field}: {e}"))
    }

    /// Maps a failure of [`crate::batching::Batcher::embed`]; `at` names the
    /// input with the given index in the request's terms.
    pub fn embed(e: EmbedError, at: &dyn Fn(usize) -> String, retry_after: u64) -> Self {
        match e {
            EmbedError::Admit(a) => Self::admit(a, retry_after),
            EmbedError::Input { index, source } => Self::preprocess(&at(index), &source),
            e @ EmbedError::ImageBudget { .. } => Self::too_large(format!(
                "inputs: {e} (model_defaults.max_request_image_pixels, or the model's own max_request_image_pixels); no image was decoded"
            )),
            EmbedError::Item(ItemError::Expired) => Self::new(
                StatusCode::GATEWAY_TIMEOUT,
                "the request timed out while its inputs waited for a batch",
            ),
            EmbedError::Item(ItemError::ShuttingDown) => {
                Self::unavailable("the server is shutting down", retry_after)
            }
            EmbedError::Failed { index, source } => {
                Self::internal(format!("{}: {source}", at(index)))
            }
            EmbedError::Item(e @ (ItemError::BatchFailed(_) | ItemError::WorkerDied(_))) => {
                Self::internal(format!("inference failed: {e}"))
            }
            EmbedError::Timeout(d) => Self::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "the request did not finish within its timeout of {} ms (server.request_timeout_ms)",
                    d.as_millis()
                ),
            ),
            EmbedError::Internal(m) => Self::internal(m),
        }
    }

    pub fn admit(e: AdmitError, retry_after: u64) -> Self {
        match e {
            AdmitError::Full { .. } => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, format!("{e}; retry later"))
                    .retry_after(retry_after)
            }
            AdmitError::NoWorker { .. } | AdmitError::Closed => {
                Self::unavailable(e.to_string(), retry_after)
            }
        }
    }
}

impl From<ResolveError> for ApiError {
    fn from(e: ResolveError) -> Self {
        match e {
            ResolveError::Unknown { name, available } => Self::new(
                StatusCode::NOT_FOUND,
                format!(
                    "unknown model {}; this server serves: {available}",
                    quote(&name)
                ),
            ),
            ResolveError::Ambiguous { .. } => Self::bad_request(e.to_string()),
        }
    }
}

impl ApiError {
    pub fn from_unavailable(e: Unavailable, retry_after: u64) -> Self {
        Self::unavailable(e.to_string(), retry_after)
    }
}

/// The stable error type for a status.
pub fn kind_of(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "invalid_request",
        401 => "unauthorized",
        404 => "not_found",
        405 => "method_not_allowed",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        422 => "invalid_input",
        429 => "queue_full",
        503 => "unavailable",
        504 => "timeout",
        s if s >= 500 => "internal",
        _ => "invalid_request",
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = (
            self.status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            self.body(),
        )
            .into_response();
        if let Some(s) = self.retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            res.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(m) = self.model {
            res.extensions_mut().insert(ModelLabel(m));
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn preprocess_errors_map_to_contract_statuses() {
        let cases = [
            (PreprocessError::EmptyText, 422),
            (PreprocessError::InvalidImage("x".into()), 422),
            (
                PreprocessError::ImageTooLarge {
                    width: 10,
                    height: 10,
                    pixels: 100,
                    limit: 50,
                },
                422,
            ),
            (
                PreprocessError::TextTooLong {
                    tokens: 90,
                    limit: 77,
                },
                413,
            ),
            (
                PreprocessError::ImageTokens {
                    tokens: 90,
                    image_tokens: 80,
                    limit: 77,
                },
                413,
            ),
            (PreprocessError::PromptTooLarge { limit: 4 }, 413),
            (PreprocessError::Internal("x".into()), 500),
            (PreprocessError::Tokenizer("x".into()), 500),
            (PreprocessError::Prompt("x".into()), 500),
        ];
        for (e, status) in cases {
            let api = ApiError::preprocess("inputs[3]", &e);
            assert_eq!(api.status.as_u16(), status, "{e}");
            assert!(api.message.starts_with("inputs[3]"), "{}", api.message);
        }
        let api = ApiError::preprocess(
            "inputs[1]",
            &PreprocessError::TextTooLong {
                tokens: 90,
                limit: 77,
            },
        );
        assert!(api.message.contains("inputs[1].text") && api.message.contains("77"));
        let api = ApiError::preprocess(
            "inputs[2]",
            &PreprocessError::ImageTokens {
                tokens: 90,
                image_tokens: 80,
                limit: 77,
            },
        );
        assert!(
            api.message.starts_with("inputs[2].image"),
            "{}",
            api.message
        );
        let api = ApiError::preprocess("inputs[0]", &PreprocessError::PromptTooLarge { limit: 9 });
        assert!(
            api.message.starts_with("inputs[0].text") && api.message.contains("9 bytes"),
            "{}",
            api.message
        );
    }

    #[test]
    fn admission_and_timeouts_map_to_429_503_504() {
        let full = AdmitError::Full {
            model: "m".into(),
            admitted: 4,
            requested: 2,
            capacity: 5,
        };
        let api = ApiError::admit(full, 2);
        assert_eq!((api.status.as_u16(), api.retry_after), (429, Some(2)));
        assert_eq!(ApiError::admit(AdmitError::Closed, 1).status.as_u16(), 503);
        let at = |i: usize| format!("inputs[{i}]");
        let t = ApiError::embed(EmbedError::Timeout(Duration::from_millis(250)), &at, 1);
        assert_eq!(t.status.as_u16(), 504);
        assert!(t.message.contains("250 ms"));
        let b = ApiError::embed(
            EmbedError::Item(ItemError::BatchFailed("nan".into())),
            &at,
            1,
        );
        assert_eq!(b.status.as_u16(), 500);
        let one = ApiError::embed(
            EmbedError::Failed {
                index: 3,
                source: ItemError::BatchFailed("nan".into()),
            },
            &at,
            1,
        );
        assert_eq!(one.status.as_u16(), 500);
        assert_eq!(
            one.message,
            "inputs[3]: the model failed on this input: nan"
        );
        let budget = ApiError::embed(
            EmbedError::ImageBudget {
                images: 3,
                pixels: 120,
                limit: 100,
            },
            &at,
            1,
        );
        assert_eq!(budget.status.as_u16(), 413);
        assert!(
            budget.message.contains("budget of 100 pixels")
                && budget
                    .message
                    .contains("model_defaults.max_request_image_pixels"),
            "{}",
            budget.message
        );
    }

    #[test]
    fn client_strings_are_cut_and_marked() {
        assert_eq!(quote("bge"), "\"bge\"");
        assert_eq!(cut("bge"), "bge");
        let long = "é".repeat(4_000_000);
        let q = quote(&long);
        assert!(
            q.starts_with(&format!("\"{}\"", "é".repeat(ECHO_CHARS))),
            "{q}"
        );
        assert!(q.ends_with("…(cut, 8000000 bytes in all)"), "{q}");
        assert!(cut(&long).chars().count() < 100);
        let api = ApiError::from(ResolveError::Unknown {
            name: "m".repeat(4 << 20),
            available: "a, b".into(),
        });
        assert_eq!(api.status.as_u16(), 404);
        assert!(api.message.len() < 200, "{}", api.message.len());
        assert!(api.message.contains("(cut, 4194304 bytes in all)"));
        let huge = ApiError::bad_request("x".repeat(1 << 20));
        assert!(huge.message.len() <= MAX_MESSAGE_BYTES + 20);
        assert!(huge.message.ends_with("…(message cut)"));
    }

    #[test]
    fn body_is_the_contract_json() {
        let e = ApiError::bad_request("inputs[0]: \"quoted\"");
        let v: serde_json::Value = serde_json::from_str(&e.body()).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request");
        assert_eq!(v["error"]["message"], "inputs[0]: \"quoted\"");
        let res = e.for_model("m").into_response();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST);
        assert!(res.extensions().get::<ModelLabel>().is_some());
    }
}
