//! The JSON bodies of the success responses of `/embed`, `/score`,
//! `/v1/embeddings` and `/info`, and of `/health` and `/ready` (both their
//! 200 and 503 forms), as typed structs: the shapes openapi.yaml's schemas
//! describe, checked against them by `tests/http_api.rs`.
//!
//! Owns field names, their order and how numbers are written, including how
//! one embedding is written for each `encoding_format` ([`Embedding::encode`],
//! with the quantisers of [`crate::vector`]). It builds no response status or
//! headers and computes nothing else (that is [`super::handlers`]); error
//! bodies of failed requests are [`super::error`]'s.
//!
//! Fields are in alphabetical order (as the `serde_json::json!` bodies these
//! replaced had them). Floats are written as the shortest decimal that reads
//! back as the same f32 (`0.1f32` as `0.1`, not the f64 it widens to,
//! `0.10000000149011612`): the vectors are f32, the extra digits carried no
//! information, and they made a 768-dimension response ~1.7x larger and
//! slower to write and parse. A client parsing either form gets the same f32.

use std::collections::BTreeMap;

use serde::{Serialize, Serializer};

use super::inputs::encode_embedding;
use super::requests::EncodingFormat;
use crate::vector;

/// A vector of floats, each written as the shortest decimal of its f32 (see
/// the module comment).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Floats(pub Vec<f32>);

impl Serialize for Floats {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter())
    }
}

/// One embedding as `encoding_format` asks: floats, base64 of the
/// little-endian f32 bytes, or quantised integers (README "Output
/// encodings").
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Embedding {
    Float(Floats),
    Base64(String),
    /// `int8` and `binary` (packed sign bits as `ubinary - 128`).
    Int8(Vec<i8>),
    /// `uint8` and `ubinary` (packed sign bits, first dimension in the
    /// most significant bit).
    Uint8(Vec<u8>),
}

impl Embedding {
    /// Writes `v` as `format` asks.
    pub fn encode(v: Vec<f32>, format: EncodingFormat) -> Embedding {
        match format {
            EncodingFormat::Float => Embedding::Float(Floats(v)),
            EncodingFormat::Base64 => Embedding::Base64(encode_embedding(&v)),
            EncodingFormat::Int8 => Embedding::Int8(vector::quantize_int8(&v)),
            EncodingFormat::Uint8 => Embedding::Uint8(vector::quantize_uint8(&v)),
            EncodingFormat::Binary => Embedding::Int8(vector::quantize_binary(&v)),
            EncodingFormat::Ubinary => Embedding::Uint8(vector::quantize_ubinary(&v)),
        }
    }
}

/// `POST /embed` (200).
#[derive(Debug, Clone, Serialize)]
pub struct EmbedResponse {
    pub dimensions: usize,
    pub embeddings: Vec<Embedding>,
    pub model: String,
    pub usage: EmbedUsage,
}

/// `POST /embed` (200): as [`EmbedResponse`], or as
/// [`EmbedByTypeResponse`] when the request gave `embedding_types`.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum EmbedBody {
    List(EmbedResponse),
    ByType(EmbedByTypeResponse),
}

/// `POST /embed` (200) when the request gave Cohere-style
/// `embedding_types`: `embeddings` holds one array per type, keyed by the
/// type's name.
#[derive(Debug, Clone, Serialize)]
pub struct EmbedByTypeResponse {
    pub dimensions: usize,
    pub embeddings: BTreeMap<&'static str, Vec<Embedding>>,
    pub model: String,
    pub usage: EmbedUsage,
}

/// The `usage` of [`EmbedResponse`].
#[derive(Debug, Clone, Serialize)]
pub struct EmbedUsage {
    pub images: usize,
    pub inputs: usize,
    pub text_tokens: usize,
}

/// `POST /score` (200).
#[derive(Debug, Clone, Serialize)]
pub struct ScoreResponse {
    pub model: String,
    /// Present only when the request asked for `top_k`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ranking: Option<Vec<Ranked>>,
    pub scores: Floats,
}

/// One entry of [`ScoreResponse::ranking`]: a candidate's index and score.
#[derive(Debug, Clone, Serialize)]
pub struct Ranked {
    pub index: usize,
    pub score: f32,
}

/// `POST /v1/embeddings` (200), OpenAI's shape.
#[derive(Debug, Clone, Serialize)]
pub struct OpenAiResponse {
    pub data: Vec<OpenAiEmbedding>,
    pub model: String,
    /// Always `"list"`.
    pub object: &'static str,
    pub usage: OpenAiUsage,
}

/// One entry of [`OpenAiResponse::data`].
#[derive(Debug, Clone, Serialize)]
pub struct OpenAiEmbedding {
    pub embedding: Embedding,
    pub index: usize,
    /// Always `"embedding"`.
    pub object: &'static str,
}

/// The `usage` of [`OpenAiResponse`].
#[derive(Debug, Clone, Serialize)]
pub struct OpenAiUsage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

/// The `error` object of a 503 `/health` or `/ready` body.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
}

/// `GET /health`: `{"status": "ok"}`, or `"unhealthy"` with an error (503).
#[derive(Debug, Clone, Serialize)]
pub struct HealthResponse {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Problem>,
    pub status: &'static str,
}

/// `GET /ready`: every model's status by name; when not ready (503) also
/// an error.
#[derive(Debug, Clone, Serialize)]
pub struct ReadyResponse {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Problem>,
    pub models: BTreeMap<String, &'static str>,
    pub status: &'static str,
}

/// `GET /info` (200).
#[derive(Debug, Clone, Serialize)]
pub struct InfoResponse {
    pub auth: bool,
    pub limits: InfoLimits,
    pub models: Vec<ModelInfo>,
    pub server: InfoServer,
    pub version: &'static str,
}

/// How the server runs its models in [`InfoResponse`]: what the settings
/// that follow the devices resolved to.
#[derive(Debug, Clone, Serialize)]
pub struct InfoServer {
    /// `server.allow_tf32` (has an effect only on CUDA, for f32 models).
    pub allow_tf32: bool,
    /// Whether this build has CUDA (the `cuda` feature).
    pub cuda_build: bool,
    /// Inputs preprocessed at once, resolved.
    pub preprocess_threads: usize,
    /// Whether `server.preprocess_threads` was "auto".
    pub preprocess_threads_auto: bool,
}

/// The server-wide request limits of [`InfoResponse`].
#[derive(Debug, Clone, Serialize)]
pub struct InfoLimits {
    /// Whether image URLs are fetched (`server.fetch_image_urls`).
    pub image_urls: bool,
    pub max_body_bytes: usize,
    pub max_image_bytes: usize,
    pub max_inputs_per_request: usize,
    pub max_text_chars: usize,
    pub request_timeout_ms: u64,
}

/// One configured model in [`InfoResponse`]; the fields the loaded model
/// gives are `null` until it is loaded.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub architecture: Option<&'static str>,
    /// The keys that were "auto" and resolved from the devices.
    pub auto: Vec<&'static str>,
    pub batching: BatchingInfo,
    /// What the CPU replicas' matrix products run on and why (`null` until
    /// a CPU replica is built, and for models on GPUs only).
    pub cpu_backend: Option<crate::models::BackendChoice>,
    /// `gpu` when every device is a GPU, else `cpu`: whose defaults the
    /// auto keys took.
    pub device_class: &'static str,
    pub devices: Vec<String>,
    pub dimensions: Option<usize>,
    pub dtype: &'static str,
    pub embedding_cache: EmbeddingCacheInfo,
    pub error: Option<String>,
    /// What decides the model's vectors (`null` until loaded).
    pub fingerprint: Option<crate::models::Fingerprint>,
    pub live_workers: usize,
    pub max_image_pixels: u64,
    /// `max_input_tokens` as configured; `null`: the model's own limit.
    pub max_input_tokens: Option<usize>,
    /// The most pixels an image is resized to (`max_pixels`), for models
    /// whose processed image size follows the image (`null` for the others
    /// and until loaded).
    pub max_pixels: Option<u64>,
    pub max_request_image_pixels: u64,
    pub max_text_tokens: Option<usize>,
    /// The least pixels an image is resized to (`min_pixels`), likewise.
    pub min_pixels: Option<u64>,
    pub name: String,
    /// The startup probes (`null` until loaded).
    pub probes: Option<ProbesInfo>,
    /// The prompt format, for models that offer several (`null` for the
    /// others and until loaded).
    pub prompt_format: Option<&'static str>,
    pub source: String,
    pub status: &'static str,
    pub uses_instructions: Option<bool>,
}

/// A model's startup probes in [`ModelInfo`].
#[derive(Debug, Clone, Serialize)]
pub struct ProbesInfo {
    /// Probe name → digest of its normalised vector.
    pub digests: BTreeMap<String, String>,
    /// The golden-vectors comparison, when configured.
    pub golden: Option<GoldenInfo>,
}

/// The golden-vectors comparison in [`ProbesInfo`].
#[derive(Debug, Clone, Serialize)]
pub struct GoldenInfo {
    /// Why the probes drifted (`null` when they match).
    pub drift: Option<String>,
    /// The fingerprint the golden file was written for.
    pub fingerprint: String,
    /// Probe name → largest component difference.
    pub max_abs_diff: BTreeMap<String, f32>,
    pub path: String,
    /// `match` or `drifted`.
    pub status: &'static str,
    pub tolerance: f32,
}

/// A model's embedding cache in [`ModelInfo`].
#[derive(Debug, Clone, Serialize)]
pub struct EmbeddingCacheInfo {
    /// Bytes held now.
    pub bytes: usize,
    /// Configured size (`embedding_cache_bytes`); 0: off.
    pub capacity_bytes: usize,
    pub entries: usize,
}

/// A model's batching limits in [`ModelInfo`].
#[derive(Debug, Clone, Serialize)]
pub struct BatchingInfo {
    /// Padded decoder tokens per decoder pass (MLLM).
    pub decoder_group_tokens: usize,
    pub max_batch_cost: usize,
    pub max_batch_size: usize,
    pub max_delay_ms: u64,
    pub max_queue_inputs: usize,
    pub refill_wait_ms: u64,
    /// Image tiles through the vision tower at once (MLLM).
    pub vision_tile_chunk: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bytes_equal_those_of_json_macro() {
        let v = vec![0.1f32, -1.0 / 3.0, f32::NAN, 2.5e-8];
        let typed = EmbedResponse {
            dimensions: 4,
            embeddings: vec![
                Embedding::Float(Floats(v.clone())),
                Embedding::Base64("AAAA".into()),
            ],
            model: "m".into(),
            usage: EmbedUsage {
                images: 1,
                inputs: 2,
                text_tokens: 3,
            },
        };
        let old = json!({
            "model": "m",
            "dimensions": 4,
            "embeddings": [v, "AAAA"],
            "usage": {"inputs": 2, "text_tokens": 3, "images": 1},
        });
        same(&typed, &old);
        let typed = ScoreResponse {
            model: "m".into(),
            ranking: Some(vec![Ranked {
                index: 1,
                score: 0.31,
            }]),
            scores: Floats(vec![0.12, 0.31]),
        };
        let old = json!({"model": "m", "scores": [0.12f32, 0.31f32],
            "ranking": [{"index": 1, "score": 0.31f32}]});
        same(&typed, &old);
        let typed = ScoreResponse {
            ranking: None,
            ..typed
        };
        same(&typed, &json!({"model": "m", "scores": [0.12f32, 0.31f32]}));
        let typed = OpenAiResponse {
            data: vec![OpenAiEmbedding {
                embedding: Embedding::Float(Floats(vec![0.1])),
                index: 0,
                object: "embedding",
            }],
            model: "m".into(),
            object: "list",
            usage: OpenAiUsage {
                prompt_tokens: 7,
                total_tokens: 7,
            },
        };
        let old = json!({
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1f32]}],
            "model": "m",
            "usage": {"prompt_tokens": 7, "total_tokens": 7},
        });
        same(&typed, &old);
        let problem = || Problem {
            message: "not ready: m is loading".into(),
            kind: "unavailable",
        };
        same(
            &HealthResponse {
                error: None,
                status: "ok",
            },
            &json!({"status": "ok"}),
        );
        same(
            &HealthResponse {
                error: Some(problem()),
                status: "unhealthy",
            },
            &json!({"status": "unhealthy", "error": {"type": "unavailable",
                "message": "not ready: m is loading"}}),
        );
        let models: BTreeMap<String, &'static str> = [
            ("zeta".to_string(), "loading"),
            ("alpha".to_string(), "ready"),
        ]
        .into();
        same(
            &ReadyResponse {
                error: Some(problem()),
                models: models.clone(),
                status: "loading",
            },
            &json!({"status": "loading", "models": {"zeta": "loading", "alpha": "ready"},
                "error": {"type": "unavailable", "message": "not ready: m is loading"}}),
        );
        let typed = InfoResponse {
            auth: true,
            limits: InfoLimits {
                image_urls: false,
                max_body_bytes: 1,
                max_image_bytes: 10,
                max_inputs_per_request: 2,
                max_text_chars: 11,
                request_timeout_ms: 3,
            },
            models: vec![ModelInfo {
                architecture: None,
                auto: vec!["max_batch_size"],
                batching: BatchingInfo {
                    decoder_group_tokens: 14,
                    max_batch_cost: 4,
                    max_batch_size: 5,
                    max_delay_ms: 6,
                    max_queue_inputs: 7,
                    refill_wait_ms: 13,
                    vision_tile_chunk: 15,
                },
                cpu_backend: None,
                device_class: "cpu",
                devices: vec!["cpu".into()],
                dimensions: Some(16),
                dtype: "f32",
                error: None,
                live_workers: 1,
                max_image_pixels: 8,
                max_input_tokens: None,
                max_request_image_pixels: 12,
                max_text_tokens: Some(77),
                name: "m".into(),
                max_pixels: None,
                min_pixels: None,
                prompt_format: None,
                source: "dir".into(),
                status: "ready",
                uses_instructions: Some(false),
                fingerprint: None,
                probes: None,
                embedding_cache: EmbeddingCacheInfo {
                    capacity_bytes: 9,
                    bytes: 0,
                    entries: 0,
                },
            }],
            server: InfoServer {
                allow_tf32: false,
                cuda_build: false,
                preprocess_threads: 16,
                preprocess_threads_auto: true,
            },
            version: "0.1.0",
        };
        let old = json!({
            "version": "0.1.0",
            "models": [{
                "name": "m", "source": "dir", "status": "ready", "error": null,
                "architecture": null, "dimensions": 16, "dtype": "f32", "devices": ["cpu"],
                "live_workers": 1, "max_text_tokens": 77, "uses_instructions": false,
                "max_image_pixels": 8, "fingerprint": null, "probes": null, "cpu_backend": null,
                "max_input_tokens": null, "max_request_image_pixels": 12,
                "max_pixels": null, "min_pixels": null, "prompt_format": null,
                "embedding_cache": {"capacity_bytes": 9, "bytes": 0, "entries": 0},
                "batching": {"max_batch_size": 5, "max_batch_cost": 4,
                    "max_queue_inputs": 7, "max_delay_ms": 6, "refill_wait_ms": 13,
                    "decoder_group_tokens": 14, "vision_tile_chunk": 15},
                "auto": ["max_batch_size"], "device_class": "cpu",
            }],
            "server": {"allow_tf32": false, "cuda_build": false, "preprocess_threads": 16,
                "preprocess_threads_auto": true},
            "limits": {"max_body_bytes": 1, "max_inputs_per_request": 2,
                "request_timeout_ms": 3, "max_image_bytes": 10, "max_text_chars": 11,
                "image_urls": false},
            "auth": true,
        });
        same(&typed, &old);
    }

    #[test]
    fn each_encoding_writes_its_values() {
        let v = vec![0.5f32, -0.25, 0.0, 1.0, -1.0, 0.1, 0.2, -0.3, 0.9];
        let j =
            |f: EncodingFormat| serde_json::to_string(&Embedding::encode(v.clone(), f)).unwrap();
        assert_eq!(j(EncodingFormat::Int8), "[64,-32,0,127,-127,13,25,-38,114]");
        assert_eq!(
            j(EncodingFormat::Uint8),
            "[192,96,128,255,1,141,153,90,242]"
        );
        // Signs 1 0 0 1 0 1 1 0 | 1 (+ 7 zero bits): 0x96, 0x80.
        assert_eq!(j(EncodingFormat::Ubinary), "[150,128]");
        assert_eq!(j(EncodingFormat::Binary), "[22,0]");
        assert_eq!(
            j(EncodingFormat::Base64),
            format!("{:?}", encode_embedding(&v))
        );
        assert!(j(EncodingFormat::Float).starts_with("[0.5,-0.25,0.0,1.0,"));
    }

    /// `typed` writes the bytes of `old` (a `json!` body), but with each
    /// float as the shortest decimal of its f32 rather than of the f64.
    fn same<T: Serialize>(typed: &T, old: &serde_json::Value) {
        assert_eq!(
            serde_json::to_string(typed).unwrap(),
            serde_json::to_string(&shortest(old.clone())).unwrap()
        );
    }

    fn shortest(v: serde_json::Value) -> serde_json::Value {
        use serde_json::Value;
        match v {
            Value::Number(n) if n.is_f64() => {
                let f = n.as_f64().unwrap() as f32;
                Value::from(f.to_string().parse::<f64>().unwrap())
            }
            Value::Array(a) => Value::Array(a.into_iter().map(shortest).collect()),
            Value::Object(o) => {
                Value::Object(o.into_iter().map(|(k, v)| (k, shortest(v))).collect())
            }
            other => other,
        }
    }
}
