//! `POST /embed`: its fields, defaults and multipart form.

use serde::de::{self, MapAccess};

use super::super::body::{decode_seed, part_bool, part_text, JsonBody, Part};
use super::super::error::ApiError;
use super::super::inputs::{parse_role, ListSeed, ListShape};
use super::super::inputs::{BodyLimits, Labeled, ParseCtx};
use super::encoding::{add_type, check_encodings, EncodingFormat};
use super::fields::{boolean, format, missing, opt_priority, opt_string, Fields, Top, TypesSeed};
use super::{pair, parse_priority, read_parts, PartNames};
use crate::batching::Class;
use crate::input::{Input, Role};

/// The multipart fields of `/embed`; `text`, `image` and `embedding_types`
/// may repeat.
const EMBED_PARTS: PartNames = PartNames {
    known: &[
        "model",
        "role",
        "instruction",
        "normalize",
        "truncate",
        "encoding_format",
        "embedding_types",
        "priority",
        "text",
        "image",
    ],
    repeatable: &["text", "image", "embedding_types"],
};

/// `POST /embed`.
#[derive(Debug)]
pub struct EmbedRequest {
    pub model: Option<String>,
    pub inputs: Vec<Labeled>,
    pub normalize: bool,
    pub truncate: bool,
    pub encoding_format: EncodingFormat,
    /// Cohere-style `embedding_types`: when given, the response's
    /// `embeddings` is an object with one array per type.
    pub embedding_types: Option<Vec<EncodingFormat>>,
    /// `priority`: the scheduling class; `None`: chosen from the inputs.
    pub priority: Option<Class>,
}

impl EmbedRequest {
    /// Reads a JSON body under its limits.
    pub fn from_json(body: &JsonBody) -> Result<Self, ApiError> {
        Self::from_json_with(&body.bytes, &body.limits)
    }

    pub fn from_json_with(bytes: &[u8], limits: &BodyLimits) -> Result<Self, ApiError> {
        let ctx = ParseCtx::new(limits);
        decode_seed(bytes, &ctx, Top(EmbedFields::new(&ctx)))
    }

    pub fn from_multipart(parts: Vec<Part>) -> Result<Self, ApiError> {
        let mut model = None;
        let mut role = Role::Candidate;
        let mut instruction = None;
        let mut normalize = true;
        let mut truncate = true;
        let mut encoding_format = None;
        let mut embedding_types: Option<Vec<EncodingFormat>> = None;
        let mut priority = None;
        let mut texts = Vec::new();
        let mut images = Vec::new();
        read_parts(parts, &EMBED_PARTS, |name, part| {
            match name {
                "model" => model = Some(part_text(&part)?),
                "role" => role = parse_role(part_text(&part)?.trim(), "multipart field \"role\"")?,
                "instruction" => instruction = Some(part_text(&part)?),
                "normalize" => normalize = part_bool(&part)?,
                "truncate" => truncate = part_bool(&part)?,
                "encoding_format" => encoding_format = Some(part_text(&part)?.parse()?),
                "embedding_types" => add_type(
                    embedding_types.get_or_insert_with(Vec::new),
                    EncodingFormat::parse_field(&part_text(&part)?, "embedding_types")?,
                )?,
                "priority" => priority = Some(parse_priority(&part_text(&part)?)?),
                "text" => texts.push(part_text(&part)?),
                _ => images.push(part.data.to_vec()),
            }
            Ok(())
        })?;
        let (encoding_format, embedding_types) =
            check_encodings(normalize, encoding_format, embedding_types)?;
        let inputs = pair(texts, images, "text", "image")?
            .into_iter()
            .enumerate()
            .map(|(i, content)| {
                let input = Input::new(content)
                    .with_role(role)
                    .with_instruction(instruction.clone());
                Labeled::new(format!("inputs[{i}]"), input)
            })
            .collect();
        Ok(EmbedRequest {
            model,
            inputs,
            normalize,
            truncate,
            encoding_format,
            embedding_types,
            priority,
        })
    }
}

/// `/embed`'s fields as they are read.
struct EmbedFields<'c, 'l> {
    ctx: &'c ParseCtx<'l>,
    model: Option<String>,
    inputs: Option<Vec<Labeled>>,
    normalize: Option<bool>,
    truncate: Option<bool>,
    encoding_format: Option<EncodingFormat>,
    embedding_types: Option<Vec<EncodingFormat>>,
    priority: Option<Class>,
}

impl<'c, 'l> EmbedFields<'c, 'l> {
    fn new(ctx: &'c ParseCtx<'l>) -> Self {
        EmbedFields {
            ctx,
            model: None,
            inputs: None,
            normalize: None,
            truncate: None,
            encoding_format: None,
            embedding_types: None,
            priority: None,
        }
    }
}

impl<'de> Fields<'de> for EmbedFields<'_, '_> {
    type Out = EmbedRequest;
    const NAMES: &'static [&'static str] = &[
        "model",
        "inputs",
        "normalize",
        "truncate",
        "encoding_format",
        "embedding_types",
        "priority",
    ];
    fn ctx(&self) -> &ParseCtx<'_> {
        self.ctx
    }
    fn field<A: MapAccess<'de>>(&mut self, i: usize, map: &mut A) -> Result<(), A::Error> {
        let ctx = self.ctx;
        match i {
            0 => self.model = opt_string(ctx, map, "model")?,
            1 => {
                self.inputs = Some(map.next_value_seed(ListSeed {
                    ctx,
                    field: "inputs",
                    shape: ListShape::OneOrMany,
                    max: ctx.limits.max_inputs,
                    noun: "inputs",
                })?)
            }
            2 => self.normalize = Some(boolean(ctx, map, "normalize")?),
            3 => self.truncate = Some(boolean(ctx, map, "truncate")?),
            4 => self.encoding_format = Some(format(ctx, map, "encoding_format")?),
            5 => self.embedding_types = Some(map.next_value_seed(TypesSeed { ctx })?),
            _ => self.priority = opt_priority(ctx, map)?,
        }
        Ok(())
    }
    fn finish<E: de::Error>(self) -> Result<EmbedRequest, E> {
        let normalize = self.normalize.unwrap_or(true);
        let (encoding_format, embedding_types) =
            check_encodings(normalize, self.encoding_format, self.embedding_types)
                .map_err(|e| self.ctx.fail(e))?;
        Ok(EmbedRequest {
            model: self.model,
            inputs: self.inputs.ok_or_else(|| missing(self.ctx, "inputs"))?,
            normalize,
            truncate: self.truncate.unwrap_or(true),
            encoding_format,
            embedding_types,
            priority: self.priority,
        })
    }
}
