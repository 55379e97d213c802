//! Hostile requests against a real server (issue 9's table, the rows about
//! bodies, texts, error messages and bad inputs): each gets its status, and
//! the work it caused is bounded, checked through the server's own counters
//! (inputs built by the body parser, preprocessing jobs run) and loose time
//! bounds. Every input is generated here.

mod common;

use std::time::{Duration, Instant};

use common::*;
use reqwest::multipart::{Form, Part};
use serde_json::json;
use tokio::sync::Mutex;
use vlembed::app::Hooks;
use vlembed::http::inputs::parsed_inputs;

/// The tests read process-wide counters: one at a time.
static SERIAL: Mutex<()> = Mutex::const_new(());

const IMAGE_JOBS: &str =
    "vlembed_preprocess_duration_seconds_count{modality=\"image\",model=\"clip-tiny\"}";

async fn image_jobs(s: &TestServer) -> f64 {
    metric(&s.metrics().await, IMAGE_JOBS).unwrap_or(0.0)
}

#[tokio::test]
async fn a_body_of_millions_of_inputs_is_refused_at_the_limit() {
    let _serial = SERIAL.lock().await;
    let s = TestServer::ready(config(), Hooks::default()).await;
    // 16 MiB of "" items: 5.6 M inputs in the old parser's hands.
    let mut body = b"{\"inputs\": [".to_vec();
    while body.len() < (16 << 20) - 16 {
        body.extend_from_slice(b"\"\",");
    }
    body.extend_from_slice(b"\"\"]}");
    let before = parsed_inputs();
    let start = Instant::now();
    let r = s
        .post_raw("/embed", Some("application/json"), body.clone())
        .await;
    let elapsed = start.elapsed();
    let built = parsed_inputs() - before;
    assert_eq!(r.status, 413, "{}", r.text);
    assert!(
        r.error_message()
            .contains("inputs: more than 256 inputs, over the limit of 256"),
        "{}",
        r.text
    );
    assert!(built <= 256, "{built} inputs built for a refused request");
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    // /v1/embeddings and /score read their lists the same way.
    let before = parsed_inputs();
    let r = s
        .post_raw(
            "/v1/embeddings",
            Some("application/json"),
            [b"{\"input\": [".as_slice(), &body[12..]].concat(),
        )
        .await;
    assert_eq!(r.status, 413, "{}", r.text);
    assert!(parsed_inputs() - before <= 256);
    // (7 items fewer, to stay under the body limit)
    let candidates = [
        b"{\"query\": \"q\", \"candidates\": [".as_slice(),
        &body[12 + 7 * 3..],
    ]
    .concat();
    let r = s
        .post_raw("/score", Some("application/json"), candidates)
        .await;
    assert_eq!(r.status, 413, "{}", r.text);
    assert!(
        r.error_message().contains("more than 255 candidates"),
        "{}",
        r.text
    );
    s.stop().await;
}

#[tokio::test]
async fn huge_texts_are_refused_or_cut_before_tokenising() {
    let _serial = SERIAL.lock().await;
    let s = TestServer::ready(config(), Hooks::default()).await;
    let text = "word ".repeat(3_000_000);
    // Over max_text_chars (65536 by default): 413 before any tokenisation.
    let start = Instant::now();
    let r = s.post_json("/embed", &json!({"inputs": [text]})).await;
    assert_eq!(r.status, 413, "{}", r.text);
    assert!(
        r.error_message().contains(
            "inputs[0].text: the text is 15000000 characters long, over the limit of 65536 characters (server.max_text_chars)"
        ),
        "{}",
        r.text
    );
    assert!(start.elapsed() < Duration::from_secs(10));
    s.stop().await;

    // With the limit raised, truncate=true keeps 77 tokens from a cut prefix
    // (seconds of tokenising before: now bounded by the prefix).
    let mut c = config();
    c.server.max_text_chars = 16 << 20;
    let s = TestServer::ready(c, Hooks::default()).await;
    let start = Instant::now();
    let r = s.post_json("/embed", &json!({"inputs": [text]})).await;
    let elapsed = start.elapsed();
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["usage"]["text_tokens"], 77);
    let short = s
        .post_json("/embed", &json!({"inputs": ["word ".repeat(100)]}))
        .await;
    assert_eq!(
        floats(&r.body["embeddings"]),
        floats(&short.body["embeddings"])
    );
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    // truncate=false counts every token (bounded by max_text_chars) and says so.
    let r = s
        .post_json(
            "/embed",
            &json!({"inputs": ["word ".repeat(20_000)], "truncate": false}),
        )
        .await;
    assert_eq!(r.status, 413, "{}", r.text);
    assert!(
        r.error_message().contains("20002 tokens long"),
        "{}",
        r.text
    );
    s.stop().await;
}

#[tokio::test]
async fn client_strings_are_cut_in_error_messages() {
    let _serial = SERIAL.lock().await;
    let s = TestServer::ready(config(), Hooks::default()).await;
    let name = "m".repeat(4 << 20);
    let r = s
        .post_json("/embed", &json!({"inputs": "a", "model": name}))
        .await;
    assert_eq!(r.status, 404, "{}", &r.text[..r.text.len().min(300)]);
    assert!(r.text.len() < 512, "{} bytes echoed", r.text.len());
    assert!(r.error_message().contains("(cut, 4194304 bytes in all)"));
    let r = s
        .post_json("/embed", &json!({"inputs": [{"text": "a", "role": name}]}))
        .await;
    assert_eq!(r.status, 400);
    assert!(r.text.len() < 512, "{} bytes echoed", r.text.len());
    // Multipart: a field that is neither text nor image is small.
    let form = Form::new().text("model", name.clone()).text("text", "a");
    let r = s.post_form("/embed", form).await;
    assert_eq!(r.status, 413, "{}", &r.text[..r.text.len().min(300)]);
    assert!(r.error_message().contains("\"model\""), "{}", r.text);
    assert!(r.text.len() < 512);
    let form = Form::new().text(name.clone(), "a");
    let r = s.post_form("/embed", form).await;
    assert!(r.status == 400 || r.status == 413, "{}", r.status);
    assert!(r.text.len() < 512, "{} bytes echoed", r.text.len());
    s.stop().await;
}

#[tokio::test]
async fn multipart_limits_apply_while_parts_are_read() {
    let _serial = SERIAL.lock().await;
    let mut c = config();
    c.server.max_inputs_per_request = 8;
    c.server.max_text_chars = 100;
    c.server.max_image_bytes = 50_000;
    let s = TestServer::ready(c, Hooks::default()).await;
    let mut form = Form::new();
    for _ in 0..9 {
        form = form.text("text", "a");
    }
    let r = s.post_form("/embed", form).await;
    assert_eq!(r.status, 413, "{}", r.text);
    assert!(
        r.error_message().contains("more than 8 \"text\" parts"),
        "{}",
        r.text
    );
    let mut form = Form::new();
    for _ in 0..40 {
        form = form.text("role", "query");
    }
    let r = s.post_form("/embed", form).await;
    assert_eq!(r.status, 413, "{}", r.text);
    assert!(
        r.error_message().contains("more than 32 parts"),
        "{}",
        r.text
    );
    let form = Form::new().text("text", "é".repeat(101));
    let r = s.post_form("/embed", form).await;
    assert_eq!(r.status, 413, "{}", r.text);
    assert!(r.error_message().contains("server.max_text_chars"));
    let form = Form::new().text("text", "é".repeat(100));
    assert_eq!(s.post_form("/embed", form).await.status, 200);
    let form = Form::new().part(
        "candidate_image",
        Part::bytes(vec![0u8; 50_001]).file_name("x.png"),
    );
    let r = s.post_form("/score", form).await;
    assert_eq!(r.status, 413, "{}", r.text);
    assert!(r.error_message().contains("server.max_image_bytes"));
    // JSON: the same limits.
    let r = s
        .post_json(
            "/embed",
            &json!({"inputs": [{"image": b64(&[1u8; 50_001])}]}),
        )
        .await;
    assert_eq!(r.status, 413, "{}", r.text);
    s.stop().await;
}

#[tokio::test]
async fn a_request_stops_at_its_first_bad_image() {
    let _serial = SERIAL.lock().await;
    let c = config(); // two preprocessing threads
    let s = TestServer::ready(c, Hooks::default()).await;
    let bad = b64(b"\xff\xd8\xff\xe0 this is not a JPEG at all");
    let good = b64(&image("rgb_225x223.png"));
    // 256 bad images: only the first ones (as many as run at once) are tried.
    let before = image_jobs(&s).await;
    let inputs: Vec<_> = (0..256).map(|_| json!({"image": bad})).collect();
    let r = s.post_json("/embed", &json!({"inputs": inputs})).await;
    assert_eq!(r.status, 422, "{}", r.text);
    assert!(
        r.error_message().starts_with("inputs[0].image"),
        "{}",
        r.text
    );
    let tried = image_jobs(&s).await - before;
    assert!(tried <= 4.0, "{tried} of 256 images were decoded");
    // A bad image after good ones is named by its index.
    let before = image_jobs(&s).await;
    let mut inputs: Vec<_> = (0..3).map(|_| json!({"image": good})).collect();
    inputs.extend((0..200).map(|_| json!({"image": bad})));
    let r = s.post_json("/embed", &json!({"inputs": inputs})).await;
    assert_eq!(r.status, 422, "{}", r.text);
    assert!(
        r.error_message().starts_with("inputs[3].image"),
        "{}",
        r.text
    );
    let tried = image_jobs(&s).await - before;
    assert!(tried <= 7.0, "{tried} of 203 images were decoded");
    // The server is fine afterwards.
    let r = s
        .post_json("/embed", &json!({"inputs": [{"image": good}]}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    s.stop().await;
}

/// A JPEG of a few hundred bytes whose frame header claims `width` x
/// `height`: a real 16x16 JPEG with its size rewritten and its scan data
/// dropped (the header is all the request budget reads).
fn claiming_jpeg(width: u16, height: u16) -> Vec<u8> {
    let img = ::image::RgbImage::from_fn(16, 16, |x, y| {
        ::image::Rgb([(x * 16) as u8, (y * 16) as u8, ((x + y) * 8) as u8])
    });
    let mut small = std::io::Cursor::new(Vec::new());
    ::image::DynamicImage::ImageRgb8(img)
        .write_to(&mut small, ::image::ImageFormat::Jpeg)
        .unwrap();
    let small = small.into_inner();
    let mut out = small[..2].to_vec();
    let mut at = 2;
    loop {
        assert_eq!(small[at], 0xff);
        let marker = small[at + 1];
        let len = usize::from(u16::from_be_bytes([small[at + 2], small[at + 3]]));
        let mut segment = small[at..at + 2 + len].to_vec();
        if marker == 0xc0 {
            segment[5..7].copy_from_slice(&height.to_be_bytes());
            segment[7..9].copy_from_slice(&width.to_be_bytes());
        }
        out.extend_from_slice(&segment);
        at += 2 + len;
        if marker == 0xda {
            break;
        }
    }
    out.extend_from_slice(&[0xff, 0xd9]);
    out
}

#[tokio::test]
async fn images_declaring_too_many_pixels_are_refused_before_decoding() {
    let _serial = SERIAL.lock().await;
    let s = TestServer::ready(config(), Hooks::default()).await;
    // 256 images of ~600 bytes, each claiming 6324x6324 (40 MP, under the
    // per-image cap): 10 GP in all against the default 100 MP budget.
    let big = claiming_jpeg(6324, 6324);
    assert!(big.len() < 1000, "{}", big.len());
    let inputs: Vec<_> = (0..256).map(|_| json!({"image": b64(&big)})).collect();
    let before = image_jobs(&s).await;
    let start = Instant::now();
    let r = s.post_json("/embed", &json!({"inputs": inputs})).await;
    let elapsed = start.elapsed();
    assert_eq!(r.status, 413, "{}", r.text);
    assert_eq!(r.error_type(), "payload_too_large");
    assert!(
        r.error_message().contains(
            "over the per-request budget of 100000000 pixels (model_defaults.max_request_image_pixels"
        ),
        "{}",
        r.text
    );
    assert_eq!(image_jobs(&s).await - before, 0.0, "an image was decoded");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    // A bad header anywhere stops the request at its input, before decoding.
    let good = b64(&image("rgb_225x223.png"));
    let inputs = json!([{"image": good}, "a cat", {"image": b64(b"\x89PNG\r\n\x1a\n junk")}]);
    let before = image_jobs(&s).await;
    let r = s.post_json("/embed", &json!({"inputs": inputs})).await;
    assert_eq!(r.status, 422, "{}", r.text);
    assert!(
        r.error_message().starts_with("inputs[2].image"),
        "{}",
        r.text
    );
    assert_eq!(image_jobs(&s).await - before, 0.0);
    // Every fixture format passes the header check and embeds.
    let mut names: Vec<_> = std::fs::read_dir(repo().join("tests/fixtures/images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert!(names.len() >= 10, "{names:?}");
    let inputs: Vec<_> = names
        .iter()
        .map(|n| json!({"image": b64(&image(n))}))
        .collect();
    let r = s.post_json("/embed", &json!({"inputs": inputs})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["embeddings"].as_array().unwrap().len(), names.len());
    s.stop().await;

    // The budget is the model's setting: two images fit, three do not.
    let mut c = config();
    c.models[0].max_request_image_pixels = 2 * 225 * 223;
    let s = TestServer::ready(c, Hooks::default()).await;
    let two = json!({"inputs": [{"image": good}, "a cat", {"image": good}]});
    let r = s.post_json("/embed", &two).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["embeddings"].as_array().unwrap().len(), 3);
    let three = json!({"inputs": [{"image": good}, {"image": good}, {"image": good}]});
    let before = image_jobs(&s).await;
    let r = s.post_json("/embed", &three).await;
    assert_eq!(r.status, 413, "{}", r.text);
    assert!(
        r.error_message()
            .contains("at least 150525 pixels in all (the first 3 of them)"),
        "{}",
        r.text
    );
    assert_eq!(image_jobs(&s).await - before, 0.0);
    s.stop().await;
}

/// `max_input_tokens` reaches the MLLM: the same long text fits the default
/// prompt budget and is refused (or cut) under a smaller one.
#[tokio::test]
async fn the_mllm_prompt_budget_is_the_models_max_input_tokens() {
    let _serial = SERIAL.lock().await;
    let mllm = |tokens: Option<usize>| {
        let mut c = config();
        let mut m = vlembed::config::ModelConfig::with_defaults(
            repo().join("tests/fixtures/mllm-tiny-a").to_str().unwrap(),
        )
        .unwrap();
        m.name = "mllm".into();
        m.max_input_tokens = tokens;
        c.models = vec![m];
        c.validate().unwrap();
        c
    };
    let text = "word ".repeat(1500);
    let s = TestServer::ready(mllm(None), Hooks::default()).await;
    let r = s
        .post_json("/embed", &json!({"inputs": [text], "truncate": false}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    s.stop().await;

    let s = TestServer::ready(mllm(Some(1000)), Hooks::default()).await;
    let r = s
        .post_json("/embed", &json!({"inputs": [text], "truncate": false}))
        .await;
    assert_eq!(r.status, 413, "{}", r.text);
    assert!(
        r.error_message()
            .contains("over the model's limit of 1000 tokens"),
        "{}",
        r.text
    );
    let r = s
        .post_json("/embed", &json!({"inputs": [text], "truncate": true}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let used = r.body["usage"]["text_tokens"].as_u64().unwrap();
    assert!((900..=1000).contains(&used), "{used} tokens");
    s.stop().await;
}

/// The process's peak resident memory (VmHWM), in bytes. The server runs in
/// this process, so its allocations show here.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A grey 8-bit PNG of `width` x `height`, a gradient along the long side.
fn grey_png(width: u32, height: u32) -> Vec<u8> {
    let img =
        ::image::GrayImage::from_fn(width, height, |x, y| ::image::Luma([((x + y) % 251) as u8]));
    let mut out = std::io::Cursor::new(Vec::new());
    ::image::DynamicImage::ImageLuma8(img)
        .write_to(&mut out, ::image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

/// The image rows of issue 9's table: a small PNG of 32768x1 (and
/// 1x32768) is embedded without materialising the 7,340,032 x 224 image the
/// full resize would make (it took +5 GB before; the peak of this whole test
/// process must stay under 1 GB); a JPEG whose header claims 6324x6324 over
/// an empty scan, and a real JPEG cut in half, are refused (422) like Pillow
/// refuses truncated files.
#[tokio::test]
async fn extreme_aspect_and_truncated_images_cost_little() {
    let _serial = SERIAL.lock().await;
    let s = TestServer::ready(config(), Hooks::default()).await;
    for (w, h) in [(32768, 1), (1, 32768)] {
        let png = grey_png(w, h);
        assert!(png.len() < 64 << 10, "{w}x{h}: {} bytes", png.len());
        let r = s
            .post_json("/embed", &json!({"inputs": [{"image": b64(&png)}]}))
            .await;
        assert_eq!(r.status, 200, "{w}x{h}: {}", r.text);
    }
    let peak = peak_rss();
    assert!(
        peak < 1 << 30,
        "peak RSS {} MB after the extreme-aspect PNGs",
        peak >> 20
    );
    let r = s
        .post_json(
            "/embed",
            &json!({"inputs": [{"image": b64(&claiming_jpeg(6324, 6324))}]}),
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.text);
    assert!(
        r.error_message().starts_with("inputs[0].image"),
        "{}",
        r.text
    );
    let jpeg = image("baseline_420_640x480.jpg");
    let half = b64(&jpeg[..jpeg.len() / 2]);
    let r = s
        .post_json("/embed", &json!({"inputs": [{"image": half}]}))
        .await;
    assert_eq!(r.status, 422, "{}", r.text);
    assert!(r.text.contains("truncated"), "{}", r.text);
    s.stop().await;
}
