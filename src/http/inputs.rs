//! Turning request JSON into [`Input`]s: the input shorthand (a bare string),
//! input objects, and inline images (base64, data URLs; URLs are refused).
//!
//! Owns the messages that name the input and field at fault. Produces plain
//! [`Input`] values; it does not decode images (preprocessing does) and knows
//! nothing of models.

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use serde_json::{Map, Value};

use super::error::ApiError;
use crate::input::{Input, Role};

const LENIENT: GeneralPurposeConfig =
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
const STANDARD_LENIENT: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, LENIENT);
const URL_SAFE_LENIENT: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, LENIENT);

/// Inputs with the names errors use for them (`inputs[2]`, `query`, ...).
#[derive(Debug, Default)]
pub struct Labeled {
    pub inputs: Vec<Input>,
    pub labels: Vec<String>,
}

impl Labeled {
    pub fn push(&mut self, input: Input, label: String) {
        self.inputs.push(input);
        self.labels.push(label);
    }

    pub fn len(&self) -> usize {
        self.inputs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty()
    }

    /// The label of input `i` (for error messages).
    pub fn label(&self, i: usize) -> String {
        self.labels
            .get(i)
            .cloned()
            .unwrap_or_else(|| format!("input {i}"))
    }

    /// Moves the inputs out, keeping the labels for error messages.
    pub fn take_inputs(&mut self) -> Vec<Input> {
        std::mem::take(&mut self.inputs)
    }
}

/// A JSON value's type, for messages.
pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parses `<input> | [<input>, ...]` found at `field`.
pub fn parse_input_list(v: Value, field: &str) -> Result<Labeled, ApiError> {
    let mut out = Labeled::default();
    match v {
        Value::Array(items) => {
            for (i, item) in items.into_iter().enumerate() {
                let at = format!("{field}[{i}]");
                let input = parse_input(item, &at)?;
                out.push(input, at);
            }
        }
        other => {
            let input = parse_input(other, field)?;
            out.push(input, field.to_string());
        }
    }
    Ok(out)
}

/// Parses one input: a string (text) or an object with `text`, `image`,
/// `instruction` and `role`.
pub fn parse_input(v: Value, at: &str) -> Result<Input, ApiError> {
    match v {
        Value::String(text) => Ok(Input::text(text)),
        Value::Object(map) => parse_input_object(map, at),
        other => Err(ApiError::bad_request(format!(
            "{at}: expected a string or an object with \"text\" and/or \"image\", found {}",
            type_name(&other)
        ))),
    }
}

fn parse_input_object(map: Map<String, Value>, at: &str) -> Result<Input, ApiError> {
    let mut input = Input::default();
    for (key, value) in map {
        match key.as_str() {
            "text" => input.text = optional_string(value, &format!("{at}.text"))?,
            "instruction" => {
                input.instruction = optional_string(value, &format!("{at}.instruction"))?
            }
            "role" => {
                if let Some(r) = optional_string(value, &format!("{at}.role"))? {
                    input.role = parse_role(&r, &format!("{at}.role"))?;
                }
            }
            "image" => input.image = parse_image(value, &format!("{at}.image"))?,
            other => {
                return Err(ApiError::bad_request(format!(
                    "{at}: unknown field {other:?}; an input has \"text\", \"image\", \"instruction\" and \"role\""
                )))
            }
        }
    }
    if input.text.is_none() && input.image.is_none() {
        return Err(ApiError::unprocessable(format!(
            "{at}: empty input: give \"text\", \"image\" or both"
        )));
    }
    Ok(input)
}

fn optional_string(v: Value, at: &str) -> Result<Option<String>, ApiError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s)),
        other => Err(ApiError::bad_request(format!(
            "{at}: expected a string, found {}",
            type_name(&other)
        ))),
    }
}

/// Parses a role name (`query` or `candidate`).
pub fn parse_role(s: &str, at: &str) -> Result<Role, ApiError> {
    s.parse::<Role>()
        .map_err(|e| ApiError::bad_request(format!("{at}: {e}")))
}

/// The message for an image URL, which this server does not fetch.
pub fn url_refused(at: &str) -> ApiError {
    ApiError::unprocessable(format!(
        "{at}: image URLs are not fetched (URL fetching is disabled: server.fetch_image_urls); \
         send the image inline as base64, a data URL, or a multipart file"
    ))
}

fn parse_image(v: Value, at: &str) -> Result<Option<Vec<u8>>, ApiError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => decode_image_string(&s, at).map(Some),
        Value::Object(map) => {
            if let Some(k) = map.keys().find(|k| k.as_str() != "url") {
                return Err(ApiError::bad_request(format!(
                    "{at}: unknown field {k:?}; an image object is {{\"url\": \"...\"}}"
                )));
            }
            match map.get("url") {
                Some(Value::String(_)) => Err(url_refused(at)),
                Some(other) => Err(ApiError::bad_request(format!(
                    "{at}.url: expected a string, found {}",
                    type_name(other)
                ))),
                None => Err(ApiError::bad_request(format!(
                    "{at}: an image object needs \"url\""
                ))),
            }
        }
        other => Err(ApiError::bad_request(format!(
            "{at}: expected a base64 string, a data URL or {{\"url\": ...}}, found {}",
            type_name(&other)
        ))),
    }
}

/// Decodes an image given as base64 or as a `data:...;base64,` URL.
pub fn decode_image_string(s: &str, at: &str) -> Result<Vec<u8>, ApiError> {
    let s = s.trim();
    let lower_start = s.get(..8).unwrap_or(s).to_ascii_lowercase();
    if lower_start.starts_with("http://") || lower_start.starts_with("https:/") {
        return Err(url_refused(at));
    }
    let payload = if lower_start.starts_with("data:") {
        let Some((meta, data)) = s.split_once(',') else {
            return Err(ApiError::unprocessable(format!(
                "{at}: malformed data URL: no ',' before the data"
            )));
        };
        if !meta.to_ascii_lowercase().ends_with(";base64") {
            return Err(ApiError::unprocessable(format!(
                "{at}: data URLs must be base64-encoded, like data:image/png;base64,..."
            )));
        }
        data
    } else {
        s
    };
    if payload.is_empty() {
        return Err(ApiError::unprocessable(format!("{at}: the image is empty")));
    }
    decode_base64(payload)
        .map_err(|e| ApiError::unprocessable(format!("{at}: not valid base64 ({e})")))
}

fn decode_base64(payload: &str) -> Result<Vec<u8>, base64::DecodeError> {
    let cleaned;
    let data = if payload.bytes().any(|b| b.is_ascii_whitespace()) {
        cleaned = payload
            .bytes()
            .filter(|b| !b.is_ascii_whitespace())
            .collect::<Vec<u8>>();
        cleaned.as_slice()
    } else {
        payload.as_bytes()
    };
    match STANDARD_LENIENT.decode(data) {
        Ok(bytes) => Ok(bytes),
        Err(e) => URL_SAFE_LENIENT.decode(data).map_err(|_| e),
    }
}

/// Encodes an embedding as base64 of its little-endian f32 bytes.
pub fn encode_embedding(v: &[f32]) -> String {
    let mut bytes = Vec::with_capacity(v.len() * 4);
    for x in v {
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_strings_objects_and_lists() {
        let l = parse_input_list(json!("a cat"), "inputs").unwrap();
        assert_eq!(l.labels, vec!["inputs"]);
        assert_eq!(l.inputs[0].text.as_deref(), Some("a cat"));
        let png = base64::engine::general_purpose::STANDARD.encode(b"\x89PNG");
        let l = parse_input_list(
            json!(["x", {"text": "y", "image": png, "role": "query", "instruction": "find"}]),
            "inputs",
        )
        .unwrap();
        assert_eq!(l.labels, vec!["inputs[0]", "inputs[1]"]);
        let i = &l.inputs[1];
        assert_eq!(i.image.as_deref(), Some(&b"\x89PNG"[..]));
        assert_eq!(i.role, Role::Query);
        assert_eq!(i.instruction.as_deref(), Some("find"));
    }

    #[test]
    fn images_accept_base64_variants_and_data_urls() {
        let raw = vec![0u8, 255, 1, 2, 250, 251];
        let std = base64::engine::general_purpose::STANDARD.encode(&raw);
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw);
        assert_eq!(decode_image_string(&std, "i").unwrap(), raw);
        assert_eq!(decode_image_string(&url, "i").unwrap(), raw);
        let wrapped = format!("{}\n{}", &std[..4], &std[4..]);
        assert_eq!(decode_image_string(&wrapped, "i").unwrap(), raw);
        let data = format!("data:image/png;base64,{std}");
        assert_eq!(decode_image_string(&data, "i").unwrap(), raw);
    }

    #[test]
    fn refusals_name_the_field_with_the_right_status() {
        let cases = [
            (
                json!({"image": "!!!"}),
                422,
                "inputs[0].image: not valid base64",
            ),
            (
                json!({"image": "data:image/png,abc"}),
                422,
                "base64-encoded",
            ),
            (
                json!({"image": {"url": "https://x/y.png"}}),
                422,
                "server.fetch_image_urls",
            ),
            (json!({"image": "https://x/y.png"}), 422, "URL"),
            (json!({"image": 5}), 400, "inputs[0].image: expected"),
            (json!({"text": 5}), 400, "inputs[0].text: expected a string"),
            (json!({"role": "boss", "text": "x"}), 400, "inputs[0].role"),
            (json!({"txt": "x"}), 400, "unknown field \"txt\""),
            (json!({}), 422, "empty input"),
            (json!({"text": null, "image": null}), 422, "empty input"),
            (json!(3), 400, "found a number"),
        ];
        for (v, status, needle) in cases {
            let e = parse_input(v.clone(), "inputs[0]").unwrap_err();
            assert_eq!(e.status.as_u16(), status, "{v}: {}", e.message);
            assert!(e.message.contains(needle), "{v}: {}", e.message);
        }
    }

    #[test]
    fn base64_embeddings_are_little_endian_f32() {
        let s = encode_embedding(&[1.0, -2.5]);
        let bytes = base64::engine::general_purpose::STANDARD.decode(s).unwrap();
        assert_eq!(
            bytes,
            [1.0f32.to_le_bytes(), (-2.5f32).to_le_bytes()].concat()
        );
    }
}
