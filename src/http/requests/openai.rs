//! `POST /v1/embeddings` (OpenAI-compatible): JSON only; unknown fields
//! are skipped, as OpenAI clients send more (`user`, ...).

use axum::http::StatusCode;
use serde::de::{self, MapAccess};

use super::super::body::Part;
use super::super::error::ApiError;
use super::super::inputs::{BodyLimits, Labeled, ListSeed, ListShape, ParseCtx};
use super::encoding::EncodingFormat;
use super::fields::{format, missing, opt_usize, read_json, FieldAt, Fields};
use super::{Common, EndpointRequest};

/// `POST /v1/embeddings` (OpenAI-compatible).
#[derive(Debug)]
pub struct OpenAiRequest {
    /// `model` and `priority`.
    pub common: Common,
    pub inputs: Vec<Labeled>,
    pub encoding_format: EncodingFormat,
    pub dimensions: Option<usize>,
}

impl EndpointRequest for OpenAiRequest {
    fn from_json_with(bytes: &[u8], limits: &BodyLimits) -> Result<Self, ApiError> {
        read_json::<OpenAiFields>(bytes, limits)
    }

    fn from_multipart(_parts: Vec<Part>) -> Result<Self, ApiError> {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "/v1/embeddings takes application/json only",
        ))
    }
}

/// `/v1/embeddings`' own fields as they are read.
#[derive(Default)]
struct OpenAiFields {
    input: Option<Vec<Labeled>>,
    encoding_format: Option<EncodingFormat>,
    dimensions: Option<usize>,
}

impl Fields for OpenAiFields {
    type Out = OpenAiRequest;
    const NAMES: &'static [&'static str] =
        &["input", "encoding_format", "dimensions", "embedding_types"];
    const LENIENT: bool = true;
    fn field<'de, A: MapAccess<'de>>(&mut self, f: FieldAt<'_, '_, A>) -> Result<(), A::Error> {
        let FieldAt { ctx, name, map } = f;
        match name {
            "input" => {
                let list = ListSeed::new(ctx, name, ListShape::OpenAi);
                self.input = Some(map.next_value_seed(list)?);
            }
            "encoding_format" => self.encoding_format = Some(format(ctx, map, name)?),
            "dimensions" => self.dimensions = opt_usize(ctx, map, name)?,
            _ => {
                return Err(ctx.fail(ApiError::bad_request(
                    "embedding_types is not supported by /v1/embeddings (one embedding per data \
                     item): use encoding_format, or /embed for several types at once",
                )))
            }
        }
        Ok(())
    }
    fn finish<E: de::Error>(self, ctx: &ParseCtx<'_>, common: Common) -> Result<OpenAiRequest, E> {
        Ok(OpenAiRequest {
            common,
            inputs: self.input.ok_or_else(|| missing(ctx, "input"))?,
            encoding_format: self.encoding_format.unwrap_or_default(),
            dimensions: self.dimensions,
        })
    }
}
