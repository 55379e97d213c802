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

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{
    embedding, layer_norm, linear, linear_no_bias, Embedding, LayerNorm, Linear, VarBuilder,
};
use serde::Deserialize;

use super::ops::{self, Queries, Span};
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

/// An encoder layer's weights as plain f32 for the kernels in [`ops`].
struct FastLayer {
    ln1: (Vec<f32>, Vec<f32>),
    qkv: ops::Linear,
    out: ops::Linear,
    ln2: (Vec<f32>, Vec<f32>),
    fc1: ops::Linear,
    fc2: ops::Linear,
    heads: usize,
    eps: f32,
}

fn f32_vec(t: Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

fn fast_linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<ops::Linear> {
    let w = f32_vec(vb.get((out_dim, in_dim), "weight")?)?;
    let b = f32_vec(vb.get(out_dim, "bias")?)?;
    ops::Linear::new(w, Some(b), in_dim, out_dim)
}

fn fast_ln(dim: usize, vb: VarBuilder) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
    Ok((
        f32_vec(vb.get(dim, "weight")?)?,
        f32_vec(vb.get(dim, "bias")?)?,
    ))
}

impl FastLayer {
    fn new(
        hidden: usize,
        inter: usize,
        heads: usize,
        eps: f64,
        bf16: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let a = vb.pp("self_attn");
        let qkv = ops::Linear::concat(&[
            fast_linear(hidden, hidden, a.pp("q_proj"))?,
            fast_linear(hidden, hidden, a.pp("k_proj"))?,
            fast_linear(hidden, hidden, a.pp("v_proj"))?,
        ])?;
        let lin = |l: ops::Linear| {
            if bf16 {
                l.into_bf16()
            } else {
                l.into_packed()
            }
        };
        Ok(FastLayer {
            ln1: fast_ln(hidden, vb.pp("layer_norm1"))?,
            qkv: lin(qkv),
            out: lin(fast_linear(hidden, hidden, a.pp("out_proj"))?),
            ln2: fast_ln(hidden, vb.pp("layer_norm2"))?,
            fc1: lin(fast_linear(hidden, inter, vb.pp("mlp.fc1"))?),
            fc2: lin(fast_linear(inter, hidden, vb.pp("mlp.fc2"))?),
            heads,
            eps: eps as f32,
        })
    }

    /// `x`: packed rows `[rows, hidden]` of the sequences in `spans`.
    /// Returns every row, or with `pool` only those rows (one per sequence,
    /// in order): their attention output and MLP are all that is computed.
    fn forward(
        &self,
        x: Vec<f32>,
        spans: &[Span],
        causal: bool,
        pool: Option<&[usize]>,
    ) -> candle_core::Result<Vec<f32>> {
        let c = self.out.out_dim();
        let rows = x.len() / c;
        let mut h = vec![0.0; x.len()];
        ops::layer_norm(&x, &mut h, &self.ln1.0, &self.ln1.1, self.eps)?;
        let qkv = self.qkv.forward(&h, rows)?;
        drop(h);
        let (mut x, out_rows, queries) = match pool {
            None => (x, rows, Queries::All),
            Some(p) => {
                let mut g = Vec::with_capacity(p.len() * c);
                for &r in p {
                    let row = x.get(r * c..(r + 1) * c).ok_or_else(|| {
                        candle_core::Error::Msg(format!("pooled row {r} out of {rows}"))
                    })?;
                    g.extend_from_slice(row);
                }
                (g, p.len(), Queries::One(p))
            }
        };
        let mut ctx = vec![0.0; out_rows * c];
        ops::attention(
            &qkv,
            spans,
            self.heads,
            c / self.heads,
            causal,
            queries,
            &mut ctx,
        )?;
        drop(qkv);
        self.out.forward_into(&ctx, out_rows, &mut x, true)?;
        let mut h = ctx;
        ops::layer_norm(&x, &mut h, &self.ln2.0, &self.ln2.1, self.eps)?;
        let mut f = self.fc1.forward(&h, out_rows)?;
        ops::quick_gelu_in_place(&mut f);
        self.fc2.forward_into(&f, out_rows, &mut x, true)?;
        Ok(x)
    }
}

/// Whether a model built from `vb` runs its encoders on [`ops`].
fn use_fast_kernels(vb: &VarBuilder, act: Activation) -> bool {
    vb.device().is_cpu()
        && vb.dtype() == DType::F32
        && act == Activation::QuickGelu
        && std::env::var("VLEMBED_CLIP_KERNELS").map_or(true, |v| v != "candle")
}

/// Rows of packed sequences the fast encoder takes through all layers at
/// once (a group holds at least one sequence).
const GROUP_ROWS: usize = 800;

/// The encoder layers: candle modules, or (see [`use_fast_kernels`]) the
/// same weights for the CPU kernels; exactly one of the two is filled.
struct Encoder {
    layers: Vec<EncoderLayer>,
    fast: Vec<FastLayer>,
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
        bf16: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        if use_fast_kernels(&vb, act) {
            let fast = (0..n)
                .map(|i| {
                    FastLayer::new(
                        hidden,
                        inter,
                        heads,
                        eps,
                        bf16,
                        vb.pp(format!("layers.{i}")),
                    )
                })
                .collect::<candle_core::Result<_>>()?;
            return Ok(Encoder {
                layers: Vec::new(),
                fast,
            });
        }
        let layers = (0..n)
            .map(|i| {
                EncoderLayer::new(hidden, inter, heads, eps, act, vb.pp(format!("layers.{i}")))
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Encoder {
            layers,
            fast: Vec::new(),
        })
    }

    fn is_fast(&self) -> bool {
        !self.fast.is_empty()
    }

    fn len(&self) -> usize {
        self.layers.len().max(self.fast.len())
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for l in &self.layers {
            h = l.forward(&h, mask)?;
        }
        Ok(h)
    }

    /// The first `layers` fast layers over packed rows; with `pool`, only
    /// those rows (one per sequence) come out of the last one.
    ///
    /// Sequences go through all layers a group at a time (about
    /// [`GROUP_ROWS`] rows): every op but attention is per row and attention
    /// stays inside a sequence, so this is exact, and it keeps a group's
    /// activations in cache while the weights stream past.
    fn forward_fast(
        &self,
        x: Vec<f32>,
        spans: &[Span],
        causal: bool,
        layers: usize,
        pool: Option<&[usize]>,
    ) -> candle_core::Result<Vec<f32>> {
        let rows: usize = spans.iter().map(|s| s.len).sum();
        let contiguous = spans
            .iter()
            .scan(0, |end, s| {
                let ok = s.start == *end;
                *end = s.start + s.len;
                Some(ok)
            })
            .all(|ok| ok);
        if rows == 0 || !contiguous || x.len() != rows * (x.len() / rows) {
            return self.forward_group(x, spans, causal, layers, pool);
        }
        let c = x.len() / rows;
        let mut out = Vec::with_capacity(pool.map_or(x.len(), |p| p.len() * c));
        let mut i = 0;
        while i < spans.len() {
            let start = spans[i].start;
            let (mut j, mut n) = (i, 0);
            while j < spans.len() && (j == i || n + spans[j].len <= GROUP_ROWS) {
                n += spans[j].len;
                j += 1;
            }
            let local: Vec<Span> = spans[i..j]
                .iter()
                .map(|s| Span {
                    start: s.start - start,
                    len: s.len,
                })
                .collect();
            let local_pool: Option<Vec<usize>> = pool
                .map(|p| {
                    p.get(i..j)
                        .map(|p| p.iter().map(|r| r.wrapping_sub(start)).collect())
                })
                .map(|p| p.unwrap_or_default());
            let xs = x[start * c..(start + n) * c].to_vec();
            out.extend(self.forward_group(xs, &local, causal, layers, local_pool.as_deref())?);
            i = j;
        }
        Ok(out)
    }

    fn forward_group(
        &self,
        mut x: Vec<f32>,
        spans: &[Span],
        causal: bool,
        layers: usize,
        pool: Option<&[usize]>,
    ) -> candle_core::Result<Vec<f32>> {
        let layers = &self.fast[..layers.min(self.fast.len())];
        for (i, l) in layers.iter().enumerate() {
            let last = i + 1 == layers.len();
            x = l.forward(x, spans, causal, if last { pool } else { None })?;
        }
        if layers.is_empty() {
            if let Some(p) = pool {
                let rows = spans.iter().map(|s| s.start + s.len).max().unwrap_or(0);
                let c = x.len() / rows.max(1);
                let mut g = Vec::with_capacity(p.len() * c);
                for &r in p {
                    let row = x.get(r * c..(r + 1) * c).ok_or_else(|| {
                        candle_core::Error::Msg(format!("pooled row {r} out of {rows}"))
                    })?;
                    g.extend_from_slice(row);
                }
                x = g;
            }
        }
        Ok(x)
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
    fn new(
        c: &ClipTextConfig,
        proj: usize,
        bf16: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
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
                bf16,
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
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        if t == 0 || t > self.max_len {
            return Err(ModelError::Batch(format!(
                "token sequences must have 1..={} tokens, got {t}",
                self.max_len
            )));
        }
        if self.encoder.is_fast() {
            return self.forward_fast(seqs, device);
        }
        let n = seqs.len();
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

    /// [`Self::forward`] on the fast kernels. Each sequence is cut after its
    /// pooled token: with the causal mask nothing after it reaches it, so
    /// the result is the same, and no padding is computed.
    fn forward_fast(&self, seqs: &[&[u32]], device: &Device) -> Result<Tensor, ModelError> {
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut spans = Vec::with_capacity(seqs.len());
        let mut pool = Vec::with_capacity(seqs.len());
        for s in seqs {
            let start = ids.len();
            match s.get(..=self.pool_position(s)) {
                Some(kept) => ids.extend_from_slice(kept),
                // An empty sequence is pooled at its first (padding) token.
                None => ids.push(0),
            }
            let len = ids.len() - start;
            positions.extend(0..len as u32);
            spans.push(Span { start, len });
            pool.push(start + len - 1);
        }
        let rows = ids.len();
        let ids = Tensor::from_vec(ids, rows, device)?;
        let positions = Tensor::from_vec(positions, rows, device)?;
        let h = (self.token_embedding.forward(&ids)?
            + self.position_embedding.index_select(&positions, 0)?)?;
        let c = h.dim(1)?;
        let x = self.encoder.forward_fast(
            f32_vec(h)?,
            &spans,
            true,
            self.encoder.len(),
            Some(&pool),
        )?;
        let pooled = Tensor::from_vec(x, (seqs.len(), c), device)?;
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
        Self::new_with(c, false, vb)
    }

    /// With `bf16`, the encoder's linears (on the CPU kernels) hold bf16
    /// weights; see [`ops::Linear::into_bf16`].
    fn new_with(c: &ClipVisionConfig, bf16: bool, vb: VarBuilder) -> candle_core::Result<Self> {
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
                bf16,
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
        self.encoder.len()
    }

    /// Hidden states after the embeddings, `pre_layrnorm` and the first
    /// `layers` encoder layers: transformers' `hidden_states[layers]`.
    /// [n, 1 + patches, hidden] from [n, C, S, S] pixels.
    pub fn hidden_states(&self, pixels: &Tensor, layers: usize) -> Result<Tensor, ModelError> {
        let x = self.embeddings(pixels, layers)?;
        if !self.encoder.is_fast() {
            let mut x = x;
            for layer in &self.encoder.layers[..layers] {
                x = layer.forward(&x, None)?;
            }
            return Ok(x);
        }
        let (n, t, c) = x.dims3()?;
        let spans = Self::spans(n, t);
        let out = self
            .encoder
            .forward_fast(f32_vec(x)?, &spans, false, layers, None)?;
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
        if !self.encoder.is_fast() {
            let x = self.hidden_states(pixels, self.num_layers())?;
            return Ok(self.post_ln.forward(&x.i((.., 0, ..))?)?);
        }
        let x = self.embeddings(pixels, self.num_layers())?;
        let (n, t, c) = x.dims3()?;
        let spans = Self::spans(n, t);
        let pool: Vec<usize> = spans.iter().map(|s| s.start).collect();
        let cls = self.encoder.forward_fast(
            f32_vec(x)?,
            &spans,
            false,
            self.num_layers(),
            Some(&pool),
        )?;
        let cls = Tensor::from_vec(cls, (n, c), pixels.device())?;
        Ok(self.post_ln.forward(&cls)?)
    }
}

struct VisionTower {
    transformer: ClipVisionTransformer,
    projection: Linear,
}

impl VisionTower {
    fn new(
        c: &ClipVisionConfig,
        proj: usize,
        bf16: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(VisionTower {
            transformer: ClipVisionTransformer::new_with(c, bf16, vb.pp("vision_model"))?,
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
    /// On the CPU, asking for bf16 (which candle's CPU matmul lacks) builds
    /// an f32 model whose encoder linears run in bf16 with f32
    /// accumulation (see [`ops::Linear::into_bf16`]), like PyTorch's bf16
    /// autocast.
    pub fn new(cfg: &ClipConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let device = vb.device().clone();
        let bf16 = device.is_cpu() && vb.dtype() == DType::BF16;
        let vb = if bf16 { vb.set_dtype(DType::F32) } else { vb };
        let dtype = vb.dtype();
        Ok(ClipModel {
            text: TextTower::new(&cfg.text_config, cfg.projection_dim, bf16, vb.clone())?,
            vision: VisionTower::new(&cfg.vision_config, cfg.projection_dim, bf16, vb)?,
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

    /// Times batches of 1/8/32 images and texts on a full-size model:
    /// `VLEMBED_PARITY_MODEL=DIR cargo test --release --lib clip::tests::bench -- --ignored --nocapture`
    /// (`VLEMBED_BENCH=images|texts` runs one kind; `VLEMBED_BENCH_BATCHES=1,8`).
    #[test]
    #[ignore = "timing; needs VLEMBED_PARITY_MODEL pointing at a full-size model"]
    fn bench_full_size() {
        let Some(dir) = std::env::var_os("VLEMBED_PARITY_MODEL") else {
            return;
        };
        let dir = std::path::PathBuf::from(dir);
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let cfg = ClipConfig::from_json(&cfg).unwrap();
        // SAFETY: the file is not modified while mapped.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(
                &[dir.join("model.safetensors")],
                DType::F32,
                &Device::Cpu,
            )
        }
        .unwrap();
        let model = ClipModel::new(&cfg, vb.clone()).unwrap();
        // With VLEMBED_BENCH_DTYPE=bf16: time the bf16 model and print its
        // worst cosine against f32.
        let f32_model = match std::env::var("VLEMBED_BENCH_DTYPE").as_deref() {
            Ok("bf16") => {
                let f = ClipModel::new(&cfg, vb.clone()).unwrap();
                let model = ClipModel::new(&cfg, vb.set_dtype(DType::BF16)).unwrap();
                Some((f, model))
            }
            _ => None,
        };
        let (model, reference) = match f32_model {
            Some((f, b)) => (b, Some(f)),
            None => (model, None),
        };
        let kind = std::env::var("VLEMBED_BENCH").unwrap_or_default();
        let batches: Vec<usize> = std::env::var("VLEMBED_BENCH_BATCHES")
            .unwrap_or_else(|_| "1,8,32".into())
            .split(',')
            .map(|b| b.parse().unwrap())
            .collect();
        let s = cfg.vision_config.image_size;
        let img: Vec<f32> = (0..3 * s * s)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let text: Vec<u32> = [49406, 320, 1125, 539, 320, 2368, 525, 320, 8891, 49407].to_vec();
        if let Some(r) = &reference {
            let cos = |a: Tensor, b: Tensor| -> f64 {
                let (a, b): (Vec<Vec<f32>>, Vec<Vec<f32>>) =
                    (a.to_vec2().unwrap(), b.to_vec2().unwrap());
                a.iter()
                    .zip(&b)
                    .map(|(x, y)| {
                        let d: f64 = x.iter().zip(y).map(|(p, q)| (p * q) as f64).sum();
                        let nx: f64 = x.iter().map(|p| (p * p) as f64).sum::<f64>().sqrt();
                        let ny: f64 = y.iter().map(|p| (p * p) as f64).sum::<f64>().sqrt();
                        d / (nx * ny)
                    })
                    .fold(1.0, f64::min)
            };
            let imgs: Vec<Vec<f32>> = (0..4)
                .map(|j| {
                    (0..3 * s * s)
                        .map(|i| (((i + 31 * j) * 7919 % 1000) as f32) / 500.0 - 1.0)
                        .collect()
                })
                .collect();
            let imgs: Vec<&[f32]> = imgs.iter().map(|v| v.as_slice()).collect();
            let texts: Vec<Vec<u32>> = (0..4u32)
                .map(|j| vec![49406, 320 + j, 1125, 539 + 7 * j, 2368, 49407])
                .collect();
            let texts: Vec<&[u32]> = texts.iter().map(|v| v.as_slice()).collect();
            eprintln!(
                "bf16 vs f32: worst image cosine {:.7}, worst text cosine {:.7}",
                cos(
                    model.embed_pixels(&imgs).unwrap(),
                    r.embed_pixels(&imgs).unwrap()
                ),
                cos(
                    model.embed_texts(&texts).unwrap(),
                    r.embed_texts(&texts).unwrap()
                )
            );
        }
        // Process CPU time in ms (utime + stime, 100 ticks/s): on a shared
        // machine steadier than wall time.
        let cpu_ms = || -> f64 {
            let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
            let f: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split(' ').collect();
            let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            (t(12) + t(13)) * 10.0
        };
        let time = |f: &dyn Fn()| {
            f();
            let c0 = cpu_ms();
            let wall = (0..3)
                .map(|_| {
                    let t = std::time::Instant::now();
                    f();
                    t.elapsed().as_secs_f64() * 1e3
                })
                .fold(f64::MAX, f64::min);
            eprint!("[cpu {:.0} ms/run] ", (cpu_ms() - c0) / 3.0);
            wall
        };
        for &b in &batches {
            if kind != "texts" {
                let imgs: Vec<&[f32]> = (0..b).map(|_| img.as_slice()).collect();
                let ms = time(&|| {
                    model.embed_pixels(&imgs).unwrap();
                });
                eprintln!(
                    "images x{b}: {ms:.1} ms ({:.2} images/s)",
                    b as f64 * 1e3 / ms
                );
            }
            if kind != "images" {
                let texts: Vec<&[u32]> = (0..b).map(|_| text.as_slice()).collect();
                let ms = time(&|| {
                    model.embed_texts(&texts).unwrap();
                });
                eprintln!(
                    "texts x{b}: {ms:.1} ms ({:.1} texts/s)",
                    b as f64 * 1e3 / ms
                );
            }
        }
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
