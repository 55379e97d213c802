//! The BGE-VL-MLLM processor: upstream's prompt per input, then
//! transformers 4.45.2 `LlavaNextProcessor` (tokenizer + `LlavaNextImageProcessor`).
//!
//! Owns:
//! - the prompt ([`build_prompt`]): a query is `"[INST] \n <instruct> {instruction} <query> "`
//!   (without an instruction `"[INST] \n <instruct>  <query>"`), a candidate
//!   `"[INST] "`; then `"{s} {text} \n"` with text, `"{s} <image>"` with an
//!   image, and `"{s} [/INST]"`;
//! - images: decoded, resized to exactly 512x512 in the image's own mode
//!   (Pillow's default filter), converted to RGB, then the any-resolution
//!   processor: the best resolution from `image_grid_pinpoints`
//!   ([`select_best_resolution`]), resized keeping the aspect
//!   ([`patch_output_size`]) and padded with black to the centre, cut into
//!   tiles, plus the whole image resized to the tile size as the FIRST tile;
//!   every tile then goes through the CLIP tile processor (resize shortest
//!   edge, centre crop, rescale, normalise);
//! - tokens: `tokenizer.json` with BOS; the `<image>` token is expanded to
//!   exactly the number of image features the model makes
//!   ([`processor_feature_count`], the processor's own arithmetic).
//!
//! Limits: a prompt (image tokens included) longer than the decoder's
//! `max_position_embeddings` is [`PreprocessError::TextTooLong`] with
//! `truncate=false`; with `truncate=true` the input's text (only the text:
//! never the instruction, the template or the image) is cut at a token
//! boundary until the prompt fits, and when it cannot fit that way it is
//! still `TextTooLong`. An input with an image whose text or instruction
//! contains the literal `<image>` token is refused (upstream fails on it);
//! in a text-only input it stays one ordinary token, as upstream embeds it.

use std::path::Path;

use image::RgbImage;
use serde_json::Value;
use tokenizers::Tokenizer;

use super::clip_image::ClipImageProcessor;
use super::image::{decode_image, ImageLimits};
use super::resize::{self, Filter};
use super::{Pixels, Prepared, PreprocessError};
use crate::input::{Input, Role};

/// Upstream BGE-VL-MLLM resizes every image to exactly this size first.
pub const RESIZE_TO: u32 = 512;
/// The image placeholder of the prompt (`LlavaNextProcessor.image_token`).
pub const IMAGE_TOKEN: &str = "<image>";

/// transformers' `select_best_resolution`: among `pinpoints` (height, width),
/// the one keeping the most of an image of `size` (height, width), then the
/// least waste; the first wins ties. `None` when `pinpoints` is empty.
pub fn select_best_resolution(size: (u32, u32), pinpoints: &[(u32, u32)]) -> Option<(u32, u32)> {
    let (oh, ow) = (f64::from(size.0), f64::from(size.1));
    let mut best = None;
    let mut max_effective: u64 = 0;
    let mut min_wasted = f64::INFINITY;
    for &(h, w) in pinpoints {
        let scale = (f64::from(w) / ow).min(f64::from(h) / oh);
        let dw = (ow * scale) as u64;
        let dh = (oh * scale) as u64;
        let effective = (dw * dh).min(u64::from(size.0) * u64::from(size.1));
        let wasted = (u64::from(w) * u64::from(h)) as f64 - effective as f64;
        if effective > max_effective || (effective == max_effective && wasted < min_wasted) {
            max_effective = effective;
            min_wasted = wasted;
            best = Some((h, w));
        }
    }
    best
}

/// `_get_patch_output_size`: the (height, width) an image of `size` is
/// resized to inside `target`, keeping its aspect.
pub fn patch_output_size(size: (u32, u32), target: (u32, u32)) -> (u32, u32) {
    let (oh, ow) = (f64::from(size.0), f64::from(size.1));
    let (th, tw) = target;
    let scale_w = f64::from(tw) / ow;
    let scale_h = f64::from(th) / oh;
    if scale_w < scale_h {
        (((oh * scale_w).ceil() as u32).min(th), tw)
    } else {
        (th, ((ow * scale_h).ceil() as u32).min(tw))
    }
}

/// `LlavaNextProcessor._get_number_of_features` minus the CLS token
/// ("default" strategy): the `<image>` tokens for an image of `size`
/// (height, width) with `tile`-pixel tiles of `patch`-pixel patches.
pub fn processor_feature_count(
    size: (u32, u32),
    pinpoints: &[(u32, u32)],
    tile: u32,
    patch: u32,
) -> Option<usize> {
    let (bh, bw) = select_best_resolution(size, pinpoints)?;
    if tile == 0 || patch == 0 || size.0 == 0 || size.1 == 0 {
        return None;
    }
    let (scale_h, scale_w) = (i64::from(bh / tile), i64::from(bw / tile));
    let p = i64::from(tile / patch);
    let (h, w) = (i64::from(size.0), i64::from(size.1));
    let mut cur_h = p * scale_h;
    let mut cur_w = p * scale_w;
    if cur_h == 0 || cur_w == 0 {
        return None;
    }
    let original_aspect = w as f64 / h as f64;
    let current_aspect = cur_w as f64 / cur_h as f64;
    if original_aspect > current_aspect {
        let new_h = (h * cur_w).div_euclid(w);
        let pad = (cur_h - new_h).div_euclid(2);
        cur_h -= pad * 2;
    } else {
        let new_w = (w * cur_h).div_euclid(h);
        let pad = (cur_w - new_w).div_euclid(2);
        cur_w -= pad * 2;
    }
    let total = cur_h * cur_w + cur_h + p * p;
    usize::try_from(total).ok()
}

/// Upstream BGE-VL-MLLM's prompt (before the `<image>` expansion).
pub fn build_prompt(
    role: Role,
    instruction: Option<&str>,
    text: Option<&str>,
    has_image: bool,
) -> String {
    let mut s = match (role, instruction) {
        (Role::Query, Some(i)) => format!("[INST] \n <instruct> {i} <query> "),
        (Role::Query, None) => "[INST] \n <instruct>  <query>".to_string(),
        (Role::Candidate, _) => "[INST] ".to_string(),
    };
    if let Some(t) = text.filter(|t| !t.is_empty()) {
        s = format!("{s} {t} \n");
    }
    if has_image {
        s = format!("{s} {IMAGE_TOKEN}");
    }
    format!("{s} [/INST]")
}

fn config_error(path: &Path, msg: impl std::fmt::Display) -> String {
    format!("invalid {}: {msg}", path.display())
}

/// Tokenizer + any-resolution image processor of a LLaVA-NeXT model.
#[derive(Clone)]
pub struct LlavaPreprocessor {
    tokenizer: Tokenizer,
    tiles: ClipImageProcessor,
    resample: Filter,
    /// Side of the base tile (`size.shortest_edge`).
    base_size: u32,
    /// Side of every tile (`crop_size`).
    tile: u32,
    pinpoints: Vec<(u32, u32)>,
    image_token_id: u32,
    /// `<image>` tokens per image (every image is 512x512 when processed).
    image_tokens: usize,
    max_tokens: usize,
    limits: ImageLimits,
}

impl std::fmt::Debug for LlavaPreprocessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlavaPreprocessor")
            .field("tile", &self.tile)
            .field("pinpoints", &self.pinpoints)
            .field("image_tokens", &self.image_tokens)
            .field("max_tokens", &self.max_tokens)
            .finish_non_exhaustive()
    }
}

/// What the model side says about images, checked against the processor.
#[derive(Debug, Clone)]
pub struct LlavaModelFacts {
    /// Vision tower `image_size`.
    pub tile: u32,
    /// Vision tower `patch_size`.
    pub patch: u32,
    pub image_token_id: u32,
    /// Features the model makes for a 512x512 image.
    pub model_features: usize,
    /// Tiles the model expects for a 512x512 image.
    pub model_tiles: usize,
    /// The decoder's `max_position_embeddings`.
    pub max_tokens: usize,
}

impl LlavaPreprocessor {
    /// Loads `tokenizer.json`, `preprocessor_config.json` and (optional)
    /// `processor_config.json`, checking them against the model.
    pub fn load(
        tokenizer: &Path,
        preprocessor_config: &Path,
        processor_config: Option<&Path>,
        facts: &LlavaModelFacts,
        limits: ImageLimits,
    ) -> Result<Self, String> {
        let mut tok = Tokenizer::from_file(tokenizer)
            .map_err(|e| format!("cannot load tokenizer {}: {e}", tokenizer.display()))?;
        tok.with_padding(None);
        tok.with_truncation(None)
            .map_err(|e| format!("cannot configure tokenizer: {e}"))?;
        let text = std::fs::read_to_string(preprocessor_config)
            .map_err(|e| format!("cannot read {}: {e}", preprocessor_config.display()))?;
        let pre: Value =
            serde_json::from_str(&text).map_err(|e| config_error(preprocessor_config, e))?;
        let tiles = ClipImageProcessor::from_value(&pre)
            .map_err(|e| config_error(preprocessor_config, e))?;
        let resample = match pre.get("resample") {
            None | Some(Value::Null) => Filter::Bicubic,
            Some(v) => v
                .as_i64()
                .and_then(Filter::from_pil_code)
                .ok_or_else(|| config_error(preprocessor_config, format!("resample {v}")))?,
        };
        // `size` gives the base tile: shortest_edge, else min(height, width).
        let dim = |v: Option<&Value>| v.and_then(|x| x.as_u64()).map(|x| x as u32);
        let base_size = match pre.get("size") {
            None | Some(Value::Null) => 224,
            Some(Value::Number(n)) => n.as_u64().unwrap_or(0) as u32,
            Some(s) => match dim(s.get("shortest_edge")) {
                Some(e) => e,
                None => match (dim(s.get("height")), dim(s.get("width"))) {
                    (Some(h), Some(w)) => h.min(w),
                    _ => 0,
                },
            },
        };
        let (ch, cw) = tiles.crop_size();
        if !tiles.center_crops() || ch != cw || ch as u32 != facts.tile || base_size == 0 {
            return Err(config_error(
                preprocessor_config,
                format!(
                    "tiles must be center-cropped to the vision tower's {t}x{t} (crop_size {cw}x{ch}, size {base_size})",
                    t = facts.tile
                ),
            ));
        }
        let pinpoints = match pre.get("image_grid_pinpoints") {
            None | Some(Value::Null) => crate::models::llava::DEFAULT_PINPOINTS.to_vec(),
            Some(p) => crate::models::llava::parse_pinpoints(p)
                .map_err(|e| config_error(preprocessor_config, e))?,
        };
        // processor_config.json: patch size, strategy, image token.
        let mut patch = facts.patch;
        let mut image_token = IMAGE_TOKEN.to_string();
        if let Some(path) = processor_config {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let v: Value = serde_json::from_str(&text).map_err(|e| config_error(path, e))?;
            if let Some(p) = v.get("patch_size").and_then(|p| p.as_u64()) {
                patch = p as u32;
            }
            if let Some(s) = v
                .get("vision_feature_select_strategy")
                .and_then(|s| s.as_str())
            {
                if s != "default" {
                    return Err(config_error(
                        path,
                        format!("vision_feature_select_strategy {s:?} is not supported"),
                    ));
                }
            }
            if let Some(t) = v.get("image_token").and_then(|t| t.as_str()) {
                image_token = t.to_string();
            }
        }
        if image_token != IMAGE_TOKEN {
            return Err(format!(
                "the processor's image token is {image_token:?}; vlembed expects {IMAGE_TOKEN:?}"
            ));
        }
        let image_token_id = tok
            .token_to_id(IMAGE_TOKEN)
            .ok_or_else(|| format!("{} has no {IMAGE_TOKEN} token", tokenizer.display()))?;
        if image_token_id != facts.image_token_id {
            return Err(format!(
                "the tokenizer's {IMAGE_TOKEN} is id {image_token_id} but config.json's image_token_index is {}",
                facts.image_token_id
            ));
        }
        let size = (RESIZE_TO, RESIZE_TO);
        let image_tokens = processor_feature_count(size, &pinpoints, facts.tile, patch)
            .ok_or("cannot count the image features")?;
        if image_tokens != facts.model_features {
            return Err(format!(
                "the processor would expand <image> to {image_tokens} tokens but the model makes {} features per image",
                facts.model_features
            ));
        }
        let (bh, bw) = select_best_resolution(size, &pinpoints).ok_or("no pinpoints")?;
        let proc_tiles = 1 + bh.div_ceil(facts.tile) as usize * bw.div_ceil(facts.tile) as usize;
        if proc_tiles != facts.model_tiles {
            return Err(format!(
                "the processor makes {proc_tiles} tiles per image but the model expects {}",
                facts.model_tiles
            ));
        }
        Ok(LlavaPreprocessor {
            tokenizer: tok,
            tiles,
            resample,
            base_size,
            tile: facts.tile,
            pinpoints,
            image_token_id,
            image_tokens,
            max_tokens: facts.max_tokens,
            limits,
        })
    }

    /// The longest prompt (image tokens included) the decoder takes.
    pub fn max_text_tokens(&self) -> usize {
        self.max_tokens
    }

    /// `<image>` tokens per image.
    pub fn image_tokens(&self) -> usize {
        self.image_tokens
    }

    /// Token ids of `text` with BOS, as the tokenizer gives them.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, PreprocessError> {
        Ok(self.encode(text)?.get_ids().to_vec())
    }

    fn encode(&self, text: &str) -> Result<tokenizers::Encoding, PreprocessError> {
        self.tokenizer
            .encode(text, true)
            .map_err(|e| PreprocessError::Internal(format!("tokenizer failed: {e}")))
    }

    /// The any-resolution tiles of an RGB image (already resized to 512x512
    /// by the caller when following upstream): `1 + grid` tiles of
    /// `3 x tile x tile`, the whole image first.
    pub fn process_rgb(&self, img: &RgbImage) -> Pixels {
        let (w, h) = img.dimensions();
        let (bh, bw) = select_best_resolution((h, w), &self.pinpoints).unwrap_or((h, w));
        let (nh, nw) = patch_output_size((h, w), (bh, bw));
        let resized;
        let src = if (nw, nh) != (w, h) {
            resized = resize::resize(img, nw, nh, self.resample);
            &resized
        } else {
            img
        };
        // transformers pads (target - new) // 2 on BOTH sides.
        let (px, py) = ((bw - nw) / 2, (bh - nh) / 2);
        let (pw, ph) = (nw + 2 * px, nh + 2 * py);
        let mut padded = RgbImage::new(pw, ph);
        image::imageops::replace(&mut padded, src, i64::from(px), i64::from(py));
        let base = resize::resize(img, self.base_size, self.base_size, self.resample);
        let mut out = self.tiles.preprocess(&base);
        let t = self.tile;
        for y in (0..ph).step_by(t as usize) {
            for x in (0..pw).step_by(t as usize) {
                let tw = t.min(pw - x);
                let th = t.min(ph - y);
                let view = image::imageops::crop_imm(&padded, x, y, tw, th).to_image();
                let tile = self.tiles.preprocess(&view);
                out.data.extend_from_slice(&tile.data);
                out.tiles += 1;
            }
        }
        out
    }

    /// Decodes image bytes and makes the tiles, as upstream: resize to
    /// 512x512 in the image's mode, convert to RGB, process.
    pub fn image_pixels(&self, bytes: &[u8]) -> Result<Pixels, PreprocessError> {
        let decoded = decode_image(bytes, &self.limits)?;
        let rgb = decoded.resize_like_pil(RESIZE_TO, RESIZE_TO).to_rgb8();
        Ok(self.process_rgb(&rgb))
    }

    /// Token ids of the prompt for `input`, `<image>` expanded (when it has an image).
    pub fn prompt_ids(&self, input: &Input, truncate: bool) -> Result<Vec<u32>, PreprocessError> {
        let has_image = input.image.is_some();
        if has_image {
            let in_text = input
                .text
                .as_deref()
                .is_some_and(|t| t.contains(IMAGE_TOKEN));
            let in_instr = input
                .instruction
                .as_deref()
                .is_some_and(|t| t.contains(IMAGE_TOKEN));
            if in_text || in_instr {
                return Err(PreprocessError::InvalidImage(format!(
                    "the {} contains {IMAGE_TOKEN:?}, which marks where the image goes; remove it to embed it with an image",
                    if in_text { "text" } else { "instruction" }
                )));
            }
        }
        let instruction = match input.role {
            Role::Query => input.instruction.as_deref(),
            Role::Candidate => None,
        };
        let mut text = input.text.clone();
        for _ in 0..8 {
            let prompt = build_prompt(input.role, instruction, text.as_deref(), has_image);
            let enc = self.encode(&prompt)?;
            let extra = if has_image {
                self.image_tokens.saturating_sub(1)
            } else {
                0
            };
            let total = enc.get_ids().len() + extra;
            if total <= self.max_tokens {
                return Ok(self.expand(enc.get_ids(), has_image));
            }
            let too_long = PreprocessError::TextTooLong {
                tokens: total,
                limit: self.max_tokens,
            };
            let Some(t) = text.as_deref().filter(|_| truncate) else {
                return Err(too_long);
            };
            // The text sits after the template prefix; cut it before the
            // token that makes the prompt too long.
            let prefix = build_prompt(input.role, instruction, None, false);
            let prefix = prefix.trim_end_matches(" [/INST]").len() + 1;
            let text_tokens: Vec<usize> = enc
                .get_offsets()
                .iter()
                .filter(|(s, e)| *s >= prefix && *e <= prefix + t.len() && e > s)
                .map(|(s, _)| s - prefix)
                .collect();
            let excess = total - self.max_tokens;
            if text_tokens.len() <= excess {
                return Err(too_long);
            }
            let cut = text_tokens[text_tokens.len() - excess];
            let mut cut = cut.min(t.len());
            while !t.is_char_boundary(cut) {
                cut -= 1;
            }
            if t[..cut].trim().is_empty() {
                return Err(too_long);
            }
            text = Some(t[..cut].to_string());
        }
        Err(PreprocessError::TextTooLong {
            tokens: self.max_tokens + 1,
            limit: self.max_tokens,
        })
    }

    /// Replaces the one `<image>` id by `image_tokens` of them.
    fn expand(&self, ids: &[u32], has_image: bool) -> Vec<u32> {
        if !has_image {
            return ids.to_vec();
        }
        let mut out = Vec::with_capacity(ids.len() + self.image_tokens);
        for &id in ids {
            if id == self.image_token_id {
                out.extend(std::iter::repeat_n(id, self.image_tokens));
            } else {
                out.push(id);
            }
        }
        out
    }

    /// Turns one input into model-ready numbers: the prompt's ids (image
    /// tokens expanded) and all tiles of the image; `image_size` is the
    /// (width, height) the image processor saw (always 512x512).
    pub fn prepare(&self, input: &Input, truncate: bool) -> Result<Prepared, PreprocessError> {
        let modality = input.modality().ok_or(PreprocessError::EmptyInput)?;
        if input.text.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return Err(PreprocessError::EmptyText);
        }
        // The prompt first: it needs only whether there is an image, and
        // its errors are cheaper to find than decoding the image.
        let ids = self.prompt_ids(input, truncate)?;
        let pixels = match &input.image {
            Some(bytes) => Some(self.image_pixels(bytes)?),
            None => None,
        };
        let image_ids = if pixels.is_some() {
            self.image_tokens
        } else {
            0
        };
        let text_tokens = ids.len().saturating_sub(image_ids);
        let cost = ids.len()
            + pixels
                .as_ref()
                .map_or(0, |p| p.tiles * p.height * p.width / 256);
        Ok(Prepared {
            modality,
            token_ids: Some(ids),
            image_size: pixels.as_ref().map(|_| (RESIZE_TO, RESIZE_TO)),
            pixels,
            text_tokens,
            cost: cost.max(1),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAVA_16: [(u32, u32); 5] =
        [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)];

    #[test]
    fn best_resolution_follows_transformers() {
        assert_eq!(
            select_best_resolution((512, 512), &LLAVA_16),
            Some((672, 672))
        );
        assert_eq!(
            select_best_resolution((300, 1000), &LLAVA_16),
            Some((336, 1008))
        );
        assert_eq!(
            select_best_resolution((480, 640), &LLAVA_16),
            Some((672, 672))
        );
        assert_eq!(
            select_best_resolution((200, 500), &LLAVA_16),
            Some((336, 672))
        );
        // Ties on effective resolution: the least waste, then the first.
        let b = [(48, 192), (192, 48), (96, 144), (144, 96), (96, 96)];
        assert_eq!(select_best_resolution((512, 512), &b), Some((96, 96)));
        let a = [(32, 64), (64, 32), (64, 64), (32, 96), (96, 32)];
        assert_eq!(select_best_resolution((512, 512), &a), Some((64, 64)));
        assert_eq!(select_best_resolution((512, 512), &[]), None);
    }

    #[test]
    fn patch_output_size_keeps_the_aspect() {
        assert_eq!(patch_output_size((512, 512), (672, 672)), (672, 672));
        assert_eq!(patch_output_size((512, 512), (96, 144)), (96, 96));
        assert_eq!(patch_output_size((300, 1000), (336, 1008)), (303, 1008));
        assert_eq!(patch_output_size((1000, 300), (1008, 336)), (1008, 303));
    }

    #[test]
    fn feature_counts_follow_the_processor() {
        // llava-v1.6-mistral: 576 base + 48 rows of 48 + 48 newlines.
        assert_eq!(
            processor_feature_count((512, 512), &LLAVA_16, 336, 14),
            Some(2928)
        );
        // tiny fixture A: 32px tiles of 8px patches, 2x2 grid: 16 + 8 * 9.
        let a = [(32, 64), (64, 32), (64, 64), (32, 96), (96, 32)];
        assert_eq!(processor_feature_count((512, 512), &a, 32, 8), Some(88));
        // A wide image: best 336x1008 (1x3), 24x72 patches, unpadded rows.
        // new_h = 300 * 72 // 1000 = 21, pad 1 -> 22 rows of 72 + 22 newlines + 576.
        assert_eq!(
            processor_feature_count((300, 1000), &LLAVA_16, 336, 14),
            Some(22 * 73 + 576)
        );
    }

    #[test]
    fn prompts_are_upstreams() {
        let i = "Retrieve the image.";
        assert_eq!(
            build_prompt(Role::Query, Some(i), Some("a cat"), false),
            "[INST] \n <instruct> Retrieve the image. <query>  a cat \n [/INST]"
        );
        assert_eq!(
            build_prompt(Role::Query, None, Some("a cat"), true),
            "[INST] \n <instruct>  <query> a cat \n <image> [/INST]"
        );
        assert_eq!(
            build_prompt(Role::Query, Some(i), None, true),
            "[INST] \n <instruct> Retrieve the image. <query>  <image> [/INST]"
        );
        assert_eq!(
            build_prompt(Role::Candidate, None, None, true),
            "[INST]  <image> [/INST]"
        );
        assert_eq!(
            build_prompt(Role::Candidate, None, Some("a dog"), false),
            "[INST]  a dog \n [/INST]"
        );
    }
}
