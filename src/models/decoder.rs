//! What the two multimodal decoders, Mistral (BGE-VL-MLLM) and Qwen2 (the
//! Qwen2-VL family), share: the pre-norm decoder layer (RMSNorm,
//! grouped-query attention with rotary positions over an additive mask,
//! RMSNorm, SwiGLU MLP, both residual), the input table that joins token
//! embeddings and image features, the passes over groups of sequences of
//! similar length, and the decoder's error. Each decoder keeps its own
//! embedding, rotary tables (1-D for Mistral, M-RoPE for Qwen2) and masks
//! and hands them in; the layers differ only in Qwen2's q/k/v biases.
//!
//! Attention takes its query rows a block at a time: the f32 scores of a
//! whole prompt grow with the square of its length (a 4096-token MLLM
//! prompt with 32 heads is 2 GiB of scores); softmax is per row, so the
//! scores of one block stay within [`SCORE_BUDGET`] whatever the length.

use candle_core::{DType, Module, Tensor};
use candle_nn::{linear_b, linear_no_bias, Linear, VarBuilder};

use crate::models::error::ModelError;
use crate::models::mask::{self, MASKED};

/// Scores held at once by one block of query rows, in f32 elements (256 MiB).
pub const SCORE_BUDGET: usize = 1 << 26;

/// transformers' `MistralRMSNorm` / `Qwen2RMSNorm`.
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(RmsNorm {
            weight: vb.get(size, "weight")?,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)
    }
}

/// The sizes of one layer, from the decoder's config.
#[derive(Debug, Clone, Copy)]
pub struct LayerShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    /// Whether q/k/v projections have biases (Qwen2: yes; Mistral: no).
    pub qkv_bias: bool,
}

/// Rotary tables of one pass, as `candle_nn::rotary_emb::rope` takes them:
/// `cos`/`sin` for every position ([t, d/2], or [b, t, d/2] when positions
/// differ per sequence), `last_cos`/`last_sin` at each sequence's last real
/// token ([b, 1, d/2]).
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
    pub last_cos: Tensor,
    pub last_sin: Tensor,
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// [`SCORE_BUDGET`] (smaller in tests, to exercise the blocks).
    score_budget: usize,
}

impl Attention {
    fn new(s: &LayerShape, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, kv, d) = (s.heads, s.kv_heads, s.head_dim);
        Ok(Attention {
            q: linear_b(s.hidden, h * d, s.qkv_bias, vb.pp("q_proj"))?,
            k: linear_b(s.hidden, kv * d, s.qkv_bias, vb.pp("k_proj"))?,
            v: linear_b(s.hidden, kv * d, s.qkv_bias, vb.pp("v_proj"))?,
            o: linear_no_bias(h * d, s.hidden, vb.pp("o_proj"))?,
            heads: h,
            kv_heads: kv,
            head_dim: d,
            score_budget: SCORE_BUDGET,
        })
    }

    /// `x`: [b, t, hidden] (normed) for keys/values; `xq`: the query rows,
    /// [b, tq, hidden], every position or (`last`) each sequence's last
    /// real token; `mask`: additive f32 [b, 1, 1, tq, t]. Scores and
    /// softmax run in f32 (a fully masked padding row stays finite in
    /// f16/bf16), the probabilities are cast back to the model's dtype.
    fn forward(
        &self,
        x: &Tensor,
        xq: &Tensor,
        rope: &Rope,
        last: bool,
        mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let tq = xq.dim(1)?;
        let (h, kv, d) = (self.heads, self.kv_heads, self.head_dim);
        let rep = h / kv;
        let dtype = x.dtype();
        let split = |y: Tensor, n: usize, heads: usize| -> candle_core::Result<Tensor> {
            y.reshape((b, n, heads, d))?.transpose(1, 2)?.contiguous()
        };
        let q = split(self.q.forward(xq)?, tq, h)?;
        let k = split(self.k.forward(x)?, t, kv)?;
        let v = split(self.v.forward(x)?, t, kv)?;
        let (qc, qs) = if last {
            (&rope.last_cos, &rope.last_sin)
        } else {
            (&rope.cos, &rope.sin)
        };
        let q = candle_nn::rotary_emb::rope(&q, qc, qs)?;
        let k = candle_nn::rotary_emb::rope(&k, &rope.cos, &rope.sin)?;
        let kt = k.t()?;
        let block = (self.score_budget / (b * h * t).max(1)).max(1);
        let mut parts = Vec::with_capacity(tq.div_ceil(block));
        let mut start = 0;
        while start < tq {
            let n = block.min(tq - start);
            let (qb, mb) = if n == tq {
                (q.clone(), mask.clone())
            } else {
                (
                    q.narrow(2, start, n)?.contiguous()?,
                    mask.narrow(3, start, n)?,
                )
            };
            // Grouped queries: head `g * rep + r` uses key/value head `g`, as
            // transformers' `repeat_kv` orders them; keys are never copied.
            let qb = qb.reshape((b, kv, rep * n, d))?;
            let scores = (qb.matmul(&kt)?.to_dtype(DType::F32)? / (d as f64).sqrt())?;
            let scores = scores.reshape((b, kv, rep, n, t))?.broadcast_add(&mb)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?
                .to_dtype(dtype)?
                .reshape((b, kv, rep * n, t))?;
            parts.push(probs.matmul(&v)?.reshape((b, h, n, d))?);
            start += n;
        }
        let ctx = match parts.len() {
            1 => parts.remove(0),
            _ => Tensor::cat(&parts, 2)?,
        };
        self.o
            .forward(&ctx.transpose(1, 2)?.reshape((b, tq, h * d))?)
    }
}

/// One decoder layer (`model.layers.N`).
pub struct Layer {
    ln1: RmsNorm,
    attn: Attention,
    ln2: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Layer {
    pub fn new(s: &LayerShape, vb: VarBuilder) -> candle_core::Result<Self> {
        let (hs, is) = (s.hidden, s.intermediate);
        Ok(Layer {
            ln1: RmsNorm::new(hs, s.rms_norm_eps, vb.pp("input_layernorm"))?,
            attn: Attention::new(s, vb.pp("self_attn"))?,
            ln2: RmsNorm::new(hs, s.rms_norm_eps, vb.pp("post_attention_layernorm"))?,
            gate: linear_no_bias(hs, is, vb.pp("mlp.gate_proj"))?,
            up: linear_no_bias(hs, is, vb.pp("mlp.up_proj"))?,
            down: linear_no_bias(is, hs, vb.pp("mlp.down_proj"))?,
        })
    }

    /// One layer for the rows `rows` (all rows when `None`; else row
    /// `rows[i]` of sequence `i`, its last real token): residual stream `x`
    /// [b, t, hidden] in, the updated query rows out.
    pub fn forward(
        &self,
        x: &Tensor,
        rows: Option<&Tensor>,
        rope: &Rope,
        mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let normed = self.ln1.forward(x)?;
        let (residual, xq) = match rows {
            None => (x.clone(), normed.clone()),
            Some(idx) => (gather_rows(x, idx)?, gather_rows(&normed, idx)?),
        };
        let a = self
            .attn
            .forward(&normed, &xq, rope, rows.is_some(), mask)?;
        let h = (residual + a)?;
        let y = self.ln2.forward(&h)?;
        let g = candle_nn::ops::silu(&self.gate.forward(&y)?)?;
        let m = self.down.forward(&(g * self.up.forward(&y)?)?)?;
        h + m
    }

    /// Sets how many f32 scores one block of query rows may hold (tests
    /// shrink it to exercise the blocks; the result does not change).
    #[cfg(test)]
    pub fn set_score_budget(&mut self, elements: usize) {
        self.attn.score_budget = elements;
    }
}

/// The flat row of each sequence's last real token in a [b, t] batch:
/// `i * t + lens[i] - 1`, on `device` (for [`gather_rows`]).
pub fn last_index(
    lens: &[usize],
    t: usize,
    device: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    let idx: Vec<u32> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| (i * t + l.saturating_sub(1)) as u32)
        .collect();
    Tensor::from_vec(idx, lens.len(), device)
}

/// Picks row `idx[i]` of sequence `i`: [b, t, c] -> [b, 1, c].
pub fn gather_rows(x: &Tensor, idx: &Tensor) -> candle_core::Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    x.reshape((b * t, c))?
        .index_select(idx, 0)?
        .reshape((b, 1, c))
}

/// Why a decoder pass failed.
#[derive(Debug, thiserror::Error)]
pub enum DecoderError {
    #[error("invalid decoder input: {0}")]
    Input(String),
    /// The caller's `between` hook asked the pass to stop.
    #[error("the pass was interrupted between two layers")]
    Interrupted,
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl From<DecoderError> for ModelError {
    fn from(e: DecoderError) -> Self {
        match e {
            DecoderError::Input(m) => ModelError::Batch(m),
            DecoderError::Interrupted => ModelError::Interrupted,
            DecoderError::Candle(e) => ModelError::Candle(e),
        }
    }
}

/// Checks a pass's sequence lengths: each in `1..=t` (the padded length),
/// and `t` within the decoder's `max_positions`.
pub fn check_lengths(lens: &[usize], t: usize, max_positions: usize) -> Result<(), DecoderError> {
    if let Some(&bad) = lens.iter().find(|&&l| l == 0 || l > t) {
        return Err(DecoderError::Input(format!(
            "a sequence length {bad} is not in 1..={t}"
        )));
    }
    if t > max_positions {
        return Err(DecoderError::Input(format!(
            "sequences of {t} tokens exceed max_position_embeddings {max_positions}"
        )));
    }
    Ok(())
}

/// The additive mask (f32) of right-padded sequences of `lens` real tokens
/// in rows of `t`: [b, 1, 1, t, t] for every query row, or [b, 1, 1, 1, t]
/// for each sequence's last real token when `last_only`. A query sees the
/// keys at or before it, not padding, and (with `window`) fewer than
/// `window` positions back. Made on `device` from positions and lengths with
/// comparison kernels: `b` integers are uploaded, never a `t x t` buffer.
pub fn causal_mask(
    lens: &[usize],
    t: usize,
    last_only: bool,
    window: Option<usize>,
    device: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    let b = lens.len();
    let keys = mask::positions(t, device)?.reshape((1, 1, t))?;
    let upload = |v: Vec<u32>| Tensor::from_vec(v, (b, 1, 1), device);
    let lens_t = upload(lens.iter().map(|&l| l as u32).collect())?;
    // Query positions: every row, or each sequence's last real token.
    let queries = if last_only {
        upload(lens.iter().map(|&l| l.saturating_sub(1) as u32).collect())?
    } else {
        mask::positions(t, device)?.reshape((1, t, 1))?
    };
    // Causal (key <= query) and not padding (key < len).
    let mut keep = keys
        .broadcast_le(&queries)?
        .broadcast_mul(&keys.broadcast_lt(&lens_t)?)?;
    if let Some(w) = window.filter(|&w| w < t) {
        // Within the window: query - key < w, i.e. key + w > query.
        let shifted = Tensor::arange(w as u32, (w + t) as u32, device)?.reshape((1, 1, t))?;
        keep = keep.broadcast_mul(&shifted.broadcast_gt(&queries)?)?;
    }
    let tq = if last_only { 1 } else { t };
    mask::additive(&keep, MASKED)?.reshape((b, 1, 1, tq, t))
}

/// The input table of a multimodal pass: the token embeddings `tokens`
/// [n, hidden], then each image's features in order (cast to the tokens'
/// dtype), then one zero row for padding. Sequences are gathered from it by
/// row index, so an image's features are placed without copying per
/// sequence. Returns the table, each image's first row, and the zero row.
pub fn input_table(
    tokens: Tensor,
    features: &[Tensor],
) -> candle_core::Result<(Tensor, Vec<usize>, u32)> {
    let (n, hidden) = tokens.dims2()?;
    let (dtype, device) = (tokens.dtype(), tokens.device().clone());
    let mut parts = Vec::with_capacity(features.len() + 2);
    parts.push(tokens);
    let mut starts = Vec::with_capacity(features.len());
    let mut offset = n;
    for f in features {
        starts.push(offset);
        offset += f.dim(0)?;
        parts.push(f.to_dtype(dtype)?);
    }
    parts.push(Tensor::zeros((1, hidden), dtype, &device)?);
    Ok((Tensor::cat(&parts, 0)?, starts, offset as u32))
}

/// Runs sequences through a decoder in groups of similar length, longest
/// first: each group is padded with `zero_row` to its longest and holds at
/// most `group_tokens` padded tokens (a longer sequence goes alone), which
/// bounds one pass's activations while keeping padding low. `rows[i]`: the
/// table rows of sequence `i`; `run(group, x)` gets the group's sequence
/// indices and their inputs [g, t, hidden] and returns [g, hidden]. The
/// results come back in sequence order, in f32; a sequence's result does
/// not depend on its group (it attends only to its own rows).
pub fn run_grouped(
    table: &Tensor,
    rows: &[Vec<u32>],
    zero_row: u32,
    group_tokens: usize,
    mut run: impl FnMut(&[usize], &Tensor) -> Result<Tensor, DecoderError>,
) -> Result<Vec<Vec<f32>>, DecoderError> {
    let hidden = table.dim(1)?;
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(rows[i].len()));
    let mut out: Vec<Vec<f32>> = vec![Vec::new(); rows.len()];
    let mut g = 0;
    while g < order.len() {
        let t = rows[order[g]].len();
        let mut end = g + 1;
        while end < order.len() && (end - g + 1) * t <= group_tokens {
            end += 1;
        }
        let group = &order[g..end];
        let mut index = Vec::with_capacity(group.len() * t);
        for &i in group {
            index.extend_from_slice(&rows[i]);
            index.extend(std::iter::repeat_n(zero_row, t - rows[i].len()));
        }
        let idx = Tensor::from_vec(index, group.len() * t, table.device())?;
        let x = table
            .index_select(&idx, 0)?
            .reshape((group.len(), t, hidden))?;
        let h = run(group, &x)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        for (&i, v) in group.iter().zip(h) {
            out[i] = v;
        }
        g = end;
    }
    Ok(out)
}
