//! Endpoint handlers: `/embed`, `/score`, `/v1/embeddings` and the operations
//! endpoints.
//!
//! Owns request-level checks (shutdown, model resolution, input counts,
//! deadline) and the response shapes of openapi.yaml. Embedding goes through the
//! model's [`crate::batching::Batcher`]; handlers never see tensors.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::error::quote;
use super::error::{ApiError, ModelLabel};
use super::inputs::{url_refused, Labeled};
use super::requests::{EmbedRequest, OpenAiRequest, Parsed, ScoreRequest};
use super::responses::{
    BatchingInfo, EmbedResponse, EmbedUsage, Embedding, EmbeddingCacheInfo, Floats, GoldenInfo,
    HealthResponse, InfoLimits, InfoResponse, InfoServer, ModelInfo, OpenAiEmbedding,
    OpenAiResponse, OpenAiUsage, ProbesInfo, Problem, Ranked, ReadyResponse, ScoreResponse,
};
use super::responses::{EmbedBody, EmbedByTypeResponse};
use super::AppState;
use crate::batching::{EmbedOptions, Embedded, RequestTrace};
use crate::fetch::FetchError;
use crate::input::{ImageSource, Input};
use crate::registry::{ModelStatus, ProbeReport, ServedModel};

/// The response header naming the fingerprint of the model that computed
/// the vectors (`sha256:` + 16 hex digits; the full value is in `/info`).
pub const FINGERPRINT_HEADER: &str = "x-vlembed-model-fingerprint";

/// A JSON success response tagged with its model for the metrics, carrying
/// the model's fingerprint header.
fn ok_json<T: Serialize>(t: &Target, body: &T) -> Response {
    let mut res = Json(body).into_response();
    res.extensions_mut().insert(ModelLabel(t.name.clone()));
    if let Ok(v) = HeaderValue::from_str(&t.served.info.fingerprint.id) {
        res.headers_mut().insert(FINGERPRINT_HEADER, v);
    }
    res
}

struct Target {
    name: String,
    served: Arc<ServedModel>,
}

/// Resolves the model and checks that the request may run now.
fn target(
    st: &AppState,
    model: Option<&str>,
    inputs: &[Labeled],
    what: &str,
    trace: &RequestTrace,
) -> Result<Target, ApiError> {
    trace.set_inputs(inputs.len());
    let retry = st.registry.server.retry_after_s;
    if st.registry.is_shutting_down() {
        return Err(ApiError::unavailable("the server is shutting down", retry));
    }
    let slot = st.registry.resolve(model)?;
    let name = slot.name().to_string();
    let limit = st.registry.server.max_inputs_per_request;
    if inputs.is_empty() {
        return Err(
            ApiError::unprocessable(format!("{what} is empty: give at least one input"))
                .for_model(&name),
        );
    }
    if inputs.len() > limit {
        return Err(ApiError::too_large(format!(
            "{what}: {} inputs, over the limit of {limit} per request (server.max_inputs_per_request)",
            inputs.len()
        ))
        .for_model(&name));
    }
    let served = slot
        .served()
        .map_err(|e| ApiError::from_unavailable(e, retry).for_model(&name))?;
    Ok(Target { name, served })
}

async fn run(
    st: &AppState,
    t: &Target,
    inputs: Vec<Labeled>,
    mut opts: EmbedOptions,
    start: Instant,
    trace: Arc<RequestTrace>,
) -> Result<Embedded, ApiError> {
    let labels: Vec<String> = inputs.iter().map(|l| l.label.clone()).collect();
    let label = |i: usize| {
        labels
            .get(i)
            .cloned()
            .unwrap_or_else(|| format!("input {i}"))
    };
    let inputs = resolve_images(st, inputs)
        .await
        .map_err(|e| e.for_model(&t.name))?;
    opts.trace = Some(trace);
    let out = t
        .served
        .batcher
        .embed(inputs, opts, start, st.registry.server.request_timeout())
        .await
        .map_err(|e| {
            ApiError::embed(e, &label, st.registry.server.retry_after_s).for_model(&t.name)
        })?;
    let m = &st.registry.metrics;
    m.text_tokens
        .with_label_values(&[&t.name])
        .inc_by(out.text_tokens as u64);
    m.images
        .with_label_values(&[&t.name])
        .inc_by(out.images as u64);
    Ok(out)
}

/// The one step from a request's inputs to embeddable ones: image URLs are
/// fetched (the fetched bytes then take the path of uploaded images:
/// decoding, pixel limits), or the request is refused: 422 naming the input
/// when fetching is off or a fetch fails, 503 when no fetch slot frees.
async fn resolve_images(st: &AppState, inputs: Vec<Labeled>) -> Result<Vec<Input>, ApiError> {
    let urls: Vec<(usize, String)> = inputs
        .iter()
        .enumerate()
        .filter_map(|(i, l)| Some((i, l.input.image_url()?.to_string())))
        .collect();
    let mut fetched: Vec<Option<Vec<u8>>> = vec![None; inputs.len()];
    if let Some((first, _)) = urls.first() {
        let Some(fetcher) = &st.fetcher else {
            return Err(url_refused(&format!("{}.image", inputs[*first].label)));
        };
        let shown: Vec<(usize, String)> = urls.iter().map(|(i, u)| (*i, quote(u))).collect();
        match fetcher.fetch_all(urls).await {
            Ok(images) => {
                for (i, bytes) in images {
                    if let Some(slot) = fetched.get_mut(i) {
                        *slot = Some(bytes);
                    }
                }
            }
            Err((i, e)) => {
                let url = shown
                    .iter()
                    .find(|(j, _)| *j == i)
                    .map_or_else(String::new, |(_, u)| format!(" {u}"));
                let at = inputs.get(i).map_or("input", |l| l.label.as_str());
                let message = format!("{at}.image: cannot fetch the image URL{url}: {e}");
                return Err(match e {
                    FetchError::Busy(_) => {
                        ApiError::unavailable(message, st.registry.server.retry_after_s)
                    }
                    _ => ApiError::unprocessable(message),
                });
            }
        }
    }
    inputs
        .into_iter()
        .zip(fetched)
        .map(|(l, bytes)| {
            let label = l.label;
            l.input.try_map_image(|source| match (source, bytes) {
                (ImageSource::Bytes(b), _) => Ok(b),
                (ImageSource::Url(_), Some(b)) => Ok(b),
                (ImageSource::Url(_), None) => Err(ApiError::internal(format!(
                    "{label}.image: the fetcher returned no image"
                ))),
            })
        })
        .collect()
}

/// `POST /embed`.
pub async fn embed(
    State(st): State<AppState>,
    Parsed { req, trace, start }: Parsed<EmbedRequest>,
) -> Result<Response, ApiError> {
    let t = target(
        &st,
        req.common.model.as_deref(),
        &req.inputs,
        "inputs",
        &trace,
    )?;
    let n = req.inputs.len();
    let opts = EmbedOptions::new(req.normalize, req.truncate, req.common.priority);
    let out = run(&st, &t, req.inputs, opts, start, trace).await?;
    let usage = EmbedUsage {
        images: out.images,
        inputs: n,
        text_tokens: out.text_tokens,
    };
    let body = match req.embedding_types {
        Some(types) => EmbedBody::ByType(EmbedByTypeResponse {
            dimensions: t.served.info.dimensions,
            embeddings: types
                .iter()
                .map(|&f| {
                    let each = out.embeddings.iter();
                    (
                        f.as_str(),
                        each.map(|v| Embedding::encode(v.clone(), f)).collect(),
                    )
                })
                .collect(),
            model: t.name.clone(),
            usage,
        }),
        None => EmbedBody::List(EmbedResponse {
            dimensions: t.served.info.dimensions,
            embeddings: out
                .embeddings
                .into_iter()
                .map(|v| Embedding::encode(v, req.encoding_format))
                .collect(),
            model: t.name.clone(),
            usage,
        }),
    };
    Ok(ok_json(&t, &body))
}

/// `POST /score`.
pub async fn score(
    State(st): State<AppState>,
    Parsed { req, trace, start }: Parsed<ScoreRequest>,
) -> Result<Response, ApiError> {
    if req.inputs.len() < 2 {
        let slot = st.registry.resolve(req.common.model.as_deref())?;
        return Err(
            ApiError::unprocessable("candidates is empty: give at least one candidate")
                .for_model(slot.name()),
        );
    }
    let t = target(
        &st,
        req.common.model.as_deref(),
        &req.inputs,
        "query and candidates",
        &trace,
    )?;
    let opts = EmbedOptions::new(true, true, req.common.priority);
    let out = run(&st, &t, req.inputs, opts, start, trace).await?;
    let mut vectors = out.embeddings.into_iter();
    let query = vectors.next().unwrap_or_default();
    let scores: Vec<f32> = vectors
        .map(|c| c.iter().zip(&query).map(|(a, b)| a * b).sum())
        .collect();
    let ranking = req.top_k.map(|k| {
        let mut ranking: Vec<Ranked> = scores
            .iter()
            .enumerate()
            .map(|(index, &score)| Ranked { index, score })
            .collect();
        ranking.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.index.cmp(&b.index)));
        ranking.truncate(k);
        ranking
    });
    let body = ScoreResponse {
        model: t.name.clone(),
        ranking,
        scores: Floats(scores),
    };
    Ok(ok_json(&t, &body))
}

/// `POST /v1/embeddings`.
pub async fn openai_embeddings(
    State(st): State<AppState>,
    Parsed { req, trace, start }: Parsed<OpenAiRequest>,
) -> Result<Response, ApiError> {
    let t = target(
        &st,
        req.common.model.as_deref(),
        &req.inputs,
        "input",
        &trace,
    )?;
    if let Some(d) = req.dimensions {
        if d != t.served.info.dimensions {
            return Err(ApiError::bad_request(format!(
                "dimensions: model {} returns {} dimensions; other sizes are not supported",
                t.name, t.served.info.dimensions
            ))
            .for_model(&t.name));
        }
    }
    let opts = EmbedOptions::new(true, true, req.common.priority);
    let out = run(&st, &t, req.inputs, opts, start, trace).await?;
    let data = out
        .embeddings
        .into_iter()
        .enumerate()
        .map(|(index, v)| OpenAiEmbedding {
            embedding: Embedding::encode(v, req.encoding_format),
            index,
            object: "embedding",
        })
        .collect();
    let body = OpenAiResponse {
        data,
        model: t.name.clone(),
        object: "list",
        usage: OpenAiUsage {
            prompt_tokens: out.text_tokens,
            total_tokens: out.text_tokens,
        },
    };
    Ok(ok_json(&t, &body))
}

/// `GET /health`: 503 once a model cannot recover without a restart.
pub async fn health(State(st): State<AppState>) -> Response {
    let failed = st.registry.unrecoverable();
    if failed.is_empty() {
        return Json(HealthResponse {
            error: None,
            status: "ok",
        })
        .into_response();
    }
    let message = format!(
        "unhealthy: the workers of {} failed for good; restart the process",
        failed.join(", ")
    );
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(HealthResponse {
            error: Some(Problem {
                message,
                kind: "unavailable",
            }),
            status: "unhealthy",
        }),
    )
        .into_response()
}

/// `GET /ready`.
pub async fn ready(State(st): State<AppState>) -> Response {
    let reg = &st.registry;
    let models: BTreeMap<String, &'static str> = reg
        .models()
        .iter()
        .map(|m| (m.name().to_string(), m.status().as_str()))
        .collect();
    if reg.is_ready() {
        return Json(ReadyResponse {
            error: None,
            models,
            status: "ready",
        })
        .into_response();
    }
    let (status, message) = if reg.is_shutting_down() {
        ("shutting_down", "the server is shutting down".to_string())
    } else {
        let waiting: Vec<String> = reg
            .models()
            .iter()
            .filter_map(|m| m.not_ready_reason())
            .collect();
        let any_loading = reg
            .models()
            .iter()
            .any(|m| m.status() == ModelStatus::Loading);
        (
            if any_loading {
                "loading"
            } else {
                "unavailable"
            },
            format!("not ready: {}", waiting.join(", ")),
        )
    };
    let mut res = (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(ReadyResponse {
            error: Some(Problem {
                message,
                kind: "unavailable",
            }),
            models,
            status,
        }),
    )
        .into_response();
    res.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(reg.server.retry_after_s),
    );
    res
}

/// `GET /info`.
pub async fn info(State(st): State<AppState>) -> Response {
    let reg = &st.registry;
    let models = reg
        .models()
        .iter()
        .map(|m| {
            let c = &m.config;
            let loaded = m.loaded();
            let info = loaded.as_ref().map(|s| &s.info);
            ModelInfo {
                architecture: info.map(|i| i.architecture),
                auto: c.auto_keys(),
                batching: BatchingInfo {
                    decoder_group_tokens: c.pass.decoder_group_tokens,
                    vision_tile_chunk: c.pass.vision_tile_chunk,
                    max_batch_cost: c.batching.max_batch_cost,
                    max_batch_size: c.batching.max_batch_size,
                    max_delay_ms: u64::try_from(c.batching.max_delay.as_millis())
                        .unwrap_or(u64::MAX),
                    max_queue_inputs: c.batching.max_queue_inputs,
                    refill_wait_ms: u64::try_from(c.batching.refill_wait.as_millis())
                        .unwrap_or(u64::MAX),
                },
                cpu_backend: info.and_then(|i| i.cpu_backend.clone()),
                device_class: c.device_class().as_str(),
                devices: c.devices.iter().map(|d| d.to_string()).collect(),
                dimensions: info.map(|i| i.dimensions),
                dtype: c.dtype.as_str(),
                error: m
                    .failure()
                    .or_else(|| loaded.as_ref().and_then(|s| s.drift().map(str::to_string))),
                live_workers: loaded.as_ref().map_or(0, |s| s.live_workers()),
                max_image_pixels: c.max_image_pixels,
                max_input_tokens: c.max_input_tokens,
                max_request_image_pixels: c.max_request_image_pixels,
                max_text_tokens: info.map(|i| i.max_text_tokens),
                name: c.name.clone(),
                max_pixels: info.and_then(|i| i.pixel_bounds).map(|b| b.max),
                min_pixels: info.and_then(|i| i.pixel_bounds).map(|b| b.min),
                prompt_format: info.and_then(|i| i.prompt_format),
                source: c.model_source().describe(),
                status: m.status().as_str(),
                uses_instructions: info.map(|i| i.uses_instructions),
                fingerprint: info.map(|i| i.fingerprint.clone()),
                probes: loaded.as_ref().map(|s| probes_info(&s.probes)),
                embedding_cache: EmbeddingCacheInfo {
                    capacity_bytes: c.embedding_cache_bytes,
                    bytes: loaded
                        .as_ref()
                        .and_then(|s| s.batcher.cache())
                        .map_or(0, |c| c.stats().bytes),
                    entries: loaded
                        .as_ref()
                        .and_then(|s| s.batcher.cache())
                        .map_or(0, |c| c.stats().entries),
                },
            }
        })
        .collect();
    let s = &reg.server;
    Json(InfoResponse {
        auth: !s.api_keys.is_empty(),
        limits: InfoLimits {
            image_urls: s.fetch_image_urls,
            max_body_bytes: s.max_body_bytes,
            max_image_bytes: s.max_image_bytes,
            max_inputs_per_request: s.max_inputs_per_request,
            max_text_chars: s.max_text_chars,
            request_timeout_ms: s.request_timeout_ms,
        },
        models,
        server: InfoServer {
            allow_tf32: s.allow_tf32,
            cuda_build: candle_core::utils::cuda_is_available(),
            preprocess_threads: reg.preprocess_threads,
            preprocess_threads_auto: s.preprocess_threads == 0,
        },
        version: env!("CARGO_PKG_VERSION"),
    })
    .into_response()
}

/// A model's startup probes as `/info` shows them.
fn probes_info(p: &ProbeReport) -> ProbesInfo {
    ProbesInfo {
        digests: p.digests.iter().cloned().collect(),
        golden: p.golden.as_ref().map(|g| GoldenInfo {
            drift: g.drift.clone(),
            fingerprint: g.fingerprint.clone(),
            max_abs_diff: g.max_abs_diff.iter().cloned().collect(),
            path: g.path.clone(),
            status: if g.drift.is_some() {
                "drifted"
            } else {
                "match"
            },
            tolerance: g.tolerance,
        }),
    }
}

/// `GET /metrics`.
pub async fn metrics(State(st): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        st.registry.metrics.render(),
    )
        .into_response()
}

/// `GET /openapi.json`.
pub async fn openapi(State(st): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        st.openapi.clone(),
    )
        .into_response()
}
