//! `POST /v1/embeddings` (OpenAI-compatible): JSON only; unknown fields
//! are skipped, as OpenAI clients send more (`user`, ...).

use serde::de::{self, MapAccess};

use super::super::body::{decode_seed, JsonBody};
use super::super::error::ApiError;
use super::super::inputs::{BodyLimits, Labeled, ListSeed, ListShape, ParseCtx};
use super::encoding::EncodingFormat;
use super::fields::{format, missing, opt_priority, opt_string, opt_usize, Fields, Top};
use crate::batching::Class;

/// `POST /v1/embeddings` (OpenAI-compatible).
#[derive(Debug)]
pub struct OpenAiRequest {
    pub model: Option<String>,
    pub inputs: Vec<Labeled>,
    pub encoding_format: EncodingFormat,
    pub dimensions: Option<usize>,
    /// `priority`: the scheduling class; `None`: chosen from the inputs.
    pub priority: Option<Class>,
}

impl OpenAiRequest {
    /// Reads a JSON body under its limits.
    pub fn from_json(body: &JsonBody) -> Result<Self, ApiError> {
        Self::from_json_with(&body.bytes, &body.limits)
    }

    pub fn from_json_with(bytes: &[u8], limits: &BodyLimits) -> Result<Self, ApiError> {
        let ctx = ParseCtx::new(limits);
        decode_seed(bytes, &ctx, Top(OpenAiFields::new(&ctx)))
    }
}

/// `/v1/embeddings`' fields as they are read. Unknown fields are skipped, as
/// OpenAI clients may send more (`user`, ...).
struct OpenAiFields<'c, 'l> {
    ctx: &'c ParseCtx<'l>,
    model: Option<String>,
    input: Option<Vec<Labeled>>,
    encoding_format: Option<EncodingFormat>,
    dimensions: Option<usize>,
    priority: Option<Class>,
}

impl<'c, 'l> OpenAiFields<'c, 'l> {
    fn new(ctx: &'c ParseCtx<'l>) -> Self {
        OpenAiFields {
            ctx,
            model: None,
            input: None,
            encoding_format: None,
            dimensions: None,
            priority: None,
        }
    }
}

impl<'de> Fields<'de> for OpenAiFields<'_, '_> {
    type Out = OpenAiRequest;
    const NAMES: &'static [&'static str] = &[
        "model",
        "input",
        "encoding_format",
        "dimensions",
        "embedding_types",
        "priority",
    ];
    const LENIENT: bool = true;
    fn ctx(&self) -> &ParseCtx<'_> {
        self.ctx
    }
    fn field<A: MapAccess<'de>>(&mut self, i: usize, map: &mut A) -> Result<(), A::Error> {
        let ctx = self.ctx;
        match i {
            0 => self.model = opt_string(ctx, map, "model")?,
            1 => {
                self.input = Some(map.next_value_seed(ListSeed {
                    ctx,
                    field: "input",
                    shape: ListShape::OpenAi,
                    max: ctx.limits.max_inputs,
                    noun: "inputs",
                })?)
            }
            2 => self.encoding_format = Some(format(ctx, map, "encoding_format")?),
            3 => self.dimensions = opt_usize(ctx, map, "dimensions")?,
            4 => {
                return Err(ctx.fail(ApiError::bad_request(
                    "embedding_types is not supported by /v1/embeddings (one embedding per data \
                     item): use encoding_format, or /embed for several types at once",
                )))
            }
            _ => self.priority = opt_priority(ctx, map)?,
        }
        Ok(())
    }
    fn finish<E: de::Error>(self) -> Result<OpenAiRequest, E> {
        Ok(OpenAiRequest {
            model: self.model,
            inputs: self.input.ok_or_else(|| missing(self.ctx, "input"))?,
            encoding_format: self.encoding_format.unwrap_or_default(),
            dimensions: self.dimensions,
            priority: self.priority,
        })
    }
}
