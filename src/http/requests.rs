//! The requests of `/embed`, `/score` and `/v1/embeddings`, from JSON or
//! multipart, validated into plain values ([`Input`]s with labels and
//! options).
//!
//! Owns field names, defaults and the multipart pairing rule (openapi.yaml
//! `EmbedMultipart`, README "Endpoints"). JSON
//! bodies are read by streaming visitors (see [`super::inputs`]) that check
//! the [`BodyLimits`] as they go, so a body over a limit is refused without
//! building what lies past it. It does not resolve models or embed anything
//! (see [`super::handlers`]).

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::body::{decode_seed, part_bool, part_text, JsonBody, Part};
use super::error::{quote, ApiError};
use super::inputs::{
    parse_role, scalars_are_wrong, BodyLimits, InputSeed, Key, KeySeed, Labeled, ListSeed,
    ListShape, Nested, ParseCtx,
};
use crate::batching::Class;
use crate::input::{Input, Role};

/// How embeddings are written in responses (README "Output encodings"):
/// f32 as JSON numbers or base64, or quantised by [`crate::vector`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    #[default]
    Float,
    Base64,
    Int8,
    Uint8,
    Binary,
    Ubinary,
}

impl EncodingFormat {
    /// Every accepted value, as the messages list them.
    pub const ALLOWED: &'static str =
        "\"float\", \"base64\", \"int8\", \"uint8\", \"binary\" or \"ubinary\"";

    /// Whether the encoding uses a fixed scale that needs unit vectors
    /// (`int8`, `uint8`); the sign bits of `binary`/`ubinary` do not.
    pub fn needs_normalized(self) -> bool {
        matches!(self, EncodingFormat::Int8 | EncodingFormat::Uint8)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EncodingFormat::Float => "float",
            EncodingFormat::Base64 => "base64",
            EncodingFormat::Int8 => "int8",
            EncodingFormat::Uint8 => "uint8",
            EncodingFormat::Binary => "binary",
            EncodingFormat::Ubinary => "ubinary",
        }
    }
}

impl EncodingFormat {
    /// Parses the value of `field` (`encoding_format`, `embedding_types`):
    /// 422 naming the field and the allowed values.
    pub fn parse_field(s: &str, field: &str) -> Result<Self, ApiError> {
        match s.trim() {
            "float" => Ok(EncodingFormat::Float),
            "base64" => Ok(EncodingFormat::Base64),
            "int8" => Ok(EncodingFormat::Int8),
            "uint8" => Ok(EncodingFormat::Uint8),
            "binary" => Ok(EncodingFormat::Binary),
            "ubinary" => Ok(EncodingFormat::Ubinary),
            other => Err(ApiError::unprocessable(format!(
                "{field}: expected {}, found {}",
                EncodingFormat::ALLOWED,
                quote(other)
            ))),
        }
    }
}

impl std::str::FromStr for EncodingFormat {
    type Err = ApiError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EncodingFormat::parse_field(s, "encoding_format")
    }
}

/// Checks a Cohere-style `embedding_types` list as it grows: no value twice
/// (so it never holds more than the six encodings).
fn add_type(types: &mut Vec<EncodingFormat>, f: EncodingFormat) -> Result<(), ApiError> {
    if types.contains(&f) {
        return Err(ApiError::unprocessable(format!(
            "embedding_types: {:?} is given more than once",
            f.as_str()
        )));
    }
    types.push(f);
    Ok(())
}

/// The encodings of an `/embed` request: `encoding_format` (one) or
/// `embedding_types` (several, Cohere's field), not both; each checked
/// against `normalize`.
fn check_encodings(
    normalize: bool,
    format: Option<EncodingFormat>,
    types: Option<Vec<EncodingFormat>>,
) -> Result<(EncodingFormat, Option<Vec<EncodingFormat>>), ApiError> {
    match (format, types) {
        (Some(_), Some(_)) => Err(ApiError::unprocessable(
            "give encoding_format (one encoding, embeddings as an array) or embedding_types \
             (several, embeddings as an object keyed by type), not both",
        )),
        (_, Some(types)) if types.is_empty() => Err(ApiError::unprocessable(format!(
            "embedding_types is empty: give at least one of {}",
            EncodingFormat::ALLOWED
        ))),
        (format, types) => {
            let format = format.unwrap_or_default();
            check_encoding(normalize, format, "encoding_format")?;
            for t in types.iter().flatten() {
                check_encoding(normalize, *t, "embedding_types")?;
            }
            Ok((format, types))
        }
    }
}

/// `int8`/`uint8` scale unit vectors by a fixed 127; with `normalize=false`
/// there is no bound to scale by, so the pair is refused (README "Output
/// encodings").
fn check_encoding(normalize: bool, format: EncodingFormat, field: &str) -> Result<(), ApiError> {
    if !normalize && format.needs_normalized() {
        return Err(ApiError::unprocessable(format!(
            "{field} {:?} needs normalize=true: int8 values are the unit vector's \
             components times 127; use \"float\", \"base64\", \"binary\" or \"ubinary\" \
             for unnormalised vectors",
            format.as_str()
        )));
    }
    Ok(())
}

/// `POST /embed`.
#[derive(Debug)]
pub struct EmbedRequest {
    pub model: Option<String>,
    pub inputs: Labeled,
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
        let mut req = decode_seed(bytes, &ctx, Top(EmbedFields::new(&ctx)))?;
        ctx.attach_urls(&mut req.inputs);
        Ok(req)
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
        let mut seen = Vec::new();
        for part in parts {
            let name = part.name.clone();
            if !matches!(name.as_str(), "text" | "image" | "embedding_types") {
                once(&mut seen, &name)?;
            }
            match name.as_str() {
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
                "image" => images.push(part.data.to_vec()),
                other => return Err(unknown_part(other, EMBED_PARTS)),
            }
        }
        let (encoding_format, embedding_types) =
            check_encodings(normalize, encoding_format, embedding_types)?;
        let mut inputs = Labeled::default();
        for (i, input) in pair(texts, images, "text", "image")?
            .into_iter()
            .enumerate()
        {
            inputs.push(
                Input {
                    instruction: instruction.clone(),
                    role,
                    ..input
                },
                format!("inputs[{i}]"),
            );
        }
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

const EMBED_PARTS: &str =
    "model, role, instruction, normalize, truncate, encoding_format, embedding_types, priority, \
     text, image";
const SCORE_PARTS: &str =
    "model, query_text, query_image, instruction, candidate_text, candidate_image, top_k, priority";

/// The `priority` field's value: "high", "normal" or "low".
fn parse_priority(v: &str) -> Result<Class, ApiError> {
    v.parse().map_err(|_| {
        ApiError::bad_request(format!(
            "priority: expected \"high\", \"normal\" or \"low\", found {}",
            quote(v)
        ))
    })
}

fn opt_priority<'de, A: MapAccess<'de>>(
    ctx: &ParseCtx,
    map: &mut A,
) -> Result<Option<Class>, A::Error> {
    opt_string(ctx, map, "priority")?
        .map(|v| parse_priority(&v).map_err(|e| ctx.fail(e)))
        .transpose()
}

fn unknown_part(name: &str, known: &str) -> ApiError {
    ApiError::bad_request(format!(
        "unknown multipart field {}; expected one of: {known}",
        quote(name)
    ))
}

fn once(seen: &mut Vec<String>, name: &str) -> Result<(), ApiError> {
    if seen.iter().any(|s| s == name) {
        return Err(ApiError::bad_request(format!(
            "multipart field {} is given more than once",
            quote(name)
        )));
    }
    seen.push(name.to_string());
    Ok(())
}

/// The multipart pairing of openapi.yaml and the README's `/embed` section:
/// m texts alone, k images alone, or k = m composed pairs.
fn pair(
    texts: Vec<String>,
    images: Vec<Vec<u8>>,
    text_field: &str,
    image_field: &str,
) -> Result<Vec<Input>, ApiError> {
    let (m, k) = (texts.len(), images.len());
    if k == 0 {
        Ok(texts.into_iter().map(Input::text).collect())
    } else if m == 0 {
        Ok(images.into_iter().map(Input::image).collect())
    } else if k == m {
        Ok(texts
            .into_iter()
            .zip(images)
            .map(|(t, i)| Input {
                text: Some(t),
                image: Some(i),
                ..Default::default()
            })
            .collect())
    } else {
        Err(ApiError::unprocessable(format!(
            "multipart: {m} {text_field} field(s) and {k} {image_field} part(s): send only texts, \
             only images, or as many of each (paired in order into composed inputs)"
        )))
    }
}

/// `POST /score`.
#[derive(Debug)]
pub struct ScoreRequest {
    pub model: Option<String>,
    /// The query first, then the candidates.
    pub inputs: Labeled,
    pub top_k: Option<usize>,
    /// `priority`: the scheduling class; `None`: chosen from the inputs.
    pub priority: Option<Class>,
}

impl ScoreRequest {
    /// Reads a JSON body under its limits.
    pub fn from_json(body: &JsonBody) -> Result<Self, ApiError> {
        Self::from_json_with(&body.bytes, &body.limits)
    }

    pub fn from_json_with(bytes: &[u8], limits: &BodyLimits) -> Result<Self, ApiError> {
        let ctx = ParseCtx::new(limits);
        let mut req = decode_seed(bytes, &ctx, Top(ScoreFields::new(&ctx)))?;
        ctx.attach_urls(&mut req.inputs);
        Ok(req)
    }

    pub fn from_multipart(parts: Vec<Part>) -> Result<Self, ApiError> {
        let mut model = None;
        let mut query_text = None;
        let mut query_image = None;
        let mut instruction = None;
        let mut top_k = None;
        let mut priority = None;
        let mut texts = Vec::new();
        let mut images = Vec::new();
        let mut seen = Vec::new();
        for part in parts {
            let name = part.name.clone();
            if !matches!(name.as_str(), "candidate_text" | "candidate_image") {
                once(&mut seen, &name)?;
            }
            match name.as_str() {
                "model" => model = Some(part_text(&part)?),
                "query_text" => query_text = Some(part_text(&part)?),
                "query_image" => query_image = Some(part.data.to_vec()),
                "instruction" => instruction = Some(part_text(&part)?),
                "top_k" => {
                    let t = part_text(&part)?;
                    top_k = Some(t.trim().parse::<usize>().map_err(|_| {
                        ApiError::bad_request(format!(
                            "multipart field \"top_k\": expected a non-negative integer, found {}",
                            quote(&t)
                        ))
                    })?)
                }
                "priority" => priority = Some(parse_priority(&part_text(&part)?)?),
                "candidate_text" => texts.push(part_text(&part)?),
                "candidate_image" => images.push(part.data.to_vec()),
                other => return Err(unknown_part(other, SCORE_PARTS)),
            }
        }
        if query_text.is_none() && query_image.is_none() {
            return Err(ApiError::unprocessable(
                "query: empty input: give a query_text field, a query_image part or both",
            ));
        }
        let mut inputs = Labeled::default();
        inputs.push(
            Input {
                text: query_text,
                image: query_image,
                instruction,
                role: Role::Query,
            },
            "query".into(),
        );
        let candidates = pair(texts, images, "candidate_text", "candidate_image")?;
        for (i, c) in candidates.into_iter().enumerate() {
            inputs.push(c, format!("candidates[{i}]"));
        }
        Ok(ScoreRequest {
            model,
            inputs,
            top_k,
            priority,
        })
    }
}

/// `POST /v1/embeddings` (OpenAI-compatible).
#[derive(Debug)]
pub struct OpenAiRequest {
    pub model: Option<String>,
    pub inputs: Labeled,
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
        let mut req = decode_seed(bytes, &ctx, Top(OpenAiFields::new(&ctx)))?;
        ctx.attach_urls(&mut req.inputs);
        Ok(req)
    }
}

// ---- JSON bodies: one streaming visitor per request object ----------------

/// The fields of one request object, read one by one.
trait Fields<'de>: Sized {
    type Out;
    const NAMES: &'static [&'static str];
    /// Whether fields not in `NAMES` are skipped (else refused).
    const LENIENT: bool = false;
    fn ctx(&self) -> &ParseCtx<'_>;
    /// Reads the value of field `NAMES[i]`.
    fn field<A: MapAccess<'de>>(&mut self, i: usize, map: &mut A) -> Result<(), A::Error>;
    fn finish<E: de::Error>(self) -> Result<Self::Out, E>;
}

/// Reads a request object through its [`Fields`].
struct Top<F>(F);

impl<'de, F: Fields<'de>> DeserializeSeed<'de> for Top<F> {
    type Value = F::Out;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<F::Out, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, F: Fields<'de>> Top<F> {
    fn wrong_type<E: de::Error>(&self, found: &str) -> E {
        self.0.ctx().fail(ApiError::bad_request(format!(
            "invalid request body: expected a JSON object, found {found}"
        )))
    }
}

impl<'de, F: Fields<'de>> Visitor<'de> for Top<F> {
    type Value = F::Out;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    scalars_are_wrong!();
    fn visit_str<E: de::Error>(self, _: &str) -> Result<F::Out, E> {
        Err(self.wrong_type("a string"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<F::Out, A::Error> {
        Err(self.wrong_type("an array"))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<F::Out, A::Error> {
        let mut fields = self.0;
        let mut seen = vec![false; F::NAMES.len()];
        while let Some(key) = map.next_key_seed(KeySeed(F::NAMES))? {
            match key {
                Key::Known(i) => {
                    if std::mem::replace(&mut seen[i], true) {
                        return Err(fields.ctx().fail(ApiError::bad_request(format!(
                            "invalid request body: duplicate field `{}`",
                            F::NAMES[i]
                        ))));
                    }
                    fields.field(i, &mut map)?;
                }
                Key::Unknown(_) if F::LENIENT => {
                    map.next_value::<IgnoredAny>()?;
                }
                Key::Unknown(k) => {
                    let expected = F::NAMES
                        .iter()
                        .map(|n| format!("`{n}`"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    return Err(fields.ctx().fail(ApiError::bad_request(format!(
                        "invalid request body: unknown field `{k}`, expected one of {expected}"
                    ))));
                }
            }
        }
        fields.finish()
    }
}

fn missing<E: de::Error>(ctx: &ParseCtx, name: &str) -> E {
    ctx.fail(ApiError::bad_request(format!(
        "invalid request body: missing field `{name}`"
    )))
}

/// A scalar request field (`model`, `normalize`, `top_k`, ...), read with a
/// message naming the field and never echoing more than a cut string.
#[derive(Clone, Copy)]
enum Scalar {
    OptString,
    Bool,
    Format,
    OptUsize,
}

enum ScalarValue {
    None,
    String(String),
    Bool(bool),
    Format(EncodingFormat),
    Usize(usize),
}

struct ScalarSeed<'c, 'l> {
    ctx: &'c ParseCtx<'l>,
    name: &'static str,
    kind: Scalar,
}

impl<'de> DeserializeSeed<'de> for ScalarSeed<'_, '_> {
    type Value = ScalarValue;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<ScalarValue, D::Error> {
        d.deserialize_any(self)
    }
}

impl ScalarSeed<'_, '_> {
    fn wrong_type<E: de::Error>(&self, found: &str) -> E {
        let expected = match self.kind {
            Scalar::OptString => "a string",
            Scalar::Bool => "true or false",
            Scalar::Format => EncodingFormat::ALLOWED,
            Scalar::OptUsize => "a non-negative integer",
        };
        self.ctx.fail(ApiError::bad_request(format!(
            "field {}: expected {expected}, found {found}",
            self.name
        )))
    }
}

impl<'de> Visitor<'de> for ScalarSeed<'_, '_> {
    type Value = ScalarValue;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "the value of {}", self.name)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<ScalarValue, E> {
        match self.kind {
            Scalar::Bool => Ok(ScalarValue::Bool(v)),
            _ => Err(self.wrong_type("a boolean")),
        }
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<ScalarValue, E> {
        match (self.kind, usize::try_from(v)) {
            (Scalar::OptUsize, Ok(n)) => Ok(ScalarValue::Usize(n)),
            _ => Err(self.wrong_type("a number")),
        }
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<ScalarValue, E> {
        Err(self.wrong_type("a negative number"))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<ScalarValue, E> {
        Err(self.wrong_type("a number with a fraction"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<ScalarValue, E> {
        match self.kind {
            Scalar::OptString | Scalar::OptUsize => Ok(ScalarValue::None),
            _ => Err(self.wrong_type("null")),
        }
    }
    fn visit_none<E: de::Error>(self) -> Result<ScalarValue, E> {
        self.visit_unit()
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<ScalarValue, E> {
        match self.kind {
            Scalar::OptString => Ok(ScalarValue::String(v.to_owned())),
            Scalar::Format => EncodingFormat::parse_field(v, self.name)
                .map(ScalarValue::Format)
                .map_err(|e| self.ctx.fail(e)),
            _ => Err(self.wrong_type(&format!("the string {}", quote(v)))),
        }
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<ScalarValue, A::Error> {
        Err(self.wrong_type("an array"))
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<ScalarValue, A::Error> {
        Err(self.wrong_type("an object"))
    }
}

fn scalar<'de, A: MapAccess<'de>>(
    ctx: &ParseCtx,
    map: &mut A,
    name: &'static str,
    kind: Scalar,
) -> Result<ScalarValue, A::Error> {
    map.next_value_seed(ScalarSeed { ctx, name, kind })
}

fn opt_string<'de, A: MapAccess<'de>>(
    ctx: &ParseCtx,
    map: &mut A,
    name: &'static str,
) -> Result<Option<String>, A::Error> {
    Ok(match scalar(ctx, map, name, Scalar::OptString)? {
        ScalarValue::String(s) => Some(s),
        _ => None,
    })
}

fn boolean<'de, A: MapAccess<'de>>(
    ctx: &ParseCtx,
    map: &mut A,
    name: &'static str,
) -> Result<bool, A::Error> {
    Ok(matches!(
        scalar(ctx, map, name, Scalar::Bool)?,
        ScalarValue::Bool(true)
    ))
}

fn format<'de, A: MapAccess<'de>>(
    ctx: &ParseCtx,
    map: &mut A,
    name: &'static str,
) -> Result<EncodingFormat, A::Error> {
    Ok(match scalar(ctx, map, name, Scalar::Format)? {
        ScalarValue::Format(f) => f,
        _ => EncodingFormat::default(),
    })
}

fn opt_usize<'de, A: MapAccess<'de>>(
    ctx: &ParseCtx,
    map: &mut A,
    name: &'static str,
) -> Result<Option<usize>, A::Error> {
    Ok(match scalar(ctx, map, name, Scalar::OptUsize)? {
        ScalarValue::Usize(n) => Some(n),
        _ => None,
    })
}

/// Cohere's `embedding_types`: a JSON array of distinct encodings (see
/// [`check_encodings`] for the rest of the rule).
struct TypesSeed<'c, 'l> {
    ctx: &'c ParseCtx<'l>,
}

impl<'de> DeserializeSeed<'de> for TypesSeed<'_, '_> {
    type Value = Vec<EncodingFormat>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl TypesSeed<'_, '_> {
    fn wrong_type<E: de::Error>(&self, found: &str) -> E {
        self.ctx.fail(ApiError::bad_request(format!(
            "field embedding_types: expected an array of {}, found {found}",
            EncodingFormat::ALLOWED
        )))
    }
}

impl<'de> Visitor<'de> for TypesSeed<'_, '_> {
    type Value = Vec<EncodingFormat>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of encodings")
    }
    scalars_are_wrong!();
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Err(self.wrong_type("a string"))
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Err(self.wrong_type("an object"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut types = Vec::new();
        while let Some(v) = seq.next_element_seed(ScalarSeed {
            ctx: self.ctx,
            name: "embedding_types",
            kind: Scalar::Format,
        })? {
            if let ScalarValue::Format(f) = v {
                add_type(&mut types, f).map_err(|e| self.ctx.fail(e))?;
            }
        }
        Ok(types)
    }
}

/// `/embed`'s fields as they are read.
struct EmbedFields<'c, 'l> {
    ctx: &'c ParseCtx<'l>,
    model: Option<String>,
    inputs: Option<Labeled>,
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

/// `/score`'s fields as they are read.
struct ScoreFields<'c, 'l> {
    ctx: &'c ParseCtx<'l>,
    model: Option<String>,
    query: Option<Input>,
    candidates: Option<Labeled>,
    top_k: Option<usize>,
    priority: Option<Class>,
}

impl<'c, 'l> ScoreFields<'c, 'l> {
    fn new(ctx: &'c ParseCtx<'l>) -> Self {
        ScoreFields {
            ctx,
            model: None,
            query: None,
            candidates: None,
            top_k: None,
            priority: None,
        }
    }
}

impl<'de> Fields<'de> for ScoreFields<'_, '_> {
    type Out = ScoreRequest;
    const NAMES: &'static [&'static str] = &["model", "query", "candidates", "top_k", "priority"];
    fn ctx(&self) -> &ParseCtx<'_> {
        self.ctx
    }
    fn field<A: MapAccess<'de>>(&mut self, i: usize, map: &mut A) -> Result<(), A::Error> {
        let ctx = self.ctx;
        match i {
            0 => self.model = opt_string(ctx, map, "model")?,
            1 => {
                self.query = Some(map.next_value_seed(InputSeed {
                    ctx,
                    at: "query",
                    nested: Nested::Query,
                })?)
            }
            2 => {
                // The query is one of the request's inputs.
                let max = ctx.limits.max_inputs.saturating_sub(1);
                self.candidates = Some(map.next_value_seed(ListSeed {
                    ctx,
                    field: "candidates",
                    shape: ListShape::ArrayOnly,
                    max,
                    noun: "candidates",
                })?)
            }
            3 => self.top_k = opt_usize(ctx, map, "top_k")?,
            _ => self.priority = opt_priority(ctx, map)?,
        }
        Ok(())
    }
    fn finish<E: de::Error>(self) -> Result<ScoreRequest, E> {
        let mut query = self.query.ok_or_else(|| missing(self.ctx, "query"))?;
        let candidates = self
            .candidates
            .ok_or_else(|| missing(self.ctx, "candidates"))?;
        query.role = Role::Query;
        let mut inputs = Labeled::default();
        inputs.push(query, "query".into());
        for (mut c, at) in candidates.inputs.into_iter().zip(candidates.labels) {
            c.role = Role::Candidate;
            inputs.push(c, at);
        }
        Ok(ScoreRequest {
            model: self.model,
            inputs,
            top_k: self.top_k,
            priority: self.priority,
        })
    }
}

/// `/v1/embeddings`' fields as they are read. Unknown fields are skipped, as
/// OpenAI clients may send more (`user`, ...).
struct OpenAiFields<'c, 'l> {
    ctx: &'c ParseCtx<'l>,
    model: Option<String>,
    input: Option<Labeled>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::inputs::parsed_inputs;
    use axum::body::Bytes;
    use std::time::Instant;

    fn embed(b: &[u8]) -> Result<EmbedRequest, ApiError> {
        EmbedRequest::from_json_with(b, &BodyLimits::NONE)
    }

    fn score(b: &[u8]) -> Result<ScoreRequest, ApiError> {
        ScoreRequest::from_json_with(b, &BodyLimits::NONE)
    }

    fn openai(b: &[u8]) -> Result<OpenAiRequest, ApiError> {
        OpenAiRequest::from_json_with(b, &BodyLimits::NONE)
    }

    const LIMITS: BodyLimits = BodyLimits {
        max_inputs: 256,
        max_text_chars: 1000,
        max_image_bytes: 3000,
    };

    #[test]
    fn an_array_over_the_input_limit_stops_at_the_limit() {
        // 16 MiB of empty strings: 5.6 M items.
        let mut body = b"{\"inputs\": [".to_vec();
        while body.len() < 16 << 20 {
            body.extend_from_slice(b"\"\",");
        }
        body.extend_from_slice(b"\"\"]}");
        let before = parsed_inputs();
        let start = Instant::now();
        let e = EmbedRequest::from_json_with(&body, &LIMITS).unwrap_err();
        let built = parsed_inputs() - before;
        assert_eq!(e.status.as_u16(), 413, "{}", e.message);
        assert!(
            e.message
                .contains("inputs: more than 256 inputs, over the limit of 256 inputs per request"),
            "{}",
            e.message
        );
        // Only the first 256 were built (other tests may build a few meanwhile).
        assert!(built < 2_000, "{built} inputs built");
        assert!(start.elapsed().as_secs() < 5, "{:?}", start.elapsed());
        // The same through /score (the query counts) and /v1/embeddings.
        let mut body = b"{\"query\": \"q\", \"candidates\": [".to_vec();
        body.extend(std::iter::repeat_n(&b"\"c\","[..], 300).flatten());
        body.extend_from_slice(b"\"c\"]}");
        let e = ScoreRequest::from_json_with(&body, &LIMITS).unwrap_err();
        assert_eq!(e.status.as_u16(), 413);
        assert!(
            e.message.contains("more than 255 candidates"),
            "{}",
            e.message
        );
        let mut body = b"{\"input\": [".to_vec();
        body.extend(std::iter::repeat_n(&b"\"c\","[..], 300).flatten());
        body.extend_from_slice(b"\"c\"]}");
        let e = OpenAiRequest::from_json_with(&body, &LIMITS).unwrap_err();
        assert_eq!(e.status.as_u16(), 413);
        // Exactly at the limit is fine.
        let items = vec!["\"a\""; 256].join(",");
        let r =
            EmbedRequest::from_json_with(format!("{{\"inputs\": [{items}]}}").as_bytes(), &LIMITS);
        assert_eq!(r.unwrap().inputs.len(), 256);
    }

    #[test]
    fn texts_and_images_are_measured_while_read() {
        let long = "é".repeat(1001);
        for body in [
            serde_json::json!({"inputs": [long]}),
            serde_json::json!({"inputs": [{"text": long}]}),
            serde_json::json!({"inputs": [{"text": "a", "instruction": long}]}),
            serde_json::json!({"input": long}),
        ] {
            let bytes = serde_json::to_vec(&body).unwrap();
            let e = if body.get("input").is_some() {
                OpenAiRequest::from_json_with(&bytes, &LIMITS).unwrap_err()
            } else {
                EmbedRequest::from_json_with(&bytes, &LIMITS).unwrap_err()
            };
            assert_eq!(e.status.as_u16(), 413, "{}", e.message);
            assert!(
                e.message.contains("1001 characters long, over the limit of 1000 characters (server.max_text_chars)"),
                "{}",
                e.message
            );
        }
        // 1000 characters of 2 bytes each are within the limit.
        let ok = serde_json::to_vec(&serde_json::json!({"inputs": ["é".repeat(1000)]})).unwrap();
        assert!(EmbedRequest::from_json_with(&ok, &LIMITS).is_ok());
        let b64 = |n: usize| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(vec![7u8; n])
        };
        let big =
            serde_json::to_vec(&serde_json::json!({"inputs": [{"image": b64(3001)}]})).unwrap();
        let e = EmbedRequest::from_json_with(&big, &LIMITS).unwrap_err();
        assert_eq!(e.status.as_u16(), 413);
        assert!(
            e.message.contains("inputs[0].image: the image is"),
            "{}",
            e.message
        );
        assert!(
            e.message.contains("server.max_image_bytes"),
            "{}",
            e.message
        );
        let ok =
            serde_json::to_vec(&serde_json::json!({"inputs": [{"image": b64(3000)}]})).unwrap();
        assert!(EmbedRequest::from_json_with(&ok, &LIMITS).is_ok());
    }

    #[test]
    fn messages_never_echo_bulk_input() {
        let huge = "x".repeat(4 << 20);
        let cases = [
            serde_json::json!({"inputs": "a", "encoding_format": huge}),
            serde_json::json!({"inputs": "a", "normalize": huge}),
            serde_json::json!({"inputs": [{"text": "a", "role": huge}]}),
            serde_json::json!({"inputs": [{"text": "a", huge.clone(): 1}]}),
            serde_json::json!({"inputs": "a", huge.clone(): 1}),
            serde_json::json!({"inputs": [{"image": {huge.clone(): 1}}]}),
        ];
        for body in cases {
            let bytes = serde_json::to_vec(&body).unwrap();
            let e = embed(&bytes).unwrap_err();
            // A well-typed but unknown encoding_format is 422, the rest 400.
            let status = if body.get("encoding_format").is_some() {
                422
            } else {
                400
            };
            assert_eq!(e.status.as_u16(), status);
            assert!(e.message.len() < 400, "{} bytes", e.message.len());
            assert!(
                e.message.contains("(cut, 4194304 bytes in all)"),
                "{}",
                e.message
            );
        }
    }

    #[test]
    fn duplicate_and_wrongly_typed_fields_are_named() {
        let e = embed(br#"{"inputs": "a", "inputs": "b"}"#).unwrap_err();
        assert!(
            e.message.contains("duplicate field `inputs`"),
            "{}",
            e.message
        );
        let e = embed(br#"{"inputs": [{"text": "a", "text": "b"}]}"#).unwrap_err();
        assert!(
            e.message
                .contains("inputs[0]: field \"text\" is given more than once"),
            "{}",
            e.message
        );
        let e = embed(br#"[1]"#).unwrap_err();
        assert!(
            e.message.contains("expected a JSON object, found an array"),
            "{}",
            e.message
        );
        let e = embed(br#"{"normalize": true}"#).unwrap_err();
        assert!(
            e.message.contains("missing field `inputs`"),
            "{}",
            e.message
        );
        let e = score(br#"{"query": "a", "candidates": ["b"], "top_k": -1}"#).unwrap_err();
        assert!(
            e.message
                .contains("field top_k: expected a non-negative integer"),
            "{}",
            e.message
        );
        let e = embed(br#"{"inputs": [{"image": {"url": 5}}]}"#).unwrap_err();
        assert!(
            e.message
                .contains("inputs[0].image.url: expected a string, found a number"),
            "{}",
            e.message
        );
        let e = embed(br#"{"inputs": [["a"]]}"#).unwrap_err();
        assert!(
            e.message
                .contains("inputs[0]: expected a string or an object"),
            "{}",
            e.message
        );
        let e = embed(br#"{"inputs": ["a"] "#).unwrap_err();
        assert!(e.message.starts_with("malformed JSON"), "{}", e.message);
    }

    fn part(name: &str, data: &[u8]) -> Part {
        Part {
            name: name.into(),
            file_name: None,
            data: Bytes::copy_from_slice(data),
        }
    }

    #[test]
    fn embed_json_defaults() {
        let r = embed(br#"{"inputs": ["a", "b"]}"#).unwrap();
        assert!(r.normalize && r.truncate && r.model.is_none());
        assert_eq!(r.encoding_format, EncodingFormat::Float);
        assert_eq!(r.inputs.len(), 2);
        let e = embed(br#"{"inputs": "a", "encoding_format": "hex"}"#).unwrap_err();
        assert_eq!(e.status.as_u16(), 422, "{}", e.message);
        assert!(
            e.message.contains("encoding_format: expected \"float\", \"base64\", \"int8\", \"uint8\", \"binary\" or \"ubinary\", found \"hex\""),
            "{}",
            e.message
        );
        let e = embed(br#"{"inputs": "a", "encoding_format": 8}"#).unwrap_err();
        assert_eq!(e.status.as_u16(), 400, "{}", e.message);
        assert!(
            e.message
                .contains("field encoding_format: expected \"float\""),
            "{}",
            e.message
        );
        let e = embed(br#"{"inputs": "a", "normalize": "yes"}"#).unwrap_err();
        assert!(e.message.contains("field normalize"), "{}", e.message);
        let e = embed(br#"{"input": "a"}"#).unwrap_err();
        assert_eq!(e.status.as_u16(), 400);
    }

    #[test]
    fn quantised_encodings_parse_and_int8_needs_normalize() {
        for (name, f) in [
            ("int8", EncodingFormat::Int8),
            ("uint8", EncodingFormat::Uint8),
            ("binary", EncodingFormat::Binary),
            ("ubinary", EncodingFormat::Ubinary),
        ] {
            let body = format!(r#"{{"inputs": "a", "encoding_format": "{name}"}}"#);
            assert_eq!(embed(body.as_bytes()).unwrap().encoding_format, f);
            let body = format!(r#"{{"input": "a", "encoding_format": "{name}"}}"#);
            assert_eq!(openai(body.as_bytes()).unwrap().encoding_format, f);
            let r = EmbedRequest::from_multipart(vec![
                part("text", b"a"),
                part("encoding_format", name.as_bytes()),
            ]);
            assert_eq!(r.unwrap().encoding_format, f);
            // Without normalisation only the sign-bit encodings are allowed.
            let body =
                format!(r#"{{"inputs": "a", "normalize": false, "encoding_format": "{name}"}}"#);
            let multipart = EmbedRequest::from_multipart(vec![
                part("normalize", b"false"),
                part("text", b"a"),
                part("encoding_format", name.as_bytes()),
            ]);
            for r in [embed(body.as_bytes()), multipart] {
                if f.needs_normalized() {
                    let e = r.unwrap_err();
                    assert_eq!(e.status.as_u16(), 422, "{}", e.message);
                    assert!(
                        e.message
                            .contains(&format!("encoding_format \"{name}\" needs normalize=true")),
                        "{}",
                        e.message
                    );
                } else {
                    assert!(!r.unwrap().normalize);
                }
            }
        }
        let e = EmbedRequest::from_multipart(vec![part("encoding_format", b"int4")]).unwrap_err();
        assert_eq!(e.status.as_u16(), 422);
        assert!(
            e.message.contains("\"ubinary\", found \"int4\""),
            "{}",
            e.message
        );
        let e = openai(br#"{"input": "a", "encoding_format": "float16"}"#).unwrap_err();
        assert_eq!(e.status.as_u16(), 422);
    }

    #[test]
    fn embedding_types_is_a_list_of_distinct_encodings() {
        let r =
            embed(br#"{"inputs": "a", "embedding_types": ["int8", "float", "ubinary"]}"#).unwrap();
        use EncodingFormat::*;
        assert_eq!(r.embedding_types, Some(vec![Int8, Float, Ubinary]));
        assert_eq!(embed(br#"{"inputs": "a"}"#).unwrap().embedding_types, None);
        let cases: [(&[u8], u16, &str); 7] = [
            (br#"{"inputs": "a", "embedding_types": []}"#, 422, "embedding_types is empty"),
            (
                br#"{"inputs": "a", "embedding_types": ["int8", "int8"]}"#,
                422,
                "embedding_types: \"int8\" is given more than once",
            ),
            (
                br#"{"inputs": "a", "embedding_types": ["int4"]}"#,
                422,
                "embedding_types: expected \"float\", \"base64\", \"int8\", \"uint8\", \"binary\" or \"ubinary\", found \"int4\"",
            ),
            (
                br#"{"inputs": "a", "embedding_types": "int8"}"#,
                400,
                "field embedding_types: expected an array of",
            ),
            (br#"{"inputs": "a", "embedding_types": [8]}"#, 400, "field embedding_types"),
            (
                br#"{"inputs": "a", "embedding_types": ["int8"], "encoding_format": "float"}"#,
                422,
                "not both",
            ),
            (
                br#"{"inputs": "a", "normalize": false, "embedding_types": ["binary", "uint8"]}"#,
                422,
                "embedding_types \"uint8\" needs normalize=true",
            ),
        ];
        for (body, status, needle) in cases {
            let e = embed(body).unwrap_err();
            assert_eq!(e.status.as_u16(), status, "{}", e.message);
            assert!(e.message.contains(needle), "{}", e.message);
        }
        // Multipart: repeated fields.
        let r = EmbedRequest::from_multipart(vec![
            part("text", b"a"),
            part("embedding_types", b"binary"),
            part("embedding_types", b"float"),
        ])
        .unwrap();
        assert_eq!(r.embedding_types, Some(vec![Binary, Float]));
        let e = EmbedRequest::from_multipart(vec![
            part("embedding_types", b"binary"),
            part("embedding_types", b"binary"),
        ])
        .unwrap_err();
        assert!(e.message.contains("more than once"), "{}", e.message);
        // /v1/embeddings has one embedding per item: refused, not ignored.
        let e = openai(br#"{"input": "a", "embedding_types": ["int8"]}"#).unwrap_err();
        assert_eq!(e.status.as_u16(), 400);
        assert!(
            e.message.contains("embedding_types is not supported"),
            "{}",
            e.message
        );
    }

    #[test]
    fn multipart_pairs_texts_and_images() {
        let r = EmbedRequest::from_multipart(vec![
            part("text", b"a"),
            part("image", b"img1"),
            part("text", b"b"),
            part("image", b"img2"),
            part("role", b"query"),
            part("normalize", b"false"),
        ])
        .unwrap();
        assert_eq!(r.inputs.len(), 2);
        assert!(!r.normalize);
        let second = &r.inputs.inputs[1];
        assert_eq!(second.text.as_deref(), Some("b"));
        assert_eq!(second.image.as_deref(), Some(&b"img2"[..]));
        assert_eq!(second.role, Role::Query);

        let e = EmbedRequest::from_multipart(vec![
            part("text", b"a"),
            part("text", b"b"),
            part("image", b"i"),
        ])
        .unwrap_err();
        assert_eq!(e.status.as_u16(), 422);
        assert!(
            e.message.contains("2 text") && e.message.contains("1 image"),
            "{}",
            e.message
        );
        let e = EmbedRequest::from_multipart(vec![part("pic", b"x")]).unwrap_err();
        assert_eq!(e.status.as_u16(), 400);
        let e = EmbedRequest::from_multipart(vec![part("model", b"a"), part("model", b"b")])
            .unwrap_err();
        assert!(e.message.contains("more than once"));
    }

    #[test]
    fn score_sets_roles_and_checks_shapes() {
        let r = score(
            br#"{"query": {"text": "q", "role": "candidate"}, "candidates": ["a", {"text": "b", "role": "query"}], "top_k": 1}"#,
        )
        .unwrap();
        assert_eq!(r.inputs.inputs[0].role, Role::Query);
        assert_eq!(r.inputs.inputs[2].role, Role::Candidate);
        assert_eq!(
            r.inputs.labels,
            vec!["query", "candidates[0]", "candidates[1]"]
        );
        assert_eq!(r.top_k, Some(1));
        let e = score(br#"{"query": ["a"], "candidates": ["b"]}"#).unwrap_err();
        assert_eq!(e.status.as_u16(), 400);
        let e = score(br#"{"query": "a", "candidates": "b"}"#).unwrap_err();
        assert!(e.message.contains("candidates"), "{}", e.message);
        let r = ScoreRequest::from_multipart(vec![
            part("query_text", b"q"),
            part("candidate_image", b"i1"),
            part("candidate_image", b"i2"),
            part("top_k", b"1"),
        ])
        .unwrap();
        assert_eq!(r.inputs.len(), 3);
        assert_eq!(r.top_k, Some(1));
    }

    #[test]
    fn openai_inputs() {
        let r = openai(br#"{"model": "m", "input": "hi", "encoding_format": "base64", "user": "u", "extra": 1}"#).unwrap();
        assert_eq!(r.inputs.labels, vec!["input"]);
        assert_eq!(r.encoding_format, EncodingFormat::Base64);
        let r = openai(br#"{"input": ["a", {"text": "b"}]}"#).unwrap();
        assert_eq!(r.inputs.labels, vec!["input[0]", "input[1]"]);
        let e = openai(br#"{"input": [[1, 2]]}"#).unwrap_err();
        assert!(e.message.contains("token id arrays"));
        let e = openai(br#"{"input": 5}"#).unwrap_err();
        assert_eq!(e.status.as_u16(), 400);
    }
}
