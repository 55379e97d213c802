//! The CLIP transformer encoder (pre-norm layers: attention, then MLP), as
//! candle modules or, on the CPU in f32 with quick-GELU, as the same weights
//! for the kernels of [`ops`] ([`Encoder`] says which).

use std::ops::ControlFlow;

use candle_core::{DType, Module, Tensor};
use candle_nn::{layer_norm, linear, LayerNorm, Linear, VarBuilder};

use super::config::{Activation, ClipTextConfig, ClipVisionConfig};
use crate::models::error::ModelError;
use crate::models::ops::{self, Queries, Span};

/// The shape of one encoder and how its linears are stored.
#[derive(Debug, Clone, Copy)]
pub(super) struct EncoderConfig {
    pub layers: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub eps: f64,
    pub act: Activation,
    /// Hold the fast layers' linears in bf16 ([`ops::Linear::into_bf16`]).
    pub bf16: bool,
    /// Where the fast layers' products run ([`ops::Linear::into_backend`]).
    pub backend: ops::Backend,
}

/// `encoder()` for a tower config: the text and vision configs name their
/// encoder's shape with the same keys (transformers' `CLIPEncoder` reads
/// both alike).
macro_rules! encoder_of {
    ($($config:ty),*) => {$(
        impl $config {
            pub(super) fn encoder(&self, bf16: bool, backend: ops::Backend) -> EncoderConfig {
                EncoderConfig {
                    layers: self.num_hidden_layers,
                    hidden: self.hidden_size,
                    intermediate: self.intermediate_size,
                    heads: self.num_attention_heads,
                    eps: self.layer_norm_eps,
                    act: self.hidden_act,
                    bf16,
                    backend,
                }
            }
        }
    )*};
}

encoder_of!(ClipTextConfig, ClipVisionConfig);

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

/// An encoder layer as candle modules.
pub(super) struct EncoderLayer {
    ln1: LayerNorm,
    attn: Attention,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    fn new(c: &EncoderConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(EncoderLayer {
            ln1: layer_norm(c.hidden, c.eps, vb.pp("layer_norm1"))?,
            attn: Attention::new(c.hidden, c.heads, vb.pp("self_attn"))?,
            ln2: layer_norm(c.hidden, c.eps, vb.pp("layer_norm2"))?,
            fc1: linear(c.hidden, c.intermediate, vb.pp("mlp.fc1"))?,
            fc2: linear(c.intermediate, c.hidden, vb.pp("mlp.fc2"))?,
            act: c.act,
        })
    }

    pub(super) fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
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

pub(super) fn f32_vec(t: Tensor) -> candle_core::Result<Vec<f32>> {
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

/// Rows `rows` (each `c` wide) of the packed rows `x`, in order.
fn gather_rows(x: &[f32], c: usize, rows: &[usize]) -> candle_core::Result<Vec<f32>> {
    let mut g = Vec::with_capacity(rows.len() * c);
    for &r in rows {
        let row = x.get(r * c..(r + 1) * c).ok_or_else(|| {
            candle_core::Error::Msg(format!("pooled row {r} out of {}", x.len() / c.max(1)))
        })?;
        g.extend_from_slice(row);
    }
    Ok(g)
}

impl FastLayer {
    fn new(c: &EncoderConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let hidden = c.hidden;
        let a = vb.pp("self_attn");
        let qkv = ops::Linear::concat(&[
            fast_linear(hidden, hidden, a.pp("q_proj"))?,
            fast_linear(hidden, hidden, a.pp("k_proj"))?,
            fast_linear(hidden, hidden, a.pp("v_proj"))?,
        ])?;
        let lin = |l: ops::Linear| l.into_backend(c.backend, c.bf16);
        Ok(FastLayer {
            ln1: fast_ln(hidden, vb.pp("layer_norm1"))?,
            qkv: lin(qkv)?,
            out: lin(fast_linear(hidden, hidden, a.pp("out_proj"))?)?,
            ln2: fast_ln(hidden, vb.pp("layer_norm2"))?,
            fc1: lin(fast_linear(hidden, c.intermediate, vb.pp("mlp.fc1"))?)?,
            fc2: lin(fast_linear(c.intermediate, hidden, vb.pp("mlp.fc2"))?)?,
            heads: c.heads,
            eps: c.eps as f32,
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
            Some(p) => (gather_rows(&x, c, p)?, p.len(), Queries::One(p)),
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
        let f = self.fc1.forward_act(&h, out_rows, ops::Act::QuickGelu)?;
        self.fc2.forward_into(&f, out_rows, &mut x, true)?;
        Ok(x)
    }
}

/// Whether an encoder built from `vb` runs on [`ops`].
fn use_fast_kernels(vb: &VarBuilder, act: Activation) -> bool {
    vb.device().is_cpu()
        && vb.dtype() == DType::F32
        && act == Activation::QuickGelu
        && std::env::var("VLEMBED_CLIP_KERNELS").map_or(true, |v| v != "candle")
}

/// Rows of packed sequences the fast encoder takes through all layers at
/// once (a group holds at least one sequence).
const GROUP_ROWS: usize = 800;

/// Rows of a typical text batch: 32 short texts of about 16 tokens; and of
/// one short text (a query).
const TEXT_ROWS: usize = 512;
const QUERY_ROWS: usize = 16;

/// The products one fast layer of width `hidden` computes over a group of
/// `rows` rows (none when the encoder runs on candle), for
/// [`ops::backend`]'s measurement.
fn layer_shapes(
    act: Activation,
    rows: usize,
    hidden: usize,
    inter: usize,
) -> Vec<ops::MatmulShape> {
    if act != Activation::QuickGelu {
        return Vec::new();
    }
    ops::MatmulShape::layer(rows, hidden, inter).to_vec()
}

impl ClipTextConfig {
    /// A text batch's and one short text's products per fast layer.
    pub(crate) fn matmul_shapes(&self) -> Vec<ops::MatmulShape> {
        let (act, h, i) = (self.hidden_act, self.hidden_size, self.intermediate_size);
        let mut s = layer_shapes(act, TEXT_ROWS.min(GROUP_ROWS), h, i);
        s.extend(layer_shapes(act, QUERY_ROWS, h, i));
        s
    }
}

impl ClipVisionConfig {
    /// An image group's products per fast layer (as many whole images as
    /// fit in [`GROUP_ROWS`] rows, at least one).
    pub(crate) fn matmul_shapes(&self) -> Vec<ops::MatmulShape> {
        let tokens = (self.image_size / self.patch_size.max(1)).pow(2) + 1;
        let rows = tokens * (GROUP_ROWS / tokens).max(1);
        layer_shapes(
            self.hidden_act,
            rows,
            self.hidden_size,
            self.intermediate_size,
        )
    }
}

/// The encoder layers: candle modules, or (see [`use_fast_kernels`]) the
/// same weights for the CPU kernels.
pub(super) enum Encoder {
    Candle(Vec<EncoderLayer>),
    Fast(FastEncoder),
}

/// The encoder on the kernels of [`ops`], over packed rows.
pub(super) struct FastEncoder {
    layers: Vec<FastLayer>,
}

impl Encoder {
    pub(super) fn new(c: &EncoderConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let layer_vb = |i: usize| vb.pp(format!("layers.{i}"));
        if use_fast_kernels(&vb, c.act) {
            let layers = (0..c.layers)
                .map(|i| FastLayer::new(c, layer_vb(i)))
                .collect::<candle_core::Result<_>>()?;
            return Ok(Encoder::Fast(FastEncoder { layers }));
        }
        let layers = (0..c.layers)
            .map(|i| EncoderLayer::new(c, layer_vb(i)))
            .collect::<candle_core::Result<_>>()?;
        Ok(Encoder::Candle(layers))
    }

    pub(super) fn len(&self) -> usize {
        match self {
            Encoder::Candle(layers) => layers.len(),
            Encoder::Fast(f) => f.layers.len(),
        }
    }
}

impl FastEncoder {
    pub(super) fn len(&self) -> usize {
        self.layers.len()
    }

    /// The first `layers` layers over packed rows; with `pool`, only
    /// those rows (one per sequence) come out of the last one. `between`
    /// is called between two layers (see
    /// [`crate::models::EmbeddingModel::embed_stepped`]); `Break` stops
    /// the pass with [`ModelError::Interrupted`].
    ///
    /// Sequences go through all layers a group at a time (about
    /// [`GROUP_ROWS`] rows): every op but attention is per row and attention
    /// stays inside a sequence, so this is exact, and it keeps a group's
    /// activations in cache while the weights stream past.
    pub(super) fn forward(
        &self,
        x: Vec<f32>,
        spans: &[Span],
        causal: bool,
        layers: usize,
        pool: Option<&[usize]>,
        between: &mut dyn FnMut() -> ControlFlow<()>,
    ) -> Result<Vec<f32>, ModelError> {
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
            return self.forward_group(x, spans, causal, layers, pool, between);
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
            out.extend(self.forward_group(
                xs,
                &local,
                causal,
                layers,
                local_pool.as_deref(),
                between,
            )?);
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
        between: &mut dyn FnMut() -> ControlFlow<()>,
    ) -> Result<Vec<f32>, ModelError> {
        let layers = &self.layers[..layers.min(self.layers.len())];
        for (i, l) in layers.iter().enumerate() {
            if between().is_break() {
                return Err(ModelError::Interrupted);
            }
            let last = i + 1 == layers.len();
            x = l.forward(x, spans, causal, if last { pool } else { None })?;
        }
        if layers.is_empty() {
            if let Some(p) = pool {
                let rows = spans.iter().map(|s| s.start + s.len).max().unwrap_or(0);
                x = gather_rows(&x, x.len() / rows.max(1), p)?;
            }
        }
        Ok(x)
    }
}
