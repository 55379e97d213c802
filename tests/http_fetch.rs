//! Image URL fetching (issue 13.1) against the real server: a tiny HTTP
//! server on 127.0.0.1 serves fixture images, redirects, stalls, lying
//! lengths and errors; every fetch goes through a test resolver (a fixed
//! table: it never asks DNS) and a test connector that records, refuses and
//! fails the test on any connection to an address that is not loopback. No
//! test sends a packet off loopback, even if the code under test is wrong.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{b64, floats, image, max_abs_diff, metric, tol, TestServer};
use serde_json::{json, Value};
use vlembed::config::Config;

#[path = "http_fetch/net.rs"]
mod net;
use net::{ImageServer, NetHooks, Route};

// ---------------------------------------------------------------- helpers

const PNG: &str = "rgb_225x223.png";
const JPG: &str = "baseline_420_640x480.jpg";

/// The fixture server with fetching on, loopback allowed, short timeouts.
fn fetch_config(allow_loopback: bool) -> Config {
    let mut c = common::config();
    c.server.fetch_image_urls = true;
    c.fetch.allow_loopback = allow_loopback;
    c.fetch.connect_timeout_ms = 1_000;
    c.fetch.timeout_ms = 3_000;
    c.validate().unwrap();
    c
}

fn url_input(url: &str) -> Value {
    json!({"image": {"url": url}})
}

async fn embed_err(s: &TestServer, inputs: Value) -> (u16, String) {
    let r = s.post_json("/embed", &json!({ "inputs": inputs })).await;
    (r.status, r.error_message().to_string())
}

/// Posts each URL alone and checks it is refused with 422 and a message
/// holding every needle.
async fn assert_refused(s: &TestServer, cases: &[(String, Vec<&str>)]) {
    for (url, needles) in cases {
        let (status, msg) = embed_err(s, json!(["a cat", url_input(url)])).await;
        assert_eq!(status, 422, "{url}: {msg}");
        assert!(msg.starts_with("inputs[1].image"), "{url}: {msg}");
        for n in needles.iter() {
            assert!(msg.contains(n), "{url}: expected {n:?} in {msg:?}");
        }
    }
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetched_image_embeds_like_the_same_image_uploaded() {
    let png = image(PNG);
    let jpg = image(JPG);
    let img = ImageServer::start(vec![
        ("/cat.png", Route::Body("image/png", png.clone())),
        ("/photo.jpg", Route::Body("image/jpeg", jpg.clone())),
        ("/hop1", Route::Redirect(302, "/hop2".into())),
        ("/hop2", Route::Redirect(308, "/cat.png".into())),
    ])
    .await;
    let net = NetHooks::new(&[("images.test", &["127.0.0.1"])]);
    let s = TestServer::ready(fetch_config(true), net.hooks()).await;

    let uploaded = s
        .embed(json!([{"image": b64(&png)}, {"image": b64(&jpg)}]))
        .await;
    let by_name = format!("http://images.test:{}/cat.png", img.port());
    let fetched = s
        .embed(json!([
            url_input(&img.url("/cat.png")),
            url_input(&img.url("/photo.jpg")),
            {"image": img.url("/cat.png")},
            url_input(&by_name),
            url_input(&img.url("/hop1")),
            {"image": {"url": img.url("/cat.png")}, "text": "a photo"},
        ]))
        .await;
    for (i, want) in [0, 1, 0, 0, 0].into_iter().enumerate() {
        let d = max_abs_diff(&fetched[i], &uploaded[want]);
        assert!(d <= tol::SAME_MATH, "input {i}: {d}");
    }
    // The composed input is not the image alone.
    assert!(max_abs_diff(&fetched[5], &uploaded[0]) > 1e-3);

    // /v1/embeddings image objects and /score take URLs too.
    let r = s
        .post_json(
            "/v1/embeddings",
            &json!({"input": [url_input(&img.url("/photo.jpg"))]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = common::vector(&r.body["data"][0]["embedding"]);
    assert!(max_abs_diff(&v, &uploaded[1]) <= tol::SAME_MATH);
    let r = s
        .post_json(
            "/score",
            &json!({"query": url_input(&img.url("/cat.png")),
                    "candidates": [{"image": b64(&png)}, url_input(&img.url("/photo.jpg"))]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let scores = common::vector(&r.body["scores"]);
    assert!((scores[0] - 1.0).abs() < 1e-4, "{scores:?}");

    // The name was resolved through the resolver, once per fetch of it;
    // numeric hosts never were.
    assert_eq!(net.queries(), vec!["images.test".to_string()]);
    // The request went out with the URL's host and our user agent.
    let hits = img.hits();
    assert!(hits
        .iter()
        .any(|h| h.contains(&format!("host: images.test:{}", img.port()))
            || h.contains(&format!("Host: images.test:{}", img.port()))));
    assert!(hits.iter().all(|h| h
        .to_ascii_lowercase()
        .contains("user-agent: vlembed-image-fetcher")));
    let text = s.metrics().await;
    let ok = metric(&text, "vlembed_image_fetches_total{outcome=\"ok\"}").unwrap_or(0.0);
    // 6 for /embed (a redirected fetch counts once), 1 for /v1/embeddings, 2 for /score.
    assert_eq!(ok, 9.0);
    assert!(text.contains("vlembed_image_fetch_duration_seconds_bucket"));
    net.assert_loopback_only();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urls_are_refused_while_fetching_is_off_by_default() {
    let img = ImageServer::start(vec![("/cat.png", Route::Body("image/png", image(PNG)))]).await;
    let net = NetHooks::new(&[]);
    let c = common::config();
    assert!(!c.server.fetch_image_urls, "off by default");
    let s = TestServer::ready(c, net.hooks()).await;
    for input in [
        url_input(&img.url("/cat.png")),
        json!({"image": img.url("/cat.png")}),
    ] {
        for (path, body) in [
            ("/embed", json!({"inputs": [input.clone()]})),
            ("/v1/embeddings", json!({"input": [input.clone()]})),
            (
                "/score",
                json!({"query": "q", "candidates": [input.clone()]}),
            ),
        ] {
            let r = s.post_json(path, &body).await;
            assert_eq!(r.status, 422, "{path}: {}", r.text);
            assert!(
                r.error_message().contains("URL fetching is disabled")
                    && r.error_message().contains("server.fetch_image_urls"),
                "{path}: {}",
                r.text
            );
        }
    }
    assert!(img.hits().is_empty());
    assert_eq!(net.connector.connects.load(Ordering::SeqCst), 0);
    net.assert_loopback_only();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_is_refused_in_every_spelling_unless_allowed() {
    let img = ImageServer::start(vec![("/cat.png", Route::Body("image/png", image(PNG)))]).await;
    let net = NetHooks::new(&[]);
    let s = TestServer::ready(fetch_config(false), net.hooks()).await;
    let p = img.port();
    let cases: Vec<(String, Vec<&str>)> = [
        ("127.0.0.1", "loopback"),
        ("127.1", "loopback"),
        ("127.0.1", "loopback"),
        ("2130706433", "loopback"),
        ("0x7f000001", "loopback"),
        ("0x7f.1", "loopback"),
        ("0177.0.0.1", "loopback"),
        ("127.0.0.1.", "loopback"),
        ("127.42.0.7", "loopback"),
        ("[::1]", "loopback"),
        ("[0:0:0:0:0:0:0:1]", "loopback"),
        ("[::ffff:127.0.0.1]", "loopback"),
        ("[::ffff:7f00:1]", "loopback"),
        ("[::127.0.0.1]", "loopback"),
        ("[64:ff9b::127.0.0.1]", "loopback"),
        ("localhost", "loopback"),
        ("LOCALHOST.", "loopback"),
        ("images.localhost", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("0", "unspecified"),
        ("[::]", "unspecified"),
    ]
    .into_iter()
    .map(|(host, rule)| {
        (
            format!("http://{host}:{p}/cat.png"),
            vec![rule, "refused: address", "fetch.allow"],
        )
    })
    .collect();
    assert_refused(&s, &cases).await;
    // Also over https (refused before any handshake).
    assert_refused(
        &s,
        &[(format!("https://127.1:{p}/cat.png"), vec!["loopback"])],
    )
    .await;
    assert!(img.hits().is_empty(), "{:?}", img.hits());
    assert_eq!(net.connector.connects.load(Ordering::SeqCst), 0);
    // Numeric hosts and localhost never reach the resolver.
    assert!(net.queries().is_empty(), "{:?}", net.queries());
    let text = s.metrics().await;
    let refused = metric(
        &text,
        "vlembed_image_fetches_total{outcome=\"refused_address\"}",
    )
    .unwrap_or(0.0);
    assert!(refused >= cases.len() as f64, "{refused}");
    net.assert_loopback_only();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_and_literals_in_refused_ranges_are_refused() {
    let net = NetHooks::new(&[
        ("private10.test", &["10.0.0.1"]),
        ("private172.test", &["172.16.5.4"]),
        ("private192.test", &["192.168.1.10"]),
        ("cgnat.test", &["100.64.1.1"]),
        ("linklocal.test", &["169.254.1.1"]),
        ("metadata.test", &["169.254.169.254"]),
        ("ecs.test", &["169.254.170.2"]),
        ("alibaba.test", &["100.100.100.200"]),
        ("metadata6.test", &["fd00:ec2::254"]),
        ("ula.test", &["fd12:3456::1"]),
        ("ll6.test", &["fe80::1"]),
        ("mapped.test", &["::ffff:10.0.0.1"]),
        ("mapped-meta.test", &["::ffff:169.254.169.254"]),
        ("nat64.test", &["64:ff9b::a9fe:a9fe"]),
        ("sixtofour.test", &["2002:a00:1::1"]),
        ("multicast.test", &["224.0.0.251"]),
        ("multicast6.test", &["ff02::fb"]),
        ("broadcast.test", &["255.255.255.255"]),
        ("zero.test", &["0.0.0.0"]),
        ("doc.test", &["192.0.2.1"]),
        ("reserved.test", &["240.0.0.1"]),
        // One refused answer among allowed ones refuses the name.
        ("mixed.test", &["127.0.0.1", "10.0.0.1"]),
        ("loop.test", &["127.0.0.1"]),
        ("empty.test", &[]),
    ]);
    // Loopback is allowed here: the refusals below come from the ranges.
    let s = TestServer::ready(fetch_config(true), net.hooks()).await;
    let named: &[(&str, &str)] = &[
        ("private10.test", "private"),
        ("private172.test", "private"),
        ("private192.test", "private"),
        ("cgnat.test", "shared address space"),
        ("linklocal.test", "link local"),
        ("metadata.test", "cloud metadata"),
        ("ecs.test", "cloud metadata"),
        ("alibaba.test", "cloud metadata"),
        ("metadata6.test", "cloud metadata"),
        ("ula.test", "unique local"),
        ("ll6.test", "link local"),
        ("mapped.test", "private"),
        ("mapped-meta.test", "cloud metadata"),
        ("nat64.test", "cloud metadata"),
        ("sixtofour.test", "private"),
        ("multicast.test", "multicast"),
        ("multicast6.test", "multicast"),
        ("broadcast.test", "broadcast"),
        ("zero.test", "unspecified"),
        ("doc.test", "documentation"),
        ("reserved.test", "reserved"),
        ("mixed.test", "10.0.0.1 is private"),
    ];
    let mut cases: Vec<(String, Vec<&str>)> = named
        .iter()
        .map(|(h, rule)| (format!("http://{h}/cat.png"), vec![*rule]))
        .collect();
    for (lit, rule) in [
        ("10.0.0.1", "private"),
        ("169.254.169.254", "cloud metadata"),
        ("0xa9fea9fe", "cloud metadata"),
        ("2852039166", "cloud metadata"),
        ("[::ffff:169.254.169.254]", "cloud metadata"),
        ("[fd00:ec2::254]", "cloud metadata"),
        ("100.100.100.200", "cloud metadata"),
        ("[fe80::1]", "link local"),
        ("[fc00::1]", "unique local"),
        ("192.168.0.1", "private"),
        ("10.1", "private"),
    ] {
        cases.push((format!("http://{lit}/latest/meta-data/"), vec![rule]));
    }
    assert_refused(&s, &cases).await;
    let (status, msg) = embed_err(&s, json!([url_input("http://empty.test/x")])).await;
    assert_eq!(status, 422, "{msg}");
    assert!(msg.contains("no address"), "{msg}");
    let (status, msg) = embed_err(&s, json!([url_input("http://unknown.test/x")])).await;
    assert_eq!(status, 422, "{msg}");
    assert!(msg.contains("cannot resolve unknown.test"), "{msg}");
    // Nothing was ever connected to: every refusal came before connecting.
    assert_eq!(net.connector.connects.load(Ordering::SeqCst), 0);
    net.assert_loopback_only();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_redirect_is_checked_again_and_limited() {
    let png = image(PNG);
    let mut routes = vec![
        ("/cat.png", Route::Body("image/png", png.clone())),
        (
            "/to-private",
            Route::Redirect(302, "http://10.0.0.1/x.png".into()),
        ),
        (
            "/to-metadata",
            Route::Redirect(301, "http://169.254.169.254/latest/meta-data/".into()),
        ),
        (
            "/to-metadata-name",
            Route::Redirect(307, "http://metadata.test/latest/".into()),
        ),
        (
            "/to-mapped",
            Route::Redirect(308, "http://[::ffff:a9fe:a9fe]/".into()),
        ),
        (
            "/to-decimal",
            Route::Redirect(303, "http://2852039166/".into()),
        ),
        (
            "/to-file",
            Route::Redirect(302, "file:///etc/passwd".into()),
        ),
        (
            "/to-gopher",
            Route::Redirect(302, "gopher://127.0.0.1:70/_x".into()),
        ),
        ("/to-nowhere", Route::Redirect(302, "".into())),
    ];
    // /chain/0 -> /chain/1 -> ... -> /chain/5 -> the image.
    for i in 0..5 {
        routes.push((
            Box::leak(format!("/chain/{i}").into_boxed_str()),
            Route::Redirect(302, format!("/chain/{}", i + 1)),
        ));
    }
    routes.push(("/chain/5", Route::Redirect(302, "/cat.png".into())));
    let img = ImageServer::start(routes).await;
    let net = NetHooks::new(&[("metadata.test", &["169.254.169.254"])]);
    let mut c = fetch_config(true);
    c.fetch.max_redirects = 3;
    let s = TestServer::ready(c, net.hooks()).await;
    let cases: Vec<(String, Vec<&str>)> = vec![
        (img.url("/to-private"), vec!["10.0.0.1 is private"]),
        (
            img.url("/to-metadata"),
            vec!["169.254.169.254 is cloud metadata"],
        ),
        (img.url("/to-metadata-name"), vec!["cloud metadata"]),
        (img.url("/to-mapped"), vec!["cloud metadata"]),
        (img.url("/to-decimal"), vec!["cloud metadata"]),
        (img.url("/to-file"), vec!["scheme \"file\""]),
        (img.url("/to-gopher"), vec!["scheme \"gopher\""]),
        (img.url("/to-nowhere"), vec!["without a valid Location"]),
        // Six redirects, over the limit of three.
        (
            img.url("/chain/0"),
            vec!["more than 3 redirects", "fetch.max_redirects"],
        ),
    ];
    assert_refused(&s, &cases).await;
    // Three redirects are within the limit.
    let v = s.embed(json!([url_input(&img.url("/chain/3"))])).await;
    let want = s.embed(json!([{"image": b64(&png)}])).await;
    assert!(max_abs_diff(&v[0], &want[0]) <= tol::SAME_MATH);
    // The chain stopped at the limit: /chain/4 (the fourth redirect) was
    // requested by the three-hop fetch only.
    let hits = img.hits();
    let chain4 = hits
        .iter()
        .filter(|h| h.starts_with("GET /chain/4 "))
        .count();
    assert_eq!(chain4, 1, "{hits:?}");
    assert_eq!(
        hits.iter()
            .filter(|h| h.starts_with("GET /chain/0 "))
            .count(),
        1
    );
    net.assert_loopback_only();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalls_time_out_and_bodies_are_capped_while_streaming() {
    let img = ImageServer::start(vec![
        ("/stall", Route::Stall),
        ("/huge-declared", Route::DeclaredThenStall(1 << 40)),
        ("/chunked", Route::Chunked(1 << 20)),
        ("/until-close", Route::UntilClose(1 << 20)),
        ("/fits", Route::Chunked(60_000)),
    ])
    .await;
    let net = NetHooks::new(&[]);
    net.connector.hang_ports.lock().unwrap().push(9);
    let mut c = fetch_config(true);
    c.fetch.timeout_ms = 1_000;
    c.fetch.connect_timeout_ms = 200;
    c.fetch.max_bytes = 64 * 1024;
    let s = TestServer::ready(c, net.hooks()).await;

    let (status, msg) = embed_err(&s, json!([url_input("http://127.0.0.1:9/x.png")])).await;
    assert_eq!(status, 422, "{msg}");
    assert!(
        msg.contains(
            "connecting to 127.0.0.1:9 took longer than 200 ms (fetch.connect_timeout_ms)"
        ),
        "{msg}"
    );

    let t = Instant::now();
    let (status, msg) = embed_err(&s, json!([url_input(&img.url("/stall"))])).await;
    assert_eq!(status, 422, "{msg}");
    assert!(
        msg.contains("longer than 1000 ms") && msg.contains("fetch.timeout_ms"),
        "{msg}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    // A declared length over the cap is refused at once, without waiting
    // for a body that never comes.
    let t = Instant::now();
    let (status, msg) = embed_err(&s, json!([url_input(&img.url("/huge-declared"))])).await;
    assert_eq!(status, 422, "{msg}");
    assert!(
        msg.contains("declared as 1099511627776") && msg.contains("65536 bytes (fetch.max_bytes)"),
        "{msg}"
    );
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );

    // Without a length (chunked, or ended by close) the cap holds while
    // the body streams.
    for path in ["/chunked", "/until-close"] {
        let (status, msg) = embed_err(&s, json!([url_input(&img.url(path))])).await;
        assert_eq!(status, 422, "{path}: {msg}");
        assert!(
            msg.contains("more than 65536") && msg.contains("fetch.max_bytes"),
            "{path}: {msg}"
        );
    }
    // Under the cap, the bytes reach the decoder (which refuses them: they
    // are not an image), as an uploaded image would.
    let (status, msg) = embed_err(&s, json!([url_input(&img.url("/fits"))])).await;
    assert_eq!(status, 422, "{msg}");
    assert!(!msg.contains("max_bytes"), "{msg}");
    let text = s.metrics().await;
    assert!(
        metric(&text, "vlembed_image_fetches_total{outcome=\"timeout\"}").unwrap_or(0.0) >= 2.0
    );
    assert!(
        metric(&text, "vlembed_image_fetches_total{outcome=\"too_large\"}").unwrap_or(0.0) >= 3.0
    );
    net.assert_loopback_only();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_image_byte_limit_and_pixel_limit_apply_to_fetched_images() {
    let png = image(PNG);
    let img = ImageServer::start(vec![("/cat.png", Route::Body("image/png", png.clone()))]).await;
    let net = NetHooks::new(&[]);
    let mut c = fetch_config(true);
    c.server.max_image_bytes = 1000;
    c.models[0].max_image_pixels = 100;
    let s = TestServer::ready(c, net.hooks()).await;
    let (status, msg) = embed_err(&s, json!([url_input(&img.url("/cat.png"))])).await;
    assert_eq!(status, 422, "{msg}");
    assert!(msg.contains("server.max_image_bytes"), "{msg}");
    s.stop().await;

    let mut c = fetch_config(true);
    c.models[0].max_image_pixels = 100;
    let s = TestServer::ready(c, net.hooks()).await;
    let (status, msg) = embed_err(&s, json!([url_input(&img.url("/cat.png"))])).await;
    let (up_status, up_msg) = embed_err(&s, json!([{"image": b64(&png)}])).await;
    assert_eq!((status, msg.as_str()), (up_status, up_msg.as_str()));
    assert_eq!(status, 422, "{msg}");
    net.assert_loopback_only();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_content_types_schemes_and_the_allowlist() {
    let png = image(PNG);
    let img = ImageServer::start(vec![
        ("/cat.png", Route::Body("image/png", png.clone())),
        (
            "/page",
            Route::Body("text/html; charset=utf-8", b"<html>".to_vec()),
        ),
        ("/empty", Route::Body("image/png", Vec::new())),
        ("/boom", Route::Status(500)),
    ])
    .await;
    let net = NetHooks::new(&[
        ("images.test", &["127.0.0.1"]),
        ("other.test", &["127.0.0.1"]),
    ]);
    let mut c = fetch_config(true);
    c.fetch.allowed_hosts = vec!["images.test".into()];
    let s = TestServer::ready(c, net.hooks()).await;
    let p = img.port();
    let ok = format!("http://images.test:{p}/cat.png");
    let v = s.embed(json!([url_input(&ok)])).await;
    assert_eq!(v.len(), 1);
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            format!("http://images.test:{p}/missing.png"),
            vec!["HTTP 404"],
        ),
        (format!("http://images.test:{p}/boom"), vec!["HTTP 500"]),
        (
            format!("http://images.test:{p}/page"),
            vec!["not an image", "text/html"],
        ),
        (format!("http://images.test:{p}/empty"), vec!["empty"]),
        (
            format!("http://other.test:{p}/cat.png"),
            vec!["other.test is not in fetch.allowed_hosts"],
        ),
        (
            format!("http://127.0.0.1:{p}/cat.png"),
            vec!["not in fetch.allowed_hosts"],
        ),
        ("file:///etc/passwd".into(), vec!["scheme \"file\""]),
        ("ftp://images.test/cat.png".into(), vec!["scheme \"ftp\""]),
        (
            "gopher://images.test:70/_GET".into(),
            vec!["scheme \"gopher\""],
        ),
        ("data:image/png;base64,AAAA".into(), vec!["scheme \"data\""]),
        (
            format!("http://user:pw@images.test:{p}/cat.png"),
            vec!["credentials"],
        ),
        ("http://".into(), vec!["not a valid URL"]),
        // https goes through TLS with the URL's name (a plain HTTP server
        // fails the handshake).
        (
            format!("https://images.test:{p}/cat.png"),
            vec!["TLS handshake with images.test failed"],
        ),
    ];
    assert_refused(&s, &cases).await;
    // other.test was never resolved (the allowlist comes first).
    assert!(!net.queries().iter().any(|q| q == "other.test"));
    // A huge URL is not echoed whole.
    let long = format!("http://images.test:{p}/{}", "a".repeat(20_000));
    let (status, msg) = embed_err(&s, json!([url_input(&long)])).await;
    assert_eq!(status, 413, "{msg}");
    assert!(msg.len() < 400, "{}", msg.len());
    let long_host = format!("http://{}.test:{p}/x.png", "h".repeat(5_000));
    let (status, msg) = embed_err(&s, json!([url_input(&long_host)])).await;
    assert_eq!(status, 422, "{msg}");
    assert!(
        msg.contains("not in fetch.allowed_hosts") && msg.len() < 600,
        "{msg}"
    );
    let long_scheme = format!("{}://images.test/x.png", "x".repeat(5_000));
    let (status, msg) = embed_err(&s, json!([url_input(&long_scheme)])).await;
    assert_eq!(status, 422, "{msg}");
    assert!(msg.contains("scheme") && msg.len() < 600, "{msg}");
    let long = format!("http://images.test:{p}/{}", "a".repeat(5_000));
    let (status, msg) = embed_err(&s, json!([url_input(&long)])).await;
    assert_eq!(status, 422, "{msg}");
    assert!(msg.contains("HTTP 404") && msg.len() < 600, "{}", msg.len());
    net.assert_loopback_only();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetches_run_concurrently_within_the_server_wide_bound() {
    let png = image(PNG);
    let routes: Vec<(&str, Route)> = (0..8)
        .map(|i| {
            (
                &*Box::leak(format!("/slow/{i}").into_boxed_str()),
                Route::Slow(Duration::from_millis(300), png.clone()),
            )
        })
        .collect();
    let img = ImageServer::start(routes).await;
    let net = NetHooks::new(&[]);
    let mut c = fetch_config(true);
    c.fetch.max_fetches_per_request = 4;
    c.fetch.max_concurrent_fetches = 3;
    let s = Arc::new(TestServer::ready(c, net.hooks()).await);
    let body = |from: usize| json!({"inputs": (from..from + 4).map(|i| url_input(&img.url(&format!("/slow/{i}")))).collect::<Vec<_>>()});
    let t = Instant::now();
    let (body_a, body_b) = (body(0), body(4));
    let (a, b) = tokio::join!(
        s.post_json("/embed", &body_a),
        s.post_json("/embed", &body_b)
    );
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(b.status, 200, "{}", b.text);
    assert_eq!(floats(&a.body["embeddings"]).len(), 4);
    let peak = img.peak.load(Ordering::SeqCst);
    assert!(peak > 1, "fetches ran one at a time");
    assert!(
        peak <= 3,
        "{peak} fetches at once, over max_concurrent_fetches = 3"
    );
    // 8 fetches of 300 ms, 3 at a time: at least 3 rounds.
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(img.active.load(Ordering::SeqCst), 0);
    net.assert_loopback_only();
    if let Ok(s) = Arc::try_unwrap(s) {
        s.stop().await;
    }

    // One request alone: fetch.max_fetches_per_request bounds it.
    let routes: Vec<(&str, Route)> = (0..4)
        .map(|i| {
            (
                &*Box::leak(format!("/slow/{i}").into_boxed_str()),
                Route::Slow(Duration::from_millis(300), png.clone()),
            )
        })
        .collect();
    let img = ImageServer::start(routes).await;
    let mut c = fetch_config(true);
    c.fetch.max_fetches_per_request = 2;
    c.fetch.max_concurrent_fetches = 16;
    let s = TestServer::ready(c, net.hooks()).await;
    let inputs: Vec<Value> = (0..4)
        .map(|i| url_input(&img.url(&format!("/slow/{i}"))))
        .collect();
    let v = s.embed(json!(inputs)).await;
    assert_eq!(v.len(), 4);
    assert_eq!(img.peak.load(Ordering::SeqCst), 2);
    net.assert_loopback_only();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_that_gets_no_slot_in_time_is_503() {
    let img = ImageServer::start(vec![("/stall", Route::Stall)]).await;
    let net = NetHooks::new(&[]);
    let mut c = fetch_config(true);
    c.fetch.max_concurrent_fetches = 1;
    c.fetch.timeout_ms = 1_000;
    let s = Arc::new(TestServer::ready(c, net.hooks()).await);
    let body = json!({"inputs": [url_input(&img.url("/stall"))]});
    // The first holds the only slot until its fetch times out (1 s after
    // it took the slot). The two others start 300 ms later, so their slot
    // waits (1 s each) end 300 ms after the slot frees: one takes it and
    // holds it for its own 1 s, the other waits in vain. (Started together,
    // the second's wait and the first's fetch ended at the same moment: a
    // race a loaded machine lost.)
    let first = {
        let s = Arc::clone(&s);
        let body = body.clone();
        tokio::spawn(async move { s.post_json("/embed", &body).await })
    };
    let held = Instant::now();
    while img.hits().is_empty() {
        assert!(
            held.elapsed() < Duration::from_secs(10),
            "the first fetch never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (b, c) = tokio::join!(s.post_json("/embed", &body), s.post_json("/embed", &body));
    let a = first.await.unwrap();
    let mut statuses = vec![a.status, b.status, c.status];
    statuses.sort();
    assert_eq!(
        statuses,
        vec![422, 422, 503],
        "{} {} {}",
        a.text,
        b.text,
        c.text
    );
    let busy = [&a, &b, &c].into_iter().find(|r| r.status == 503).unwrap();
    assert!(
        busy.error_message()
            .contains("fetch.max_concurrent_fetches"),
        "{}",
        busy.text
    );
    assert!(busy.headers.get("retry-after").is_some());
    net.assert_loopback_only();
    if let Ok(s) = Arc::try_unwrap(s) {
        s.stop().await;
    }
}
