//! BGE-VL-CLIP (HF `CLIPModel`): text and vision transformers with linear
//! projections into one embedding space.
//!
//! - text: token + position embeddings, causal pre-norm encoder, final layer
//!   norm, pooled at the first EOS position (found on the host), `text_projection`;
//! - vision: patch embedding (as one matmul), class token, position
//!   embeddings, `pre_layrnorm`, encoder, `post_layernorm` of the class token,
//!   `visual_projection`;
//! - composed inputs: the sum of the two unnormalised embeddings.
//!
//! On the CPU in f32 (with quick-GELU, as BGE-VL has) the encoders run on
//! the kernels of [`super::ops`] instead of candle ops: a fused Q/K/V
//! projection, attention per (sequence, head), residuals accumulated in
//! place, and only what is pooled computed in the last layer (the class
//! token for images; for texts each sequence is cut after the token it is
//! pooled at, which the causal mask makes exact, and only that token goes
//! through the last layer's attention output and MLP). Set
//! `VLEMBED_CLIP_KERNELS=candle` to run the plain candle path instead.
//!
//! Stepping: [`Model::embed`] calls its hook before each
//! vision encoder layer (on both paths), so the worker can run priority
//! batches between layers of a long image batch; the pass's state (hidden
//! states, next layer) waits on the stack meanwhile, and the same layers run
//! in the same order, so the results are exactly `embed`'s.
//!
//! Layout: [`config`] (`config.json`), [`preprocess`] (the processor and
//! [`ClipInput`]), `encoder` (candle and fast layers), `text` and `vision`
//! (the towers), this module (the family: its loader and the model).

mod config;
mod encoder;
pub mod preprocess;
mod text;
mod vision;

use std::ops::ControlFlow;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

pub use config::{Activation, ClipConfig, ClipTextConfig, ClipVisionConfig};
pub use preprocess::{ClipInput, ClipPreprocessor};
pub use vision::ClipVisionTransformer;

use super::error::ModelError;
use super::family::{
    Between, Embeddings, Facts, Family, FamilyModel, LoadContext, Model, Replicas,
};
use super::{ops, source};
use text::TextTower;
use vision::VisionTower;

/// The CLIP family: `CLIPModel` (BGE-VL-base, BGE-VL-large).
pub struct Clip;

impl Family for Clip {
    fn architecture(&self) -> &'static str {
        "CLIPModel"
    }

    fn model_type(&self) -> &'static str {
        "clip"
    }

    /// Reads the config, the tokenizer and the image processor, checking
    /// that the processor's crop is what the vision tower takes.
    fn load(&self, cx: &LoadContext<'_>) -> Result<FamilyModel, ModelError> {
        let cfg = ClipConfig::from_json(cx.config).map_err(|e| cx.invalid_config(e))?;
        let tokenizer_path = cx.files.required(source::TOKENIZER)?;
        let pre_path = cx.files.required(source::PREPROCESSOR_CONFIG)?;
        let pre = ClipPreprocessor::load(
            &tokenizer_path,
            &pre_path,
            cfg.text_config.max_position_embeddings,
            cx.opts.image_limits,
        )?;
        let (h, w) = pre.crop_size();
        let side = cfg.vision_config.image_size;
        if h != side || w != side {
            return Err(ModelError::Load(format!(
                "{} crops images to {w}x{h} but the vision tower expects {side}x{side}",
                pre_path.display()
            )));
        }
        let facts = Facts {
            dimensions: cfg.projection_dim,
            max_text_tokens: pre.max_text_tokens(),
            uses_instructions: false,
        };
        let mut matmuls = cfg.text_config.matmul_shapes();
        matmuls.extend(cfg.vision_config.matmul_shapes());
        Ok(FamilyModel::new(facts, pre, cfg).with_matmuls(matmuls))
    }
}

impl Replicas for ClipConfig {
    type Model = ClipModel;

    fn build(&self, vb: VarBuilder, backend: ops::Backend) -> Result<ClipModel, ModelError> {
        ClipModel::with_backend(self, vb, backend).map_err(|e| ModelError::Build {
            family: "CLIP",
            source: Box::new(e),
        })
    }
}

/// A CLIP model replica on one device.
pub struct ClipModel {
    text: TextTower,
    vision: VisionTower,
    device: Device,
    dtype: DType,
}

impl ClipModel {
    /// On the CPU, asking for bf16 (which candle's CPU matmul lacks) builds
    /// an f32 model whose encoder linears run in bf16 with f32
    /// accumulation (see [`super::ops::Linear::into_bf16`]), like PyTorch's bf16
    /// autocast. The products run on the native kernels.
    pub fn new(cfg: &ClipConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        Self::with_backend(cfg, vb, ops::Backend::Native)
    }

    /// [`Self::new`] with the CPU encoders' products on `backend`.
    pub fn with_backend(
        cfg: &ClipConfig,
        vb: VarBuilder,
        backend: ops::Backend,
    ) -> candle_core::Result<Self> {
        let device = vb.device().clone();
        let bf16 = device.is_cpu() && vb.dtype() == DType::BF16;
        let vb = if bf16 { vb.set_dtype(DType::F32) } else { vb };
        let dtype = vb.dtype();
        let (t, v) = (&cfg.text_config, &cfg.vision_config);
        Ok(ClipModel {
            text: TextTower::new(t, cfg.projection_dim, bf16, backend, vb.clone())?,
            vision: VisionTower::new(v, cfg.projection_dim, bf16, backend, vb)?,
            device,
            dtype,
        })
    }

    /// Unnormalised text embeddings, [n, proj] in f32.
    pub fn embed_texts(&self, seqs: &[&[u32]]) -> Result<Tensor, ModelError> {
        Ok(self
            .text
            .forward(seqs, &self.device)?
            .to_dtype(DType::F32)?)
    }

    /// Unnormalised image embeddings from channel-first pixel planes, [n, proj] in f32.
    pub fn embed_pixels(&self, images: &[&[f32]]) -> Result<Tensor, ModelError> {
        self.embed_pixels_stepped(images, &mut || ControlFlow::Continue(()))
    }

    /// [`Self::embed_pixels`], calling `between` before each vision encoder
    /// layer (see [`Model::embed`]).
    pub fn embed_pixels_stepped(
        &self,
        images: &[&[f32]],
        between: &mut dyn FnMut() -> ControlFlow<()>,
    ) -> Result<Tensor, ModelError> {
        let s = self.vision.transformer.image_size;
        let c = self.vision.transformer.channels;
        let mut flat = Vec::with_capacity(images.len() * c * s * s);
        for img in images {
            if img.len() != c * s * s {
                return Err(ModelError::Batch(format!(
                    "an image has {} pixel values, expected {c}x{s}x{s}",
                    img.len()
                )));
            }
            flat.extend_from_slice(img);
        }
        let pixels =
            Tensor::from_vec(flat, (images.len(), c, s, s), &self.device)?.to_dtype(self.dtype)?;
        Ok(self
            .vision
            .forward(&pixels, between)?
            .to_dtype(DType::F32)?)
    }
}

impl Model for ClipModel {
    type Input = ClipInput;

    /// Texts first (short, not stepped), then the images with `between`
    /// called before each vision encoder layer (of each group of images
    /// the fast encoder takes through its layers together).
    fn embed(&self, batch: &[&ClipInput], between: Between<'_>) -> Embeddings {
        let mut texts: Vec<&[u32]> = Vec::new();
        let mut images: Vec<&[f32]> = Vec::new();
        // For each item: its row in the text and image results.
        let mut rows: Vec<(Option<usize>, Option<usize>)> = Vec::with_capacity(batch.len());
        for (i, item) in batch.iter().enumerate() {
            let t = item.ids().map(|ids| {
                texts.push(ids);
                texts.len() - 1
            });
            let v = match item.pixels() {
                Some(p) if p.tiles == 1 => {
                    images.push(&p.data);
                    Some(images.len() - 1)
                }
                Some(p) => {
                    return Err(ModelError::Batch(format!(
                        "item {i} has {} image tiles; CLIP takes one",
                        p.tiles
                    )))
                }
                None => None,
            };
            rows.push((t, v));
        }
        let text_emb: Vec<Vec<f32>> = if texts.is_empty() {
            Vec::new()
        } else {
            self.embed_texts(&texts)?.to_vec2()?
        };
        let image_emb: Vec<Vec<f32>> = if images.is_empty() {
            Vec::new()
        } else {
            self.embed_pixels_stepped(&images, between)?.to_vec2()?
        };
        let row = |emb: &[Vec<f32>], r: usize| {
            emb.get(r)
                .cloned()
                .ok_or_else(|| ModelError::Batch(format!("no embedding row {r}")))
        };
        rows.into_iter()
            .map(|(t, v)| match (t, v) {
                (Some(t), Some(v)) => {
                    let (a, b) = (row(&text_emb, t)?, row(&image_emb, v)?);
                    Ok(a.iter().zip(&b).map(|(a, b)| a + b).collect())
                }
                (Some(t), None) => row(&text_emb, t),
                (None, Some(v)) => row(&image_emb, v),
                // A ClipInput always has a text or an image.
                (None, None) => Err(ModelError::Batch("an item with nothing to embed".into())),
            })
            .collect()
    }
}
