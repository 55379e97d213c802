//! `POST /embed`: its fields, defaults and multipart form.

use serde::de::{self, MapAccess};

use super::super::body::{part_bool, part_text, Part};
use super::super::error::ApiError;
use super::super::inputs::{parse_role, BodyLimits, Labeled, ListSeed, ListShape, ParseCtx};
use super::encoding::{add_type, check_encodings, EncodingFormat};
use super::fields::{boolean, format, missing, read_json, FieldAt, Fields, TypesSeed};
use super::{pair, read_parts, Common, EndpointRequest, PartNames};
use crate::input::{Input, Role};

/// The multipart fields of `/embed` besides the common ones; `text`,
/// `image` and `embedding_types` may repeat.
const EMBED_PARTS: PartNames = PartNames {
    known: &[
        "role",
        "instruction",
        "normalize",
        "truncate",
        "encoding_format",
        "embedding_types",
        "text",
        "image",
    ],
    repeatable: &["text", "image", "embedding_types"],
};

/// `POST /embed`.
#[derive(Debug)]
pub struct EmbedRequest {
    /// `model` and `priority`.
    pub common: Common,
    pub inputs: Vec<Labeled>,
    pub normalize: bool,
    pub truncate: bool,
    pub encoding_format: EncodingFormat,
    /// Cohere-style `embedding_types`: when given, the response's
    /// `embeddings` is an object with one array per type.
    pub embedding_types: Option<Vec<EncodingFormat>>,
}

impl EndpointRequest for EmbedRequest {
    fn from_json_with(bytes: &[u8], limits: &BodyLimits) -> Result<Self, ApiError> {
        read_json::<EmbedFields>(bytes, limits)
    }

    fn from_multipart(parts: Vec<Part>) -> Result<Self, ApiError> {
        let mut role = Role::Candidate;
        let mut instruction = None;
        let mut normalize = true;
        let mut truncate = true;
        let mut encoding_format = None;
        let mut embedding_types: Option<Vec<EncodingFormat>> = None;
        let mut texts = Vec::new();
        let mut images = Vec::new();
        let common = read_parts(parts, &EMBED_PARTS, |name, part| {
            match name {
                "role" => role = parse_role(part_text(&part)?.trim(), "multipart field \"role\"")?,
                "instruction" => instruction = Some(part_text(&part)?),
                "normalize" => normalize = part_bool(&part)?,
                "truncate" => truncate = part_bool(&part)?,
                "encoding_format" => encoding_format = Some(part_text(&part)?.parse()?),
                "embedding_types" => add_type(
                    embedding_types.get_or_insert_with(Vec::new),
                    EncodingFormat::parse_field(&part_text(&part)?, "embedding_types")?,
                )?,
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
            common,
            inputs,
            normalize,
            truncate,
            encoding_format,
            embedding_types,
        })
    }
}

/// `/embed`'s own fields as they are read.
#[derive(Default)]
struct EmbedFields {
    inputs: Option<Vec<Labeled>>,
    normalize: Option<bool>,
    truncate: Option<bool>,
    encoding_format: Option<EncodingFormat>,
    embedding_types: Option<Vec<EncodingFormat>>,
}

impl Fields for EmbedFields {
    type Out = EmbedRequest;
    const NAMES: &'static [&'static str] = &[
        "inputs",
        "normalize",
        "truncate",
        "encoding_format",
        "embedding_types",
    ];
    fn field<'de, A: MapAccess<'de>>(&mut self, f: FieldAt<'_, '_, A>) -> Result<(), A::Error> {
        let FieldAt { ctx, name, map } = f;
        match name {
            "inputs" => {
                let list = ListSeed::new(ctx, name, ListShape::OneOrMany);
                self.inputs = Some(map.next_value_seed(list)?);
            }
            "normalize" => self.normalize = Some(boolean(ctx, map, name)?),
            "truncate" => self.truncate = Some(boolean(ctx, map, name)?),
            "encoding_format" => self.encoding_format = Some(format(ctx, map, name)?),
            _ => self.embedding_types = Some(map.next_value_seed(TypesSeed { ctx })?),
        }
        Ok(())
    }
    fn finish<E: de::Error>(self, ctx: &ParseCtx<'_>, common: Common) -> Result<EmbedRequest, E> {
        let normalize = self.normalize.unwrap_or(true);
        let (encoding_format, embedding_types) =
            check_encodings(normalize, self.encoding_format, self.embedding_types)
                .map_err(|e| ctx.fail(e))?;
        Ok(EmbedRequest {
            common,
            inputs: self.inputs.ok_or_else(|| missing(ctx, "inputs"))?,
            normalize,
            truncate: self.truncate.unwrap_or(true),
            encoding_format,
            embedding_types,
        })
    }
}
