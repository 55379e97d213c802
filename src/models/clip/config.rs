//! The parts of a CLIP `config.json` the model reads, with transformers'
//! defaults for missing keys, checked for shapes that fit together.

use candle_core::Tensor;
use serde::Deserialize;

use crate::models::error::ConfigError;

/// Activation functions found in CLIP configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Activation {
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    #[serde(rename = "gelu")]
    Gelu,
    #[serde(alias = "gelu_new", alias = "gelu_fast", rename = "gelu_pytorch_tanh")]
    GeluTanh,
    #[serde(rename = "relu")]
    Relu,
}

impl Activation {
    pub(super) fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Activation::Gelu => x.gelu_erf(),
            Activation::GeluTanh => x.gelu(),
            Activation::Relu => x.relu(),
        }
    }
}

fn d_quick_gelu() -> Activation {
    Activation::QuickGelu
}
fn d_eps() -> f64 {
    1e-5
}

/// `text_config` of a CLIP `config.json` (defaults as transformers' CLIPTextConfig).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_512")]
    pub hidden_size: usize,
    #[serde(default = "d_2048")]
    pub intermediate_size: usize,
    #[serde(default = "d_12")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_8")]
    pub num_attention_heads: usize,
    #[serde(default = "d_77")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_quick_gelu")]
    pub hidden_act: Activation,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_eos")]
    pub eos_token_id: u32,
}

/// `vision_config` of a CLIP `config.json` (defaults as CLIPVisionConfig).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionConfig {
    #[serde(default = "d_768")]
    pub hidden_size: usize,
    #[serde(default = "d_3072")]
    pub intermediate_size: usize,
    #[serde(default = "d_12")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_12")]
    pub num_attention_heads: usize,
    #[serde(default = "d_3")]
    pub num_channels: usize,
    #[serde(default = "d_224")]
    pub image_size: usize,
    #[serde(default = "d_32")]
    pub patch_size: usize,
    #[serde(default = "d_quick_gelu")]
    pub hidden_act: Activation,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
}

fn d_vocab() -> usize {
    49408
}
fn d_eos() -> u32 {
    49407
}
macro_rules! defaults {
    ($($name:ident = $v:expr),*) => { $(fn $name() -> usize { $v })* };
}
defaults!(
    d_3 = 3,
    d_8 = 8,
    d_12 = 12,
    d_32 = 32,
    d_77 = 77,
    d_224 = 224,
    d_512 = 512,
    d_768 = 768,
    d_2048 = 2048,
    d_3072 = 3072
);

/// The parts of a CLIP `config.json` the model needs.
#[derive(Debug, Clone)]
pub struct ClipConfig {
    pub text_config: ClipTextConfig,
    pub vision_config: ClipVisionConfig,
    pub projection_dim: usize,
}

impl ClipConfig {
    /// Reads `text_config` / `vision_config` (or their legacy `*_dict` names)
    /// and `projection_dim`, checking the shapes are consistent.
    pub fn from_json(v: &serde_json::Value) -> Result<Self, ConfigError> {
        let section = |name: &str| -> serde_json::Value {
            v.get(name)
                .or_else(|| v.get(format!("{name}_dict")))
                .cloned()
                .unwrap_or_else(|| serde_json::json!({}))
        };
        let text_config: ClipTextConfig = serde_json::from_value(section("text_config"))
            .map_err(ConfigError::json("text_config: "))?;
        let vision_config: ClipVisionConfig = serde_json::from_value(section("vision_config"))
            .map_err(ConfigError::json("vision_config: "))?;
        let projection_dim = match v.get("projection_dim") {
            None => 512,
            Some(p) => p
                .as_u64()
                .ok_or("projection_dim is not a positive integer")? as usize,
        };
        let check_heads = |what: &str, hidden: usize, heads: usize| -> Result<(), ConfigError> {
            if heads == 0 || !hidden.is_multiple_of(heads) {
                Err(format!(
                    "{what}: hidden_size {hidden} is not divisible by num_attention_heads {heads}"
                )
                .into())
            } else {
                Ok(())
            }
        };
        check_heads(
            "text_config",
            text_config.hidden_size,
            text_config.num_attention_heads,
        )?;
        check_heads(
            "vision_config",
            vision_config.hidden_size,
            vision_config.num_attention_heads,
        )?;
        let vc = &vision_config;
        if vc.patch_size == 0 || !vc.image_size.is_multiple_of(vc.patch_size) {
            return Err(format!(
                "vision_config: image_size {} is not a multiple of patch_size {}",
                vc.image_size, vc.patch_size
            )
            .into());
        }
        if projection_dim == 0 || text_config.max_position_embeddings == 0 {
            return Err("projection_dim and max_position_embeddings must be positive".into());
        }
        Ok(ClipConfig {
            text_config,
            vision_config,
            projection_dim,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn config_defaults_and_legacy_dict_names() {
        let v = serde_json::json!({
            "architectures": ["CLIPModel"],
            "text_config_dict": {"hidden_size": 32, "num_attention_heads": 4},
            "vision_config": {"patch_size": 16}
        });
        let c = ClipConfig::from_json(&v).unwrap();
        assert_eq!(c.text_config.hidden_size, 32);
        assert_eq!(c.text_config.max_position_embeddings, 77);
        assert_eq!(c.text_config.hidden_act, Activation::QuickGelu);
        assert_eq!(c.vision_config.patch_size, 16);
        assert_eq!(c.vision_config.image_size, 224);
        assert_eq!(c.projection_dim, 512);
    }

    #[test]
    fn config_errors_name_the_problem() {
        let v = serde_json::json!({"text_config": {"hidden_size": 30, "num_attention_heads": 4}});
        assert!(ClipConfig::from_json(&v)
            .unwrap_err()
            .to_string()
            .contains("divisible"));
        let v = serde_json::json!({"vision_config": {"image_size": 100, "patch_size": 32}});
        assert!(ClipConfig::from_json(&v)
            .unwrap_err()
            .to_string()
            .contains("multiple"));
        let v = serde_json::json!({"text_config": {"hidden_act": "swish"}});
        assert!(ClipConfig::from_json(&v)
            .unwrap_err()
            .to_string()
            .contains("text_config"));
    }

    #[test]
    fn quick_gelu_matches_its_formula() {
        let x = Tensor::new(&[-2.0f32, -0.5, 0.0, 0.7, 3.0], &Device::Cpu).unwrap();
        let y: Vec<f32> = Activation::QuickGelu.apply(&x).unwrap().to_vec1().unwrap();
        for (a, b) in [-2.0f32, -0.5, 0.0, 0.7, 3.0].iter().zip(y) {
            let want = a / (1.0 + (-1.702 * a).exp());
            assert!((want - b).abs() < 1e-6, "{a}: {want} vs {b}");
        }
    }
}
