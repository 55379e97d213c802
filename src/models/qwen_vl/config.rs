//! The parts of a Qwen2-VL / Qwen2.5-VL `config.json` the model needs
//! (transformers 4.51.3 `Qwen2VLConfig` / `Qwen2_5_VLConfig`; missing keys
//! take transformers' defaults), checked so that a model that loads can run.
//!
//! The text fields sit at the top level (transformers <= 4.51) or in a
//! nested `text_config` (later versions): the nested ones win.

use serde::Deserialize;
use serde_json::Value;

use super::preprocess::QwenModelFacts;
use crate::models::ConfigError;

/// Which of the two architectures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Generation {
    /// `Qwen2VLForConditionalGeneration`: LayerNorm, QuickGELU MLP, full
    /// attention in every vision block (GME).
    Qwen2Vl,
    /// `Qwen2_5_VLForConditionalGeneration`: RMSNorm, SwiGLU MLP, window
    /// attention but at `fullatt_block_indexes` (BGE-VL-Screenshot).
    Qwen25Vl,
}

impl Generation {
    /// The `architectures` entry of `config.json`.
    pub fn architecture(self) -> &'static str {
        match self {
            Generation::Qwen2Vl => "Qwen2VLForConditionalGeneration",
            Generation::Qwen25Vl => "Qwen2_5_VLForConditionalGeneration",
        }
    }

    /// The `model_type` of `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Generation::Qwen2Vl => "qwen2_vl",
            Generation::Qwen25Vl => "qwen2_5_vl",
        }
    }

    /// The architecture a parsed `config.json` names (`architectures`
    /// first, else `model_type`).
    pub fn detect(v: &Value) -> Option<Generation> {
        let all = [Generation::Qwen2Vl, Generation::Qwen25Vl];
        let archs: Vec<&str> = v
            .get("architectures")
            .and_then(|a| a.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        if let Some(g) = all.iter().find(|g| archs.contains(&g.architecture())) {
            return Some(*g);
        }
        let mt = v.get("model_type").and_then(|m| m.as_str());
        all.into_iter()
            .find(|g| archs.is_empty() && mt == Some(g.model_type()))
    }
}

/// A vision MLP activation (transformers' `ACT2FN` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `quick_gelu`: `x * sigmoid(1.702 x)`.
    QuickGelu,
    /// `gelu`: the exact (erf) GELU.
    Gelu,
    /// `gelu_pytorch_tanh` / `gelu_new`: the tanh approximation.
    GeluTanh,
    /// `silu` / `swish`.
    Silu,
}

impl Activation {
    fn parse(s: &str) -> Result<Self, ConfigError> {
        match s {
            "quick_gelu" => Ok(Activation::QuickGelu),
            "gelu" => Ok(Activation::Gelu),
            "gelu_pytorch_tanh" | "gelu_new" => Ok(Activation::GeluTanh),
            "silu" | "swish" => Ok(Activation::Silu),
            other => Err(format!("vision hidden_act {other:?} is not supported").into()),
        }
    }
}

/// The language model (Qwen2 decoder) part.
#[derive(Debug, Clone)]
pub struct QwenTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Rotary frequencies given to the temporal, height and width
    /// positions; sums to `head_dim / 2`.
    pub mrope_section: [usize; 3],
}

impl QwenTextConfig {
    /// The sizes of one decoder layer (Qwen2: q/k/v with biases).
    pub fn layer_shape(&self) -> crate::models::decoder::LayerShape {
        crate::models::decoder::LayerShape {
            hidden: self.hidden_size,
            intermediate: self.intermediate_size,
            heads: self.num_attention_heads,
            kv_heads: self.num_key_value_heads,
            head_dim: self.head_dim(),
            rms_norm_eps: self.rms_norm_eps,
            qkv_bias: true,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// The vision tower part.
#[derive(Debug, Clone)]
pub struct QwenVisionConfig {
    pub depth: usize,
    /// The tower's width (Qwen2-VL `embed_dim`, Qwen2.5-VL `hidden_size`).
    pub hidden_size: usize,
    /// The merger's output: the language model's width.
    pub out_hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub spatial_merge_size: usize,
    pub in_channels: usize,
    pub act: Activation,
    /// Qwen2.5-VL: window side in pixels (`window_size`); `None`: every
    /// block attends over the whole image (Qwen2-VL).
    pub window_size: Option<usize>,
    /// Qwen2.5-VL: the blocks with full attention.
    pub fullatt_block_indexes: Vec<usize>,
}

impl QwenVisionConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Values per flattened patch.
    pub fn patch_len(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Patches merged into one language-model token.
    pub fn merge_unit(&self) -> usize {
        self.spatial_merge_size * self.spatial_merge_size
    }

    /// Window side in merged tokens (`window_size // merge // patch`).
    pub fn window_tokens(&self) -> Option<usize> {
        self.window_size
            .map(|w| w / self.spatial_merge_size / self.patch_size)
    }
}

/// A Qwen2-VL / Qwen2.5-VL `config.json`.
#[derive(Debug, Clone)]
pub struct QwenVlConfig {
    pub generation: Generation,
    pub text: QwenTextConfig,
    pub vision: QwenVisionConfig,
    pub image_token_id: u32,
    pub video_token_id: Option<u32>,
}

fn d_vocab() -> usize {
    152064
}
fn d_hidden() -> usize {
    8192
}
fn d_inter() -> usize {
    29568
}
fn d_layers() -> usize {
    80
}
fn d_heads() -> usize {
    64
}
fn d_max_pos() -> usize {
    32768
}
fn d_eps() -> f64 {
    1e-5
}
fn d_theta() -> f64 {
    1_000_000.0
}
fn d_act() -> String {
    "silu".into()
}

#[derive(Deserialize)]
struct RawText {
    #[serde(default = "d_vocab")]
    vocab_size: usize,
    #[serde(default = "d_hidden")]
    hidden_size: usize,
    #[serde(default = "d_inter")]
    intermediate_size: usize,
    #[serde(default = "d_layers")]
    num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default = "d_act")]
    hidden_act: String,
    #[serde(default = "d_max_pos")]
    max_position_embeddings: usize,
    #[serde(default = "d_eps")]
    rms_norm_eps: f64,
    #[serde(default = "d_theta")]
    rope_theta: f64,
    #[serde(default)]
    use_sliding_window: bool,
    #[serde(default)]
    rope_scaling: Option<Value>,
}

#[derive(Deserialize)]
struct RawVision {
    depth: Option<usize>,
    embed_dim: Option<usize>,
    hidden_size: Option<usize>,
    out_hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    mlp_ratio: Option<f64>,
    num_heads: Option<usize>,
    patch_size: Option<usize>,
    temporal_patch_size: Option<usize>,
    spatial_merge_size: Option<usize>,
    in_channels: Option<usize>,
    in_chans: Option<usize>,
    hidden_act: Option<String>,
    window_size: Option<usize>,
    fullatt_block_indexes: Option<Vec<usize>>,
}

fn token_id(v: &Value, key: &str, default: Option<u32>) -> Result<Option<u32>, ConfigError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .map(Some)
            .ok_or_else(|| format!("{key} must be a token id, got {x}").into()),
    }
}

impl QwenVlConfig {
    /// Reads a parsed `config.json`.
    pub fn from_json(v: &Value) -> Result<Self, ConfigError> {
        let generation = Generation::detect(v).ok_or_else(|| {
            ConfigError::from("config.json names neither Qwen2VLForConditionalGeneration nor Qwen2_5_VLForConditionalGeneration")
        })?;
        let mut text = match v {
            Value::Object(o) => o.clone(),
            _ => return Err("config.json is not a JSON object".into()),
        };
        if let Some(Value::Object(t)) = v.get("text_config") {
            for (k, x) in t {
                text.insert(k.clone(), x.clone());
            }
        }
        text.remove("vision_config");
        let raw: RawText =
            serde_json::from_value(Value::Object(text)).map_err(ConfigError::json(""))?;
        if raw.use_sliding_window {
            return Err("use_sliding_window true is not supported".into());
        }
        if raw.hidden_act != "silu" && raw.hidden_act != "swish" {
            return Err(format!(
                "hidden_act {:?} is not supported (Qwen2 uses \"silu\")",
                raw.hidden_act
            )
            .into());
        }
        let heads = raw.num_attention_heads;
        let kv = raw.num_key_value_heads.unwrap_or(heads);
        if heads == 0
            || kv == 0
            || !heads.is_multiple_of(kv)
            || !raw.hidden_size.is_multiple_of(heads)
        {
            return Err(format!(
                "hidden_size {} / num_attention_heads {heads} / num_key_value_heads {kv} do not fit together",
                raw.hidden_size
            )
            .into());
        }
        let head_dim = raw.hidden_size / heads;
        let scaling = raw
            .rope_scaling
            .as_ref()
            .ok_or("rope_scaling with an mrope_section is required (Qwen2-VL's M-RoPE)")?;
        for key in ["type", "rope_type"] {
            if let Some(t) = scaling.get(key).and_then(|t| t.as_str()) {
                if t != "mrope" && t != "default" {
                    return Err(format!("rope_scaling {key} {t:?} is not supported").into());
                }
            }
        }
        let section: Vec<usize> = scaling
            .get("mrope_section")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .ok_or("rope_scaling.mrope_section must be three integers")?;
        let mrope_section: [usize; 3] = section
            .try_into()
            .map_err(|_| ConfigError::from("rope_scaling.mrope_section must be three integers"))?;
        if !head_dim.is_multiple_of(2) || mrope_section.iter().sum::<usize>() != head_dim / 2 {
            return Err(format!(
                "mrope_section {mrope_section:?} must sum to head_dim / 2 = {}",
                head_dim / 2
            )
            .into());
        }
        if raw.vocab_size == 0 || raw.max_position_embeddings == 0 || raw.num_hidden_layers == 0 {
            return Err(
                "vocab_size, max_position_embeddings and num_hidden_layers must be positive".into(),
            );
        }
        let text = QwenTextConfig {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            max_position_embeddings: raw.max_position_embeddings,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta: raw.rope_theta,
            mrope_section,
        };
        let mut rv: RawVision = serde_json::from_value(
            v.get("vision_config")
                .cloned()
                .unwrap_or(Value::Object(Default::default())),
        )
        .map_err(ConfigError::json("vision_config: "))?;
        // The two generations name their widths differently (Qwen2-VL's
        // `hidden_size` is the merger's output, its width `embed_dim`) and
        // differ in activation and attention windows; the rest is shared.
        let (hidden_size, out_hidden_size, intermediate_size, act, window_size, full) =
            match generation {
                Generation::Qwen2Vl => {
                    let width = rv.embed_dim.unwrap_or(1280);
                    let ratio = rv.mlp_ratio.unwrap_or(4.0);
                    let out = rv.hidden_size.unwrap_or(3584);
                    let inter = (width as f64 * ratio) as usize;
                    (width, out, inter, "quick_gelu", None, Vec::new())
                }
                Generation::Qwen25Vl => (
                    rv.hidden_size.unwrap_or(3584),
                    rv.out_hidden_size.unwrap_or(3584),
                    rv.intermediate_size.unwrap_or(3420),
                    "silu",
                    Some(rv.window_size.unwrap_or(112)),
                    rv.fullatt_block_indexes
                        .take()
                        .unwrap_or_else(|| vec![7, 15, 23, 31]),
                ),
            };
        let vision = QwenVisionConfig {
            depth: rv.depth.unwrap_or(32),
            hidden_size,
            out_hidden_size,
            intermediate_size,
            num_heads: rv.num_heads.unwrap_or(16),
            patch_size: rv.patch_size.unwrap_or(14),
            temporal_patch_size: rv.temporal_patch_size.unwrap_or(2),
            spatial_merge_size: rv.spatial_merge_size.unwrap_or(2),
            in_channels: rv.in_channels.or(rv.in_chans).unwrap_or(3),
            act: Activation::parse(rv.hidden_act.as_deref().unwrap_or(act))?,
            window_size,
            fullatt_block_indexes: full,
        };
        let vc = &vision;
        if vc.num_heads == 0
            || !vc.hidden_size.is_multiple_of(vc.num_heads)
            || !vc.head_dim().is_multiple_of(4)
            || vc.patch_size == 0
            || vc.spatial_merge_size == 0
            || vc.temporal_patch_size == 0
            || vc.in_channels != 3
            || vc.depth == 0
        {
            return Err(format!(
                "vision_config: hidden {} / heads {} / patch {} / merge {} / temporal {} / channels {} do not fit together (head_dim must be a multiple of 4, 3 channels)",
                vc.hidden_size, vc.num_heads, vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size, vc.in_channels
            )
            .into());
        }
        if vc.out_hidden_size != text.hidden_size {
            return Err(format!(
                "the vision merger makes {}-wide tokens, the language model is {} wide",
                vc.out_hidden_size, text.hidden_size
            )
            .into());
        }
        if let Some(w) = vc.window_tokens() {
            if w == 0 {
                return Err(format!(
                    "vision_config.window_size {:?} is under one merged token ({} pixels)",
                    vc.window_size,
                    vc.patch_size * vc.spatial_merge_size
                )
                .into());
            }
        }
        if let Some(bad) = vc.fullatt_block_indexes.iter().find(|&&i| i >= vc.depth) {
            return Err(format!(
                "fullatt_block_indexes names block {bad} of a {}-block tower",
                vc.depth
            )
            .into());
        }
        let image_token_id = token_id(v, "image_token_id", Some(151655))?.unwrap_or(151655);
        let video_token_id = token_id(v, "video_token_id", Some(151656))?;
        if image_token_id as usize >= text.vocab_size {
            return Err(
                format!("image_token_id {image_token_id} is outside the vocabulary").into(),
            );
        }
        Ok(QwenVlConfig {
            generation,
            text,
            vision,
            image_token_id,
            video_token_id,
        })
    }

    /// What the processor must agree with, for prompts of at most
    /// `max_tokens` tokens (capped at `max_position_embeddings`).
    pub fn facts(&self, max_tokens: usize) -> QwenModelFacts {
        QwenModelFacts {
            image_token_id: self.image_token_id,
            video_token_id: self.video_token_id,
            patch_size: self.vision.patch_size as u32,
            temporal_patch_size: self.vision.temporal_patch_size as u32,
            spatial_merge_size: self.vision.spatial_merge_size as u32,
            max_tokens: max_tokens.min(self.text.max_position_embeddings),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qwen25_3b() -> Value {
        serde_json::json!({
            "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
            "hidden_size": 2048, "intermediate_size": 11008, "num_attention_heads": 16,
            "num_hidden_layers": 36, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
            "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0, "tie_word_embeddings": true, "vocab_size": 151936,
            "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
            "max_position_embeddings": 128000, "sliding_window": 32768, "use_sliding_window": false,
            "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280,
                "intermediate_size": 3420, "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048,
                "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                "tokens_per_second": 2, "temporal_patch_size": 2}
        })
    }

    #[test]
    fn reads_the_released_qwen25_vl_3b_config() {
        let c = QwenVlConfig::from_json(&qwen25_3b()).unwrap();
        assert_eq!(c.generation, Generation::Qwen25Vl);
        assert_eq!(c.text.head_dim(), 128);
        assert_eq!(c.text.mrope_section, [16, 24, 24]);
        assert_eq!(c.vision.window_tokens(), Some(4));
        assert_eq!(c.vision.head_dim(), 80);
        assert_eq!(c.vision.patch_len(), 1176);
        assert_eq!(c.facts(1 << 20).max_tokens, 128000);
    }

    #[test]
    fn reads_qwen2_vl_and_refuses_what_it_cannot_run() {
        let v = serde_json::json!({
            "architectures": ["Qwen2VLForConditionalGeneration"], "hidden_size": 1536,
            "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
            "vision_config": {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "mlp_ratio": 4,
                              "num_heads": 16, "in_chans": 3, "hidden_act": "quick_gelu"}
        });
        let c = QwenVlConfig::from_json(&v).unwrap();
        assert_eq!(c.generation, Generation::Qwen2Vl);
        assert_eq!(c.vision.intermediate_size, 5120);
        assert_eq!(c.vision.window_tokens(), None);
        assert_eq!(c.vision.act, Activation::QuickGelu);
        let mut bad = v.clone();
        bad["rope_scaling"]["mrope_section"] = serde_json::json!([16, 24, 23]);
        assert!(QwenVlConfig::from_json(&bad)
            .unwrap_err()
            .to_string()
            .contains("sum"));
        let mut bad = v.clone();
        bad["rope_scaling"] = Value::Null;
        assert!(QwenVlConfig::from_json(&bad).is_err());
        let mut bad = v.clone();
        bad["vision_config"]["hidden_size"] = 1000.into();
        assert!(QwenVlConfig::from_json(&bad)
            .unwrap_err()
            .to_string()
            .contains("wide"));
        let mut bad = qwen25_3b();
        bad["vision_config"]["fullatt_block_indexes"] = serde_json::json!([40]);
        assert!(QwenVlConfig::from_json(&bad).is_err());
        let mut bad = qwen25_3b();
        bad["use_sliding_window"] = true.into();
        assert!(QwenVlConfig::from_json(&bad).is_err());
        let llava = serde_json::json!({"architectures": ["LlavaNextForConditionalGeneration"]});
        assert!(QwenVlConfig::from_json(&llava).is_err());
    }
}
