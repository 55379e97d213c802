//! Request ids, the access log, CORS, process and build metrics, and the
//! Grafana dashboard, against a real server (ephemeral loopback port, the
//! fixture model). Log lines are captured as JSON by a subscriber installed
//! for this test binary.

mod common;

use std::io::Write;
use std::sync::{Mutex, OnceLock};

use common::*;
use serde_json::{json, Value};
use vlembed::app::Hooks;

static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the capturing JSON subscriber once for the whole binary.
fn capture_logs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "info,vlembed::worker=debug",
            ))
            .with_writer(|| Capture)
            .init();
    });
}

/// Every captured log line (JSON objects).
fn log_lines() -> Vec<Value> {
    let text = String::from_utf8_lossy(&LOGS.lock().unwrap()).to_string();
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Captured lines whose `request` span (or fields) carry `id`.
fn lines_about(id: &str) -> Vec<Value> {
    log_lines()
        .into_iter()
        .filter(|l| {
            l["span"]["request_id"] == id
                || l["fields"]["request_id"] == id
                || l["fields"]["request_ids"]
                    .as_str()
                    .is_some_and(|s| s.contains(&format!("\"{id}\"")))
        })
        .collect()
}

async fn send(
    s: &TestServer,
    method: reqwest::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> Reply {
    let mut req = s.client.request(method, s.url(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.json(b);
    }
    TestServer::reply(req.send().await.unwrap()).await
}

fn header<'a>(r: &'a Reply, name: &str) -> Option<&'a str> {
    r.headers.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn request_ids_are_taken_checked_or_generated() {
    capture_logs();
    let s = TestServer::ready(config(), Hooks::default()).await;
    let doc = openapi();
    // Generated: 32 hex digits, distinct per request.
    let a = s.get("/health").await;
    let b = s.get("/health").await;
    let ida = header(&a, "x-request-id").expect("an id").to_string();
    assert_eq!(ida.len(), 32, "{ida}");
    assert!(ida.bytes().all(|c| c.is_ascii_hexdigit()));
    assert_ne!(Some(ida.as_str()), header(&b, "x-request-id"));
    // Taken as given.
    let r = send(
        &s,
        reqwest::Method::GET,
        "/health",
        &[("x-request-id", "client-42.a:b")],
        None,
    )
    .await;
    assert_eq!(header(&r, "x-request-id"), Some("client-42.a:b"));
    // Refused (bad charset, too long): replaced by a generated one.
    for bad in ["has space", "quote\"d", &"x".repeat(129)] {
        let r = send(
            &s,
            reqwest::Method::GET,
            "/health",
            &[("x-request-id", bad)],
            None,
        )
        .await;
        let got = header(&r, "x-request-id").unwrap();
        assert_ne!(got, bad);
        assert_eq!(got.len(), 32);
    }
    // In error bodies, matching the header, and the body still conforms.
    let r = send(
        &s,
        reqwest::Method::POST,
        "/embed",
        &[("x-request-id", "err-1")],
        Some(&json!({"model": "nope", "inputs": ["a"]})),
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.text);
    assert_eq!(r.body["error"]["request_id"], "err-1");
    assert_conforms(&doc, "POST", "/embed", 404, &r.body);
    // Errors axum produces itself (unknown route, bad JSON) carry it too.
    let r = send(
        &s,
        reqwest::Method::GET,
        "/nowhere",
        &[("x-request-id", "err-2")],
        None,
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.body["error"]["request_id"], "err-2");
    let r = s
        .post_raw("/embed", Some("application/json"), b"{not json".to_vec())
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.body["error"]["request_id"].as_str(),
        header(&r, "x-request-id")
    );
    s.stop().await;
}

#[tokio::test]
async fn every_log_line_about_a_request_carries_its_id() {
    capture_logs();
    let s = TestServer::ready(config(), Hooks::default()).await;
    let img = image("rgb_225x223.png");
    let body = json!({"model": "clip-tiny", "inputs": ["a red square", {"image": b64(&img)}]});
    let r = send(
        &s,
        reqwest::Method::POST,
        "/embed",
        &[("x-request-id", "obs-log-1")],
        Some(&body),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    s.stop().await;
    let lines = lines_about("obs-log-1");
    // The access log line.
    let access: Vec<&Value> = lines
        .iter()
        .filter(|l| l["target"] == "vlembed::access")
        .collect();
    assert_eq!(access.len(), 1, "{lines:#?}");
    let f = &access[0]["fields"];
    assert_eq!(f["method"], "POST");
    assert_eq!(f["route"], "/embed");
    assert_eq!(f["model"], "clip-tiny");
    assert_eq!(f["status"], 200);
    assert_eq!(f["inputs"], 2);
    assert_eq!(f["request_id"], "obs-log-1");
    let body_len = serde_json::to_vec(&body).unwrap().len() as u64;
    assert_eq!(f["bytes_in"].as_u64(), Some(body_len));
    assert_eq!(f["bytes_out"].as_u64(), Some(r.text.len() as u64));
    for k in ["preprocess_ms", "queue_ms", "inference_ms", "total_ms"] {
        assert!(f[k].as_f64().is_some_and(|v| v >= 0.0), "{k} in {f}");
    }
    assert!(f["inference_ms"].as_f64().unwrap() > 0.0, "{f}");
    assert!(f["batches"].as_u64().unwrap() >= 1, "{f}");
    assert!(f["total_ms"].as_f64().unwrap() >= f["inference_ms"].as_f64().unwrap());
    // The worker's batch line names the request.
    assert!(
        lines
            .iter()
            .any(|l| l["target"] == "vlembed::worker" && l["fields"]["message"] == "batch"),
        "no batch line for obs-log-1 in {lines:#?}"
    );
    // The access log is in the request span.
    assert_eq!(access[0]["span"]["request_id"], "obs-log-1");
}

#[tokio::test]
async fn probes_are_left_out_of_the_access_log_by_config() {
    capture_logs();
    let s = TestServer::ready(config(), Hooks::default()).await;
    send(
        &s,
        reqwest::Method::GET,
        "/health",
        &[("x-request-id", "probe-excluded")],
        None,
    )
    .await;
    send(
        &s,
        reqwest::Method::GET,
        "/info",
        &[("x-request-id", "info-logged")],
        None,
    )
    .await;
    s.stop().await;
    let mut c = config();
    c.server.access_log_exclude = vec![];
    let s = TestServer::ready(c, Hooks::default()).await;
    send(
        &s,
        reqwest::Method::GET,
        "/health",
        &[("x-request-id", "probe-logged")],
        None,
    )
    .await;
    s.stop().await;
    let mut c = config();
    c.server.access_log = false;
    let s = TestServer::ready(c, Hooks::default()).await;
    send(
        &s,
        reqwest::Method::GET,
        "/info",
        &[("x-request-id", "log-off")],
        None,
    )
    .await;
    s.stop().await;
    let access = |id: &str| {
        lines_about(id)
            .into_iter()
            .filter(|l| l["target"] == "vlembed::access")
            .count()
    };
    assert_eq!(access("probe-excluded"), 0);
    assert_eq!(access("info-logged"), 1);
    assert_eq!(access("probe-logged"), 1);
    assert_eq!(access("log-off"), 0);
}

#[tokio::test]
async fn cors_is_off_by_default_and_answers_preflights_when_configured() {
    let preflight = [
        ("origin", "http://app.test"),
        ("access-control-request-method", "POST"),
        (
            "access-control-request-headers",
            "authorization,content-type",
        ),
    ];
    let s = TestServer::ready(config(), Hooks::default()).await;
    let r = send(&s, reqwest::Method::OPTIONS, "/embed", &preflight, None).await;
    assert!(
        header(&r, "access-control-allow-origin").is_none(),
        "{:?}",
        r.headers
    );
    let r = send(
        &s,
        reqwest::Method::GET,
        "/health",
        &[("origin", "http://app.test")],
        None,
    )
    .await;
    assert!(header(&r, "access-control-allow-origin").is_none());
    s.stop().await;

    let mut c = config();
    c.server.cors_allowed_origins = vec!["http://app.test".into()];
    c.server.api_keys = vec!["k1".into()];
    let s = TestServer::ready(c, Hooks::default()).await;
    // The preflight needs no key and allows Authorization.
    let r = send(&s, reqwest::Method::OPTIONS, "/embed", &preflight, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        header(&r, "access-control-allow-origin"),
        Some("http://app.test")
    );
    let allowed = header(&r, "access-control-allow-headers")
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        allowed.contains("authorization") && allowed.contains("content-type"),
        "{allowed}"
    );
    assert!(header(&r, "access-control-allow-methods")
        .unwrap()
        .contains("POST"));
    // The actual call: allowed origin, key checked as usual, id exposed.
    let r = send(
        &s,
        reqwest::Method::POST,
        "/embed",
        &[
            ("origin", "http://app.test"),
            ("authorization", "Bearer k1"),
        ],
        Some(&json!({"inputs": ["a"]})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        header(&r, "access-control-allow-origin"),
        Some("http://app.test")
    );
    assert!(header(&r, "access-control-expose-headers")
        .unwrap()
        .contains("x-request-id"));
    let r = send(
        &s,
        reqwest::Method::POST,
        "/embed",
        &[("origin", "http://app.test")],
        Some(&json!({"inputs": ["a"]})),
    )
    .await;
    assert_eq!(r.status, 401);
    // Another origin is not allowed.
    let r = send(
        &s,
        reqwest::Method::OPTIONS,
        "/embed",
        &[
            ("origin", "http://evil.test"),
            ("access-control-request-method", "POST"),
        ],
        None,
    )
    .await;
    assert!(header(&r, "access-control-allow-origin").is_none());
    s.stop().await;
}

/// Metric families of a text exposition, with their types.
fn families(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.strip_prefix("# TYPE ")?.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.to_string()))
        })
        .collect()
}

/// Every metric name a PromQL expression mentions (vlembed_* and process_*).
fn metric_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("vlembed_") || w.starts_with("process_"))
        .map(str::to_string)
        .collect()
}

fn exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr" | "query", Value::String(e)) => out.push(e.clone()),
                    _ => exprs(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| exprs(x, out)),
        _ => {}
    }
}

#[tokio::test]
async fn metrics_cover_process_build_and_per_model_counts_and_the_dashboard() {
    let s = TestServer::ready(config(), Hooks::default()).await;
    let img = image("rgb_225x223.png");
    let before = s.metrics().await;
    let tokens0 = metric(&before, "vlembed_text_tokens_total{model=\"clip-tiny\"}").unwrap_or(0.0);
    let images0 = metric(&before, "vlembed_images_total{model=\"clip-tiny\"}").unwrap_or(0.0);
    let r = s
        .post_json(
            "/v1/embeddings",
            &json!({"input": ["a photo of a cat", {"image": b64(&img)}, {"image": b64(&img), "text": "x"}]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let tokens = r.body["usage"]["prompt_tokens"].as_f64().unwrap();
    assert!(tokens > 0.0);
    // A rejection, so vlembed_rejected_total has a series.
    let r = s.post_json("/embed", &json!({"inputs": []})).await;
    assert_eq!(r.status, 422);
    let text = s.metrics().await;
    assert_eq!(
        metric(&text, "vlembed_text_tokens_total{model=\"clip-tiny\"}"),
        Some(tokens0 + tokens)
    );
    assert_eq!(
        metric(&text, "vlembed_images_total{model=\"clip-tiny\"}"),
        Some(images0 + 2.0)
    );
    let build = text
        .lines()
        .find(|l| l.starts_with("vlembed_build_info{"))
        .expect("vlembed_build_info");
    assert!(build.ends_with(" 1"), "{build}");
    assert!(
        build.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
        "{build}"
    );
    assert!(
        build.contains("commit=\"") && build.contains("features=\""),
        "{build}"
    );
    #[cfg(target_os = "linux")]
    {
        let rss = metric(&text, "process_resident_memory_bytes").expect("RSS");
        assert!(rss > 1e6, "{rss}");
        assert!(metric(&text, "process_open_fds").unwrap() >= 3.0);
        assert!(metric(&text, "process_cpu_seconds_total").unwrap() > 0.0);
        assert!(metric(&text, "process_start_time_seconds").unwrap() > 1.5e9);
    }

    // The dashboard references only metrics this server exposes.
    let fams = families(&text);
    let exposed = |name: &str| {
        fams.iter().any(|(f, _)| f == name)
            || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                name.strip_suffix(suffix).is_some_and(|base| {
                    fams.iter()
                        .any(|(f, kind)| f == base && kind == "histogram")
                })
            })
    };
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/vlembed.json")).unwrap(),
    )
    .unwrap();
    let mut all = Vec::new();
    exprs(&dash, &mut all);
    let names: Vec<String> = all.iter().flat_map(|e| metric_names(e)).collect();
    assert!(
        names.len() >= 15,
        "too few metric references found: {names:?}"
    );
    let missing: Vec<&String> = names.iter().filter(|n| !exposed(n)).collect();
    assert!(
        missing.is_empty(),
        "dashboard metrics not exposed: {missing:?}"
    );
    // The check itself can fail.
    assert!(!exposed("vlembed_no_such_metric") && !exposed("vlembed_queue_depth_bucket"));
    for needed in [
        "vlembed_queue_depth",
        "vlembed_queue_duration_seconds_bucket",
        "vlembed_batch_size_bucket",
        "vlembed_request_duration_seconds_bucket",
        "vlembed_rejected_total",
        "vlembed_model_ready",
    ] {
        assert!(
            names.iter().any(|n| n == needed),
            "dashboard lacks {needed}"
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn a_summary_line_is_logged_once_ready() {
    capture_logs();
    let mut c = config();
    c.server.api_keys = vec!["k".into()];
    let s = TestServer::ready(c, Hooks::default()).await;
    let want = format!(
        "ready on {}: serving clip-tiny (CLIPModel, f32 on cpu, ",
        s.handle.addr
    );
    let mut found = None;
    for _ in 0..100 {
        found = log_lines().into_iter().find(|l| {
            l["target"] == "vlembed::startup"
                && l["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(&want))
        });
        if found.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let line =
        found.unwrap_or_else(|| panic!("no summary starting {want:?} in {:#?}", log_lines()));
    let msg = line["fields"]["message"].as_str().unwrap();
    assert!(msg.contains("auth on (1 keys)"), "{msg}");
    assert!(msg.contains("/docs"), "{msg}");
    // The CPU backend the model settled on (auto: native or onednn).
    assert!(
        msg.contains(", cpu backend native") || msg.contains(", cpu backend onednn"),
        "{msg}"
    );
    s.stop().await;
}

/// Every replica is warmed up before the model is ready, each on its own
/// device (two CPU replicas here), and again when it is rebuilt; the log
/// gives each one's time and batch shapes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_is_warmed_up_before_ready_and_after_a_rebuild() {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    capture_logs();
    let mut c = config();
    c.server.worker_restart_backoff_ms = 10;
    c.models[0].name = "warm-two".into();
    c.models[0].devices = vec![DeviceSpec::Cpu, DeviceSpec::Cpu];
    let faults = Arc::new(Faults::default());
    let s = TestServer::ready(c, faulty(&faults)).await;
    let warmed = || -> Vec<Value> {
        log_lines()
            .into_iter()
            .filter(|l| {
                l["fields"]["message"] == "replica warmed up" && l["fields"]["model"] == "warm-two"
            })
            .collect()
    };
    let lines = warmed();
    assert_eq!(lines.len(), 2, "{lines:#?}");
    let mut replicas: Vec<u64> = lines
        .iter()
        .map(|l| l["fields"]["replica"].as_u64().unwrap())
        .collect();
    replicas.sort();
    assert_eq!(replicas, vec![0, 1]);
    for l in &lines {
        let shapes = l["fields"]["shapes"].as_str().unwrap();
        assert!(
            shapes.contains("typical") && shapes.contains("largest"),
            "{l}"
        );
        assert!(l["fields"]["warmup_s"].as_f64().unwrap() >= 0.0);
    }
    faults.panic.store(true, Ordering::SeqCst);
    let r = s.post_json("/embed", &json!({"inputs": "boom"})).await;
    assert_eq!(r.status, 500, "{}", r.text);
    s.wait_ready().await;
    for _ in 0..200 {
        if warmed().len() == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(warmed().len(), 3, "the rebuilt replica is warmed up too");
    s.stop().await;
}

/// Without network and without a cached copy, loading names the cache
/// directory searched and the real cause.
#[test]
fn an_uncached_hub_model_offline_names_the_cache_searched() {
    let cache = std::env::temp_dir().join(format!("vlembed-obs-cache-{}", std::process::id()));
    std::fs::create_dir_all(&cache).unwrap();
    for offline in [false, true] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vlembed"));
        cmd.args(["embed", "--model", "BAAI/BGE-VL-base", "--text", "hi"])
            .env("HF_HUB_CACHE", &cache)
            // A closed loopback port: the Hub is unreachable, no packet leaves the machine.
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .env_remove("HF_TOKEN")
            .env_remove("HF_HOME");
        if offline {
            cmd.env("HF_HUB_OFFLINE", "1");
        } else {
            cmd.env_remove("HF_HUB_OFFLINE");
        }
        let out = cmd.output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("is not in the local Hub cache"), "{err}");
        let searched = cache.join("models--BAAI--BGE-VL-base");
        assert!(err.contains(&searched.display().to_string()), "{err}");
        let cause = if offline {
            "HF_HUB_OFFLINE"
        } else {
            "the Hub could not be reached"
        };
        assert!(err.contains(cause), "{err}");
    }
    let _ = std::fs::remove_dir_all(&cache);
}

#[tokio::test]
async fn the_pages_are_served_self_contained_and_can_be_switched_off() {
    let s = TestServer::ready(config(), Hooks::default()).await;
    for (path, needle) in [
        ("/", "<title>vlembed playground</title>"),
        ("/docs", "<title>vlembed API docs</title>"),
    ] {
        let r = s.get(path).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(header(&r, "content-type"), Some("text/html; charset=utf-8"));
        let csp = header(&r, "content-security-policy").unwrap();
        assert!(
            csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"),
            "{csp}"
        );
        assert!(r.text.contains(needle), "{path}");
        assert!(!r.text.contains("src=\"http") && !r.text.contains("href=\"http"));
    }
    // The page works with API keys: it needs none itself.
    s.stop().await;
    let mut c = config();
    c.server.playground = false;
    c.server.docs = false;
    let s = TestServer::ready(c, Hooks::default()).await;
    for path in ["/", "/docs"] {
        let r = s.get(path).await;
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.error_type(), "not_found");
    }
    assert_eq!(s.get("/health").await.status, 200);
    s.stop().await;
}
