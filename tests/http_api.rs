//! The HTTP API against a real server (ephemeral loopback port, the fixture
//! model): every endpoint in JSON and multipart, every error status of
//! openapi.yaml and the README that does not need load (see http_batching.rs for 429/500/503/504),
//! and every response checked against openapi.yaml.

mod common;

use base64::Engine;
use common::*;
use reqwest::multipart::{Form, Part};
use serde_json::{json, Value};
use vlembed::app::Hooks;
use vlembed::input::{Content, Input};

fn form_image(name: &str) -> Part {
    Part::bytes(image(name)).file_name(name.to_string())
}

#[tokio::test]
async fn embed_text_image_and_composed() {
    let s = TestServer::ready(config(), Hooks::default()).await;
    let doc = openapi();
    let reference = reference();
    let text = &reference["texts"][0];
    let comp_text = "Make the background dark";
    let img = image("baseline_420_640x480.jpg");
    let body = json!({
        "model": "clip-tiny",
        "inputs": [
            text["text"],
            {"image": b64(&img)},
            {"text": comp_text, "image": format!("data:image/jpeg;base64,{}", b64(&img))},
        ],
    });
    let r = s.post_json("/embed", &body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_conforms(&doc, "POST", "/embed", 200, &r.body);
    assert_eq!(r.body["model"], "clip-tiny");
    assert_eq!(r.body["dimensions"], 16);
    let e = floats(&r.body["embeddings"]);
    assert_eq!(e.len(), 3);
    // The text equals the Python reference; every input equals the library's
    // own unbatched result.
    let want_text = floats(&json!([text["embedding"]])).remove(0);
    assert!(
        max_abs_diff(&e[0], &want_text) < tol::LOOSE_F32,
        "{:?} vs {want_text:?}",
        e[0]
    );
    let inputs = [
        Input::text(text["text"].as_str().unwrap()),
        Input::image(img.clone()),
        Input::new(Content::Composed {
            text: comp_text.into(),
            image: img.clone(),
        }),
    ];
    for (got, want) in e.iter().zip(direct(&inputs, true)) {
        assert!(
            max_abs_diff(got, &want) < tol::CLIP_F32,
            "{got:?} vs {want:?}"
        );
        assert!((norm(got) - 1.0).abs() < tol::UNIT_NORM);
    }
    let usage = &r.body["usage"];
    assert_eq!(usage["inputs"], 3);
    assert_eq!(usage["images"], 2);
    let comp_tokens = r.body["usage"]["text_tokens"].as_u64().unwrap() as usize
        - text["ids"].as_array().unwrap().len();
    assert!(comp_tokens > 2, "{usage}");

    // normalize=false gives the raw embedding; base64 gives the same floats.
    let raw = s
        .post_json(
            "/embed",
            &json!({"inputs": text["text"], "normalize": false, "encoding_format": "base64"}),
        )
        .await;
    assert_eq!(raw.status, 200, "{}", raw.text);
    assert_conforms(&doc, "POST", "/embed", 200, &raw.body);
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(raw.body["embeddings"][0].as_str().unwrap())
        .unwrap();
    let v: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let want = floats(&json!([text["embedding_raw"]])).remove(0);
    assert!(max_abs_diff(&v, &want) < tol::LOOSE_F32);
    assert!(
        (norm(&v) - 1.0).abs() > tol::UNIT_NORM,
        "raw embedding should not be unit length"
    );
    s.stop().await;
}

#[tokio::test]
async fn multipart_embed_equals_json_embed() {
    let s = TestServer::ready(config(), Hooks::default()).await;
    let doc = openapi();
    let png = "rgb_225x223.png";
    let jpg = "gray_320x240.jpg";
    let json_emb = s
        .embed(json!([
            {"text": "a cat", "image": b64(&image(png))},
            {"text": "a dog", "image": b64(&image(jpg))},
        ]))
        .await;
    let form = Form::new()
        .text("model", "clip-tiny")
        .text("text", "a cat")
        .part("image", form_image(png))
        .text("text", "a dog")
        .part("image", form_image(jpg))
        .text("role", "query")
        .text("instruction", "find it");
    let r = s.post_form("/embed", form).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_conforms(&doc, "POST", "/embed", 200, &r.body);
    let mp = floats(&r.body["embeddings"]);
    for (a, b) in mp.iter().zip(&json_emb) {
        assert!(max_abs_diff(a, b) < tol::SAME_MATH);
    }
    assert_eq!(r.body["usage"]["images"], 2);

    // images only, texts only
    let r = s
        .post_form(
            "/embed",
            Form::new()
                .part("image", form_image(png))
                .part("image", form_image(jpg)),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["embeddings"].as_array().unwrap().len(), 2);
    let r = s
        .post_form(
            "/embed",
            Form::new()
                .text("text", "x")
                .text("encoding_format", "base64")
                .text("normalize", "false"),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.body["embeddings"][0].is_string());

    // count mismatch: 422 naming both counts
    let r = s
        .post_form(
            "/embed",
            Form::new()
                .text("text", "a")
                .text("text", "b")
                .part("image", form_image(png)),
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.text);
    assert_conforms(&doc, "POST", "/embed", 422, &r.body);
    assert!(r.error_message().contains("2 text") && r.error_message().contains("1 image"));
    s.stop().await;
}

#[tokio::test]
async fn score_json_and_multipart() {
    let s = TestServer::ready(config(), Hooks::default()).await;
    let doc = openapi();
    let png = "rgb_225x223.png";
    let e = s
        .embed(json!(["a cat", "a dog", {"image": b64(&image(png))}, "a bird"]))
        .await;
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let expected: Vec<f32> = e[1..].iter().map(|c| dot(&e[0], c)).collect();

    let r = s
        .post_json(
            "/score",
            &json!({"query": "a cat", "candidates": ["a dog", {"image": b64(&image(png))}, "a bird"], "top_k": 2}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_conforms(&doc, "POST", "/score", 200, &r.body);
    let scores: Vec<f32> = r.body["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    assert!(
        max_abs_diff(&scores, &expected) < tol::CLIP_F32,
        "{scores:?} vs {expected:?}"
    );
    let ranking = r.body["ranking"].as_array().unwrap();
    assert_eq!(ranking.len(), 2);
    let mut order: Vec<usize> = (0..3).collect();
    order.sort_by(|&a, &b| expected[b].total_cmp(&expected[a]));
    assert_eq!(ranking[0]["index"], order[0]);
    assert_eq!(ranking[1]["index"], order[1]);

    // no top_k: no ranking
    let r = s
        .post_json(
            "/score",
            &json!({"query": "a cat", "candidates": ["a dog"]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.body.get("ranking").is_none());

    let form = Form::new()
        .text("query_text", "a cat")
        .text("candidate_text", "a dog")
        .text("candidate_text", "a bird")
        .text("top_k", "1");
    let r = s.post_form("/score", form).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_conforms(&doc, "POST", "/score", 200, &r.body);
    let mp: Vec<f32> = r.body["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    assert!(
        (mp[0] - expected[0]).abs() < tol::CLIP_F32 && (mp[1] - expected[2]).abs() < tol::CLIP_F32
    );
    assert_eq!(r.body["ranking"].as_array().unwrap().len(), 1);

    let r = s
        .post_json("/score", &json!({"query": "a cat", "candidates": []}))
        .await;
    assert_eq!(r.status, 422, "{}", r.text);
    assert_conforms(&doc, "POST", "/score", 422, &r.body);
    let r = s
        .post_form("/score", Form::new().text("candidate_text", "x"))
        .await;
    assert_eq!(r.status, 422, "{}", r.text);
    s.stop().await;
}

#[tokio::test]
async fn openai_embeddings_as_the_official_client_sends_them() {
    let s = TestServer::ready(config(), Hooks::default()).await;
    let doc = openapi();
    let want = s.embed(json!(["hello world", "a photo of a cat"])).await;
    // The official openai clients send encoding_format "base64" by default
    // and decode little-endian f32; they authenticate with a Bearer key.
    let res = s
        .client
        .post(s.url("/v1/embeddings"))
        .header("authorization", "Bearer sk-unused")
        .header("user-agent", "OpenAI/Python 1.0")
        .json(&json!({"input": ["hello world", "a photo of a cat"], "model": "clip-tiny", "encoding_format": "base64"}))
        .send()
        .await
        .unwrap();
    let r = TestServer::reply(res).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_conforms(&doc, "POST", "/v1/embeddings", 200, &r.body);
    assert_eq!(r.body["object"], "list");
    assert_eq!(r.body["model"], "clip-tiny");
    let data = r.body["data"].as_array().unwrap();
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["object"], "embedding");
        assert_eq!(d["index"], i);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(d["embedding"].as_str().unwrap())
            .unwrap();
        let v: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert!(max_abs_diff(&v, &want[i]) < tol::SAME_MATH);
    }
    let tokens = r.body["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(tokens > 4);
    assert_eq!(r.body["usage"]["total_tokens"], tokens);

    // a single string, float format, an input object, extra fields
    let r = s
        .post_json("/v1/embeddings", &json!({"input": "hello world", "model": "clip-tiny", "encoding_format": "float", "user": "u1", "dimensions": 16}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_conforms(&doc, "POST", "/v1/embeddings", 200, &r.body);
    let v = floats(&json!([r.body["data"][0]["embedding"]])).remove(0);
    assert!(max_abs_diff(&v, &want[0]) < tol::SAME_MATH);
    let r = s
        .post_json("/v1/embeddings", &json!({"input": [{"text": "x", "image": b64(&image("tiny_5x3.bmp"))}], "model": "clip-tiny"}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);

    for (body, status, needle) in [
        (
            json!({"input": [[1, 2, 3]], "model": "clip-tiny"}),
            400,
            "token id arrays",
        ),
        (
            json!({"input": "x", "model": "text-embedding-3-small"}),
            404,
            "text-embedding-3-small",
        ),
        (
            json!({"input": "x", "model": "clip-tiny", "dimensions": 8}),
            400,
            "dimensions",
        ),
        (json!({"input": [], "model": "clip-tiny"}), 422, "empty"),
        (json!({"model": "clip-tiny"}), 400, "input"),
    ] {
        let r = s.post_json("/v1/embeddings", &body).await;
        assert_eq!(r.status, status, "{body}: {}", r.text);
        assert!(r.error_message().contains(needle), "{body}: {}", r.text);
        assert_conforms(&doc, "POST", "/v1/embeddings", status, &r.body);
    }
    s.stop().await;
}

#[tokio::test]
async fn operations_endpoints() {
    let s = TestServer::ready(config(), Hooks::default()).await;
    let doc = openapi();
    let r = s.get("/health").await;
    assert_eq!(r.status, 200);
    assert_conforms(&doc, "GET", "/health", 200, &r.body);
    let r = s.get("/ready").await;
    assert_eq!(r.status, 200);
    assert_conforms(&doc, "GET", "/ready", 200, &r.body);
    let r = s.get("/info").await;
    assert_eq!(r.status, 200);
    assert_conforms(&doc, "GET", "/info", 200, &r.body);
    let m = &r.body["models"][0];
    assert_eq!(m["name"], "clip-tiny");
    assert_eq!(m["architecture"], "CLIPModel");
    assert_eq!(m["dimensions"], 16);
    assert_eq!(m["max_text_tokens"], 77);
    assert_eq!(m["uses_instructions"], false);
    // CLIP has one prompt and fixed-size images.
    assert_eq!(
        (&m["prompt_format"], &m["min_pixels"], &m["max_pixels"]),
        (&Value::Null, &Value::Null, &Value::Null)
    );
    assert_eq!(m["devices"], json!(["cpu"]));
    assert_eq!(m["batching"]["max_batch_size"], 32);
    // What the device-dependent "auto" keys resolved to (CPU values).
    assert_eq!(m["device_class"], "cpu");
    assert_eq!(m["batching"]["max_batch_cost"], 1024);
    assert_eq!(m["batching"]["decoder_group_tokens"], 4096);
    assert_eq!(m["batching"]["vision_tile_chunk"], 16);
    assert_eq!(
        m["auto"],
        json!([
            "dtype",
            "max_batch_size",
            "max_batch_cost",
            "decoder_group_tokens",
            "vision_tile_chunk"
        ])
    );
    // tests/common's config() sets 2 threads.
    assert_eq!(r.body["server"]["preprocess_threads"], 2);
    assert_eq!(r.body["server"]["preprocess_threads_auto"], false);
    assert_eq!(r.body["server"]["allow_tf32"], false);
    assert_eq!(r.body["version"], env!("CARGO_PKG_VERSION"));
    let r = s.get("/openapi.json").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, doc);
    s.embed(json!("x")).await;
    let text = s.metrics().await;
    for name in [
        "vlembed_requests_total{endpoint=\"/embed\",model=\"clip-tiny\",status=\"200\"} 1",
        "vlembed_request_duration_seconds_count{endpoint=\"/embed\",model=\"clip-tiny\"} 1",
        "vlembed_queue_duration_seconds_count{model=\"clip-tiny\"} 1",
        "vlembed_inference_duration_seconds_count{model=\"clip-tiny\"} 1",
        "vlembed_preprocess_duration_seconds_count{modality=\"text\",model=\"clip-tiny\"} 1",
        "vlembed_batch_size_count{model=\"clip-tiny\"} 1",
        "vlembed_queue_depth{model=\"clip-tiny\"} 0",
        "vlembed_inputs_total{modality=\"text\",model=\"clip-tiny\"} 1",
        "vlembed_model_ready{model=\"clip-tiny\"} 1",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
    s.stop().await;
}

#[tokio::test]
async fn every_route_is_in_openapi_and_every_documented_route_is_served() {
    let s = TestServer::ready(config(), Hooks::default()).await;
    let doc = openapi();
    for ep in vlembed::http::Endpoint::ALL {
        let method = ep.method().as_str().to_ascii_lowercase();
        assert!(
            doc["paths"][ep.path()][&method].is_object(),
            "{} {} not documented",
            ep.method(),
            ep.path()
        );
    }
    let paths = doc["paths"].as_object().unwrap();
    let mut documented = 0;
    for (path, ops) in paths {
        for method in ops.as_object().unwrap().keys() {
            documented += 1;
            let m = reqwest::Method::from_bytes(method.to_ascii_uppercase().as_bytes()).unwrap();
            let res = s
                .client
                .request(m, s.url(path))
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap();
            let r = TestServer::reply(res).await;
            let routed =
                !(r.status == 404 && r.error_message().starts_with("no route")) && r.status != 405;
            assert!(
                routed,
                "{method} {path} is documented but not served: {}",
                r.text
            );
        }
    }
    assert_eq!(documented, vlembed::http::Endpoint::ALL.len());
    s.stop().await;
}

#[tokio::test]
async fn client_errors_have_the_contract_status_and_message() {
    let mut c = config();
    c.server.max_body_bytes = 200_000;
    c.server.max_inputs_per_request = 4;
    c.models[0].max_image_pixels = 100_000;
    let s = TestServer::ready(c, Hooks::default()).await;
    let doc = openapi();
    let big_jpg = b64(&image("baseline_420_640x480.jpg"));
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({"inputs": 5}), 400, "inputs: expected a string"),
        (
            json!({"inputs": ["a"], "normalize": "no"}),
            400,
            "field normalize",
        ),
        (
            json!({"inputs": ["a"], "colour": 1}),
            400,
            "unknown field `colour`",
        ),
        (
            json!({"inputs": [{"txt": "a"}]}),
            400,
            "inputs[0]: unknown field \"txt\"",
        ),
        (
            json!({"inputs": [{"text": "a", "role": "boss"}]}),
            400,
            "inputs[0].role",
        ),
        (
            json!({"inputs": "a", "model": "nope"}),
            404,
            "unknown model \"nope\"",
        ),
        (
            json!({"inputs": ["a", "b", "c", "d", "e"]}),
            413,
            "more than 4 inputs, over the limit of 4",
        ),
        (
            json!({"inputs": ["a", "word ".repeat(100)], "truncate": false}),
            413,
            "inputs[1].text",
        ),
        (
            json!({"inputs": ["a", {"image": "not base64!"}]}),
            422,
            "inputs[1].image: not valid base64",
        ),
        (
            json!({"inputs": [{"image": b64(b"definitely not an image")}]}),
            422,
            "inputs[0].image",
        ),
        (json!({"inputs": [{"image": big_jpg}]}), 422, "100000"),
        (json!({"inputs": [{}]}), 422, "inputs[0]: empty input"),
        (json!({"inputs": ["   "]}), 422, "inputs[0].text"),
        (json!({"inputs": []}), 422, "inputs is empty"),
        (
            json!({"inputs": [{"image": {"url": "https://example.com/cat.jpg"}}]}),
            422,
            "fetch_image_urls",
        ),
    ];
    for (body, status, needle) in cases {
        let r = s.post_json("/embed", &body).await;
        assert_eq!(r.status, status, "{body}: {}", r.text);
        assert!(
            r.error_message().contains(needle),
            "{body}: expected {needle:?} in {}",
            r.text
        );
        assert_conforms(&doc, "POST", "/embed", status, &r.body);
    }
    // A long text is truncated by default.
    let r = s
        .post_json("/embed", &json!({"inputs": "word ".repeat(100)}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["usage"]["text_tokens"], 77);

    let raw: Vec<(Option<&str>, Vec<u8>, u16, &str)> = vec![
        (
            Some("application/json"),
            b"{\"inputs\": [".to_vec(),
            400,
            "malformed JSON",
        ),
        (
            Some("application/json"),
            b"not json".to_vec(),
            400,
            "malformed JSON",
        ),
        (Some("text/plain"), b"hello".to_vec(), 415, "text/plain"),
        (
            None,
            b"{\"inputs\": \"a\"}".to_vec(),
            415,
            "missing Content-Type",
        ),
        (
            Some("multipart/form-data"),
            b"--x\r\n".to_vec(),
            400,
            "multipart",
        ),
        (
            Some("multipart/form-data; boundary=x"),
            b"--x\r\nbroken".to_vec(),
            400,
            "multipart",
        ),
        (
            Some("application/json"),
            vec![b' '; 300_000],
            413,
            "200000 bytes",
        ),
    ];
    for (ct, body, status, needle) in raw {
        let r = s.post_raw("/embed", ct, body).await;
        assert_eq!(r.status, status, "{ct:?}: {}", r.text);
        assert!(
            r.error_message().contains(needle),
            "{ct:?}: expected {needle:?} in {}",
            r.text
        );
        assert_conforms(&doc, "POST", "/embed", status, &r.body);
    }
    // A multipart body over the limit, and unknown routes and methods.
    let form = Form::new().part("image", Part::bytes(vec![0u8; 300_000]).file_name("x.png"));
    let r = s.post_form("/embed", form).await;
    assert_eq!(r.status, 413, "{}", r.text);
    assert_eq!(r.error_type(), "payload_too_large");
    let r = s.get("/nope").await;
    assert_eq!((r.status, r.error_type()), (404, "not_found"));
    let r = s.get("/embed").await;
    assert_eq!((r.status, r.error_type()), (405, "method_not_allowed"));

    let text = s.metrics().await;
    assert!(
        metric(
            &text,
            "vlembed_rejected_total{model=\"-\",reason=\"invalid\"}"
        )
        .unwrap()
            >= 5.0,
        "{text}"
    );
    assert!(
        metric(
            &text,
            "vlembed_rejected_total{model=\"clip-tiny\",reason=\"too_large\"}"
        )
        .unwrap()
            >= 1.0,
        "{text}"
    );
    s.stop().await;
}

#[tokio::test]
async fn api_keys_are_required_when_configured() {
    let mut c = config();
    c.server.api_keys = vec!["secret-1".into(), "secret-2".into()];
    let s = TestServer::ready(c, Hooks::default()).await;
    let doc = openapi();
    let body = json!({"inputs": "a"});
    let r = s.post_json("/embed", &body).await;
    assert_eq!((r.status, r.error_type()), (401, "unauthorized"));
    assert!(r.error_message().contains("Authorization: Bearer"));
    assert_conforms(&doc, "POST", "/embed", 401, &r.body);
    let res = s
        .client
        .post(s.url("/embed"))
        .bearer_auth("wrong")
        .json(&body)
        .send()
        .await
        .unwrap();
    let r = TestServer::reply(res).await;
    assert_eq!(r.status, 401);
    assert!(r.error_message().contains("invalid API key"));
    for key in ["secret-1", "secret-2"] {
        let res = s
            .client
            .post(s.url("/embed"))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    let res = s
        .client
        .post(s.url("/v1/embeddings"))
        .json(&json!({"input": "a"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(s.get("/info").await.status, 401);
    // Probes and scraping need no key.
    for path in ["/health", "/ready", "/metrics", "/openapi.json"] {
        assert_eq!(s.get(path).await.status, 200, "{path}");
    }
    let text = s.metrics().await;
    assert!(
        metric(
            &text,
            "vlembed_rejected_total{model=\"-\",reason=\"unauthorized\"}"
        )
        .unwrap()
            >= 3.0
    );
    s.stop().await;
}

#[tokio::test]
async fn several_models_need_a_name() {
    let mut c = config();
    let mut second = c.models[0].clone();
    second.name = "clip-tiny-2".into();
    c.models.push(second);
    let s = TestServer::ready(c, Hooks::default()).await;
    let r = s.post_json("/embed", &json!({"inputs": "a"})).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(
        r.error_message().contains("clip-tiny, clip-tiny-2"),
        "{}",
        r.text
    );
    let a = s
        .post_json("/embed", &json!({"inputs": "a", "model": "clip-tiny"}))
        .await;
    let b = s
        .post_json("/embed", &json!({"inputs": "a", "model": "clip-tiny-2"}))
        .await;
    assert_eq!((a.status, b.status), (200, 200));
    assert_eq!(b.body["model"], "clip-tiny-2");
    assert_eq!(a.body["embeddings"], b.body["embeddings"]);
    let info = s.get("/info").await;
    assert_eq!(info.body["models"].as_array().unwrap().len(), 2);
    s.stop().await;
}

#[tokio::test]
async fn real_photos_embed_when_present() {
    if fixture_file("../shared/testdata/bge-vl-demo").is_none() {
        return;
    }
    let s = TestServer::ready(config(), Hooks::default()).await;
    let reference = reference();
    for demo in reference["demo_images"].as_array().unwrap().iter().take(3) {
        let Some(file) = fixture_file(demo["file"].as_str().unwrap()) else {
            continue;
        };
        let bytes = std::fs::read(&file).unwrap();
        let form = Form::new().part("image", Part::bytes(bytes.clone()).file_name("photo"));
        let r = s.post_form("/embed", form).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let got = floats(&r.body["embeddings"]).remove(0);
        let want = direct(&[Input::image(bytes)], true).remove(0);
        assert!(
            max_abs_diff(&got, &want) < tol::CLIP_F32,
            "{}",
            file.display()
        );
    }
    s.stop().await;
}

#[path = "http_api/responses.rs"]
mod responses;
