//! Models: one module per family (its loader, preprocessor, prepared data
//! and model), the table of families, and loading a model from its files.
//!
//! Owns: the table of model families ([`families::FAMILIES`]; `config.json`
//! picks one and its loader reads the rest), memory-mapping the safetensors
//! weights, building one model replica per device, and the forward passes.
//! A model takes its family's prepared data (token ids, pixel values) and
//! returns one unnormalised embedding per item. It knows nothing of HTTP,
//! queues or requests; normalisation is the caller's choice.
//!
//! Layout: `family` (what a family provides; a leaf), `families` (the
//! table), one module per family (`clip`; `llava` with its Mistral
//! decoder), `ops` (fast CPU kernels), `device` (devices and precisions),
//! `weights` and `source` (files), `error`, `fault` (what a failure means
//! for the replica), `mask`, `fingerprint`.

pub mod clip;
pub mod device;
mod error;
pub mod families;
pub mod family;
pub mod fault;
pub mod fingerprint;
pub mod llava;
mod mask;
pub mod ops;
pub mod qwen_vl;
pub mod source;
pub mod weights;

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Device;
use serde::Serialize;

use crate::preprocess::Preprocessor;
pub use device::{
    panic_message, BadDevice, DeviceClass, DeviceError, DeviceSpec, Precision, UnknownPrecision,
};
pub use error::{ConfigError, ModelError};
pub use family::{
    Between, EmbeddingModel, Facts, Family, FamilyModel, LoadContext, LoadOptions, Model,
    PassLimits, ReplicaBuilder, Replicas,
};
pub use fault::Fault;
pub use fingerprint::Fingerprint;
pub use source::{ModelFiles, ModelSource};

/// Facts about a loaded model that front ends report (`/info`, the CLI).
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// The `config.json` architecture of the model's family.
    pub architecture: &'static str,
    pub dimensions: usize,
    pub dtype: Precision,
    pub max_text_tokens: usize,
    pub uses_instructions: bool,
    /// What decides the model's vectors, hashed (see [`fingerprint`]).
    pub fingerprint: Fingerprint,
}

/// A model whose configuration, tokenizer and preprocessing are loaded, and
/// whose weights can be mapped onto devices (one replica per device).
pub struct LoadedModel {
    pub info: ModelInfo,
    pub preprocessor: Arc<dyn Preprocessor>,
    replicas: Box<dyn ReplicaBuilder>,
    weights: Vec<PathBuf>,
}

impl LoadedModel {
    /// Reads the configuration, tokenizer and preprocessor of `source` and
    /// locates the weights (downloading them from the Hub when needed).
    /// `config.json` picks the family ([`families::detect`]), whose
    /// loader reads the rest.
    pub fn open(source: &ModelSource, opts: &LoadOptions) -> Result<Self, ModelError> {
        let files = ModelFiles::new(source)?;
        let config_path = files.required(source::CONFIG)?;
        let config_text =
            std::fs::read_to_string(&config_path).map_err(|source| ModelError::Io {
                what: format!("cannot read {}", config_path.display()),
                source,
            })?;
        let config: serde_json::Value =
            serde_json::from_str(&config_text).map_err(|source| ModelError::Config {
                path: config_path.display().to_string(),
                source: ConfigError::json("")(source),
            })?;
        let family = families::detect(&config, &config_path)?;
        let architecture = family.architecture();
        let model = family.load(&LoadContext {
            config: &config,
            config_path: &config_path,
            files: &files,
            opts,
        })?;
        let weights = files.safetensors()?;
        let tokenizer = files.required(source::TOKENIZER)?;
        let preprocessing = [source::PREPROCESSOR_CONFIG, source::PROCESSOR_CONFIG]
            .iter()
            .filter_map(|name| files.optional(name).transpose())
            .collect::<Result<Vec<_>, _>>()?;
        let prompt = model.preprocessor.prompt_template();
        let fingerprint = Fingerprint::compute(&fingerprint::FingerprintSources {
            weights: &weights,
            hub_repo: match source {
                ModelSource::Hub { id, .. } => Some(id.as_str()),
                ModelSource::Local(_) => None,
            },
            config: &config_path,
            tokenizer: &tokenizer,
            preprocessing: &preprocessing,
            max_text_tokens: model.facts.max_text_tokens,
            prompt_template: prompt.as_deref(),
            architecture,
            dtype: opts.dtype.as_str(),
        })?;
        Ok(LoadedModel {
            info: ModelInfo {
                architecture,
                dimensions: model.facts.dimensions,
                dtype: opts.dtype,
                max_text_tokens: model.facts.max_text_tokens,
                uses_instructions: model.facts.uses_instructions,
                fingerprint,
            },
            preprocessor: model.preprocessor,
            replicas: model.replicas,
            weights,
        })
    }

    /// Maps the weights onto `device` and builds a replica.
    pub fn replica(&self, device: &Device) -> Result<Box<dyn EmbeddingModel>, ModelError> {
        let dtype = self.info.dtype.dtype();
        let weights = weights::MappedWeights::open(&self.weights)?;
        let vb = candle_nn::VarBuilder::from_backend(Box::new(weights), dtype, device.clone());
        self.replicas.build(vb)
    }
}
