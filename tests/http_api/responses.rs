//! Every typed response body checked against openapi.yaml without a server
//! (a module of `http_api.rs`).

use super::*;

/// Every typed response body (`vlembed::http::responses`) in each of its
/// forms matches the schema openapi.yaml gives its endpoint and status,
/// without a server: the handlers build their bodies only from these types.
#[test]
fn every_response_type_conforms_to_openapi() {
    use std::collections::BTreeMap;
    use vlembed::http::responses::*;

    let doc = openapi();
    let check = |method: &str, path: &str, status: u16, body: &dyn erased::Body| {
        let mut body = body.value();
        if status >= 400 {
            // The access-log middleware adds the request id to every JSON
            // error object on its way out; the handler's body lacks it.
            body["error"]["request_id"] = "0123456789abcdef".into();
        }
        assert_conforms(&doc, method, path, status, &body);
    };
    let floats = || Embedding::Float(Floats(vec![0.1, -0.5, 0.25]));
    let base64 = || Embedding::Base64("zczMPQAAAL8AAIA+".into());

    check(
        "POST",
        "/embed",
        200,
        &EmbedResponse {
            dimensions: 3,
            embeddings: vec![floats(), floats()],
            model: "clip-tiny".into(),
            usage: EmbedUsage {
                images: 1,
                inputs: 2,
                text_tokens: 5,
            },
        },
    );
    check(
        "POST",
        "/embed",
        200,
        &EmbedResponse {
            dimensions: 3,
            embeddings: vec![base64()],
            model: "clip-tiny".into(),
            usage: EmbedUsage {
                images: 0,
                inputs: 1,
                text_tokens: 5,
            },
        },
    );
    for ranking in [
        None,
        Some(vec![Ranked {
            index: 1,
            score: 0.5,
        }]),
    ] {
        check(
            "POST",
            "/score",
            200,
            &ScoreResponse {
                model: "clip-tiny".into(),
                ranking,
                scores: Floats(vec![0.25, 0.5]),
            },
        );
    }
    for embedding in [floats(), base64()] {
        check(
            "POST",
            "/v1/embeddings",
            200,
            &OpenAiResponse {
                data: vec![OpenAiEmbedding {
                    embedding,
                    index: 0,
                    object: "embedding",
                }],
                model: "clip-tiny".into(),
                object: "list",
                usage: OpenAiUsage {
                    prompt_tokens: 4,
                    total_tokens: 4,
                },
            },
        );
    }
    let problem = |message: &str| Problem {
        message: message.into(),
        kind: "unavailable",
    };
    check(
        "GET",
        "/health",
        200,
        &HealthResponse {
            error: None,
            status: "ok",
        },
    );
    check(
        "GET",
        "/health",
        503,
        &HealthResponse {
            error: Some(problem("unhealthy: the workers of m failed for good")),
            status: "unhealthy",
        },
    );
    let models = |status: &'static str| BTreeMap::from([("clip-tiny".to_string(), status)]);
    check(
        "GET",
        "/ready",
        200,
        &ReadyResponse {
            error: None,
            models: models("ready"),
            status: "ready",
        },
    );
    for status in ["loading", "unavailable", "shutting_down"] {
        check(
            "GET",
            "/ready",
            503,
            &ReadyResponse {
                error: Some(problem("not ready: clip-tiny is loading")),
                models: models("loading"),
                status,
            },
        );
    }
    let model = |loaded: bool| ModelInfo {
        architecture: loaded.then_some("clip"),
        auto: vec!["dtype", "max_batch_cost"],
        batching: BatchingInfo {
            decoder_group_tokens: 16384,
            max_batch_cost: 8192,
            max_batch_size: 32,
            max_delay_ms: 5,
            max_queue_inputs: 1024,
            refill_wait_ms: 10,
            vision_tile_chunk: 32,
        },
        cpu_backend: loaded.then(|| vlembed::models::BackendChoice {
            backend: vlembed::models::Backend::Onednn,
            requested: vlembed::models::CpuBackend::Auto,
            reason: "measured f32 per layer: native 2.0 ms, oneDNN 1.0 ms; oneDNN faster".into(),
            onednn: Some("oneDNN 2.6.3 (avx512_core_amx)".into()),
            native_ms: Some(2.0),
            onednn_ms: Some(1.0),
        }),
        device_class: "cpu",
        devices: vec!["cpu".into()],
        dimensions: loaded.then_some(16),
        dtype: "f32",
        error: (!loaded).then(|| "cannot read config.json".to_string()),
        live_workers: usize::from(loaded),
        max_image_pixels: 1 << 24,
        max_input_tokens: None,
        max_request_image_pixels: 100_000_000,
        max_text_tokens: loaded.then_some(77),
        name: "clip-tiny".into(),
        max_pixels: loaded.then_some(1_003_520),
        min_pixels: loaded.then_some(3136),
        prompt_format: loaded.then_some("gme"),
        source: "tests/fixtures/clip-tiny".into(),
        status: if loaded { "ready" } else { "failed" },
        uses_instructions: loaded.then_some(false),
        fingerprint: None,
        probes: None,
        embedding_cache: vlembed::http::responses::EmbeddingCacheInfo {
            capacity_bytes: 0,
            bytes: 0,
            entries: 0,
        },
    };
    check(
        "GET",
        "/info",
        200,
        &InfoResponse {
            auth: false,
            limits: InfoLimits {
                image_urls: false,
                max_body_bytes: 1 << 20,
                max_image_bytes: 16_777_216,
                max_inputs_per_request: 64,
                max_text_chars: 65_536,
                request_timeout_ms: 30_000,
            },
            models: vec![model(true), model(false)],
            server: InfoServer {
                allow_tf32: true,
                cuda_build: true,
                preprocess_threads: 13,
                preprocess_threads_auto: true,
            },
            version: env!("CARGO_PKG_VERSION"),
        },
    );
}

/// Lets the test above pass bodies of different types to one closure.
mod erased {
    pub trait Body {
        fn value(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Body for T {
        fn value(&self) -> serde_json::Value {
            serde_json::to_value(self).expect("a response body serialises")
        }
    }
}
