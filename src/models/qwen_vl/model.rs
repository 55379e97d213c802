//! [`QwenVlModel`]: one Qwen2-VL / Qwen2.5-VL replica (the family's
//! [`Model`]): the vision tower, merged image tokens scattered into the
//! prompt's token embeddings, the Qwen2 decoder with M-RoPE, and
//! [`position_ids`] (transformers' `get_rope_index` for one prompt).
//!
//! Takes [`QwenPrepared`] items and returns one unnormalised vector per
//! item: the final-norm hidden state of the prompt's last token. Stepped:
//! `between` runs before each vision block (per chunk of images) and each
//! decoder layer (per group of sequences).
//!
//! Weights: the names transformers 4.51 writes (`visual.*`, `model.*`) or
//! those of later versions (`model.visual.*`, `model.language_model.*`);
//! `lm_head.weight` is never read.

use std::ops::ControlFlow;

use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;

use super::config::QwenVlConfig;
use super::decoder::QwenDecoder;
use super::preprocess::QwenPrepared;
use super::prompt::PositionIds;
use super::vision::QwenVisionTower;
use crate::models::decoder::{input_table, run_grouped};
use crate::models::error::ModelError;
use crate::models::family::{Between, Embeddings, Model, PassLimits};

/// Patches sent through the vision tower at once (an image larger than
/// this goes alone); bounds the tower's activations.
const VISION_CHUNK_PATCHES: usize = 16384;

/// The (temporal, height, width) positions of a prompt's tokens
/// (transformers' `get_rope_index` for one unpadded sequence): text counts
/// up on all three axes; an image of `mh x mw` merged tokens starting at
/// position `s` gives token (r, c) the positions (s, s + r, s + c), and the
/// text after it resumes at `s + max(mh, mw)`. [`PositionIds::Sequential`]
/// (GME) numbers every token 0, 1, 2, ... instead.
pub fn position_ids(item: &QwenPrepared, merge: usize) -> Vec<[u32; 3]> {
    let n = item.token_ids.len();
    let seq = |i: usize| [i as u32; 3];
    let image = match (&item.image, item.positions) {
        (Some(im), PositionIds::Multimodal) => im,
        _ => return (0..n).map(seq).collect(),
    };
    let first = image.first_token;
    let mw = (image.grid.w / merge.max(1)).max(1);
    let mh = image.tokens / mw;
    let mut out: Vec<[u32; 3]> = (0..first).map(seq).collect();
    let s = first as u32;
    for k in 0..image.tokens {
        out.push([s, s + (k / mw) as u32, s + (k % mw) as u32]);
    }
    let resume = first + mh.max(mw);
    let after = n.saturating_sub(first + image.tokens);
    out.extend((0..after).map(|i| seq(resume + i)));
    out
}

/// A Qwen2-VL / Qwen2.5-VL replica on one device.
pub struct QwenVlModel {
    vision: QwenVisionTower,
    decoder: QwenDecoder,
    cfg: QwenVlConfig,
    /// Decoder tokens per group of sequences (the device's; bounds the
    /// decoder's activation memory).
    pass: PassLimits,
    device: Device,
}

impl QwenVlModel {
    /// `vb` points at the checkpoint's root; `pass` sizes the decoder
    /// groups (at least 1 token).
    pub fn new(cfg: &QwenVlConfig, pass: PassLimits, vb: VarBuilder) -> Result<Self, ModelError> {
        let build = |e| ModelError::Build {
            family: "Qwen2-VL",
            source: Box::new(e),
        };
        let (vision_vb, text_vb) = if vb.contains_tensor("visual.patch_embed.proj.weight") {
            (vb.pp("visual"), vb.pp("model"))
        } else if vb.contains_tensor("model.visual.patch_embed.proj.weight") {
            (vb.pp("model.visual"), vb.pp("model.language_model"))
        } else {
            return Err(ModelError::Load(
                "the weights have no visual.patch_embed.proj.weight (nor model.visual.…): not a Qwen2-VL checkpoint".into(),
            ));
        };
        Ok(QwenVlModel {
            vision: QwenVisionTower::new(cfg.generation, &cfg.vision, vision_vb).map_err(build)?,
            decoder: QwenDecoder::new(&cfg.text, text_vb).map_err(build)?,
            cfg: cfg.clone(),
            pass: pass.at_least_one(),
            device: vb.device().clone(),
        })
    }

    pub fn config(&self) -> &QwenVlConfig {
        &self.cfg
    }

    /// Checks one item against the model.
    fn check(&self, i: usize, item: &QwenPrepared) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Batch(format!("item {i}: {m}")));
        let ids = &item.token_ids;
        let vocab = self.cfg.text.vocab_size as u32;
        if ids.is_empty() {
            return bad("no tokens".into());
        }
        if ids.len() > self.cfg.text.max_position_embeddings {
            return bad(format!(
                "{} tokens exceed max_position_embeddings {}",
                ids.len(),
                self.cfg.text.max_position_embeddings
            ));
        }
        if let Some(t) = ids.iter().find(|&&t| t >= vocab) {
            return bad(format!("token id {t} is outside the vocabulary of {vocab}"));
        }
        let Some(im) = &item.image else {
            return Ok(());
        };
        let v = &self.cfg.vision;
        let (m, g) = (v.spatial_merge_size, im.grid);
        if g.t != 1 || g.h == 0 || g.w == 0 || g.h % m != 0 || g.w % m != 0 {
            return bad(format!(
                "image grid {g:?} is not one frame of whole {m}x{m} merges"
            ));
        }
        if im.tokens != g.patches() / v.merge_unit()
            || im.patches.len() != g.patches() * v.patch_len()
        {
            return bad(format!(
                "image of grid {g:?} has {} tokens and {} values",
                im.tokens,
                im.patches.len()
            ));
        }
        let block = ids.get(im.first_token..im.first_token + im.tokens);
        let id = self.cfg.image_token_id;
        let in_block = block.is_some_and(|b| b.iter().all(|&t| t == id));
        let count = ids.iter().filter(|&&t| t == id).count();
        if !in_block || count != im.tokens {
            return bad(format!(
                "the prompt's image tokens do not match the image's {} tokens at {}",
                im.tokens, im.first_token
            ));
        }
        Ok(())
    }

    /// Merged image tokens of every image of the batch, in item order.
    fn image_features(
        &self,
        batch: &[&QwenPrepared],
        between: &mut dyn FnMut() -> ControlFlow<()>,
    ) -> Result<Vec<Tensor>, ModelError> {
        let k = self.cfg.vision.patch_len();
        let images: Vec<_> = batch.iter().filter_map(|p| p.image.as_ref()).collect();
        let mut out = Vec::with_capacity(images.len());
        let mut i = 0;
        while i < images.len() {
            let mut j = i;
            let mut n = 0;
            while j < images.len()
                && (j == i || n + images[j].grid.patches() <= VISION_CHUNK_PATCHES)
            {
                n += images[j].grid.patches();
                j += 1;
            }
            let mut data = Vec::with_capacity(n * k);
            for im in &images[i..j] {
                data.extend_from_slice(&im.patches);
            }
            let grids: Vec<_> = images[i..j].iter().map(|im| im.grid).collect();
            let px = Tensor::from_vec(data, (n, k), &self.device)?;
            let feats = self.vision.forward_stepped(&px, &grids, between)?;
            let mut at = 0;
            for im in &images[i..j] {
                out.push(feats.narrow(0, at, im.tokens)?);
                at += im.tokens;
            }
            i = j;
        }
        Ok(out)
    }
}

impl Model for QwenVlModel {
    type Input = QwenPrepared;

    /// Unnormalised embeddings (f32), one per item, in order, calling
    /// `between` before each vision block (per chunk of images) and each
    /// decoder layer (per group of sequences); `Break` stops the pass with
    /// [`ModelError::Interrupted`]. The same layers run in the same order
    /// whatever `between` does: the result does not depend on it.
    fn embed(&self, batch: &[&QwenPrepared], between: Between<'_>) -> Embeddings {
        for (i, item) in batch.iter().enumerate() {
            self.check(i, item)?;
        }
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let feats = self.image_features(batch, between)?;
        // One table: every token embedding, then every image token, then a
        // zero row for padding; sequences are gathered from it.
        let flat: Vec<u32> = batch
            .iter()
            .flat_map(|p| p.token_ids.iter().copied())
            .collect();
        let n_flat = flat.len();
        let tok = self
            .decoder
            .embed_tokens(&Tensor::from_vec(flat, n_flat, &self.device)?)?;
        let (table, feat_at, zero_row) = input_table(tok, &feats)?;
        let merge = self.cfg.vision.spatial_merge_size;
        let mut rows: Vec<Vec<u32>> = Vec::with_capacity(batch.len());
        let mut positions: Vec<Vec<[u32; 3]>> = Vec::with_capacity(batch.len());
        let (mut tok_at, mut img) = (0usize, 0usize);
        for item in batch {
            let len = item.token_ids.len();
            let mut r: Vec<u32> = (tok_at..tok_at + len).map(|x| x as u32).collect();
            if let Some(im) = &item.image {
                for (k, row) in r[im.first_token..im.first_token + im.tokens]
                    .iter_mut()
                    .enumerate()
                {
                    *row = (feat_at[img] + k) as u32;
                }
                img += 1;
            }
            tok_at += len;
            rows.push(r);
            positions.push(position_ids(item, merge));
        }
        let decode = |group: &[usize], x: &Tensor| {
            let pos: Vec<&[[u32; 3]]> = group.iter().map(|&i| positions[i].as_slice()).collect();
            self.decoder.forward_last_stepped(x, &pos, between)
        };
        let groups = self.pass.decoder_group_tokens;
        Ok(run_grouped(&table, &rows, zero_row, groups, decode)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::qwen_vl::image::GridThw;
    use crate::models::qwen_vl::preprocess::QwenImage;

    fn item(n: usize, image: Option<(usize, GridThw)>, positions: PositionIds) -> QwenPrepared {
        QwenPrepared {
            token_ids: vec![1; n],
            image: image.map(|(first_token, grid)| QwenImage {
                patches: Vec::new(),
                grid,
                first_token,
                tokens: grid.patches() / 4,
            }),
            positions,
        }
    }

    #[test]
    fn positions_follow_get_rope_index() {
        // 3 text tokens, a 2x3-merged image (4x6 patches), 2 text tokens.
        let g = GridThw { t: 1, h: 4, w: 6 };
        let p = position_ids(&item(11, Some((3, g)), PositionIds::Multimodal), 2);
        assert_eq!(
            p,
            vec![
                [0, 0, 0],
                [1, 1, 1],
                [2, 2, 2],
                [3, 3, 3],
                [3, 3, 4],
                [3, 3, 5],
                [3, 4, 3],
                [3, 4, 4],
                [3, 4, 5],
                [6, 6, 6],
                [7, 7, 7],
            ]
        );
        let p = position_ids(&item(11, Some((3, g)), PositionIds::Sequential), 2);
        assert_eq!(p[10], [10, 10, 10]);
        let p = position_ids(&item(4, None, PositionIds::Multimodal), 2);
        assert_eq!(p, vec![[0; 3], [1; 3], [2; 3], [3; 3]]);
        // A tall image: the text resumes after the larger side.
        let tall = GridThw { t: 1, h: 10, w: 2 };
        let p = position_ids(&item(7, Some((1, tall)), PositionIds::Multimodal), 2);
        assert_eq!(p[5], [1, 5, 1]);
        assert_eq!(p[6], [6, 6, 6]);
    }
}
