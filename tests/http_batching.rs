//! Dynamic batching and the server's behaviour under load and failure,
//! against a real server on a loopback port with the fixture model (faults
//! are injected by wrapping the real replica): batches larger than one under
//! concurrency with results equal to unbatched ones, 429 on a full queue,
//! 504 on timeout, cancelled requests dropped before inference, 500 on a
//! failed batch, a dead worker turning /ready to 503 until it is rebuilt,
//! /ready while loading,
//! and graceful shutdown.

mod common;

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use vlembed::app::Hooks;
use vlembed::input::{Content, Input};

fn batch_counts(metrics: &str) -> (f64, f64) {
    let count = metric(metrics, "vlembed_batch_size_count{model=\"clip-tiny\"}").unwrap_or(0.0);
    let sum = metric(metrics, "vlembed_batch_size_sum{model=\"clip-tiny\"}").unwrap_or(0.0);
    (count, sum)
}

/// Sends 32 concurrent one-input requests (texts, images, composed) and
/// checks each answer against the unbatched library result. Returns the
/// number of batches and inputs the server ran.
async fn concurrent_round(s: &TestServer, inputs: &[Input], expected: &[Vec<f32>]) -> (f64, f64) {
    let before = batch_counts(&s.metrics().await);
    let mut tasks = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        let client = s.client.clone();
        let url = s.url("/embed");
        let mut obj = serde_json::Map::new();
        if let Some(t) = input.text_part() {
            obj.insert("text".into(), json!(t));
        }
        if let Some(img) = input.image_part() {
            obj.insert("image".into(), json!(b64(img)));
        }
        let body = json!({"inputs": [obj]});
        tasks.push(tokio::spawn(async move {
            let res = client.post(url).json(&body).send().await.unwrap();
            let r = TestServer::reply(res).await;
            assert_eq!(r.status, 200, "request {i}: {}", r.text);
            floats(&r.body["embeddings"]).remove(0)
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let got = t.await.unwrap();
        let d = max_abs_diff(&got, &expected[i]);
        assert!(
            d < tol::CLIP_F32,
            "request {i} differs from its unbatched result by {d}"
        );
    }
    let after = batch_counts(&s.metrics().await);
    (after.0 - before.0, after.1 - before.1)
}

fn mixed_inputs(n: usize) -> Vec<Input> {
    let images = [
        image("rgb_225x223.png"),
        image("gray_320x240.jpg"),
        image("tiny_5x3.bmp"),
        image("lossy_320x240.webp"),
    ];
    (0..n)
        .map(|i| match i % 4 {
            0 | 1 => Input::text(format!(
                "request number {i}: {}",
                "a photo of a cat ".repeat(i % 5 + 1)
            )),
            2 => Input::image(images[i % images.len()].clone()),
            _ => Input::new(Content::Composed {
                text: format!("make it {i} times darker"),
                image: images[(i / 4) % images.len()].clone(),
            }),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_are_batched_and_equal_unbatched_results() {
    let inputs = mixed_inputs(32);
    let expected = direct(&inputs, true);
    // First as fast as the fixture model goes, then with a realistic forward
    // pass time (20 ms, injected) so that requests pile up while one runs.
    let faults = Arc::new(Faults::default());
    let s = TestServer::ready(config(), faulty(&faults)).await;
    let (batches, items) = concurrent_round(&s, &inputs, &expected).await;
    eprintln!("32 concurrent requests, no injected delay: {items} inputs in {batches} batches");
    assert_eq!(items, 32.0);

    faults.delay_ms.store(20, Ordering::SeqCst);
    let (batches, items) = concurrent_round(&s, &inputs, &expected).await;
    eprintln!("32 concurrent requests, 20 ms per batch: {items} inputs in {batches} batches");
    assert_eq!(items, 32.0);
    assert!(
        batches < 32.0,
        "no batch held more than one input ({batches} batches)"
    );
    let text = s.metrics().await;
    // Some batch went over the first histogram bucket (size 1).
    let le1 = metric(
        &text,
        "vlembed_batch_size_bucket{model=\"clip-tiny\",le=\"1\"}",
    )
    .unwrap();
    let all = metric(&text, "vlembed_batch_size_count{model=\"clip-tiny\"}").unwrap();
    assert!(all > le1, "every batch had size 1:\n{text}");
    assert_eq!(
        metric(&text, "vlembed_queue_depth{model=\"clip-tiny\"}"),
        Some(0.0)
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_against_a_tiny_queue_gets_429_with_retry_after() {
    let mut c = config();
    c.server.max_inputs_per_request = 2;
    c.server.retry_after_s = 3;
    c.models[0].batching.max_queue_inputs = 2;
    c.models[0].batching.max_batch_size = 1;
    let faults = Arc::new(Faults::default());
    faults.delay_ms.store(100, Ordering::SeqCst);
    let s = TestServer::ready(c, faulty(&faults)).await;
    let doc = openapi();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let client = s.client.clone();
        let url = s.url("/embed");
        tasks.push(tokio::spawn(async move {
            let res = client
                .post(url)
                .json(&json!({"inputs": format!("text {i}")}))
                .send()
                .await
                .unwrap();
            TestServer::reply(res).await
        }));
    }
    let mut ok = 0;
    let mut full = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            200 => ok += 1,
            429 => {
                full += 1;
                assert_eq!(r.error_type(), "queue_full");
                assert!(r.error_message().contains("full"), "{}", r.text);
                assert_eq!(r.headers.get("retry-after").unwrap(), "3");
                assert_conforms(&doc, "POST", "/embed", 429, &r.body);
            }
            other => panic!("unexpected status {other}: {}", r.text),
        }
    }
    assert!(ok >= 2, "{ok} succeeded");
    assert!(full >= 1, "no request was refused ({ok} succeeded)");
    let text = s.metrics().await;
    assert_eq!(
        metric(
            &text,
            "vlembed_rejected_total{model=\"clip-tiny\",reason=\"queue_full\"}"
        ),
        Some(full as f64)
    );
    // The queue empties and serves again.
    faults.delay_ms.store(0, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        s.post_json("/embed", &json!({"inputs": "again"}))
            .await
            .status,
        200
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_request_times_out_with_504_and_cancelled_inputs_are_not_run() {
    let mut c = config();
    c.server.request_timeout_ms = 300;
    let faults = Arc::new(Faults::default());
    let s = TestServer::ready(c, faulty(&faults)).await;
    let doc = openapi();
    faults.delay_ms.store(800, Ordering::SeqCst);
    // The first request occupies the worker past its timeout; the second
    // waits in the queue past its own and must never reach the model.
    let first = {
        let client = s.client.clone();
        let url = s.url("/embed");
        tokio::spawn(async move {
            TestServer::reply(
                client
                    .post(url)
                    .json(&json!({"inputs": "first"}))
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        })
    };
    // Wait until the first request's batch is in the model.
    for _ in 0..200 {
        if batch_counts(&s.metrics().await).0 >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let start = Instant::now();
    let second = s
        .post_json("/embed", &json!({"inputs": ["second", "third"]}))
        .await;
    assert_eq!(second.status, 504, "{}", second.text);
    assert!(
        start.elapsed() < Duration::from_millis(700),
        "took {:?}",
        start.elapsed()
    );
    assert_eq!(second.error_type(), "timeout");
    assert!(second.error_message().contains("300 ms"), "{}", second.text);
    assert_conforms(&doc, "POST", "/embed", 504, &second.body);
    let first = first.await.unwrap();
    assert_eq!(first.status, 504, "{}", first.text);

    // A client that goes away: its inputs are dropped before inference.
    let gone = s
        .client
        .post(s.url("/embed"))
        .timeout(Duration::from_millis(100))
        .json(&json!({"inputs": ["gone 1", "gone 2", "gone 3"]}))
        .send()
        .await;
    assert!(gone.is_err());
    tokio::time::sleep(Duration::from_millis(1200)).await;
    faults.delay_ms.store(0, Ordering::SeqCst);
    let text = s.metrics().await;
    // Only the first request's input ever reached the model.
    let (batches, items) = batch_counts(&text);
    assert_eq!((batches, items), (1.0, 1.0), "{text}");
    assert!(
        metric(
            &text,
            "vlembed_rejected_total{model=\"clip-tiny\",reason=\"timeout\"}"
        )
        .unwrap()
            >= 2.0
    );
    assert_eq!(
        metric(&text, "vlembed_queue_depth{model=\"clip-tiny\"}"),
        Some(0.0)
    );
    assert_eq!(
        s.post_json("/embed", &json!({"inputs": "after"}))
            .await
            .status,
        200
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_answers_500_and_the_server_keeps_serving() {
    let faults = Arc::new(Faults::default());
    let s = TestServer::ready(config(), faulty(&faults)).await;
    let doc = openapi();
    faults.fail.store(true, Ordering::SeqCst);
    let r = s.post_json("/embed", &json!({"inputs": ["a", "b"]})).await;
    assert_eq!((r.status, r.error_type()), (500, "internal"), "{}", r.text);
    assert!(r.error_message().contains("injected failure"), "{}", r.text);
    assert_conforms(&doc, "POST", "/embed", 500, &r.body);
    faults.fail.store(false, Ordering::SeqCst);
    assert_eq!(
        s.post_json("/embed", &json!({"inputs": "a"})).await.status,
        200
    );
    assert_eq!(s.get("/ready").await.status, 200);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_panics_is_detected_then_rebuilt() {
    let faults = Arc::new(Faults::default());
    let mut c = config();
    // A long back-off, to observe the model while it has no worker.
    c.server.worker_restart_backoff_ms = 2_000;
    let s = TestServer::ready(c, faulty(&faults)).await;
    let doc = openapi();
    faults.panic.store(true, Ordering::SeqCst);
    let r = s.post_json("/embed", &json!({"inputs": "boom"})).await;
    assert_eq!(r.status, 500, "{}", r.text);
    assert!(r.error_message().contains("panicked"), "{}", r.text);
    // The worker is gone: not ready, model_ready 0, new requests 503.
    let mut ready = s.get("/ready").await;
    for _ in 0..100 {
        if ready.status == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        ready = s.get("/ready").await;
    }
    assert_eq!(ready.status, 503, "{}", ready.text);
    assert_conforms(&doc, "GET", "/ready", 503, &ready.body);
    assert_eq!(ready.body["models"]["clip-tiny"], "no_worker");
    let text = s.metrics().await;
    assert_eq!(
        metric(&text, "vlembed_model_ready{model=\"clip-tiny\"}"),
        Some(0.0)
    );
    let r = s.post_json("/embed", &json!({"inputs": "after"})).await;
    assert_eq!(
        (r.status, r.error_type()),
        (503, "unavailable"),
        "{}",
        r.text
    );
    assert_conforms(&doc, "POST", "/embed", 503, &r.body);
    assert_eq!(s.get("/health").await.status, 200);
    let info = s.get("/info").await;
    assert_eq!(info.body["models"][0]["live_workers"], 0);
    // The worker comes back with a fresh replica.
    s.wait_ready().await;
    let r = s.post_json("/embed", &json!({"inputs": "rebuilt"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_is_503_while_loading_then_200() {
    let (release, gate) = mpsc::channel::<()>();
    let gate = Mutex::new(gate);
    let hooks = Hooks {
        before_load: Some(Arc::new(move |_name: &str| {
            let _ = gate.lock().unwrap().recv_timeout(Duration::from_secs(30));
        })),
        ..Default::default()
    };
    let s = TestServer::start(config(), hooks).await;
    let doc = openapi();
    assert_eq!(s.get("/health").await.status, 200);
    let r = s.get("/ready").await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.body["status"], "loading");
    assert_eq!(r.body["models"]["clip-tiny"], "loading");
    assert!(r.headers.get("retry-after").is_some());
    assert_conforms(&doc, "GET", "/ready", 503, &r.body);
    let r = s.post_json("/embed", &json!({"inputs": "early"})).await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert!(r.error_message().contains("loading"), "{}", r.text);
    assert_conforms(&doc, "POST", "/embed", 503, &r.body);
    let info = s.get("/info").await;
    assert_eq!(info.status, 200);
    assert_conforms(&doc, "GET", "/info", 200, &info.body);
    assert_eq!(info.body["models"][0]["status"], "loading");
    assert!(info.body["models"][0]["dimensions"].is_null());
    let text = s.metrics().await;
    assert_eq!(
        metric(&text, "vlembed_model_ready{model=\"clip-tiny\"}"),
        Some(0.0)
    );

    release.send(()).unwrap();
    s.wait_ready().await;
    let text = s.metrics().await;
    assert_eq!(
        metric(&text, "vlembed_model_ready{model=\"clip-tiny\"}"),
        Some(1.0)
    );
    assert_eq!(
        s.post_json("/embed", &json!({"inputs": "late"}))
            .await
            .status,
        200
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_fails_to_load_stops_the_server_with_an_error() {
    let mut c = config();
    c.models[0].source = repo()
        .join("tests/fixtures/images")
        .to_str()
        .unwrap()
        .to_string();
    let s = TestServer::start(c, Hooks::default()).await;
    let result = tokio::time::timeout(Duration::from_secs(20), s.handle.wait())
        .await
        .expect("the server should stop");
    let err = result.unwrap_err().to_string();
    assert!(
        err.contains("failed to load") && err.contains("config.json"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_requests() {
    let faults = Arc::new(Faults::default());
    let s = TestServer::ready(config(), faulty(&faults)).await;
    faults.delay_ms.store(300, Ordering::SeqCst);
    let in_flight = {
        let client = s.client.clone();
        let url = s.url("/embed");
        tokio::spawn(async move {
            TestServer::reply(
                client
                    .post(url)
                    .json(&json!({"inputs": "in flight"}))
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.handle.shutdown();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!s.handle.registry.is_ready(), "ready while shutting down");
    let r = in_flight.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text);
    tokio::time::timeout(Duration::from_secs(10), s.handle.wait())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_concurrency_limit_get_429_at_once() {
    let mut c = config();
    c.server.max_concurrent_requests = 1;
    let faults = Arc::new(Faults::default());
    faults.delay_ms.store(500, Ordering::SeqCst);
    let s = TestServer::ready(c, faulty(&faults)).await;
    let post = |path: &'static str, body: serde_json::Value| {
        let client = s.client.clone();
        let url = s.url(path);
        tokio::spawn(async move {
            TestServer::reply(client.post(url).json(&body).send().await.unwrap()).await
        })
    };
    let busy = post("/embed", json!({"inputs": "busy"}));
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The one regular slot is taken: a body over SMALL_REQUEST_BYTES is
    // refused at once.
    let big = json!({"input": "x".repeat(vlembed::http::SMALL_REQUEST_BYTES as usize + 100)});
    let r = s.post_json("/v1/embeddings", &big).await;
    assert_eq!(
        (r.status, r.error_type()),
        (429, "queue_full"),
        "{}",
        r.text
    );
    assert!(
        r.error_message().contains("max_concurrent_requests"),
        "{}",
        r.text
    );
    assert!(r.headers.get("retry-after").is_some());
    // Small requests (queries) have small_request_slots(1) = 4 more slots:
    // of five at once, four are served and one is refused.
    assert_eq!(vlembed::http::small_request_slots(1), 4);
    let small: Vec<_> = (0..5)
        .map(|i| post("/v1/embeddings", json!({"input": format!("query {i}")})))
        .collect();
    let mut statuses = Vec::new();
    for t in small {
        statuses.push(t.await.unwrap().status);
    }
    statuses.sort();
    assert_eq!(statuses, vec![200, 200, 200, 200, 429]);
    // Probes are not limited.
    assert_eq!(s.get("/ready").await.status, 200);
    assert_eq!(busy.await.unwrap().status, 200);
    faults.delay_ms.store(0, Ordering::SeqCst);
    assert_eq!(s.post_json("/v1/embeddings", &big).await.status, 200);
    s.stop().await;
}
