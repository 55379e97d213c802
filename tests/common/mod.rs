//! The one test-support module of the integration tests (HTTP and parity):
//! fixture paths and reference files, the named tolerances every comparison
//! uses, float-vector comparisons, model loading for the parity suites, a real
//! server on an ephemeral loopback port serving the fixture model, a client,
//! fault injection into the model replica, and OpenAPI response validation.
//!
//! Owns nothing of the server; it only uses the library's public API.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::HeaderMap;
use serde_json::Value;
use vlembed::app::{Hooks, ServerHandle};
use vlembed::config::{Config, ModelConfig};
use vlembed::models::{Between, EmbeddingModel, ModelError};
use vlembed::preprocess::Prepared;

/// Tolerances, named once so every suite states the same bound for the same
/// kind of comparison.
pub mod tol {
    /// Two computations that must be the same arithmetic (batched vs alone
    /// through the same kernels, JSON vs multipart, base64 vs float):
    /// only summation order may differ.
    pub const SAME_MATH: f32 = 1e-6;
    /// CLIP in f32 against the PyTorch reference from identical ids/pixels,
    /// and through the server against the library.
    pub const CLIP_F32: f32 = 1e-5;
    /// BGE-VL-MLLM (LLaVA-NeXT + Mistral) in f32 against the PyTorch
    /// reference: a 32-layer-deep residual stream accumulates more rounding.
    pub const MLLM_F32: f32 = 1e-4;
    /// Looser agreement for cases that go through different code paths
    /// (e.g. a text embedded by the server vs the reference file).
    pub const LOOSE_F32: f32 = 1e-4;
    /// A normalised vector's norm is 1 within this.
    pub const UNIT_NORM: f32 = 1e-4;
    /// End to end from encoded image bytes (decoder and resize differ from
    /// Pillow in the last bit): cosine similarity at least this.
    pub const E2E_COSINE: f64 = 0.9999;
    /// The tiny MLLM fixture in f16 / bf16 against its f32 reference (worst
    /// cosine). transformers itself, same model and cases, reaches f16 0.9992
    /// and bf16 0.9732: this tiny random model has very sharp attention.
    pub const MLLM_F16_COSINE: f64 = 0.995;
    pub const MLLM_BF16_COSINE: f64 = 0.97;
    /// CLIP in bf16 (weights and activations of the encoder products in
    /// bf16, f32 accumulation) against the same model in f32: cosine at
    /// least this, on every CPU backend (the full-size model).
    pub const CLIP_BF16_COSINE: f64 = 0.999;
    /// The same on the tiny fixture: every input but one is above 0.9995;
    /// its 77-token text (one sentence repeated) reaches 0.99893 on both
    /// backends alike (the rounding is the same; this tiny random model's
    /// attention is very sharp, see MLLM_BF16_COSINE).
    pub const CLIP_TINY_BF16_COSINE: f64 = 0.998;

    /// How much looser an f32 bound is on the parity suites' device
    /// ([`super::test_device`]): 1 on the CPU (the constants above were
    /// measured there); 10 on a GPU, where cuBLAS sums in another order and
    /// CUDA's exp/erf/tanh differ from the CPU's in the last bits (TF32
    /// stays off). The GPU factor is a bound, not a measurement: the GPU
    /// check's parity phase reports the actual differences.
    pub fn f32_scale() -> f32 {
        if super::test_device() == super::DeviceSpec::Cpu {
            1.0
        } else {
            10.0
        }
    }

    /// [`CLIP_F32`] on the test device.
    pub fn clip_f32() -> f32 {
        CLIP_F32 * f32_scale()
    }

    /// [`MLLM_F32`] on the test device.
    pub fn mllm_f32() -> f32 {
        MLLM_F32 * f32_scale()
    }
}

pub use vlembed::models::DeviceSpec;

/// The device the parity suites load models on: `VLEMBED_TEST_DEVICE`
/// (`cpu`, `cuda:0`, ...; `cpu` when unset), so the same suites check a GPU
/// build on a GPU (`VLEMBED_TEST_DEVICE=cuda:0 cargo test --features cuda
/// --test parity_clip --test parity_mllm`). Their f32 bounds follow it
/// ([`tol::f32_scale`]).
pub fn test_device() -> DeviceSpec {
    match std::env::var("VLEMBED_TEST_DEVICE") {
        Ok(v) if !v.trim().is_empty() => v
            .parse()
            .unwrap_or_else(|e| panic!("VLEMBED_TEST_DEVICE={v:?}: {e}")),
        _ => DeviceSpec::Cpu,
    }
}

/// Load options for the test device (its pass sizes), in `dtype`.
pub fn load_options(dtype: vlembed::models::Precision) -> vlembed::models::LoadOptions {
    use vlembed::models::{DeviceClass, LoadOptions, PassLimits};
    LoadOptions {
        dtype,
        pass: PassLimits::for_class(DeviceClass::of(&[test_device()])),
        ..Default::default()
    }
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Whether tests that need inputs from outside the repository must find
/// them: in CI (`CI` set, as `.ci/run` does) a missing input fails the test
/// instead of skipping it.
pub fn inputs_required() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Says, where `cargo test` shows it even when the test passes, that part
/// of a test did not run and why; panics instead in CI ([`inputs_required`]).
pub fn skipped(what: &str, why: &str) {
    if inputs_required() {
        panic!("{what} cannot run: {why} (CI requires it)");
    }
    // `eprintln!` is captured (and hidden) for passing tests; a direct
    // write to stderr is not, so the skip shows in every test run.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr().lock(),
        format!("\nwarning: test input missing, SKIPPED {what}: {why}\n").as_bytes(),
    );
}

/// A file named relative to the repository root; `None` (the part of the
/// test that needs it is skipped, see [`skipped`]) for the shared
/// photographs when `../shared/testdata` is absent.
pub fn fixture_file(rel: &str) -> Option<PathBuf> {
    let p = repo().join(rel);
    if p.exists() {
        Some(p)
    } else if rel.starts_with("../shared/") {
        skipped(rel, "../shared/testdata is not present");
        None
    } else {
        panic!("missing fixture {rel}")
    }
}

/// A reference file of `tests/fixtures/reference/`.
pub fn reference_file(name: &str) -> Value {
    read_json(&repo().join("tests/fixtures/reference").join(name))
}

/// Loads a model directory on the test device ([`test_device`]) in f32.
pub fn load_dir(dir: &Path) -> vlembed::embedder::Embedder {
    use vlembed::models::{ModelSource, Precision};
    let src = ModelSource::parse(dir.to_str().unwrap(), None);
    let t = std::time::Instant::now();
    let device = test_device();
    let e = vlembed::embedder::Embedder::load(&src, device, &load_options(Precision::F32))
        .unwrap_or_else(|e| panic!("cannot load {} on {device}: {e}", dir.display()));
    eprintln!(
        "loaded {} on {device} in {:.2?}",
        dir.display(),
        t.elapsed()
    );
    e
}

/// Loads a fixture model of `tests/fixtures/`.
pub fn load(model: &str) -> vlembed::embedder::Embedder {
    load_dir(&repo().join("tests/fixtures").join(model))
}

/// The CPU backends this build can run: the native kernels, and oneDNN in
/// a build with the `onednn` feature. The parity suites check each.
pub fn backends() -> Vec<vlembed::models::CpuBackend> {
    use vlembed::models::CpuBackend;
    let mut b = vec![CpuBackend::Native];
    if cfg!(feature = "onednn") {
        b.push(CpuBackend::Onednn);
    }
    b
}

/// Loads a model directory on the CPU in `dtype` with its products on
/// `backend` (checked to be the one in use).
pub fn load_dir_with(
    dir: &Path,
    dtype: vlembed::models::Precision,
    backend: vlembed::models::CpuBackend,
) -> vlembed::embedder::Embedder {
    use vlembed::models::{DeviceSpec, LoadOptions, ModelSource};
    let src = ModelSource::parse(dir.to_str().unwrap(), None);
    let opts = LoadOptions {
        dtype,
        cpu_backend: backend,
        ..Default::default()
    };
    let e = vlembed::embedder::Embedder::load(&src, DeviceSpec::Cpu, &opts).unwrap();
    let used = e
        .loaded
        .cpu_backend()
        .expect("a CPU replica settles the backend");
    assert_eq!(used.backend.as_str(), backend.as_str(), "{used}");
    e
}

/// [`load_dir_with`] on a fixture model of `tests/fixtures/`.
pub fn load_with(
    model: &str,
    dtype: vlembed::models::Precision,
    backend: vlembed::models::CpuBackend,
) -> vlembed::embedder::Embedder {
    load_dir_with(&repo().join("tests/fixtures").join(model), dtype, backend)
}

pub fn fixture_model() -> PathBuf {
    repo().join("tests/fixtures/clip-tiny")
}

pub fn image_path(name: &str) -> PathBuf {
    repo().join("tests/fixtures/images").join(name)
}

pub fn image(name: &str) -> Vec<u8> {
    std::fs::read(image_path(name)).expect("fixture image")
}

pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The built-in defaults, loopback, an ephemeral port and the fixture model
/// named "clip-tiny".
pub fn config() -> Config {
    let mut c = Config::builtin().unwrap();
    c.server.host = "127.0.0.1".into();
    c.server.port = 0;
    c.server.preprocess_threads = 2;
    c.server.shutdown_timeout_ms = 5_000;
    let mut m = ModelConfig::with_defaults(fixture_model().to_str().unwrap()).unwrap();
    m.name = "clip-tiny".into();
    // The suites count batches and inject faults per forward pass: they test
    // the model path, so the embedding cache (on by default) is off here;
    // tests/http_cache.rs turns it on.
    m.embedding_cache_bytes = 0;
    c.models = vec![m];
    c.validate().unwrap();
    c
}

/// Faults injected into every replica of the served model.
#[derive(Default)]
pub struct Faults {
    /// Sleep this long before each batch.
    pub delay_ms: AtomicU64,
    /// Fail the next batches with an error.
    pub fail: AtomicBool,
    /// Panic in the next batch (once).
    pub panic: AtomicBool,
    /// Fail the next batch (once) with a sticky CUDA error (an illegal
    /// address: the device context is poisoned).
    pub sticky: AtomicBool,
}

/// A candle error worded as cudarc words a driver error with `code` (e.g.
/// `CUDA_ERROR_ILLEGAL_ADDRESS`): what a CUDA replica returns, made on CPU.
pub fn cuda_error(code: &str) -> ModelError {
    ModelError::Candle(candle_core::Error::Cuda(Box::new(std::io::Error::other(
        format!("DriverError({code}, \"injected\")"),
    ))))
}

/// Hooks that wrap every replica of the served models: `wrap(model name,
/// replica)` gives what the worker runs instead (fault injection, gates).
pub fn wrap_replicas<W, F>(wrap: F) -> Hooks
where
    W: EmbeddingModel + 'static,
    F: Fn(&str, Box<dyn EmbeddingModel>) -> W + Send + Sync + 'static,
{
    Hooks {
        wrap_replica: Some(Arc::new(move |name, inner| {
            Box::new(wrap(name, inner)) as Box<dyn EmbeddingModel>
        })),
        ..Default::default()
    }
}

pub struct Faulty {
    inner: Box<dyn EmbeddingModel>,
    faults: Arc<Faults>,
}

impl Faulty {
    pub fn new(inner: Box<dyn EmbeddingModel>, faults: &Arc<Faults>) -> Self {
        Faulty {
            inner,
            faults: Arc::clone(faults),
        }
    }
}

impl EmbeddingModel for Faulty {
    fn embed_stepped(
        &self,
        batch: &[&Prepared],
        between: Between<'_>,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let d = self.faults.delay_ms.load(Ordering::SeqCst);
        if d > 0 {
            std::thread::sleep(Duration::from_millis(d));
        }
        if self.faults.panic.swap(false, Ordering::SeqCst) {
            panic!("injected panic inside the model");
        }
        if self.faults.fail.load(Ordering::SeqCst) {
            return Err(ModelError::Batch("injected failure".into()));
        }
        if self.faults.sticky.swap(false, Ordering::SeqCst) {
            return Err(cuda_error("CUDA_ERROR_ILLEGAL_ADDRESS"));
        }
        self.inner.embed_stepped(batch, between)
    }
}

pub fn faulty(faults: &Arc<Faults>) -> Hooks {
    let faults = Arc::clone(faults);
    wrap_replicas(move |_name, inner| Faulty::new(inner, &faults))
}

pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    pub handle: ServerHandle,
}

pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Reply {
    pub fn error_type(&self) -> &str {
        self.body["error"]["type"].as_str().unwrap_or("")
    }

    pub fn error_message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or("")
    }
}

impl TestServer {
    /// Starts a server; models load in the background.
    pub async fn start(config: Config, hooks: Hooks) -> TestServer {
        let handle = vlembed::app::start(config, hooks).await.unwrap();
        TestServer {
            base: format!("http://{}", handle.addr),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
            handle,
        }
    }

    /// Starts a server and waits until /ready says 200.
    pub async fn ready(config: Config, hooks: Hooks) -> TestServer {
        let s = Self::start(config, hooks).await;
        s.wait_ready().await;
        s
    }

    pub async fn wait_ready(&self) {
        for _ in 0..400 {
            if self.get("/ready").await.status == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the server did not become ready in 10 s");
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn reply(res: reqwest::Response) -> Reply {
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let text = res.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply {
            status,
            headers,
            body,
            text,
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        Self::reply(self.client.get(self.url(path)).send().await.unwrap()).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Reply {
        Self::reply(
            self.client
                .post(self.url(path))
                .json(body)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    pub async fn post_raw(&self, path: &str, content_type: Option<&str>, body: Vec<u8>) -> Reply {
        let mut req = self.client.post(self.url(path)).body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        Self::reply(req.send().await.unwrap()).await
    }

    pub async fn post_form(&self, path: &str, form: reqwest::multipart::Form) -> Reply {
        Self::reply(
            self.client
                .post(self.url(path))
                .multipart(form)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    /// Embeds with /embed and returns the embeddings.
    pub async fn embed(&self, inputs: Value) -> Vec<Vec<f32>> {
        let r = self
            .post_json("/embed", &serde_json::json!({"inputs": inputs}))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        floats(&r.body["embeddings"])
    }

    pub async fn metrics(&self) -> String {
        self.get("/metrics").await.text
    }

    pub async fn stop(self) {
        self.handle.shutdown();
        tokio::time::timeout(Duration::from_secs(20), self.handle.wait())
            .await
            .expect("the server did not stop in time")
            .expect("the server stopped with an error");
    }
}

pub fn floats(v: &Value) -> Vec<Vec<f32>> {
    v.as_array()
        .expect("an array of embeddings")
        .iter()
        .map(|e| {
            e.as_array()
                .expect("an embedding")
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

/// One vector of floats (a JSON array of numbers).
pub fn vector(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("an array of numbers")
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// A JSON array of token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("an array of ids")
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

/// The value of a metric line (exact name with labels) in the exposition.
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
}

/// The reference file of the fixture model.
pub fn reference() -> Value {
    reference_file("clip-tiny.json")
}

/// The OpenAPI document as the server's source has it.
pub fn openapi() -> Value {
    vlembed::http::openapi_json().unwrap()
}

fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let pointer = r.trim_start_matches('#');
            doc.pointer(pointer)
                .unwrap_or_else(|| panic!("dangling $ref {r}"))
        }
        None => v,
    }
}

/// Checks `body` against the schema openapi.yaml gives for `method path`
/// answering `status` (JSON content).
pub fn assert_conforms(doc: &Value, method: &str, path: &str, status: u16, body: &Value) {
    let op = &doc["paths"][path][method.to_ascii_lowercase()];
    assert!(op.is_object(), "{method} {path} is not in openapi.yaml");
    let resp = op["responses"]
        .get(status.to_string())
        .unwrap_or_else(|| panic!("{method} {path}: status {status} is not documented"));
    let resp = resolve(doc, resp);
    let schema = &resp["content"]["application/json"]["schema"];
    assert!(
        schema.is_object(),
        "{method} {path} {status}: no application/json schema"
    );
    let mut root = doc.clone();
    let obj = root.as_object_mut().unwrap();
    obj.insert("allOf".into(), serde_json::json!([schema]));
    let validator = jsonschema::validator_for(&root).expect("a valid schema");
    let errors: Vec<String> = validator
        .iter_errors(body)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{method} {path} {status} does not match openapi.yaml: {errors:?}\nbody: {body}"
    );
}

/// Embeddings computed without the server: the library's synchronous
/// embedder, one input at a time (unbatched).
pub fn direct(inputs: &[vlembed::input::Input], normalize: bool) -> Vec<Vec<f32>> {
    use vlembed::embedder::Embedder;
    use vlembed::models::{DeviceSpec, LoadOptions, ModelSource};
    let source = ModelSource::parse(fixture_model().to_str().unwrap(), None);
    let e = Embedder::load(&source, DeviceSpec::Cpu, &LoadOptions::default()).unwrap();
    inputs
        .iter()
        .map(|i| {
            e.embed(std::slice::from_ref(i), normalize, true)
                .unwrap()
                .remove(0)
        })
        .collect()
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}
