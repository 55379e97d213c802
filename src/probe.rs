//! Startup probes and golden vectors: a few built-in inputs every model
//! embeds when it loads, so a change of its vectors (new weights, a changed
//! kernel, another dtype or device) shows in the log, and, when the user
//! gives a golden file, stops readiness.
//!
//! Owns the probe inputs (a text, a synthetic image generated here, and for
//! models that read instructions a composed query with one), embedding them
//! one at a time through a caller's function (the server's first replica,
//! or the CLI's [`crate::embedder::Embedder`]), their digests, the golden
//! file's format ([`GoldenFile`], written by `vlembed probe`) and the
//! comparison. It knows nothing of HTTP or queues.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::input::{Content, Input, Role};
use crate::models::ModelError;
use crate::preprocess::image::ImageLimits;
use crate::preprocess::{Prepared, PreprocessError, Preprocessor};
use crate::vector::l2_normalize;

/// The golden file format's version.
pub const GOLDEN_VERSION: u32 = 1;

/// The tolerance `vlembed probe` writes unless told otherwise: the largest
/// difference of one component of the normalised vectors. Same build, device
/// and dtype give identical vectors; f32 on another CPU differs ~1e-6.
pub const DEFAULT_TOLERANCE: f32 = 1e-4;

/// One built-in probe input.
#[derive(Debug, Clone)]
pub struct Probe {
    pub name: &'static str,
    /// What it is, for the golden file's readers.
    pub description: &'static str,
    pub input: Input,
}

/// Width and height of the synthetic probe image.
pub const PROBE_IMAGE_SIZE: (u32, u32) = (64, 48);

/// A small RGB gradient image (PNG), generated in code: no file, no network.
pub fn synthetic_image() -> Vec<u8> {
    let (w, h) = PROBE_IMAGE_SIZE;
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 255 / (w - 1)) as u8,
            (y * 255 / (h - 1)) as u8,
            ((x + y) * 3 % 256) as u8,
        ])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    // Encoding a small in-memory RGB image as PNG does not fail; an empty
    // result would fail the probe with a clear "undecodable image" instead.
    let _ = image::DynamicImage::ImageRgb8(img).write_to(&mut out, image::ImageFormat::Png);
    out.into_inner()
}

/// The probes a model runs: a text and an image, and for models that read
/// instructions (BGE-VL-MLLM) a composed query with an instruction.
pub fn probes(uses_instructions: bool) -> Vec<Probe> {
    let mut out = vec![
        Probe {
            name: "text",
            description: "text \"a photo of a cat sitting on a red sofa\" (candidate)",
            input: Input::text("a photo of a cat sitting on a red sofa"),
        },
        Probe {
            name: "image",
            description: "synthetic 64x48 RGB gradient PNG (candidate)",
            input: Input::image(synthetic_image()),
        },
    ];
    if uses_instructions {
        out.push(Probe {
            name: "composed_query",
            description: "synthetic image + text \"make it blue\", instruction \"Retrieve the target image\" (query)",
            input: Input::new(Content::Composed {
                text: "make it blue".into(),
                image: synthetic_image(),
            })
            .with_role(Role::Query)
            .with_instruction(Some("Retrieve the target image".into())),
        });
    }
    out
}

/// Why the probes could not run.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("startup probe {name}: {source}")]
    Preprocess {
        name: &'static str,
        #[source]
        source: PreprocessError,
    },
    #[error("startup probe {name}: {source}")]
    Model {
        name: &'static str,
        #[source]
        source: ModelError,
    },
    #[error("startup probe {name}: the model returned {got} vectors for one input")]
    Count { name: &'static str, got: usize },
    #[error("cannot read the golden vectors {path}: {source}")]
    ReadGolden {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid golden vectors file {path}: {message}")]
    InvalidGolden { path: String, message: String },
}

/// The probes of a model, preprocessed. The probe image is decoded under the
/// default image limits, not the model's configured ones: an operator who
/// limits clients' images below the probe's 64x48 must still get a model.
pub fn prepare(
    pre: &dyn Preprocessor,
    uses_instructions: bool,
) -> Result<Vec<(Probe, Prepared)>, ProbeError> {
    let pre = pre.with_image_limits(ImageLimits::default());
    probes(uses_instructions)
        .into_iter()
        .map(|p| {
            let prepared =
                pre.prepare(&p.input, true)
                    .map_err(|source| ProbeError::Preprocess {
                        name: p.name,
                        source,
                    })?;
            Ok((p, prepared))
        })
        .collect()
}

/// One probe's result: its normalised vector and digest.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeResult {
    pub name: &'static str,
    pub description: &'static str,
    pub embedding: Vec<f32>,
    pub digest: String,
}

/// `sha256:` and 12 hex digits over the vector's f32 values (little-endian
/// bits): equal digests, identical vectors.
pub fn digest(v: &[f32]) -> String {
    let mut h = Sha256::new();
    for x in v {
        h.update(x.to_le_bytes());
    }
    let full = h.finalize();
    let hex: String = full.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Embeds every prepared probe alone (a batch of one) with `embed`, which
/// returns unnormalised vectors; results are L2-normalised.
pub fn embed(
    prepared: &[(Probe, Prepared)],
    mut embed: impl FnMut(&Prepared) -> Result<Vec<Vec<f32>>, ModelError>,
) -> Result<Vec<ProbeResult>, ProbeError> {
    prepared
        .iter()
        .map(|(probe, p)| {
            let mut out = embed(p).map_err(|source| ProbeError::Model {
                name: probe.name,
                source,
            })?;
            if out.len() != 1 {
                return Err(ProbeError::Count {
                    name: probe.name,
                    got: out.len(),
                });
            }
            let mut v = out.remove(0);
            l2_normalize(&mut v);
            Ok(ProbeResult {
                name: probe.name,
                description: probe.description,
                digest: digest(&v),
                embedding: v,
            })
        })
        .collect()
}

/// A golden-vectors file: what `vlembed probe --out` writes and
/// `golden_vectors` reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoldenFile {
    pub version: u32,
    /// The model as it was given to `vlembed probe` (informational).
    pub model: String,
    /// The fingerprint of the model that wrote it (short and full). A
    /// different fingerprint is logged; only the vectors decide readiness.
    pub fingerprint: String,
    pub fingerprint_sha256: String,
    /// Largest allowed difference of one component of a normalised vector.
    pub tolerance: f32,
    pub probes: Vec<GoldenProbe>,
}

/// One probe's expected vector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoldenProbe {
    pub name: String,
    pub input: String,
    pub digest: String,
    /// The L2-normalised vector.
    pub embedding: Vec<f32>,
}

impl GoldenFile {
    /// The golden file of `results`.
    pub fn new(
        model: &str,
        fingerprint: &crate::models::Fingerprint,
        tolerance: f32,
        results: &[ProbeResult],
    ) -> Self {
        GoldenFile {
            version: GOLDEN_VERSION,
            model: model.to_string(),
            fingerprint: fingerprint.id.clone(),
            fingerprint_sha256: fingerprint.sha256.clone(),
            tolerance,
            probes: results
                .iter()
                .map(|r| GoldenProbe {
                    name: r.name.to_string(),
                    input: r.description.to_string(),
                    digest: r.digest.clone(),
                    embedding: r.embedding.clone(),
                })
                .collect(),
        }
    }

    /// Reads and checks a golden file.
    pub fn read(path: &Path) -> Result<Self, ProbeError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ProbeError::ReadGolden {
            path: shown.clone(),
            source,
        })?;
        let invalid = |message: String| ProbeError::InvalidGolden {
            path: shown.clone(),
            message,
        };
        let g: GoldenFile = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        if g.version != GOLDEN_VERSION {
            return Err(invalid(format!(
                "version {} (this server reads version {GOLDEN_VERSION})",
                g.version
            )));
        }
        if !(g.tolerance.is_finite() && g.tolerance >= 0.0) {
            return Err(invalid(format!(
                "tolerance {} is not a finite number >= 0",
                g.tolerance
            )));
        }
        if g.probes.is_empty() {
            return Err(invalid("no probes".into()));
        }
        Ok(g)
    }

    /// Compares `results` with the golden vectors: every golden probe must
    /// have been run, with the same width, every component within the
    /// tolerance.
    pub fn compare(&self, results: &[ProbeResult]) -> Comparison {
        let mut probes = Vec::new();
        let mut problems = Vec::new();
        for g in &self.probes {
            let Some(r) = results.iter().find(|r| r.name == g.name) else {
                problems.push(format!("probe {} is not run by this model", g.name));
                continue;
            };
            if r.embedding.len() != g.embedding.len() {
                problems.push(format!(
                    "probe {}: {} dimensions, the golden vector has {}",
                    g.name,
                    r.embedding.len(),
                    g.embedding.len()
                ));
                continue;
            }
            let diff = r
                .embedding
                .iter()
                .zip(&g.embedding)
                .map(|(a, b)| (a - b).abs())
                .fold(
                    0.0f32,
                    |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
                );
            if diff > self.tolerance {
                problems.push(format!(
                    "probe {}: max |difference| {diff:.3e} over the tolerance {:.3e}",
                    g.name, self.tolerance
                ));
            }
            probes.push((g.name.clone(), diff));
        }
        Comparison {
            max_abs_diff: probes,
            drift: (!problems.is_empty()).then(|| problems.join("; ")),
        }
    }
}

/// The outcome of [`GoldenFile::compare`].
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// Each compared probe's largest component difference.
    pub max_abs_diff: Vec<(String, f32)>,
    /// Why the vectors drifted, when they did.
    pub drift: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(name: &'static str, v: Vec<f32>) -> ProbeResult {
        ProbeResult {
            name,
            description: "",
            digest: digest(&v),
            embedding: v,
        }
    }

    fn golden(tolerance: f32, probes: &[(&str, Vec<f32>)]) -> GoldenFile {
        GoldenFile {
            version: GOLDEN_VERSION,
            model: "m".into(),
            fingerprint: "sha256:x".into(),
            fingerprint_sha256: "x".into(),
            tolerance,
            probes: probes
                .iter()
                .map(|(n, v)| GoldenProbe {
                    name: n.to_string(),
                    input: String::new(),
                    digest: digest(v),
                    embedding: v.clone(),
                })
                .collect(),
        }
    }

    #[test]
    fn within_tolerance_matches_beyond_drifts() {
        let g = golden(1e-3, &[("text", vec![0.6, 0.8]), ("image", vec![1.0, 0.0])]);
        let ok = g.compare(&[
            result("text", vec![0.6005, 0.8]),
            result("image", vec![1.0, 0.0]),
        ]);
        assert_eq!(ok.drift, None, "{ok:?}");
        let bad = g.compare(&[
            result("text", vec![0.61, 0.8]),
            result("image", vec![1.0, 0.0]),
        ]);
        let why = bad.drift.unwrap();
        assert!(
            why.contains("probe text") && why.contains("tolerance"),
            "{why}"
        );
        let missing = g.compare(&[result("text", vec![0.6, 0.8])]);
        assert!(missing.drift.unwrap().contains("image is not run"));
        let width = g.compare(&[result("text", vec![0.6]), result("image", vec![1.0, 0.0])]);
        assert!(width.drift.unwrap().contains("dimensions"));
        let nan = g.compare(&[
            result("text", vec![f32::NAN, 0.8]),
            result("image", vec![1.0, 0.0]),
        ]);
        assert!(nan.drift.is_some(), "NaN never matches");
    }

    #[test]
    fn digests_and_synthetic_image_are_stable() {
        assert_eq!(digest(&[1.0, 2.0]), digest(&[1.0, 2.0]));
        assert_ne!(digest(&[1.0, 2.0]), digest(&[1.0, 2.000001]));
        assert_eq!(digest(&[]).len(), "sha256:".len() + 12);
        let a = synthetic_image();
        assert_eq!(a, synthetic_image());
        let img = image::load_from_memory(&a).unwrap();
        assert_eq!((img.width(), img.height()), PROBE_IMAGE_SIZE);
        assert_eq!(probes(false).len(), 2);
        assert_eq!(probes(true).len(), 3);
    }

    #[test]
    fn golden_files_round_trip_and_are_checked() {
        let dir = std::env::temp_dir().join(format!("vlembed-golden-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("g.json");
        let g = golden(1e-4, &[("text", vec![0.6, 0.8])]);
        std::fs::write(&path, serde_json::to_string(&g).unwrap()).unwrap();
        assert_eq!(GoldenFile::read(&path).unwrap(), g);
        let mut bad = g.clone();
        bad.tolerance = -1.0;
        std::fs::write(&path, serde_json::to_string(&bad).unwrap()).unwrap();
        assert!(GoldenFile::read(&path)
            .unwrap_err()
            .to_string()
            .contains("tolerance"));
        std::fs::write(&path, "{").unwrap();
        assert!(matches!(
            GoldenFile::read(&path),
            Err(ProbeError::InvalidGolden { .. })
        ));
        assert!(matches!(
            GoldenFile::read(&dir.join("none.json")),
            Err(ProbeError::ReadGolden { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
