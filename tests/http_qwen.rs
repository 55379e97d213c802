//! The Qwen2-VL family served over HTTP: the tiny fixtures
//! (`tests/fixtures/qwen2-vl-tiny`, `qwen25-vl-tiny`) in every prompt format,
//! through /embed (JSON and multipart), /v1/embeddings and /score, equal to
//! the library's synchronous `Embedder` with the same settings; hostile image
//! sizes and the token, pixel and request budgets refused with a 4xx naming
//! the input; the embedding cache; `/info` (prompt format, pixel bounds,
//! fingerprint, startup probes); settings a family does not read refused.
//!
//! Parity of the numbers themselves with transformers is
//! `tests/parity_qwen.rs`; here the server must give the library's vectors.

mod common;

use std::time::Duration;

use common::*;
use reqwest::multipart::{Form, Part};
use serde_json::{json, Value};
use vlembed::app::Hooks;
use vlembed::config::{Config, ModelConfig};
use vlembed::embedder::Embedder;
use vlembed::input::{Content, Input, Role};
use vlembed::models::{DeviceSpec, LoadOptions, ModelSource, Precision};

/// Server and library run the same kernels on the same inputs, in batches
/// of other mates and padding: only the summation order may differ.
const SERVER_VS_LIBRARY: f32 = tol::SAME_MATH;

const INSTRUCTION: &str = "Retrieve the target image.";

fn fixture(dir: &str) -> String {
    repo()
        .join("tests/fixtures")
        .join(dir)
        .to_str()
        .unwrap()
        .to_string()
}

/// A served fixture model named `name`, the cache off.
fn model(name: &str, dir: &str, format: Option<&str>) -> ModelConfig {
    let mut m = ModelConfig::with_defaults(&fixture(dir)).unwrap();
    m.name = name.into();
    m.prompt_format = format.map(str::to_string);
    m.embedding_cache_bytes = 0;
    m
}

fn serving(models: Vec<ModelConfig>) -> Config {
    let mut c = config();
    c.models = models;
    c.validate().unwrap();
    c
}

/// The three formats: Qwen2-VL with its chat template and as GME, and
/// Qwen2.5-VL as BGE-VL-Screenshot.
fn formats() -> Vec<ModelConfig> {
    vec![
        model("chat", "qwen2-vl-tiny", None),
        model("gme", "qwen2-vl-tiny", Some("gme")),
        model("shot", "qwen25-vl-tiny", Some("screenshot")),
    ]
}

/// The library with a served model's settings.
fn library(m: &ModelConfig) -> Embedder {
    let opts = LoadOptions {
        prompt_format: m.prompt_format.clone(),
        min_pixels: m.min_pixels,
        max_pixels: m.max_pixels,
        max_input_tokens: m.max_input_tokens,
        ..Default::default()
    };
    let source = ModelSource::parse(&m.source, None);
    Embedder::load(&source, DeviceSpec::Cpu, &opts).unwrap()
}

fn png(width: u32, height: u32) -> Vec<u8> {
    let img = ::image::RgbImage::from_fn(width, height, |x, y| {
        ::image::Rgb([(x % 251) as u8, (y * 7 % 251) as u8, 90])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    ::image::DynamicImage::ImageRgb8(img)
        .write_to(&mut out, ::image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

fn photo() -> Vec<u8> {
    image("baseline_420_640x480.jpg")
}

fn wide() -> Vec<u8> {
    std::fs::read(repo().join("tests/fixtures/qwen-images/rgb_182x70.png")).unwrap()
}

/// The cases: each as the JSON /embed takes and as the library's input.
fn cases() -> Vec<(Value, Input)> {
    let composed = |role: Role, instruction: Option<&str>| {
        Input::new(Content::Composed {
            text: "make the background dark".into(),
            image: photo(),
        })
        .with_role(role)
        .with_instruction(instruction.map(str::to_string))
    };
    vec![
        (json!("a photo of a cat"), Input::text("a photo of a cat")),
        (json!({"image": b64(&wide())}), Input::image(wide())),
        (
            json!({"text": "make the background dark", "image": b64(&photo()),
                   "role": "query", "instruction": INSTRUCTION}),
            composed(Role::Query, Some(INSTRUCTION)),
        ),
        (
            json!({"text": "make the background dark", "image": b64(&photo())}),
            composed(Role::Candidate, None),
        ),
        (
            json!({"text": "a dog on a sofa", "role": "query", "instruction": INSTRUCTION}),
            Input::text("a dog on a sofa")
                .with_role(Role::Query)
                .with_instruction(Some(INSTRUCTION.into())),
        ),
    ]
}

async fn embed(s: &TestServer, model: &str, inputs: Value) -> Vec<Vec<f32>> {
    let r = s
        .post_json("/embed", &json!({"model": model, "inputs": inputs}))
        .await;
    assert_eq!(r.status, 200, "{model}: {}", r.text);
    floats(&r.body["embeddings"])
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Every format over /embed equals the library; a query with an
/// instruction is not its candidate; /info shows each model's settings and
/// its startup probes (digests equal to the library's).
#[tokio::test]
async fn every_format_is_served_like_the_library() {
    let models = formats();
    let s = TestServer::ready(serving(models.clone()), Hooks::default()).await;
    let info = s.get("/info").await;
    assert_eq!(info.status, 200, "{}", info.text);
    assert_conforms(&openapi(), "GET", "/info", 200, &info.body);
    let (cases_json, inputs): (Vec<Value>, Vec<Input>) = cases().into_iter().unzip();
    for (m, shown) in models.iter().zip(info.body["models"].as_array().unwrap()) {
        let lib = library(m);
        let want = lib.embed(&inputs, true, true).unwrap();
        let got = embed(&s, &m.name, Value::Array(cases_json.clone())).await;
        let mut worst = 0f32;
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            let d = max_abs_diff(g, w);
            assert!(d <= SERVER_VS_LIBRARY, "{} case {k}: {d}", m.name);
            worst = worst.max(d);
        }
        eprintln!(
            "{}: {} cases, server vs library max abs diff {worst:.2e}",
            m.name,
            got.len()
        );
        // Role and instruction matter: the composed query is not its candidate.
        assert!(max_abs_diff(&got[2], &got[3]) > 1e-3, "{}", m.name);
        // /info: the effective settings and the probes that ran at startup.
        assert_eq!(shown["status"], "ready");
        assert_eq!(shown["uses_instructions"], true);
        let lib_info = lib.info();
        assert_eq!(shown["prompt_format"], json!(lib_info.prompt_format));
        let bounds = lib_info.pixel_bounds.unwrap();
        assert_eq!(shown["min_pixels"], json!(bounds.min));
        assert_eq!(shown["max_pixels"], json!(bounds.max));
        assert_eq!(
            shown["fingerprint"]["sha256"],
            json!(lib_info.fingerprint.sha256)
        );
        let probes = vlembed::probe::prepare(&*lib.loaded.preprocessor, true).unwrap();
        let results = vlembed::probe::embed(&probes, |p| lib.embed_prepared(&[p], false)).unwrap();
        assert_eq!(results.len(), 3, "text, image, composed query");
        for r in &results {
            assert_eq!(
                shown["probes"]["digests"][r.name], r.digest,
                "{} probe {}",
                m.name, r.name
            );
        }
    }
    let by_name = |n: &str| {
        info.body["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == n)
            .unwrap()
            .clone()
    };
    let (chat, gme, shot) = (by_name("chat"), by_name("gme"), by_name("shot"));
    assert_eq!(
        (
            &chat["prompt_format"],
            &chat["min_pixels"],
            &chat["max_pixels"]
        ),
        (&json!("chat-template"), &json!(3136), &json!(50176))
    );
    // GME's own bounds (gme_inference.py: 256..1280 tokens of 28x28).
    assert_eq!(
        (
            &gme["prompt_format"],
            &gme["min_pixels"],
            &gme["max_pixels"]
        ),
        (&json!("gme"), &json!(200704), &json!(1003520))
    );
    assert_eq!(shot["prompt_format"], "screenshot");
    assert_eq!(shot["architecture"], "Qwen2_5_VLForConditionalGeneration");
    // Same weights, another format: another prompt and other bounds.
    assert_ne!(chat["fingerprint"]["prompt"], gme["fingerprint"]["prompt"]);
    assert_ne!(
        chat["fingerprint"]["preprocessing"],
        gme["fingerprint"]["preprocessing"]
    );
    assert_eq!(
        chat["fingerprint"]["weights"],
        gme["fingerprint"]["weights"]
    );
    s.stop().await;
}

/// multipart /embed, /v1/embeddings and /score give /embed's vectors.
#[tokio::test]
async fn multipart_openai_and_score_agree_with_embed() {
    let s = TestServer::ready(serving(formats()), Hooks::default()).await;
    let doc = openapi();
    for name in ["chat", "gme", "shot"] {
        let json_vecs = embed(
            &s,
            name,
            json!([
                {"text": "make the background dark", "image": b64(&photo()),
                 "role": "query", "instruction": INSTRUCTION},
                "a photo of a cat",
                {"image": b64(&wide())},
            ]),
        )
        .await;
        let form = Form::new()
            .text("model", name)
            .text("role", "query")
            .text("instruction", INSTRUCTION)
            .text("text", "make the background dark")
            .part("image", Part::bytes(photo()).file_name("photo.jpg"));
        let r = s.post_form("/embed", form).await;
        assert_eq!(r.status, 200, "{name}: {}", r.text);
        assert_conforms(&doc, "POST", "/embed", 200, &r.body);
        let multipart = floats(&r.body["embeddings"]).remove(0);
        assert!(max_abs_diff(&multipart, &json_vecs[0]) <= SERVER_VS_LIBRARY);

        let r = s
            .post_json(
                "/v1/embeddings",
                &json!({"model": name, "input": "a photo of a cat"}),
            )
            .await;
        assert_eq!(r.status, 200, "{name}: {}", r.text);
        assert_conforms(&doc, "POST", "/v1/embeddings", 200, &r.body);
        let openai = vector(&r.body["data"][0]["embedding"]);
        assert!(max_abs_diff(&openai, &json_vecs[1]) <= SERVER_VS_LIBRARY);
        assert!(r.body["usage"]["prompt_tokens"].as_u64().unwrap() > 4);

        let r = s
            .post_json(
                "/score",
                &json!({"model": name,
                        "query": {"text": "make the background dark", "image": b64(&photo()),
                                  "instruction": INSTRUCTION},
                        "candidates": ["a photo of a cat", {"image": b64(&wide())}],
                        "top_k": 2}),
            )
            .await;
        assert_eq!(r.status, 200, "{name}: {}", r.text);
        assert_conforms(&doc, "POST", "/score", 200, &r.body);
        let scores = vector(&r.body["scores"]);
        for (k, score) in scores.iter().enumerate() {
            let want = dot(&json_vecs[0], &json_vecs[k + 1]);
            assert!(
                (score - want).abs() <= 1e-5,
                "{name} candidate {k}: {score} vs {want}"
            );
        }
    }
    s.stop().await;
}

/// Inputs over the model's limits are refused with a 4xx that names the
/// input, before the image is decoded where the header tells.
#[tokio::test]
async fn hostile_sizes_and_budgets_are_refused_naming_the_input() {
    let mut tight = model("tight", "qwen25-vl-tiny", None);
    tight.max_input_tokens = Some(60);
    tight.max_image_pixels = 400_000;
    tight.max_request_image_pixels = 500_000;
    let s = TestServer::ready(
        serving(vec![
            model("chat", "qwen2-vl-tiny", None),
            model("gme", "qwen2-vl-tiny", Some("gme")),
            tight,
        ]),
        Hooks::default(),
    )
    .await;
    let refused = |r: &Reply, status: u16, at: &str, says: &str| {
        assert_eq!(r.status, status, "{}", r.text);
        assert!(
            r.error_message().starts_with(at) && r.error_message().contains(says),
            "{at} / {says}: {}",
            r.text
        );
    };
    let post = |model: &str, inputs: Value| {
        let body = json!({"model": model, "inputs": inputs});
        let s = &s;
        async move { s.post_json("/embed", &body).await }
    };
    // A side under 28 pixels, from the header: smart_resize refuses it.
    for (w, h) in [(32768, 1), (1, 32768), (27, 400)] {
        let r = post("chat", json!(["a cat", {"image": b64(&png(w, h))}])).await;
        refused(&r, 422, "inputs[1].image", "at least 28 pixels");
    }
    // An aspect ratio over 200 (transformers raises).
    let r = post("chat", json!([{"image": b64(&png(6000, 28))}])).await;
    refused(&r, 422, "inputs[0].image", "aspect ratio");
    // GME clamps instead (qwen_vl_utils' fetch_image): 32768x1 is 5600x28, then
    // GME's bounds.
    let r = post("gme", json!([{"image": b64(&png(32768, 1))}])).await;
    assert_eq!(r.status, 200, "{}", r.text);
    // The model's decode limit, from the header.
    let r = post("tight", json!(["ok", {"image": b64(&png(800, 600))}])).await;
    refused(
        &r,
        422,
        "inputs[1].image",
        "over the limit of 400000 pixels",
    );
    // The request's decode budget, from the headers, before any job runs.
    let three = json!([{"image": b64(&png(500, 400))}, {"image": b64(&png(500, 400))},
                       {"image": b64(&png(500, 400))}]);
    let jobs = |text: &str| {
        let name = "vlembed_preprocess_duration_seconds_count{modality=\"image\",model=\"tight\"}";
        metric(text, name).unwrap_or(0.0)
    };
    let before = jobs(&s.metrics().await);
    let r = post("tight", three).await;
    assert_eq!(
        jobs(&s.metrics().await),
        before,
        "an image was preprocessed"
    );
    assert_eq!(r.status, 413, "{}", r.text);
    assert!(
        r.error_message().contains("max_request_image_pixels"),
        "{}",
        r.text
    );
    // max_input_tokens counts image tokens: 640x480 is 54 tokens here and,
    // with the template, over 60 whatever the text.
    let r = post("tight", json!([{"image": b64(&photo())}])).await;
    refused(&r, 413, "inputs[0].image", "54 of them for the image");
    let r = post(
        "tight",
        json!([{"text": "word ".repeat(300), "image": b64(&png(56, 56))}]),
    )
    .await;
    assert_eq!(r.status, 200, "truncated to fit: {}", r.text);
    let r = s
        .post_json(
            "/embed",
            &json!({"model": "tight", "truncate": false,
                    "inputs": [{"text": "word ".repeat(300), "image": b64(&png(56, 56))}]}),
        )
        .await;
    refused(
        &r,
        413,
        "inputs[0].text",
        "over the model's limit of 60 tokens",
    );
    // An image placeholder in the text of an input with an image.
    let r = post(
        "chat",
        json!([{"text": "see <|image_pad|>", "image": b64(&png(56, 56))}]),
    )
    .await;
    refused(&r, 422, "inputs[0].image", "<|image_pad|>");
    s.stop().await;
}

/// With the cache on, an input seen before gives the same vector, bit for
/// bit, without a forward pass; another instruction is another entry.
#[tokio::test]
async fn the_cache_answers_identical_inputs_identically() {
    let mut m = model("gme", "qwen2-vl-tiny", Some("gme"));
    m.embedding_cache_bytes = 1 << 20;
    let s = TestServer::ready(serving(vec![m]), Hooks::default()).await;
    let hits = |text: &str| {
        metric(text, "vlembed_embedding_cache_hits_total{model=\"gme\"}").unwrap_or(0.0)
    };
    let query = |instruction: &str| {
        json!([{"text": "make the background dark", "image": b64(&photo()),
                "role": "query", "instruction": instruction}])
    };
    let first = embed(&s, "gme", query(INSTRUCTION)).await;
    let before = hits(&s.metrics().await);
    let again = embed(&s, "gme", query(INSTRUCTION)).await;
    assert_eq!(hits(&s.metrics().await) - before, 1.0);
    assert_eq!(
        first[0].iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        again[0].iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    let other = embed(&s, "gme", query("Find a similar photo.")).await;
    assert_eq!(hits(&s.metrics().await) - before, 1.0);
    assert!(max_abs_diff(&other[0], &first[0]) > 1e-4);
    s.stop().await;
}

/// Configured pixel bounds reach the preprocessor (fewer image tokens, other
/// vectors, shown by /info); a setting the model's family does not read
/// stops the server naming it.
#[tokio::test]
async fn settings_reach_the_model_or_are_refused() {
    let mut small = model("small", "qwen2-vl-tiny", None);
    small.min_pixels = Some(784);
    small.max_pixels = Some(3136);
    let half = |name: &str, dtype: Precision| {
        let mut m = model(name, "qwen25-vl-tiny", None);
        m.dtype = dtype;
        m.dtype_auto = false;
        m
    };
    let s = TestServer::ready(
        serving(vec![
            model("chat", "qwen2-vl-tiny", None),
            small.clone(),
            model("f32", "qwen25-vl-tiny", None),
            half("f16", Precision::F16),
            half("bf16", Precision::Bf16),
        ]),
        Hooks::default(),
    )
    .await;
    let info = s.get("/info").await;
    let shown = &info.body["models"][1];
    assert_eq!(
        (&shown["min_pixels"], &shown["max_pixels"]),
        (&json!(784), &json!(3136))
    );
    let input = json!([{"image": b64(&photo())}]);
    let full = embed(&s, "chat", input.clone()).await;
    let bounded = embed(&s, "small", input).await;
    assert!(max_abs_diff(&full[0], &bounded[0]) > 1e-3);
    let want = library(&small)
        .embed(&[Input::image(photo())], true, true)
        .unwrap();
    assert!(max_abs_diff(&bounded[0], &want[0]) <= SERVER_VS_LIBRARY);
    // f16 and bf16 replicas on the CPU stay close to f32 (the parity suite
    // bounds them against transformers; this tiny random model has sharp
    // attention, so the bounds are loose).
    let (inputs, _): (Vec<Value>, Vec<Input>) = cases().into_iter().unzip();
    let reference = embed(&s, "f32", Value::Array(inputs.clone())).await;
    for (name, bound) in [("f16", 0.999), ("bf16", 0.99)] {
        let got = embed(&s, name, Value::Array(inputs.clone())).await;
        let worst = got
            .iter()
            .zip(&reference)
            .map(|(g, r)| cosine(g, r))
            .fold(1f64, f64::min);
        assert!(worst >= bound, "{name}: worst cosine {worst}");
        assert!(worst < 1.0, "{name} ran in f32");
    }
    s.stop().await;

    let mut clip = ModelConfig::with_defaults(fixture_model().to_str().unwrap()).unwrap();
    clip.prompt_format = Some("gme".into());
    let s = TestServer::start(serving(vec![clip]), Hooks::default()).await;
    let err = tokio::time::timeout(Duration::from_secs(20), s.handle.wait())
        .await
        .expect("the server stops when a model cannot load")
        .unwrap_err();
    let err = err.to_string();
    assert!(
        err.contains("prompt_format") && err.contains("CLIPModel"),
        "{err}"
    );
    let mut bad = model("bad", "qwen2-vl-tiny", Some("chat_template"));
    bad.max_pixels = Some(100);
    let s = TestServer::start(serving(vec![bad]), Hooks::default()).await;
    let err = tokio::time::timeout(Duration::from_secs(20), s.handle.wait())
        .await
        .expect("the server stops when a model cannot load")
        .unwrap_err();
    let err = err.to_string();
    assert!(
        err.contains("unknown prompt_format \"chat_template\""),
        "{err}"
    );
}
