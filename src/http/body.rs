//! Reading request bodies: JSON or multipart/form-data, under the body limit,
//! with every failure (missing or unsupported content type, body too large,
//! malformed JSON or multipart, wrong field types) answered in the API's
//! error format instead of axum's plain-text rejections.
//!
//! Owns the [`Payload`] extractor, the multipart limits checked while parts
//! are read (how many parts, each part's size: a part over its limit is
//! refused as soon as it passes it), and JSON decoding with field paths. It
//! does not interpret fields (see [`super::requests`]).

use std::marker::PhantomData;

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use serde::de::{DeserializeOwned, DeserializeSeed};

use super::error::{quote, ApiError};
use super::inputs::{BodyLimits, ParseCtx};
use super::AppState;

/// Largest multipart part that is neither a text nor an image (`model`,
/// `role`, `normalize`, ...), in bytes.
pub const MAX_SCALAR_PART_BYTES: usize = 4096;

/// A JSON body with the limits it is parsed under.
#[derive(Debug, Clone)]
pub struct JsonBody {
    pub bytes: Bytes,
    pub limits: BodyLimits,
}

/// One multipart part, read into memory.
#[derive(Debug, Clone)]
pub struct Part {
    pub name: String,
    pub file_name: Option<String>,
    pub data: Bytes,
}

/// A request body as sent.
#[derive(Debug)]
pub enum Payload {
    Json(JsonBody),
    Multipart(Vec<Part>),
}

enum Kind {
    Json,
    Multipart,
}

fn content_kind(req: &Request) -> Result<Kind, ApiError> {
    let Some(value) = req.headers().get(CONTENT_TYPE) else {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "missing Content-Type: send application/json or multipart/form-data",
        ));
    };
    let text = value.to_str().unwrap_or("").to_ascii_lowercase();
    let essence = text.split(';').next().unwrap_or("").trim();
    if essence == "application/json" || essence.ends_with("+json") {
        Ok(Kind::Json)
    } else if essence == "multipart/form-data" {
        Ok(Kind::Multipart)
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "unsupported Content-Type {essence:?}: send application/json or multipart/form-data"
            ),
        ))
    }
}

fn limit_message(limit: usize) -> String {
    format!("the request body is over the limit of {limit} bytes (server.max_body_bytes)")
}

impl FromRequest<AppState> for Payload {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let server = &state.registry.server;
        let limit = server.max_body_bytes;
        let limits = BodyLimits::from_server(server);
        match content_kind(&req)? {
            Kind::Json => {
                let bytes = Bytes::from_request(req, state).await.map_err(|e| {
                    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                        ApiError::too_large(limit_message(limit))
                    } else {
                        ApiError::bad_request(format!(
                            "cannot read the request body: {}",
                            e.body_text()
                        ))
                    }
                })?;
                Ok(Payload::Json(JsonBody { bytes, limits }))
            }
            Kind::Multipart => {
                let mp = Multipart::from_request(req, state).await.map_err(|e| {
                    ApiError::bad_request(format!("malformed multipart request: {}", e.body_text()))
                })?;
                Ok(Payload::Multipart(
                    read_multipart(mp, &limits, limit).await?,
                ))
            }
        }
    }
}

/// Reads every part of a multipart body, refusing it (413) as soon as a part
/// count or a part's size goes over `limits`; `body_limit` is only named in
/// the message when the whole body is too large.
pub async fn read_multipart(
    mut mp: Multipart,
    limits: &BodyLimits,
    body_limit: usize,
) -> Result<Vec<Part>, ApiError> {
    let mut parts = Vec::new();
    let mut counter = PartCounter::new(limits);
    loop {
        let field = mp
            .next_field()
            .await
            .map_err(|e| multipart_error(e, body_limit))?;
        let Some(mut field) = field else { break };
        let name = field.name().unwrap_or("").to_string();
        let file_name = field.file_name().map(str::to_string);
        let kind = counter.admit(&name)?;
        let cap = kind.max_bytes(limits);
        let mut data = Vec::new();
        while let Some(chunk) = field
            .chunk()
            .await
            .map_err(|e| multipart_error(e, body_limit))?
        {
            if data.len() + chunk.len() > cap {
                return Err(kind.too_large(&name, counter.parts, limits));
            }
            data.extend_from_slice(&chunk);
        }
        kind.check(&name, counter.parts, &data, limits)?;
        parts.push(Part {
            name,
            file_name,
            data: Bytes::from(data),
        });
    }
    Ok(parts)
}

/// What a multipart part carries, for its size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartKind {
    /// `text`, `query_text`, `candidate_text`, `instruction`.
    Text,
    /// `image`, `query_image`, `candidate_image`.
    Image,
    /// Anything else (`model`, `role`, ...).
    Scalar,
}

impl PartKind {
    pub fn of(name: &str) -> Self {
        match name {
            "text" | "query_text" | "candidate_text" | "instruction" => PartKind::Text,
            "image" | "query_image" | "candidate_image" => PartKind::Image,
            _ => PartKind::Scalar,
        }
    }

    /// The most bytes a part of this kind may take.
    pub fn max_bytes(self, limits: &BodyLimits) -> usize {
        match self {
            // A character takes at most 4 bytes of UTF-8; the exact count
            // is checked once the part is read.
            PartKind::Text => limits.max_text_chars.saturating_mul(4),
            PartKind::Image => limits.max_image_bytes,
            PartKind::Scalar => MAX_SCALAR_PART_BYTES,
        }
    }

    fn too_large(self, name: &str, index: usize, limits: &BodyLimits) -> ApiError {
        let what = format!("multipart field {} (part {index})", quote(name));
        ApiError::too_large(match self {
            PartKind::Text => format!(
                "{what}: the text is over the limit of {} characters (server.max_text_chars)",
                limits.max_text_chars
            ),
            PartKind::Image => format!(
                "{what}: the image is over the limit of {} bytes (server.max_image_bytes)",
                limits.max_image_bytes
            ),
            PartKind::Scalar => {
                format!("{what} is over the limit of {MAX_SCALAR_PART_BYTES} bytes")
            }
        })
    }

    /// Checks a whole part (a text's length in characters).
    pub fn check(
        self,
        name: &str,
        index: usize,
        data: &[u8],
        limits: &BodyLimits,
    ) -> Result<(), ApiError> {
        if self == PartKind::Text && data.len() > limits.max_text_chars {
            // Invalid UTF-8 is reported when the part is read as text.
            if let Ok(text) = std::str::from_utf8(data) {
                if text.chars().count() > limits.max_text_chars {
                    return Err(self.too_large(name, index, limits));
                }
            }
        }
        Ok(())
    }
}

/// Counts multipart parts as they arrive against the input limit.
pub struct PartCounter {
    max_inputs: usize,
    /// Parts seen so far.
    pub parts: usize,
    texts: usize,
    images: usize,
}

impl PartCounter {
    pub fn new(limits: &BodyLimits) -> Self {
        PartCounter {
            max_inputs: limits.max_inputs,
            parts: 0,
            texts: 0,
            images: 0,
        }
    }

    /// Most parts in one body: a text and an image per input, plus a few
    /// single fields.
    pub fn max_parts(&self) -> usize {
        self.max_inputs.saturating_mul(2).saturating_add(16)
    }

    /// Counts one more part named `name`, refusing it when it is past a limit.
    pub fn admit(&mut self, name: &str) -> Result<PartKind, ApiError> {
        self.parts += 1;
        if self.parts > self.max_parts() {
            return Err(ApiError::too_large(format!(
                "multipart: more than {} parts, over what {} inputs per request can use \
                 (server.max_inputs_per_request)",
                self.max_parts(),
                self.max_inputs
            )));
        }
        let count = match name {
            "text" | "candidate_text" => &mut self.texts,
            "image" | "candidate_image" => &mut self.images,
            _ => return Ok(PartKind::of(name)),
        };
        *count += 1;
        if *count > self.max_inputs {
            return Err(ApiError::too_large(format!(
                "multipart: more than {} {} parts, over the limit of {} inputs per request \
                 (server.max_inputs_per_request)",
                self.max_inputs,
                quote(name),
                self.max_inputs
            )));
        }
        Ok(PartKind::of(name))
    }
}

fn multipart_error(e: axum::extract::multipart::MultipartError, limit: usize) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::too_large(limit_message(limit))
    } else {
        ApiError::bad_request(format!("malformed multipart body: {}", e.body_text()))
    }
}

/// Decodes a JSON body through `seed`, naming the field at fault: the failure
/// `ctx` recorded (with its status) when there is one, else serde's.
pub fn decode_seed<'de, S: DeserializeSeed<'de>>(
    bytes: &'de [u8],
    ctx: &ParseCtx,
    seed: S,
) -> Result<S::Value, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let mut track = serde_path_to_error::Track::new();
    let result = seed.deserialize(serde_path_to_error::Deserializer::new(&mut de, &mut track));
    let value = match result {
        Ok(v) => v,
        Err(inner) => {
            if let Some(failure) = ctx.take_failure() {
                return Err(failure);
            }
            let path = track.path().to_string();
            return Err(match inner.classify() {
                serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                    ApiError::bad_request(format!("malformed JSON body: {inner}"))
                }
                _ if path == "." || path.is_empty() => {
                    ApiError::bad_request(format!("invalid request body: {inner}"))
                }
                _ => ApiError::bad_request(format!("field {path}: {inner}")),
            });
        }
    };
    de.end()
        .map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))?;
    Ok(value)
}

/// Decodes a JSON body into `T`, naming the field at fault.
pub fn decode_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let limits = BodyLimits::NONE;
    let ctx = ParseCtx::new(&limits);
    decode_seed(bytes, &ctx, PhantomData::<T>)
}

/// Reads a multipart text part.
pub fn part_text(part: &Part) -> Result<String, ApiError> {
    String::from_utf8(part.data.to_vec()).map_err(|_| {
        ApiError::bad_request(format!(
            "multipart field {} is not valid UTF-8 text",
            quote(&part.name)
        ))
    })
}

/// Reads a multipart boolean (`true`/`false`, `1`/`0`).
pub fn part_bool(part: &Part) -> Result<bool, ApiError> {
    match part_text(part)?.trim().to_ascii_lowercase().as_str() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        other => Err(ApiError::bad_request(format!(
            "multipart field {}: expected true or false, found {}",
            quote(&part.name),
            quote(other)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct T {
        a: u32,
        b: Option<bool>,
    }

    #[test]
    fn json_errors_name_the_problem() {
        let e = decode_json::<T>(b"{\"a\": 1,").unwrap_err();
        assert!(e.message.starts_with("malformed JSON"), "{}", e.message);
        let e = decode_json::<T>(b"{\"a\": \"x\"}").unwrap_err();
        assert!(e.message.starts_with("field a:"), "{}", e.message);
        let e = decode_json::<T>(b"{\"a\": 1, \"c\": 2}").unwrap_err();
        assert!(e.message.contains("unknown field `c`"), "{}", e.message);
        let e = decode_json::<T>(b"[1]").unwrap_err();
        assert_eq!(e.status.as_u16(), 400);
        let e = decode_json::<T>(b"{\"a\": 1} x").unwrap_err();
        assert!(e.message.contains("malformed"), "{}", e.message);
        assert_eq!(decode_json::<T>(b"{\"a\": 1}").unwrap().a, 1);
    }

    #[test]
    fn multipart_parts_are_counted_and_sized() {
        let limits = BodyLimits {
            max_inputs: 2,
            max_text_chars: 3,
            max_image_bytes: 10,
        };
        let mut c = PartCounter::new(&limits);
        assert_eq!(c.admit("text").unwrap(), PartKind::Text);
        assert_eq!(c.admit("candidate_text").unwrap(), PartKind::Text);
        let e = c.admit("text").unwrap_err();
        assert_eq!(e.status.as_u16(), 413);
        assert!(
            e.message.contains("more than 2 \"text\" parts"),
            "{}",
            e.message
        );
        let mut c = PartCounter::new(&limits);
        for _ in 0..c.max_parts() {
            c.admit("role").unwrap();
        }
        assert!(c
            .admit("role")
            .unwrap_err()
            .message
            .contains("more than 20 parts"));
        assert_eq!(PartKind::Text.max_bytes(&limits), 12);
        assert!(PartKind::Text
            .check("text", 1, "ééé".as_bytes(), &limits)
            .is_ok());
        let e = PartKind::Text
            .check("text", 1, "éééé".as_bytes(), &limits)
            .unwrap_err();
        assert!(e.message.contains("server.max_text_chars"), "{}", e.message);
        assert_eq!(PartKind::of("query_image").max_bytes(&limits), 10);
        assert_eq!(
            PartKind::of("model").max_bytes(&limits),
            MAX_SCALAR_PART_BYTES
        );
    }
}
