//! The Qwen2-VL / Qwen2.5-VL vision tower (transformers 4.51.3
//! `Qwen2VisionTransformerPretrainedModel` /
//! `Qwen2_5_VisionTransformerPretrainedModel`), as candle modules.
//!
//! Owns: the patch embedding (the Conv3d over `C x T x P x P` patches with
//! a stride equal to its kernel is one matmul against the flattened kernel),
//! 2D rotary positions (height and width halves of each head's rotary
//! frequencies), the blocks (Qwen2-VL: LayerNorm, QuickGELU MLP, attention
//! over the whole image; Qwen2.5-VL: RMSNorm, SwiGLU MLP, attention inside
//! windows of `window_size` pixels except at `fullatt_block_indexes`), and
//! the patch merger (norm, `merge x merge` neighbours concatenated, a GELU
//! MLP into the language model's width).
//!
//! Window attention reorders the patches window by window (in units of one
//! merged token, as transformers' `get_window_index` does) before the first
//! block and restores the order after the merger; attention is computed per
//! segment (an image, or a window) and never across. Softmax runs in `f32`,
//! and the rotary embedding too, as upstream upcasts both.
//!
//! Memory: attention is computed a block of query rows at a time, so its
//! `f32` scores stay within [`SCORE_BUDGET`] whatever the image size.
//! Speed: this is the plain candle formulation (one small matmul per window
//! and head group); the fast CPU kernels of `models::ops` are not used yet.

use std::ops::ControlFlow;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{layer_norm, linear, LayerNorm, Linear, VarBuilder};

use super::config::{Activation, Generation, QwenVisionConfig};
use super::decoder::RmsNorm;
use super::image::GridThw;
use crate::models::ModelError;

/// The most `f32` attention scores one block of query rows may hold (256 MiB).
pub const SCORE_BUDGET: usize = 1 << 26;
/// The vision tower's rotary base (`Qwen2_5_VisionRotaryEmbedding`'s theta).
const ROPE_THETA: f32 = 10000.0;
/// Every vision norm's epsilon (hard-coded upstream).
const NORM_EPS: f64 = 1e-6;

enum Norm {
    Layer(LayerNorm),
    Rms(RmsNorm),
}

impl Norm {
    fn new(g: Generation, size: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(match g {
            Generation::Qwen2Vl => Norm::Layer(layer_norm(size, NORM_EPS, vb)?),
            Generation::Qwen25Vl => Norm::Rms(RmsNorm::new(size, NORM_EPS, vb)?),
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Norm::Layer(n) => n.forward(x),
            Norm::Rms(n) => n.forward(x),
        }
    }
}

fn activate(act: Activation, x: &Tensor) -> candle_core::Result<Tensor> {
    match act {
        Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        Activation::Gelu => x.gelu_erf(),
        Activation::GeluTanh => x.gelu(),
        Activation::Silu => candle_nn::ops::silu(x),
    }
}

enum Mlp {
    /// Qwen2-VL: `fc2(act(fc1(x)))`.
    Plain { fc1: Linear, fc2: Linear },
    /// Qwen2.5-VL: `down(act(gate(x)) * up(x))`, with biases.
    Gated {
        gate: Linear,
        up: Linear,
        down: Linear,
    },
}

struct Block {
    norm1: Norm,
    norm2: Norm,
    qkv: Linear,
    proj: Linear,
    mlp: Mlp,
    act: Activation,
    heads: usize,
    score_budget: usize,
}

impl Block {
    fn new(g: Generation, c: &QwenVisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (d, i) = (c.hidden_size, c.intermediate_size);
        let mlp = match g {
            Generation::Qwen2Vl => Mlp::Plain {
                fc1: linear(d, i, vb.pp("mlp.fc1"))?,
                fc2: linear(i, d, vb.pp("mlp.fc2"))?,
            },
            Generation::Qwen25Vl => Mlp::Gated {
                gate: linear(d, i, vb.pp("mlp.gate_proj"))?,
                up: linear(d, i, vb.pp("mlp.up_proj"))?,
                down: linear(i, d, vb.pp("mlp.down_proj"))?,
            },
        };
        Ok(Block {
            norm1: Norm::new(g, d, vb.pp("norm1"))?,
            norm2: Norm::new(g, d, vb.pp("norm2"))?,
            qkv: linear(d, 3 * d, vb.pp("attn.qkv"))?,
            proj: linear(d, d, vb.pp("attn.proj"))?,
            mlp,
            act: c.act,
            heads: c.num_heads,
            score_budget: SCORE_BUDGET,
        })
    }

    /// `x`: [n, d]; `cos`/`sin`: [n, head_dim / 2] f32; `segments`: the
    /// (start, len) row ranges attention stays inside.
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        segments: &[(usize, usize)],
    ) -> candle_core::Result<Tensor> {
        let (n, d) = x.dims2()?;
        let (h, hd) = (self.heads, d / self.heads);
        let dtype = x.dtype();
        let qkv = self
            .qkv
            .forward(&self.norm1.forward(x)?)?
            .reshape((n, 3, h, hd))?;
        let part = |i: usize| -> candle_core::Result<Tensor> {
            qkv.narrow(1, i, 1)?
                .squeeze(1)?
                .transpose(0, 1)?
                .contiguous()?
                .unsqueeze(0)
        };
        // Rotary in f32 (upstream upcasts q and k for it).
        let rot = |t: Tensor| -> candle_core::Result<Tensor> {
            candle_nn::rotary_emb::rope(&t.to_dtype(DType::F32)?, cos, sin)?
                .to_dtype(dtype)?
                .squeeze(0)
        };
        let q = rot(part(0)?)?;
        let k = rot(part(1)?)?;
        let v = part(2)?.squeeze(0)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut outs = Vec::with_capacity(segments.len());
        for &(start, len) in segments {
            let ks = k.narrow(1, start, len)?;
            let kt = ks.t()?;
            let vs = v.narrow(1, start, len)?;
            let block = (self.score_budget / (h * len).max(1)).max(1);
            let mut s = 0;
            while s < len {
                let m = block.min(len - s);
                let qs = q.narrow(1, start + s, m)?;
                let scores = (qs.matmul(&kt)?.to_dtype(DType::F32)? * scale)?;
                let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
                outs.push(probs.matmul(&vs)?);
                s += m;
            }
        }
        let ctx = Tensor::cat(&outs, 1)?.transpose(0, 1)?.reshape((n, d))?;
        let x = (x + self.proj.forward(&ctx)?)?;
        let y = self.norm2.forward(&x)?;
        let m = match &self.mlp {
            Mlp::Plain { fc1, fc2 } => fc2.forward(&activate(self.act, &fc1.forward(&y)?)?)?,
            Mlp::Gated { gate, up, down } => {
                down.forward(&(activate(self.act, &gate.forward(&y)?)? * up.forward(&y)?)?)?
            }
        };
        x + m
    }
}

struct Merger {
    norm: Norm,
    fc1: Linear,
    fc2: Linear,
    unit: usize,
}

impl Merger {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, d) = x.dims2()?;
        let x = self
            .norm
            .forward(x)?
            .reshape((n / self.unit, d * self.unit))?;
        self.fc2.forward(&self.fc1.forward(&x)?.gelu_erf()?)
    }
}

/// The vision tower of one replica.
pub struct QwenVisionTower {
    /// The flattened Conv3d kernel, transposed: [patch_len, hidden].
    patch_weight: Tensor,
    blocks: Vec<Block>,
    merger: Merger,
    cfg: QwenVisionConfig,
    /// Rotary inverse frequencies (head_dim / 4 of them).
    inv_freq: Vec<f32>,
    device: Device,
    dtype: DType,
}

/// The patch layout of one forward pass: the order patches are attended in
/// and the segments of each kind of block.
struct Layout {
    /// Row `i` of the reordered patches is row `order[i]` of the input
    /// (`None`: the input order).
    order: Option<Vec<u32>>,
    /// Merged token `i` of the output is merged token `restore[i]` of the
    /// merger's output.
    restore: Option<Vec<u32>>,
    /// One segment per image (frame).
    full: Vec<(usize, usize)>,
    /// One per window (Qwen2.5-VL).
    windows: Vec<(usize, usize)>,
}

impl QwenVisionTower {
    /// `vb` points at the tower (`visual`).
    pub fn new(g: Generation, c: &QwenVisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (p, t, d) = (c.patch_size, c.temporal_patch_size, c.hidden_size);
        let conv = vb.get((d, c.in_channels, t, p, p), "patch_embed.proj.weight")?;
        let patch_weight = conv.reshape((d, c.patch_len()))?.t()?.contiguous()?;
        let blocks = (0..c.depth)
            .map(|i| Block::new(g, c, vb.pp(format!("blocks.{i}"))))
            .collect::<candle_core::Result<_>>()?;
        let unit = c.merge_unit();
        let mv = vb.pp("merger");
        let merger = Merger {
            norm: Norm::new(g, d, mv.pp("ln_q"))?,
            fc1: linear(d * unit, d * unit, mv.pp("mlp.0"))?,
            fc2: linear(d * unit, c.out_hidden_size, mv.pp("mlp.2"))?,
            unit,
        };
        let dim = c.head_dim() / 2;
        let inv_freq = (0..dim / 2)
            .map(|i| 1.0 / ROPE_THETA.powf((2 * i) as f32 / dim as f32))
            .collect();
        Ok(QwenVisionTower {
            patch_weight,
            blocks,
            merger,
            cfg: c.clone(),
            inv_freq,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Rotary angles of every patch, [patches, head_dim / 2]: the height
    /// position times the frequencies, then the width position times them,
    /// for patches in the processor's order.
    fn angles(&self, grids: &[GridThw]) -> Vec<f32> {
        let m = self.cfg.spatial_merge_size;
        let f = &self.inv_freq;
        let total: usize = grids.iter().map(|g| g.patches()).sum();
        let mut out = Vec::with_capacity(total * 2 * f.len());
        for g in grids {
            for _ in 0..g.t {
                for bh in 0..g.h / m {
                    for bw in 0..g.w / m {
                        for mh in 0..m {
                            for mw in 0..m {
                                let (hp, wp) = ((bh * m + mh) as f32, (bw * m + mw) as f32);
                                out.extend(f.iter().map(|x| hp * x));
                                out.extend(f.iter().map(|x| wp * x));
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// transformers' `get_window_index` and `cu_seqlens`, as segments.
    fn layout(&self, grids: &[GridThw]) -> Layout {
        let unit = self.cfg.merge_unit();
        let m = self.cfg.spatial_merge_size;
        let mut full = Vec::new();
        let mut at = 0;
        for g in grids {
            for _ in 0..g.t {
                full.push((at, g.h * g.w));
                at += g.h * g.w;
            }
        }
        let Some(ws) = self.cfg.window_tokens() else {
            return Layout {
                order: None,
                restore: None,
                full,
                windows: Vec::new(),
            };
        };
        let mut index: Vec<u32> = Vec::new();
        let mut windows = Vec::new();
        let mut base = 0usize;
        let mut row = 0usize;
        for g in grids {
            let (mh, mw) = (g.h / m, g.w / m);
            // Upstream pads by a whole window when a side is a multiple of
            // it; the padding windows are empty and dropped, as there.
            let nh = (mh + ws - mh % ws) / ws;
            let nw = (mw + ws - mw % ws) / ws;
            for t in 0..g.t {
                for wy in 0..nh {
                    for wx in 0..nw {
                        let mut n = 0;
                        for r in wy * ws..((wy + 1) * ws).min(mh) {
                            for c in wx * ws..((wx + 1) * ws).min(mw) {
                                index.push((base + t * mh * mw + r * mw + c) as u32);
                                n += 1;
                            }
                        }
                        if n > 0 {
                            windows.push((row, n * unit));
                            row += n * unit;
                        }
                    }
                }
            }
            base += g.t * mh * mw;
        }
        let order = index
            .iter()
            .flat_map(|&i| (0..unit as u32).map(move |u| i * unit as u32 + u))
            .collect();
        let mut restore = vec![0u32; index.len()];
        for (k, &i) in index.iter().enumerate() {
            restore[i as usize] = k as u32;
        }
        Layout {
            order: Some(order),
            restore: Some(restore),
            full,
            windows,
        }
    }

    /// Merged image tokens, [patches / merge², out_hidden], of the images
    /// whose patches are `patches` ([patches, patch_len], images one after
    /// another) with grids `grids`; `between` is called before each block.
    pub fn forward_stepped(
        &self,
        patches: &Tensor,
        grids: &[GridThw],
        between: &mut dyn FnMut() -> ControlFlow<()>,
    ) -> Result<Tensor, ModelError> {
        let (n, k) = patches.dims2()?;
        let m = self.cfg.spatial_merge_size;
        let total: usize = grids.iter().map(|g| g.patches()).sum();
        if k != self.cfg.patch_len() || n != total {
            return Err(ModelError::Batch(format!(
                "{n} patches of {k} values for grids of {total} patches of {}",
                self.cfg.patch_len()
            )));
        }
        if let Some(g) = grids
            .iter()
            .find(|g| g.t == 0 || g.h == 0 || g.w == 0 || g.h % m != 0 || g.w % m != 0)
        {
            return Err(ModelError::Batch(format!(
                "image grid {g:?} is not a positive multiple of the {m}x{m} merge"
            )));
        }
        let layout = self.layout(grids);
        let half = self.cfg.head_dim() / 2;
        let mut angles = self.angles(grids);
        let mut x = patches.to_dtype(self.dtype)?.matmul(&self.patch_weight)?;
        if let Some(order) = &layout.order {
            let idx = Tensor::from_slice(order, order.len(), &self.device)?;
            x = x.index_select(&idx, 0)?;
            let mut permuted = Vec::with_capacity(angles.len());
            for &r in order {
                let r = r as usize;
                permuted.extend_from_slice(&angles[r * half..(r + 1) * half]);
            }
            angles = permuted;
        }
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        let cos = Tensor::from_vec(cos, (n, half), &self.device)?;
        let sin = Tensor::from_vec(sin, (n, half), &self.device)?;
        for (i, block) in self.blocks.iter().enumerate() {
            if between().is_break() {
                return Err(ModelError::Interrupted);
            }
            let full = layout.order.is_none() || self.cfg.fullatt_block_indexes.contains(&i);
            let segments = if full { &layout.full } else { &layout.windows };
            x = block.forward(&x, &cos, &sin, segments)?;
        }
        let mut out = self.merger.forward(&x)?;
        if let Some(restore) = &layout.restore {
            let idx = Tensor::from_slice(restore, restore.len(), &self.device)?;
            out = out.index_select(&idx, 0)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
pub(super) fn set_score_budget(t: &mut QwenVisionTower, budget: usize) {
    for b in &mut t.blocks {
        b.score_budget = budget;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    fn tower(g: Generation, window: Option<usize>, full: Vec<usize>) -> QwenVisionTower {
        let c = QwenVisionConfig {
            depth: 2,
            hidden_size: 16,
            out_hidden_size: 8,
            intermediate_size: 24,
            num_heads: 2,
            patch_size: 2,
            temporal_patch_size: 2,
            spatial_merge_size: 2,
            in_channels: 3,
            act: Activation::Silu,
            window_size: window,
            fullatt_block_indexes: full,
        };
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let t = QwenVisionTower::new(g, &c, vb).unwrap();
        for (i, var) in map.all_vars().iter().enumerate() {
            let n = var.as_tensor().elem_count();
            let v: Vec<f32> = (0..n)
                .map(|k| (((k * 7919 + i * 104729) % 1000) as f32 / 1000.0 - 0.5) * 0.6)
                .collect();
            var.set(&Tensor::from_vec(v, var.as_tensor().shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
        t
    }

    #[test]
    fn window_layout_is_transformers() {
        // window 8 px = 2 merged tokens (merge 2, patch 2); a 6x10-patch image
        // is 3x5 merged tokens: windows 2x2, 2x2, 2x1 / 1x2, 1x2, 1x1.
        let t = tower(Generation::Qwen25Vl, Some(8), vec![1]);
        let g = GridThw { t: 1, h: 6, w: 10 };
        let l = t.layout(&[g]);
        let lens: Vec<usize> = l.windows.iter().map(|w| w.1 / 4).collect();
        assert_eq!(lens, vec![4, 4, 2, 2, 2, 1]);
        assert_eq!(l.full, vec![(0, 60)]);
        let restore = l.restore.unwrap();
        let order = l.order.unwrap();
        // First window: merged (0,0), (0,1), (1,0), (1,1) = 0, 1, 5, 6.
        assert_eq!(
            &order[..16],
            &[0, 1, 2, 3, 4, 5, 6, 7, 20, 21, 22, 23, 24, 25, 26, 27]
        );
        let index: Vec<u32> = order.iter().step_by(4).map(|o| o / 4).collect();
        for (k, &i) in index.iter().enumerate() {
            assert_eq!(restore[i as usize] as usize, k);
        }
        // A side that is a multiple of the window gets no extra window.
        let l = t.layout(&[GridThw { t: 1, h: 4, w: 4 }]);
        assert_eq!(l.windows, vec![(0, 16)]);
    }

    /// Images batched together give what each gives alone, windows or not;
    /// blocks of query rows give what one block gives.
    #[test]
    fn images_are_independent_and_blocks_agree() {
        for (g, w) in [(Generation::Qwen2Vl, None), (Generation::Qwen25Vl, Some(8))] {
            let mut t = tower(g, w, vec![1]);
            let grids = [GridThw { t: 1, h: 6, w: 10 }, GridThw { t: 1, h: 4, w: 2 }];
            let k = t.cfg.patch_len();
            let n: usize = grids.iter().map(|g| g.patches()).sum();
            let data: Vec<f32> = (0..n * k)
                .map(|i| ((i * 31 % 97) as f32 / 97.0) - 0.5)
                .collect();
            let all = Tensor::from_vec(data.clone(), (n, k), &Device::Cpu).unwrap();
            let mut go = || ControlFlow::Continue(());
            let both: Vec<Vec<f32>> = t
                .forward_stepped(&all, &grids, &mut go)
                .unwrap()
                .to_vec2()
                .unwrap();
            let a = Tensor::from_vec(data[..60 * k].to_vec(), (60, k), &Device::Cpu).unwrap();
            let one: Vec<Vec<f32>> = t
                .forward_stepped(&a, &grids[..1], &mut go)
                .unwrap()
                .to_vec2()
                .unwrap();
            assert_eq!(both.len(), 15 + 2);
            for (x, y) in both.iter().zip(&one) {
                for (p, q) in x.iter().zip(y) {
                    assert!((p - q).abs() < 1e-5, "{g:?}");
                }
            }
            set_score_budget(&mut t, 2 * 4);
            let blocked: Vec<Vec<f32>> = t
                .forward_stepped(&all, &grids, &mut go)
                .unwrap()
                .to_vec2()
                .unwrap();
            for (x, y) in both.iter().zip(&blocked) {
                for (p, q) in x.iter().zip(y) {
                    assert!((p - q).abs() < 1e-5, "{g:?}");
                }
            }
            let mut stop = || ControlFlow::Break(());
            assert!(matches!(
                t.forward_stepped(&all, &grids, &mut stop),
                Err(ModelError::Interrupted)
            ));
        }
    }
}
