//! Output encodings as requests name them (`encoding_format`, Cohere's
//! `embedding_types`), and the rules that tie them to `normalize` (README
//! "Output encodings").

use serde::Deserialize;

use super::super::error::{quote, ApiError};

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
pub(super) fn add_type(types: &mut Vec<EncodingFormat>, f: EncodingFormat) -> Result<(), ApiError> {
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
pub(super) fn check_encodings(
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
