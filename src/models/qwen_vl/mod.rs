//! Qwen2-VL and Qwen2.5-VL as embedding models (BGE-VL-Screenshot, GME, any
//! `Qwen2VLForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration`
//! checkpoint), transformers 4.51.3: one family module.
//!
//! Owns: the two [`Family`] values ([`QWEN2_VL`], [`QWEN25_VL`]) and their
//! loader (config, prompt format, pixel bounds, token limit, the
//! preprocessor checked against the model), and through its submodules
//! everything else of the family:
//! - [`config`]: [`QwenVlConfig`] (`config.json`; it is the family's
//!   [`Replicas`]);
//! - [`prompt`]: [`PromptFormat`] (chat-template, screenshot, gme), GME's
//!   prompt, [`PositionIds`];
//! - [`template`]: chat templates through minijinja;
//! - [`image`]: `Qwen2VLImageProcessor` (`smart_resize`, patches) and
//!   GME's `fetch_image` sizes;
//! - [`preprocess`]: [`QwenPreprocessor`] (the family's `Preprocess`) and
//!   [`QwenPrepared`] (its `PreparedData`);
//! - [`model`]: [`QwenVlModel`] (the family's `Model`), [`vision`] and
//!   [`decoder`] (the towers, on candle's ops).
//!
//! May not touch: HTTP, queues, batching policy. Nothing outside this
//! module names the family but its line in `models::families::FAMILIES`.
//!
//! Why not candle-transformers' `qwen2`: its Qwen2 returns logits through
//! a KV cache behind `&mut self` and has no M-RoPE or Qwen2-VL vision tower;
//! the embedding needs right-padded batches with per-sequence M-RoPE
//! positions, stepped layers and the last layer for the pooled token only
//! (docs/ARCHITECTURE.md, "Own model code").

pub mod config;
pub mod decoder;
pub mod image;
pub mod model;
pub mod preprocess;
pub mod prompt;
pub mod template;
pub mod vision;

use candle_nn::VarBuilder;

pub use config::{Generation, QwenTextConfig, QwenVisionConfig, QwenVlConfig};
pub use image::GridThw;
pub use model::{position_ids, QwenVlModel};
pub use preprocess::{QwenFiles, QwenImage, QwenOptions, QwenPrepared, QwenPreprocessor};
pub use prompt::{PositionIds, PromptFormat};

use crate::models::error::ModelError;
use crate::models::family::{Facts, Family, FamilyModel, LoadContext, Replicas, WithPass};
use crate::models::{ops, source};

/// The longest prompt by default, image tokens included (GME's largest
/// image is 1280 tokens; BGE-VL-Screenshot's processor allows more, which a
/// per-model `max_input_tokens` can raise). The decoder's attention scores
/// are computed in blocks (`decoder::SCORE_BUDGET`), so this bounds the
/// work, not a `t x t` allocation.
pub const DEFAULT_MAX_INPUT_TOKENS: usize = 8192;

/// A token limit that no image fits in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{tokens} tokens leave no room for an image, which makes at least {least} (min_pixels {min_pixels})")]
pub struct NoRoomForImage {
    pub tokens: usize,
    pub least: u64,
    pub min_pixels: u64,
}

/// One of the two Qwen-VL architectures as a family (they share the loader,
/// the preprocessor and the model; the config says which tower to build).
pub struct QwenVl(Generation);

/// `Qwen2VLForConditionalGeneration` (GME-Qwen2-VL 2B / 7B).
pub const QWEN2_VL: QwenVl = QwenVl(Generation::Qwen2Vl);
/// `Qwen2_5_VLForConditionalGeneration` (BGE-VL-Screenshot).
pub const QWEN25_VL: QwenVl = QwenVl(Generation::Qwen25Vl);

impl Family for QwenVl {
    fn architecture(&self) -> &'static str {
        self.0.architecture()
    }

    fn model_type(&self) -> &'static str {
        self.0.model_type()
    }

    fn load(&self, cx: &LoadContext<'_>) -> Result<FamilyModel, ModelError> {
        load(self.0, cx)
    }
}

/// Reads the config, picks the prompt format (configured, else by Hub id,
/// else the chat template) and loads the preprocessor against the model.
fn load(generation: Generation, cx: &LoadContext<'_>) -> Result<FamilyModel, ModelError> {
    let cfg = QwenVlConfig::from_json(cx.config).map_err(|e| cx.invalid_config(e))?;
    if cfg.generation != generation {
        return Err(ModelError::Load(format!(
            "{} names {} but was taken for {}",
            cx.config_path.display(),
            cfg.generation.architecture(),
            generation.architecture()
        )));
    }
    let configured = cx
        .opts
        .prompt_format
        .as_deref()
        .map(str::parse::<PromptFormat>)
        .transpose()
        .map_err(|e| ModelError::Setting {
            key: "prompt_format",
            source: Box::new(e),
        })?;
    let format = PromptFormat::resolve(configured, cx.hub_id);
    let max_tokens = cx.opts.max_input_tokens.unwrap_or(DEFAULT_MAX_INPUT_TOKENS);
    let facts = cfg.facts(max_tokens);
    let files = QwenFiles {
        tokenizer: cx.files.required(source::TOKENIZER)?,
        preprocessor_config: cx.files.required(source::PREPROCESSOR_CONFIG)?,
        tokenizer_config: cx.files.optional(preprocess::TOKENIZER_CONFIG)?,
        chat_template: cx.files.optional(preprocess::CHAT_TEMPLATE)?,
    };
    let options = QwenOptions {
        min_pixels: cx.opts.min_pixels,
        max_pixels: cx.opts.max_pixels,
    };
    let pre = QwenPreprocessor::load(&files, &facts, format, options, cx.opts.image_limits)?;
    // Every image makes at least this many tokens: a token limit at or
    // under it would refuse every image.
    let images = pre.image_processor();
    let factor = u64::from(images.factor());
    let least = images.min_pixels().div_ceil(factor * factor).max(1);
    if facts.max_tokens as u64 <= least {
        return Err(ModelError::Setting {
            key: "max_input_tokens",
            source: Box::new(NoRoomForImage {
                tokens: facts.max_tokens,
                least,
                min_pixels: images.min_pixels(),
            }),
        });
    }
    tracing::info!(
        architecture = generation.architecture(),
        prompt_format = %format,
        min_pixels = images.min_pixels(),
        max_pixels = images.max_pixels(),
        max_input_tokens = facts.max_tokens,
        "Qwen-VL preprocessing"
    );
    let facts = Facts {
        dimensions: cfg.text.hidden_size,
        max_text_tokens: pre.max_text_tokens(),
        uses_instructions: true,
    };
    let pass = cx.opts.pass;
    Ok(FamilyModel::new(facts, pre, WithPass { cfg, pass }))
}

/// The decoder groups follow the pass sizes
/// (`PassLimits::decoder_group_tokens`).
impl Replicas for WithPass<QwenVlConfig> {
    type Model = QwenVlModel;

    /// The products run on candle's own kernels on every device: the
    /// native and oneDNN backends serve the CLIP encoders (`ops`), so the
    /// CPU backend choice does not apply here.
    fn build(&self, vb: VarBuilder, _backend: ops::Backend) -> Result<QwenVlModel, ModelError> {
        QwenVlModel::new(&self.cfg, self.pass, vb)
    }
}
