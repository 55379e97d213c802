//! BGE-VL-MLLM (HF `LlavaNextForConditionalGeneration`, transformers 4.45.2)
//! as an embedding model.
//!
//! Owns: the family's loader (config, processor files checked against the
//! model), [`LlavaConfig`] (read from `config.json`), its preprocessing
//! ([`LlavaPreprocessor`], making [`LlavaInput`]s) and [`LlavaModel`]:
//!
//! - vision tower: [`ClipVisionTransformer`] at `vision_tower.vision_model`,
//!   `hidden_states[vision_feature_layer]` (a negative layer counts from the
//!   end of the `num_layers + 1` hidden states), CLS dropped ("default");
//! - `multi_modal_projector`: `linear_1`, GELU (erf), `linear_2`;
//! - any-resolution packing as `pack_image_features`: the base tile's
//!   features first, then the grid tiles arranged spatially, unpadded to the
//!   image's aspect ([`anyres::unpad_bounds`]) with `image_newline` after every row;
//! - the features replace the `<image>` tokens of the prompt (their number
//!   must match exactly), then the Mistral decoder ([`MistralModel`]);
//! - the embedding is the final-norm hidden state of the last token
//!   (unnormalised).
//!
//! Weights use the llava-hf names (`language_model.model.*`,
//! `vision_tower.vision_model.*`, `multi_modal_projector.*`, `image_newline`);
//! `lm_head.weight` is never read.
//!
//! Layout: [`config`], [`preprocess`] (prompts, any-resolution tiles),
//! [`anyres`] (the geometry both sides share), [`model`], [`mistral`] (the
//! decoder), this module (the family and its loader).

pub mod anyres;
pub mod config;
pub mod mistral;
pub mod model;
pub mod preprocess;

use candle_nn::VarBuilder;

pub use config::LlavaConfig;
pub use model::LlavaModel;
pub use preprocess::{LlavaImage, LlavaInput, LlavaPreprocessor};

use crate::models::error::ModelError;
use crate::models::family::{Facts, Family, FamilyModel, LoadContext, Replicas, WithPass};
use crate::models::{ops, source};
use crate::preprocess::Size;

/// The longest prompt by default, in tokens: BGE-VL-MLLM's 2928 image
/// tokens plus 1168 for the template, instruction and text. The decoder's
/// attention memory grows with its square (the additive mask is
/// `t x t` f32 per sequence: 64 MiB at 4096).
pub const DEFAULT_MAX_INPUT_TOKENS: usize = 4096;

/// The LLaVA-NeXT family: `LlavaNextForConditionalGeneration` with a
/// Mistral decoder (BGE-VL-MLLM-S1, BGE-VL-MLLM-S2).
pub struct LlavaNext;

impl Family for LlavaNext {
    fn architecture(&self) -> &'static str {
        "LlavaNextForConditionalGeneration"
    }

    fn model_type(&self) -> &'static str {
        "llava_next"
    }

    fn load(&self, cx: &LoadContext<'_>) -> Result<FamilyModel, ModelError> {
        load(cx)
    }
}

/// Reads the config, then the tokenizer and processor configs, checked
/// against the model's image geometry.
fn load(cx: &LoadContext<'_>) -> Result<FamilyModel, ModelError> {
    let cfg = LlavaConfig::from_json(cx.config).map_err(|e| cx.invalid_config(e))?;
    let tokenizer_path = cx.files.required(source::TOKENIZER)?;
    let pre_path = cx.files.required(source::PREPROCESSOR_CONFIG)?;
    let proc_path = cx.files.optional(source::PROCESSOR_CONFIG)?;
    let square = Size::square(preprocess::RESIZE_TO);
    let model_features = cfg
        .num_image_features(square)
        .ok_or_else(|| ModelError::Load("config.json has no image_grid_pinpoints".into()))?;
    let model_tiles = cfg.grid_shape(square).map_or(0, |(gh, gw)| 1 + gh * gw);
    let max_tokens = cx
        .opts
        .max_input_tokens
        .unwrap_or(DEFAULT_MAX_INPUT_TOKENS)
        .min(cfg.text_config.max_position_embeddings);
    if max_tokens <= model_features {
        return Err(ModelError::Load(format!(
            "max_input_tokens {max_tokens} leaves no room for the {model_features} tokens of an image"
        )));
    }
    let facts = preprocess::LlavaModelFacts {
        tile: cfg.vision_config.image_size as u32,
        patch: cfg.vision_config.patch_size as u32,
        image_token_id: cfg.image_token_index,
        model_features,
        model_tiles,
        max_tokens,
    };
    let pre = LlavaPreprocessor::load(
        &tokenizer_path,
        &pre_path,
        proc_path.as_deref(),
        &facts,
        cx.opts.image_limits,
    )?;
    let facts = Facts {
        dimensions: cfg.text_config.hidden_size,
        max_text_tokens: pre.max_text_tokens(),
        uses_instructions: true,
    };
    let matmuls = cfg.vision_config.matmul_shapes();
    let replicas = WithPass {
        cfg,
        pass: cx.opts.pass,
    };
    Ok(FamilyModel::new(facts, pre, replicas).with_matmuls(matmuls))
}

/// The vision tower's tile chunks and the decoder groups follow the pass
/// sizes.
impl Replicas for WithPass<LlavaConfig> {
    type Model = LlavaModel;

    fn build(&self, vb: VarBuilder, backend: ops::Backend) -> Result<LlavaModel, ModelError> {
        LlavaModel::with_backend(&self.cfg, self.pass, vb, backend).map_err(|e| ModelError::Build {
            family: "LLaVA",
            source: Box::new(e),
        })
    }
}
