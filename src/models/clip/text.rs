//! The CLIP text tower: token and position embeddings, the causal encoder,
//! `final_layer_norm` at the pooled token (the first EOS, found on the host)
//! and `text_projection`. On the candle path (GPUs) the causal mask is made
//! on the device and kept per sequence length ([`ShapeCache`]).

use candle_core::{Device, Module, Tensor};
use candle_nn::{embedding, layer_norm, linear_no_bias, Embedding, LayerNorm, Linear, VarBuilder};

use super::config::ClipTextConfig;
use super::encoder::{f32_vec, Encoder, FastEncoder};
use crate::models::error::ModelError;
use crate::models::mask::{self, mask_value, ShapeCache};
use crate::models::ops::{self, Span};

pub(super) struct TextTower {
    token_embedding: Embedding,
    position_embedding: Tensor,
    encoder: Encoder,
    final_ln: LayerNorm,
    projection: Linear,
    eos_token_id: u32,
    max_len: usize,
    /// Causal masks by sequence length (at most 77 x 77 values each).
    masks: ShapeCache<usize>,
}

/// Bytes of causal masks a text tower keeps: every length up to 77 in f32.
const MASK_CACHE_BYTES: usize = 2 << 20;

impl TextTower {
    pub(super) fn new(
        c: &ClipTextConfig,
        proj: usize,
        bf16: bool,
        backend: ops::Backend,
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
            encoder: Encoder::new(&c.encoder(bf16, backend), tm.pp("encoder"))?,
            final_ln: layer_norm(c.hidden_size, c.layer_norm_eps, tm.pp("final_layer_norm"))?,
            projection: linear_no_bias(c.hidden_size, proj, vb.pp("text_projection"))?,
            eos_token_id: c.eos_token_id,
            max_len: c.max_position_embeddings,
            masks: ShapeCache::new(MASK_CACHE_BYTES),
        })
    }

    /// The additive causal mask [1, 1, t, t] in `dtype`, made on `device`
    /// from positions: a key after the query is masked.
    fn causal_mask(
        &self,
        t: usize,
        dtype: candle_core::DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.masks.get_or_make(t, || {
            let p = mask::positions(t, device)?;
            // Key j is seen by query i when j <= i.
            let keep = p.reshape((1, t))?.broadcast_le(&p.reshape((t, 1))?)?;
            mask::additive(&keep, mask_value(dtype))?
                .to_dtype(dtype)?
                .reshape((1, 1, t, t))
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
    pub(super) fn forward(&self, seqs: &[&[u32]], device: &Device) -> Result<Tensor, ModelError> {
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        if t == 0 || t > self.max_len {
            return Err(ModelError::Batch(format!(
                "token sequences must have 1..={} tokens, got {t}",
                self.max_len
            )));
        }
        let layers = match &self.encoder {
            Encoder::Fast(fast) => return self.forward_fast(fast, seqs, device),
            Encoder::Candle(layers) => layers,
        };
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
        let mask = self.causal_mask(t, h.dtype(), device)?;
        let mut h = h;
        for l in layers {
            h = l.forward(&h, Some(&mask))?;
        }
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
    fn forward_fast(
        &self,
        encoder: &FastEncoder,
        seqs: &[&[u32]],
        device: &Device,
    ) -> Result<Tensor, ModelError> {
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
        // Texts are short: their passes are not stepped.
        let x = encoder.forward(
            f32_vec(h)?,
            &spans,
            true,
            encoder.len(),
            Some(&pool),
            &mut || std::ops::ControlFlow::Continue(()),
        )?;
        let pooled = Tensor::from_vec(x, (seqs.len(), c), device)?;
        let pooled = self.final_ln.forward(&pooled)?;
        Ok(self.projection.forward(&pooled)?)
    }
}
