//! The pre-norm decoder layer that Mistral (BGE-VL-MLLM) and Qwen2 (the
//! Qwen2-VL family) share: RMSNorm, grouped-query attention with rotary
//! positions over an additive mask, RMSNorm, SwiGLU MLP, both residual.
//! Owns the layer's weights and arithmetic; each decoder keeps its own
//! embedding, rotary tables (1-D for Mistral, M-RoPE for Qwen2) and masks
//! and hands them in. The two differ here only in Qwen2's q/k/v biases.
//!
//! Attention takes its query rows a block at a time: the f32 scores of a
//! whole prompt grow with the square of its length (a 4096-token MLLM
//! prompt with 32 heads is 2 GiB of scores); softmax is per row, so the
//! scores of one block stay within [`SCORE_BUDGET`] whatever the length.

use candle_core::{DType, Module, Tensor};
use candle_nn::{linear_b, linear_no_bias, Linear, VarBuilder};

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

/// Picks row `idx[i]` of sequence `i`: [b, t, c] -> [b, 1, c].
pub fn gather_rows(x: &Tensor, idx: &Tensor) -> candle_core::Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    x.reshape((b * t, c))?
        .index_select(idx, 0)?
        .reshape((b, 1, c))
}
