//! Small measurements quoted in README and BENCHMARKS (what one piece of
//! the request path costs), kept runnable instead of as ignored tests that
//! assert nothing:
//!
//! ```text
//! cargo run --release --example measure -- all
//! cargo run --release --example measure -- float-writing | tokenise-short | cache-key \
//!     | fingerprint-600mb | extreme-aspect
//! ```
//!
//! Each prints one or a few lines with the figure and what was measured.
//! Nothing here touches the network; `fingerprint-600mb` writes a 600 MiB
//! file under the temporary directory and removes it.

use std::time::Instant;

use vlembed::batching::CacheKey;
use vlembed::http::responses::Floats;
use vlembed::input::{Modality, Role};
use vlembed::models::clip::ClipInput;
use vlembed::models::fingerprint::file_sha256;
use vlembed::preprocess::clip_image::ClipImageProcessor;
use vlembed::preprocess::image::{decode_image, ImageLimits};
use vlembed::preprocess::text::TextTokenizer;
use vlembed::preprocess::{Pixels, Prepared};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// One measurement: its name on the command line and what runs it.
type Measurement = (&'static str, fn() -> Result<()>);

/// What writing floats as the shortest decimal of their f32, rather than of
/// the widened f64, saves in bytes and time (768 floats).
fn float_writing() -> Result<()> {
    let v: Vec<f32> = (0..768)
        .map(|i| ((i as f32) * 0.731).sin() / 27.7)
        .collect();
    let body = Floats(v.clone());
    let wide: Vec<f64> = v.iter().map(|&x| f64::from(x)).collect();
    let n = 2000;
    let t = Instant::now();
    let mut len32 = 0;
    for _ in 0..n {
        len32 = serde_json::to_vec(&body)?.len();
    }
    let f32_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    let t = Instant::now();
    let mut len64 = 0;
    for _ in 0..n {
        len64 = serde_json::to_vec(&wide)?.len();
    }
    let f64_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    println!(
        "float-writing: 768 floats: f32 shortest {len32} B in {f32_us:.1} us; widened f64 {len64} B in {f64_us:.1} us"
    );
    Ok(())
}

fn repo_file(rel: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// What tokenising one short query costs on the request's task.
fn tokenise_short() -> Result<()> {
    let path = repo_file("tests/fixtures/clip-tiny/tokenizer.json");
    let t = TextTokenizer::from_file(&path, 77)?;
    for text in [
        "a photo of a cat",
        "two people riding bicycles on a bridge at night",
    ] {
        let n = 20_000;
        let start = Instant::now();
        for _ in 0..n {
            std::hint::black_box(t.encode(text, true)?);
        }
        let us = start.elapsed().as_secs_f64() * 1e6 / n as f64;
        println!("tokenise-short: {text:?}: {us:.1} us per text");
    }
    Ok(())
}

/// The cost of one embedding-cache key over a CLIP image's tensor
/// (3x224x224 f32, 602 KB).
fn cache_key() -> Result<()> {
    let pixels = Pixels {
        data: (0..3 * 224 * 224).map(|i| i as f32 * 1e-3).collect(),
        tiles: 1,
        height: 224,
        width: 224,
    };
    let p = Prepared::new(Modality::Image, 0, 224, ClipInput::Image(pixels)).erase();
    let n = 200;
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(CacheKey::new("fp", &p, Role::Candidate, None));
    }
    let ms = t.elapsed().as_secs_f64() * 1e3 / n as f64;
    println!("cache-key: one key over 3x224x224 f32 (602 KB): {ms:.3} ms");
    Ok(())
}

/// The startup cost of hashing a 600 MiB weight file (BGE-VL-base's size).
fn fingerprint_600mb() -> Result<()> {
    use std::io::Write;
    let dir = std::env::temp_dir().join(format!("vlembed-fp-cost-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("model.safetensors");
    let mut f = std::fs::File::create(&path)?;
    let block: Vec<u8> = (0..1u32 << 20).map(|i| (i * 31 % 251) as u8).collect();
    for _ in 0..600 {
        f.write_all(&block)?;
    }
    drop(f);
    for round in 0..2 {
        let t = Instant::now();
        file_sha256(&path)?;
        let s = t.elapsed().as_secs_f64();
        println!(
            "fingerprint-600mb: round {round}: hashed 600 MiB in {s:.3} s ({:.2} GB/s)",
            600.0 * 1048576.0 / s / 1e9
        );
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Time and peak memory (VmHWM) of one 32768x1 PNG through the CLIP image
/// processor (the crop-only resize keeps it small).
fn extreme_aspect() -> Result<()> {
    let img = image::RgbImage::from_fn(32768, 1, |x, _| image::Rgb([(x % 251) as u8, 7, 9]));
    let mut png = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img).write_to(&mut png, image::ImageFormat::Png)?;
    let png = png.into_inner();
    let hwm = || {
        std::fs::read_to_string("/proc/self/status")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("VmHWM"))
            .unwrap_or("VmHWM: ?")
            .to_string()
    };
    let before = hwm();
    let started = Instant::now();
    let rgb = decode_image(&png, &ImageLimits::default())?.to_rgb8();
    let out = ClipImageProcessor::default().preprocess(&rgb);
    println!(
        "extreme-aspect: {} bytes PNG 32768x1 -> {} values: {:.3} s, peak RSS before {before}, after {}",
        png.len(),
        out.data.len(),
        started.elapsed().as_secs_f64(),
        hwm()
    );
    Ok(())
}

fn main() -> Result<()> {
    let which = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    let all: [Measurement; 5] = [
        ("float-writing", float_writing),
        ("tokenise-short", tokenise_short),
        ("cache-key", cache_key),
        ("fingerprint-600mb", fingerprint_600mb),
        ("extreme-aspect", extreme_aspect),
    ];
    let mut ran = false;
    for (name, f) in all {
        if which == "all" || which == name {
            f()?;
            ran = true;
        }
    }
    if !ran {
        let names: Vec<&str> = all.iter().map(|(n, _)| *n).collect();
        return Err(format!(
            "unknown measurement {which:?}; one of: all, {}",
            names.join(", ")
        )
        .into());
    }
    Ok(())
}
