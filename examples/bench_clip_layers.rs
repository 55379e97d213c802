//! Times the CLIP towers alone (no preprocessing, no HTTP): batches of
//! 1/8/32 synthetic images and texts through [`ClipModel`] on the CPU, with
//! process CPU time beside wall time.
//!
//! ```sh
//! VLEMBED_PARITY_MODEL=DIR cargo run --release --example bench_clip_layers
//! ```
//!
//! `VLEMBED_BENCH=images|texts` runs one kind; `VLEMBED_BENCH_BATCHES=1,8`
//! picks the batch sizes; `VLEMBED_BENCH_DTYPE=bf16` times the bf16 model
//! and prints its worst cosine against f32. `VLEMBED_CLIP_KERNELS=candle`
//! times the plain candle path.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use vlembed::models::clip::{ClipConfig, ClipModel};

fn main() {
    let Some(dir) = std::env::var_os("VLEMBED_PARITY_MODEL") else {
        eprintln!("set VLEMBED_PARITY_MODEL to a full-size CLIP model directory");
        std::process::exit(2);
    };
    let dir = std::path::PathBuf::from(dir);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let cfg = ClipConfig::from_json(&cfg).unwrap();
    // SAFETY: the file is not modified while mapped.
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
    }
    .unwrap();
    let model = ClipModel::new(&cfg, vb.clone()).unwrap();
    // With VLEMBED_BENCH_DTYPE=bf16: time the bf16 model and print its
    // worst cosine against f32.
    let f32_model = match std::env::var("VLEMBED_BENCH_DTYPE").as_deref() {
        Ok("bf16") => {
            let f = ClipModel::new(&cfg, vb.clone()).unwrap();
            let model = ClipModel::new(&cfg, vb.set_dtype(DType::BF16)).unwrap();
            Some((f, model))
        }
        _ => None,
    };
    let (model, reference) = match f32_model {
        Some((f, b)) => (b, Some(f)),
        None => (model, None),
    };
    let kind = std::env::var("VLEMBED_BENCH").unwrap_or_default();
    let batches: Vec<usize> = std::env::var("VLEMBED_BENCH_BATCHES")
        .unwrap_or_else(|_| "1,8,32".into())
        .split(',')
        .map(|b| b.parse().unwrap())
        .collect();
    let s = cfg.vision_config.image_size;
    let img: Vec<f32> = (0..3 * s * s)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let text: Vec<u32> = [49406, 320, 1125, 539, 320, 2368, 525, 320, 8891, 49407].to_vec();
    if let Some(r) = &reference {
        let cos = |a: Tensor, b: Tensor| -> f64 {
            let (a, b): (Vec<Vec<f32>>, Vec<Vec<f32>>) =
                (a.to_vec2().unwrap(), b.to_vec2().unwrap());
            a.iter()
                .zip(&b)
                .map(|(x, y)| {
                    let d: f64 = x.iter().zip(y).map(|(p, q)| (p * q) as f64).sum();
                    let nx: f64 = x.iter().map(|p| (p * p) as f64).sum::<f64>().sqrt();
                    let ny: f64 = y.iter().map(|p| (p * p) as f64).sum::<f64>().sqrt();
                    d / (nx * ny)
                })
                .fold(1.0, f64::min)
        };
        let imgs: Vec<Vec<f32>> = (0..4)
            .map(|j| {
                (0..3 * s * s)
                    .map(|i| (((i + 31 * j) * 7919 % 1000) as f32) / 500.0 - 1.0)
                    .collect()
            })
            .collect();
        let imgs: Vec<&[f32]> = imgs.iter().map(|v| v.as_slice()).collect();
        let texts: Vec<Vec<u32>> = (0..4u32)
            .map(|j| vec![49406, 320 + j, 1125, 539 + 7 * j, 2368, 49407])
            .collect();
        let texts: Vec<&[u32]> = texts.iter().map(|v| v.as_slice()).collect();
        eprintln!(
            "bf16 vs f32: worst image cosine {:.7}, worst text cosine {:.7}",
            cos(
                model.embed_pixels(&imgs).unwrap(),
                r.embed_pixels(&imgs).unwrap()
            ),
            cos(
                model.embed_texts(&texts).unwrap(),
                r.embed_texts(&texts).unwrap()
            )
        );
    }
    // Process CPU time in ms (utime + stime, 100 ticks/s): on a shared
    // machine steadier than wall time.
    let cpu_ms = || -> f64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let f: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split(' ').collect();
        let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        (t(12) + t(13)) * 10.0
    };
    let time = |f: &dyn Fn()| {
        f();
        let c0 = cpu_ms();
        let wall = (0..3)
            .map(|_| {
                let t = std::time::Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            })
            .fold(f64::MAX, f64::min);
        eprint!("[cpu {:.0} ms/run] ", (cpu_ms() - c0) / 3.0);
        wall
    };
    for &b in &batches {
        if kind != "texts" {
            let imgs: Vec<&[f32]> = (0..b).map(|_| img.as_slice()).collect();
            let ms = time(&|| {
                model.embed_pixels(&imgs).unwrap();
            });
            eprintln!(
                "images x{b}: {ms:.1} ms ({:.2} images/s)",
                b as f64 * 1e3 / ms
            );
        }
        if kind != "images" {
            let texts: Vec<&[u32]> = (0..b).map(|_| text.as_slice()).collect();
            let ms = time(&|| {
                model.embed_texts(&texts).unwrap();
            });
            eprintln!(
                "texts x{b}: {ms:.1} ms ({:.1} texts/s)",
                b as f64 * 1e3 / ms
            );
        }
    }
}
