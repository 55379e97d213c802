//! BGE-VL-MLLM (HF `LlavaNextForConditionalGeneration`, transformers 4.45.2)
//! as an embedding model.
//!
//! Owns: the family's loader (config, processor files checked against the
//! model), [`LlavaConfig`] (read from `config.json`), and [`LlavaModel`]:
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

use std::ops::ControlFlow;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{linear, Linear, VarBuilder};
use serde_json::Value;

use super::clip::{ClipVisionConfig, ClipVisionTransformer};
use super::family::{Architecture, Family, FamilyModel, LoadContext, ReplicaBuilder};
use super::mistral::{DecoderError, MistralConfig, MistralModel};
use super::{ops, source, ConfigError, EmbeddingModel, ModelError};
use crate::preprocess::anyres::{self, parse_pinpoints, Size, DEFAULT_PINPOINTS};
use crate::preprocess::llava as llava_pre;
use crate::preprocess::{LlavaPreprocessor, Prepared, Preprocessor};

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

/// The longest prompt by default, in tokens: BGE-VL-MLLM's 2928 image
/// tokens plus 1168 for the template, instruction and text. The decoder's
/// attention memory grows with its square (the additive mask is
/// `t x t` f32 per sequence: 64 MiB at 4096).
pub const DEFAULT_MAX_INPUT_TOKENS: usize = 4096;

/// The LLaVA-NeXT family: `LlavaNextForConditionalGeneration` with a
/// Mistral decoder (BGE-VL-MLLM-S1, BGE-VL-MLLM-S2).
pub(super) const FAMILY: Family = Family {
    architecture: "LlavaNextForConditionalGeneration",
    model_type: "llava_next",
    load,
};

impl Architecture {
    /// HF `LlavaNextForConditionalGeneration` with a Mistral decoder
    /// (BGE-VL-MLLM-S1, BGE-VL-MLLM-S2).
    #[allow(non_upper_case_globals)]
    pub const LlavaNext: Architecture = Architecture(&FAMILY);
}

/// Reads the config, then the tokenizer and processor configs, checked
/// against the model's image geometry.
fn load(cx: &LoadContext<'_>) -> Result<FamilyModel, ModelError> {
    let cfg = LlavaConfig::from_json(cx.config).map_err(|e| cx.invalid_config(e))?;
    let tokenizer_path = cx.files.required(source::TOKENIZER)?;
    let pre_path = cx.files.required(source::PREPROCESSOR_CONFIG)?;
    let proc_path = cx.files.optional(source::PROCESSOR_CONFIG)?;
    let square = Size::square(llava_pre::RESIZE_TO);
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
    let facts = llava_pre::LlavaModelFacts {
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
    )
    .map_err(ModelError::Preprocessor)?;
    Ok(FamilyModel {
        dimensions: cfg.text_config.hidden_size,
        max_text_tokens: pre.max_text_tokens(),
        uses_instructions: true,
        preprocessor: Preprocessor::Llava(pre),
        matmuls: cfg.vision_config.matmul_shapes(),
        replicas: Box::new(cfg),
    })
}

impl ReplicaBuilder for LlavaConfig {
    fn build(
        &self,
        vb: VarBuilder,
        backend: ops::Backend,
    ) -> Result<Box<dyn EmbeddingModel>, ModelError> {
        let model = LlavaModel::with_backend(self, vb, backend).map_err(|e| ModelError::Build {
            family: "LLaVA",
            source: Box::new(e),
        })?;
        Ok(Box::new(model))
    }
}

/// Tiles sent through the vision tower at once (bounds activation memory).
const TILE_CHUNK: usize = 16;
/// Padded decoder tokens per forward pass when grouping sequences (a
/// sequence longer than this runs alone).
const GROUP_TOKENS: usize = 4096;

/// One item's image for [`LlavaModel::embed_ids`]: `tiles` tiles of
/// `3 x S x S` pixel values (the base tile first) of an image that was
/// `size` when the processor saw it.
#[derive(Debug, Clone, Copy)]
pub struct ImageTiles<'a> {
    pub data: &'a [f32],
    pub tiles: usize,
    pub size: Size,
}

/// A BGE-VL-MLLM replica on one device.
pub struct LlavaModel {
    vision: ClipVisionTransformer,
    proj1: Linear,
    proj2: Linear,
    image_newline: Tensor,
    decoder: MistralModel,
    cfg: LlavaConfig,
    device: Device,
    dtype: DType,
}

fn decoder_error(e: DecoderError) -> ModelError {
    match e {
        DecoderError::Input(m) => ModelError::Batch(m),
        DecoderError::Interrupted => ModelError::Interrupted,
        DecoderError::Candle(e) => ModelError::Candle(e),
    }
}

impl LlavaModel {
    /// `vb` points at the checkpoint's root.
    pub fn new(cfg: &LlavaConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        Self::with_backend(cfg, vb, ops::Backend::Native)
    }

    /// [`Self::new`] with the CPU vision encoder's products on `backend`
    /// (the decoder runs on candle either way).
    pub fn with_backend(
        cfg: &LlavaConfig,
        vb: VarBuilder,
        backend: ops::Backend,
    ) -> candle_core::Result<Self> {
        let vh = cfg.vision_config.hidden_size;
        let th = cfg.text_config.hidden_size;
        let vision = ClipVisionTransformer::new(
            &cfg.vision_config,
            backend,
            vb.pp("vision_tower.vision_model"),
        )?;
        let mp = vb.pp("multi_modal_projector");
        Ok(LlavaModel {
            vision,
            proj1: linear(vh, th, mp.pp("linear_1"))?,
            proj2: linear(th, th, mp.pp("linear_2"))?,
            image_newline: vb.get(th, "image_newline")?,
            decoder: MistralModel::new(&cfg.text_config, vb.pp("language_model.model"))?,
            cfg: cfg.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// Projected patch features of tiles `[n, 3, S, S]` (f32 data):
    /// [n, patches, text hidden].
    fn tile_features(
        &self,
        data: &[f32],
        n: usize,
        between: &mut dyn FnMut() -> ControlFlow<()>,
    ) -> Result<Tensor, ModelError> {
        let s = self.cfg.vision_config.image_size;
        let per = 3 * s * s;
        let mut out = Vec::new();
        let mut start = 0;
        while start < n {
            let k = TILE_CHUNK.min(n - start);
            let px = Tensor::from_slice(
                &data[start * per..(start + k) * per],
                (k, 3, s, s),
                &self.device,
            )?
            .to_dtype(self.dtype)?;
            let h = self
                .vision
                .hidden_states_stepped(&px, self.cfg.vision_layer, between)?;
            let tokens = h.dim(1)?;
            let h = h.narrow(1, 1, tokens - 1)?;
            let h = self.proj2.forward(&self.proj1.forward(&h)?.gelu_erf()?)?;
            out.push(h);
            start += k;
        }
        Ok(Tensor::cat(&out, 0)?)
    }

    /// `pack_image_features` for one image: tiles' features
    /// [1 + gh * gw, p * p, hidden] -> [features, hidden].
    fn pack(&self, feats: &Tensor, size: Size) -> Result<Tensor, ModelError> {
        let (gh, gw) = self
            .cfg
            .grid_shape(size)
            .ok_or_else(|| ModelError::Batch("no image_grid_pinpoints".into()))?;
        let p = self.cfg.patches_per_side();
        let (n, _, c) = feats.dims3()?;
        if n != 1 + gh * gw {
            return Err(ModelError::Batch(format!(
                "an image of {size} needs {} tiles, got {n}",
                1 + gh * gw
            )));
        }
        let base = feats.get(0)?;
        let grid = feats
            .narrow(0, 1, gh * gw)?
            .reshape((gh, gw, p, p, c))?
            .permute((0, 2, 1, 3, 4))?
            .contiguous()?
            .reshape((gh * p, gw * p, c))?;
        let (r0, r1, c0, c1) = anyres::unpad_bounds(size, (gh * p, gw * p));
        let grid = grid.narrow(0, r0, r1 - r0)?.narrow(1, c0, c1 - c0)?;
        let rows = r1 - r0;
        let newline = self
            .image_newline
            .reshape((1, 1, c))?
            .broadcast_as((rows, 1, c))?;
        let grid = Tensor::cat(&[&grid, &newline], 1)?.reshape((rows * (c1 - c0 + 1), c))?;
        Ok(Tensor::cat(&[&base, &grid], 0)?)
    }

    /// Unnormalised embeddings [n, hidden] (f32) of prompts whose `<image>`
    /// tokens are already expanded; `images[i]` is item `i`'s image, if any.
    pub fn embed_ids(
        &self,
        ids: &[&[u32]],
        images: &[Option<ImageTiles<'_>>],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        self.embed_ids_stepped(ids, images, &mut || ControlFlow::Continue(()))
    }

    /// [`Self::embed_ids`], calling `between` before each layer of the
    /// vision tower (per chunk of tiles) and of the decoder (per group of
    /// sequences); see [`EmbeddingModel::embed_stepped`].
    pub fn embed_ids_stepped(
        &self,
        ids: &[&[u32]],
        images: &[Option<ImageTiles<'_>>],
        between: &mut dyn FnMut() -> ControlFlow<()>,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let n = ids.len();
        if images.len() != n {
            return Err(ModelError::Batch("ids and images differ in number".into()));
        }
        let hidden = self.cfg.text_config.hidden_size;
        let vocab = self.cfg.text_config.vocab_size as u32;
        // Vision: all tiles of the batch, then packed per image.
        let mut all_tiles: Vec<f32> = Vec::new();
        let mut tile_counts = Vec::new();
        for im in images.iter().flatten() {
            all_tiles.extend_from_slice(im.data);
            tile_counts.push(im.tiles);
        }
        let total_tiles: usize = tile_counts.iter().sum();
        let s = self.cfg.vision_config.image_size;
        if all_tiles.len() != total_tiles * 3 * s * s {
            return Err(ModelError::Batch(format!(
                "pixel data does not hold 3x{s}x{s} tiles"
            )));
        }
        let mut packed: Vec<Tensor> = Vec::new();
        if total_tiles > 0 {
            let feats = self.tile_features(&all_tiles, total_tiles, between)?;
            let mut at = 0;
            for im in images.iter().flatten() {
                packed.push(self.pack(&feats.narrow(0, at, im.tiles)?, im.size)?);
                at += im.tiles;
            }
        }
        // One table holding every token embedding, then every image
        // feature, then a zero row for padding; sequences are gathered from it.
        let mut flat: Vec<u32> = Vec::with_capacity(ids.iter().map(|s| s.len()).sum());
        for (i, s) in ids.iter().enumerate() {
            if s.is_empty() {
                return Err(ModelError::Batch(format!("item {i} has no tokens")));
            }
            if let Some(bad) = s.iter().find(|&&t| t >= vocab) {
                return Err(ModelError::Batch(format!(
                    "item {i}: token id {bad} is outside the vocabulary of {vocab}"
                )));
            }
            flat.extend_from_slice(s);
        }
        let tok = self.decoder.embed_tokens(&Tensor::from_vec(
            flat.clone(),
            flat.len(),
            &self.device,
        )?)?;
        let mut parts = vec![tok];
        let mut feat_offsets = Vec::with_capacity(packed.len());
        let mut offset = flat.len();
        for f in &packed {
            feat_offsets.push(offset);
            offset += f.dim(0)?;
            parts.push(f.to_dtype(self.dtype)?);
        }
        let zero_row = offset as u32;
        parts.push(Tensor::zeros((1, hidden), self.dtype, &self.device)?);
        let table = Tensor::cat(&parts, 0)?;
        // Per item: the table row of each position.
        let mut rows: Vec<Vec<u32>> = Vec::with_capacity(n);
        let mut img = 0;
        let mut tok_at = 0usize;
        for (i, s) in ids.iter().enumerate() {
            let image_tokens = s
                .iter()
                .filter(|&&t| t == self.cfg.image_token_index)
                .count();
            let mut r: Vec<u32> = (tok_at..tok_at + s.len()).map(|x| x as u32).collect();
            if images[i].is_some() {
                let f = packed[img].dim(0)?;
                if image_tokens != f {
                    return Err(ModelError::Batch(format!(
                        "item {i} has {image_tokens} image tokens but its image gives {f} features"
                    )));
                }
                let mut k = feat_offsets[img];
                for (row, &t) in r.iter_mut().zip(s.iter()) {
                    if t == self.cfg.image_token_index {
                        *row = k as u32;
                        k += 1;
                    }
                }
                img += 1;
            }
            tok_at += s.len();
            rows.push(r);
        }
        // Decoder passes over groups of similar lengths.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(ids[i].len()));
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); n];
        let mut g = 0;
        while g < order.len() {
            let t = ids[order[g]].len();
            let mut end = g + 1;
            while end < order.len() && (end - g + 1) * t <= GROUP_TOKENS {
                end += 1;
            }
            let group = &order[g..end];
            let mut index = Vec::with_capacity(group.len() * t);
            let mut lens = Vec::with_capacity(group.len());
            for &i in group {
                index.extend_from_slice(&rows[i]);
                index.extend(std::iter::repeat_n(zero_row, t - rows[i].len()));
                lens.push(rows[i].len());
            }
            let idx = Tensor::from_vec(index, group.len() * t, &self.device)?;
            let x = table
                .index_select(&idx, 0)?
                .reshape((group.len(), t, hidden))?;
            let h = self
                .decoder
                .forward_last_stepped(&x, &lens, between)
                .map_err(decoder_error)?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?;
            for (&i, v) in group.iter().zip(h) {
                out[i] = v;
            }
            g = end;
        }
        Ok(out)
    }
}

impl EmbeddingModel for LlavaModel {
    fn embed(&self, batch: &[&Prepared]) -> Result<Vec<Vec<f32>>, ModelError> {
        self.embed_stepped(batch, &mut || ControlFlow::Continue(()))
    }

    /// Stepped before each layer of the vision tower and of the decoder: a
    /// query waits for one layer of an indexing batch, not for the batch.
    fn embed_stepped(
        &self,
        batch: &[&Prepared],
        between: &mut dyn FnMut() -> ControlFlow<()>,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let s = self.cfg.vision_config.image_size;
        let mut ids = Vec::with_capacity(batch.len());
        let mut images = Vec::with_capacity(batch.len());
        for (i, item) in batch.iter().enumerate() {
            let t = item
                .token_ids
                .as_deref()
                .ok_or_else(|| ModelError::Batch(format!("item {i} has no prompt token ids")))?;
            ids.push(t);
            images.push(match &item.pixels {
                None => None,
                Some(p) => {
                    if p.height != s || p.width != s || p.data.len() != p.tiles * 3 * s * s {
                        return Err(ModelError::Batch(format!(
                            "item {i}: image tiles must be 3x{s}x{s}, got {}x{}",
                            p.height, p.width
                        )));
                    }
                    let size = item.image_size.ok_or_else(|| {
                        ModelError::Batch(format!("item {i} has pixels but no image size"))
                    })?;
                    Some(ImageTiles {
                        data: p.data.as_slice(),
                        tiles: p.tiles,
                        size,
                    })
                }
            });
        }
        self.embed_ids_stepped(&ids, &images, between)
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
