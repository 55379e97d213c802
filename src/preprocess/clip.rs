//! The BGE-VL-CLIP processor: text through the CLIP tokenizer, images through
//! [`ClipImageProcessor`]. Instructions and roles do not change CLIP inputs.

use std::path::Path;

use super::clip_image::ClipImageProcessor;
use super::image::{decode_image, ImageLimits};
use super::text::TextTokenizer;
use super::{Pixels, Prepared, PreprocessError, Size};
use crate::input::Input;

/// Tokenizer + image processor of a CLIP model.
#[derive(Debug, Clone)]
pub struct ClipPreprocessor {
    tokenizer: TextTokenizer,
    images: ClipImageProcessor,
    limits: ImageLimits,
}

impl ClipPreprocessor {
    /// Loads `tokenizer.json` and `preprocessor_config.json`; texts are limited
    /// to `max_tokens` (the text tower's position table).
    pub fn load(
        tokenizer: &Path,
        preprocessor_config: &Path,
        max_tokens: usize,
        limits: ImageLimits,
    ) -> Result<Self, String> {
        let tokenizer = TextTokenizer::from_file(tokenizer, max_tokens)?;
        let images = ClipImageProcessor::from_file(preprocessor_config)
            .map_err(|e| format!("invalid {}: {e}", preprocessor_config.display()))?;
        Ok(ClipPreprocessor {
            tokenizer,
            images,
            limits,
        })
    }

    /// The (height, width) of the pixel tensors produced.
    pub fn crop_size(&self) -> (usize, usize) {
        self.images.crop_size()
    }

    pub fn max_text_tokens(&self) -> usize {
        self.tokenizer.max_len()
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// Token ids for `text` (special tokens included).
    pub fn tokenize(&self, text: &str, truncate: bool) -> Result<Vec<u32>, PreprocessError> {
        self.tokenizer.encode(text, truncate)
    }

    /// Pixel values for encoded image bytes.
    pub fn image_pixels(&self, bytes: &[u8]) -> Result<(Pixels, Size), PreprocessError> {
        let decoded = decode_image(bytes, &self.limits)?;
        let size = Size::new(decoded.width(), decoded.height());
        Ok((self.images.preprocess(&decoded.to_rgb8()), size))
    }

    /// The limits images are decoded under.
    pub fn image_limits(&self) -> &ImageLimits {
        &self.limits
    }

    /// Replaces the limits images are decoded under.
    pub fn set_image_limits(&mut self, limits: ImageLimits) {
        self.limits = limits;
    }

    /// Turns one input into model-ready numbers.
    pub fn prepare(&self, input: &Input, truncate: bool) -> Result<Prepared, PreprocessError> {
        let modality = input.modality().ok_or(PreprocessError::EmptyInput)?;
        let token_ids = match &input.text {
            Some(t) if t.trim().is_empty() => return Err(PreprocessError::EmptyText),
            Some(t) => Some(self.tokenize(t, truncate)?),
            None => None,
        };
        let (pixels, image_size) = match &input.image {
            Some(bytes) => {
                let (p, size) = self.image_pixels(bytes)?;
                (Some(p), Some(size))
            }
            None => (None, None),
        };
        let text_tokens = token_ids.as_ref().map_or(0, |t| t.len());
        // An image costs about as much as a text of ~8x its patch count would;
        // we count it as the pixel rows it carries, texts as their tokens.
        let cost = text_tokens + pixels.as_ref().map_or(0, |p| p.tiles * p.height);
        Ok(Prepared {
            modality,
            token_ids,
            pixels,
            image_size,
            text_tokens,
            cost: cost.max(1),
        })
    }
}
