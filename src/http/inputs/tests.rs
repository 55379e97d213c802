//! Unit tests of `http/inputs.rs`.

use super::*;
use crate::http::requests::{EmbedRequest, EndpointRequest};
use serde_json::json;

const LIMITS: BodyLimits = BodyLimits {
    max_inputs: 8,
    max_text_chars: 100,
    max_image_bytes: 100,
};

/// `{"inputs": v}` through the real `/embed` parser.
fn inputs(v: Value) -> Result<Vec<Labeled>, ApiError> {
    let body = serde_json::to_vec(&json!({ "inputs": v })).unwrap();
    EmbedRequest::from_json_with(&body, &LIMITS).map(|r| r.inputs)
}

#[test]
fn parses_strings_objects_and_lists() {
    let l = inputs(json!("a cat")).unwrap();
    assert_eq!(l, vec![Labeled::new("inputs", Input::text("a cat"))]);
    let png = base64::engine::general_purpose::STANDARD.encode(b"\x89PNG");
    let l = inputs(json!(["x", {"text": "y", "image": png, "role": "query", "instruction": "find"}, {"image": {"url": " https://x/y.png "}}]))
        .unwrap();
    let labels: Vec<&str> = l.iter().map(|l| l.label.as_str()).collect();
    assert_eq!(labels, vec!["inputs[0]", "inputs[1]", "inputs[2]"]);
    let i = &l[1].input;
    assert_eq!(
        i.content,
        Content::Composed {
            text: "y".into(),
            image: ImageSource::Bytes(b"\x89PNG".to_vec())
        }
    );
    assert_eq!(i.role, Role::Query);
    assert_eq!(i.instruction.as_deref(), Some("find"));
    assert_eq!(l[2].input.image_url(), Some("https://x/y.png"));
    let bare = inputs(json!([{"image": "http://x/z.png"}])).unwrap();
    assert_eq!(bare[0].input.image_url(), Some("http://x/z.png"));
}

#[test]
fn images_accept_base64_variants_and_data_urls() {
    let raw = vec![0u8, 255, 1, 2, 250, 251];
    let std = base64::engine::general_purpose::STANDARD.encode(&raw);
    let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw);
    assert_eq!(decode_image_string(&std, "i", usize::MAX).unwrap(), raw);
    assert_eq!(decode_image_string(&url, "i", usize::MAX).unwrap(), raw);
    let wrapped = format!("{}\n{}", &std[..4], &std[4..]);
    assert_eq!(decode_image_string(&wrapped, "i", usize::MAX).unwrap(), raw);
    let data = format!("data:image/png;base64,{std}");
    assert_eq!(decode_image_string(&data, "i", usize::MAX).unwrap(), raw);
}

#[test]
fn refusals_name_the_field_with_the_right_status() {
    let long_url = format!("https://x/{}", "a".repeat(MAX_URL_BYTES));
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
            json!({"image": {"url": ""}}),
            422,
            "inputs[0].image.url: the URL is empty",
        ),
        (
            json!({"image": {"url": long_url}}),
            413,
            "bytes long, over the limit",
        ),
        (
            json!({"image": {"url": 5}}),
            400,
            "inputs[0].image.url: expected a string",
        ),
        (
            json!({"image": {"href": "x"}}),
            400,
            "unknown field \"href\"",
        ),
        (json!({"image": {}}), 400, "an image object needs \"url\""),
        (json!({"image": 5}), 400, "inputs[0].image: expected"),
        (json!({"text": 5}), 400, "inputs[0].text: expected a string"),
        (json!({"role": "boss", "text": "x"}), 400, "inputs[0].role"),
        (json!({"txt": "x"}), 400, "unknown field \"txt\""),
        (json!({}), 422, "empty input"),
        (json!({"text": null, "image": null}), 422, "empty input"),
        (json!(3), 400, "found a number"),
        (json!("x".repeat(101)), 413, "server.max_text_chars"),
    ];
    for (v, status, needle) in cases {
        let e = inputs(json!([v.clone()])).unwrap_err();
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
