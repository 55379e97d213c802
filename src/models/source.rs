//! Where a model's files come from: a local directory in the Hub layout, or a
//! Hugging Face Hub id fetched through `hf-hub` (cache first, so a warm cache
//! works offline).
//!
//! Owns file resolution only; it never parses the files it finds.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

use super::{ConfigError, ModelError};

/// The file names of the Hub layout this project reads.
pub const CONFIG: &str = "config.json";
pub const TOKENIZER: &str = "tokenizer.json";
pub const PREPROCESSOR_CONFIG: &str = "preprocessor_config.json";
pub const PROCESSOR_CONFIG: &str = "processor_config.json";
pub const SAFETENSORS: &str = "model.safetensors";
pub const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";

/// A model's location as the user gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A directory holding `config.json`, the weights, the tokenizer, ...
    Local(PathBuf),
    /// A Hub repository id such as `BAAI/BGE-VL-base`, at a revision.
    Hub { id: String, revision: String },
}

impl ModelSource {
    /// A path that exists as a directory is local; anything else is a Hub id.
    pub fn parse(source: &str, revision: Option<&str>) -> Self {
        let path = Path::new(source);
        if path.is_dir() {
            ModelSource::Local(path.to_path_buf())
        } else {
            ModelSource::Hub {
                id: source.to_string(),
                revision: revision.unwrap_or("main").to_string(),
            }
        }
    }

    /// The default served name: the Hub id, or the directory's name.
    pub fn default_name(&self) -> String {
        match self {
            ModelSource::Local(p) => p
                .canonicalize()
                .unwrap_or_else(|_| p.clone())
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| p.display().to_string()),
            ModelSource::Hub { id, .. } => id.clone(),
        }
    }

    /// A human readable description (for logs and `/info`).
    pub fn describe(&self) -> String {
        match self {
            ModelSource::Local(p) => p.display().to_string(),
            ModelSource::Hub { id, revision } if revision == "main" => id.clone(),
            ModelSource::Hub { id, revision } => format!("{id}@{revision}"),
        }
    }
}

/// Resolves files of one model to local paths.
pub struct ModelFiles {
    inner: Resolver,
    description: String,
}

enum Resolver {
    Local(PathBuf),
    Hub {
        cache: hf_hub::CacheRepo,
        /// The Hub client and the repository's file list, when online.
        api: Option<Box<(ApiRepo, Vec<String>)>>,
    },
}

impl ModelFiles {
    /// Prepares resolution for `source`. For the Hub: `HF_HUB_CACHE` (else
    /// `HF_HOME/hub`, else `~/.cache/huggingface/hub`) is the cache, `HF_TOKEN`
    /// (else the cached login token) authenticates, and `HF_HUB_OFFLINE=1`
    /// forbids any network access.
    pub fn new(source: &ModelSource) -> Result<Self, ModelError> {
        let description = source.describe();
        let inner = match source {
            ModelSource::Local(dir) => {
                if !dir.is_dir() {
                    return Err(ModelError::Load(format!(
                        "model directory {} does not exist",
                        dir.display()
                    )));
                }
                Resolver::Local(dir.clone())
            }
            ModelSource::Hub { id, revision } => {
                if !is_valid_repo_id(id) {
                    return Err(ModelError::Load(format!(
                        "model source {id:?} is neither an existing directory nor a Hub id like \"BAAI/BGE-VL-base\""
                    )));
                }
                let cache = hub_cache();
                let repo = Repo::with_revision(id.clone(), RepoType::Model, revision.clone());
                let offline = env_flag("HF_HUB_OFFLINE");
                let api = if offline {
                    None
                } else {
                    let token = std::env::var("HF_TOKEN")
                        .ok()
                        .filter(|t| !t.is_empty())
                        .or_else(|| cache.token());
                    let api = ApiBuilder::from_cache(cache.clone())
                        .with_token(token)
                        .with_progress(false)
                        .with_retries(2);
                    let api = match std::env::var("HF_ENDPOINT") {
                        Ok(e) if !e.is_empty() => api.with_endpoint(e),
                        _ => api,
                    };
                    let api = api
                        .build()
                        .map_err(|e| ModelError::HubClient {
                            source: Box::new(e),
                        })?
                        .repo(repo.clone());
                    // One request lists the repository's files; without the
                    // network we carry on with whatever the cache holds.
                    match api.info() {
                        Ok(info) => Some(Box::new((
                            api,
                            info.siblings.into_iter().map(|s| s.rfilename).collect(),
                        ))),
                        Err(e) => {
                            tracing::warn!(model = %description, error = %e, "Hub unreachable, using the local cache only");
                            None
                        }
                    }
                };
                Resolver::Hub {
                    cache: cache.repo(repo),
                    api,
                }
            }
        };
        Ok(ModelFiles { inner, description })
    }

    /// The local path of `name`, downloading it if needed; `None` when the
    /// model does not have that file.
    pub fn optional(&self, name: &str) -> Result<Option<PathBuf>, ModelError> {
        match &self.inner {
            Resolver::Local(dir) => {
                let p = dir.join(name);
                Ok(p.is_file().then_some(p))
            }
            Resolver::Hub { cache, api } => {
                if let Some(p) = cache.get(name) {
                    return Ok(Some(p));
                }
                let Some((api, files)) = api.as_deref() else {
                    return Ok(None);
                };
                if !files.iter().any(|f| f == name) {
                    return Ok(None);
                }
                let progress = DownloadLog::new(&self.description, name);
                match api.download_with_progress(name, progress) {
                    Ok(p) => Ok(Some(p)),
                    Err(e) => Err(ModelError::HubFetch {
                        file: name.to_string(),
                        model: self.description.clone(),
                        source: Box::new(e),
                    }),
                }
            }
        }
    }

    /// The local path of `name`, which the model must have.
    pub fn required(&self, name: &str) -> Result<PathBuf, ModelError> {
        self.optional(name)?.ok_or_else(|| {
            ModelError::Load(match &self.inner {
                // Offline and not cached: say so, and where the cache was searched.
                Resolver::Hub { api: None, .. } => {
                    let id = self.description.split('@').next().unwrap_or_default();
                    format!(
                        "{} is not in the local Hub cache ({name} not found under {}) and {}; \
                         connect to the Hub once, point HF_HUB_CACHE (or HF_HOME) at a cache \
                         that holds the model, or pass a local directory",
                        self.description,
                        hub_cache()
                            .path()
                            .join(format!("models--{}", id.replace('/', "--")))
                            .display(),
                        if env_flag("HF_HUB_OFFLINE") {
                            "HF_HUB_OFFLINE forbids downloading it"
                        } else {
                            "the Hub could not be reached to download it"
                        }
                    )
                }
                _ => format!("{} has no {name}", self.description),
            })
        })
    }

    /// The safetensors files: `model.safetensors`, or every shard listed in
    /// `model.safetensors.index.json`.
    pub fn safetensors(&self) -> Result<Vec<PathBuf>, ModelError> {
        if let Some(index) = self.optional(SAFETENSORS_INDEX)? {
            let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io {
                what: format!("cannot read {}", index.display()),
                source,
            })?;
            let shards = shard_names(&text).map_err(|source| ModelError::Config {
                path: index.display().to_string(),
                source,
            })?;
            return shards.iter().map(|s| self.required(s)).collect();
        }
        if let Some(single) = self.optional(SAFETENSORS)? {
            return Ok(vec![single]);
        }
        Err(ModelError::Load(format!(
            "{} has neither {SAFETENSORS} nor {SAFETENSORS_INDEX} (only safetensors weights are supported)",
            self.description
        )))
    }
}

/// The distinct shard file names of a safetensors index, in first-seen order.
pub(crate) fn shard_names(index_json: &str) -> Result<Vec<String>, ConfigError> {
    let v: serde_json::Value = serde_json::from_str(index_json).map_err(ConfigError::json(""))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or("no \"weight_map\" object")?;
    let mut out: Vec<String> = Vec::new();
    for file in map.values() {
        let file = file.as_str().ok_or("a weight_map value is not a string")?;
        if file.contains("..") || file.starts_with('/') {
            return Err(format!("shard name {file:?} leaves the model directory").into());
        }
        if !out.iter().any(|f| f == file) {
            out.push(file.to_string());
        }
    }
    if out.is_empty() {
        return Err("\"weight_map\" is empty".into());
    }
    Ok(out)
}

fn is_valid_repo_id(id: &str) -> bool {
    let parts: Vec<&str> = id.split('/').collect();
    (1..=2).contains(&parts.len())
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

/// The Hub cache: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
fn hub_cache() -> Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(p) => Cache::new(PathBuf::from(p)),
        None => Cache::from_env(),
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name)
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

/// Logs a Hub download's progress: its start (file and size), then at most
/// every 10 % or every 5 seconds, and its end with the time it took. Model
/// weights are gigabytes: without this an operator sees a silent start that
/// may last minutes and cannot tell a slow network from a hang.
struct DownloadLog {
    model: String,
    file: String,
    total: usize,
    done: usize,
    /// `done` when a line was last logged, and when.
    logged: (usize, std::time::Instant),
    started: std::time::Instant,
}

impl DownloadLog {
    fn new(model: &str, file: &str) -> Self {
        let now = std::time::Instant::now();
        DownloadLog {
            model: model.to_string(),
            file: file.to_string(),
            total: 0,
            done: 0,
            logged: (0, now),
            started: now,
        }
    }

    /// Whether a progress line is due: 10 % more of the file, or 5 s since
    /// the last line.
    fn due(&self, now: std::time::Instant) -> bool {
        let step = (self.total / 10).max(1);
        self.done >= self.logged.0 + step
            || now.duration_since(self.logged.1) >= std::time::Duration::from_secs(5)
    }
}

impl hf_hub::api::Progress for DownloadLog {
    fn init(&mut self, size: usize, _filename: &str) {
        self.total = size;
        tracing::info!(model = %self.model, file = %self.file, bytes = size, "downloading from the Hub");
    }

    fn update(&mut self, size: usize) {
        self.done = self.done.saturating_add(size);
        let now = std::time::Instant::now();
        if self.due(now) {
            self.logged = (self.done, now);
            let percent = if self.total == 0 {
                100.0
            } else {
                self.done as f64 * 100.0 / self.total as f64
            };
            tracing::info!(
                model = %self.model, file = %self.file, bytes = self.done, total = self.total,
                percent = format!("{percent:.0}"), "download progress"
            );
        }
    }

    fn finish(&mut self) {
        tracing::info!(
            model = %self.model, file = %self.file, bytes = self.done,
            seconds = format!("{:.1}", self.started.elapsed().as_secs_f64()), "downloaded"
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn download_progress_is_logged_every_tenth_or_five_seconds() {
        use hf_hub::api::Progress;
        let mut log = super::DownloadLog::new("org/model", "model.safetensors");
        log.init(1000, "model.safetensors");
        let t0 = log.logged.1;
        log.update(50);
        assert_eq!(log.logged.0, 0, "5 % is not a step: nothing logged");
        assert!(!log.due(t0));
        log.update(60);
        assert_eq!(
            log.logged.0, 110,
            "11 % is: logged, and the next step counts from there"
        );
        log.done = 200;
        assert!(!log.due(log.logged.1), "9 % more is not a step yet");
        assert!(
            log.due(log.logged.1 + std::time::Duration::from_secs(5)),
            "5 s since the last line is"
        );
        // A file of unknown (zero) size never divides by zero.
        let mut empty = super::DownloadLog::new("m", "f");
        empty.init(0, "f");
        empty.update(1);
        empty.finish();
    }

    use super::*;

    #[test]
    fn shard_names_are_unique_and_ordered() {
        let idx = r#"{"metadata":{},"weight_map":{"a":"m-1.safetensors","b":"m-2.safetensors","c":"m-1.safetensors"}}"#;
        assert_eq!(
            shard_names(idx).unwrap(),
            vec!["m-1.safetensors".to_string(), "m-2.safetensors".to_string()]
        );
    }

    #[test]
    fn shard_names_reject_traversal_and_garbage() {
        assert!(shard_names(r#"{"weight_map":{"a":"../x.safetensors"}}"#).is_err());
        assert!(shard_names(r#"{"weight_map":{}}"#).is_err());
        assert!(shard_names("not json").is_err());
    }

    #[test]
    fn hub_ids_and_directories() {
        assert!(is_valid_repo_id("BAAI/BGE-VL-base"));
        assert!(is_valid_repo_id("gpt2"));
        assert!(!is_valid_repo_id("a/b/c"));
        assert!(!is_valid_repo_id("../etc"));
        let s = ModelSource::parse("BAAI/BGE-VL-base", None);
        assert_eq!(s.default_name(), "BAAI/BGE-VL-base");
        assert_eq!(s.describe(), "BAAI/BGE-VL-base");
        let d = ModelSource::parse(env!("CARGO_MANIFEST_DIR"), None);
        assert!(matches!(d, ModelSource::Local(_)));
        assert!(!d.default_name().is_empty() && !d.default_name().contains('/'));
    }

    #[test]
    fn missing_local_directory_is_a_clear_error() {
        let e = ModelFiles::new(&ModelSource::Local("/nonexistent/model".into()))
            .err()
            .unwrap();
        assert!(e.to_string().contains("/nonexistent/model"));
    }
}
