//! The requests of `/embed`, `/score` and `/v1/embeddings`, from JSON or
//! multipart, validated into plain values ([`Input`]s with labels and
//! options).
//!
//! Owns field names, defaults and the multipart pairing rule of API.md. It
//! does not resolve models, count limits against the configuration or embed
//! anything (see [`super::handlers`]).

use serde::Deserialize;
use serde_json::Value;

use super::body::{decode_json, part_bool, part_text, Part};
use super::error::ApiError;
use super::inputs::{parse_input, parse_input_list, parse_role, type_name, Labeled};
use crate::input::{Input, Role};

/// How embeddings are written in responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    #[default]
    Float,
    Base64,
}

impl std::str::FromStr for EncodingFormat {
    type Err = ApiError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "float" => Ok(EncodingFormat::Float),
            "base64" => Ok(EncodingFormat::Base64),
            other => Err(ApiError::bad_request(format!(
                "encoding_format: expected \"float\" or \"base64\", found {other:?}"
            ))),
        }
    }
}

fn yes() -> bool {
    true
}

/// `POST /embed`.
#[derive(Debug)]
pub struct EmbedRequest {
    pub model: Option<String>,
    pub inputs: Labeled,
    pub normalize: bool,
    pub truncate: bool,
    pub encoding_format: EncodingFormat,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbedJson {
    #[serde(default)]
    model: Option<String>,
    inputs: Value,
    #[serde(default = "yes")]
    normalize: bool,
    #[serde(default = "yes")]
    truncate: bool,
    #[serde(default)]
    encoding_format: EncodingFormat,
}

impl EmbedRequest {
    pub fn from_json(bytes: &[u8]) -> Result<Self, ApiError> {
        let j: EmbedJson = decode_json(bytes)?;
        let inputs = parse_input_list(j.inputs, "inputs")?;
        Ok(EmbedRequest {
            model: j.model,
            inputs,
            normalize: j.normalize,
            truncate: j.truncate,
            encoding_format: j.encoding_format,
        })
    }

    pub fn from_multipart(parts: Vec<Part>) -> Result<Self, ApiError> {
        let mut model = None;
        let mut role = Role::Candidate;
        let mut instruction = None;
        let mut normalize = true;
        let mut truncate = true;
        let mut encoding_format = EncodingFormat::Float;
        let mut texts = Vec::new();
        let mut images = Vec::new();
        let mut seen = Vec::new();
        for part in parts {
            let name = part.name.clone();
            if !matches!(name.as_str(), "text" | "image") {
                once(&mut seen, &name)?;
            }
            match name.as_str() {
                "model" => model = Some(part_text(&part)?),
                "role" => role = parse_role(part_text(&part)?.trim(), "multipart field \"role\"")?,
                "instruction" => instruction = Some(part_text(&part)?),
                "normalize" => normalize = part_bool(&part)?,
                "truncate" => truncate = part_bool(&part)?,
                "encoding_format" => encoding_format = part_text(&part)?.parse()?,
                "text" => texts.push(part_text(&part)?),
                "image" => images.push(part.data.to_vec()),
                other => return Err(unknown_part(other, EMBED_PARTS)),
            }
        }
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
        })
    }
}

const EMBED_PARTS: &str =
    "model, role, instruction, normalize, truncate, encoding_format, text, image";
const SCORE_PARTS: &str =
    "model, query_text, query_image, instruction, candidate_text, candidate_image, top_k";

fn unknown_part(name: &str, known: &str) -> ApiError {
    ApiError::bad_request(format!(
        "unknown multipart field {name:?}; expected one of: {known}"
    ))
}

fn once(seen: &mut Vec<String>, name: &str) -> Result<(), ApiError> {
    if seen.iter().any(|s| s == name) {
        return Err(ApiError::bad_request(format!(
            "multipart field {name:?} is given more than once"
        )));
    }
    seen.push(name.to_string());
    Ok(())
}

/// API.md's pairing: m texts alone, k images alone, or k = m composed pairs.
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScoreJson {
    #[serde(default)]
    model: Option<String>,
    query: Value,
    candidates: Value,
    #[serde(default)]
    top_k: Option<usize>,
}

impl ScoreRequest {
    pub fn from_json(bytes: &[u8]) -> Result<Self, ApiError> {
        let j: ScoreJson = decode_json(bytes)?;
        if j.query.is_array() {
            return Err(ApiError::bad_request(
                "query: expected one input (a string or an object), found an array",
            ));
        }
        let mut query = parse_input(j.query, "query")?;
        query.role = Role::Query;
        let candidates = match j.candidates {
            Value::Array(items) => items,
            other => {
                return Err(ApiError::bad_request(format!(
                    "candidates: expected an array of inputs, found {}",
                    type_name(&other)
                )))
            }
        };
        let mut inputs = Labeled::default();
        inputs.push(query, "query".into());
        for (i, c) in candidates.into_iter().enumerate() {
            let at = format!("candidates[{i}]");
            let mut input = parse_input(c, &at)?;
            input.role = Role::Candidate;
            inputs.push(input, at);
        }
        Ok(ScoreRequest {
            model: j.model,
            inputs,
            top_k: j.top_k,
        })
    }

    pub fn from_multipart(parts: Vec<Part>) -> Result<Self, ApiError> {
        let mut model = None;
        let mut query_text = None;
        let mut query_image = None;
        let mut instruction = None;
        let mut top_k = None;
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
                            "multipart field \"top_k\": expected a non-negative integer, found {t:?}"
                        ))
                    })?)
                }
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
}

/// Unknown fields are accepted, as OpenAI clients may send more.
#[derive(Deserialize)]
struct OpenAiJson {
    #[serde(default)]
    model: Option<String>,
    input: Value,
    #[serde(default)]
    encoding_format: Option<EncodingFormat>,
    #[serde(default)]
    dimensions: Option<usize>,
    #[serde(default)]
    #[allow(dead_code)]
    user: Option<String>,
}

impl OpenAiRequest {
    pub fn from_json(bytes: &[u8]) -> Result<Self, ApiError> {
        let j: OpenAiJson = decode_json(bytes)?;
        let token_arrays = || {
            ApiError::bad_request(
                "input: token id arrays are not supported; send strings or input objects",
            )
        };
        let inputs = match j.input {
            Value::Array(items) => {
                if items.iter().any(|v| v.is_number() || v.is_array()) {
                    return Err(token_arrays());
                }
                parse_input_list(Value::Array(items), "input")?
            }
            Value::String(s) => {
                let mut l = Labeled::default();
                l.push(Input::text(s), "input".into());
                l
            }
            Value::Object(_) => parse_input_list(j.input, "input")?,
            other => {
                return Err(ApiError::bad_request(format!(
                    "input: expected a string or an array of strings or inputs, found {}",
                    type_name(&other)
                )))
            }
        };
        Ok(OpenAiRequest {
            model: j.model,
            inputs,
            encoding_format: j.encoding_format.unwrap_or_default(),
            dimensions: j.dimensions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Bytes;

    fn part(name: &str, data: &[u8]) -> Part {
        Part {
            name: name.into(),
            file_name: None,
            data: Bytes::copy_from_slice(data),
        }
    }

    #[test]
    fn embed_json_defaults() {
        let r = EmbedRequest::from_json(br#"{"inputs": ["a", "b"]}"#).unwrap();
        assert!(r.normalize && r.truncate && r.model.is_none());
        assert_eq!(r.encoding_format, EncodingFormat::Float);
        assert_eq!(r.inputs.len(), 2);
        let e =
            EmbedRequest::from_json(br#"{"inputs": "a", "encoding_format": "hex"}"#).unwrap_err();
        assert!(e.message.contains("encoding_format"), "{}", e.message);
        let e = EmbedRequest::from_json(br#"{"inputs": "a", "normalize": "yes"}"#).unwrap_err();
        assert!(e.message.contains("field normalize"), "{}", e.message);
        let e = EmbedRequest::from_json(br#"{"input": "a"}"#).unwrap_err();
        assert_eq!(e.status.as_u16(), 400);
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
        let r = ScoreRequest::from_json(
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
        let e = ScoreRequest::from_json(br#"{"query": ["a"], "candidates": ["b"]}"#).unwrap_err();
        assert_eq!(e.status.as_u16(), 400);
        let e = ScoreRequest::from_json(br#"{"query": "a", "candidates": "b"}"#).unwrap_err();
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
        let r = OpenAiRequest::from_json(br#"{"model": "m", "input": "hi", "encoding_format": "base64", "user": "u", "extra": 1}"#).unwrap();
        assert_eq!(r.inputs.labels, vec!["input"]);
        assert_eq!(r.encoding_format, EncodingFormat::Base64);
        let r = OpenAiRequest::from_json(br#"{"input": ["a", {"text": "b"}]}"#).unwrap();
        assert_eq!(r.inputs.labels, vec!["input[0]", "input[1]"]);
        let e = OpenAiRequest::from_json(br#"{"input": [[1, 2]]}"#).unwrap_err();
        assert!(e.message.contains("token id arrays"));
        let e = OpenAiRequest::from_json(br#"{"input": 5}"#).unwrap_err();
        assert_eq!(e.status.as_u16(), 400);
    }
}
