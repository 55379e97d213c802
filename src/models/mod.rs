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
//! decoder; `qwen_vl`), `ops` (fast CPU kernels), `device` (devices and
//! precisions), `weights` and `source` (files), `error`, `fault` (what a
//! failure means for the replica), `mask`, `fingerprint`.

pub mod clip;
pub(crate) mod decoder;
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
use std::sync::{Arc, OnceLock};

use candle_core::Device;
use serde::Serialize;

use crate::preprocess::{PixelBounds, Preprocessor};
pub use device::{
    panic_message, BadDevice, DeviceClass, DeviceError, DeviceSpec, Precision, UnknownPrecision,
};
pub use error::{ConfigError, ModelError, NotRead};
pub use family::{
    Between, EmbeddingModel, Facts, Family, FamilyModel, LoadContext, LoadOptions, Model,
    PassLimits, ReplicaBuilder, Replicas,
};
pub use fault::Fault;
pub use fingerprint::Fingerprint;
pub use ops::{Backend, BackendChoice, CpuBackend};
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
    /// The prompt format inputs follow, for families that offer several.
    pub prompt_format: Option<&'static str>,
    /// The bounds images are resized into, for families whose processed
    /// size follows the image.
    pub pixel_bounds: Option<PixelBounds>,
    /// What decides the model's vectors, hashed (see [`fingerprint`]).
    pub fingerprint: Fingerprint,
    /// What the CPU replicas' matrix products run on and why; `None` until
    /// a CPU replica is built (see [`LoadedModel::served_info`]).
    pub cpu_backend: Option<BackendChoice>,
}

/// A model whose configuration, tokenizer and preprocessing are loaded, and
/// whose weights can be mapped onto devices (one replica per device).
pub struct LoadedModel {
    pub info: ModelInfo,
    pub preprocessor: Arc<dyn Preprocessor>,
    replicas: Box<dyn ReplicaBuilder>,
    weights: Vec<PathBuf>,
    /// `LoadOptions::cpu_backend`, resolved at the first CPU replica.
    cpu_backend: CpuBackend,
    matmuls: Vec<ops::MatmulShape>,
    cpu: OnceLock<BackendChoice>,
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
        let hub_id = match source {
            ModelSource::Hub { id, .. } => Some(id.as_str()),
            ModelSource::Local(_) => None,
        };
        let model = family.load(&LoadContext {
            config: &config,
            config_path: &config_path,
            files: &files,
            hub_id,
            opts,
        })?;
        let prompt_format = model.preprocessor.prompt_format();
        let pixel_bounds = model.preprocessor.pixel_bounds();
        check_settings_read(opts, architecture, prompt_format, pixel_bounds)?;
        let weights = files.safetensors()?;
        let tokenizer = files.required(source::TOKENIZER)?;
        let preprocessing = [source::PREPROCESSOR_CONFIG, source::PROCESSOR_CONFIG]
            .iter()
            .filter_map(|name| files.optional(name).transpose())
            .collect::<Result<Vec<_>, _>>()?;
        let prompt = model.preprocessor.prompt_template();
        let fingerprint = Fingerprint::compute(&fingerprint::FingerprintSources {
            weights: &weights,
            hub_repo: hub_id,
            config: &config_path,
            tokenizer: &tokenizer,
            preprocessing: &preprocessing,
            max_text_tokens: model.facts.max_text_tokens,
            prompt_template: prompt.as_deref(),
            pixel_bounds,
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
                prompt_format,
                pixel_bounds,
                fingerprint,
                cpu_backend: None,
            },
            preprocessor: model.preprocessor,
            replicas: model.replicas,
            weights,
            cpu_backend: opts.cpu_backend,
            matmuls: model.matmuls,
            cpu: OnceLock::new(),
        })
    }

    /// Maps the weights onto `device` and builds a replica. The first CPU
    /// replica settles the CPU backend (for `auto`, by measuring both: about
    /// a second for BGE-VL-base), which every later one shares.
    pub fn replica(&self, device: &Device) -> Result<Box<dyn EmbeddingModel>, ModelError> {
        let dtype = self.info.dtype.dtype();
        let backend = if device.is_cpu() {
            self.resolve_cpu_backend()?.backend
        } else {
            Backend::Native
        };
        let weights = weights::MappedWeights::open(&self.weights)?;
        let vb = candle_nn::VarBuilder::from_backend(Box::new(weights), dtype, device.clone());
        self.replicas.build(vb, backend)
    }

    fn resolve_cpu_backend(&self) -> Result<&BackendChoice, ModelError> {
        if let Some(c) = self.cpu.get() {
            return Ok(c);
        }
        // The fast kernels run in f32 and bf16 only: in f16 nothing to measure.
        let shapes = match self.info.dtype {
            Precision::F16 => &[][..],
            Precision::F32 | Precision::Bf16 => &self.matmuls[..],
        };
        let bf16 = self.info.dtype == Precision::Bf16;
        let choice = ops::backend::resolve(self.cpu_backend, bf16, shapes)?;
        tracing::info!(
            backend = %choice.backend,
            requested = %choice.requested,
            reason = %choice.reason,
            onednn = choice.onednn.as_deref().unwrap_or("none"),
            "CPU backend"
        );
        if choice.backend == Backend::Onednn
            && std::env::var_os("OMP_WAIT_POLICY").is_none()
            && std::env::var_os("GOMP_SPINCOUNT").is_none()
        {
            tracing::warn!(
                "oneDNN's OpenMP threads spin after each product, on the cores the native \
                 kernels use next: set OMP_WAIT_POLICY=passive (README, CPU backends)"
            );
        }
        // Two first replicas built at once both resolve; the first stored
        // choice is the one every replica uses.
        Ok(self.cpu.get_or_init(|| choice))
    }

    /// The CPU backend, once a CPU replica has been built.
    pub fn cpu_backend(&self) -> Option<&BackendChoice> {
        self.cpu.get()
    }

    /// [`Self::info`] with the CPU backend filled in (once known).
    pub fn served_info(&self) -> ModelInfo {
        ModelInfo {
            cpu_backend: self.cpu.get().cloned(),
            ..self.info.clone()
        }
    }
}

/// Refuses per-model settings the model's family does not read (its
/// preprocessor reports no prompt format, or no pixel bounds): a setting
/// that silently does nothing is a configuration mistake.
fn check_settings_read(
    opts: &LoadOptions,
    architecture: &'static str,
    prompt_format: Option<&'static str>,
    pixel_bounds: Option<PixelBounds>,
) -> Result<(), ModelError> {
    let unread = |key: &'static str, what: &'static str| ModelError::Setting {
        key,
        source: Box::new(NotRead { architecture, what }),
    };
    if opts.prompt_format.is_some() && prompt_format.is_none() {
        return Err(unread("prompt_format", "prompt formats"));
    }
    if pixel_bounds.is_none() {
        if opts.min_pixels.is_some() {
            return Err(unread("min_pixels", "image pixel bounds"));
        }
        if opts.max_pixels.is_some() {
            return Err(unread("max_pixels", "image pixel bounds"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_a_family_does_not_read_are_refused() {
        let opts = |f: Option<&str>, min: Option<u64>| LoadOptions {
            prompt_format: f.map(str::to_string),
            min_pixels: min,
            ..Default::default()
        };
        let bounds = Some(PixelBounds { min: 1, max: 2 });
        assert!(check_settings_read(&opts(None, None), "CLIPModel", None, None).is_ok());
        let e = check_settings_read(&opts(Some("gme"), None), "CLIPModel", None, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("prompt_format") && e.contains("CLIPModel"),
            "{e}"
        );
        let e = check_settings_read(&opts(None, Some(5)), "CLIPModel", None, None).unwrap_err();
        assert!(e.to_string().contains("min_pixels"), "{e}");
        assert!(check_settings_read(&opts(Some("gme"), Some(5)), "Q", Some("gme"), bounds).is_ok());
    }
}
