//! The Qwen2-VL / Qwen2.5-VL processor: an input's prompt in the model's
//! prompt format, its tokens, and its image as flattened patches
//! (transformers 4.51.3 `Qwen2VLProcessor` / `Qwen2_5_VLProcessor`).
//!
//! Owns: [`PromptFormat`] (which upstream code's prompt an input gets),
//! [`QwenPreprocessor`] (loaded from the model's files, turns an [`Input`]
//! into a [`QwenPrepared`]), [`QwenPrepared`] (token ids with the image
//! placeholder expanded, the image's patches and grid, where its tokens
//! start, which position ids the decoder uses, the cost), [`QwenLoadError`].
//! Submodules: [`image`] (the image processor and the size arithmetic),
//! [`template`] (chat templates through minijinja).
//!
//! May not touch: tensors, devices, HTTP. Knows nothing of the model beyond
//! the facts its loader passes in ([`QwenModelFacts`]).
//!
//! Order of work, cheapest check first, every limit before the work it
//! bounds: the image's size is read from its header and turned into the
//! processed size and token count (too small, too thin, over the model's
//! pixel budget: refused here, before decoding); the prompt is rendered and
//! tokenised and its length, image tokens included, checked against the
//! token limit (truncating only the input's text when asked); only then is
//! the image decoded (under the decode limits) and resized.
//!
//! The prompt formats (see the README's models table for what was read of
//! each upstream builder and what is assumed):
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

pub mod image;
pub mod template;

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::Value;
use tokenizers::Tokenizer;

pub use self::image::{GridThw, QwenImageProcessor, SizeError};
use super::image::{decode_image, header_size, ImageLimits};
use super::{PreprocessError, Size};
use crate::input::{Input, Modality, Role};
use template::{ChatTemplate, Content, Message, Part, RenderError};

/// The image placeholder of Qwen's templates.
pub const IMAGE_PAD: &str = "<|image_pad|>";
/// The video placeholder (refused in the text of an input with an image).
pub const VIDEO_PAD: &str = "<|video_pad|>";
/// GME's default instruction (`GmeQwen2VL.default_instruction`).
pub const GME_DEFAULT_INSTRUCTION: &str = "You are a helpful assistant.";
/// GME's processor bounds (`min_image_tokens=256`, `max_image_tokens=1280`).
pub const GME_MIN_PIXELS: u64 = 256 * 28 * 28;
pub const GME_MAX_PIXELS: u64 = 1280 * 28 * 28;

/// Which upstream code's prompt (and image pipeline) an input gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PromptFormat {
    /// The model's own chat template (the default for a Qwen2-VL /
    /// Qwen2.5-VL directory not recognised).
    ChatTemplate,
    /// BGE-VL-Screenshot (`modeling_bge_vl_screenshot.py`, as far as it
    /// could be read: see the README).
    Screenshot,
    /// GME (`gme_inference.py`, `GmeQwen2VL`).
    Gme,
}

/// An unknown `prompt_format` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown prompt_format {0:?}: expected \"chat-template\", \"screenshot\" or \"gme\"")]
pub struct UnknownPromptFormat(pub String);

impl FromStr for PromptFormat {
    type Err = UnknownPromptFormat;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "chat-template" => Ok(PromptFormat::ChatTemplate),
            "screenshot" => Ok(PromptFormat::Screenshot),
            "gme" => Ok(PromptFormat::Gme),
            other => Err(UnknownPromptFormat(other.to_string())),
        }
    }
}

impl std::fmt::Display for PromptFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PromptFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            PromptFormat::ChatTemplate => "chat-template",
            PromptFormat::Screenshot => "screenshot",
            PromptFormat::Gme => "gme",
        }
    }

    /// The format a Hub id names (case-insensitive), `None` for others
    /// (which get [`PromptFormat::ChatTemplate`] unless configured).
    pub fn for_hub_id(id: &str) -> Option<Self> {
        let id = id.trim_end_matches('/').to_ascii_lowercase();
        match id.as_str() {
            "baai/bge-vl-screenshot" => Some(PromptFormat::Screenshot),
            "alibaba-nlp/gme-qwen2-vl-2b-instruct" | "alibaba-nlp/gme-qwen2-vl-7b-instruct" => {
                Some(PromptFormat::Gme)
            }
            _ => None,
        }
    }

    /// The position ids the decoder uses with this format.
    pub fn positions(self) -> PositionIds {
        match self {
            PromptFormat::Gme => PositionIds::Sequential,
            _ => PositionIds::Multimodal,
        }
    }

    /// Whether the format renders the model's chat template.
    pub fn uses_chat_template(self) -> bool {
        !matches!(self, PromptFormat::Gme)
    }

    /// The image bounds the format's upstream code gives the processor,
    /// when it overrides `preprocessor_config.json`.
    pub fn pixel_bounds(self) -> Option<(u64, u64)> {
        match self {
            PromptFormat::Gme => Some((GME_MIN_PIXELS, GME_MAX_PIXELS)),
            _ => None,
        }
    }
}

/// How the decoder numbers positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PositionIds {
    /// transformers' `get_rope_index`: text tokens count up on all three
    /// axes; an image's tokens take (start, start + row, start + column)
    /// and the text after it resumes at the largest position + 1.
    Multimodal,
    /// 0, 1, 2, ... on all three axes for every token (GME).
    Sequential,
}

/// Why a Qwen2-VL model's preprocessing files do not load.
#[derive(Debug, thiserror::Error)]
pub enum QwenLoadError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid JSON in {path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot load the tokenizer {path}: {source}")]
    Tokenizer {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("invalid preprocessor_config.json: {0}")]
    Preprocessor(String),
    #[error("the chat template does not compile: {0}")]
    Template(#[source] Box<minijinja::Error>),
    #[error("prompt format {0} needs the model's chat template, and neither chat_template.json nor tokenizer_config.json has one")]
    NoTemplate(PromptFormat),
    #[error("{0}")]
    Mismatch(String),
}

/// The model's files the preprocessor reads.
#[derive(Debug, Clone)]
pub struct QwenFiles {
    pub tokenizer: PathBuf,
    pub preprocessor_config: PathBuf,
    pub tokenizer_config: Option<PathBuf>,
    pub chat_template: Option<PathBuf>,
}

impl QwenFiles {
    /// The files of a local model directory (optional ones when present).
    pub fn in_dir(dir: &Path) -> Self {
        let opt = |n: &str| Some(dir.join(n)).filter(|p| p.is_file());
        QwenFiles {
            tokenizer: dir.join("tokenizer.json"),
            preprocessor_config: dir.join("preprocessor_config.json"),
            tokenizer_config: opt("tokenizer_config.json"),
            chat_template: opt("chat_template.json"),
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

/// Per-model settings (phase 2 reads them from the server configuration).
#[derive(Debug, Clone, Copy, Default)]
pub struct QwenOptions {
    /// Overrides the format's (or `preprocessor_config.json`'s) bounds.
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

/// One input after preprocessing, ready for [`crate::models::qwen_vl`].
#[derive(Debug, Clone)]
pub struct QwenPrepared {
    pub modality: Modality,
    /// The whole prompt, the image placeholder expanded.
    pub token_ids: Vec<u32>,
    pub image: Option<QwenImage>,
    pub positions: PositionIds,
    /// Prompt tokens that are not image tokens.
    pub text_tokens: usize,
    /// Relative compute: decoder tokens plus vision patches.
    pub cost: usize,
}

/// The processor of one Qwen2-VL / Qwen2.5-VL model in one prompt format.
#[derive(Clone)]
pub struct QwenPreprocessor {
    tokenizer: Tokenizer,
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

fn read_json(path: &Path) -> Result<Value, QwenLoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| QwenLoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| QwenLoadError::Json {
        path: path.to_path_buf(),
        source,
    })
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

impl QwenPreprocessor {
    /// Loads the tokenizer, the image processor and (for the formats that
    /// use it) the chat template: `chat_template.json` first, else
    /// `tokenizer_config.json`'s `chat_template`. Checks them against the
    /// model's facts.
    pub fn load(
        files: &QwenFiles,
        facts: &QwenModelFacts,
        format: PromptFormat,
        options: QwenOptions,
        limits: ImageLimits,
    ) -> Result<Self, QwenLoadError> {
        let mut tokenizer =
            Tokenizer::from_file(&files.tokenizer).map_err(|source| QwenLoadError::Tokenizer {
                path: files.tokenizer.clone(),
                source,
            })?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|source| QwenLoadError::Tokenizer {
                path: files.tokenizer.clone(),
                source,
            })?;
        let pre = read_json(&files.preprocessor_config)?;
        let mut images = QwenImageProcessor::from_value(&pre)?;
        if (
            images.patch_size(),
            images.temporal_patch_size(),
            images.merge_size(),
        ) != (
            facts.patch_size,
            facts.temporal_patch_size,
            facts.spatial_merge_size,
        ) {
            return Err(QwenLoadError::Mismatch(format!(
                "preprocessor_config.json has patch {} / temporal {} / merge {}, the vision tower {} / {} / {}",
                images.patch_size(),
                images.temporal_patch_size(),
                images.merge_size(),
                facts.patch_size,
                facts.temporal_patch_size,
                facts.spatial_merge_size
            )));
        }
        let (min, max) = format
            .pixel_bounds()
            .unwrap_or((images.min_pixels(), images.max_pixels()));
        images = images.with_pixel_bounds(
            options.min_pixels.unwrap_or(min),
            options.max_pixels.unwrap_or(max),
        )?;
        let image_id = tokenizer.token_to_id(IMAGE_PAD).ok_or_else(|| {
            QwenLoadError::Mismatch(format!("the tokenizer has no {IMAGE_PAD} token"))
        })?;
        if image_id != facts.image_token_id {
            return Err(QwenLoadError::Mismatch(format!(
                "the tokenizer's {IMAGE_PAD} is id {image_id} but config.json's image_token_id is {}",
                facts.image_token_id
            )));
        }
        let tokenizer_config = match &files.tokenizer_config {
            Some(p) => Some(read_json(p)?),
            None => None,
        };
        let template = if format.uses_chat_template() {
            let from_file = match &files.chat_template {
                Some(p) => read_json(p)?
                    .get("chat_template")
                    .and_then(|t| t.as_str())
                    .map(str::to_string),
                None => None,
            };
            let source = from_file
                .or_else(|| {
                    tokenizer_config
                        .as_ref()
                        .and_then(|c| c.get("chat_template"))
                        .and_then(|t| t.as_str())
                        .map(str::to_string)
                })
                .ok_or(QwenLoadError::NoTemplate(format))?;
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
            Some(ChatTemplate::new(source, specials)?)
        } else {
            None
        };
        if facts.max_tokens == 0 {
            return Err(QwenLoadError::Mismatch(
                "max_tokens must be positive".into(),
            ));
        }
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

    pub fn image_limits(&self) -> &ImageLimits {
        &self.limits
    }

    pub fn set_image_limits(&mut self, limits: ImageLimits) {
        self.limits = limits;
    }

    /// What decides the prompt, for the model fingerprint: the format and,
    /// when it renders one, the chat template's text.
    pub fn prompt_template(&self) -> String {
        match &self.template {
            Some(t) => format!("{}\n{}", self.format, t.source()),
            None => format!(
                "{}\n{}",
                self.format,
                gme_prompt(Some("{instruction}"), Some("{text}"), true)
            ),
        }
    }

    /// Token ids of `text` as the tokenizer gives them (special tokens
    /// written in the text are the special tokens).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, PreprocessError> {
        Ok(self.encode(text)?.get_ids().to_vec())
    }

    fn encode(&self, text: &str) -> Result<tokenizers::Encoding, PreprocessError> {
        self.tokenizer
            .encode(text, true)
            .map_err(|e| PreprocessError::Internal(format!("tokenizer failed: {e}")))
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
        template.render(&messages).map_err(|e| match e {
            RenderError::TooLong(n) => PreprocessError::TextTooLong {
                tokens: n,
                limit: template::MAX_RENDERED_BYTES,
            },
            RenderError::Template(e) => PreprocessError::Internal(format!("chat template: {e:#}")),
        })
    }

    /// The processed size and grid of an image of `size` (the header's),
    /// without decoding it: GME's `fetch_image` size first, then the
    /// processor's `smart_resize`. Returns `(fetch size, processed size, grid)`.
    pub fn plan_image(&self, size: Size) -> Result<(Option<Size>, Size, GridThw), PreprocessError> {
        let fetch = match self.format {
            PromptFormat::Gme => Some(fetch_size_checked(size)?),
            _ => None,
        };
        let target = self
            .images
            .target_size(fetch.unwrap_or(size))
            .map_err(|e| PreprocessError::invalid_image(e.to_string()))?;
        Ok((fetch, target, self.images.grid(target)))
    }

    /// Token ids of the prompt for `input` with `image_tokens` image tokens
    /// (the placeholder expanded), and where the image's tokens start.
    /// Too long: `TextTooLong`, or with `truncate` the input's text (only
    /// the text) is cut at a token boundary until it fits.
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
            let enc = self.encode(&prompt)?;
            let total = enc.get_ids().len() + extra;
            if total <= self.max_tokens {
                return self.expand(enc.get_ids(), image_tokens);
            }
            let too_long = PreprocessError::TextTooLong {
                tokens: total,
                limit: self.max_tokens,
            };
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
            let end = start + t.len();
            let text_tokens: Vec<usize> = enc
                .get_offsets()
                .iter()
                .filter(|(s, e)| *s >= start && *e <= end && e > s)
                .map(|(s, _)| s - start)
                .collect();
            let excess = total - self.max_tokens;
            if text_tokens.len() <= excess {
                return Err(too_long);
            }
            let mut cut = text_tokens[text_tokens.len() - excess].min(t.len());
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
            return Err(PreprocessError::Internal(format!(
                "the prompt has {} image placeholders, expected 1 (does the chat template place images as {IMAGE_PAD}?)",
                at.len()
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
            rgb = super::resize::resize(&rgb, f.width, f.height, super::resize::Filter::Bicubic);
        }
        Ok(self.images.patches(&rgb, target))
    }

    /// Turns one input into model-ready numbers.
    pub fn prepare(&self, input: &Input, truncate: bool) -> Result<QwenPrepared, PreprocessError> {
        let modality = input.modality();
        if input.text_part().is_some_and(|t| t.trim().is_empty()) {
            return Err(PreprocessError::EmptyText);
        }
        // The image's grid from its header, before anything is decoded.
        let plan = match input.image_part() {
            Some(bytes) => {
                let size = header_size(bytes)?;
                if size.pixels() > self.limits.max_pixels {
                    return Err(PreprocessError::ImageTooLarge {
                        width: size.width,
                        height: size.height,
                        pixels: size.pixels(),
                        limit: self.limits.max_pixels,
                    });
                }
                Some(self.plan_image(size)?)
            }
            None => None,
        };
        let image_tokens = plan.map(|(_, _, g)| self.images.merged_tokens(g));
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
        Ok(QwenPrepared {
            modality,
            text_tokens: ids.len() - image_ids,
            cost: (ids.len() + patches).max(1),
            token_ids: ids,
            image,
            positions: self.format.positions(),
        })
    }
}

fn fetch_size_checked(size: Size) -> Result<Size, PreprocessError> {
    self::image::fetch_size(size).ok_or_else(|| {
        PreprocessError::invalid_image(format!(
            "the image is {}x{}: it cannot be resized to multiples of 28 pixels",
            size.width, size.height
        ))
    })
}

/// GME's prompt (`GmeQwen2VL.embed`): the default instruction unless given.
pub fn gme_prompt(instruction: Option<&str>, text: Option<&str>, has_image: bool) -> String {
    let instruction = instruction.unwrap_or(GME_DEFAULT_INSTRUCTION);
    let image = if has_image {
        "<|vision_start|><|image_pad|><|vision_end|>"
    } else {
        ""
    };
    format!(
        "<|im_start|>system\n{instruction}<|im_end|>\n<|im_start|>user\n{image}{}<|im_end|>\n<|im_start|>assistant\n<|endoftext|>",
        text.unwrap_or("")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_and_follow_hub_ids() {
        for f in [
            PromptFormat::ChatTemplate,
            PromptFormat::Screenshot,
            PromptFormat::Gme,
        ] {
            assert_eq!(f.as_str().parse::<PromptFormat>(), Ok(f));
        }
        assert!("chat_template".parse::<PromptFormat>().is_err());
        assert_eq!(
            PromptFormat::for_hub_id("BAAI/BGE-VL-Screenshot"),
            Some(PromptFormat::Screenshot)
        );
        assert_eq!(
            PromptFormat::for_hub_id("Alibaba-NLP/gme-Qwen2-VL-7B-Instruct"),
            Some(PromptFormat::Gme)
        );
        assert_eq!(
            PromptFormat::for_hub_id("Qwen/Qwen2.5-VL-3B-Instruct"),
            None
        );
        assert_eq!(PromptFormat::Gme.positions(), PositionIds::Sequential);
        assert_eq!(
            PromptFormat::Screenshot.positions(),
            PositionIds::Multimodal
        );
    }

    #[test]
    fn gme_prompts_are_upstreams() {
        assert_eq!(
            gme_prompt(None, Some("a cat"), true),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>a cat<|im_end|>\n<|im_start|>assistant\n<|endoftext|>"
        );
        assert_eq!(
            gme_prompt(Some("Find it."), None, true),
            "<|im_start|>system\nFind it.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n<|endoftext|>"
        );
    }
}
