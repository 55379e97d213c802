//! Shutdown with `server.drain_delay_ms`: `/ready` answers 503 at once while
//! requests (on new connections too) are still served for the delay; only
//! then does the listener close and the drain begin.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use vlembed::app::Hooks;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_delay_serves_while_not_ready_then_stops() {
    let mut c = config();
    c.server.drain_delay_ms = 3_000;
    let s = TestServer::ready(c, Hooks::default()).await;
    let addr = s.handle.addr;
    let started = Instant::now();
    s.handle.shutdown();
    tokio::time::sleep(Duration::from_millis(50)).await;

    let ready = s.get("/ready").await;
    assert_eq!(ready.status, 503, "{}", ready.text);
    assert_eq!(ready.body["status"], "shutting_down", "{}", ready.text);

    let embedded = s.embed(json!(["a photo of a cat"])).await;
    assert_eq!(embedded.len(), 1);
    // A client that connects only now (as a load balancer that has not yet
    // seen /ready fail) is served too.
    let fresh = reqwest::Client::new();
    let r = fresh
        .post(s.url("/embed"))
        .json(&json!({"inputs": ["hello world"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        started.elapsed() < Duration::from_millis(3_000),
        "the checks above must run within the delay"
    );

    let TestServer { handle, .. } = s;
    tokio::time::timeout(Duration::from_secs(20), handle.wait())
        .await
        .expect("the server did not stop in time")
        .expect("the server stopped with an error");
    assert!(
        started.elapsed() >= Duration::from_millis(3_000),
        "stopped after {:?}, before the drain delay",
        started.elapsed()
    );
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is still open after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_drain_delay_requests_are_refused_at_once() {
    let s = TestServer::ready(config(), Hooks::default()).await;
    let client = s.client.clone();
    let url = s.url("/embed");
    s.handle.shutdown();
    let TestServer { handle, .. } = s;
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(20), handle.wait())
        .await
        .expect("the server did not stop in time")
        .expect("the server stopped with an error");
    assert!(started.elapsed() < Duration::from_millis(1_000));
    assert!(client
        .post(url)
        .json(&json!({"inputs": ["x"]}))
        .send()
        .await
        .is_err());
}
