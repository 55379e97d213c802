//! Issue 13.3 and 13.4 against the real server with the fixture model: the
//! embedding cache (hits skip the forward pass, what changes the vector
//! misses, the byte bound evicts, off works), the model fingerprint (in
//! `/info` and the response header, stable across restarts, changed by the
//! dtype and the preprocessing configuration) and the startup probes with
//! golden vectors written by `vlembed probe` (a match is ready, a drift is
//! `/ready` 503 with the reason in `/info`).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use vlembed::app::Hooks;
use vlembed::batching::cache::entry_bytes;
use vlembed::config::Config;
use vlembed::models::Precision;

const HEADER: &str = "x-vlembed-model-fingerprint";
/// The fixture model's embedding width.
const DIMS: usize = 16;

fn cached_config(bytes: usize) -> Config {
    let mut c = config();
    c.models[0].embedding_cache_bytes = bytes;
    c
}

fn counter(text: &str, name: &str) -> f64 {
    metric(text, &format!("{name}{{model=\"clip-tiny\"}}")).unwrap_or(0.0)
}

struct Counts {
    hits: f64,
    misses: f64,
    evictions: f64,
    bytes: f64,
    /// Forward passes so far.
    batches: f64,
}

async fn counts(s: &TestServer) -> Counts {
    let text = s.metrics().await;
    Counts {
        hits: counter(&text, "vlembed_embedding_cache_hits_total"),
        misses: counter(&text, "vlembed_embedding_cache_misses_total"),
        evictions: counter(&text, "vlembed_embedding_cache_evictions_total"),
        bytes: counter(&text, "vlembed_embedding_cache_bytes"),
        batches: counter(&text, "vlembed_batch_size_count"),
    }
}

async fn embed_one(s: &TestServer, body: Value) -> (Vec<f32>, Reply) {
    let r = s.post_json("/embed", &body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    (floats(&r.body["embeddings"]).remove(0), r)
}

#[tokio::test]
async fn an_identical_input_is_answered_from_the_cache() {
    let s = TestServer::ready(cached_config(1 << 20), Hooks::default()).await;
    let c0 = counts(&s).await;
    let (first, _) = embed_one(&s, json!({"inputs": ["a red bicycle"]})).await;
    let c1 = counts(&s).await;
    assert_eq!((c1.misses - c0.misses, c1.hits - c0.hits), (1.0, 0.0));
    assert_eq!(c1.batches - c0.batches, 1.0);
    assert_eq!(c1.bytes, entry_bytes(DIMS) as f64);

    let (second, _) = embed_one(&s, json!({"inputs": ["a red bicycle"]})).await;
    let c2 = counts(&s).await;
    assert_eq!(second, first, "a hit returns the very same vector");
    assert_eq!((c2.hits - c1.hits, c2.misses - c1.misses), (1.0, 0.0));
    assert_eq!(c2.batches, c1.batches, "a hit runs no forward pass");

    // The cache holds the unnormalised vector: normalize=false is a hit too,
    // and gives the vector that normalises to the first.
    let (raw, _) = embed_one(&s, json!({"inputs": ["a red bicycle"], "normalize": false})).await;
    let c3 = counts(&s).await;
    assert_eq!(c3.hits - c2.hits, 1.0);
    assert!(
        (norm(&raw) - 1.0).abs() > 1e-3,
        "unnormalised: {}",
        norm(&raw)
    );
    let fresh = direct(&[vlembed::input::Input::text("a red bicycle")], false).remove(0);
    assert!(max_abs_diff(&raw, &fresh) <= tol::CLIP_F32);
    let mut renorm = raw.clone();
    vlembed::vector::l2_normalize(&mut renorm);
    assert!(max_abs_diff(&renorm, &first) <= tol::SAME_MATH);

    // A different role, instruction or truncation of the text is another key.
    for body in [
        json!({"inputs": [{"text": "a red bicycle", "role": "query"}]}),
        json!({"inputs": [{"text": "a red bicycle", "instruction": "find it"}]}),
        json!({"inputs": [{"text": "a red bicycle", "role": "query", "instruction": "find it"}]}),
    ] {
        let before = counts(&s).await;
        let (v, _) = embed_one(&s, body.clone()).await;
        let after = counts(&s).await;
        assert_eq!(after.misses - before.misses, 1.0, "{body}");
        assert_eq!(after.batches - before.batches, 1.0, "{body}");
        // CLIP ignores roles and instructions: same vector, computed again.
        assert!(max_abs_diff(&v, &first) <= tol::SAME_MATH);
    }

    // Images: the key is the preprocessed pixels; a mix of hits and misses in
    // one request keeps the order.
    let img = b64(&image("rgb_225x223.png"));
    let body = json!({"inputs": [{"image": img}, "a red bicycle", "a blue car"]});
    let r = s.post_json("/embed", &body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let once = floats(&r.body["embeddings"]);
    let before = counts(&s).await;
    let r = s.post_json("/embed", &body).await;
    let again = floats(&r.body["embeddings"]);
    let after = counts(&s).await;
    assert_eq!(again, once);
    assert_eq!(after.hits - before.hits, 3.0);
    assert_eq!(after.batches, before.batches);
    assert_eq!(r.body["usage"]["images"], 1, "usage counts cached inputs");
    assert_eq!(once[1], first);

    // /score and /v1/embeddings share the cache.
    let before = counts(&s).await;
    let r = s
        .post_json(
            "/score",
            &json!({"query": "a red bicycle", "candidates": ["a blue car"]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = s
        .post_json("/v1/embeddings", &json!({"input": ["a blue car"]}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let after = counts(&s).await;
    assert_eq!(after.hits - before.hits, 3.0);
    assert_eq!(after.batches, before.batches);

    let info = s.get("/info").await.body;
    let cache = &info["models"][0]["embedding_cache"];
    assert_eq!(cache["capacity_bytes"], 1 << 20);
    assert_eq!(cache["entries"], 6, "{info}");
    assert_eq!(cache["bytes"], 6 * entry_bytes(DIMS));
    assert_conforms(&openapi(), "GET", "/info", 200, &info);
    s.stop().await;
}

#[tokio::test]
async fn the_byte_bound_evicts_the_least_recently_used() {
    // Room for two vectors of the fixture model.
    let s = TestServer::ready(cached_config(2 * entry_bytes(DIMS)), Hooks::default()).await;
    for t in ["one", "two"] {
        embed_one(&s, json!({"inputs": t})).await;
    }
    // Touch "one": "two" becomes the oldest.
    embed_one(&s, json!({"inputs": "one"})).await;
    let c0 = counts(&s).await;
    assert_eq!((c0.hits, c0.evictions), (1.0, 0.0));
    embed_one(&s, json!({"inputs": "three"})).await;
    let c1 = counts(&s).await;
    assert_eq!(c1.evictions, 1.0);
    assert!(c1.bytes <= (2 * entry_bytes(DIMS)) as f64);
    embed_one(&s, json!({"inputs": "one"})).await;
    let c2 = counts(&s).await;
    assert_eq!(c2.hits - c1.hits, 1.0, "the recently used one stayed");
    embed_one(&s, json!({"inputs": "two"})).await;
    let c3 = counts(&s).await;
    assert_eq!(c3.misses - c2.misses, 1.0, "the oldest was evicted");
    assert_eq!(c3.batches - c2.batches, 1.0);
    assert_eq!(c3.evictions, 2.0);
    s.stop().await;
}

#[tokio::test]
async fn with_the_cache_off_every_input_runs_the_model() {
    let s = TestServer::ready(config(), Hooks::default()).await;
    let (a, _) = embed_one(&s, json!({"inputs": "a red bicycle"})).await;
    let (b, _) = embed_one(&s, json!({"inputs": "a red bicycle"})).await;
    assert!(max_abs_diff(&a, &b) <= tol::SAME_MATH);
    let c = counts(&s).await;
    assert_eq!(c.batches, 2.0);
    assert_eq!((c.hits, c.misses, c.bytes), (0.0, 0.0, 0.0));
    let info = s.get("/info").await.body;
    assert_eq!(info["models"][0]["embedding_cache"]["capacity_bytes"], 0);
    s.stop().await;
}

/// The built-in configuration serves with the cache on (64 MiB).
#[test]
fn the_cache_is_on_by_default() {
    let m = vlembed::config::ModelConfig::with_defaults("x").unwrap();
    assert_eq!(m.embedding_cache_bytes, 64 << 20);
    assert_eq!(m.golden_vectors, None);
}

/// The fingerprint `/info` reports, and checks that every embedding endpoint
/// sends its short form.
async fn fingerprint(s: &TestServer) -> Value {
    let info = s.get("/info").await.body;
    let fp = info["models"][0]["fingerprint"].clone();
    let id = fp["id"].as_str().expect("a fingerprint").to_string();
    let sha = fp["sha256"].as_str().unwrap();
    assert_eq!(sha.len(), 64);
    assert_eq!(id, format!("sha256:{}", &sha[..16]));
    for (path, body) in [
        ("/embed", json!({"inputs": "x"})),
        ("/score", json!({"query": "x", "candidates": ["y"]})),
        ("/v1/embeddings", json!({"input": "x"})),
    ] {
        let r = s.post_json(path, &body).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(
            r.headers.get(HEADER).and_then(|v| v.to_str().ok()),
            Some(id.as_str()),
            "{path}"
        );
    }
    fp
}

#[tokio::test]
async fn the_fingerprint_is_stable_and_follows_what_changes_the_vectors() {
    let s = TestServer::ready(config(), Hooks::default()).await;
    let fp = fingerprint(&s).await;
    s.stop().await;
    let weights = std::fs::read(fixture_model().join("model.safetensors")).unwrap();
    assert!(fp["weights"].as_str().unwrap().starts_with("sha256:"));
    assert_eq!(fp["architecture"], "CLIPModel");
    assert_eq!(fp["dtype"], "f32");
    assert_eq!(fp["prompt"], "none");
    assert!(!weights.is_empty());

    // A restart computes the same fingerprint.
    let s = TestServer::ready(config(), Hooks::default()).await;
    assert_eq!(fingerprint(&s).await, fp);
    s.stop().await;

    // Another dtype: another fingerprint; only the dtype component moved.
    let mut c = config();
    c.models[0].dtype = Precision::F16;
    let s = TestServer::ready(c, Hooks::default()).await;
    let f16 = fingerprint(&s).await;
    s.stop().await;
    assert_ne!(f16["sha256"], fp["sha256"]);
    assert_eq!(f16["dtype"], "f16");
    assert_eq!(f16["weights"], fp["weights"]);

    // Another preprocessing configuration (image_mean moved): another
    // fingerprint, same weights identity.
    let dir = temp_dir("preprocessing");
    copy_model(&dir, |name, bytes| {
        if name != "preprocessor_config.json" {
            return bytes;
        }
        let mut v: Value = serde_json::from_slice(&bytes).unwrap();
        let m = v["image_mean"][0].as_f64().unwrap();
        v["image_mean"][0] = json!(m + 0.01);
        serde_json::to_vec_pretty(&v).unwrap()
    });
    let mut c = config();
    c.models[0].source = dir.display().to_string();
    let s = TestServer::ready(c, Hooks::default()).await;
    let pre = fingerprint(&s).await;
    s.stop().await;
    assert_ne!(pre["sha256"], fp["sha256"]);
    assert_ne!(pre["preprocessing"], fp["preprocessing"]);
    assert_eq!(pre["weights"], fp["weights"]);
    assert_eq!(pre["tokenizer"], fp["tokenizer"]);
    let _ = std::fs::remove_dir_all(&dir);
}

fn temp_dir(what: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("vlembed-http-cache-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Copies the fixture model into `dir`, each file through `edit`.
fn copy_model(dir: &Path, edit: impl Fn(&str, Vec<u8>) -> Vec<u8>) {
    for entry in std::fs::read_dir(fixture_model()).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        let bytes = std::fs::read(entry.path()).unwrap();
        std::fs::write(dir.join(&name), edit(&name, bytes)).unwrap();
    }
}

/// Runs `vlembed probe` on the fixture model; returns the golden file.
fn write_golden(path: &Path) -> Value {
    probe_model(&fixture_model(), path)
}

/// Runs `vlembed probe` on `model`, writing `path`; returns the file.
fn probe_model(model: &Path, path: &Path) -> Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vlembed"))
        .args(["probe", "--model"])
        .arg(model)
        .arg("--out")
        .arg(path)
        .env("VLEMBED_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "vlembed probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    read_json(path)
}

/// Starts a server whose model reads `golden`, and waits until the model
/// has loaded (ready or not).
async fn with_golden(golden: &Path) -> TestServer {
    let mut c = config();
    c.models[0].golden_vectors = Some(golden.to_path_buf());
    let s = TestServer::start(c, Hooks::default()).await;
    for _ in 0..400 {
        let info = s.get("/info").await.body;
        if info["models"][0]["status"] != "loading" {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the model did not load in 10 s");
}

/// A model that reads instructions (the tiny BGE-VL-MLLM fixture) also
/// probes a composed query with an instruction; its fingerprint covers the
/// prompt template.
#[test]
fn an_mllm_probes_a_composed_query_too() {
    let dir = temp_dir("mllm-probe");
    let path = dir.join("golden.json");
    let g = probe_model(&repo().join("tests/fixtures/mllm-tiny-b"), &path);
    let names: Vec<&str> = g["probes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["text", "image", "composed_query"]);
    let composed = vector(&g["probes"][2]["embedding"]);
    let image = vector(&g["probes"][1]["embedding"]);
    assert!(
        max_abs_diff(&composed, &image) > 1e-3,
        "the composed query is its own vector"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn golden_vectors_decide_readiness() {
    let dir = temp_dir("golden");
    let path = dir.join("golden.json");
    let golden = write_golden(&path);
    assert_eq!(golden["version"], 1);
    assert_eq!(golden["tolerance"].as_f64().unwrap() as f32, 1e-4);
    let names: Vec<&str> = golden["probes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["text", "image"]);
    for p in golden["probes"].as_array().unwrap() {
        let v = vector(&p["embedding"]);
        assert_eq!(v.len(), DIMS);
        assert!((norm(&v) - 1.0).abs() <= tol::UNIT_NORM);
    }

    // Matching: ready, and /info says so.
    let s = with_golden(&path).await;
    assert_eq!(s.get("/ready").await.status, 200);
    let info = s.get("/info").await.body;
    let m = &info["models"][0];
    assert_eq!(m["status"], "ready");
    assert_eq!(m["probes"]["golden"]["status"], "match", "{info}");
    assert_eq!(m["probes"]["golden"]["drift"], Value::Null);
    assert_eq!(m["fingerprint"]["id"], golden["fingerprint"]);
    assert_eq!(
        m["probes"]["digests"]["text"], golden["probes"][0]["digest"],
        "the server's probe is the CLI's, bit for bit"
    );
    assert_conforms(&openapi(), "GET", "/info", 200, &info);
    s.stop().await;

    // One component moved beyond the tolerance: not ready, and why.
    let mut drifted = golden.clone();
    let x = drifted["probes"][1]["embedding"][3].as_f64().unwrap();
    drifted["probes"][1]["embedding"][3] = json!(x + 0.01);
    let bad = dir.join("drifted.json");
    std::fs::write(&bad, serde_json::to_vec(&drifted).unwrap()).unwrap();
    let s = with_golden(&bad).await;
    let r = s.get("/ready").await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.body["models"]["clip-tiny"], "drifted");
    let why = r.error_message();
    assert!(
        why.contains("drifted") && why.contains("probe image") && why.contains("tolerance"),
        "{why}"
    );
    assert_conforms(&openapi(), "GET", "/ready", 503, &r.body);
    let info = s.get("/info").await.body;
    let m = &info["models"][0];
    assert_eq!(m["status"], "drifted");
    assert_eq!(m["probes"]["golden"]["status"], "drifted");
    assert!(
        m["error"].as_str().unwrap().contains("probe image"),
        "{info}"
    );
    let diff = m["probes"]["golden"]["max_abs_diff"]["image"]
        .as_f64()
        .unwrap();
    assert!((diff - 0.01).abs() < 1e-3, "{diff}");
    assert_conforms(&openapi(), "GET", "/info", 200, &info);
    // The model still answers requests sent to it; only readiness is off.
    assert_eq!(
        s.post_json("/embed", &json!({"inputs": "x"})).await.status,
        200
    );
    s.stop().await;

    // A golden file that cannot be read is a load failure naming it.
    let mut c = config();
    c.models[0].golden_vectors = Some(dir.join("missing.json"));
    let s = TestServer::start(c, Hooks::default()).await;
    let err = tokio::time::timeout(Duration::from_secs(20), s.handle.wait())
        .await
        .expect("the server stops")
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.json"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

static LOGS: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

struct Capture;

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captured JSON log lines (a subscriber installed once for this binary).
fn log_lines() -> Vec<Value> {
    static ONCE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_writer(|| Capture)
            .init();
    });
    let text = String::from_utf8_lossy(&LOGS.lock().unwrap()).to_string();
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[tokio::test]
async fn the_logs_show_the_fingerprint_the_probes_and_cached_inputs() {
    log_lines();
    let s = TestServer::ready(cached_config(1 << 20), Hooks::default()).await;
    let id = fingerprint(&s).await["id"].as_str().unwrap().to_string();
    for request_id in ["cache-log-1", "cache-log-2"] {
        let r = s
            .client
            .post(s.url("/embed"))
            .header("x-request-id", request_id)
            .json(&json!({"inputs": ["logged twice"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    s.stop().await;
    let lines = log_lines();
    let access = |rid: &str| {
        lines
            .iter()
            .find(|l| l["target"] == "vlembed::access" && l["fields"]["request_id"] == rid)
            .map(|l| l["fields"].clone())
            .unwrap_or_else(|| panic!("no access line for {rid}"))
    };
    let first = access("cache-log-1");
    assert_eq!(
        (first["batches"].as_u64(), first["cached"].as_u64()),
        (Some(1), Some(0)),
        "{first}"
    );
    let second = access("cache-log-2");
    assert_eq!(
        (second["batches"].as_u64(), second["cached"].as_u64()),
        (Some(0), Some(1)),
        "{second}"
    );
    assert_eq!(second["inference_ms"].as_f64(), Some(0.0));
    // The startup summary and the model-ready line carry the fingerprint.
    let summary = lines
        .iter()
        .filter(|l| l["target"] == "vlembed::startup")
        .filter_map(|l| l["fields"]["message"].as_str())
        .find(|m| m.contains(&id));
    assert!(summary.is_some(), "no startup line with {id}");
    assert!(lines
        .iter()
        .any(|l| l["fields"]["message"] == "model ready" && l["fields"]["fingerprint"] == id));
    // Each probe is logged with its digest.
    for probe in ["text", "image"] {
        assert!(
            lines
                .iter()
                .any(|l| l["fields"]["message"] == "startup probe"
                    && l["fields"]["probe"] == probe
                    && l["fields"]["digest"]
                        .as_str()
                        .is_some_and(|d| d.starts_with("sha256:"))),
            "no startup probe line for {probe}"
        );
    }
}
