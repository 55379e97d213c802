//! Query priority against a real server with the fixture model: a short
//! `High` text is answered between the layers of an image batch in progress
//! (the image pass is held at its first layer by a wrapper around the real
//! replica until the test releases it: ordering, not wall-clock thresholds),
//! a `normal` one waits for the batch, the vectors of both equal the
//! unbatched library's (stepping changes nothing), and the `priority` field
//! is validated on /embed, /score and /v1/embeddings.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use vlembed::app::Hooks;
use vlembed::input::Input;
use vlembed::models::{Between, EmbeddingModel, ModelError};
use vlembed::preprocess::Prepared;

/// What the gate saw, shared with the test.
#[derive(Default)]
struct GateState {
    /// An image batch is held at its first layer.
    holding: AtomicBool,
    /// Lets held image batches go on.
    release: AtomicBool,
    /// "texts" / "images" as batches of each kind finished.
    events: Mutex<Vec<&'static str>>,
}

impl GateState {
    fn events(&self) -> Vec<&'static str> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Holds a batch with images at its first layer until released, calling the
/// worker's hook meanwhile (what a long pass does, one layer at a time).
struct Gate {
    inner: Box<dyn EmbeddingModel>,
    st: Arc<GateState>,
}

impl EmbeddingModel for Gate {
    fn embed_stepped(
        &self,
        batch: &[&Prepared],
        between: Between<'_>,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let images = batch.iter().any(|p| p.modality.has_image());
        let st = &self.st;
        let mut held = false;
        let mut gated = || {
            if images && !held {
                held = true;
                st.holding.store(true, Ordering::SeqCst);
                let start = Instant::now();
                while !st.release.load(Ordering::SeqCst)
                    && start.elapsed() < Duration::from_secs(20)
                {
                    between()?;
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            between()
        };
        let out = self.inner.embed_stepped(batch, &mut gated)?;
        let kind = if images { "images" } else { "texts" };
        st.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(kind);
        Ok(out)
    }
}

fn gated(st: &Arc<GateState>) -> Hooks {
    let st = Arc::clone(st);
    wrap_replicas(move |_name, inner| Gate {
        inner,
        st: Arc::clone(&st),
    })
}

const IMAGES: [&str; 4] = [
    "baseline_420_640x480.jpg",
    "gray_320x240.jpg",
    "progressive_480x360.jpg",
    "lossy_320x240.webp",
];
const QUERY: &str = "a photo of a dog";

fn image_inputs() -> Vec<Value> {
    IMAGES
        .iter()
        .map(|n| json!({"image": b64(&image(n))}))
        .collect()
}

async fn wait_until(what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Starts an image request and waits until its batch is held in its pass.
async fn start_images(
    s: &TestServer,
    st: &Arc<GateState>,
) -> tokio::task::JoinHandle<(u16, Value)> {
    let client = s.client.clone();
    let url = s.url("/embed");
    let body = json!({"inputs": image_inputs()});
    let task = tokio::spawn(async move {
        let r = client.post(url).json(&body).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json::<Value>().await.unwrap_or(Value::Null))
    });
    wait_until("the image batch to start", || {
        st.holding.load(Ordering::SeqCst)
    })
    .await;
    task
}

fn expected() -> (Vec<f32>, Vec<Vec<f32>>) {
    let mut inputs = vec![Input::text(QUERY)];
    inputs.extend(IMAGES.iter().map(|n| Input::image(image(n))));
    let mut all = direct(&inputs, true);
    let text = all.remove(0);
    (text, all)
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && max_abs_diff(a, b) < 1e-5
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_text_is_answered_while_an_image_batch_is_in_its_pass() {
    let st = Arc::new(GateState::default());
    let s = TestServer::ready(config(), gated(&st)).await;
    let (want_text, want_images) = expected();

    let images = start_images(&s, &st).await;
    // One short text, no priority given: High by default, run between two
    // layers of the held image batch.
    let r = s
        .post_json("/embed", &json!({"inputs": [{"text": QUERY}]}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(!images.is_finished(), "the image request ended first");
    assert_eq!(st.events(), vec!["texts"]);
    assert!(close(&floats(&r.body["embeddings"])[0], &want_text));

    // Explicit high priority on /v1/embeddings and /score: also between layers.
    let r = s
        .post_json(
            "/v1/embeddings",
            &json!({"input": QUERY, "priority": "high"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = s
        .post_json(
            "/score",
            &json!({"query": {"text": QUERY}, "candidates": [{"text": "a cat"}], "priority": "high"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(!images.is_finished());
    assert_eq!(st.events(), vec!["texts", "texts", "texts"]);

    st.release.store(true, Ordering::SeqCst);
    let (status, body) = images.await.unwrap();
    assert_eq!(status, 200, "{body}");
    let got = floats(&body["embeddings"]);
    for (g, w) in got.iter().zip(&want_images) {
        assert!(close(g, w), "a stepped image embedding differs");
    }
    assert!(st.events().ends_with(&["images"]));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_normal_priority_text_waits_for_the_batch_in_progress() {
    let st = Arc::new(GateState::default());
    let s = TestServer::ready(config(), gated(&st)).await;
    let images = start_images(&s, &st).await;
    let client = s.client.clone();
    let url = s.url("/embed");
    let text = tokio::spawn(async move {
        let body = json!({"inputs": [{"text": QUERY}], "priority": "normal"});
        client
            .post(url)
            .json(&body)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    });
    // Give it every chance to be run between layers: it must not be.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!text.is_finished());
    assert!(st.events().is_empty());
    st.release.store(true, Ordering::SeqCst);
    assert_eq!(images.await.unwrap().0, 200);
    assert_eq!(text.await.unwrap(), 200);
    assert_eq!(st.events(), vec!["images", "texts"]);
    s.stop().await;
}

#[tokio::test]
async fn the_priority_field_is_checked() {
    let s = TestServer::ready(config(), Hooks::default()).await;
    for (path, body) in [
        ("/embed", json!({"inputs": ["a"], "priority": "urgent"})),
        (
            "/v1/embeddings",
            json!({"input": "a", "priority": "urgent"}),
        ),
        (
            "/score",
            json!({"query": "a", "candidates": ["b"], "priority": "urgent"}),
        ),
    ] {
        let r = s.post_json(path, &body).await;
        assert_eq!(r.status, 400, "{path}: {}", r.text);
        assert!(r.error_message().contains("priority"), "{}", r.text);
        assert!(r.error_message().contains("urgent"), "{}", r.text);
    }
    let r = s
        .post_json("/embed", &json!({"inputs": ["a"], "priority": 3}))
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
    for p in ["high", "normal", "low"] {
        let r = s
            .post_json("/embed", &json!({"inputs": ["a", "b"], "priority": p}))
            .await;
        assert_eq!(r.status, 200, "{p}: {}", r.text);
    }
    let form = reqwest::multipart::Form::new()
        .text("text", "a")
        .text("priority", "low");
    assert_eq!(s.post_form("/embed", form).await.status, 200);
    let form = reqwest::multipart::Form::new()
        .text("text", "a")
        .text("priority", "soon");
    let r = s.post_form("/embed", form).await;
    assert_eq!(r.status, 400, "{}", r.text);
    s.stop().await;
}
