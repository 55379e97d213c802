//! A small closed-loop load generator for a running vlembed server.
//!
//! `--concurrency N` clients each send one request at a time over a kept-alive
//! connection (`POST /embed`, one input per request) until `--requests` have
//! been sent in total or `--duration` seconds have passed, whichever comes
//! first; then it waits for the requests in flight (each bounded by
//! `--timeout`) and reports throughput, latency percentiles and errors, as a
//! human summary on stderr and JSON on stdout (or `--json FILE`).
//!
//! ```sh
//! # 8 clients sending single images for 20 s
//! cargo run --release --example loadgen -- --url http://127.0.0.1:8080 \
//!     --concurrency 8 --duration 20 --images-dir /tmp/vlembed-bench/inputs/images
//! # mixed: 32 image clients in the background, one client sending single short
//! # texts one after the other (every 100 ms); reports the texts' latency apart
//! cargo run --release --example loadgen -- --concurrency 32 --duration 30 \
//!     --images-dir DIR --mixed --texts-file DIR/texts.txt --probe-interval-ms 100
//! # BGE-VL-MLLM composed queries (image i + text i), 8 clients
//! cargo run --release --example loadgen -- --kind composed --concurrency 8 \
//!     --images-dir DIR --texts-file DIR/texts.txt --role query --instruction "Retrieve ..."
//! # 256 clients sending single texts from a 4-thread client
//! cargo run --release --example loadgen -- --kind text --concurrency 256 --threads 4 \
//!     --texts-file DIR/texts.txt
//! ```
//!
//! Only loopback targets are accepted unless `--allow-remote` is given. A
//! client pauses 50 ms after a failed request (no tight loop against a server
//! that refuses or is gone).
//!
//! It reports its own CPU use (`client_cpu`: user + system seconds from
//! `getrusage`, and in cores over the run): on a small machine the client
//! competes with the server, and a server/model ratio means little without it.

use std::net::{IpAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::Engine;
use clap::{Parser, ValueEnum};
use serde_json::{json, Value};

/// Pause of a client after a failed request.
const ERROR_BACKOFF: Duration = Duration::from_millis(50);

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Kind {
    Image,
    Text,
    /// One image and one text per input (a composed input), with `--role`
    /// and `--instruction`: BGE-VL-MLLM's composed queries.
    Composed,
}

#[derive(Parser, Debug)]
#[command(about = "Closed-loop load generator for vlembed (loopback only by default)")]
struct Args {
    /// Base URL of the server.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Path of the embedding endpoint.
    #[arg(long, default_value = "/embed")]
    endpoint: String,
    /// Concurrent clients (each one request at a time).
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Most requests sent by the main clients in total (0: no limit but --duration).
    #[arg(long, default_value_t = 0)]
    requests: usize,
    /// No new requests after this many seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Per-request timeout in seconds (bounds the wait for requests in flight).
    #[arg(long, default_value_t = 120.0)]
    timeout: f64,
    /// What the main clients send: one image, one text, or one composed
    /// input (image + text, paired in turn) per request.
    #[arg(long, value_enum, default_value_t = Kind::Image)]
    kind: Kind,
    /// The inputs' `role` (`query` or `candidate`); left out when not given.
    #[arg(long)]
    role: Option<String>,
    /// The inputs' `instruction` (BGE-VL-MLLM queries); left out when not given.
    #[arg(long)]
    instruction: Option<String>,
    /// Threads of the client's runtime (1: a single thread). More than one
    /// when a single thread cannot keep up (tens of thousands of requests/s).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Image files to send (repeatable); used in turn.
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// Every *.jpg, *.jpeg, *.png, *.webp in this folder is sent in turn.
    #[arg(long)]
    images_dir: Option<PathBuf>,
    /// Texts to send (repeatable).
    #[arg(long = "text")]
    texts: Vec<String>,
    /// A file with one text per line.
    #[arg(long)]
    texts_file: Option<PathBuf>,
    /// Mixed mode: besides the main clients, one probe client sends single
    /// texts sequentially while they run; its latencies are reported apart.
    #[arg(long)]
    mixed: bool,
    /// Pause of the probe client between two of its requests, in milliseconds.
    #[arg(long, default_value_t = 100)]
    probe_interval_ms: u64,
    /// A name for this run in the report.
    #[arg(long, default_value = "")]
    label: String,
    /// Write the JSON report here instead of stdout.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Allow a target that is not a loopback address.
    #[arg(long)]
    allow_remote: bool,
}

/// One finished request: latency and outcome.
struct Sample {
    latency: Duration,
    /// `None` when it succeeded; else a short error class ("503", "timeout", ...).
    error: Option<String>,
    /// The `Retry-After` of a refusal (429, 503), in seconds.
    retry_after: Option<Duration>,
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Image => "image",
        Kind::Text => "text",
        Kind::Composed => "composed",
    }
}

fn check_loopback(url: &reqwest::Url) -> anyhow::Result<()> {
    let host = url.host_str().context("the URL has no host")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        if ip.is_loopback() {
            return Ok(());
        }
        bail!("{ip} is not a loopback address (use --allow-remote to target it anyway)");
    }
    let port = url.port_or_known_default().unwrap_or(80);
    let addrs: Vec<_> = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {host}"))?
        .collect();
    if addrs.is_empty() || addrs.iter().any(|a| !a.ip().is_loopback()) {
        bail!("{host} does not resolve to loopback addresses only (use --allow-remote to target it anyway)");
    }
    Ok(())
}

fn image_files(args: &Args) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = args.images.clone();
    if let Some(dir) = &args.images_dir {
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot list {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .and_then(|x| x.to_str())
                    .is_some_and(|x| ["jpg", "jpeg", "png", "webp"].contains(&x))
            })
            .collect();
        found.sort();
        files.extend(found);
    }
    Ok(files)
}

fn texts(args: &Args) -> anyhow::Result<Vec<String>> {
    let mut out = args.texts.clone();
    if let Some(p) = &args.texts_file {
        let s =
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
        out.extend(
            s.lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string),
        );
    }
    Ok(out)
}

/// Request bodies, built once and shared for the process's life.
fn leak(v: Vec<u8>) -> &'static [u8] {
    Box::leak(v.into_boxed_slice())
}

fn read_b64(p: &PathBuf) -> anyhow::Result<String> {
    let bytes = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// `{"inputs": input}`, with `--role` and `--instruction` added to an object
/// input when given.
fn body(args: &Args, mut input: Value) -> anyhow::Result<&'static [u8]> {
    if let Value::Object(m) = &mut input {
        if let Some(r) = &args.role {
            m.insert("role".into(), json!(r));
        }
        if let Some(i) = &args.instruction {
            m.insert("instruction".into(), json!(i));
        }
    }
    Ok(leak(serde_json::to_vec(&json!({ "inputs": input }))?))
}

fn image_bodies(args: &Args, files: &[PathBuf]) -> anyhow::Result<Vec<&'static [u8]>> {
    files
        .iter()
        .map(|p| body(args, json!({"image": read_b64(p)?})))
        .collect()
}

/// Single texts: a bare string unless a role or instruction goes with it.
fn text_bodies(args: &Args, texts: &[String]) -> anyhow::Result<Vec<&'static [u8]>> {
    texts
        .iter()
        .map(|t| {
            if args.role.is_none() && args.instruction.is_none() {
                Ok(leak(serde_json::to_vec(&json!({ "inputs": t }))?))
            } else {
                body(args, json!({ "text": t }))
            }
        })
        .collect()
}

/// Composed inputs: image i with text i (both lists taken in turn, as many
/// bodies as the longer list).
fn composed_bodies(
    args: &Args,
    files: &[PathBuf],
    texts: &[String],
) -> anyhow::Result<Vec<&'static [u8]>> {
    let images: Vec<String> = files.iter().map(read_b64).collect::<anyhow::Result<_>>()?;
    (0..images.len().max(texts.len()))
        .map(|i| {
            body(
                args,
                json!({"text": texts[i % texts.len()], "image": images[i % images.len()]}),
            )
        })
        .collect()
}

async fn send(client: &reqwest::Client, url: &str, body: &'static [u8]) -> Sample {
    let start = Instant::now();
    let res = client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    let mut retry_after = None;
    let error = match res {
        Ok(r) => {
            let status = r.status();
            retry_after = r
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            // Read the whole body so the connection can be reused.
            match r.bytes().await {
                Ok(b) if status.is_success() && b.starts_with(b"{") => None,
                Ok(_) if status.is_success() => Some("bad body".to_string()),
                Ok(_) => Some(status.as_u16().to_string()),
                Err(e) if e.is_timeout() => Some("timeout".to_string()),
                Err(_) => Some("body read".to_string()),
            }
        }
        Err(e) if e.is_timeout() => Some("timeout".to_string()),
        Err(e) if e.is_connect() => Some("connect".to_string()),
        Err(_) => Some("request".to_string()),
    };
    Sample {
        latency: start.elapsed(),
        error,
        retry_after,
    }
}

/// CPU seconds (user + system) this process used so far, from `getrusage`.
fn cpu_seconds() -> Option<f64> {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `ru` is valid for writes of a `rusage`, and RUSAGE_SELF is a
    // valid `who`; getrusage writes nothing else.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: zero-initialised (a valid `rusage`, all integers) and filled
    // by the successful call above.
    let ru = unsafe { ru.assume_init() };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    Some(secs(ru.ru_utime) + secs(ru.ru_stime))
}

fn percentile(sorted_ms: &[f64], p: f64) -> f64 {
    if sorted_ms.is_empty() {
        return f64::NAN;
    }
    // nearest rank
    let rank = ((p / 100.0) * sorted_ms.len() as f64).ceil() as usize;
    sorted_ms[rank.clamp(1, sorted_ms.len()) - 1]
}

fn report(samples: &[Sample], wall: Duration) -> Value {
    let mut ok_ms: Vec<f64> = samples
        .iter()
        .filter(|s| s.error.is_none())
        .map(|s| s.latency.as_secs_f64() * 1e3)
        .collect();
    ok_ms.sort_by(f64::total_cmp);
    let mut errors = serde_json::Map::new();
    for s in samples {
        if let Some(e) = &s.error {
            let n = errors.get(e).and_then(Value::as_u64).unwrap_or(0);
            errors.insert(e.clone(), json!(n + 1));
        }
    }
    let mean = if ok_ms.is_empty() {
        f64::NAN
    } else {
        ok_ms.iter().sum::<f64>() / ok_ms.len() as f64
    };
    let wall_s = wall.as_secs_f64();
    json!({
        "requests": samples.len(),
        "ok": ok_ms.len(),
        "errors": errors,
        "wall_s": wall_s,
        "throughput_per_s": ok_ms.len() as f64 / wall_s,
        "latency_ms": {
            "min": ok_ms.first().copied().unwrap_or(f64::NAN),
            "mean": mean,
            "p50": percentile(&ok_ms, 50.0),
            "p95": percentile(&ok_ms, 95.0),
            "p99": percentile(&ok_ms, 99.0),
            "max": ok_ms.last().copied().unwrap_or(f64::NAN),
        },
    })
}

fn human(name: &str, r: &Value) -> String {
    let l = &r["latency_ms"];
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    format!(
        "{name}: {} requests, {} ok, errors {}, {:.2}/s over {:.1} s; latency ms p50 {:.0} p95 {:.0} p99 {:.0} max {:.0}",
        r["requests"],
        r["ok"],
        r["errors"],
        f(&r["throughput_per_s"]),
        f(&r["wall_s"]),
        f(&l["p50"]),
        f(&l["p95"]),
        f(&l["p99"]),
        f(&l["max"]),
    )
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = if args.threads > 1 {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    };
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let base = reqwest::Url::parse(&args.url).with_context(|| format!("bad --url {}", args.url))?;
    if base.scheme() != "http" && base.scheme() != "https" {
        bail!("--url must be http:// or https://");
    }
    if !args.allow_remote {
        check_loopback(&base)?;
    }
    let url = base
        .join(&args.endpoint)
        .context("bad --endpoint")?
        .to_string();
    if !(args.duration > 0.0 && args.duration.is_finite()) {
        bail!("--duration must be a positive number of seconds");
    }
    if !(args.timeout > 0.0 && args.timeout.is_finite()) {
        bail!("--timeout must be a positive number of seconds");
    }
    if args.concurrency == 0 && !args.mixed {
        bail!("--concurrency must be at least 1 (or 0 with --mixed for the probe alone)");
    }

    let text_list = texts(&args)?;
    let main_bodies = match args.kind {
        Kind::Image => {
            let files = image_files(&args)?;
            if files.is_empty() && args.concurrency > 0 {
                bail!("--kind image needs --image FILE or --images-dir DIR");
            }
            image_bodies(&args, &files)?
        }
        Kind::Text => {
            if text_list.is_empty() {
                bail!("--kind text needs --text T or --texts-file FILE");
            }
            text_bodies(&args, &text_list)?
        }
        Kind::Composed => {
            let files = image_files(&args)?;
            if files.is_empty() || text_list.is_empty() {
                bail!("--kind composed needs images (--image, --images-dir) and texts (--text, --texts-file)");
            }
            composed_bodies(&args, &files, &text_list)?
        }
    };
    let probe_bodies = if args.mixed {
        if text_list.is_empty() {
            bail!("--mixed needs --text T or --texts-file FILE for the probe");
        }
        text_list
            .iter()
            .map(|t| Ok(leak(serde_json::to_vec(&json!({ "inputs": t }))?)))
            .collect::<anyhow::Result<Vec<_>>>()?
    } else {
        Vec::new()
    };

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency + 2)
        .timeout(Duration::from_secs_f64(args.timeout))
        .build()?;
    let cpu_start = cpu_seconds();
    let start = Instant::now();
    let stop_at = start + Duration::from_secs_f64(args.duration);
    let issued = Arc::new(AtomicUsize::new(0));
    let limit = if args.requests == 0 {
        usize::MAX
    } else {
        args.requests
    };

    let mut tasks = Vec::with_capacity(args.concurrency);
    for c in 0..args.concurrency {
        let client = client.clone();
        let url = url.clone();
        let bodies = main_bodies.clone();
        let issued = Arc::clone(&issued);
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            while Instant::now() < stop_at {
                let n = issued.fetch_add(1, Ordering::Relaxed);
                if n >= limit {
                    break;
                }
                // Clients start at different inputs, then go round.
                let body = bodies[(n + c) % bodies.len()];
                let sample = send(&client, &url, body).await;
                let failed = sample.error.is_some();
                let retry_after = sample.retry_after;
                samples.push(sample);
                if failed {
                    // No tight loop against a server that refuses or is
                    // gone: a refusal's Retry-After is honoured, as a
                    // well-behaved client would (within the run's time).
                    let pause = retry_after
                        .map(|r| r.min(stop_at.saturating_duration_since(Instant::now())))
                        .unwrap_or(ERROR_BACKOFF);
                    tokio::time::sleep(pause).await;
                }
            }
            (samples, Instant::now())
        }));
    }

    // The probe runs while the main clients do (until they all stopped issuing).
    let probe = if args.mixed {
        let client = client.clone();
        let url = url.clone();
        let interval = Duration::from_millis(args.probe_interval_ms);
        Some(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut k = 0usize;
            while Instant::now() < stop_at {
                samples.push(send(&client, &url, probe_bodies[k % probe_bodies.len()]).await);
                k += 1;
                tokio::time::sleep(interval).await;
            }
            (samples, Instant::now())
        }))
    } else {
        None
    };

    let mut samples = Vec::new();
    let mut last = start;
    for t in tasks {
        let (s, end) = t.await.context("a client task failed")?;
        samples.extend(s);
        last = last.max(end);
    }
    let mut doc = json!({
        "label": args.label,
        "url": url,
        "kind": kind_name(args.kind),
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "request_limit": args.requests,
        "mixed": args.mixed,
        "threads": args.threads,
    });
    if args.concurrency > 0 {
        let r = report(&samples, last - start);
        eprintln!(
            "{}",
            human(
                &format!("{} x{}", kind_name(args.kind), args.concurrency),
                &r
            )
        );
        doc["main"] = r;
    }
    if let Some(p) = probe {
        let (s, end) = p.await.context("the probe task failed")?;
        let r = report(&s, end - start);
        eprintln!("{}", human("text probe", &r));
        doc["probe"] = r;
    }
    let wall = start.elapsed().as_secs_f64();
    if let (Some(a), Some(b)) = (cpu_start, cpu_seconds()) {
        let cpu = b - a;
        eprintln!(
            "load generator CPU: {cpu:.2} s over {wall:.1} s = {:.2} cores",
            cpu / wall
        );
        doc["client_cpu"] = json!({"cpu_s": cpu, "wall_s": wall, "cores": cpu / wall});
    }
    let text = serde_json::to_string_pretty(&doc)?;
    match &args.json {
        Some(p) => std::fs::write(p, text + "\n")
            .with_context(|| format!("cannot write {}", p.display()))?,
        None => println!("{text}"),
    }
    Ok(())
}
