//! The model families vlembed serves, as one table ([`FAMILIES`]) that
//! architecture detection, the "supported architectures" message and
//! loading all read.
//!
//! Owns the table and the loader interface. A family is one module that
//! exposes a [`Family`] (its `config.json` names and its loader) and an
//! [`Architecture`] constant; adding one means that module and one line in
//! [`FAMILIES`] (plus its [`Preprocessor`] variant, which preprocessing owns).

use std::path::Path;

use candle_nn::VarBuilder;
use serde::Serialize;

use super::{clip, llava, ops, ConfigError, EmbeddingModel, LoadOptions, ModelError, ModelFiles};
use crate::preprocess::Preprocessor;

/// Every family, in detection order.
pub const FAMILIES: &[Family] = &[clip::FAMILY, llava::FAMILY];

/// One model family: how `config.json` names it and how it loads.
pub struct Family {
    /// The `architectures` entry of `config.json` (also the name `/info`
    /// reports).
    pub architecture: &'static str,
    /// The `model_type` that names the family when `config.json` has no
    /// `architectures`.
    pub model_type: &'static str,
    /// Reads the family's config and preprocessing files: everything but
    /// the weights.
    pub load: fn(&LoadContext<'_>) -> Result<FamilyModel, ModelError>,
}

/// What a family's loader reads from.
pub struct LoadContext<'a> {
    /// The parsed `config.json`.
    pub config: &'a serde_json::Value,
    pub config_path: &'a Path,
    /// The model's other files (tokenizer, preprocessor configs).
    pub files: &'a ModelFiles,
    pub opts: &'a LoadOptions,
}

impl LoadContext<'_> {
    /// A `config.json` problem as a [`ModelError`] naming the file.
    pub fn invalid_config(&self, source: ConfigError) -> ModelError {
        ModelError::Config {
            path: self.config_path.display().to_string(),
            source,
        }
    }
}

/// A family's model, configured, with its preprocessing but no weights.
pub struct FamilyModel {
    /// Embedding width.
    pub dimensions: usize,
    /// The longest text (prompt) the preprocessor lets through, in tokens.
    pub max_text_tokens: usize,
    /// Whether the model reads instructions (MLLM prompts).
    pub uses_instructions: bool,
    pub preprocessor: Preprocessor,
    pub replicas: Box<dyn ReplicaBuilder>,
    /// The matrix products one layer of the replicas' fast CPU encoders
    /// computes on a typical batch (what `cpu_backend = "auto"` measures);
    /// empty when the model has none.
    pub matmuls: Vec<ops::MatmulShape>,
}

/// Builds one replica of a configured model from its weights.
pub trait ReplicaBuilder: Send + Sync {
    /// A replica on `vb`'s device and dtype; on the CPU, the fast
    /// encoders' products run on `backend`.
    fn build(
        &self,
        vb: VarBuilder,
        backend: ops::Backend,
    ) -> Result<Box<dyn EmbeddingModel>, ModelError>;
}

/// One of the architectures in [`FAMILIES`], as `config.json` names it.
/// Each family module defines its constant (`Architecture::Clip`, ...).
#[derive(Clone, Copy)]
pub struct Architecture(pub(super) &'static Family);

impl Architecture {
    pub fn as_str(self) -> &'static str {
        self.0.architecture
    }

    /// The family: its loader.
    pub(super) fn family(self) -> &'static Family {
        self.0
    }

    /// The architectures vlembed serves, for error messages.
    pub fn supported() -> String {
        FAMILIES
            .iter()
            .map(|f| f.architecture)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Picks the architecture from a parsed `config.json`: the first family
    /// (in [`FAMILIES`] order) listed in `architectures`, else the one whose
    /// `model_type` it has when `architectures` is absent.
    pub fn detect(config: &serde_json::Value, path: &Path) -> Result<Self, ModelError> {
        let archs: Vec<&str> = config
            .get("architectures")
            .and_then(|a| a.as_array())
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        let model_type = config.get("model_type").and_then(|m| m.as_str());
        let family = FAMILIES.iter().find(|f| {
            archs.contains(&f.architecture)
                || (archs.is_empty() && model_type == Some(f.model_type))
        });
        if let Some(f) = family {
            return Ok(Architecture(f));
        }
        let found = match (archs.first(), model_type) {
            (Some(a), _) => format!("{a:?}"),
            (None, Some(t)) => format!("(model_type {t:?})"),
            (None, None) => "nothing (no \"architectures\" or \"model_type\")".to_string(),
        };
        Err(ModelError::UnknownArchitecture {
            found,
            path: path.display().to_string(),
            supported: Self::supported(),
        })
    }
}

impl PartialEq for Architecture {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Architecture {}

impl std::fmt::Debug for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Architecture {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
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
    fn the_supported_list_is_the_table() {
        assert_eq!(
            Architecture::supported(),
            "CLIPModel, LlavaNextForConditionalGeneration"
        );
        let json = serde_json::to_string(&Architecture::Clip).unwrap();
        assert_eq!(json, "\"CLIPModel\"");
    }
}
