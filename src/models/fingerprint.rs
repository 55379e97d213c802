//! Model fingerprints: one SHA-256 over everything that decides a loaded
//! model's vectors, so a user can tell when stored vectors need re-indexing.
//!
//! Owns [`Fingerprint`] and how it is computed from a model's files: the
//! weights' identity (the Hub revision's commit when the files come from the
//! Hub cache, else a SHA-256 of the weight files' contents, streamed once),
//! `config.json` and the architecture it names, the tokenizer, the
//! preprocessing configuration (with the effective text limit and, for
//! families whose image size follows the image, the pixel bounds), the
//! prompt template, and the dtype. It reads files; it never parses weights and knows
//! nothing of serving.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::ModelError;

/// Hex digits of the full value shown in the short form (`sha256:` + these):
/// 64 bits, plenty to tell two models apart at a glance.
pub const SHORT_HEX: usize = 16;

/// The version of the fingerprint's own recipe, hashed in first: a change of
/// what goes into it changes every fingerprint once, on purpose.
const RECIPE: &str = "vlembed-fingerprint-v1";

/// What decides a model's vectors, and one hash over all of it (fields in
/// alphabetical order, as `/info` shows them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fingerprint {
    /// The architecture `config.json` names.
    pub architecture: String,
    /// `sha256:<hex>` of `config.json`.
    pub config: String,
    pub dtype: String,
    /// `sha256:` and the first [`SHORT_HEX`] hex digits of [`Self::sha256`]
    /// (logs, the `x-vlembed-model-fingerprint` header).
    pub id: String,
    /// `sha256:<hex>` over the preprocessing files (`preprocessor_config.json`,
    /// `processor_config.json` when present), the text limit in tokens and,
    /// when the family has them, the image pixel bounds.
    pub preprocessing: String,
    /// `sha256:<hex>` of the prompt template, or `none` (CLIP: no prompt).
    pub prompt: String,
    /// The full SHA-256 (64 hex digits) over every other component.
    pub sha256: String,
    /// `sha256:<hex>` of `tokenizer.json`.
    pub tokenizer: String,
    /// `hub:<repo>@<commit>` for a model read from the Hub cache, else
    /// `sha256:<hex>` over the weight files' names, sizes and contents.
    pub weights: String,
}

/// The inputs of [`Fingerprint::compute`].
#[derive(Debug, Clone)]
pub struct FingerprintSources<'a> {
    /// The weight files, in load order (shards in index order).
    pub weights: &'a [PathBuf],
    /// The Hub repository id when the model comes from the Hub.
    pub hub_repo: Option<&'a str>,
    pub config: &'a Path,
    pub tokenizer: &'a Path,
    /// `preprocessor_config.json`, `processor_config.json`, ... (those present).
    pub preprocessing: &'a [PathBuf],
    /// The longest text the preprocessor lets through (truncation point).
    pub max_text_tokens: usize,
    /// The prompt template, `None` for models without one.
    pub prompt_template: Option<&'a str>,
    /// The bounds images are resized into, for families whose processed
    /// size follows the image (hashed into `preprocessing`; `None` adds
    /// nothing, so other families' fingerprints are unchanged).
    pub pixel_bounds: Option<crate::preprocess::PixelBounds>,
    pub architecture: &'a str,
    pub dtype: &'a str,
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn io_error(path: &Path, source: std::io::Error) -> ModelError {
    ModelError::Io {
        what: format!("cannot read {} for the model fingerprint", path.display()),
        source,
    }
}

/// Streams `path` into `hasher` (1 MiB reads); returns the bytes read.
fn stream_into(hasher: &mut Sha256, path: &Path) -> Result<u64, ModelError> {
    let mut file = std::fs::File::open(path).map_err(|e| io_error(path, e))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error(path, e)),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
}

/// `sha256:<hex>` of one file's contents.
pub fn file_sha256(path: &Path) -> Result<String, ModelError> {
    let mut h = Sha256::new();
    stream_into(&mut h, path)?;
    Ok(format!("sha256:{}", hex(&h.finalize())))
}

/// `sha256:<hex>` of `text`.
pub fn text_sha256(text: &str) -> String {
    format!("sha256:{}", hex(&Sha256::digest(text.as_bytes())))
}

/// The Hub commit a file of the Hub cache belongs to: the cache keeps every
/// file under `snapshots/<40-hex commit>/`.
pub fn hub_commit(path: &Path) -> Option<String> {
    let parts: Vec<&str> = path
        .components()
        .filter_map(|c| c.as_os_str().to_str())
        .collect();
    let at = parts.iter().rposition(|p| *p == "snapshots")?;
    let commit = parts.get(at + 1)?;
    (commit.len() == 40 && commit.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| commit.to_ascii_lowercase())
}

/// The weights' identity: the Hub commit when every weight file sits in the
/// same snapshot of the Hub cache, else a hash over the files' names (the
/// last path component), sizes and contents, in order.
fn weights_identity(weights: &[PathBuf], hub_repo: Option<&str>) -> Result<String, ModelError> {
    if let Some(repo) = hub_repo {
        let commits: Option<Vec<String>> = weights.iter().map(|p| hub_commit(p)).collect();
        if let Some(commits) = commits {
            if let Some(first) = commits.first() {
                if commits.iter().all(|c| c == first) {
                    return Ok(format!("hub:{repo}@{first}"));
                }
            }
        }
    }
    let started = std::time::Instant::now();
    let mut h = Sha256::new();
    let mut bytes = 0u64;
    for path in weights {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut file = Sha256::new();
        let n = stream_into(&mut file, path)?;
        bytes += n;
        h.update(format!("{name}\t{n}\t{}\n", hex(&file.finalize())).as_bytes());
    }
    tracing::info!(
        files = weights.len(),
        bytes,
        seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
        "hashed the weight files for the model fingerprint"
    );
    Ok(format!("sha256:{}", hex(&h.finalize())))
}

impl Fingerprint {
    /// Computes the fingerprint; reads every file named in `src` (the weights
    /// in full unless they come from the Hub cache).
    pub fn compute(src: &FingerprintSources<'_>) -> Result<Self, ModelError> {
        let weights = weights_identity(src.weights, src.hub_repo)?;
        let config = file_sha256(src.config)?;
        let tokenizer = file_sha256(src.tokenizer)?;
        let mut pre = Sha256::new();
        for p in src.preprocessing {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            pre.update(format!("{name}\n").as_bytes());
            stream_into(&mut pre, p)?;
            pre.update(b"\n");
        }
        pre.update(format!("max_text_tokens={}\n", src.max_text_tokens).as_bytes());
        if let Some(b) = src.pixel_bounds {
            pre.update(format!("min_pixels={}\nmax_pixels={}\n", b.min, b.max).as_bytes());
        }
        let preprocessing = format!("sha256:{}", hex(&pre.finalize()));
        let prompt = src
            .prompt_template
            .map_or_else(|| "none".to_string(), text_sha256);
        Ok(Self::from_components(
            weights,
            config,
            src.architecture.to_string(),
            tokenizer,
            preprocessing,
            prompt,
            src.dtype.to_string(),
        ))
    }

    /// The fingerprint of already computed components.
    pub fn from_components(
        weights: String,
        config: String,
        architecture: String,
        tokenizer: String,
        preprocessing: String,
        prompt: String,
        dtype: String,
    ) -> Self {
        let mut h = Sha256::new();
        h.update(RECIPE.as_bytes());
        for (k, v) in [
            ("weights", &weights),
            ("config", &config),
            ("architecture", &architecture),
            ("tokenizer", &tokenizer),
            ("preprocessing", &preprocessing),
            ("prompt", &prompt),
            ("dtype", &dtype),
        ] {
            h.update(format!("\n{k}={v}").as_bytes());
        }
        let sha256 = hex(&h.finalize());
        Fingerprint {
            id: format!("sha256:{}", &sha256[..SHORT_HEX]),
            sha256,
            weights,
            config,
            architecture,
            tokenizer,
            preprocessing,
            prompt,
            dtype,
        }
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Fingerprint {
        Fingerprint::from_components(
            "sha256:aa".into(),
            "sha256:bb".into(),
            "CLIPModel".into(),
            "sha256:cc".into(),
            "sha256:dd".into(),
            "none".into(),
            "f32".into(),
        )
    }

    #[test]
    fn every_component_changes_the_hash() {
        let base = sample();
        assert_eq!(base.sha256.len(), 64);
        assert_eq!(base.id, format!("sha256:{}", &base.sha256[..SHORT_HEX]));
        assert_eq!(base, sample(), "deterministic");
        let parts = [
            "sha256:aa",
            "sha256:bb",
            "CLIPModel",
            "sha256:cc",
            "sha256:dd",
            "none",
            "f32",
        ];
        for i in 0..parts.len() {
            let mut p: Vec<String> = parts.iter().map(|s| s.to_string()).collect();
            p[i].push('x');
            let [w, c, a, t, pre, pr, d]: [String; 7] = p.try_into().unwrap();
            let other = Fingerprint::from_components(w, c, a, t, pre, pr, d);
            assert_ne!(other.sha256, base.sha256, "component {i}");
        }
    }

    #[test]
    fn hub_commits_come_from_the_snapshot_path() {
        let c = "0123456789abcdef0123456789abcdef01234567";
        let p = PathBuf::from(format!(
            "/cache/models--BAAI--BGE-VL-base/snapshots/{c}/model.safetensors"
        ));
        assert_eq!(hub_commit(&p).as_deref(), Some(c));
        assert_eq!(hub_commit(Path::new("/models/x/model.safetensors")), None);
        assert_eq!(
            hub_commit(Path::new("/c/snapshots/main/model.safetensors")),
            None
        );
        let id = weights_identity(&[p.clone(), p], Some("BAAI/BGE-VL-base")).unwrap();
        assert_eq!(id, format!("hub:BAAI/BGE-VL-base@{c}"));
    }

    #[test]
    fn local_weights_are_hashed_by_content() {
        let dir = std::env::temp_dir().join(format!("vlembed-fp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a.safetensors");
        std::fs::write(&a, b"weights one").unwrap();
        let one = weights_identity(std::slice::from_ref(&a), None).unwrap();
        assert!(one.starts_with("sha256:") && one.len() == 7 + 64, "{one}");
        assert_eq!(
            one,
            weights_identity(std::slice::from_ref(&a), None).unwrap()
        );
        std::fs::write(&a, b"weights two").unwrap();
        assert_ne!(
            one,
            weights_identity(std::slice::from_ref(&a), None).unwrap()
        );
        assert_eq!(
            file_sha256(&a).unwrap(),
            format!("sha256:{}", hex(&Sha256::digest(b"weights two")))
        );
        assert!(weights_identity(&[dir.join("missing")], None).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
