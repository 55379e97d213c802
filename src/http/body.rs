//! Reading request bodies: JSON or multipart/form-data, under the body limit,
//! with every failure (missing or unsupported content type, body too large,
//! malformed JSON or multipart, wrong field types) answered in the API's
//! error format instead of axum's plain-text rejections.
//!
//! Owns the [`Payload`] extractor and typed JSON decoding with field paths.
//! It does not interpret fields (see [`super::requests`]).

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::AppState;

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
    Json(Bytes),
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
        let limit = state.registry.server.max_body_bytes;
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
                Ok(Payload::Json(bytes))
            }
            Kind::Multipart => {
                let mut mp = Multipart::from_request(req, state).await.map_err(|e| {
                    ApiError::bad_request(format!("malformed multipart request: {}", e.body_text()))
                })?;
                let mut parts = Vec::new();
                loop {
                    let field = mp
                        .next_field()
                        .await
                        .map_err(|e| multipart_error(e, limit))?;
                    let Some(field) = field else { break };
                    let name = field.name().unwrap_or("").to_string();
                    let file_name = field.file_name().map(str::to_string);
                    let data = field.bytes().await.map_err(|e| multipart_error(e, limit))?;
                    parts.push(Part {
                        name,
                        file_name,
                        data,
                    });
                }
                Ok(Payload::Multipart(parts))
            }
        }
    }
}

fn multipart_error(e: axum::extract::multipart::MultipartError, limit: usize) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::too_large(limit_message(limit))
    } else {
        ApiError::bad_request(format!("malformed multipart body: {}", e.body_text()))
    }
}

/// Decodes a JSON body into `T`, naming the field at fault.
pub fn decode_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize::<_, T>(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner();
        match inner.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                ApiError::bad_request(format!("malformed JSON body: {inner}"))
            }
            _ if path == "." || path.is_empty() => {
                ApiError::bad_request(format!("invalid request body: {inner}"))
            }
            _ => ApiError::bad_request(format!("field {path}: {inner}")),
        }
    })?;
    de.end()
        .map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))?;
    Ok(value)
}

/// Reads a multipart text part.
pub fn part_text(part: &Part) -> Result<String, ApiError> {
    String::from_utf8(part.data.to_vec()).map_err(|_| {
        ApiError::bad_request(format!(
            "multipart field {:?} is not valid UTF-8 text",
            part.name
        ))
    })
}

/// Reads a multipart boolean (`true`/`false`, `1`/`0`).
pub fn part_bool(part: &Part) -> Result<bool, ApiError> {
    match part_text(part)?.trim().to_ascii_lowercase().as_str() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        other => Err(ApiError::bad_request(format!(
            "multipart field {:?}: expected true or false, found {other:?}",
            part.name
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
}
