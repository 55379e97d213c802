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

use super::body::Part;
use super::error::{quote, ApiError};
use crate::batching::Class;
use crate::input::{Content, ImageSource};

/// The `priority` field's value: "high", "normal" or "low".
fn parse_priority(v: &str) -> Result<Class, ApiError> {
    v.parse().map_err(|_| {
        ApiError::bad_request(format!(
            "priority: expected \"high\", \"normal\" or \"low\", found {}",
            quote(v)
        ))
    })
}

/// The multipart fields of one endpoint.
struct PartNames {
    known: &'static [&'static str],
    /// Fields that may be given more than once (texts, images).
    repeatable: &'static [&'static str],
}

/// Hands each part to `field` by its name, one of `names.known`: 400 for an
/// unknown name (listing the known ones) or a non-repeatable one given
/// twice.
fn read_parts(
    parts: Vec<Part>,
    names: &PartNames,
    mut field: impl FnMut(&'static str, Part) -> Result<(), ApiError>,
) -> Result<(), ApiError> {
    let mut seen: Vec<&'static str> = Vec::new();
    for part in parts {
        let Some(&name) = names.known.iter().find(|n| **n == part.name) else {
            return Err(ApiError::bad_request(format!(
                "unknown multipart field {}; expected one of: {}",
                quote(&part.name),
                names.known.join(", ")
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
        field(name, part)?;
    }
    Ok(())
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
