//! The Mistral decoder of BGE-VL-MLLM (transformers 4.45.2 `MistralModel`),
//! used as an encoder: input embeddings in, final-norm hidden states out.
//!
//! Owns: [`MistralConfig`] (serde, transformers' `MistralConfig` defaults for
//! missing keys), the rotary tables at the config's `rope_theta`, the causal
//! and optional sliding-window masks and the final norm; the layers
//! (RMSNorm, grouped-query attention, SwiGLU MLP) are
//! [`crate::models::decoder`]'s, shared with Qwen2. There is no KV cache and no
//! `lm_head` (its weight is never read).
//!
//! Sequences of a batch are right-padded internally and each sequence counts
//! its positions from 0, so an input's result does not depend on its batch
//! mates. Upstream pads on the left and numbers positions from the start of
//! the padded row; rotary embeddings only see position differences, and the
//! causal, sliding-window and padding masks are the same relative to each
//! real token, so the two agree up to float rounding. Masks are additive with
//! a large finite negative and softmax runs in `f32` (as upstream upcasts it),
//! so fully masked rows never turn into NaN in f16/bf16.
//!
//! Device-side setup: a pass's masks are made on the replica's device from
//! the positions and the sequence lengths (comparison kernels, no `t x t`
//! host buffer) and kept by shape ([`ShapeCache`]); the rotary tables are
//! computed once on the host in f32 (exactly transformers' values, the same
//! on every device) for the longest batch seen so far, kept on the device,
//! and each pass reads the rows it needs there. No batch copies either to
//! the device.

use std::ops::ControlFlow;
use std::sync::Mutex;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{embedding, Embedding, VarBuilder};
use serde::Deserialize;

use crate::models::decoder::{
    causal_mask, check_lengths, gather_rows, last_index, DecoderError, Layer, LayerShape, RmsNorm,
    Rope,
};
use crate::models::error::ConfigError;
use crate::models::mask::ShapeCache;

fn d_vocab() -> usize {
    32000
}
fn d_hidden() -> usize {
    4096
}
fn d_inter() -> usize {
    14336
}
fn d_layers() -> usize {
    32
}
fn d_heads() -> usize {
    32
}
fn d_kv_heads() -> Option<usize> {
    Some(8)
}
fn d_max_pos() -> usize {
    4096 * 32
}
fn d_eps() -> f64 {
    1e-6
}
fn d_theta() -> f64 {
    10000.0
}
fn d_window() -> Option<usize> {
    Some(4096)
}
fn d_act() -> String {
    "silu".into()
}

/// `text_config` of a LLaVA-NeXT `config.json` (transformers' `MistralConfig`;
/// missing keys take its defaults, an explicit `null` sliding window means none).
#[derive(Debug, Clone, Deserialize)]
pub struct MistralConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    /// `null` means as many as the attention heads.
    #[serde(default = "d_kv_heads")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "d_theta")]
    pub rope_theta: f64,
    #[serde(default = "d_window")]
    pub sliding_window: Option<usize>,
}

impl MistralConfig {
    /// The sizes of one decoder layer (no q/k/v biases).
    pub fn layer_shape(&self) -> LayerShape {
        LayerShape {
            hidden: self.hidden_size,
            intermediate: self.intermediate_size,
            heads: self.num_attention_heads,
            kv_heads: self.kv_heads(),
            head_dim: self.head_dim(),
            rms_norm_eps: self.rms_norm_eps,
            qkv_bias: false,
        }
    }

    /// Key/value heads (`num_key_value_heads`, else the attention heads).
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width (`head_dim`, else `hidden_size / num_attention_heads`).
    pub fn head_dim(&self) -> usize {
        match self.head_dim {
            Some(d) if d > 0 => d,
            _ => self.hidden_size / self.num_attention_heads.max(1),
        }
    }

    /// Checks the shapes fit together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let heads = self.num_attention_heads;
        let kv = self.kv_heads();
        if heads == 0 || kv == 0 || !heads.is_multiple_of(kv) {
            return Err(format!(
                "num_attention_heads {heads} must be a positive multiple of num_key_value_heads {kv}"
            ).into());
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(heads) {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {heads}",
                self.hidden_size
            )
            .into());
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!("head_dim {} must be even", self.head_dim()).into());
        }
        if self.hidden_act != "silu" && self.hidden_act != "swish" {
            return Err(format!(
                "hidden_act {:?} is not supported (Mistral uses \"silu\")",
                self.hidden_act
            )
            .into());
        }
        if self.sliding_window == Some(0) {
            return Err("sliding_window must be positive or null".into());
        }
        if self.max_position_embeddings == 0 || self.vocab_size == 0 {
            return Err("max_position_embeddings and vocab_size must be positive".into());
        }
        Ok(())
    }
}

/// Rotary tables: `cos` and `sin` of `[positions, head_dim / 2]`, computed in
/// `f32` as transformers does (`inv_freq = 1 / theta^(2i/d)`, `freqs = pos * inv_freq`).
pub fn rope_tables(theta: f64, head_dim: usize, positions: usize) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let base = theta as f32;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0f32 / base.powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(positions * half);
    let mut sin = Vec::with_capacity(positions * half);
    for p in 0..positions {
        for f in &inv {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    (cos, sin)
}

/// Whether a query at position `i` attends to a key at `j` of a sequence of
/// `len` real tokens: causal, within the sliding window, not padding.
pub fn attends(i: usize, j: usize, len: usize, window: Option<usize>) -> bool {
    j <= i && j < len && window.is_none_or(|w| i - j < w)
}

/// The keys `lo..hi` a query at position `i` attends to (see [`attends`]);
/// empty when it attends to none (a padding row past the window). The
/// reference the device-made masks are tested against.
#[cfg(test)]
fn attended_keys(i: usize, len: usize, window: Option<usize>) -> (usize, usize) {
    let hi = (i + 1).min(len);
    let lo = window.map_or(0, |w| (i + 1).saturating_sub(w));
    (lo.min(hi), hi)
}

/// The Mistral decoder stack (`language_model.model`) without `lm_head`.
pub struct MistralModel {
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    cfg: MistralConfig,
    device: Device,
    dtype: DType,
    /// Additive masks by (sequence lengths, padded length, last row only).
    masks: ShapeCache<(Vec<usize>, usize, bool)>,
    /// Rotary `cos`/`sin` tables [positions, head_dim / 2] in the model's
    /// dtype, on its device, for the longest pass so far.
    rope: Mutex<Option<RopeTable>>,
}

/// Bytes of masks a decoder keeps: one 4096-token sequence's full mask.
const MASK_CACHE_BYTES: usize = 64 << 20;

/// The rotary tables of positions `0..len`, on the device.
#[derive(Clone)]
struct RopeTable {
    len: usize,
    cos: Tensor,
    sin: Tensor,
}

impl MistralModel {
    /// `vb` points at the decoder (`language_model.model`).
    pub fn new(cfg: &MistralConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(&cfg.layer_shape(), vb.pp(format!("layers.{i}"))))
            .collect::<candle_core::Result<_>>()?;
        Ok(MistralModel {
            embed_tokens: embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("embed_tokens"))?,
            layers,
            norm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("norm"))?,
            cfg: cfg.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
            masks: ShapeCache::new(MASK_CACHE_BYTES),
            rope: Mutex::new(None),
        })
    }

    pub fn config(&self) -> &MistralConfig {
        &self.cfg
    }

    /// Token embeddings of `ids` (a 1-D u32 tensor): [n, hidden].
    pub fn embed_tokens(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.embed_tokens.forward(ids)
    }

    /// Rotary tables covering positions `0..t`: the kept ones, or new ones
    /// for the next power of two (at most `max_position_embeddings`),
    /// computed on the host once and uploaded.
    fn rope_table(&self, t: usize) -> candle_core::Result<RopeTable> {
        let mut kept = self.rope.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(table) = kept.as_ref().filter(|r| r.len >= t) {
            return Ok(table.clone());
        }
        let len = t
            .next_power_of_two()
            .min(self.cfg.max_position_embeddings)
            .max(t);
        let d = self.cfg.head_dim();
        let (cos, sin) = rope_tables(self.cfg.rope_theta, d, len);
        let to = |v: Vec<f32>| -> candle_core::Result<Tensor> {
            Tensor::from_vec(v, (len, d / 2), &self.device)?.to_dtype(self.dtype)
        };
        let table = RopeTable {
            len,
            cos: to(cos)?,
            sin: to(sin)?,
        };
        *kept = Some(table.clone());
        Ok(table)
    }

    /// The additive mask (f32) for right-padded sequences of `lens` real
    /// tokens in rows of `t`: [b, 1, 1, t, t] for every query row, or
    /// [b, 1, 1, 1, t] for each sequence's last real token when
    /// `last_only`. Made on the device from positions and lengths (see
    /// [`attends`]) and kept by shape.
    fn mask(&self, lens: &[usize], t: usize, last_only: bool) -> candle_core::Result<Tensor> {
        self.masks.get_or_make((lens.to_vec(), t, last_only), || {
            causal_mask(lens, t, last_only, self.cfg.sliding_window, &self.device)
        })
    }

    /// Rotary tables and the additive mask for right-padded sequences of
    /// `lens` real tokens in rows of `t`; the mask is for every query row, or
    /// only for the last real token of each sequence when `last_only`.
    fn setup(
        &self,
        lens: &[usize],
        t: usize,
        last_only: bool,
    ) -> candle_core::Result<(Rope, Tensor)> {
        let b = lens.len();
        let half = self.cfg.head_dim() / 2;
        let table = self.rope_table(t)?;
        let last: Vec<u32> = lens.iter().map(|&l| l.saturating_sub(1) as u32).collect();
        let last = Tensor::from_vec(last, b, &self.device)?;
        let rows = |x: &Tensor| -> candle_core::Result<(Tensor, Tensor)> {
            Ok((
                x.narrow(0, 0, t)?,
                x.index_select(&last, 0)?.reshape((b, 1, half))?,
            ))
        };
        let (cos, last_cos) = rows(&table.cos)?;
        let (sin, last_sin) = rows(&table.sin)?;
        let rope = Rope {
            cos,
            sin,
            last_cos,
            last_sin,
        };
        Ok((rope, self.mask(lens, t, last_only)?))
    }

    fn check(&self, embeds: &Tensor, lens: &[usize]) -> Result<(usize, usize), DecoderError> {
        let (b, t, c) = embeds.dims3()?;
        if b != lens.len() || b == 0 {
            return Err(DecoderError::Input(format!(
                "{b} sequences but {} lengths",
                lens.len()
            )));
        }
        if c != self.cfg.hidden_size {
            return Err(DecoderError::Input(format!(
                "embeddings are {c} wide, the decoder takes {}",
                self.cfg.hidden_size
            )));
        }
        check_lengths(lens, t, self.cfg.max_position_embeddings)?;
        Ok((b, t))
    }

    /// Final-norm hidden states [b, t, hidden] of right-padded input
    /// embeddings [b, t, hidden]; sequence `i` has `lens[i]` real tokens
    /// (rows past it are padding and their outputs are meaningless).
    pub fn forward(&self, embeds: &Tensor, lens: &[usize]) -> Result<Tensor, DecoderError> {
        let (_, t) = self.check(embeds, lens)?;
        let (rope, mask) = self.setup(lens, t, false)?;
        let mut x = embeds.to_dtype(self.dtype)?;
        for layer in &self.layers {
            x = layer.forward(&x, None, &rope, &mask)?;
        }
        Ok(self.norm.forward(&x)?)
    }

    /// The final-norm hidden state of each sequence's last real token,
    /// [b, hidden]: [`forward`](Self::forward) at position `lens[i] - 1`,
    /// with the last layer computed for that token only.
    pub fn forward_last(&self, embeds: &Tensor, lens: &[usize]) -> Result<Tensor, DecoderError> {
        self.forward_last_stepped(embeds, lens, &mut || ControlFlow::Continue(()))
    }

    /// [`Self::forward_last`], calling `between` before each layer (the
    /// hidden states are kept meanwhile; `Break` stops the pass with
    /// [`DecoderError::Interrupted`]). The same layers run in the same
    /// order: the result is that of `forward_last`, bit for bit.
    pub fn forward_last_stepped(
        &self,
        embeds: &Tensor,
        lens: &[usize],
        between: &mut dyn FnMut() -> ControlFlow<()>,
    ) -> Result<Tensor, DecoderError> {
        let mut step = || match between() {
            ControlFlow::Continue(()) => Ok(()),
            ControlFlow::Break(()) => Err(DecoderError::Interrupted),
        };
        let (b, t) = self.check(embeds, lens)?;
        let mut x = embeds.to_dtype(self.dtype)?;
        let Some((last, rest)) = self.layers.split_last() else {
            let idx = last_index(lens, t, &self.device)?;
            let x = gather_rows(&x, &idx)?;
            return Ok(self.norm.forward(&x)?.reshape((b, self.cfg.hidden_size))?);
        };
        if !rest.is_empty() {
            let (rope, mask) = self.setup(lens, t, false)?;
            for layer in rest {
                step()?;
                x = layer.forward(&x, None, &rope, &mask)?;
            }
        }
        step()?;
        let (rope, mask) = self.setup(lens, t, true)?;
        let idx = last_index(lens, t, &self.device)?;
        let x = last.forward(&x, Some(&idx), &rope, &mask)?;
        Ok(self.norm.forward(&x)?.reshape((b, self.cfg.hidden_size))?)
    }
}

#[cfg(test)]
mod tests;
