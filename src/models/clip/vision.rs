//! The CLIP vision side: [`ClipVisionTransformer`] (also LLaVA's vision
//! tower) and, for CLIP, the tower with `visual_projection`.

use std::ops::ControlFlow;

use candle_core::{IndexOp, Module, Tensor};
use candle_nn::{layer_norm, linear_no_bias, LayerNorm, Linear, VarBuilder};

use super::config::ClipVisionConfig;
use super::encoder::{f32_vec, Encoder};
use crate::models::error::ModelError;
use crate::models::ops::{self, Span};

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
    pub(super) image_size: usize,
    pub(super) channels: usize,
}

impl ClipVisionTransformer {
    /// `vb` points at the `vision_model` prefix; on the CPU kernels the
    /// encoder's products run on `backend`.
    pub fn new(
        c: &ClipVisionConfig,
        backend: ops::Backend,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Self::new_with(c, false, backend, vb)
    }

    /// With `bf16`, the encoder's linears (on the CPU kernels) hold bf16
    /// weights; see [`crate::models::ops::Linear::into_backend`].
    pub(super) fn new_with(
        c: &ClipVisionConfig,
        bf16: bool,
        backend: ops::Backend,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
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
            encoder: Encoder::new(&c.encoder(bf16, backend), vb.pp("encoder"))?,
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
        self.encoder.len()
    }

    /// Hidden states after the embeddings, `pre_layrnorm` and the first
    /// `layers` encoder layers: transformers' `hidden_states[layers]`.
    /// [n, 1 + patches, hidden] from [n, C, S, S] pixels.
    pub fn hidden_states(&self, pixels: &Tensor, layers: usize) -> Result<Tensor, ModelError> {
        self.hidden_states_stepped(pixels, layers, &mut || ControlFlow::Continue(()))
    }

    /// [`Self::hidden_states`], calling `between` before each encoder layer
    /// (see [`crate::models::EmbeddingModel::embed_stepped`]).
    pub fn hidden_states_stepped(
        &self,
        pixels: &Tensor,
        layers: usize,
        between: &mut dyn FnMut() -> ControlFlow<()>,
    ) -> Result<Tensor, ModelError> {
        let x = self.embeddings(pixels, layers)?;
        let fast = match &self.encoder {
            Encoder::Fast(fast) => fast,
            Encoder::Candle(all) => {
                let mut x = x;
                for layer in &all[..layers] {
                    if between().is_break() {
                        return Err(ModelError::Interrupted);
                    }
                    x = layer.forward(&x, None)?;
                }
                return Ok(x);
            }
        };
        let (n, t, c) = x.dims3()?;
        let spans = Self::spans(n, t);
        let out = fast.forward(f32_vec(x)?, &spans, false, layers, None, between)?;
        Ok(Tensor::from_vec(out, (n, t, c), pixels.device())?)
    }

    fn spans(n: usize, t: usize) -> Vec<Span> {
        (0..n)
            .map(|i| Span {
                start: i * t,
                len: t,
            })
            .collect()
    }

    /// Patch, class and position embeddings and `pre_layrnorm`:
    /// `hidden_states[0]`, checking the pixels and the layer count.
    fn embeddings(&self, pixels: &Tensor, layers: usize) -> Result<Tensor, ModelError> {
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
        Ok(self.pre_ln.forward(&x)?)
    }

    /// `post_layernorm` of the class token after the whole encoder: [n, hidden].
    pub fn pooled(&self, pixels: &Tensor) -> Result<Tensor, ModelError> {
        self.pooled_stepped(pixels, &mut || ControlFlow::Continue(()))
    }

    /// [`Self::pooled`], calling `between` before each encoder layer.
    pub fn pooled_stepped(
        &self,
        pixels: &Tensor,
        between: &mut dyn FnMut() -> ControlFlow<()>,
    ) -> Result<Tensor, ModelError> {
        let Encoder::Fast(fast) = &self.encoder else {
            let x = self.hidden_states_stepped(pixels, self.num_layers(), between)?;
            return Ok(self.post_ln.forward(&x.i((.., 0, ..))?)?);
        };
        let x = self.embeddings(pixels, self.num_layers())?;
        let (n, t, c) = x.dims3()?;
        let spans = Self::spans(n, t);
        let pool: Vec<usize> = spans.iter().map(|s| s.start).collect();
        let cls = fast.forward(f32_vec(x)?, &spans, false, fast.len(), Some(&pool), between)?;
        let cls = Tensor::from_vec(cls, (n, c), pixels.device())?;
        Ok(self.post_ln.forward(&cls)?)
    }
}

pub(super) struct VisionTower {
    pub(super) transformer: ClipVisionTransformer,
    projection: Linear,
}

impl VisionTower {
    pub(super) fn new(
        c: &ClipVisionConfig,
        proj: usize,
        bf16: bool,
        backend: ops::Backend,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(VisionTower {
            transformer: ClipVisionTransformer::new_with(c, bf16, backend, vb.pp("vision_model"))?,
            projection: linear_no_bias(c.hidden_size, proj, vb.pp("visual_projection"))?,
        })
    }

    /// Unnormalised image embeddings, [n, proj], from [n, C, S, S] pixels;
    /// `between` is called before each encoder layer.
    pub(super) fn forward(
        &self,
        pixels: &Tensor,
        between: &mut dyn FnMut() -> ControlFlow<()>,
    ) -> Result<Tensor, ModelError> {
        Ok(self
            .projection
            .forward(&self.transformer.pooled_stepped(pixels, between)?)?)
    }
}
