//! The JSON side of request parsing: one streaming visitor per request
//! object ([`Fields`], read by [`read_json`]), and the typed readers of scalar
//! fields, whose messages name the field and never echo more than a cut
//! string. Every endpoint's JSON body is read through these.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::super::body::decode_seed;
use super::super::error::{quote, ApiError};
use super::super::inputs::{scalars_are_wrong, BodyLimits, Key, KeySeed, ParseCtx};
use super::encoding::{add_type, EncodingFormat};
use super::{parse_priority, Common};
use crate::batching::Class;

/// The own fields of one endpoint's request object (besides the
/// [`Common`] ones every endpoint has), read one by one into `Self` (every
/// field `None` at first), then checked into the request by `finish`.
pub(super) trait Fields: Default {
    type Out;
    /// The endpoint's own field names.
    const NAMES: &'static [&'static str];
    /// Whether fields not known are skipped (else refused).
    const LENIENT: bool = false;
    /// Reads the value of field `f.name` (one of `NAMES`).
    fn field<'de, A: MapAccess<'de>>(&mut self, f: FieldAt<'_, '_, A>) -> Result<(), A::Error>;
    fn finish<E: de::Error>(self, ctx: &ParseCtx<'_>, common: Common) -> Result<Self::Out, E>;
}

/// One field of a request object, about to be read: its name, the map its
/// value is read from, and the parse context.
pub(super) struct FieldAt<'a, 'c, M> {
    pub(super) ctx: &'a ParseCtx<'c>,
    pub(super) name: &'static str,
    pub(super) map: &'a mut M,
}

/// The fields every endpoint has, read by [`Top`] itself.
const COMMON: [&str; 2] = ["model", "priority"];

/// Reads a JSON request body through `F` under `limits`.
pub(super) fn read_json<F: Fields>(bytes: &[u8], limits: &BodyLimits) -> Result<F::Out, ApiError> {
    let ctx = ParseCtx::new(limits);
    decode_seed(
        bytes,
        &ctx,
        Top::<F> {
            ctx: &ctx,
            fields: PhantomData,
        },
    )
}

/// Reads a request object through its [`Fields`].
struct Top<'c, 'l, F> {
    ctx: &'c ParseCtx<'l>,
    fields: PhantomData<F>,
}

impl<'de, F: Fields> DeserializeSeed<'de> for Top<'_, '_, F> {
    type Value = F::Out;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<F::Out, D::Error> {
        d.deserialize_any(self)
    }
}

impl<F: Fields> Top<'_, '_, F> {
    fn wrong_type<E: de::Error>(&self, found: &str) -> E {
        self.ctx.fail(ApiError::bad_request(format!(
            "invalid request body: expected a JSON object, found {found}"
        )))
    }
}

impl<'de, F: Fields> Visitor<'de> for Top<'_, '_, F> {
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
        let ctx = self.ctx;
        let mut fields = F::default();
        let mut common = Common::default();
        let mut seen: Vec<&'static str> = Vec::new();
        while let Some(key) = map.next_key_seed(KeySeed(F::NAMES))? {
            let name = match key {
                Key::Known(i) => F::NAMES[i],
                Key::Unknown(k) => match COMMON.iter().find(|c| **c == k) {
                    Some(c) => c,
                    None if F::LENIENT => {
                        map.next_value::<IgnoredAny>()?;
                        continue;
                    }
                    None => return Err(unknown_field(ctx, &k, F::NAMES)),
                },
            };
            if seen.contains(&name) {
                return Err(ctx.fail(ApiError::bad_request(format!(
                    "invalid request body: duplicate field `{name}`"
                ))));
            }
            seen.push(name);
            match name {
                "model" => common.model = opt_string(ctx, &mut map, name)?,
                "priority" => common.priority = opt_priority(ctx, &mut map)?,
                _ => fields.field(FieldAt {
                    ctx,
                    name,
                    map: &mut map,
                })?,
            }
        }
        fields.finish(ctx, common)
    }
}

/// Refuses field `key` of a request object whose own fields are `names`.
fn unknown_field<E: de::Error>(ctx: &ParseCtx<'_>, key: &str, names: &[&str]) -> E {
    let expected = COMMON
        .iter()
        .chain(names)
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ");
    ctx.fail(ApiError::bad_request(format!(
        "invalid request body: unknown field `{key}`, expected one of {expected}"
    )))
}

pub(super) fn missing<E: de::Error>(ctx: &ParseCtx, name: &str) -> E {
    ctx.fail(ApiError::bad_request(format!(
        "invalid request body: missing field `{name}`"
    )))
}

/// A scalar request field (`model`, `normalize`, `top_k`, ...), read with a
/// message naming the field and never echoing more than a cut string.
#[derive(Clone, Copy)]
pub(super) enum Scalar {
    OptString,
    Bool,
    Format,
    OptUsize,
}

pub(super) enum ScalarValue {
    None,
    String(String),
    Bool(bool),
    Format(EncodingFormat),
    Usize(usize),
}

pub(super) struct ScalarSeed<'c, 'l> {
    pub(super) ctx: &'c ParseCtx<'l>,
    pub(super) name: &'static str,
    pub(super) kind: Scalar,
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

pub(super) fn scalar<'de, A: MapAccess<'de>>(
    ctx: &ParseCtx,
    map: &mut A,
    name: &'static str,
    kind: Scalar,
) -> Result<ScalarValue, A::Error> {
    map.next_value_seed(ScalarSeed { ctx, name, kind })
}

pub(super) fn opt_string<'de, A: MapAccess<'de>>(
    ctx: &ParseCtx,
    map: &mut A,
    name: &'static str,
) -> Result<Option<String>, A::Error> {
    Ok(match scalar(ctx, map, name, Scalar::OptString)? {
        ScalarValue::String(s) => Some(s),
        _ => None,
    })
}

pub(super) fn boolean<'de, A: MapAccess<'de>>(
    ctx: &ParseCtx,
    map: &mut A,
    name: &'static str,
) -> Result<bool, A::Error> {
    Ok(matches!(
        scalar(ctx, map, name, Scalar::Bool)?,
        ScalarValue::Bool(true)
    ))
}

pub(super) fn format<'de, A: MapAccess<'de>>(
    ctx: &ParseCtx,
    map: &mut A,
    name: &'static str,
) -> Result<EncodingFormat, A::Error> {
    Ok(match scalar(ctx, map, name, Scalar::Format)? {
        ScalarValue::Format(f) => f,
        _ => EncodingFormat::default(),
    })
}

pub(super) fn opt_usize<'de, A: MapAccess<'de>>(
    ctx: &ParseCtx,
    map: &mut A,
    name: &'static str,
) -> Result<Option<usize>, A::Error> {
    Ok(match scalar(ctx, map, name, Scalar::OptUsize)? {
        ScalarValue::Usize(n) => Some(n),
        _ => None,
    })
}

/// The `priority` field of a JSON body.
pub(super) fn opt_priority<'de, A: MapAccess<'de>>(
    ctx: &ParseCtx,
    map: &mut A,
) -> Result<Option<Class>, A::Error> {
    opt_string(ctx, map, "priority")?
        .map(|v| parse_priority(&v).map_err(|e| ctx.fail(e)))
        .transpose()
}

/// Cohere's `embedding_types`: a JSON array of distinct encodings (see
/// [`check_encodings`] for the rest of the rule).
pub(super) struct TypesSeed<'c, 'l> {
    pub(super) ctx: &'c ParseCtx<'l>,
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
