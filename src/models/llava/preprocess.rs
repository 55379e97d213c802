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
//!   ([`anyres::select_best_resolution`]), resized keeping the aspect
//!   ([`anyres::patch_output_size`]) and padded with black to the centre, cut into
//!   tiles, plus the whole image resized to the tile size as the FIRST tile;
//!   every tile then goes through the CLIP tile processor (resize shortest
//!   edge, centre crop, rescale, normalise);
//! - tokens: `tokenizer.json` with BOS; the `<image>` token is expanded to
//!   exactly the number of image features the model makes
//!   ([`anyres::processor_feature_count`], the processor's own arithmetic).
//!
//! Memory: every intermediate image is bounded by the decoded image (itself
//! bounded by the decode limits) or by the fixed sizes of the pipeline (the
//! 512x512 resize, the best resolution among the pinpoints, the tiles); none
//! follows the input's aspect ratio. The first resize to 512x512 has one
//! intermediate, 512 samples along one axis and the input's size along the
//! other; with Pillow's pass order it is never larger than the decoded
//! image or 512x512 (the first pass runs along an axis that grows, or the
//! other axis is over 512 already). Everything after works on 512x512.
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

use super::anyres::{self, select_best_resolution};
use crate::input::{Input, Role};
use crate::preprocess::clip_image::ClipImageProcessor;
use crate::preprocess::image::{decode_image, ImageLimits};
use crate::preprocess::resize::{self, Filter};
use crate::preprocess::text::{cut_prompt_text, still_too_long, TextTokenizer};
use crate::preprocess::{
    Key, Pixels, Prepared, PreparedData, Preprocess, PreprocessError, SetupError, Size,
};

/// Upstream BGE-VL-MLLM resizes every image to exactly this size first.
pub const RESIZE_TO: u32 = 512;
/// The image placeholder of the prompt (`LlavaNextProcessor.image_token`).
pub const IMAGE_TOKEN: &str = "<image>";

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

/// Every shape [`build_prompt`] gives, with `{instruction}` and `{text}`
/// placeholders, one per line: a change of the template changes this text
/// (and so the model fingerprint).
pub fn prompt_template() -> String {
    let mut lines = Vec::new();
    for role in [Role::Query, Role::Candidate] {
        for instruction in [Some("{instruction}"), None] {
            for text in [Some("{text}"), None] {
                for image in [true, false] {
                    lines.push(build_prompt(role, instruction, text, image));
                }
            }
        }
    }
    lines.join("\n")
}

/// What BGE-VL-MLLM embeds for one input: its prompt's token ids (every
/// `<image>` expanded to the image's feature count) and, with an image,
/// its any-resolution tiles.
#[derive(Debug, Clone, PartialEq)]
pub struct LlavaInput {
    pub ids: Vec<u32>,
    pub image: Option<LlavaImage>,
}

/// An image as the model takes it: `1 + grid` tiles of `3 x S x S` (the
/// whole image first) and the size the processor saw, which decides the
/// grid and the unpadding.
#[derive(Debug, Clone, PartialEq)]
pub struct LlavaImage {
    pub tiles: Pixels,
    pub size: Size,
}

impl PreparedData for LlavaInput {
    fn write_key(&self, key: &mut Key<'_>) {
        key.tag("llava");
        key.ids(&self.ids);
        match &self.image {
            None => key.tag("no-image"),
            Some(im) => {
                im.tiles.write_key(key);
                key.u32(im.size.width);
                key.u32(im.size.height);
            }
        }
    }
}

/// Tokenizer + any-resolution image processor of a LLaVA-NeXT model.
#[derive(Clone)]
pub struct LlavaPreprocessor {
    /// Used without truncation: prompts are cut by [`Self::prompt_ids`].
    tokenizer: TextTokenizer,
    tiles: ClipImageProcessor,
    resample: Filter,
    /// Side of the base tile (`size.shortest_edge`).
    base_size: u32,
    /// Side of every tile (`crop_size`).
    tile: u32,
    pinpoints: Vec<Size>,
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
    ) -> Result<Self, SetupError> {
        let tok = TextTokenizer::from_file(tokenizer, facts.max_tokens)?;
        let pre_file = preprocessor_config.display();
        let pre = SetupError::read_json(preprocessor_config)?;
        let tiles =
            ClipImageProcessor::from_value(&pre).map_err(|e| SetupError::invalid(&pre_file, e))?;
        let resample = match pre.get("resample") {
            None | Some(Value::Null) => Filter::Bicubic,
            Some(v) => v
                .as_i64()
                .and_then(Filter::from_pil_code)
                .ok_or_else(|| SetupError::invalid(&pre_file, format!("unknown resample {v}")))?,
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
            return Err(SetupError::invalid(
                &pre_file,
                format!(
                    "tiles must be center-cropped to the vision tower's {t}x{t} (crop_size {cw}x{ch}, size {base_size})",
                    t = facts.tile
                ),
            ));
        }
        let pinpoints = match pre.get("image_grid_pinpoints") {
            None | Some(Value::Null) => anyres::DEFAULT_PINPOINTS.to_vec(),
            Some(p) => anyres::parse_pinpoints(p).map_err(|e| SetupError::invalid(&pre_file, e))?,
        };
        // processor_config.json: patch size, strategy, image token.
        let mut patch = facts.patch;
        let mut image_token = IMAGE_TOKEN.to_string();
        if let Some(path) = processor_config {
            let v = SetupError::read_json(path)?;
            if let Some(p) = v.get("patch_size").and_then(|p| p.as_u64()) {
                patch = p as u32;
            }
            if let Some(s) = v
                .get("vision_feature_select_strategy")
                .and_then(|s| s.as_str())
            {
                if s != "default" {
                    return Err(SetupError::invalid(
                        path.display(),
                        format!("vision_feature_select_strategy {s:?} is not supported"),
                    ));
                }
            }
            if let Some(t) = v.get("image_token").and_then(|t| t.as_str()) {
                image_token = t.to_string();
            }
        }
        let mismatch = |m: String| SetupError::Mismatch(m);
        if image_token != IMAGE_TOKEN {
            return Err(mismatch(format!(
                "the processor's image token is {image_token:?}; vlembed expects {IMAGE_TOKEN:?}"
            )));
        }
        let image_token_id = tok.token_to_id(IMAGE_TOKEN).ok_or_else(|| {
            mismatch(format!(
                "{} has no {IMAGE_TOKEN} token",
                tokenizer.display()
            ))
        })?;
        if image_token_id != facts.image_token_id {
            return Err(mismatch(format!(
                "the tokenizer's {IMAGE_TOKEN} is id {image_token_id} but config.json's image_token_index is {}",
                facts.image_token_id
            )));
        }
        let size = Size::square(RESIZE_TO);
        let image_tokens = anyres::processor_feature_count(size, &pinpoints, facts.tile, patch)
            .ok_or_else(|| mismatch("cannot count the image features".into()))?;
        if image_tokens != facts.model_features {
            return Err(mismatch(format!(
                "the processor would expand <image> to {image_tokens} tokens but the model makes {} features per image",
                facts.model_features
            )));
        }
        let best = select_best_resolution(size, &pinpoints)
            .ok_or_else(|| mismatch("image_grid_pinpoints is empty".into()))?;
        let proc_tiles = 1 + best.height.div_ceil(facts.tile) as usize
            * best.width.div_ceil(facts.tile) as usize;
        if proc_tiles != facts.model_tiles {
            return Err(mismatch(format!(
                "the processor makes {proc_tiles} tiles per image but the model expects {}",
                facts.model_tiles
            )));
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
        Ok(self.tokenizer.encode_prompt(text)?.get_ids().to_vec())
    }

    /// The any-resolution tiles of an RGB image (already resized to 512x512
    /// by the caller when following upstream): `1 + grid` tiles of
    /// `3 x tile x tile`, the whole image first.
    pub fn process_rgb(&self, img: &RgbImage) -> Pixels {
        let (w, h) = img.dimensions();
        let size = Size::new(w, h);
        let best = select_best_resolution(size, &self.pinpoints).unwrap_or(size);
        let Size {
            width: nw,
            height: nh,
        } = anyres::patch_output_size(size, best);
        let (bw, bh) = (best.width, best.height);
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
        let has_image = input.image_part().is_some();
        if has_image {
            let in_text = input.text_part().is_some_and(|t| t.contains(IMAGE_TOKEN));
            let in_instr = input
                .instruction
                .as_deref()
                .is_some_and(|t| t.contains(IMAGE_TOKEN));
            if in_text || in_instr {
                return Err(PreprocessError::invalid_image(format!(
                    "the {} contains {IMAGE_TOKEN:?}, which marks where the image goes; remove it to embed it with an image",
                    if in_text { "text" } else { "instruction" }
                )));
            }
        }
        let instruction = match input.role {
            Role::Query => input.instruction.as_deref(),
            Role::Candidate => None,
        };
        let mut text = input.text_part().map(str::to_string);
        for _ in 0..8 {
            let prompt = build_prompt(input.role, instruction, text.as_deref(), has_image);
            let enc = self.tokenizer.encode_prompt(&prompt)?;
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
            let excess = total - self.max_tokens;
            match cut_prompt_text(t, enc.get_offsets(), prefix, excess) {
                Some(kept) => text = Some(kept),
                None => return Err(too_long),
            }
        }
        Err(still_too_long(self.max_tokens))
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
}

impl Preprocess for LlavaPreprocessor {
    type Data = LlavaInput;

    /// Turns one input into model-ready numbers: the prompt's ids (image
    /// tokens expanded) and all tiles of the image, which the processor
    /// saw at 512x512.
    fn prepare(
        &self,
        input: &Input,
        truncate: bool,
    ) -> Result<Prepared<LlavaInput>, PreprocessError> {
        if input.text_part().is_some_and(|t| t.trim().is_empty()) {
            return Err(PreprocessError::EmptyText);
        }
        // The prompt first: it needs only whether there is an image, and
        // its errors are cheaper to find than decoding the image.
        let ids = self.prompt_ids(input, truncate)?;
        let image = match input.image_part() {
            Some(bytes) => Some(LlavaImage {
                tiles: self.image_pixels(bytes)?,
                size: Size::square(RESIZE_TO),
            }),
            None => None,
        };
        let image_ids = if image.is_some() {
            self.image_tokens
        } else {
            0
        };
        let text_tokens = ids.len().saturating_sub(image_ids);
        let cost = ids.len()
            + image.as_ref().map_or(0, |im| {
                im.tiles.tiles * im.tiles.height * im.tiles.width / 256
            });
        let data = LlavaInput { ids, image };
        Ok(Prepared::new(input.modality(), text_tokens, cost, data))
    }

    fn image_limits(&self) -> &ImageLimits {
        &self.limits
    }

    fn set_image_limits(&mut self, limits: ImageLimits) {
        self.limits = limits;
    }

    fn prompt_template(&self) -> Option<String> {
        Some(prompt_template())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
