//! Models: candle code for each architecture, and loading them.
//!
//! Owns: the table of model families ([`FAMILIES`]; `config.json` picks one
//! and its loader reads the rest), memory-mapping the safetensors weights,
//! building one model replica per device, and the forward passes. A model
//! takes [`Prepared`] items (token ids, pixel values) and returns one
//! unnormalised embedding per item. It knows nothing of HTTP, queues or
//! requests; normalisation is the caller's choice.
//!
//! Layout: `family` (the table and the loader interface), one module per
//! family (`clip`; `llava` with its `mistral` decoder), `ops` (fast CPU
//! kernels), `weights` and `source` (files), `error`, `mask`.

pub mod clip;
mod error;
mod family;
pub mod fingerprint;
pub mod llava;
mod mask;
pub mod mistral;
pub mod ops;
pub mod source;
pub mod weights;

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device};
use serde::Serialize;

use crate::preprocess::{self, Prepared, Preprocessor};
pub use error::{ConfigError, ModelError};
pub use family::{Architecture, Family, FamilyModel, LoadContext, ReplicaBuilder, FAMILIES};
pub use fingerprint::Fingerprint;
pub use ops::{Backend, BackendChoice, CpuBackend};
pub use source::{ModelFiles, ModelSource};

/// The floating point type the weights are computed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    F16,
    Bf16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
            Precision::Bf16 => DType::BF16,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        }
    }
}

impl FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Precision::F32),
            "f16" | "float16" | "half" => Ok(Precision::F16),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            other => Err(format!(
                "unknown dtype {other:?}: expected f32, f16 or bf16"
            )),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A device name as configured: `cpu` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        if s == "cpu" {
            return Ok(DeviceSpec::Cpu);
        }
        if s == "cuda" {
            return Ok(DeviceSpec::Cuda(0));
        }
        if let Some(n) = s.strip_prefix("cuda:") {
            return n
                .parse()
                .map(DeviceSpec::Cuda)
                .map_err(|_| format!("invalid CUDA device index in {s:?}"));
        }
        Err(format!("unknown device {s:?}: expected cpu or cuda:N"))
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device. CUDA needs the `cuda` build feature.
    pub fn open(self) -> Result<Device, ModelError> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(i) => Device::new_cuda(i).map_err(|e| ModelError::Device {
                device: self,
                source: Box::new(e),
            }),
        }
    }
}

/// Facts about a loaded model that front ends report (`/info`, the CLI).
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub architecture: Architecture,
    pub dimensions: usize,
    pub dtype: Precision,
    pub max_text_tokens: usize,
    pub uses_instructions: bool,
    /// What decides the model's vectors, hashed (see [`fingerprint`]).
    pub fingerprint: Fingerprint,
    /// What the CPU replicas' matrix products run on and why; `None` until
    /// a CPU replica is built (see [`LoadedModel::served_info`]).
    pub cpu_backend: Option<BackendChoice>,
}

/// A model replica on one device: turns a batch of prepared inputs into one
/// unnormalised embedding per input, in order.
///
/// An item's result must not depend on its batch mates.
pub trait EmbeddingModel: Send {
    fn embed(&self, batch: &[&Prepared]) -> Result<Vec<Vec<f32>>, ModelError>;

    /// [`Self::embed`], calling `between` between the steps of the forward
    /// pass (for CLIP: between two encoder layers of the vision tower, the
    /// pass's state, hidden states and next layer, kept meanwhile), so that
    /// the caller can run other, short work on the same replica (through
    /// `&self`: a model holds no state between calls) and resume. When
    /// `between` answers `Break`, the pass stops with
    /// [`ModelError::Interrupted`]. Results are those of `embed`, bit for
    /// bit: the same steps run in the same order.
    ///
    /// Both families step (CLIP: its vision tower; LLaVA: its vision tower
    /// and its decoder). The default, for models whose passes are not
    /// stepped, calls `embed` and never `between`: such a batch is only
    /// preempted at its end.
    fn embed_stepped(
        &self,
        batch: &[&Prepared],
        between: &mut dyn FnMut() -> ControlFlow<()>,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let _ = between;
        self.embed(batch)
    }
}

/// A model whose configuration, tokenizer and preprocessing are loaded, and
/// whose weights can be mapped onto devices (one replica per device).
pub struct LoadedModel {
    pub info: ModelInfo,
    pub preprocessor: Arc<Preprocessor>,
    replicas: Box<dyn ReplicaBuilder>,
    weights: Vec<PathBuf>,
    /// `LoadOptions::cpu_backend`, resolved at the first CPU replica.
    cpu_backend: CpuBackend,
    matmuls: Vec<ops::MatmulShape>,
    cpu: OnceLock<BackendChoice>,
}

/// Options that apply when loading a model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub dtype: Precision,
    pub image_limits: preprocess::image::ImageLimits,
    /// The longest prompt an MLLM takes, in tokens (`None`:
    /// [`llava::DEFAULT_MAX_INPUT_TOKENS`]), capped at its decoder's
    /// `max_position_embeddings`. Bounds the decoder's attention memory.
    pub max_input_tokens: Option<usize>,
    /// What the CPU replicas' matrix products run on (`auto`: measured at
    /// the first CPU replica, see [`ops::backend`]).
    pub cpu_backend: CpuBackend,
}

impl LoadedModel {
    /// Reads the configuration, tokenizer and preprocessor of `source` and
    /// locates the weights (downloading them from the Hub when needed).
    /// `config.json` picks the family ([`Architecture::detect`]), whose
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
        let architecture = Architecture::detect(&config, &config_path)?;
        let model = (architecture.family().load)(&LoadContext {
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
            max_text_tokens: model.max_text_tokens,
            prompt_template: prompt.as_deref(),
            architecture: architecture.as_str(),
            dtype: opts.dtype.as_str(),
        })?;
        Ok(LoadedModel {
            info: ModelInfo {
                architecture,
                dimensions: model.dimensions,
                dtype: opts.dtype,
                max_text_tokens: model.max_text_tokens,
                uses_instructions: model.uses_instructions,
                fingerprint,
                cpu_backend: None,
            },
            preprocessor: Arc::new(model.preprocessor),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dtypes_and_devices() {
        assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
        assert_eq!("F16".parse::<Precision>().unwrap(), Precision::F16);
        assert!("f64".parse::<Precision>().is_err());
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!("tpu".parse::<DeviceSpec>().is_err());
    }
}
