//! Unit tests of the request parsers (every endpoint, JSON and multipart).

use std::time::Instant;

use axum::body::Bytes;

use super::*;
use crate::http::body::Part;
use crate::http::inputs::{parsed_inputs, BodyLimits, Labeled};
use crate::input::{Content, ImageSource, Role};

fn labels(inputs: &[Labeled]) -> Vec<&str> {
    inputs.iter().map(|l| l.label.as_str()).collect()
}

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
    let r = EmbedRequest::from_json_with(format!("{{\"inputs\": [{items}]}}").as_bytes(), &LIMITS);
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
            e.message.contains(
                "1001 characters long, over the limit of 1000 characters (server.max_text_chars)"
            ),
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
    let big = serde_json::to_vec(&serde_json::json!({"inputs": [{"image": b64(3001)}]})).unwrap();
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
    let ok = serde_json::to_vec(&serde_json::json!({"inputs": [{"image": b64(3000)}]})).unwrap();
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
    let cases: [(Result<(), ApiError>, &str); 9] = [
        (
            embed(br#"{"inputs": "a", "inputs": "b"}"#).map(drop),
            "duplicate field `inputs`",
        ),
        (
            embed(br#"{"inputs": "a", "model": "m", "model": "n"}"#).map(drop),
            "duplicate field `model`",
        ),
        (
            embed(br#"{"inputs": [{"text": "a", "text": "b"}]}"#).map(drop),
            "inputs[0]: field \"text\" is given more than once",
        ),
        (
            embed(br#"[1]"#).map(drop),
            "expected a JSON object, found an array",
        ),
        (
            embed(br#"{"normalize": true}"#).map(drop),
            "missing field `inputs`",
        ),
        (
            score(br#"{"query": "a", "candidates": ["b"], "top_k": -1}"#).map(drop),
            "field top_k: expected a non-negative integer",
        ),
        (
            embed(br#"{"inputs": [{"image": {"url": 5}}]}"#).map(drop),
            "inputs[0].image.url: expected a string, found a number",
        ),
        (
            embed(br#"{"inputs": [["a"]]}"#).map(drop),
            "inputs[0]: expected a string or an object",
        ),
        (embed(br#"{"inputs": ["a"] "#).map(drop), "malformed JSON"),
    ];
    for (r, needle) in cases {
        let e = r.unwrap_err();
        assert!(e.message.contains(needle), "{needle}: {}", e.message);
    }
    // An unknown field lists every field, the common ones first.
    let e = embed(br#"{"inputs": "a", "modle": "m"}"#).unwrap_err();
    assert!(
        e.message
            .contains("unknown field `modle`, expected one of `model`, `priority`, `inputs`"),
        "{}",
        e.message
    );
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
    assert!(r.normalize && r.truncate && r.common.model.is_none());
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
        let body = format!(r#"{{"inputs": "a", "normalize": false, "encoding_format": "{name}"}}"#);
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
    let r = embed(br#"{"inputs": "a", "embedding_types": ["int8", "float", "ubinary"]}"#).unwrap();
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
    let second = &r.inputs[1];
    assert_eq!(second.label, "inputs[1]");
    assert_eq!(
        second.input.content,
        Content::Composed {
            text: "b".into(),
            image: ImageSource::Bytes(b"img2".to_vec())
        }
    );
    assert_eq!(second.input.role, Role::Query);

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
    let e =
        EmbedRequest::from_multipart(vec![part("model", b"a"), part("model", b"b")]).unwrap_err();
    assert!(e.message.contains("more than once"));
}

#[test]
fn score_sets_roles_and_checks_shapes() {
    let r = score(
        br#"{"query": {"text": "q", "role": "candidate"}, "candidates": ["a", {"text": "b", "role": "query"}], "top_k": 1}"#,
    )
    .unwrap();
    assert_eq!(r.inputs[0].input.role, Role::Query);
    assert_eq!(r.inputs[2].input.role, Role::Candidate);
    assert_eq!(
        labels(&r.inputs),
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
    let r = openai(
        br#"{"model": "m", "input": "hi", "encoding_format": "base64", "user": "u", "extra": 1}"#,
    )
    .unwrap();
    assert_eq!(labels(&r.inputs), vec!["input"]);
    assert_eq!(r.encoding_format, EncodingFormat::Base64);
    let r = openai(br#"{"input": ["a", {"text": "b"}]}"#).unwrap();
    assert_eq!(labels(&r.inputs), vec!["input[0]", "input[1]"]);
    let e = openai(br#"{"input": [[1, 2]]}"#).unwrap_err();
    assert!(e.message.contains("token id arrays"));
    let e = openai(br#"{"input": 5}"#).unwrap_err();
    assert_eq!(e.status.as_u16(), 400);
}
