//! Models: candle code for each architecture, and loading them.
//!
//! Owns: reading `config.json` to pick the architecture, memory-mapping the
//! safetensors weights, building one model replica per device, and the forward
//! passes. A model takes [`Prepared`] items (token ids, pixel values) and
//! returns one unnormalised embedding per item. It knows nothing of HTTP,
//! queues or requests; normalisation is the caller's choice.

pub mod clip;
pub mod llava;
pub mod mistral;
pub mod ops;
pub mod source;
pub mod weights;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use candle_core::{DType, Device};
use serde::Serialize;

use crate::preprocess::{self, Prepared, Preprocessor};
pub use source::{ModelFiles, ModelSource};

/// Why a model could not be loaded or could not run a batch.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{0}")]
    Load(String),
    #[error("unsupported model architecture {found} in {path}: vlembed serves {supported}")]
    UnknownArchitecture {
        found: String,
        path: String,
        supported: &'static str,
    },
    #[error("invalid model config {path}: {message}")]
    Config { path: String, message: String },
    #[error("invalid batch: {0}")]
    Batch(String),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// The architectures vlembed can run, as named in `config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Architecture {
    /// HF `CLIPModel` (BGE-VL-base, BGE-VL-large).
    #[serde(rename = "CLIPModel")]
    Clip,
    /// HF `LlavaNextForConditionalGeneration` with a Mistral decoder
    /// (BGE-VL-MLLM-S1, BGE-VL-MLLM-S2).
    #[serde(rename = "LlavaNextForConditionalGeneration")]
    LlavaNext,
}

impl Architecture {
    pub const SUPPORTED: &'static str = "CLIPModel, LlavaNextForConditionalGeneration";

    pub fn as_str(self) -> &'static str {
        match self {
            Architecture::Clip => "CLIPModel",
            Architecture::LlavaNext => "LlavaNextForConditionalGeneration",
        }
    }

    /// Picks the architecture from a parsed `config.json`: the first entry of
    /// `architectures`, else `model_type`.
    pub fn detect(config: &serde_json::Value, path: &Path) -> Result<Self, ModelError> {
        let archs: Vec<&str> = config
            .get("architectures")
            .and_then(|a| a.as_array())
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        let model_type = config.get("model_type").and_then(|m| m.as_str());
        if archs.contains(&"CLIPModel") || (archs.is_empty() && model_type == Some("clip")) {
            return Ok(Architecture::Clip);
        }
        if archs.contains(&"LlavaNextForConditionalGeneration")
            || (archs.is_empty() && model_type == Some("llava_next"))
        {
            return Ok(Architecture::LlavaNext);
        }
        let found = match (archs.first(), model_type) {
            (Some(a), _) => format!("{a:?}"),
            (None, Some(t)) => format!("(model_type {t:?})"),
            (None, None) => "nothing (no \"architectures\" or \"model_type\")".to_string(),
        };
        Err(ModelError::UnknownArchitecture {
            found,
            path: path.display().to_string(),
            supported: Self::SUPPORTED,
        })
    }
}

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
            DeviceSpec::Cuda(i) => Device::new_cuda(i)
                .map_err(|e| ModelError::Load(format!("cannot open cuda:{i}: {e}"))),
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
}

/// A model replica on one device: turns a batch of prepared inputs into one
/// unnormalised embedding per input, in order.
///
/// An item's result must not depend on its batch mates.
pub trait EmbeddingModel: Send {
    fn embed(&self, batch: &[&Prepared]) -> Result<Vec<Vec<f32>>, ModelError>;
}

/// A model whose configuration, tokenizer and preprocessing are loaded, and
/// whose weights can be mapped onto devices (one replica per device).
pub struct LoadedModel {
    pub info: ModelInfo,
    pub preprocessor: Arc<Preprocessor>,
    kind: Kind,
    weights: Vec<PathBuf>,
}

enum Kind {
    Clip(clip::ClipConfig),
    Llava(Box<llava::LlavaConfig>),
}

/// Options that apply when loading a model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub dtype: Precision,
    pub image_limits: preprocess::image::ImageLimits,
}

impl LoadedModel {
    /// Reads the configuration, tokenizer and preprocessor of `source` and
    /// locates the weights (downloading them from the Hub when needed).
    pub fn open(source: &ModelSource, opts: &LoadOptions) -> Result<Self, ModelError> {
        let files = ModelFiles::new(source)?;
        let config_path = files.required(source::CONFIG)?;
        let config_text = std::fs::read_to_string(&config_path)
            .map_err(|e| ModelError::Load(format!("cannot read {}: {e}", config_path.display())))?;
        let config: serde_json::Value =
            serde_json::from_str(&config_text).map_err(|e| ModelError::Config {
                path: config_path.display().to_string(),
                message: e.to_string(),
            })?;
        let arch = Architecture::detect(&config, &config_path)?;
        match arch {
            Architecture::Clip => {
                let cfg =
                    clip::ClipConfig::from_json(&config).map_err(|message| ModelError::Config {
                        path: config_path.display().to_string(),
                        message,
                    })?;
                let tokenizer_path = files.required(source::TOKENIZER)?;
                let pre_path = files.required(source::PREPROCESSOR_CONFIG)?;
                let pre = preprocess::ClipPreprocessor::load(
                    &tokenizer_path,
                    &pre_path,
                    cfg.text_config.max_position_embeddings,
                    opts.image_limits,
                )
                .map_err(ModelError::Load)?;
                let (h, w) = pre.crop_size();
                let side = cfg.vision_config.image_size;
                if h != side || w != side {
                    return Err(ModelError::Load(format!(
                        "{} crops images to {w}x{h} but the vision tower expects {side}x{side}",
                        pre_path.display()
                    )));
                }
                let weights = files.safetensors()?;
                Ok(LoadedModel {
                    info: ModelInfo {
                        architecture: arch,
                        dimensions: cfg.projection_dim,
                        dtype: opts.dtype,
                        max_text_tokens: pre.max_text_tokens(),
                        uses_instructions: false,
                    },
                    preprocessor: Arc::new(Preprocessor::Clip(pre)),
                    kind: Kind::Clip(cfg),
                    weights,
                })
            }
            Architecture::LlavaNext => {
                let cfg = llava::LlavaConfig::from_json(&config).map_err(|message| {
                    ModelError::Config {
                        path: config_path.display().to_string(),
                        message,
                    }
                })?;
                let tokenizer_path = files.required(source::TOKENIZER)?;
                let pre_path = files.required(source::PREPROCESSOR_CONFIG)?;
                let proc_path = files.optional(source::PROCESSOR_CONFIG)?;
                let square = preprocess::Size::square(preprocess::llava::RESIZE_TO);
                let model_features = cfg.num_image_features(square).ok_or_else(|| {
                    ModelError::Load("config.json has no image_grid_pinpoints".into())
                })?;
                let model_tiles = cfg.grid_shape(square).map_or(0, |(gh, gw)| 1 + gh * gw);
                let facts = preprocess::llava::LlavaModelFacts {
                    tile: cfg.vision_config.image_size as u32,
                    patch: cfg.vision_config.patch_size as u32,
                    image_token_id: cfg.image_token_index,
                    model_features,
                    model_tiles,
                    max_tokens: cfg.text_config.max_position_embeddings,
                };
                let pre = preprocess::LlavaPreprocessor::load(
                    &tokenizer_path,
                    &pre_path,
                    proc_path.as_deref(),
                    &facts,
                    opts.image_limits,
                )
                .map_err(ModelError::Load)?;
                let weights = files.safetensors()?;
                Ok(LoadedModel {
                    info: ModelInfo {
                        architecture: arch,
                        dimensions: cfg.text_config.hidden_size,
                        dtype: opts.dtype,
                        max_text_tokens: pre.max_text_tokens(),
                        uses_instructions: true,
                    },
                    preprocessor: Arc::new(Preprocessor::Llava(pre)),
                    kind: Kind::Llava(Box::new(cfg)),
                    weights,
                })
            }
        }
    }

    /// Maps the weights onto `device` and builds a replica.
    pub fn replica(&self, device: &Device) -> Result<Box<dyn EmbeddingModel>, ModelError> {
        let dtype = self.info.dtype.dtype();
        let weights = weights::MappedWeights::open(&self.weights)?;
        let vb = candle_nn::VarBuilder::from_backend(Box::new(weights), dtype, device.clone());
        match &self.kind {
            Kind::Clip(cfg) => {
                let model = clip::ClipModel::new(cfg, vb)
                    .map_err(|e| ModelError::Load(format!("cannot build the CLIP model: {e}")))?;
                Ok(Box::new(model))
            }
            Kind::Llava(cfg) => {
                let model = llava::LlavaModel::new(cfg, vb)
                    .map_err(|e| ModelError::Load(format!("cannot build the LLaVA model: {e}")))?;
                Ok(Box::new(model))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_clip_and_names_unknown_architectures() {
        let p = Path::new("config.json");
        let clip = serde_json::json!({"architectures": ["CLIPModel"], "model_type": "clip"});
        assert_eq!(Architecture::detect(&clip, p).unwrap(), Architecture::Clip);
        let legacy = serde_json::json!({"model_type": "clip"});
        assert_eq!(
            Architecture::detect(&legacy, p).unwrap(),
            Architecture::Clip
        );
        let bert = serde_json::json!({"architectures": ["BertModel"]});
        let msg = Architecture::detect(&bert, p).unwrap_err().to_string();
        assert!(
            msg.contains("BertModel") && msg.contains("CLIPModel"),
            "{msg}"
        );
        let empty = serde_json::json!({});
        let msg = Architecture::detect(&empty, p).unwrap_err().to_string();
        assert!(msg.contains("no \"architectures\""), "{msg}");
    }

    #[test]
    fn detects_llava_next() {
        let p = Path::new("config.json");
        let v = serde_json::json!({
            "architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next"
        });
        assert_eq!(
            Architecture::detect(&v, p).unwrap(),
            Architecture::LlavaNext
        );
        let bare = serde_json::json!({"model_type": "llava_next"});
        assert_eq!(
            Architecture::detect(&bare, p).unwrap(),
            Architecture::LlavaNext
        );
        assert_eq!(
            Architecture::LlavaNext.as_str(),
            "LlavaNextForConditionalGeneration"
        );
        let llava15 = serde_json::json!({"architectures": ["LlavaForConditionalGeneration"]});
        let msg = Architecture::detect(&llava15, p).unwrap_err().to_string();
        assert!(msg.contains("LlavaNextForConditionalGeneration"), "{msg}");
    }

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
