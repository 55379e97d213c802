//! The Qwen2 language model of Qwen2-VL / Qwen2.5-VL (transformers 4.51.3
//! `Qwen2VLModel` / `Qwen2_5_VLModel`) used as an encoder: input embeddings
//! and three position ids per token in, the final-norm hidden state of each
//! sequence's last token out.
//!
//! Owns: the final norm and the M-RoPE tables (the layers, RMSNorm,
//! grouped-query attention with q/k/v biases and SwiGLU MLP, are
//! [`crate::models::decoder`]'s, shared with Mistral): frequency `j` of a head rotates by
//! the temporal, height or width position as `mrope_section` assigns it
//! (`apply_multimodal_rotary_pos_emb`). No KV cache, no `lm_head` (never read;
//! tied to the embeddings in the released 2B/3B models anyway).
//!
//! Sequences are right-padded and carry their own positions, so an input's
//! result does not depend on its batch mates (upstream pads on the left;
//! M-RoPE positions ignore padding there too). Masks are additive with a
//! large finite negative ([`crate::models::mask`]) and softmax runs in
//! `f32`, so fully masked padding rows never turn into NaN in f16/bf16.
//! Both are made on the replica's device: the masks from the sequence
//! lengths (kept by shape, [`ShapeCache`]), the M-RoPE tables from the
//! positions (3 integers a token are uploaded, not the tables).
//! Attention is computed a block of query rows at a time (at most
//! [`SCORE_BUDGET`] `f32` scores). Speed: plain candle, like `mistral.rs`;
//! the `models::ops` kernels are not used yet.

use std::ops::ControlFlow;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{embedding, Embedding, VarBuilder};

use super::config::QwenTextConfig;

use crate::models::decoder::{causal_mask, check_lengths, last_index, DecoderError, Layer, Rope};
pub use crate::models::decoder::{RmsNorm, SCORE_BUDGET};
use crate::models::mask::ShapeCache;

/// The decoder stack without `lm_head`.
pub struct QwenDecoder {
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    cfg: QwenTextConfig,
    /// Rotary inverse frequencies by axis, [3, head_dim / 2] f32 on the
    /// device: row `a` holds frequency `j`'s `inv_freq` where `mrope_section`
    /// gives it axis `a` (0 temporal, 1 height, 2 width), else 0.
    freq_by_axis: Tensor,
    /// Additive masks by (sequence lengths, padded length, last row only).
    masks: ShapeCache<(Vec<usize>, usize, bool)>,
    device: Device,
    dtype: DType,
}

/// Bytes of masks a decoder keeps: one 4096-token sequence's full mask.
const MASK_CACHE_BYTES: usize = 64 << 20;

impl QwenDecoder {
    /// `vb` points at the language model (`model` or `model.language_model`).
    pub fn new(c: &QwenTextConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let layers = (0..c.num_hidden_layers)
            .map(|i| Layer::new(&c.layer_shape(), vb.pp(format!("layers.{i}"))))
            .collect::<candle_core::Result<_>>()?;
        let d = c.head_dim();
        let base = c.rope_theta as f32;
        let [s0, s1, _] = c.mrope_section;
        let mut by_axis = vec![0f32; 3 * (d / 2)];
        for j in 0..d / 2 {
            let axis = if j < s0 {
                0
            } else if j < s0 + s1 {
                1
            } else {
                2
            };
            by_axis[axis * (d / 2) + j] = 1.0f32 / base.powf((2 * j) as f32 / d as f32);
        }
        let freq_by_axis = Tensor::from_vec(by_axis, (3, d / 2), vb.device())?;
        Ok(QwenDecoder {
            embed_tokens: embedding(c.vocab_size, c.hidden_size, vb.pp("embed_tokens"))?,
            layers,
            norm: RmsNorm::new(c.hidden_size, c.rms_norm_eps, vb.pp("norm"))?,
            cfg: c.clone(),
            freq_by_axis,
            masks: ShapeCache::new(MASK_CACHE_BYTES),
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Token embeddings of `ids` (a 1-D u32 tensor): [n, hidden].
    pub fn embed_tokens(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.embed_tokens.forward(ids)
    }

    /// M-RoPE `cos`/`sin` [b, t, head_dim / 2] (the model's dtype) of
    /// right-padded sequences with these (temporal, height, width)
    /// positions (padding at position 0), and the same at each sequence's
    /// last real token, [b, 1, head_dim / 2]. Made on the device: only the
    /// positions are uploaded (3 integers a token); `last` is
    /// [`last_index`] of the batch. Each angle is
    /// `position[axis(j)] * inv_freq[j]` in f32, as transformers computes
    /// it: a sum of one product and two exact zeros, elementwise (no matrix
    /// product, which TF32 could round).
    fn rope(
        &self,
        positions: &[&[[u32; 3]]],
        t: usize,
        last: &Tensor,
    ) -> candle_core::Result<Rope> {
        let b = positions.len();
        let mut flat = Vec::with_capacity(b * t * 3);
        for p in positions {
            for q in p.iter().chain(std::iter::repeat_n(&[0u32; 3], t - p.len())) {
                flat.extend(q.iter().map(|&x| x as f32));
            }
        }
        let pos = Tensor::from_vec(flat, (b * t, 3), &self.device)?;
        let term = |a: usize| -> candle_core::Result<Tensor> {
            pos.narrow(1, a, 1)?
                .broadcast_mul(&self.freq_by_axis.narrow(0, a, 1)?)
        };
        let half = self.freq_by_axis.dim(1)?;
        let angles = ((term(0)? + term(1)?)? + term(2)?)?.reshape((b, t, half))?;
        let at_last = |x: &Tensor| -> candle_core::Result<Tensor> {
            x.reshape((b * t, half))?
                .index_select(last, 0)?
                .reshape((b, 1, half))
        };
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        Ok(Rope {
            last_cos: at_last(&cos)?.to_dtype(self.dtype)?,
            last_sin: at_last(&sin)?.to_dtype(self.dtype)?,
            cos: cos.to_dtype(self.dtype)?,
            sin: sin.to_dtype(self.dtype)?,
        })
    }

    /// The final-norm hidden state of each sequence's last real token,
    /// [b, hidden], of right-padded input embeddings [b, t, hidden];
    /// sequence `i` has `positions[i].len()` real tokens with those
    /// (temporal, height, width) positions. `between` is called before
    /// each layer; `Break` stops the pass with [`DecoderError::Interrupted`].
    pub fn forward_last_stepped(
        &self,
        embeds: &Tensor,
        positions: &[&[[u32; 3]]],
        between: &mut dyn FnMut() -> ControlFlow<()>,
    ) -> Result<Tensor, DecoderError> {
        let (b, t, c) = embeds.dims3()?;
        if b == 0 || b != positions.len() || c != self.cfg.hidden_size {
            return Err(DecoderError::Input(format!(
                "{b} sequences {c} wide for {} position lists and a {}-wide decoder",
                positions.len(),
                self.cfg.hidden_size
            )));
        }
        let lens: Vec<usize> = positions.iter().map(|p| p.len()).collect();
        check_lengths(&lens, t, self.cfg.max_position_embeddings)?;
        let idx = last_index(&lens, t, &self.device)?;
        let rope = self.rope(positions, t, &idx)?;
        let mask_for = |last_only: bool| -> candle_core::Result<Tensor> {
            self.masks.get_or_make((lens.clone(), t, last_only), || {
                causal_mask(&lens, t, last_only, None, &self.device)
            })
        };
        let mut x = embeds.to_dtype(self.dtype)?;
        let Some((last, rest)) = self.layers.split_last() else {
            return Err(DecoderError::Input("the decoder has no layers".into()));
        };
        if !rest.is_empty() {
            let mask = mask_for(false)?;
            for layer in rest {
                if between().is_break() {
                    return Err(DecoderError::Interrupted);
                }
                x = layer.forward(&x, None, &rope, &mask)?;
            }
        }
        if between().is_break() {
            return Err(DecoderError::Interrupted);
        }
        let x = last.forward(&x, Some(&idx), &rope, &mask_for(true)?)?;
        Ok(self.norm.forward(&x)?.reshape((b, self.cfg.hidden_size))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    fn tiny() -> QwenDecoder {
        let c = QwenTextConfig {
            vocab_size: 50,
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 64,
            rms_norm_eps: 1e-6,
            rope_theta: 100.0,
            mrope_section: [1, 1, 0],
        };
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let d = QwenDecoder::new(&c, vb).unwrap();
        for (i, var) in map.all_vars().iter().enumerate() {
            let n = var.as_tensor().elem_count();
            let v: Vec<f32> = (0..n)
                .map(|k| (((k * 7919 + i * 104729) % 1000) as f32 / 1000.0 - 0.5) * 0.8)
                .collect();
            var.set(&Tensor::from_vec(v, var.as_tensor().shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
        d
    }

    fn diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// The device-made M-RoPE tables equal transformers' computation on the
    /// host (f32 `position[axis(j)] * inv_freq[j]`, then cos/sin) bit for
    /// bit, padding rows at position 0, the last-token rows included; the
    /// device-made masks equal the host's causal-and-padding mask.
    #[test]
    fn device_tables_and_masks_equal_the_host_computation() {
        let d = tiny();
        let (dim, theta) = (d.cfg.head_dim(), d.cfg.rope_theta as f32);
        let [s0, s1, _] = d.cfg.mrope_section;
        let pa: Vec<[u32; 3]> = (0..5).map(|i| [i, 40 + i, 3 * i + 1]).collect();
        let pb: Vec<[u32; 3]> = (0..3).map(|i| [i + 9, i, 63]).collect();
        let t = 5;
        let last = last_index(&[pa.len(), pb.len()], t, &Device::Cpu).unwrap();
        let rope = d.rope(&[&pa, &pb], t, &last).unwrap();
        let host = |p: &[u32; 3]| -> (Vec<f32>, Vec<f32>) {
            (0..dim / 2)
                .map(|j| {
                    let axis = if j < s0 {
                        0
                    } else if j < s0 + s1 {
                        1
                    } else {
                        2
                    };
                    let inv = 1.0f32 / theta.powf((2 * j) as f32 / dim as f32);
                    let a = p[axis] as f32 * inv;
                    (a.cos(), a.sin())
                })
                .unzip()
        };
        let cos: Vec<Vec<Vec<f32>>> = rope.cos.to_vec3().unwrap();
        let sin: Vec<Vec<Vec<f32>>> = rope.sin.to_vec3().unwrap();
        for (s, p) in [&pa, &pb].iter().enumerate() {
            for r in 0..t {
                let (c, n) = host(p.get(r).unwrap_or(&[0; 3]));
                assert_eq!(cos[s][r], c, "cos, sequence {s} row {r}");
                assert_eq!(sin[s][r], n, "sin, sequence {s} row {r}");
            }
            let (c, n) = host(&p[p.len() - 1]);
            let lc: Vec<Vec<Vec<f32>>> = rope.last_cos.to_vec3().unwrap();
            let ls: Vec<Vec<Vec<f32>>> = rope.last_sin.to_vec3().unwrap();
            assert_eq!((&lc[s][0], &ls[s][0]), (&c, &n), "last token of {s}");
        }
        let lens = [5usize, 3];
        for last_only in [false, true] {
            let m: Vec<f32> = causal_mask(&lens, t, last_only, None, &Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let tq = if last_only { 1 } else { t };
            for (s, &len) in lens.iter().enumerate() {
                for qi in 0..tq {
                    let i = if last_only { len - 1 } else { qi };
                    for k in 0..t {
                        let want = if k <= i && k < len {
                            0.0
                        } else {
                            crate::models::mask::MASKED
                        };
                        assert_eq!(m[(s * tq + qi) * t + k], want, "{s} {qi} {k}");
                    }
                }
            }
        }
    }

    /// Right padding with per-sequence positions: a sequence's result does
    /// not depend on its batch mates, blocks of query rows agree with one
    /// block, and each axis of the positions matters.
    #[test]
    fn batch_mates_blocks_and_positions() {
        let mut d = tiny();
        let dev = Device::Cpu;
        let emb = |n: usize, seed: usize| -> Vec<f32> {
            (0..n * 16)
                .map(|k| ((k * 31 + seed * 17) as f32 * 0.013).sin())
                .collect()
        };
        let pa: Vec<[u32; 3]> = (0..7).map(|i| [i, i + (i > 2) as u32, i * 2]).collect();
        let pb: Vec<[u32; 3]> = (0..4).map(|i| [i; 3]).collect();
        let go = &mut || ControlFlow::Continue(());
        let one = |d: &QwenDecoder, v: &[f32], p: &[[u32; 3]]| -> Vec<f32> {
            let x = Tensor::from_vec(v.to_vec(), (1, p.len(), 16), &dev).unwrap();
            d.forward_last_stepped(&x, &[p], &mut || ControlFlow::Continue(()))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (a, b) = (emb(7, 1), emb(4, 2));
        let (sa, sb) = (one(&d, &a, &pa), one(&d, &b, &pb));
        let mut padded = a.clone();
        padded.extend_from_slice(&b);
        padded.extend(std::iter::repeat_n(5.0f32, 3 * 16));
        let x = Tensor::from_vec(padded, (2, 7, 16), &dev).unwrap();
        let both: Vec<Vec<f32>> = d
            .forward_last_stepped(&x, &[&pa, &pb], go)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert!(diff(&both[0], &sa) < 1e-5 && diff(&both[1], &sb) < 1e-5);
        for l in &mut d.layers {
            l.set_score_budget(2 * 4 * 7);
        }
        let blocked: Vec<Vec<f32>> = d
            .forward_last_stepped(&x, &[&pa, &pb], go)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert!(diff(&blocked[0], &sa) < 1e-5 && diff(&blocked[1], &sb) < 1e-5);
        // The height axis (section 1) changes the result; the width axis has
        // no frequencies in this config (section [1, 1, 0]).
        let mut ph = pa.clone();
        ph[6][1] += 5;
        let dh = diff(&one(&d, &a, &ph), &sa);
        assert!(dh > 1e-4, "{dh}");
        let mut pw = pa.clone();
        pw[6][2] += 5;
        assert!(diff(&one(&d, &a, &pw), &sa) < 1e-6);
        let mut stop = || ControlFlow::Break(());
        assert!(matches!(
            d.forward_last_stepped(&x, &[&pa, &pb], &mut stop),
            Err(DecoderError::Interrupted)
        ));
    }
}
