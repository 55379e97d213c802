//! The requests of `/embed`, `/score` and `/v1/embeddings`, from JSON or
//! multipart, validated into plain values ([`Labeled`] inputs and options).
//!
//! Owns field names, defaults and the multipart pairing rule (openapi.yaml
//! `EmbedMultipart`, README "Endpoints"), one file per endpoint over two
//! shared readers: JSON bodies go through streaming visitors ([`fields`],
//! [`super::inputs`]) that check the [`BodyLimits`](super::inputs::BodyLimits)
//! as they go, so a body over a limit is refused without building what lies
//! past it; multipart forms through [`read_parts`]. It does not resolve
//! models, fetch image URLs or embed anything (see [`super::handlers`]).

mod embed;
mod encoding;
mod fields;
mod openai;
mod score;
#[cfg(test)]
mod tests;

pub use embed::EmbedRequest;
pub use encoding::EncodingFormat;
pub use openai::OpenAiRequest;
pub use score::ScoreRequest;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{FromRequest, Request};

use super::body::{self, Part, Payload};
use super::error::{quote, ApiError};
use super::inputs::BodyLimits;
use super::AppState;
use crate::batching::{Class, RequestTrace};
use crate::input::{Content, ImageSource};

/// A request of one endpoint, as it reads a body: JSON under the body
/// limits (checked while parsing), and a multipart form.
pub trait EndpointRequest: Sized {
    /// Reads a JSON body of `bytes` under `limits`.
    fn from_json_with(bytes: &[u8], limits: &BodyLimits) -> Result<Self, ApiError>;

    /// Reads a multipart form (an endpoint that takes JSON only refuses it
    /// with 415).
    fn from_multipart(parts: Vec<Part>) -> Result<Self, ApiError>;

    /// Reads a body in the form it came in.
    fn from_payload(payload: Payload) -> Result<Self, ApiError> {
        match payload {
            Payload::Json(b) => Self::from_json_with(&b.bytes, &b.limits),
            Payload::Multipart(parts) => Self::from_multipart(parts),
        }
    }
}

/// The extractor of the embedding endpoints: the body read under its limits
/// ([`Payload`]) and parsed into `R`, the request's trace (set by the
/// access-log middleware), and the moment the body was in: the request's
/// deadline (`server.request_timeout_ms`) runs from then.
pub struct Parsed<R> {
    pub req: R,
    pub trace: Arc<RequestTrace>,
    pub start: Instant,
}

impl<R: EndpointRequest + Send> FromRequest<AppState> for Parsed<R> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        // A request that did not pass the middleware (tests of the router
        // alone) gets a trace of its own.
        let trace = req
            .extensions()
            .get::<Arc<RequestTrace>>()
            .cloned()
            .unwrap_or_default();
        let payload = Payload::from_request(req, state).await?;
        let start = Instant::now();
        Ok(Parsed {
            req: R::from_payload(payload)?,
            trace,
            start,
        })
    }
}

/// The `priority` field's value: "high", "normal" or "low".
fn parse_priority(v: &str) -> Result<Class, ApiError> {
    v.parse().map_err(|_| {
        ApiError::bad_request(format!(
            "priority: expected \"high\", \"normal\" or \"low\", found {}",
            quote(v)
        ))
    })
}

/// The fields every endpoint has (JSON and multipart alike).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Common {
    /// `model`: the served model's name; `None`: the only one.
    pub model: Option<String>,
    /// `priority`: the scheduling class; `None`: chosen from the inputs.
    pub priority: Option<Class>,
}

/// The multipart field names of one endpoint besides [`Common`]'s.
struct PartNames {
    known: &'static [&'static str],
    /// Fields that may be given more than once (texts, images).
    repeatable: &'static [&'static str],
}

/// The multipart field names [`Common`] reads.
const COMMON_PARTS: [&str; 2] = ["model", "priority"];

/// Reads the [`Common`] fields and hands each other part to `field` by its
/// name, one of `names.known`: 400 for an unknown name (listing the known
/// ones) or a non-repeatable one given twice.
fn read_parts(
    parts: Vec<Part>,
    names: &PartNames,
    mut field: impl FnMut(&'static str, Part) -> Result<(), ApiError>,
) -> Result<Common, ApiError> {
    let mut common = Common::default();
    let mut seen: Vec<&'static str> = Vec::new();
    for part in parts {
        let known = COMMON_PARTS.iter().chain(names.known);
        let Some(&name) = known.clone().find(|n| **n == part.name) else {
            let known: Vec<&str> = known.copied().collect();
            return Err(ApiError::bad_request(format!(
                "unknown multipart field {}; expected one of: {}",
                quote(&part.name),
                known.join(", ")
            )));
        };
        if !names.repeatable.contains(&name) {
            if seen.contains(&name) {
                return Err(ApiError::bad_request(format!(
                    "multipart field {} is given more than once",
                    quote(name)
                )));
            }
            seen.push(name);
        }
        match name {
            "model" => common.model = Some(body::part_text(&part)?),
            "priority" => common.priority = Some(parse_priority(&body::part_text(&part)?)?),
            _ => field(name, part)?,
        }
    }
    Ok(common)
}

/// The multipart pairing of openapi.yaml and the README's `/embed` section:
/// m texts alone, k images alone, or k = m composed pairs.
fn pair(
    texts: Vec<String>,
    images: Vec<Vec<u8>>,
    text_field: &str,
    image_field: &str,
) -> Result<Vec<Content<ImageSource>>, ApiError> {
    let (m, k) = (texts.len(), images.len());
    let image = ImageSource::Bytes;
    if k == 0 {
        Ok(texts.into_iter().map(Content::Text).collect())
    } else if m == 0 {
        Ok(images
            .into_iter()
            .map(|i| Content::Image(image(i)))
            .collect())
    } else if k == m {
        Ok(texts
            .into_iter()
            .zip(images)
            .map(|(text, i)| Content::Composed {
                text,
                image: image(i),
            })
            .collect())
    } else {
        Err(ApiError::unprocessable(format!(
            "multipart: {m} {text_field} field(s) and {k} {image_field} part(s): send only texts, \
             only images, or as many of each (paired in order into composed inputs)"
        )))
    }
}
