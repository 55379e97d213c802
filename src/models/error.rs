//! Why a model could not be loaded or could not run a batch.
//!
//! Owns the error types of `models`; every variant that wraps another
//! library's error keeps it as its `#[source]`.

use hf_hub::api::sync::ApiError;

use super::device::DeviceError;
use crate::preprocess::SetupError;

/// Why a model could not be loaded or could not run a batch.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A load failure with no underlying error (a missing file, files that
    /// do not fit together).
    #[error("{0}")]
    Load(String),
    /// Reading a model file failed; `what` says which and why it was read.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("cannot set up the Hub client: {source}")]
    HubClient {
        #[source]
        source: Box<ApiError>,
    },
    #[error("cannot fetch {file} of {model}: {source} (for offline use, put the model in the Hub cache or pass a local directory)")]
    HubFetch {
        file: String,
        model: String,
        #[source]
        source: Box<ApiError>,
    },
    #[error("invalid safetensors file {path}: {source}")]
    Safetensors {
        path: String,
        #[source]
        source: safetensors::SafeTensorError,
    },
    /// The weights do not fit the model the config describes.
    #[error("cannot build the {family} model: {source}")]
    Build {
        family: &'static str,
        #[source]
        source: Box<candle_core::Error>,
    },
    /// The preprocessing files (tokenizer, processor configs) do not load
    /// or do not fit the model.
    #[error(transparent)]
    Preprocessor(#[from] SetupError),
    #[error("unsupported model architecture {found} in {path}: vlembed serves {supported}")]
    UnknownArchitecture {
        found: String,
        path: String,
        supported: String,
    },
    /// A per-model setting of the server's configuration (`prompt_format`,
    /// `min_pixels`, ...) that this model cannot use.
    #[error("model setting {key}: {source}")]
    Setting {
        key: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("invalid model config {path}: {source}")]
    Config {
        path: String,
        #[source]
        source: ConfigError,
    },
    #[error("invalid batch: {0}")]
    Batch(String),
    /// A batch item was prepared by another family's preprocessor (a wiring
    /// error of the server's, never a client's).
    #[error("batch item {item} was not prepared for this model (expected {expected})")]
    WrongInput { item: usize, expected: &'static str },
    /// The caller's step hook asked a stepped forward pass to stop
    /// ([`super::Model::embed`]).
    #[error("the forward pass was interrupted between two layers")]
    Interrupted,
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// The configured CPU backend cannot run here.
    #[error(transparent)]
    CpuBackend(#[from] super::ops::backend::BackendError),
    /// A batch a replica runs before it serves failed (`crate::warmup`):
    /// the probe or shape, its inputs, and why.
    #[error("warm-up batch {shape} ({inputs} inputs) failed: {source}")]
    Warmup {
        shape: String,
        inputs: usize,
        #[source]
        source: Box<ModelError>,
    },
}

/// A per-model setting given for a model whose family does not read it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{architecture} models have no {what}; leave it unset for this model")]
pub struct NotRead {
    pub architecture: &'static str,
    /// What the setting chooses (`"prompt formats"`).
    pub what: &'static str,
}

/// What is wrong with a `config.json` (or a part of it).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not JSON, or a section that does not deserialise.
    #[error("{context}{source}")]
    Json {
        /// Where (`"text_config: "`), or empty for the whole file.
        context: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// Values that parse but cannot be served.
    #[error("{0}")]
    Invalid(String),
}

impl ConfigError {
    /// A JSON error of the section named by `context` (`"text_config: "`).
    pub fn json(context: &'static str) -> impl FnOnce(serde_json::Error) -> Self {
        move |source| ConfigError::Json { context, source }
    }
}

impl From<String> for ConfigError {
    fn from(message: String) -> Self {
        ConfigError::Invalid(message)
    }
}

impl From<&str> for ConfigError {
    fn from(message: &str) -> Self {
        ConfigError::Invalid(message.to_string())
    }
}
