//! Preprocessing: turns an [`Input`](crate::input::Input) into model-ready numbers.
//!
//! Owns: image decoding (with limits), PIL-compatible RGB conversion and bicubic
//! resizing, the CLIP image processor, and tokenization. Produces
//! [`Prepared`] items made of plain vectors (token ids, pixel values), never
//! candle tensors, so it can run on any thread pool. It knows nothing of HTTP,
//! of queues or of devices.

pub mod clip;
pub mod clip_image;
pub mod image;
pub mod llava;
pub mod resize;
pub mod text;

use crate::input::{Input, Modality};
pub use clip::ClipPreprocessor;
pub use llava::LlavaPreprocessor;

/// Why an input could not be preprocessed. Every variant is the client's fault
/// except [`PreprocessError::Internal`].
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("input has neither text nor image")]
    EmptyInput,
    #[error("text is empty")]
    EmptyText,
    #[error("undecodable or unsupported image: {0}")]
    InvalidImage(String),
    #[error("image is {width}x{height} ({pixels} pixels), over the limit of {limit} pixels")]
    ImageTooLarge {
        width: u32,
        height: u32,
        pixels: u64,
        limit: u64,
    },
    #[error("text is {tokens} tokens long, over the model's limit of {limit} tokens (set truncate=true to clip it)")]
    TextTooLong { tokens: usize, limit: usize },
    #[error("internal preprocessing failure: {0}")]
    Internal(String),
}

/// Pixel values for one image: `tiles` stacked `3 x height x width` planes
/// (channel-first, normalised), as the vision tower expects them.
#[derive(Debug, Clone, PartialEq)]
pub struct Pixels {
    pub data: Vec<f32>,
    pub tiles: usize,
    pub height: usize,
    pub width: usize,
}

/// One input after preprocessing, ready to be batched.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub modality: Modality,
    /// Token ids of the text part (for CLIP: the text alone; for MLLM: the whole prompt).
    pub token_ids: Option<Vec<u32>>,
    pub pixels: Option<Pixels>,
    /// Size of the image as decoded (width, height), for models that need it.
    pub image_size: Option<(u32, u32)>,
    /// Text tokens counted for usage reporting.
    pub text_tokens: usize,
    /// Relative compute cost used by the batcher's budget.
    pub cost: usize,
}

/// The preprocessing of one model family.
// Built once per model and shared behind an `Arc`: variant sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Preprocessor {
    Clip(ClipPreprocessor),
    /// BGE-VL-MLLM (LLaVA-NeXT): prompt + any-resolution image tiles.
    Llava(LlavaPreprocessor),
}

impl Preprocessor {
    /// Validates and converts one input. `truncate` decides what happens to a
    /// text longer than the model's limit.
    pub fn prepare(&self, input: &Input, truncate: bool) -> Result<Prepared, PreprocessError> {
        match self {
            Preprocessor::Clip(p) => p.prepare(input, truncate),
            Preprocessor::Llava(p) => p.prepare(input, truncate),
        }
    }
}
