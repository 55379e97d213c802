//! No client, connection pattern or fault can deny service to the others:
//! slow uploads, idle and slow-header connections, a large request ahead of
//! a small one, cancelled requests holding capacity, a poisoned input in a
//! shared batch, panicking workers, sticky device errors, a missing GPU at
//! startup, shutdown under load, empty key lists and the resolved
//! configuration (`vlembed config`).
//! Against a real server on a loopback port with the fixture model; faults
//! are injected by wrapping the real replica (test code only).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use vlembed::app::Hooks;
use vlembed::config::{Config, Layers};
use vlembed::input::Modality;
use vlembed::models::{Between, EmbeddingModel, ModelError};
use vlembed::preprocess::Prepared;

/// Opens a connection that sends a request head announcing a large body,
/// then one byte of it, and keeps quiet.
/// (Plain blocking loopback sockets: connecting and writing a few bytes
/// returns at once.)
async fn slow_upload(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    let head = "POST /embed HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
                content-length: 16000000\r\n\r\n{";
    s.write_all(head.as_bytes()).unwrap();
    s
}

/// Reads until the peer closes (or `limit` passes); returns what came, or
/// `None` when the connection is still open after `limit`.
async fn read_to_close(s: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut s = s.try_clone().unwrap();
    tokio::task::spawn_blocking(move || {
        s.set_read_timeout(Some(limit)).unwrap();
        let mut buf = Vec::new();
        match s.read_to_end(&mut buf) {
            Ok(_) => Some(String::from_utf8_lossy(&buf).into_owned()),
            // A reset after the answer still counts as closed.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                Some(String::from_utf8_lossy(&buf).into_owned())
            }
            Err(_) => None,
        }
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_uploads_do_not_lock_out_other_clients() {
    let c = config();
    assert!(c.server.max_concurrent_requests < 200);
    let s = TestServer::ready(c, Hooks::default()).await;
    let mut slow = Vec::new();
    for _ in 0..220 {
        slow.push(slow_upload(s.handle.addr).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for path in ["/embed", "/v1/embeddings"] {
        let body = if path == "/embed" {
            json!({"inputs": "still served"})
        } else {
            json!({"input": "still served"})
        };
        let r = s.post_json(path, &body).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text);
    }
    drop(slow);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_slower_than_the_minimum_rate_gets_408() {
    let mut c = config();
    c.server.body_read_timeout_ms = 300;
    c.server.body_min_rate_bytes_per_s = 1000;
    let s = TestServer::ready(c, Hooks::default()).await;
    let start = Instant::now();
    let mut conn = slow_upload(s.handle.addr).await;
    let answer = read_to_close(&mut conn, Duration::from_secs(5))
        .await
        .expect("the server did not answer a stalled body");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_min_rate_bytes_per_s"), "{answer}");
    assert!(start.elapsed() < Duration::from_secs(3));
    // Answered by the connection layer, yet counted like any other answer.
    let text = s.metrics().await;
    assert_eq!(
        metric(
            &text,
            "vlembed_requests_total{endpoint=\"/embed\",model=\"-\",status=\"408\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "vlembed_rejected_total{model=\"-\",reason=\"body_timeout\"}"
        ),
        Some(1.0),
        "{text}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_idle_connections_are_closed() {
    let mut c = config();
    c.server.header_read_timeout_ms = 300;
    c.server.keep_alive_timeout_ms = 300;
    let s = TestServer::ready(c, Hooks::default()).await;
    // A head that never ends.
    let mut partial = TcpStream::connect(s.handle.addr).unwrap();
    partial
        .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n")
        .unwrap();
    // A kept-alive connection after one answered request.
    let mut idle = TcpStream::connect(s.handle.addr).unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let start = Instant::now();
    assert!(read_to_close(&mut partial, Duration::from_secs(5))
        .await
        .is_some());
    let answer = read_to_close(&mut idle, Duration::from_secs(5))
        .await
        .expect("an idle connection stayed open");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(start.elapsed() < Duration::from_secs(3));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_wait_for_a_free_slot() {
    let mut c = config();
    c.server.max_connections = 3;
    c.server.keep_alive_timeout_ms = 200;
    let s = TestServer::ready(c, Hooks::default()).await;
    // Let the server close the test client's idle kept-alive connection.
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Three uploads in progress hold every slot.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(slow_upload(s.handle.addr).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut extra = TcpStream::connect(s.handle.addr).unwrap();
    extra
        .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    assert!(
        read_to_close(&mut extra, Duration::from_millis(500))
            .await
            .is_none(),
        "a connection over max_connections was served"
    );
    drop(held.pop());
    let answer = read_to_close(&mut extra, Duration::from_secs(5))
        .await
        .expect("the waiting connection was not served after a slot freed");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(held);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_request_behind_a_large_one_waits_about_one_batch() {
    let mut c = config();
    c.models[0].batching.max_batch_size = 8;
    let faults = Arc::new(Faults::default());
    let batch_ms = 150;
    faults.delay_ms.store(batch_ms, Ordering::SeqCst);
    let s = TestServer::ready(c, faulty(&faults)).await;
    let texts: Vec<String> = (0..256).map(|i| format!("text number {i}")).collect();
    let big = {
        let client = s.client.clone();
        let url = s.url("/embed");
        let body = json!({"inputs": texts});
        tokio::spawn(async move {
            let r = TestServer::reply(client.post(url).json(&body).send().await.unwrap()).await;
            (r.status, Instant::now())
        })
    };
    // Let the large request be queued and its first batch start.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let start = Instant::now();
    let small = s
        .post_json(
            "/embed",
            &json!({"inputs": [{"image": b64(&image("tiny_5x3.bmp"))}]}),
        )
        .await;
    let small_done = Instant::now();
    let waited = small_done - start;
    assert_eq!(small.status, 200, "{}", small.text);
    let (big_status, big_done) = big.await.unwrap();
    assert_eq!(big_status, 200);
    // The batch running when it arrived, then its own: about two batch
    // times, far from the 32 batches of the large request.
    assert!(
        waited < Duration::from_millis(4 * batch_ms + 600),
        "the small request waited {waited:?} (a batch takes {batch_ms} ms)"
    );
    assert!(
        big_done > small_done + Duration::from_secs(2),
        "the large request was not still running"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_request_releases_its_queue_capacity_at_once() {
    let mut c = config();
    c.models[0].batching.max_batch_size = 8;
    c.models[0].batching.max_queue_inputs = 300;
    let faults = Arc::new(Faults::default());
    faults.delay_ms.store(1500, Ordering::SeqCst);
    let s = TestServer::ready(c, faulty(&faults)).await;
    let texts: Vec<String> = (0..256).map(|i| format!("text {i}")).collect();
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(400))
        .build()
        .unwrap();
    let gone = impatient
        .post(s.url("/embed"))
        .json(&json!({"inputs": texts}))
        .send()
        .await;
    assert!(gone.is_err(), "the impatient client got an answer");
    // The first batch is still in its forward pass: before this change the
    // 248 queued inputs stayed counted until it ended.
    tokio::time::sleep(Duration::from_millis(100)).await;
    faults.delay_ms.store(0, Ordering::SeqCst);
    let r = s.post_json("/embed", &json!({"inputs": texts})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    s.stop().await;
}

/// Fails every batch that holds an image: a poisoned input.
struct PoisonImages {
    inner: Box<dyn EmbeddingModel>,
    batches: Arc<AtomicUsize>,
}

impl EmbeddingModel for PoisonImages {
    fn embed_stepped(
        &self,
        batch: &[&Prepared],
        between: Between<'_>,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        self.batches.fetch_add(1, Ordering::SeqCst);
        if batch.iter().any(|p| p.modality == Modality::Image) {
            return Err(ModelError::Batch("poisoned input".into()));
        }
        self.inner.embed_stepped(batch, between)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_input_fails_alone_in_a_shared_batch() {
    let mut c = config();
    // Hold batches open so the four requests share one.
    c.models[0].batching.max_delay = Duration::from_millis(300);
    let batches = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&batches);
    let hooks = wrap_replicas(move |_name, inner| PoisonImages {
        inner,
        batches: Arc::clone(&counter),
    });
    let s = TestServer::ready(c, hooks).await;
    let bodies = vec![
        json!({"inputs": ["one", "two"]}),
        json!({"inputs": ["seven", {"image": b64(&image("tiny_5x3.bmp"))}]}),
        json!({"inputs": "three"}),
        json!({"inputs": ["four", "five", "six"]}),
    ];
    let tasks: Vec<_> = bodies
        .into_iter()
        .map(|body| {
            let client = s.client.clone();
            let url = s.url("/embed");
            tokio::spawn(async move {
                TestServer::reply(client.post(url).json(&body).send().await.unwrap()).await
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        if r.status != 200 {
            // Named by its index in its own request.
            assert!(
                r.error_message()
                    .starts_with("inputs[1]: the model failed on this input: ")
                    && r.error_message().contains("poisoned"),
                "{}",
                r.text
            );
        }
        statuses.push(r.status);
    }
    assert_eq!(statuses, vec![200, 500, 200, 200]);
    // One shared batch, then its halves: more than one model call.
    assert!(batches.load(Ordering::SeqCst) > 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_worker_is_replaced_and_the_next_request_succeeds() {
    let mut c = config();
    c.server.worker_restart_backoff_ms = 50;
    let faults = Arc::new(Faults::default());
    let s = TestServer::ready(c, faulty(&faults)).await;
    faults.panic.store(true, Ordering::SeqCst);
    let r = s.post_json("/embed", &json!({"inputs": "boom"})).await;
    assert_eq!(r.status, 500, "{}", r.text);
    s.wait_ready().await;
    let r = s.post_json("/embed", &json!({"inputs": "after"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(s.get("/health").await.status, 200);
    let text = s.metrics().await;
    assert_eq!(
        metric(&text, "vlembed_worker_restarts_total{model=\"clip-tiny\"}"),
        Some(1.0)
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_cannot_be_rebuilt_turns_health_unhealthy() {
    let mut c = config();
    c.server.worker_restart_limit = 2;
    c.server.worker_restart_backoff_ms = 10;
    let builds = Arc::new(AtomicUsize::new(0));
    let faults = Arc::new(Faults::default());
    let counter = Arc::clone(&builds);
    let injected = Arc::clone(&faults);
    let hooks = wrap_replicas(move |_name, inner| {
        if counter.fetch_add(1, Ordering::SeqCst) > 0 {
            panic!("the device is gone");
        }
        Faulty::new(inner, &injected)
    });
    let s = TestServer::ready(c, hooks).await;
    assert_eq!(s.get("/health").await.status, 200);
    faults.panic.store(true, Ordering::SeqCst);
    let r = s.post_json("/embed", &json!({"inputs": "boom"})).await;
    assert_eq!(r.status, 500, "{}", r.text);
    let mut health = s.get("/health").await;
    for _ in 0..200 {
        if health.status == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        health = s.get("/health").await;
    }
    assert_eq!(health.status, 503, "{}", health.text);
    assert!(health.text.contains("clip-tiny"), "{}", health.text);
    assert_conforms(&openapi(), "GET", "/health", 503, &health.body);
    assert_eq!(s.get("/ready").await.status, 503);
    assert_eq!(builds.load(Ordering::SeqCst), 3);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sticky_device_error_rebuilds_the_replica_with_ready_503_meanwhile() {
    let mut c = config();
    // A back-off long enough to see the model unready.
    c.server.worker_restart_backoff_ms = 400;
    let faults = Arc::new(Faults::default());
    let builds = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&builds);
    let injected = Arc::clone(&faults);
    let hooks = wrap_replicas(move |_name, inner| {
        counter.fetch_add(1, Ordering::SeqCst);
        Faulty::new(inner, &injected)
    });
    let s = TestServer::ready(c, hooks).await;
    faults.sticky.store(true, Ordering::SeqCst);
    let r = s
        .post_json("/embed", &json!({"inputs": ["a", "b", "c"]}))
        .await;
    assert_eq!(r.status, 500, "{}", r.text);
    assert!(r.error_message().contains("sticky"), "{}", r.text);
    // Not retried in halves on the poisoned replica: rebuilt instead.
    let ready = s.get("/ready").await;
    assert_eq!(ready.status, 503, "{}", ready.text);
    assert_eq!(
        s.get("/health").await.status,
        200,
        "rebuilding is not unhealthy"
    );
    s.wait_ready().await;
    assert_eq!(builds.load(Ordering::SeqCst), 2);
    let r = s.post_json("/embed", &json!({"inputs": "after"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let text = s.metrics().await;
    assert_eq!(
        metric(&text, "vlembed_worker_restarts_total{model=\"clip-tiny\"}"),
        Some(1.0)
    );
    s.stop().await;
}

/// `--devices cuda:0` on a build without CUDA: the start fails at once,
/// naming the device and the cause, before the model is looked at (the
/// model path does not even exist).
#[test]
fn a_missing_gpu_fails_the_start_in_well_under_a_second() {
    if candle_core::utils::cuda_is_available() {
        return; // a CUDA build: the check depends on the machine
    }
    let start = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vlembed"))
        .args([
            "serve",
            "--model",
            "/nonexistent/bge-vl-base",
            "--devices",
            "cuda:0",
        ])
        .args(["--host", "127.0.0.1", "--port", "0"])
        .env("VLEMBED_LOG", "warn")
        .output()
        .unwrap();
    let took = start.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert!(err.contains("cannot open cuda:0"), "{err}");
    assert!(err.contains("built without CUDA support"), "{err}");
    assert!(
        !err.contains("config.json"),
        "no model file was looked for: {err}"
    );
}

/// `vlembed config` resolves the GPU defaults without opening the device or
/// the (nonexistent) model, and its output is a config file `serve` reads.
#[test]
fn the_config_command_prints_the_resolved_configuration_without_the_device() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vlembed"))
        .args([
            "config",
            "--model",
            "/nonexistent/bge-vl-mllm",
            "--devices",
            "cuda:0,cuda:1",
        ])
        .env("VLEMBED_MODEL_DEFAULTS__MAX_BATCH_SIZE", "100")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: toml::Table = text.parse().unwrap();
    let m = &doc["models"].as_array().unwrap()[0];
    assert_eq!(m["devices"].as_array().unwrap().len(), 2);
    assert_eq!(m["dtype"].as_str(), Some("bf16"));
    assert_eq!(m["max_batch_size"].as_integer(), Some(100), "explicit wins");
    assert_eq!(m["max_batch_cost"].as_integer(), Some(65536));
    assert_eq!(m["decoder_group_tokens"].as_integer(), Some(16384));
    assert!(doc["server"]["preprocess_threads"].as_integer().unwrap() >= 1);
    assert!(
        text.contains("auto: dtype, max_batch_cost, decoder_group_tokens, vision_tile_chunk"),
        "{text}"
    );
    let file = std::env::temp_dir().join(format!("vlembed-resolved-{}.toml", std::process::id()));
    std::fs::write(&file, text.as_bytes()).unwrap();
    let again = Config::load(&Layers {
        file: Some(file.clone()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(again.models[0].batching.max_batch_size, 100);
    assert_eq!(again.models[0].batching.max_batch_cost, 65536);
    let _ = std::fs::remove_file(file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_under_load_answers_every_accepted_request_in_time() {
    let mut c = config();
    c.server.shutdown_timeout_ms = 4_000;
    c.server.drain_delay_ms = 300;
    c.models[0].batching.max_batch_size = 4;
    let faults = Arc::new(Faults::default());
    faults.delay_ms.store(100, Ordering::SeqCst);
    let s = TestServer::ready(c, faulty(&faults)).await;
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let client = s.client.clone();
            let url = s.url("/embed");
            tokio::spawn(async move {
                let body = json!({"inputs": [format!("a{i}"), format!("b{i}")]});
                TestServer::reply(client.post(url).json(&body).send().await.unwrap()).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let start = Instant::now();
    s.handle.shutdown();
    // The drain delay: not ready, still serving.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(s.get("/ready").await.status, 503);
    let r = s
        .post_json("/embed", &json!({"inputs": "during the delay"}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text);
    }
    tokio::time::timeout(Duration::from_secs(5), s.handle.wait())
        .await
        .expect("shutdown overran")
        .unwrap();
    assert!(start.elapsed() < Duration::from_millis(4_500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_gives_up_on_a_stuck_request_within_the_timeout() {
    let mut c = config();
    c.server.shutdown_timeout_ms = 1_000;
    let faults = Arc::new(Faults::default());
    faults.delay_ms.store(3_000, Ordering::SeqCst);
    let s = TestServer::ready(c, faulty(&faults)).await;
    let client = s.client.clone();
    let url = s.url("/embed");
    let stuck = tokio::spawn(async move {
        client
            .post(url)
            .json(&json!({"inputs": "slow"}))
            .send()
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now();
    s.handle.shutdown();
    tokio::time::timeout(Duration::from_secs(3), s.handle.wait())
        .await
        .expect("shutdown overran its timeout")
        .unwrap();
    assert!(start.elapsed() < Duration::from_millis(1_800));
    stuck.abort();
}

#[test]
fn empty_key_lists_from_the_environment_are_refused() {
    for (name, value) in [
        ("VLEMBED_API_KEYS", ""),
        ("VLEMBED_API_KEYS", ","),
        ("VLEMBED_SERVER__API_KEYS", ""),
    ] {
        let layers = Layers {
            env: vec![
                (name.to_string(), value.to_string()),
                ("VLEMBED_MODEL".into(), "org/model".into()),
            ],
            ..Default::default()
        };
        let err = Config::load(&layers).unwrap_err().to_string();
        assert!(
            err.contains("authentication off"),
            "{name}={value:?}: {err}"
        );
    }
    let layers = Layers {
        env: vec![
            ("VLEMBED_API_KEYS".into(), "k1,k2".into()),
            ("VLEMBED_MODEL".into(), "org/model".into()),
        ],
        ..Default::default()
    };
    assert_eq!(
        Config::load(&layers).unwrap().server.api_keys,
        vec!["k1", "k2"]
    );
}
