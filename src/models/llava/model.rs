//! [`LlavaModel`]: the BGE-VL-MLLM forward pass (vision tower, projector,
//! any-resolution packing, Mistral decoder) over [`LlavaInput`]s.

use std::ops::ControlFlow;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{linear, Linear, VarBuilder};

use super::anyres;
use super::config::LlavaConfig;
use super::mistral::MistralModel;
use super::preprocess::{LlavaImage, LlavaInput};
use crate::models::clip::ClipVisionTransformer;
use crate::models::decoder::{input_table, run_grouped};
use crate::models::error::ModelError;
use crate::models::family::{Between, Embeddings, Model, PassLimits};
use crate::models::ops;
use crate::preprocess::Size;

/// A BGE-VL-MLLM replica on one device.
pub struct LlavaModel {
    vision: ClipVisionTransformer,
    proj1: Linear,
    proj2: Linear,
    image_newline: Tensor,
    decoder: MistralModel,
    cfg: LlavaConfig,
    /// Tiles through the vision tower at once, decoder tokens per group
    /// (the device's; they bound activation memory).
    pass: PassLimits,
    device: Device,
    dtype: DType,
}

impl LlavaModel {
    /// `vb` points at the checkpoint's root; `pass` sizes the vision
    /// chunks and decoder groups (at least 1 each).
    pub fn new(cfg: &LlavaConfig, pass: PassLimits, vb: VarBuilder) -> candle_core::Result<Self> {
        Self::with_backend(cfg, pass, vb, ops::Backend::Native)
    }

    /// [`Self::new`] with the CPU vision encoder's products on `backend`
    /// (the decoder runs on candle either way).
    pub fn with_backend(
        cfg: &LlavaConfig,
        pass: PassLimits,
        vb: VarBuilder,
        backend: ops::Backend,
    ) -> candle_core::Result<Self> {
        let vh = cfg.vision_config.hidden_size;
        let th = cfg.text_config.hidden_size;
        let vision = ClipVisionTransformer::new(
            &cfg.vision_config,
            backend,
            vb.pp("vision_tower.vision_model"),
        )?;
        let mp = vb.pp("multi_modal_projector");
        Ok(LlavaModel {
            vision,
            proj1: linear(vh, th, mp.pp("linear_1"))?,
            proj2: linear(th, th, mp.pp("linear_2"))?,
            image_newline: vb.get(th, "image_newline")?,
            decoder: MistralModel::new(&cfg.text_config, vb.pp("language_model.model"))?,
            cfg: cfg.clone(),
            pass: pass.at_least_one(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// Projected patch features of tiles `[n, 3, S, S]` (f32 data):
    /// [n, patches, text hidden].
    fn tile_features(
        &self,
        data: &[f32],
        n: usize,
        between: &mut dyn FnMut() -> ControlFlow<()>,
    ) -> Result<Tensor, ModelError> {
        let s = self.cfg.vision_config.image_size;
        let per = 3 * s * s;
        let mut out = Vec::new();
        let mut start = 0;
        while start < n {
            let k = self.pass.vision_tile_chunk.min(n - start);
            let px = Tensor::from_slice(
                &data[start * per..(start + k) * per],
                (k, 3, s, s),
                &self.device,
            )?
            .to_dtype(self.dtype)?;
            let h = self
                .vision
                .hidden_states_stepped(&px, self.cfg.vision_layer, between)?;
            let tokens = h.dim(1)?;
            let h = h.narrow(1, 1, tokens - 1)?;
            let h = self.proj2.forward(&self.proj1.forward(&h)?.gelu_erf()?)?;
            out.push(h);
            start += k;
        }
        Ok(Tensor::cat(&out, 0)?)
    }

    /// `pack_image_features` for one image: tiles' features
    /// [1 + gh * gw, p * p, hidden] -> [features, hidden].
    fn pack(&self, feats: &Tensor, size: Size) -> Result<Tensor, ModelError> {
        let (gh, gw) = self
            .cfg
            .grid_shape(size)
            .ok_or_else(|| ModelError::Batch("no image_grid_pinpoints".into()))?;
        let p = self.cfg.patches_per_side();
        let (n, _, c) = feats.dims3()?;
        if n != 1 + gh * gw {
            return Err(ModelError::Batch(format!(
                "an image of {size} needs {} tiles, got {n}",
                1 + gh * gw
            )));
        }
        let base = feats.get(0)?;
        let grid = feats
            .narrow(0, 1, gh * gw)?
            .reshape((gh, gw, p, p, c))?
            .permute((0, 2, 1, 3, 4))?
            .contiguous()?
            .reshape((gh * p, gw * p, c))?;
        let (r0, r1, c0, c1) = anyres::unpad_bounds(size, (gh * p, gw * p));
        let grid = grid.narrow(0, r0, r1 - r0)?.narrow(1, c0, c1 - c0)?;
        let rows = r1 - r0;
        let newline = self
            .image_newline
            .reshape((1, 1, c))?
            .broadcast_as((rows, 1, c))?;
        let grid = Tensor::cat(&[&grid, &newline], 1)?.reshape((rows * (c1 - c0 + 1), c))?;
        Ok(Tensor::cat(&[&base, &grid], 0)?)
    }

    /// Unnormalised embeddings [n, hidden] (f32) of prompts whose `<image>`
    /// tokens are already expanded; `images[i]` is item `i`'s image, if any.
    pub fn embed_ids(&self, ids: &[&[u32]], images: &[Option<&LlavaImage>]) -> Embeddings {
        self.embed_ids_stepped(ids, images, &mut || ControlFlow::Continue(()))
    }

    /// [`Self::embed_ids`], calling `between` before each layer of the
    /// vision tower (per chunk of tiles) and of the decoder (per group of
    /// sequences); see [`Model::embed`].
    pub fn embed_ids_stepped(
        &self,
        ids: &[&[u32]],
        images: &[Option<&LlavaImage>],
        between: Between<'_>,
    ) -> Embeddings {
        let n = ids.len();
        if images.len() != n {
            return Err(ModelError::Batch("ids and images differ in number".into()));
        }
        let vocab = self.cfg.text_config.vocab_size as u32;
        // Vision: all tiles of the batch, then packed per image.
        let mut all_tiles: Vec<f32> = Vec::new();
        let mut tile_counts = Vec::new();
        let s = self.cfg.vision_config.image_size;
        for (i, im) in images.iter().enumerate() {
            let Some(im) = im else { continue };
            let t = &im.tiles;
            if t.height != s || t.width != s || t.data.len() != t.tiles * 3 * s * s {
                return Err(ModelError::Batch(format!(
                    "item {i}: image tiles must be 3x{s}x{s}, got {}x{}",
                    t.height, t.width
                )));
            }
            all_tiles.extend_from_slice(&t.data);
            tile_counts.push(t.tiles);
        }
        let total_tiles: usize = tile_counts.iter().sum();
        let mut packed: Vec<Tensor> = Vec::new();
        if total_tiles > 0 {
            let feats = self.tile_features(&all_tiles, total_tiles, between)?;
            let mut at = 0;
            for im in images.iter().flatten() {
                packed.push(self.pack(&feats.narrow(0, at, im.tiles.tiles)?, im.size)?);
                at += im.tiles.tiles;
            }
        }
        // One table holding every token embedding, then every image
        // feature, then a zero row for padding; sequences are gathered from it.
        let mut flat: Vec<u32> = Vec::with_capacity(ids.iter().map(|s| s.len()).sum());
        for (i, s) in ids.iter().enumerate() {
            if s.is_empty() {
                return Err(ModelError::Batch(format!("item {i} has no tokens")));
            }
            if let Some(bad) = s.iter().find(|&&t| t >= vocab) {
                return Err(ModelError::Batch(format!(
                    "item {i}: token id {bad} is outside the vocabulary of {vocab}"
                )));
            }
            flat.extend_from_slice(s);
        }
        let tok = self.decoder.embed_tokens(&Tensor::from_vec(
            flat.clone(),
            flat.len(),
            &self.device,
        )?)?;
        let (table, feat_offsets, zero_row) = input_table(tok, &packed)?;
        // Per item: the table row of each position.
        let mut rows: Vec<Vec<u32>> = Vec::with_capacity(n);
        let mut img = 0;
        let mut tok_at = 0usize;
        for (i, s) in ids.iter().enumerate() {
            let image_tokens = s
                .iter()
                .filter(|&&t| t == self.cfg.image_token_index)
                .count();
            let mut r: Vec<u32> = (tok_at..tok_at + s.len()).map(|x| x as u32).collect();
            if images[i].is_some() {
                let f = packed[img].dim(0)?;
                if image_tokens != f {
                    return Err(ModelError::Batch(format!(
                        "item {i} has {image_tokens} image tokens but its image gives {f} features"
                    )));
                }
                let mut k = feat_offsets[img];
                for (row, &t) in r.iter_mut().zip(s.iter()) {
                    if t == self.cfg.image_token_index {
                        *row = k as u32;
                        k += 1;
                    }
                }
                img += 1;
            }
            tok_at += s.len();
            rows.push(r);
        }
        // Decoder passes over groups of similar lengths.
        let decode = |group: &[usize], x: &Tensor| {
            let lens: Vec<usize> = group.iter().map(|&i| rows[i].len()).collect();
            self.decoder.forward_last_stepped(x, &lens, between)
        };
        let groups = self.pass.decoder_group_tokens;
        Ok(run_grouped(&table, &rows, zero_row, groups, decode)?)
    }
}

impl Model for LlavaModel {
    type Input = LlavaInput;

    /// Stepped before each layer of the vision tower and of the decoder: a
    /// query waits for one layer of an indexing batch, not for the batch.
    fn embed(&self, batch: &[&LlavaInput], between: Between<'_>) -> Embeddings {
        let ids: Vec<&[u32]> = batch.iter().map(|b| b.ids.as_slice()).collect();
        let images: Vec<Option<&LlavaImage>> = batch.iter().map(|b| b.image.as_ref()).collect();
        self.embed_ids_stepped(&ids, &images, between)
    }
}
