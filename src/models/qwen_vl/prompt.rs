//! The prompt formats of the Qwen2-VL family: which upstream code's prompt
//! (and image pipeline) an input gets, and what each format decides.
//!
//! Owns: [`PromptFormat`] (parsed from the per-model `prompt_format`
//! setting, or picked from the Hub id), [`PositionIds`] (M-RoPE or GME's
//! sequential positions), GME's fixed prompt ([`gme_prompt`]) and its
//! constants, and [`PromptError`] (why a model's prompt could not be made:
//! the model's fault, never the client's). May not touch: tokenizers,
//! images, tensors.
//!
//! What was read of each upstream prompt builder and what is assumed:
//! `docs/qwen-vl.md`.

use std::str::FromStr;

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
    /// Qwen2.5-VL model whose Hub id names no other).
    ChatTemplate,
    /// BGE-VL-Screenshot (`modeling_bge_vl_screenshot.py`, as far as it
    /// could be read: see `docs/qwen-vl.md`).
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
    /// The name `prompt_format` and `/info` use.
    pub fn as_str(self) -> &'static str {
        match self {
            PromptFormat::ChatTemplate => "chat-template",
            PromptFormat::Screenshot => "screenshot",
            PromptFormat::Gme => "gme",
        }
    }

    /// The format a Hub id names (case-insensitive), `None` for others.
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

    /// The format a model gets: the configured one, else the one its Hub
    /// id names, else the chat template.
    pub fn resolve(configured: Option<PromptFormat>, hub_id: Option<&str>) -> PromptFormat {
        configured
            .or_else(|| hub_id.and_then(PromptFormat::for_hub_id))
            .unwrap_or(PromptFormat::ChatTemplate)
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

impl PositionIds {
    /// A name for cache keys and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            PositionIds::Multimodal => "m-rope",
            PositionIds::Sequential => "sequential",
        }
    }
}

/// Why a model could not make an input's prompt: its chat template failed
/// or places images in a way vlembed cannot expand. The model's files are
/// at fault (a 500 for the client), not the input.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("the chat template failed: {0}")]
    Template(#[source] minijinja::Error),
    #[error("the rendered prompt has {found} image placeholders, expected 1 (does the chat template place images as {IMAGE_PAD}?)")]
    Placeholders { found: usize },
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
    fn formats_resolve_configured_then_hub_id() {
        let resolve = PromptFormat::resolve;
        assert_eq!(resolve(None, None), PromptFormat::ChatTemplate);
        assert_eq!(
            resolve(None, Some("BAAI/BGE-VL-Screenshot")),
            PromptFormat::Screenshot
        );
        assert_eq!(
            resolve(
                Some(PromptFormat::ChatTemplate),
                Some("BAAI/BGE-VL-Screenshot")
            ),
            PromptFormat::ChatTemplate
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
