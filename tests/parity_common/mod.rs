//! Helpers shared by the parity tests (`parity_clip.rs`, `parity_mllm.rs`):
//! fixture paths, model loading and comparisons of float vectors.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use serde_json::Value;
use vlembed::embedder::Embedder;
use vlembed::models::{DeviceSpec, LoadOptions, ModelSource};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// A reference file of `tests/fixtures/reference/`.
pub fn reference(name: &str) -> Value {
    read_json(&root().join("tests/fixtures/reference").join(name))
}

/// Loads a model directory on the CPU in f32.
pub fn load_dir(dir: &Path) -> Embedder {
    let src = ModelSource::parse(dir.to_str().unwrap(), None);
    let t = std::time::Instant::now();
    let e = Embedder::load(&src, DeviceSpec::Cpu, &LoadOptions::default()).unwrap();
    eprintln!("loaded {} in {:.2?}", dir.display(), t.elapsed());
    e
}

/// Loads a fixture model of `tests/fixtures/`.
pub fn load(model: &str) -> Embedder {
    load_dir(&root().join("tests/fixtures").join(model))
}

pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}
