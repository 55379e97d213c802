//! The Qwen2-VL / Qwen2.5-VL processor: an input's prompt in the model's
//! prompt format, its tokens, and its image as flattened patches
//! (transformers 4.51.3 `Qwen2VLProcessor` / `Qwen2_5_VLProcessor`).
//!
//! Owns: [`QwenPreprocessor`] (loaded from the model's files, the family's
//! [`Preprocess`]: turns an [`Input`] into a [`QwenPrepared`]),
//! [`QwenPrepared`] (the family's [`PreparedData`]: token ids with the image
//! placeholder expanded, the image's patches and grid, where its tokens
//! start, which position ids the decoder uses), [`QwenFiles`],
//! [`QwenModelFacts`], [`QwenOptions`]. Built from the shared tools of
//! `crate::preprocess` (decoding under limits, Pillow-exact resizing, the
//! tokenizer) and this family's [`super::image`], [`super::template`] and
//! [`super::prompt`].
//!
//! May not touch: tensors, devices, HTTP. Knows nothing of the model beyond
//! the facts its loader passes in ([`QwenModelFacts`]).
//!
//! Order of work, cheapest check first, every limit before the work it
//! bounds: the image's size is read from its header, checked against the
//! decode limit and turned into the processed size and token count (too
//! small, too thin: refused here, before decoding; a large image is scaled
//! into `max_pixels` by `smart_resize`); the prompt is rendered (bounded in
//! bytes while it renders) and tokenised and its length, image tokens
//! included, checked against the token limit (truncating only the input's
//! text when asked); only then is the image decoded (under the decode
//! limits) and resized.
//!
//! The prompt formats ([`PromptFormat`]; what was read of each upstream
//! builder and what is assumed: `docs/qwen-vl.md`):
//! - [`PromptFormat::ChatTemplate`]: a system message with the instruction,
//!   verbatim, for a query that has one (a candidate never gets one), then
//!   one user message: the image (if any), then the text (if any); rendered
//!   by the model's chat template with `add_generation_prompt=True`; M-RoPE
//!   positions; the pooled token is the prompt's last (the newline after
//!   `assistant`).
//! - [`PromptFormat::Screenshot`]: BGE-VL-Screenshot; as the chat template
//!   but the user content is the text, then the image.
//! - [`PromptFormat::Gme`]: `gme_inference.py`: a fixed string with the
//!   default instruction "You are a helpful assistant." unless a query has
//!   one, the image block before the text, `<|endoftext|>` last (pooled);
//!   images first resized by qwen_vl_utils' `fetch_image`, then processed
//!   with GME's 256..1280-token bounds; the decoder runs WITHOUT M-RoPE
//!   position ids (GME calls the language model with `position_ids=None`,
//!   so every token, image tokens included, gets sequential positions).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::image::{fetch_size, GridThw, QwenImageProcessor};
use super::prompt::{gme_prompt, PositionIds, PromptError, PromptFormat, IMAGE_PAD, VIDEO_PAD};
use super::template::{ChatTemplate, Content, Message, Part, RenderError, MAX_RENDERED_BYTES};
use crate::input::{Input, Role};
use crate::models::error::ModelError;
use crate::preprocess::image::{decode_image, header_size, ImageLimits};
use crate::preprocess::resize::{self, Filter};
use crate::preprocess::text::{cut_prompt_text, still_too_long, TextTokenizer};
use crate::preprocess::{
    Key, PixelBounds, Prepared, PreparedData, Preprocess, PreprocessError, SetupError, Size,
};

/// The model's files the preprocessor reads.
#[derive(Debug, Clone)]
pub struct QwenFiles {
    pub tokenizer: PathBuf,
    pub preprocessor_config: PathBuf,
    pub tokenizer_config: Option<PathBuf>,
    pub chat_template: Option<PathBuf>,
}

/// The optional files' names (the required ones are in `models::source`).
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
pub const CHAT_TEMPLATE: &str = "chat_template.json";

impl QwenFiles {
    /// The files of a local model directory (optional ones when present).
    pub fn in_dir(dir: &Path) -> Self {
        let opt = |n: &str| Some(dir.join(n)).filter(|p| p.is_file());
        QwenFiles {
            tokenizer: dir.join("tokenizer.json"),
            preprocessor_config: dir.join("preprocessor_config.json"),
            tokenizer_config: opt(TOKENIZER_CONFIG),
            chat_template: opt(CHAT_TEMPLATE),
        }
    }
}

/// What the model's `config.json` says that the processor must agree with.
#[derive(Debug, Clone)]
pub struct QwenModelFacts {
    pub image_token_id: u32,
    pub video_token_id: Option<u32>,
    pub patch_size: u32,
    pub temporal_patch_size: u32,
    pub spatial_merge_size: u32,
    /// The longest prompt, image tokens included.
    pub max_tokens: usize,
}

/// Per-model settings (`min_pixels`, `max_pixels` of the model's
/// configuration; `None`: the format's, else `preprocessor_config.json`'s).
#[derive(Debug, Clone, Copy, Default)]
pub struct QwenOptions {
    pub min_pixels: Option<u64>,
    pub max_pixels: Option<u64>,
}

/// One input's image after preprocessing.
#[derive(Debug, Clone, PartialEq)]
pub struct QwenImage {
    /// `grid.patches()` rows of `3 * temporal * patch * patch` values.
    pub patches: Vec<f32>,
    pub grid: GridThw,
    /// Index in `token_ids` of the first of the image's tokens.
    pub first_token: usize,
    /// How many tokens (`grid.patches() / merge²`).
    pub tokens: usize,
}

/// What a Qwen2-VL model embeds for one input (the family's prepared data).
#[derive(Debug, Clone, PartialEq)]
pub struct QwenPrepared {
    /// The whole prompt, the image placeholder expanded.
    pub token_ids: Vec<u32>,
    pub image: Option<QwenImage>,
    pub positions: PositionIds,
}

impl PreparedData for QwenPrepared {
    /// The ids, the position mode, and the image: its grid, where its
    /// tokens sit and every patch value.
    fn write_key(&self, key: &mut Key<'_>) {
        key.tag("qwen-vl");
        key.tag(self.positions.as_str());
        key.ids(&self.token_ids);
        match &self.image {
            None => key.tag("no-image"),
            Some(im) => {
                key.tag("image");
                for n in [im.grid.t, im.grid.h, im.grid.w, im.first_token, im.tokens] {
                    key.count(n);
                }
                key.floats(&im.patches);
            }
        }
    }
}

/// The processor of one Qwen2-VL / Qwen2.5-VL model in one prompt format.
#[derive(Clone)]
pub struct QwenPreprocessor {
    /// Used without truncation: prompts are cut by [`Self::prompt_ids`].
    tokenizer: TextTokenizer,
    images: QwenImageProcessor,
    format: PromptFormat,
    template: Option<ChatTemplate>,
    image_token_id: u32,
    max_tokens: usize,
    limits: ImageLimits,
}

impl std::fmt::Debug for QwenPreprocessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QwenPreprocessor")
            .field("format", &self.format)
            .field("images", &self.images)
            .field("max_tokens", &self.max_tokens)
            .finish_non_exhaustive()
    }
}

/// A special token entry of `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// A text sentinel that no template changes and no tokenizer merges with
/// its surroundings (private-use characters), to find where the input's
/// text sits in a rendered prompt.
const SENTINEL: &str = "\u{E000}vlembed-text\u{E001}";

/// A render failure as an input's preprocessing error.
fn render_error(e: RenderError) -> PreprocessError {
    match e {
        RenderError::TooLarge => PreprocessError::PromptTooLarge {
            limit: MAX_RENDERED_BYTES,
        },
        RenderError::Template(e) => PreprocessError::Prompt(Box::new(PromptError::Template(e))),
    }
}

impl QwenPreprocessor {
    /// Loads the tokenizer, the image processor and (for the formats that
    /// use it) the chat template: `chat_template.json` first, else
    /// `tokenizer_config.json`'s `chat_template`. Checks them against the
    /// model's facts. Pixel bounds: `options`, else the format's, else
    /// `preprocessor_config.json`'s; `options` that no image fits are a
    /// [`ModelError::Setting`], everything else wrong with the files a
    /// [`ModelError::Preprocessor`].
    pub fn load(
        files: &QwenFiles,
        facts: &QwenModelFacts,
        format: PromptFormat,
        options: QwenOptions,
        limits: ImageLimits,
    ) -> Result<Self, ModelError> {
        let tokenizer = TextTokenizer::from_file(&files.tokenizer, facts.max_tokens)?;
        let pre = SetupError::read_json(&files.preprocessor_config)?;
        let images = QwenImageProcessor::from_value(&pre).map_err(|e| match e {
            SetupError::Invalid { message, .. } => {
                SetupError::invalid(files.preprocessor_config.display(), message)
            }
            e => e,
        })?;
        let (ours, theirs) = (
            (
                images.patch_size(),
                images.temporal_patch_size(),
                images.merge_size(),
            ),
            (
                facts.patch_size,
                facts.temporal_patch_size,
                facts.spatial_merge_size,
            ),
        );
        if ours != theirs {
            return Err(SetupError::Mismatch(format!(
                "preprocessor_config.json has patch / temporal / merge {ours:?}, the vision tower {theirs:?}"
            ))
            .into());
        }
        let (min, max) = format
            .pixel_bounds()
            .unwrap_or((images.min_pixels(), images.max_pixels()));
        let images = images
            .with_pixel_bounds(
                options.min_pixels.unwrap_or(min),
                options.max_pixels.unwrap_or(max),
            )
            .map_err(|e| ModelError::Setting {
                key: "min_pixels / max_pixels",
                source: Box::new(e),
            })?;
        let image_id = tokenizer.token_to_id(IMAGE_PAD).ok_or_else(|| {
            SetupError::Mismatch(format!("the tokenizer has no {IMAGE_PAD} token"))
        })?;
        if image_id != facts.image_token_id {
            return Err(SetupError::Mismatch(format!(
                "the tokenizer's {IMAGE_PAD} is id {image_id} but config.json's image_token_id is {}",
                facts.image_token_id
            ))
            .into());
        }
        let template = if format.uses_chat_template() {
            Some(load_template(files, format)?)
        } else {
            None
        };
        Ok(QwenPreprocessor {
            tokenizer,
            images,
            format,
            template,
            image_token_id: facts.image_token_id,
            max_tokens: facts.max_tokens,
            limits,
        })
    }

    pub fn format(&self) -> PromptFormat {
        self.format
    }

    pub fn image_processor(&self) -> &QwenImageProcessor {
        &self.images
    }

    /// The longest prompt (image tokens included) it lets through.
    pub fn max_text_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Token ids of `text` as the tokenizer gives them (special tokens
    /// written in the text are the special tokens).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, PreprocessError> {
        Ok(self.tokenizer.encode_prompt(text)?.get_ids().to_vec())
    }

    /// The prompt text for an input (before the image placeholder is
    /// expanded). `instruction` is used only for a query.
    pub fn render(
        &self,
        role: Role,
        instruction: Option<&str>,
        text: Option<&str>,
        has_image: bool,
    ) -> Result<String, PreprocessError> {
        let instruction = match role {
            Role::Query => instruction,
            Role::Candidate => None,
        };
        let Some(template) = &self.template else {
            // GME's fixed string: its size is known before it is made.
            let inputs = instruction.map_or(0, str::len) + text.map_or(0, str::len);
            if inputs > MAX_RENDERED_BYTES {
                return Err(render_error(RenderError::TooLarge));
            }
            return Ok(gme_prompt(instruction, text, has_image));
        };
        let mut messages = Vec::with_capacity(2);
        if let Some(i) = instruction {
            messages.push(Message {
                role: "system",
                content: Content::Text(i.to_string()),
            });
        }
        let image = has_image.then_some(Part::Image);
        let text = text.map(|t| Part::Text {
            text: t.to_string(),
        });
        let parts: Vec<Part> = match self.format {
            PromptFormat::Screenshot => text.into_iter().chain(image).collect(),
            _ => image.into_iter().chain(text).collect(),
        };
        messages.push(Message {
            role: "user",
            content: Content::Parts(parts),
        });
        template.render(&messages).map_err(render_error)
    }

    /// The processed size and grid of an image of `size` (the header's),
    /// without decoding it: GME's `fetch_image` size first, then the
    /// processor's `smart_resize`. Returns `(fetch size, processed size, grid)`.
    pub fn plan_image(&self, size: Size) -> Result<(Option<Size>, Size, GridThw), PreprocessError> {
        let fetch = match self.format {
            PromptFormat::Gme => Some(fetch_size(size).ok_or_else(|| {
                PreprocessError::invalid_image(format!(
                    "the image is {size}: it cannot be resized to multiples of 28 pixels"
                ))
            })?),
            _ => None,
        };
        let target = self
            .images
            .target_size(fetch.unwrap_or(size))
            .map_err(|e| PreprocessError::invalid_image_caused(e.to_string(), e))?;
        Ok((fetch, target, self.images.grid(target)))
    }

    /// Token ids of the prompt for `input` with `image_tokens` image tokens
    /// (the placeholder expanded), and where the image's tokens start.
    /// Too long: `TextTooLong` (or `ImageTokens` when the prompt does not
    /// fit even without the text), or with `truncate` the input's text
    /// (only the text) is cut at a token boundary until it fits.
    pub fn prompt_ids(
        &self,
        input: &Input,
        image_tokens: Option<usize>,
        truncate: bool,
    ) -> Result<(Vec<u32>, Option<usize>), PreprocessError> {
        let has_image = image_tokens.is_some();
        if has_image {
            for (what, s) in [
                ("text", input.text_part()),
                ("instruction", input.instruction.as_deref()),
            ] {
                if let Some(pad) =
                    s.and_then(|s| [IMAGE_PAD, VIDEO_PAD].into_iter().find(|p| s.contains(p)))
                {
                    return Err(PreprocessError::invalid_image(format!(
                        "the {what} contains {pad:?}, which marks where an image goes; remove it to embed it with an image"
                    )));
                }
            }
        }
        let extra = image_tokens.map_or(0, |n| n.saturating_sub(1));
        let instruction = input.instruction.as_deref();
        let mut text = input.text_part().map(str::to_string);
        for _ in 0..8 {
            let prompt = self.render(input.role, instruction, text.as_deref(), has_image)?;
            let enc = self.tokenizer.encode_prompt(&prompt)?;
            let total = enc.get_ids().len() + extra;
            if total <= self.max_tokens {
                return self.expand(enc.get_ids(), image_tokens);
            }
            let too_long = self.too_long(input, total, image_tokens, text.is_some())?;
            let Some(t) = text.as_deref().filter(|_| truncate) else {
                return Err(too_long);
            };
            // Where the text sits in the prompt: render with a sentinel.
            let marked = self.render(input.role, instruction, Some(SENTINEL), has_image)?;
            let Some(start) = marked.find(SENTINEL) else {
                return Err(too_long);
            };
            let (prefix, suffix) = (&marked[..start], &marked[start + SENTINEL.len()..]);
            if prompt.len() != prefix.len() + t.len() + suffix.len()
                || !prompt.starts_with(prefix)
                || !prompt.ends_with(suffix)
            {
                // The template does not insert the text verbatim: no safe cut.
                return Err(too_long);
            }
            let excess = total - self.max_tokens;
            match cut_prompt_text(t, enc.get_offsets(), start, excess) {
                Some(kept) => text = Some(kept),
                None => return Err(too_long),
            }
        }
        Err(still_too_long(self.max_tokens))
    }

    /// The error for a prompt of `total` tokens: [`PreprocessError::ImageTokens`]
    /// when it has an image and would not fit without its text either (the
    /// prompt without the text is rendered and counted), else
    /// [`PreprocessError::TextTooLong`].
    fn too_long(
        &self,
        input: &Input,
        total: usize,
        image_tokens: Option<usize>,
        has_text: bool,
    ) -> Result<PreprocessError, PreprocessError> {
        let limit = self.max_tokens;
        let Some(n) = image_tokens else {
            return Ok(PreprocessError::TextTooLong {
                tokens: total,
                limit,
            });
        };
        let without_text = if has_text {
            let bare = self.render(input.role, input.instruction.as_deref(), None, true)?;
            self.tokenizer.encode_prompt(&bare)?.get_ids().len() + n.saturating_sub(1)
        } else {
            total
        };
        Ok(if without_text > limit {
            PreprocessError::ImageTokens {
                tokens: total,
                image_tokens: n,
                limit,
            }
        } else {
            PreprocessError::TextTooLong {
                tokens: total,
                limit,
            }
        })
    }

    /// Replaces the one image placeholder by `n` of them.
    fn expand(
        &self,
        ids: &[u32],
        image_tokens: Option<usize>,
    ) -> Result<(Vec<u32>, Option<usize>), PreprocessError> {
        let Some(n) = image_tokens else {
            return Ok((ids.to_vec(), None));
        };
        let at: Vec<usize> = ids
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == self.image_token_id)
            .map(|(i, _)| i)
            .collect();
        let [first] = at[..] else {
            return Err(PreprocessError::Prompt(Box::new(
                PromptError::Placeholders { found: at.len() },
            )));
        };
        let mut out = Vec::with_capacity(ids.len() + n);
        out.extend_from_slice(&ids[..first]);
        out.extend(std::iter::repeat_n(self.image_token_id, n));
        out.extend_from_slice(&ids[first + 1..]);
        Ok((out, Some(first)))
    }

    /// Decodes `bytes` and makes the patches of the processed image.
    pub fn image_patches(&self, bytes: &[u8]) -> Result<(Vec<f32>, GridThw), PreprocessError> {
        let decoded = decode_image(bytes, &self.limits)?;
        let (w, h) = decoded.dimensions();
        let (fetch, target, _) = self.plan_image(Size::new(w, h))?;
        let mut rgb = decoded.to_rgb8();
        drop(decoded);
        if let Some(f) = fetch {
            // fetch_image: PIL's default filter for an RGB image (bicubic).
            rgb = resize::resize(&rgb, f.width, f.height, Filter::Bicubic);
        }
        Ok(self.images.patches(&rgb, target))
    }

    /// The image's plan from its header, before anything is decoded: the
    /// decode limit, then the processed grid.
    fn plan_header(&self, bytes: &[u8]) -> Result<GridThw, PreprocessError> {
        let size = header_size(bytes)?;
        if size.pixels() > self.limits.max_pixels {
            return Err(PreprocessError::ImageTooLarge {
                width: size.width,
                height: size.height,
                pixels: size.pixels(),
                limit: self.limits.max_pixels,
            });
        }
        Ok(self.plan_image(size)?.2)
    }
}

/// The chat template `format` renders: `chat_template.json` first, else
/// `tokenizer_config.json`'s `chat_template`, with the tokenizer's special
/// tokens as variables.
fn load_template(files: &QwenFiles, format: PromptFormat) -> Result<ChatTemplate, SetupError> {
    let tokenizer_config = match &files.tokenizer_config {
        Some(p) => Some(SetupError::read_json(p)?),
        None => None,
    };
    let from_file = match &files.chat_template {
        Some(p) => SetupError::read_json(p)?
            .get("chat_template")
            .and_then(|t| t.as_str())
            .map(|t| (t.to_string(), p)),
        None => None,
    };
    let from_config = || {
        let p = files.tokenizer_config.as_ref()?;
        let t = tokenizer_config.as_ref()?.get("chat_template")?.as_str()?;
        Some((t.to_string(), p))
    };
    let (source, path) = from_file.or_else(from_config).ok_or_else(|| {
        SetupError::Mismatch(format!(
            "prompt format {format} needs the model's chat template, and neither {} nor {} has one",
            CHAT_TEMPLATE, TOKENIZER_CONFIG
        ))
    })?;
    let specials = ["bos_token", "eos_token", "pad_token", "unk_token"]
        .iter()
        .filter_map(|k| {
            tokenizer_config
                .as_ref()
                .and_then(|c| c.get(*k))
                .and_then(token_string)
                .map(|v| (k.to_string(), v))
        })
        .collect();
    ChatTemplate::new(source, specials).map_err(|e| SetupError::Template {
        file: path.display().to_string(),
        source: Box::new(e),
    })
}

impl Preprocess for QwenPreprocessor {
    type Data = QwenPrepared;

    /// Turns one input into model-ready numbers. Costs, for the batch
    /// budget: the decoder's tokens (the image's real token count
    /// included) plus the vision tower's patches (four per image token).
    fn prepare(
        &self,
        input: &Input,
        truncate: bool,
    ) -> Result<Prepared<QwenPrepared>, PreprocessError> {
        if input.text_part().is_some_and(|t| t.trim().is_empty()) {
            return Err(PreprocessError::EmptyText);
        }
        // The image's grid from its header, before anything is decoded.
        let grid = input
            .image_part()
            .map(|bytes| self.plan_header(bytes))
            .transpose()?;
        let image_tokens = grid.map(|g| self.images.merged_tokens(g));
        let (ids, first) = self.prompt_ids(input, image_tokens, truncate)?;
        let image = match (input.image_part(), first, image_tokens) {
            (Some(bytes), Some(first_token), Some(tokens)) => {
                let (patches, grid) = self.image_patches(bytes)?;
                if self.images.merged_tokens(grid) != tokens {
                    // The decoded image is not the size its header declared.
                    return Err(PreprocessError::invalid_image(
                        "the decoded image's size differs from its header's",
                    ));
                }
                Some(QwenImage {
                    patches,
                    grid,
                    first_token,
                    tokens,
                })
            }
            _ => None,
        };
        let image_ids = image.as_ref().map_or(0, |i| i.tokens);
        let patches = image.as_ref().map_or(0, |i| i.grid.patches());
        let text_tokens = ids.len() - image_ids;
        let cost = ids.len() + patches;
        let data = QwenPrepared {
            token_ids: ids,
            image,
            positions: self.format.positions(),
        };
        Ok(Prepared::new(input.modality(), text_tokens, cost, data))
    }

    /// What decides the prompt, for the model fingerprint: the format and,
    /// when it renders one, the chat template's text and the special
    /// tokens it is rendered with.
    fn prompt_template(&self) -> Option<String> {
        Some(match &self.template {
            Some(t) => {
                let specials: Vec<String> = t
                    .specials()
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                format!("{}\n{}\n{}", self.format, specials.join("\n"), t.source())
            }
            None => format!(
                "{}\n{}",
                self.format,
                gme_prompt(Some("{instruction}"), Some("{text}"), true)
            ),
        })
    }

    fn prompt_format(&self) -> Option<&'static str> {
        Some(self.format.as_str())
    }

    fn pixel_bounds(&self) -> Option<PixelBounds> {
        Some(PixelBounds {
            min: self.images.min_pixels(),
            max: self.images.max_pixels(),
        })
    }

    fn image_limits(&self) -> &ImageLimits {
        &self.limits
    }

    /// Decoding limits only: the pixel bounds images are resized into
    /// (`min_pixels`, `max_pixels`) stay the processor's.
    fn set_image_limits(&mut self, limits: ImageLimits) {
        self.limits = limits;
    }
}

#[cfg(test)]
mod tests;
