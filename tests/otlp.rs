//! OpenTelemetry export against a minimal OTLP/HTTP receiver written for the
//! test, on loopback: the request span continues the caller's W3C
//! `traceparent`, preprocessing and queue-wait spans are its children, and
//! the batch span links to every request it served. (Its own binary: the
//! exporter is process-wide.)

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::post;
use axum::Router;
use common::*;
use serde_json::{json, Value};
use vlembed::app::Hooks;

type Received = Arc<Mutex<Vec<Value>>>;

/// Starts the receiver; returns its base URL and what it received.
async fn receiver() -> (String, Received) {
    let got: Received = Arc::default();
    let sink = Arc::clone(&got);
    let app = Router::new().route(
        "/v1/traces",
        post(move |body: axum::body::Bytes| {
            let sink = Arc::clone(&sink);
            async move {
                let v: Value = serde_json::from_slice(&body).expect("OTLP JSON");
                sink.lock().unwrap().push(v);
                axum::Json(json!({}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), got)
}

fn spans(got: &Received) -> Vec<Value> {
    got.lock()
        .unwrap()
        .iter()
        .flat_map(|body| {
            let rs = body["resourceSpans"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            rs.into_iter().flat_map(|r| {
                assert_eq!(
                    r["resource"]["attributes"][0]["value"]["stringValue"],
                    "vlembed"
                );
                r["scopeSpans"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .flat_map(|s| s["spans"].as_array().cloned().unwrap_or_default())
            })
        })
        .collect()
}

fn attr<'a>(span: &'a Value, key: &str) -> Option<&'a Value> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)
        .map(|a| &a["value"])
}

#[tokio::test]
async fn spans_arrive_with_parents_links_and_attributes() {
    let (endpoint, got) = receiver().await;
    let mut c = config();
    c.server.otlp_endpoint = endpoint;
    let s = TestServer::ready(c, Hooks::default()).await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let unsampled = "11111111111111111111111111111111";
    let img = image("rgb_225x223.png");
    let body = json!({"inputs": ["a red square", {"image": b64(&img)}]});
    for (tp, id) in [
        (format!("00-{trace}-{parent}-01"), "otel-1"),
        (format!("00-{unsampled}-{parent}-00"), "otel-unsampled"),
    ] {
        let r = s
            .client
            .post(s.url("/embed"))
            .header("traceparent", tp)
            .header("x-request-id", id)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // A request without traceparent starts its own trace.
    assert_eq!(s.get("/health").await.status, 200);

    let mut all = Vec::new();
    for _ in 0..100 {
        all = spans(&got);
        let ours = all.iter().filter(|s| s["traceId"] == trace).count();
        let batch = all.iter().any(|s| s["name"] == "batch");
        if ours >= 3 && batch && all.iter().any(|s| s["name"] == "GET /health") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let request = all
        .iter()
        .find(|s| s["traceId"] == trace && s["name"] == "POST /embed")
        .unwrap_or_else(|| panic!("no request span in {all:#?}"));
    assert_eq!(request["parentSpanId"], parent);
    assert_eq!(request["kind"], 2);
    assert_eq!(
        attr(request, "http.route").unwrap()["stringValue"],
        "/embed"
    );
    assert_eq!(
        attr(request, "http.request.method").unwrap()["stringValue"],
        "POST"
    );
    assert_eq!(
        attr(request, "http.response.status_code").unwrap()["intValue"],
        "200"
    );
    assert_eq!(
        attr(request, "vlembed.request_id").unwrap()["stringValue"],
        "otel-1"
    );
    assert_eq!(
        attr(request, "vlembed.model").unwrap()["stringValue"],
        "clip-tiny"
    );
    assert_eq!(attr(request, "vlembed.inputs").unwrap()["intValue"], "2");
    let request_id = request["spanId"].as_str().unwrap();
    let start = |s: &Value| {
        s["startTimeUnixNano"]
            .as_str()
            .unwrap()
            .parse::<u128>()
            .unwrap()
    };
    let end = |s: &Value| {
        s["endTimeUnixNano"]
            .as_str()
            .unwrap()
            .parse::<u128>()
            .unwrap()
    };
    for name in ["preprocess", "queue"] {
        let child = all
            .iter()
            .find(|s| s["traceId"] == trace && s["name"] == name)
            .unwrap_or_else(|| panic!("no {name} span in {all:#?}"));
        assert_eq!(child["parentSpanId"], request_id, "{name}");
        assert!(
            start(child) >= start(request) && end(child) <= end(request),
            "{name} outside the request"
        );
    }
    // The batch span (its own trace) links to the request span.
    let batch = all
        .iter()
        .find(|s| {
            s["name"] == "batch"
                && s["links"].as_array().is_some_and(|l| {
                    l.iter()
                        .any(|l| l["spanId"] == request_id && l["traceId"] == trace)
                })
        })
        .unwrap_or_else(|| panic!("no batch span linked to the request in {all:#?}"));
    assert_ne!(batch["traceId"], trace);
    assert_eq!(
        attr(batch, "vlembed.model").unwrap()["stringValue"],
        "clip-tiny"
    );
    let size: u64 = attr(batch, "vlembed.batch_size").unwrap()["intValue"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(size >= 1);
    // A new trace for the probe, none for the unsampled request.
    let health = all.iter().find(|s| s["name"] == "GET /health").unwrap();
    assert!(health.get("parentSpanId").is_none());
    assert_ne!(health["traceId"], trace);
    s.stop().await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let all = spans(&got);
    assert!(
        !all.iter().any(|s| s["traceId"] == unsampled),
        "unsampled request exported"
    );
    assert!(!all.iter().any(
        |s| attr(s, "vlembed.request_id").is_some_and(|v| v["stringValue"] == "otel-unsampled")
    ));
}
