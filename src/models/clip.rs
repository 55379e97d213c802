//! BGE-VL-CLIP (HF `CLIPModel`): text and vision transformers with linear
//! projections into one embedding space.
//!
//! - text: token + position embeddings, causal pre-norm encoder, final layer
//!   norm, pooled at the first EOS position (found on the host), `text_projection`;
//! - vision: patch embedding (as one matmul), class token, position
//!   embeddings, `pre_layrnorm`, encoder, `post_layernorm` of the class token,
//!   `visual_projection`;
//! - composed inputs: the sum of the two unnormalised embeddings.

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{
    embedding, layer_norm, linear, linear_no_bias, Embedding, LayerNorm, Linear, VarBuilder,
};
use serde::Deserialize;

use super::{EmbeddingModel, ModelError};
use crate::preprocess::Prepared;

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
    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
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
    pub fn from_json(v: &serde_json::Value) -> Result<Self, String> {
        let section = |name: &str| -> serde_json::Value {
            v.get(name)
                .or_else(|| v.get(format!("{name}_dict")))
                .cloned()
                .unwrap_or_else(|| serde_json::json!({}))
        };
        let text_config: ClipTextConfig = serde_json::from_value(section("text_config"))
            .map_err(|e| format!("text_config: {e}"))?;
        let vision_config: ClipVisionConfig = serde_json::from_value(section("vision_config"))
            .map_err(|e| format!("vision_config: {e}"))?;
        let projection_dim = match v.get("projection_dim") {
            None => 512,
            Some(p) => p
                .as_u64()
                .ok_or("projection_dim is not a positive integer")? as usize,
        };
        let check_heads = |what: &str, hidden: usize, heads: usize| {
            if heads == 0 || !hidden.is_multiple_of(heads) {
                Err(format!(
                    "{what}: hidden_size {hidden} is not divisible by num_attention_heads {heads}"
                ))
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
            ));
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

/// A large finite negative for attention masks that survives f16/bf16.
fn mask_value(dtype: DType) -> f32 {
    match dtype {
        DType::F16 => -65504.0,
        _ => -1.0e30,
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    head_dim: usize,
    scale: f64,
}

impl Attention {
    fn new(hidden: usize, heads: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let head_dim = hidden / heads;
        Ok(Attention {
            q: linear(hidden, hidden, vb.pp("q_proj"))?,
            k: linear(hidden, hidden, vb.pp("k_proj"))?,
            v: linear(hidden, hidden, vb.pp("v_proj"))?,
            out: linear(hidden, hidden, vb.pp("out_proj"))?,
            heads,
            head_dim,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    /// `x`: [batch, seq, hidden]; `mask`: additive, broadcastable to
    /// [batch, heads, seq, seq].
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let split = |y: Tensor| -> candle_core::Result<Tensor> {
            y.reshape((b, t, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split((self.q.forward(x)? * self.scale)?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        let mut scores = q.matmul(&k.t()?)?;
        if let Some(m) = mask {
            scores = scores.broadcast_add(m)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))?;
        self.out.forward(&ctx)
    }
}

struct EncoderLayer {
    ln1: LayerNorm,
    attn: Attention,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    fn new(
        hidden: usize,
        inter: usize,
        heads: usize,
        eps: f64,
        act: Activation,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(EncoderLayer {
            ln1: layer_norm(hidden, eps, vb.pp("layer_norm1"))?,
            attn: Attention::new(hidden, heads, vb.pp("self_attn"))?,
            ln2: layer_norm(hidden, eps, vb.pp("layer_norm2"))?,
            fc1: linear(hidden, inter, vb.pp("mlp.fc1"))?,
            fc2: linear(inter, hidden, vb.pp("mlp.fc2"))?,
            act,
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let h = (x + self.attn.forward(&self.ln1.forward(x)?, mask)?)?;
        let m = self
            .fc2
            .forward(&self.act.apply(&self.fc1.forward(&self.ln2.forward(&h)?)?)?)?;
        h + m
    }
}

struct Encoder {
    layers: Vec<EncoderLayer>,
}

impl Encoder {
    #[allow(clippy::too_many_arguments)]
    fn new(
        n: usize,
        hidden: usize,
        inter: usize,
        heads: usize,
        eps: f64,
        act: Activation,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let layers = (0..n)
            .map(|i| {
                EncoderLayer::new(hidden, inter, heads, eps, act, vb.pp(format!("layers.{i}")))
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Encoder { layers })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for l in &self.layers {
            h = l.forward(&h, mask)?;
        }
        Ok(h)
    }
}

struct TextTower {
    token_embedding: Embedding,
    position_embedding: Tensor,
    encoder: Encoder,
    final_ln: LayerNorm,
    projection: Linear,
    eos_token_id: u32,
    max_len: usize,
}

impl TextTower {
    fn new(c: &ClipTextConfig, proj: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let tm = vb.pp("text_model");
        Ok(TextTower {
            token_embedding: embedding(
                c.vocab_size,
                c.hidden_size,
                tm.pp("embeddings.token_embedding"),
            )?,
            position_embedding: tm.get(
                (c.max_position_embeddings, c.hidden_size),
                "embeddings.position_embedding.weight",
            )?,
            encoder: Encoder::new(
                c.num_hidden_layers,
                c.hidden_size,
                c.intermediate_size,
                c.num_attention_heads,
                c.layer_norm_eps,
                c.hidden_act,
                tm.pp("encoder"),
            )?,
            final_ln: layer_norm(c.hidden_size, c.layer_norm_eps, tm.pp("final_layer_norm"))?,
            projection: linear_no_bias(c.hidden_size, proj, vb.pp("text_projection"))?,
            eos_token_id: c.eos_token_id,
            max_len: c.max_position_embeddings,
        })
    }

    /// Where transformers pools: the first EOS token, or with the legacy
    /// `eos_token_id == 2` the first maximum of the ids (0 when absent).
    fn pool_position(&self, ids: &[u32]) -> usize {
        if self.eos_token_id == 2 {
            let mut best = 0;
            for (i, &id) in ids.iter().enumerate() {
                if id > ids[best] {
                    best = i;
                }
            }
            best
        } else {
            ids.iter()
                .position(|&id| id == self.eos_token_id)
                .unwrap_or(0)
        }
    }

    /// Unnormalised text embeddings, [n, proj], for right-padded sequences.
    fn forward(&self, seqs: &[&[u32]], device: &Device) -> Result<Tensor, ModelError> {
        let n = seqs.len();
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        if t == 0 || t > self.max_len {
            return Err(ModelError::Batch(format!(
                "token sequences must have 1..={} tokens, got {t}",
                self.max_len
            )));
        }
        let mut flat = vec![0u32; n * t];
        let mut gather = Vec::with_capacity(n);
        for (i, s) in seqs.iter().enumerate() {
            flat[i * t..i * t + s.len()].copy_from_slice(s);
            gather.push((i * t + self.pool_position(s)) as u32);
        }
        let ids = Tensor::from_vec(flat, (n, t), device)?;
        let pos = self.position_embedding.narrow(0, 0, t)?;
        let h = self.token_embedding.forward(&ids)?.broadcast_add(&pos)?;
        // Causal mask; padding sits after the EOS we pool at, so the causal
        // mask already keeps it out of the pooled token's context.
        let neg = mask_value(h.dtype());
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { neg } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (1, 1, t, t), device)?.to_dtype(h.dtype())?;
        let h = self.encoder.forward(&h, Some(&mask))?;
        let c = h.dim(2)?;
        let gather = Tensor::from_vec(gather, n, device)?;
        let pooled = h.reshape((n * t, c))?.index_select(&gather, 0)?;
        // Layer norm is per token, so normalising only the pooled rows is exact.
        let pooled = self.final_ln.forward(&pooled)?;
        Ok(self.projection.forward(&pooled)?)
    }
}

/// The CLIP vision transformer (`CLIPVisionModel`'s `vision_model`): patch
/// and position embeddings, `pre_layrnorm`, the encoder and `post_layernorm`.
/// Shared by the CLIP model and by LLaVA's vision tower.
pub struct ClipVisionTransformer {
    patch_weight: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_ln: LayerNorm,
    encoder: Encoder,
    post_ln: LayerNorm,
    patch: usize,
    image_size: usize,
    channels: usize,
}

impl ClipVisionTransformer {
    /// `vb` points at the `vision_model` prefix.
    pub fn new(c: &ClipVisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let p = c.patch_size;
        let num_pos = (c.image_size / p).pow(2) + 1;
        let conv = vb.get(
            (c.hidden_size, c.num_channels, p, p),
            "embeddings.patch_embedding.weight",
        )?;
        // A stride-p convolution over non-overlapping patches is one matmul
        // against the flattened kernel: [hidden, C*p*p] -> transposed once here.
        let patch_weight = conv
            .reshape((c.hidden_size, c.num_channels * p * p))?
            .t()?
            .contiguous()?;
        Ok(ClipVisionTransformer {
            patch_weight,
            class_embedding: vb.get(c.hidden_size, "embeddings.class_embedding")?,
            position_embedding: vb.get(
                (num_pos, c.hidden_size),
                "embeddings.position_embedding.weight",
            )?,
            pre_ln: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("pre_layrnorm"))?,
            encoder: Encoder::new(
                c.num_hidden_layers,
                c.hidden_size,
                c.intermediate_size,
                c.num_attention_heads,
                c.layer_norm_eps,
                c.hidden_act,
                vb.pp("encoder"),
            )?,
            post_ln: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("post_layernorm"))?,
            patch: p,
            image_size: c.image_size,
            channels: c.num_channels,
        })
    }

    /// The side of the square images it takes.
    pub fn image_size(&self) -> usize {
        self.image_size
    }

    /// Number of encoder layers.
    pub fn num_layers(&self) -> usize {
        self.encoder.layers.len()
    }

    /// Hidden states after the embeddings, `pre_layrnorm` and the first
    /// `layers` encoder layers: transformers' `hidden_states[layers]`.
    /// [n, 1 + patches, hidden] from [n, C, S, S] pixels.
    pub fn hidden_states(&self, pixels: &Tensor, layers: usize) -> Result<Tensor, ModelError> {
        let (n, ch, h, w) = pixels.dims4()?;
        if ch != self.channels || h != self.image_size || w != self.image_size {
            return Err(ModelError::Batch(format!(
                "pixel tensors must be {}x{s}x{s}, got {ch}x{h}x{w}",
                self.channels,
                s = self.image_size
            )));
        }
        if layers > self.num_layers() {
            return Err(ModelError::Batch(format!(
                "asked for hidden state {layers} of a {}-layer encoder",
                self.num_layers()
            )));
        }
        let p = self.patch;
        let g = self.image_size / p;
        let patches = pixels
            .reshape((n, ch, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((n * g * g, ch * p * p))?;
        let hidden = self.patch_weight.dim(1)?;
        let emb = patches
            .matmul(&self.patch_weight)?
            .reshape((n, g * g, hidden))?;
        let cls = self
            .class_embedding
            .reshape((1, 1, hidden))?
            .broadcast_as((n, 1, hidden))?;
        let x = Tensor::cat(&[&cls, &emb], 1)?.broadcast_add(&self.position_embedding)?;
        let mut x = self.pre_ln.forward(&x)?;
        for layer in &self.encoder.layers[..layers] {
            x = layer.forward(&x, None)?;
        }
        Ok(x)
    }

    /// `post_layernorm` of the class token after the whole encoder: [n, hidden].
    pub fn pooled(&self, pixels: &Tensor) -> Result<Tensor, ModelError> {
        let x = self.hidden_states(pixels, self.num_layers())?;
        Ok(self.post_ln.forward(&x.i((.., 0, ..))?)?)
    }
}

struct VisionTower {
    transformer: ClipVisionTransformer,
    projection: Linear,
}

impl VisionTower {
    fn new(c: &ClipVisionConfig, proj: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(VisionTower {
            transformer: ClipVisionTransformer::new(c, vb.pp("vision_model"))?,
            projection: linear_no_bias(c.hidden_size, proj, vb.pp("visual_projection"))?,
        })
    }

    /// Unnormalised image embeddings, [n, proj], from [n, C, S, S] pixels.
    fn forward(&self, pixels: &Tensor) -> Result<Tensor, ModelError> {
        Ok(self.projection.forward(&self.transformer.pooled(pixels)?)?)
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
    pub fn new(cfg: &ClipConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let device = vb.device().clone();
        let dtype = vb.dtype();
        Ok(ClipModel {
            text: TextTower::new(&cfg.text_config, cfg.projection_dim, vb.clone())?,
            vision: VisionTower::new(&cfg.vision_config, cfg.projection_dim, vb)?,
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
        Ok(self.vision.forward(&pixels)?.to_dtype(DType::F32)?)
    }
}

impl EmbeddingModel for ClipModel {
    fn embed(&self, batch: &[&Prepared]) -> Result<Vec<Vec<f32>>, ModelError> {
        let mut texts: Vec<&[u32]> = Vec::new();
        let mut images: Vec<&[f32]> = Vec::new();
        // For each item: its row in the text and image results.
        let mut rows: Vec<(Option<usize>, Option<usize>)> = Vec::with_capacity(batch.len());
        for (i, item) in batch.iter().enumerate() {
            let t = item.token_ids.as_deref().map(|ids| {
                texts.push(ids);
                texts.len() - 1
            });
            let v = match &item.pixels {
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
            if t.is_none() && v.is_none() {
                return Err(ModelError::Batch(format!(
                    "item {i} has neither text nor image"
                )));
            }
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
            self.embed_pixels(&images)?.to_vec2()?
        };
        Ok(rows
            .into_iter()
            .map(|(t, v)| match (t, v) {
                (Some(t), Some(v)) => text_emb[t]
                    .iter()
                    .zip(&image_emb[v])
                    .map(|(a, b)| a + b)
                    .collect(),
                (Some(t), None) => text_emb[t].clone(),
                (None, Some(v)) => image_emb[v].clone(),
                (None, None) => Vec::new(),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(ClipConfig::from_json(&v).unwrap_err().contains("divisible"));
        let v = serde_json::json!({"vision_config": {"image_size": 100, "patch_size": 32}});
        assert!(ClipConfig::from_json(&v).unwrap_err().contains("multiple"));
        let v = serde_json::json!({"text_config": {"hidden_act": "swish"}});
        assert!(ClipConfig::from_json(&v)
            .unwrap_err()
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
