//! The parts of a LLaVA-NeXT `config.json` the model needs ([`LlavaConfig`]),
//! checked for values vlembed can serve.

use serde_json::Value;

use super::anyres::{self, parse_pinpoints, DEFAULT_PINPOINTS};
use super::mistral::MistralConfig;
use crate::models::clip::ClipVisionConfig;
use crate::models::error::ConfigError;
use crate::preprocess::Size;

/// The parts of a LLaVA-NeXT `config.json` the model needs.
#[derive(Debug, Clone)]
pub struct LlavaConfig {
    pub text_config: MistralConfig,
    pub vision_config: ClipVisionConfig,
    pub image_token_index: u32,
    /// `vision_feature_layer` resolved to an index into the vision tower's
    /// `num_hidden_layers + 1` hidden states.
    pub vision_layer: usize,
    /// `image_grid_pinpoints`.
    pub image_grid_pinpoints: Vec<Size>,
}

impl LlavaConfig {
    /// Reads a `LlavaNextForConditionalGeneration` `config.json`.
    pub fn from_json(v: &Value) -> Result<Self, ConfigError> {
        let text = v.get("text_config").cloned().unwrap_or(Value::Null);
        let model_type = text.get("model_type").and_then(|m| m.as_str());
        // transformers reads a text_config without model_type as Llama.
        if model_type != Some("mistral") {
            return Err(format!(
                "text_config.model_type is {}, vlembed serves LLaVA-NeXT with a Mistral decoder (\"mistral\")",
                model_type.map_or("missing".to_string(), |m| format!("{m:?}"))
            ).into());
        }
        let text_config: MistralConfig =
            serde_json::from_value(text).map_err(ConfigError::json("text_config: "))?;
        text_config
            .validate()
            .map_err(|e| format!("text_config: {e}"))?;
        let vision = match v.get("vision_config") {
            Some(Value::Object(o)) => Value::Object(o.clone()),
            // transformers' fallback when vision_config is absent.
            _ => serde_json::json!({
                "intermediate_size": 4096, "hidden_size": 1024, "patch_size": 14,
                "image_size": 336, "num_hidden_layers": 24, "num_attention_heads": 16
            }),
        };
        if let Some(t) = vision.get("model_type").and_then(|m| m.as_str()) {
            if t != "clip_vision_model" {
                return Err(format!(
                    "vision_config.model_type {t:?} is not supported (expected \"clip_vision_model\")"
                ).into());
            }
        }
        let vision_config: ClipVisionConfig =
            serde_json::from_value(vision).map_err(ConfigError::json("vision_config: "))?;
        let vc = &vision_config;
        if vc.patch_size == 0
            || !vc.image_size.is_multiple_of(vc.patch_size)
            || vc.num_attention_heads == 0
            || !vc.hidden_size.is_multiple_of(vc.num_attention_heads)
        {
            return Err(format!(
                "vision_config: image_size {} / patch_size {} / hidden_size {} / heads {} do not fit together",
                vc.image_size, vc.patch_size, vc.hidden_size, vc.num_attention_heads
            ).into());
        }
        let strategy = v
            .get("vision_feature_select_strategy")
            .and_then(|s| s.as_str())
            .unwrap_or("default");
        if strategy != "default" {
            return Err(format!(
                "vision_feature_select_strategy {strategy:?} is not supported (only \"default\")"
            )
            .into());
        }
        let layer = match v.get("vision_feature_layer") {
            None | Some(Value::Null) => -2,
            Some(l) => l
                .as_i64()
                .ok_or_else(|| format!("vision_feature_layer must be one integer, got {l}"))?,
        };
        let states = vc.num_hidden_layers as i64 + 1;
        let resolved = if layer < 0 { states + layer } else { layer };
        if !(0..states).contains(&resolved) {
            return Err(format!(
                "vision_feature_layer {layer} is outside the {states} hidden states of the vision tower"
            ).into());
        }
        let act = v
            .get("projector_hidden_act")
            .and_then(|a| a.as_str())
            .unwrap_or("gelu");
        if act != "gelu" {
            return Err(
                format!("projector_hidden_act {act:?} is not supported (only \"gelu\")").into(),
            );
        }
        let image_token_index = match v.get("image_token_index") {
            None | Some(Value::Null) => 32000,
            Some(i) => i
                .as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| format!("image_token_index must be a token id, got {i}"))?,
        };
        let image_grid_pinpoints = match v.get("image_grid_pinpoints") {
            None | Some(Value::Null) => DEFAULT_PINPOINTS.to_vec(),
            Some(p) => parse_pinpoints(p)?,
        };
        let side = vc.image_size as u32;
        if let Some(p) = image_grid_pinpoints
            .iter()
            .find(|p| p.height % side != 0 || p.width % side != 0)
        {
            return Err(format!(
                "image_grid_pinpoints entry [{}, {}] is not a multiple of the {side}px tiles",
                p.height, p.width
            )
            .into());
        }
        Ok(LlavaConfig {
            text_config,
            vision_config,
            image_token_index,
            vision_layer: resolved as usize,
            image_grid_pinpoints,
        })
    }

    /// Patches per tile side (`image_size / patch_size`).
    pub fn patches_per_side(&self) -> usize {
        self.vision_config.image_size / self.vision_config.patch_size
    }

    /// The grid of tiles (rows, columns) for an image of `size`,
    /// as `get_anyres_image_grid_shape`.
    pub fn grid_shape(&self, size: Size) -> Option<(usize, usize)> {
        let tile = self.vision_config.image_size as u32;
        anyres::grid_shape(size, &self.image_grid_pinpoints, tile)
    }

    /// The number of image features the model makes for an image of
    /// `size`: base tile + unpadded grid with one newline per row.
    pub fn num_image_features(&self, size: Size) -> Option<usize> {
        let tile = self.vision_config.image_size as u32;
        let patch = self.vision_config.patch_size as u32;
        anyres::model_feature_count(size, &self.image_grid_pinpoints, tile, patch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bge_vl_config() -> Value {
        serde_json::json!({
            "architectures": ["LlavaNextForConditionalGeneration"],
            "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
            "image_token_index": 32000,
            "model_type": "llava_next",
            "projector_hidden_act": "gelu",
            "text_config": {"model_type": "mistral", "vocab_size": 32064,
                            "max_position_embeddings": 32768, "rope_theta": 1000000.0,
                            "sliding_window": null, "rms_norm_eps": 1e-5},
            "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                              "model_type": "clip_vision_model", "num_attention_heads": 16,
                              "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
                              "vocab_size": 32000},
            "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default"
        })
    }

    #[test]
    fn reads_the_llava_v1_6_mistral_config() {
        let c = LlavaConfig::from_json(&bge_vl_config()).unwrap();
        assert_eq!(c.vision_layer, 23);
        assert_eq!(c.text_config.hidden_size, 4096);
        assert_eq!(c.text_config.sliding_window, None);
        assert_eq!(c.patches_per_side(), 24);
        // 512x512 -> 672x672 -> 2x2 grid; 576 + 48 * 49 = 2928 features.
        assert_eq!(c.grid_shape(Size::square(512)), Some((2, 2)));
        assert_eq!(c.num_image_features(Size::square(512)), Some(2928));
    }

    #[test]
    fn rejects_configs_it_cannot_run() {
        let mut v = bge_vl_config();
        v["text_config"]["model_type"] = "llama".into();
        assert!(LlavaConfig::from_json(&v)
            .unwrap_err()
            .to_string()
            .contains("mistral"));
        let mut v = bge_vl_config();
        v["vision_feature_select_strategy"] = "full".into();
        assert!(LlavaConfig::from_json(&v).is_err());
        let mut v = bge_vl_config();
        v["vision_feature_layer"] = (-30).into();
        assert!(LlavaConfig::from_json(&v).is_err());
        let mut v = bge_vl_config();
        v["image_grid_pinpoints"] = serde_json::json!([[336, 600]]);
        assert!(LlavaConfig::from_json(&v)
            .unwrap_err()
            .to_string()
            .contains("multiple"));
    }
}
