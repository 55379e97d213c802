//! The table of model families ([`FAMILIES`]): the one place that names
//! every family, and so the only dispatch point. Architecture detection, the
//! "supported architectures" message and loading all read it.
//!
//! Adding a family: its module under `models/` (see [`super::family`] for
//! what it provides) and one line here. Nothing else in the server names a
//! family.

use std::path::Path;

use super::clip::Clip;
use super::error::ModelError;
use super::family::Family;
use super::llava::LlavaNext;
use super::qwen_vl::{QWEN25_VL, QWEN2_VL};

/// Every family, in detection order.
pub const FAMILIES: &[&dyn Family] = &[&Clip, &LlavaNext, &QWEN2_VL, &QWEN25_VL];

/// The architectures vlembed serves, for error messages.
pub fn supported() -> String {
    FAMILIES
        .iter()
        .map(|f| f.architecture())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Picks the family of a parsed `config.json`: the first family (in
/// [`FAMILIES`] order) listed in `architectures`, else the one whose
/// `model_type` it has when `architectures` is absent.
pub fn detect(config: &serde_json::Value, path: &Path) -> Result<&'static dyn Family, ModelError> {
    let archs: Vec<&str> = config
        .get("architectures")
        .and_then(|a| a.as_array())
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    let model_type = config.get("model_type").and_then(|m| m.as_str());
    let family = FAMILIES.iter().find(|f| {
        archs.contains(&f.architecture())
            || (archs.is_empty() && model_type == Some(f.model_type()))
    });
    if let Some(f) = family {
        return Ok(*f);
    }
    let found = match (archs.first(), model_type) {
        (Some(a), _) => format!("{a:?}"),
        (None, Some(t)) => format!("(model_type {t:?})"),
        (None, None) => "nothing (no \"architectures\" or \"model_type\")".to_string(),
    };
    Err(ModelError::UnknownArchitecture {
        found,
        path: path.display().to_string(),
        supported: supported(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arch(v: serde_json::Value) -> Result<&'static str, ModelError> {
        detect(&v, Path::new("config.json")).map(|f| f.architecture())
    }

    #[test]
    fn detects_clip_and_names_unknown_architectures() {
        let clip = serde_json::json!({"architectures": ["CLIPModel"], "model_type": "clip"});
        assert_eq!(arch(clip).unwrap(), "CLIPModel");
        assert_eq!(
            arch(serde_json::json!({"model_type": "clip"})).unwrap(),
            "CLIPModel"
        );
        let msg = arch(serde_json::json!({"architectures": ["BertModel"]}))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("BertModel") && msg.contains("CLIPModel"),
            "{msg}"
        );
        let msg = arch(serde_json::json!({})).unwrap_err().to_string();
        assert!(msg.contains("no \"architectures\""), "{msg}");
    }

    #[test]
    fn detects_llava_next() {
        let v = serde_json::json!({
            "architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next"
        });
        assert_eq!(arch(v).unwrap(), "LlavaNextForConditionalGeneration");
        let bare = serde_json::json!({"model_type": "llava_next"});
        assert_eq!(arch(bare).unwrap(), "LlavaNextForConditionalGeneration");
        let llava15 = serde_json::json!({"architectures": ["LlavaForConditionalGeneration"]});
        let msg = arch(llava15).unwrap_err().to_string();
        assert!(msg.contains("LlavaNextForConditionalGeneration"), "{msg}");
    }

    #[test]
    fn detects_qwen2_vl_and_qwen25_vl() {
        for (arch_name, model_type) in [
            ("Qwen2VLForConditionalGeneration", "qwen2_vl"),
            ("Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl"),
        ] {
            let v = serde_json::json!({"architectures": [arch_name], "model_type": model_type});
            assert_eq!(arch(v).unwrap(), arch_name);
            let bare = serde_json::json!({"model_type": model_type});
            assert_eq!(arch(bare).unwrap(), arch_name);
        }
    }

    #[test]
    fn the_supported_list_is_the_table() {
        assert_eq!(
            supported(),
            "CLIPModel, LlavaNextForConditionalGeneration, Qwen2VLForConditionalGeneration, \
             Qwen2_5_VLForConditionalGeneration"
        );
    }
}
