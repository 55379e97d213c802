//! Benchmarks one model alone, through the library API (no HTTP, no queue):
//! images/s with preprocessing (JPEG decode + resize + normalise + forward)
//! and of the forward pass alone, texts/s (tokenize + forward), and the
//! latency of one short text. Used by `scripts/bench.sh`.
//!
//! ```sh
//! cargo run --release --example bench_model -- --model /tmp/bge-vl-base-random \
//!     --inputs /tmp/vlembed-bench/inputs --batch-sizes 1,8,32 --reps 5 --json out.json
//! ```
//!
//! `--inputs DIR` holds `images/*.jpg` and `texts.txt` (one text per line), as
//! written by `scripts/bench_reference.py inputs`. A batch of size b takes the
//! first b images (cycling). Every figure is the median over `--reps` timed
//! repetitions after `--warmup` untimed ones. Candle's CPU thread count follows
//! `RAYON_NUM_THREADS` (default: the physical cores).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::{json, Map, Value};
use vlembed::embedder::Embedder;
use vlembed::input::Input;
use vlembed::models::{CpuBackend, DeviceSpec, LoadOptions, ModelSource, Precision};
use vlembed::preprocess::Prepared;

#[derive(Parser)]
#[command(about = "Benchmark a vlembed model alone (no server)")]
struct Args {
    /// A local model directory in the Hub layout (or a Hub id).
    #[arg(long)]
    model: String,
    /// Folder with images/*.jpg and texts.txt.
    #[arg(long)]
    inputs: PathBuf,
    /// Comma-separated batch sizes.
    #[arg(long, default_value = "1,8,32")]
    batch_sizes: String,
    /// Comma-separated batch sizes of the text measurements (default: those
    /// of --batch-sizes).
    #[arg(long)]
    text_batch_sizes: Option<String>,
    /// Timed repetitions per measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Untimed warm-up repetitions before each measurement.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Repetitions of the one-short-text latency measurement.
    #[arg(long, default_value_t = 50)]
    text_latency_reps: usize,
    #[arg(long, default_value = "f32")]
    dtype: Precision,
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// What the CPU matrix products run on: auto, native or onednn.
    #[arg(long, env = "VLEMBED_CPU_BACKEND", default_value = "auto")]
    cpu_backend: CpuBackend,
    /// Skip image measurements (e.g. with a dtype whose image path fails on CPU).
    #[arg(long)]
    no_images: bool,
    /// Write the results as JSON here (else to stdout).
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Seconds of each phase over the timed repetitions.
#[derive(Default)]
struct Samples {
    total: Vec<f64>,
    forward: Vec<f64>,
    preprocess: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn summary(samples: &[f64], batch: usize) -> Value {
    let med = median(samples);
    let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
    let max = samples.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    json!({"batch": batch, "reps": samples.len(), "median_s": med, "min_s": min,
           "max_s": max, "per_s": batch as f64 / med})
}

fn load_inputs(dir: &Path) -> anyhow::Result<(Vec<Vec<u8>>, Vec<String>)> {
    let img_dir = dir.join("images");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&img_dir)
        .with_context(|| format!("cannot list {}", img_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jpg"))
        .collect();
    names.sort();
    let images = names
        .iter()
        .map(|p| std::fs::read(p).with_context(|| format!("cannot read {}", p.display())))
        .collect::<Result<Vec<_>, _>>()?;
    let texts_path = dir.join("texts.txt");
    let texts: Vec<String> = std::fs::read_to_string(&texts_path)
        .with_context(|| format!("cannot read {}", texts_path.display()))?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    if images.is_empty() || texts.is_empty() {
        bail!("no images or texts in {}", dir.display());
    }
    Ok((images, texts))
}

/// Runs `step` `warmup` times untimed, then `reps` times, collecting its phases.
fn measure(
    reps: usize,
    warmup: usize,
    mut step: impl FnMut() -> anyhow::Result<(f64, f64)>,
) -> anyhow::Result<Samples> {
    for _ in 0..warmup {
        step()?;
    }
    let mut s = Samples::default();
    for _ in 0..reps {
        let (pre, fwd) = step()?;
        s.preprocess.push(pre);
        s.forward.push(fwd);
        s.total.push(pre + fwd);
    }
    Ok(s)
}

/// Parses a comma-separated list of batch sizes (`flag` names it in errors).
fn parse_sizes(list: &str, flag: &str) -> anyhow::Result<Vec<usize>> {
    let sizes: Vec<usize> = list
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("{flag}: comma-separated positive integers"))?;
    if sizes.contains(&0) {
        bail!("{flag}: 0 is not a batch size");
    }
    Ok(sizes)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.reps == 0 {
        bail!("--reps must be at least 1");
    }
    let batch_sizes = parse_sizes(&args.batch_sizes, "--batch-sizes")?;
    let text_batch_sizes = match &args.text_batch_sizes {
        Some(s) => parse_sizes(s, "--text-batch-sizes")?,
        None => batch_sizes.clone(),
    };
    let (images, texts) = load_inputs(&args.inputs)?;

    let source = ModelSource::parse(&args.model, None);
    let opts = LoadOptions {
        dtype: args.dtype,
        cpu_backend: args.cpu_backend,
        ..Default::default()
    };
    let t0 = Instant::now();
    let embedder = Embedder::load(&source, args.device, &opts)
        .with_context(|| format!("cannot load {}", args.model))?;
    let load_s = t0.elapsed().as_secs_f64();
    let backend = embedder.loaded.cpu_backend().cloned();
    eprintln!(
        "vlembed: loaded {} in {load_s:.1} s ({} dims, {}), candle CPU threads {}, CPU backend {}",
        args.model,
        embedder.info().dimensions,
        args.dtype,
        candle_core::utils::get_num_threads(),
        backend
            .as_ref()
            .map_or("none".to_string(), |b| b.to_string()),
    );

    let mut res = Map::new();
    let mut image = Map::new();
    let mut image_forward = Map::new();
    let mut image_preprocess = Map::new();
    let mut text = Map::new();
    for &b in &batch_sizes {
        if !args.no_images {
            let batch: Vec<&Vec<u8>> = (0..b).map(|k| &images[k % images.len()]).collect();
            let s = measure(args.reps, args.warmup, || {
                // Copying the bytes into inputs is not timed (a server has them already).
                let inputs: Vec<Input> = batch.iter().map(|j| Input::image((*j).clone())).collect();
                let t_a = Instant::now();
                let prepared = inputs
                    .iter()
                    .map(|i| embedder.prepare(i, true))
                    .collect::<Result<Vec<Prepared>, _>>()?;
                let t_b = Instant::now();
                let refs: Vec<&Prepared> = prepared.iter().collect();
                let out = embedder.embed_prepared(&refs, true)?;
                let t_c = Instant::now();
                anyhow::ensure!(
                    out.len() == b,
                    "got {} embeddings for {b} inputs",
                    out.len()
                );
                Ok(((t_b - t_a).as_secs_f64(), (t_c - t_b).as_secs_f64()))
            })?;
            let key = b.to_string();
            image.insert(key.clone(), summary(&s.total, b));
            image_forward.insert(key.clone(), summary(&s.forward, b));
            image_preprocess.insert(key.clone(), summary(&s.preprocess, b));
            eprintln!(
                "vlembed {} images b={b}: {:.2}/s (forward only {:.2}/s, preprocessing {:.1} ms/image on one thread)",
                args.dtype,
                b as f64 / median(&s.total),
                b as f64 / median(&s.forward),
                median(&s.preprocess) * 1e3 / b as f64
            );
        }
    }
    for &b in &text_batch_sizes {
        let batch: Vec<Input> = (0..b)
            .map(|k| Input::text(texts[k % texts.len()].clone()))
            .collect();
        // Texts are cheap: more repetitions for a stable median.
        let s = measure(args.reps.max(5) * 2, args.warmup + 1, || {
            let t_a = Instant::now();
            let out = embedder.embed(&batch, true, true)?;
            anyhow::ensure!(
                out.len() == b,
                "got {} embeddings for {b} inputs",
                out.len()
            );
            Ok((0.0, t_a.elapsed().as_secs_f64()))
        })?;
        text.insert(b.to_string(), summary(&s.total, b));
        eprintln!(
            "vlembed {} texts b={b}: {:.1}/s",
            args.dtype,
            b as f64 / median(&s.total)
        );
    }
    res.insert("image".into(), Value::Object(image));
    res.insert("image_forward".into(), Value::Object(image_forward));
    res.insert("image_preprocess".into(), Value::Object(image_preprocess));
    res.insert("text".into(), Value::Object(text));

    let one = [Input::text(texts[0].clone())];
    let s = measure(args.text_latency_reps.max(1), 3, || {
        let t_a = Instant::now();
        embedder.embed(&one, true, true)?;
        Ok((0.0, t_a.elapsed().as_secs_f64()))
    })?;
    let min = s.total.iter().copied().fold(f64::INFINITY, f64::min);
    res.insert(
        "text_latency_ms".into(),
        json!({"p50": median(&s.total) * 1e3, "min": min * 1e3, "reps": s.total.len()}),
    );
    eprintln!(
        "vlembed {} one short text: {:.1} ms",
        args.dtype,
        median(&s.total) * 1e3
    );

    let doc = json!({
        "tool": "vlembed",
        "model": args.model,
        "device": args.device.to_string(),
        "threads": candle_core::utils::get_num_threads(),
        "rayon_num_threads_env": std::env::var("RAYON_NUM_THREADS").ok(),
        "load_s": load_s,
        "cpu_backend": backend,
        "reps": args.reps,
        "warmup": args.warmup,
        "precisions": { args.dtype.as_str(): Value::Object(res) },
    });
    let text = serde_json::to_string_pretty(&doc)?;
    match &args.json {
        Some(p) => std::fs::write(p, text + "\n")
            .with_context(|| format!("cannot write {}", p.display()))?,
        None => println!("{text}"),
    }
    Ok(())
}
