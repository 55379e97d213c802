//! Which implementation runs the matrix products of the fast CPU encoders:
//! the native kernels of this crate or oneDNN (the `onednn` build
//! feature), as configured (`cpu_backend`) and, for `auto`, as measured.
//!
//! Owns the setting ([`CpuBackend`]), the outcome ([`BackendChoice`]) and
//! the calibration `auto` runs at load: one encoder layer's products of
//! the model's real shapes ([`MatmulShape`]: an image group, a text batch,
//! one short text), on both backends in turn, each product followed by a
//! native pass over its output as in a real layer, timed. It builds
//! [`Linear`]s but touches no model or file, and no thread pool's settings.
//!
//! Why a measurement and not a rule on CPU features: what wins depends on
//! the CPU in ways its flags do not tell (with AMX, oneDNN's bf16 runs on
//! the tiles at several times the native kernels' speed; on AMD Zen 4 the
//! native kernels, tuned there, are as fast or faster; in f32 on an Intel
//! Xeon the two are close), on the dtype and on the model's shapes. The
//! measurement is made robust by taking each backend's best of several
//! alternated rounds (a burst of other load slows a round, never speeds
//! one) and by keeping the native kernels unless oneDNN is clearly faster
//! overall ([`ONEDNN_MIN_SPEEDUP`]) and not clearly slower on any class of
//! rows ([`ONEDNN_MAX_SLOWDOWN`]): a near tie never flips between two
//! loads, and a win on images does not buy a loss on queries. Products too
//! small to time (a tiny test model) stay native, and a process decides
//! once per dtype and shapes, so two models of the same shapes compute the
//! same vectors.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use serde::Serialize;

use super::{quick_gelu_in_place, Linear};

/// The `cpu_backend` setting: `auto`, `native` or `onednn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuBackend {
    /// Measure both at load and keep the faster (native when oneDNN is
    /// absent).
    #[default]
    Auto,
    /// The native kernels.
    Native,
    /// oneDNN; loading fails when this build or machine cannot run it.
    Onednn,
}

impl CpuBackend {
    pub fn as_str(self) -> &'static str {
        match self {
            CpuBackend::Auto => "auto",
            CpuBackend::Native => "native",
            CpuBackend::Onednn => "onednn",
        }
    }
}

impl fmt::Display for CpuBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `cpu_backend` value that is not one of the three.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown CPU backend {0:?}: expected auto, native or onednn")]
pub struct ParseCpuBackendError(String);

impl FromStr for CpuBackend {
    type Err = ParseCpuBackendError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(CpuBackend::Auto),
            "native" => Ok(CpuBackend::Native),
            "onednn" | "dnnl" => Ok(CpuBackend::Onednn),
            _ => Err(ParseCpuBackendError(s.to_string())),
        }
    }
}

impl<'de> serde::Deserialize<'de> for CpuBackend {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// The implementation a model's CPU replicas run their products on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Native,
    Onednn,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Native => "native",
            Backend::Onednn => "onednn",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a model's CPU replicas run on, and why (the startup log, `/info`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BackendChoice {
    pub backend: Backend,
    /// The setting it came from.
    pub requested: CpuBackend,
    /// How it was decided, in words.
    pub reason: String,
    /// The linked oneDNN and its instruction set, when it can be used.
    pub onednn: Option<String>,
    /// `auto`'s measurement: milliseconds of one layer's products, the
    /// best of its rounds, per backend.
    pub native_ms: Option<f64>,
    pub onednn_ms: Option<f64>,
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}: {})", self.backend, self.requested, self.reason)
    }
}

/// Why the configured backend cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(
        "cpu_backend is \"onednn\" but this build has no oneDNN \
         (build with --features onednn, with Debian's libdnnl-dev installed)"
    )]
    NotBuilt,
    #[error("cpu_backend is \"onednn\" but oneDNN cannot run here: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// One matrix product a model's fast encoder computes per layer: `rows x k`
/// by `k x n` (rows: a typical batch's, e.g. a group of images' tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MatmulShape {
    pub rows: usize,
    pub k: usize,
    pub n: usize,
}

impl MatmulShape {
    /// The four products of a transformer layer of width `hidden` with an
    /// MLP of `intermediate` over `rows` rows: fused Q/K/V, attention
    /// output, MLP up and down.
    pub fn layer(rows: usize, hidden: usize, intermediate: usize) -> [MatmulShape; 4] {
        let s = |k, n| MatmulShape { rows, k, n };
        [
            s(hidden, 3 * hidden),
            s(hidden, hidden),
            s(hidden, intermediate),
            s(intermediate, hidden),
        ]
    }
}

/// `auto` picks oneDNN only when it runs the products at least this many
/// times faster than the native kernels...
pub const ONEDNN_MIN_SPEEDUP: f64 = 1.1;

/// ...and is nowhere (no class of rows: an image group, a text batch, one
/// text) slower than this many times the native kernels' speed.
pub const ONEDNN_MAX_SLOWDOWN: f64 = 0.9;

/// Timed rounds per backend (after one untimed round).
const ROUNDS: usize = 3;

/// Below this many floating-point operations per layer (a tiny test model;
/// BGE-VL-base's image group alone is 11 GFLOP) timings are noise and fixed
/// costs: `auto` keeps native without measuring, whatever the build.
const MIN_FLOP: f64 = 1e8;

/// `auto`'s decisions in this process, by dtype and shapes: a second model
/// or replica of the same shapes gets the same backend (and so the same
/// vectors, bit for bit) without measuring again.
fn decided() -> &'static Mutex<Decisions> {
    static DECIDED: OnceLock<Mutex<Decisions>> = OnceLock::new();
    DECIDED.get_or_init(Default::default)
}

/// `auto`'s choices by (bf16, shapes).
type Decisions = HashMap<(bool, Vec<MatmulShape>), BackendChoice>;

/// The linked oneDNN, or why it cannot be used.
fn onednn() -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    #[cfg(feature = "onednn")]
    {
        super::onednn::info()
            .map(|i| i.to_string())
            .map_err(|e| e.into())
    }
    #[cfg(not(feature = "onednn"))]
    {
        Err("this build has no oneDNN (the `onednn` feature)".into())
    }
}

/// Resolves `requested` for a model whose fast layers compute `shapes`
/// (in bf16 with `bf16`). `auto` never fails: without oneDNN, or when
/// oneDNN fails while measured, it keeps the native kernels and says why.
pub fn resolve(
    requested: CpuBackend,
    bf16: bool,
    shapes: &[MatmulShape],
) -> Result<BackendChoice, BackendError> {
    let choice = |backend, reason: String, onednn| BackendChoice {
        backend,
        requested,
        reason,
        onednn,
        native_ms: None,
        onednn_ms: None,
    };
    match requested {
        CpuBackend::Native => Ok(choice(Backend::Native, "as configured".into(), None)),
        CpuBackend::Onednn => {
            if !cfg!(feature = "onednn") {
                return Err(BackendError::NotBuilt);
            }
            let info = onednn().map_err(BackendError::Unavailable)?;
            Ok(choice(Backend::Onednn, "as configured".into(), Some(info)))
        }
        CpuBackend::Auto => {
            let info = match onednn() {
                Ok(i) => i,
                Err(e) => return Ok(choice(Backend::Native, format!("no oneDNN: {e}"), None)),
            };
            if shapes.is_empty() {
                return Ok(choice(
                    Backend::Native,
                    "no product to measure".into(),
                    Some(info),
                ));
            }
            let flop: f64 = shapes
                .iter()
                .map(|s| 2.0 * (s.rows * s.k * s.n) as f64)
                .sum();
            if flop < MIN_FLOP {
                return Ok(choice(
                    Backend::Native,
                    format!(
                        "products too small to tell ({:.1} MFLOP per layer)",
                        flop / 1e6
                    ),
                    Some(info),
                ));
            }
            let key = (bf16, shapes.to_vec());
            let known = decided()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key)
                .cloned();
            if let Some(c) = known {
                return Ok(c);
            }
            let t = match calibrate(bf16, shapes) {
                Ok(t) => t,
                Err(e) => {
                    return Ok(choice(
                        Backend::Native,
                        format!("oneDNN failed while measured: {e}"),
                        Some(info),
                    ))
                }
            };
            let (native, onednn) = (t.native(), t.onednn());
            let (backend, verdict) = if native < ONEDNN_MIN_SPEEDUP * onednn {
                (
                    Backend::Native,
                    if onednn < native {
                        "oneDNN not faster by the margin"
                    } else {
                        "native faster"
                    },
                )
            } else if t.worst_speedup() < ONEDNN_MAX_SLOWDOWN {
                (
                    Backend::Native,
                    "oneDNN faster overall but slower on a class",
                )
            } else {
                (Backend::Onednn, "oneDNN faster")
            };
            let c = BackendChoice {
                backend,
                requested,
                reason: format!(
                    "measured {} per layer: native {native:.1} ms, oneDNN {onednn:.1} ms \
                     (by rows, native/oneDNN ms: {}); {verdict}",
                    if bf16 { "bf16" } else { "f32" },
                    t.describe()
                ),
                onednn: Some(info),
                native_ms: Some(native),
                onednn_ms: Some(onednn),
            };
            decided()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(key)
                .or_insert(c.clone());
            Ok(c)
        }
    }
}

/// Deterministic values in [-0.5, 0.5) (the speed of a product does not
/// depend on them; they only must not be denormal).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// What [`calibrate`] measured: per class of products (those with the same
/// rows: an image group, a text batch, one text), milliseconds of one pass
/// on each backend, each the best of [`ROUNDS`] rounds.
struct Timings {
    /// (rows, native ms, oneDNN ms), by rows.
    classes: Vec<(usize, f64, f64)>,
}

impl Timings {
    fn native(&self) -> f64 {
        self.classes.iter().map(|c| c.1).sum()
    }

    fn onednn(&self) -> f64 {
        self.classes.iter().map(|c| c.2).sum()
    }

    /// oneDNN's worst speedup over the classes (below 1: slower there).
    fn worst_speedup(&self) -> f64 {
        self.classes
            .iter()
            .map(|c| c.1 / c.2)
            .fold(f64::INFINITY, f64::min)
    }

    fn describe(&self) -> String {
        self.classes
            .iter()
            .map(|(rows, n, o)| format!("{rows} rows {n:.1}/{o:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Times one pass over `shapes` on each backend, the backends alternating
/// round by round. Each product is followed by a pass of quick-GELU over its
/// output on rayon's pool, as in a real layer (a product's output goes to
/// the native kernels next): so the hand-over between oneDNN's OpenMP
/// threads and rayon's, which costs little when OpenMP's threads sleep at
/// once and a lot when they spin, is part of what is measured.
fn calibrate(bf16: bool, shapes: &[MatmulShape]) -> candle_core::Result<Timings> {
    struct Case {
        rows: usize,
        x: Vec<f32>,
        y: Vec<f32>,
        native: Linear,
        onednn: Linear,
    }
    let mut cases = Vec::with_capacity(shapes.len());
    for (i, s) in shapes.iter().enumerate() {
        let w = values(s.k * s.n, 2 * i as u64 + 1);
        let b = values(s.n, 2 * i as u64 + 2);
        let lin = Linear::new(w, Some(b), s.k, s.n)?;
        cases.push(Case {
            rows: s.rows,
            x: values(s.rows * s.k, 7),
            y: vec![0.0; s.rows * s.n],
            onednn: lin.clone().into_backend(Backend::Onednn, bf16)?,
            native: lin.into_backend(Backend::Native, bf16)?,
        });
    }
    let mut rows: Vec<usize> = cases.iter().map(|c| c.rows).collect();
    rows.sort_unstable();
    rows.dedup();
    // Milliseconds per class (in `rows` order) of one pass on one backend.
    let mut pass = |onednn: bool| -> candle_core::Result<Vec<f64>> {
        let mut ms = vec![0.0; rows.len()];
        for c in &mut cases {
            let lin = if onednn { &c.onednn } else { &c.native };
            let start = Instant::now();
            lin.forward_into(&c.x, c.rows, &mut c.y, false)?;
            quick_gelu_in_place(&mut c.y);
            let class = rows.partition_point(|&r| r < c.rows);
            ms[class] += start.elapsed().as_secs_f64() * 1e3;
        }
        Ok(ms)
    };
    // Untimed: compiles oneDNN's kernels, touches every page.
    pass(false)?;
    pass(true)?;
    let mut native = vec![f64::INFINITY; rows.len()];
    let mut onednn = native.clone();
    for round in 0..ROUNDS {
        // Alternate which goes first, so neither always follows the other.
        let first = round % 2 == 1;
        let a = pass(first)?;
        let b = pass(!first)?;
        let (n, o) = if first { (b, a) } else { (a, b) };
        for i in 0..rows.len() {
            native[i] = native[i].min(n[i]);
            onednn[i] = onednn[i].min(o[i]);
        }
    }
    Ok(Timings {
        classes: (0..rows.len())
            .map(|i| (rows[i], native[i], onednn[i]))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_settings_with_a_typed_error() {
        assert_eq!("auto".parse::<CpuBackend>(), Ok(CpuBackend::Auto));
        assert_eq!(" Native ".parse::<CpuBackend>(), Ok(CpuBackend::Native));
        assert_eq!("oneDNN".parse::<CpuBackend>(), Ok(CpuBackend::Onednn));
        let err = "mkl".parse::<CpuBackend>().unwrap_err();
        assert_eq!(err, ParseCpuBackendError("mkl".into()));
        assert!(err.to_string().contains("auto, native or onednn"), "{err}");
        for b in [CpuBackend::Auto, CpuBackend::Native, CpuBackend::Onednn] {
            assert_eq!(b.to_string().parse::<CpuBackend>(), Ok(b));
        }
    }

    #[test]
    fn native_is_native_and_onednn_needs_the_library() {
        let c = resolve(CpuBackend::Native, false, &[]).unwrap();
        assert_eq!(
            (c.backend, c.requested),
            (Backend::Native, CpuBackend::Native)
        );
        let r = resolve(CpuBackend::Onednn, true, &[]);
        if cfg!(feature = "onednn") {
            let c = r.expect("oneDNN is built and runs here");
            assert_eq!(c.backend, Backend::Onednn);
            assert!(c.onednn.is_some_and(|i| i.starts_with("oneDNN 2.")));
        } else {
            let err = r.unwrap_err();
            assert!(matches!(err, BackendError::NotBuilt), "{err}");
            assert!(err.to_string().contains("--features onednn"), "{err}");
        }
    }

    /// `auto` decides, says why, and reports both timings when it measured.
    #[test]
    fn auto_measures_when_it_can_and_falls_back_when_it_cannot() {
        // 0.16 GFLOP: measured (a tiny model is not, see below).
        let mut shapes = MatmulShape::layer(400, 128, 512).to_vec();
        shapes.extend(MatmulShape::layer(3, 128, 512));
        for bf16 in [false, true] {
            let c = resolve(CpuBackend::Auto, bf16, &shapes).unwrap();
            assert_eq!(c.requested, CpuBackend::Auto);
            if cfg!(feature = "onednn") {
                let (n, o) = (c.native_ms.unwrap(), c.onednn_ms.unwrap());
                assert!(n > 0.0 && o > 0.0, "{c}");
                if n < ONEDNN_MIN_SPEEDUP * o {
                    assert_eq!(c.backend, Backend::Native, "{c}");
                }
                // Decided once per dtype and shapes in a process.
                assert_eq!(resolve(CpuBackend::Auto, bf16, &shapes).unwrap(), c);
                if c.backend == Backend::Onednn {
                    assert!(c.reason.ends_with("oneDNN faster"), "{c}");
                }
                assert!(c.reason.starts_with("measured"), "{c}");
            } else {
                assert_eq!(c.backend, Backend::Native);
                assert!(c.reason.contains("no oneDNN"), "{c}");
                assert_eq!(c.native_ms, None);
            }
        }
        let none = resolve(CpuBackend::Auto, false, &[]).unwrap();
        assert_eq!(none.backend, Backend::Native);
        let tiny = resolve(CpuBackend::Auto, false, &MatmulShape::layer(50, 32, 64)).unwrap();
        assert_eq!(tiny.backend, Backend::Native);
        assert_eq!(tiny.native_ms, None, "{tiny}");
    }
}
