//! A structured mutation fuzzer for what a client controls, on the stable
//! toolchain (no coverage-guided engine needed):
//!
//! - `json`: `/embed`, `/score` and `/v1/embeddings` JSON bodies through the
//!   streaming parsers, under small limits;
//! - `multipart`: multipart bodies through axum's reader and ours, then the
//!   request builders;
//! - `image`: image decoding + CLIP and LLaVA-NeXT preprocessing, seeded with
//!   every fixture in `tests/fixtures/images` (JPEG, PNG, WebP, GIF, BMP, TIFF).
//!
//! Each execution must return (no panic escaping, no abort), its error
//! message must stay short, a refused body must not have built more inputs
//! than the limit, and the process's peak RSS must stay under `--max-rss-mb`.
//! Inputs that break a rule are written to `fuzz-findings/<target>-<n>.bin`.
//!
//! ```text
//! cargo run --release --example fuzz_inputs -- <json|multipart|image> [seconds] [seed] [--max-rss-mb N]
//! ```
//! `scripts/fuzz.sh` runs every target for a bounded time.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Request};
use base64::Engine;
use vlembed::http::body::read_multipart;
use vlembed::http::error::MAX_MESSAGE_BYTES;
use vlembed::http::inputs::{parsed_inputs, BodyLimits};
use vlembed::http::requests::{EmbedRequest, EndpointRequest, OpenAiRequest, ScoreRequest};
use vlembed::input::Input;
use vlembed::models::clip::ClipInput;
use vlembed::models::llava::LlavaInput;
use vlembed::models::{LoadOptions, LoadedModel, ModelSource};
use vlembed::preprocess::Preprocessor;

/// xorshift64*: deterministic, seedable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

const INTERESTING_U8: &[u8] = &[0, 1, 0x7f, 0x80, 0xff, b'"', b'\\', b'{', b'[', b',', b':'];
const INTERESTING_U32: &[u32] = &[
    0,
    1,
    0x7f,
    0xff,
    0x100,
    0x7fff,
    0x8000,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0xffff_ffff,
    32768,
    65500,
    6324,
];

/// One byte-level mutation of `data` (splicing from `other`).
fn mutate(rng: &mut Rng, data: &mut Vec<u8>, other: &[u8]) {
    let len = data.len();
    match rng.below(10) {
        0 if len > 0 => {
            let i = rng.below(len);
            data[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            data[i] = INTERESTING_U8[rng.below(INTERESTING_U8.len())];
        }
        2 if len >= 4 => {
            // A 16- or 32-bit field, either endianness (image dimensions).
            let i = rng.below(len - 3);
            let v = INTERESTING_U32[rng.below(INTERESTING_U32.len())];
            let bytes = if rng.chance(2) {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            };
            let n = if rng.chance(2) { 2 } else { 4 };
            let src = if n == 2 {
                &bytes[if rng.chance(2) { 2 } else { 0 }..][..2]
            } else {
                &bytes[..]
            };
            data[i..i + n].copy_from_slice(src);
        }
        3 if len > 1 => {
            // Cut the end (truncated files).
            data.truncate(rng.below(len));
        }
        4 if len > 1 => {
            let a = rng.below(len);
            let b = (a + 1 + rng.below(64)).min(len);
            data.drain(a..b);
        }
        5 if len > 0 => {
            // Duplicate a chunk.
            let a = rng.below(len);
            let b = (a + 1 + rng.below(256)).min(len);
            let chunk = data[a..b].to_vec();
            let at = rng.below(len);
            data.splice(at..at, chunk);
        }
        6 if !other.is_empty() => {
            // Splice another seed in.
            let a = rng.below(other.len());
            let b = (a + 1 + rng.below(512)).min(other.len());
            let at = rng.below(len + 1);
            data.splice(at..at, other[a..b].iter().copied());
        }
        7 => {
            let at = rng.below(len + 1);
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            data.splice(at..at, bytes);
        }
        8 if len > 0 => {
            // Overwrite a run with one byte.
            let a = rng.below(len);
            let b = (a + 1 + rng.below(128)).min(len);
            let v = INTERESTING_U8[rng.below(INTERESTING_U8.len())];
            data[a..b].fill(v);
        }
        _ => {
            let at = rng.below(len + 1);
            data.insert(at, rng.next() as u8);
        }
    }
}

/// What one run found.
#[derive(Default)]
struct Stats {
    execs: u64,
    ok: u64,
    refused: u64,
    findings: u64,
    slowest: Duration,
}

struct Fuzzer {
    target: &'static str,
    rng: Rng,
    out: PathBuf,
    stats: Stats,
    max_rss_kb: u64,
}

impl Fuzzer {
    fn finding(&mut self, what: &str, input: &[u8]) {
        self.stats.findings += 1;
        let _ = std::fs::create_dir_all(&self.out);
        let path = self
            .out
            .join(format!("{}-{}.bin", self.target, self.stats.findings));
        let _ = std::fs::write(&path, input);
        eprintln!("FINDING [{}] {what} -> {}", self.target, path.display());
    }

    /// Runs `f` on `input`, checking the rules.
    fn exec(&mut self, input: &[u8], f: &Exec) {
        let start = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(input)));
        let took = start.elapsed();
        self.stats.execs += 1;
        self.stats.slowest = self.stats.slowest.max(took);
        match result {
            Err(_) => self.finding("panic", input),
            Ok(Outcome::Ok) => self.stats.ok += 1,
            Ok(Outcome::Refused) => self.stats.refused += 1,
            Ok(Outcome::Broken(why)) => self.finding(&why, input),
        }
        if took > Duration::from_secs(5) {
            self.finding(&format!("slow: {took:?}"), input);
        }
        if self.stats.execs.is_multiple_of(64) || self.target == "image" {
            let rss = peak_rss_kb();
            if rss > self.max_rss_kb {
                self.finding(&format!("peak RSS {rss} kB"), input);
                self.max_rss_kb = u64::MAX; // report once
            }
        }
    }
}

enum Outcome {
    Ok,
    Refused,
    Broken(String),
}

fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture_images() -> Vec<Vec<u8>> {
    let dir = repo().join("tests/fixtures/images");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    paths.sort();
    paths.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

const LIMITS: BodyLimits = BodyLimits {
    max_inputs: 16,
    max_text_chars: 2000,
    max_image_bytes: 200_000,
};

fn check_error(message: &str) -> Outcome {
    if message.len() > MAX_MESSAGE_BYTES + 64 {
        Outcome::Broken(format!("error message of {} bytes", message.len()))
    } else {
        Outcome::Refused
    }
}

// ---- json -----------------------------------------------------------------

fn json_seeds(images: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let small = images
        .iter()
        .min_by_key(|i| i.len())
        .cloned()
        .unwrap_or_default();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&small);
    let seeds = [
        serde_json::json!({"inputs": ["a photo of a cat", "a dog"]}),
        serde_json::json!({"inputs": "a cat", "normalize": false, "truncate": true, "encoding_format": "base64", "model": "m"}),
        serde_json::json!({"inputs": [{"text": "cat", "image": b64, "role": "query", "instruction": "find"}]}),
        serde_json::json!({"inputs": [{"image": format!("data:image/png;base64,{b64}")}, {"image": {"url": "https://x/y"}}]}),
        serde_json::json!({"query": "q", "candidates": ["a", {"text": "b"}], "top_k": 1}),
        serde_json::json!({"query": {"image": b64}, "candidates": [{"image": b64}]}),
        serde_json::json!({"input": ["a", "b"], "model": "m", "user": "u", "dimensions": 4}),
        serde_json::json!({"input": [[1, 2, 3]], "encoding_format": "float"}),
        serde_json::json!({"input": {"text": "x"}}),
    ];
    seeds
        .iter()
        .map(|v| serde_json::to_vec(v).unwrap_or_default())
        .collect()
}

/// A random JSON document built from the request grammar (field names,
/// inputs, wrong types, deep nesting, long strings, escapes).
fn grammar_json(rng: &mut Rng, depth: usize) -> String {
    const KEYS: &[&str] = &[
        "inputs",
        "input",
        "query",
        "candidates",
        "text",
        "image",
        "instruction",
        "role",
        "model",
        "normalize",
        "truncate",
        "encoding_format",
        "top_k",
        "dimensions",
        "url",
        "user",
        "x",
    ];
    const STRINGS: &[&str] = &[
        "",
        "a",
        "query",
        "candidate",
        "float",
        "base64",
        "data:image/png;base64,iVBORw0KGgo=",
        "https://example.com/a.png",
        "\\u0000",
        "\\ud800",
        "é",
        "!!!",
        "aGVsbG8=",
    ];
    let leaf = depth > 6 || rng.chance(3);
    if leaf {
        return match rng.below(9) {
            0 => "null".into(),
            1 => "true".into(),
            2 => format!("{}", rng.next() as i64),
            3 => "-1".into(),
            4 => "1.5e300".into(),
            5 => format!("\"{}\"", "w ".repeat(rng.below(3000))),
            _ => format!("\"{}\"", STRINGS[rng.below(STRINGS.len())]),
        };
    }
    if rng.chance(2) {
        let most = if rng.chance(8) { 40 } else { 5 };
        let n = rng.below(most);
        let items: Vec<String> = (0..n).map(|_| grammar_json(rng, depth + 1)).collect();
        format!("[{}]", items.join(","))
    } else {
        let n = rng.below(6);
        let items: Vec<String> = (0..n)
            .map(|_| {
                format!(
                    "\"{}\":{}",
                    KEYS[rng.below(KEYS.len())],
                    grammar_json(rng, depth + 1)
                )
            })
            .collect();
        format!("{{{}}}", items.join(","))
    }
}

/// A body parser: the number of inputs built, or the error message.
type Parser = dyn Fn(&[u8]) -> Result<usize, String>;

/// One execution of a target.
type Exec = dyn Fn(&[u8]) -> Outcome;

fn json_exec(body: &[u8]) -> Outcome {
    let parsers: [&Parser; 3] = [
        &|b| {
            EmbedRequest::from_json_with(b, &LIMITS)
                .map(|r| r.inputs.len())
                .map_err(|e| e.message)
        },
        &|b| {
            ScoreRequest::from_json_with(b, &LIMITS)
                .map(|r| r.inputs.len())
                .map_err(|e| e.message)
        },
        &|b| {
            OpenAiRequest::from_json_with(b, &LIMITS)
                .map(|r| r.inputs.len())
                .map_err(|e| e.message)
        },
    ];
    let mut outcome = Outcome::Refused;
    for parse in parsers {
        let before = parsed_inputs();
        let result = parse(body);
        let built = parsed_inputs() - before;
        if built > LIMITS.max_inputs as u64 {
            return Outcome::Broken(format!("{built} inputs built"));
        }
        match result {
            Ok(n) if n > LIMITS.max_inputs => {
                return Outcome::Broken(format!("{n} inputs accepted"))
            }
            Ok(_) => outcome = Outcome::Ok,
            Err(m) => {
                if let Outcome::Broken(b) = check_error(&m) {
                    return Outcome::Broken(b);
                }
            }
        }
    }
    outcome
}

// ---- multipart ------------------------------------------------------------

const BOUNDARY: &str = "fuzzboundary";

fn multipart_body(parts: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in parts {
        out.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        let file = if name.contains("image") {
            "; filename=\"x.bin\"\r\nContent-Type: application/octet-stream"
        } else {
            ""
        };
        out.extend_from_slice(
            format!("Content-Disposition: form-data; name=\"{name}\"{file}\r\n\r\n").as_bytes(),
        );
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    out
}

fn multipart_seeds(images: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let img = images
        .iter()
        .min_by_key(|i| i.len())
        .cloned()
        .unwrap_or_default();
    vec![
        multipart_body(&[("text", b"a cat".to_vec()), ("text", b"a dog".to_vec())]),
        multipart_body(&[
            ("text", b"cat".to_vec()),
            ("image", img.clone()),
            ("role", b"query".to_vec()),
            ("normalize", b"false".to_vec()),
            ("instruction", b"find".to_vec()),
        ]),
        multipart_body(&[
            ("query_text", b"q".to_vec()),
            ("candidate_image", img.clone()),
            ("candidate_text", b"c".to_vec()),
            ("top_k", b"1".to_vec()),
        ]),
        multipart_body(&[
            ("model", b"m".to_vec()),
            ("encoding_format", b"base64".to_vec()),
        ]),
    ]
}

fn multipart_exec(rt: &tokio::runtime::Runtime, body: &[u8]) -> Outcome {
    let body = body.to_vec();
    rt.block_on(async move {
        let mut outcome = Outcome::Refused;
        for endpoint in 0..2 {
            let req = Request::builder()
                .method("POST")
                .header(
                    "content-type",
                    format!("multipart/form-data; boundary={BOUNDARY}"),
                )
                .body(Body::from(body.clone()));
            let Ok(req) = req else {
                return Outcome::Broken("cannot build the request".into());
            };
            let mp = match Multipart::from_request(req, &()).await {
                Ok(mp) => mp,
                Err(_) => continue,
            };
            let parts = match read_multipart(mp, &LIMITS, 2 << 20).await {
                Ok(parts) => parts,
                Err(e) => {
                    if let Outcome::Broken(b) = check_error(&e.message) {
                        return Outcome::Broken(b);
                    }
                    continue;
                }
            };
            if parts.len() > LIMITS.max_inputs * 2 + 16 {
                return Outcome::Broken(format!("{} parts read", parts.len()));
            }
            let result = if endpoint == 0 {
                EmbedRequest::from_multipart(parts).map(|r| r.inputs.len())
            } else {
                ScoreRequest::from_multipart(parts).map(|r| r.inputs.len())
            };
            match result {
                Ok(_) => outcome = Outcome::Ok,
                Err(e) => {
                    if let Outcome::Broken(b) = check_error(&e.message) {
                        return Outcome::Broken(b);
                    }
                }
            }
        }
        outcome
    })
}

// ---- image ----------------------------------------------------------------

fn preprocessor(dir: &str) -> Option<Arc<dyn Preprocessor>> {
    let path = repo().join("tests/fixtures").join(dir);
    let source = ModelSource::parse(path.to_str()?, None);
    match LoadedModel::open(&source, &LoadOptions::default()) {
        Ok(m) => Some(m.preprocessor),
        Err(e) => {
            eprintln!("cannot open {dir}: {e}");
            None
        }
    }
}

fn image_exec(pres: &[Arc<dyn Preprocessor>], bytes: &[u8]) -> Outcome {
    let mut outcome = Outcome::Refused;
    for pre in pres {
        let input = Input::image(bytes.to_vec());
        match pre.prepare(&input, true) {
            Ok(p) => {
                let px = match (p.data::<ClipInput>(), p.data::<LlavaInput>()) {
                    (Some(c), _) => c.pixels(),
                    (_, Some(l)) => l.image.as_ref().map(|i| &i.tiles),
                    _ => None,
                };
                let Some(px) = px else {
                    return Outcome::Broken("an image without pixels".into());
                };
                if px.data.len() != px.tiles * 3 * px.height * px.width {
                    return Outcome::Broken("pixel buffer of the wrong size".into());
                }
                if px.data.iter().any(|v| !v.is_finite()) {
                    return Outcome::Broken("non-finite pixel values".into());
                }
                outcome = Outcome::Ok;
            }
            Err(e) => {
                if matches!(e, vlembed::preprocess::PreprocessError::Internal(_)) {
                    return Outcome::Broken(format!("internal error: {e}"));
                }
            }
        }
    }
    outcome
}

// ---- driver ---------------------------------------------------------------

fn run(target: &'static str, seconds: u64, seed: u64, max_rss_mb: u64) -> Result<(), String> {
    let images = fixture_images();
    if images.is_empty() {
        return Err("no fixture images in tests/fixtures/images".into());
    }
    let mut fz = Fuzzer {
        target,
        rng: Rng(seed | 1),
        out: repo().join("fuzz-findings"),
        stats: Stats::default(),
        max_rss_kb: max_rss_mb * 1024,
    };
    let seeds = match target {
        "json" => json_seeds(&images),
        "multipart" => multipart_seeds(&images),
        "image" => images.clone(),
        other => {
            return Err(format!(
                "unknown target {other:?}: json, multipart or image"
            ))
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| e.to_string())?;
    let pres: Vec<Arc<dyn Preprocessor>> = if target == "image" {
        ["clip-tiny", "mllm-tiny-a"]
            .iter()
            .filter_map(|d| preprocessor(d))
            .collect()
    } else {
        Vec::new()
    };
    if target == "image" && pres.is_empty() {
        return Err("no preprocessor could be loaded".into());
    }
    let exec: Box<Exec> = match target {
        "json" => Box::new(json_exec),
        "multipart" => Box::new(move |b: &[u8]| multipart_exec(&rt, b)),
        _ => Box::new(move |b: &[u8]| image_exec(&pres, b)),
    };
    // Quiet panics: the decoders' errors unwind and are caught inside
    // preprocessing; an escaping panic is reported by `exec` itself.
    std::panic::set_hook(Box::new(|_| {}));
    for s in &seeds {
        fz.exec(s, exec.as_ref());
    }
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut corpus = seeds.clone();
    while Instant::now() < deadline {
        let mut input = if target == "json" && fz.rng.chance(4) {
            grammar_json(&mut fz.rng, 0).into_bytes()
        } else {
            corpus[fz.rng.below(corpus.len())].clone()
        };
        let other = corpus[fz.rng.below(corpus.len())].clone();
        for _ in 0..1 + fz.rng.below(8) {
            mutate(&mut fz.rng, &mut input, &other);
        }
        let ok_before = fz.stats.ok;
        fz.exec(&input, exec.as_ref());
        // Keep accepted inputs as seeds (a poor man's feedback), bounded.
        if fz.stats.ok > ok_before && input.len() < 1 << 20 && fz.rng.chance(8) {
            if corpus.len() < 256 {
                corpus.push(input);
            } else {
                let i = fz.rng.below(corpus.len() - seeds.len()) + seeds.len();
                corpus[i] = input;
            }
        }
    }
    let s = &fz.stats;
    println!(
        "target={target} seconds={seconds} seed={seed} execs={} execs_per_s={:.0} accepted={} refused={} findings={} slowest_ms={} peak_rss_mb={}",
        s.execs,
        s.execs as f64 / seconds.max(1) as f64,
        s.ok,
        s.refused,
        s.findings,
        s.slowest.as_millis(),
        peak_rss_kb() / 1024
    );
    if s.findings > 0 {
        return Err(format!("{} findings in {}", s.findings, fz.out.display()));
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut positional = Vec::new();
    let mut max_rss_mb = 2048;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--max-rss-mb" {
            max_rss_mb = it.next().and_then(|v| v.parse().ok()).unwrap_or(max_rss_mb);
        } else {
            positional.push(a.as_str());
        }
    }
    let target: &'static str = match positional.first().copied() {
        Some("json") => "json",
        Some("multipart") => "multipart",
        Some("image") => "image",
        _ => {
            eprintln!(
                "usage: fuzz_inputs <json|multipart|image> [seconds] [seed] [--max-rss-mb N]"
            );
            std::process::exit(2);
        }
    };
    let seconds = positional.get(1).and_then(|s| s.parse().ok()).unwrap_or(60);
    let seed = positional
        .get(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    if let Err(e) = run(target, seconds, seed, max_rss_mb) {
        eprintln!("fuzz_inputs: {e}");
        std::process::exit(1);
    }
}
