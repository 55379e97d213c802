//! Preprocessing: turns an [`Input`](crate::input::Input) into model-ready numbers.
//!
//! Owns: image decoding (with limits), PIL-compatible RGB conversion and bicubic
//! resizing, the CLIP image processor, and tokenization. Produces
//! [`Prepared`] items made of plain vectors (token ids, pixel values), never
//! candle tensors, so it can run on any thread pool. It knows nothing of HTTP,
//! of queues or of devices.

pub mod anyres;
pub mod clip;
pub mod clip_image;
pub mod image;
pub mod llava;
pub mod qwen_vl;
pub mod resize;
pub mod text;

use crate::input::{Input, Modality};
pub use anyres::Size;
pub use clip::ClipPreprocessor;
use image::ImageLimits;
pub use image::RequestImagesError;
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
    InvalidImage(#[source] ImageProblem),
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

impl PreprocessError {
    /// [`PreprocessError::InvalidImage`] with a message and no underlying error.
    pub fn invalid_image(message: impl Into<String>) -> Self {
        PreprocessError::InvalidImage(ImageProblem::new(message))
    }

    /// [`PreprocessError::InvalidImage`] caused by a decoder's error, which
    /// is kept as the error's source.
    pub fn invalid_image_caused(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        PreprocessError::InvalidImage(ImageProblem::caused(message, source))
    }
}

/// Why an image was refused: a message for the client (complete on its
/// own, decoder details included) and, when a decoder reported it, the
/// decoder's error as the [`source`](std::error::Error::source).
#[derive(Debug)]
pub struct ImageProblem {
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ImageProblem {
    /// A problem found by vlembed itself.
    pub fn new(message: impl Into<String>) -> Self {
        ImageProblem {
            message: message.into(),
            source: None,
        }
    }

    /// A problem a decoder reported as `source`.
    pub fn caused(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        ImageProblem {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }
}

impl std::fmt::Display for ImageProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ImageProblem {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl std::ops::Deref for ImageProblem {
    type Target = str;
    fn deref(&self) -> &str {
        &self.message
    }
}

impl From<&str> for ImageProblem {
    fn from(message: &str) -> Self {
        ImageProblem::new(message)
    }
}

impl From<String> for ImageProblem {
    fn from(message: String) -> Self {
        ImageProblem::new(message)
    }
}

/// The message of a configuration error: `file` (a model file) is wrong, not
/// the client's input. The one place the wording lives; the CLIP image
/// processor wraps it in [`PreprocessError::Internal`], the LLaVA loader
/// returns it as its load error.
pub(crate) fn config_error(file: impl std::fmt::Display, msg: impl std::fmt::Display) -> String {
    format!("invalid {file}: {msg}")
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
    /// Size of the image as the image processor saw it, for models that need it.
    pub image_size: Option<Size>,
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
    /// The image limits this model's inputs are decoded under.
    pub fn image_limits(&self) -> &ImageLimits {
        match self {
            Preprocessor::Clip(p) => p.image_limits(),
            Preprocessor::Llava(p) => p.image_limits(),
        }
    }

    /// A copy of this preprocessor that decodes images under `limits`: for
    /// inputs the server makes itself (the startup probes), which must not
    /// depend on how tightly the operator limits clients' images.
    pub fn with_image_limits(&self, limits: ImageLimits) -> Self {
        let mut p = self.clone();
        match &mut p {
            Preprocessor::Clip(c) => c.set_image_limits(limits),
            Preprocessor::Llava(l) => l.set_image_limits(limits),
        }
        p
    }

    /// The decode budget of one request, from the images' headers alone,
    /// before any is decoded (see [`image::check_request_images`]): call it
    /// with every `(input index, image bytes)` of the request before
    /// preprocessing any input.
    pub fn check_request_images<'a>(
        &self,
        images: impl IntoIterator<Item = (usize, &'a [u8])>,
    ) -> Result<u64, RequestImagesError> {
        image::check_request_images(images, self.image_limits())
    }

    /// [`Preprocessor::check_request_images`] over a request's inputs: the
    /// images of `inputs`, each reported by its input's index.
    pub fn check_request_inputs(&self, inputs: &[Input]) -> Result<u64, RequestImagesError> {
        self.check_request_images(
            inputs
                .iter()
                .enumerate()
                .filter_map(|(index, input)| input.image.as_deref().map(|bytes| (index, bytes))),
        )
    }

    /// The prompt template the model's inputs are wrapped in (for the model
    /// fingerprint), `None` when there is none (CLIP embeds texts as given).
    pub fn prompt_template(&self) -> Option<String> {
        match self {
            Preprocessor::Clip(_) => None,
            Preprocessor::Llava(_) => Some(llava::prompt_template()),
        }
    }

    /// Validates and converts one input. `truncate` decides what happens to a
    /// text longer than the model's limit.
    pub fn prepare(&self, input: &Input, truncate: bool) -> Result<Prepared, PreprocessError> {
        match self {
            Preprocessor::Clip(p) => p.prepare(input, truncate),
            Preprocessor::Llava(p) => p.prepare(input, truncate),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let img = ::image::DynamicImage::ImageLuma8(::image::GrayImage::new(width, height));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, ::image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    /// The request budget sees every input's image, by input index, and
    /// uses the model's limits.
    #[test]
    fn request_inputs_are_checked_by_input_index() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip-tiny");
        let limits = ImageLimits {
            max_request_pixels: 150,
            ..ImageLimits::default()
        };
        let pre = Preprocessor::Clip(
            ClipPreprocessor::load(
                &dir.join("tokenizer.json"),
                &dir.join("preprocessor_config.json"),
                77,
                limits,
            )
            .unwrap(),
        );
        assert_eq!(pre.image_limits().max_request_pixels, 150);
        let one = vec![Input::text("a cat"), Input::image(png(10, 10))];
        assert_eq!(pre.check_request_inputs(&one).unwrap(), 100);
        let two = vec![
            Input::text("a cat"),
            Input::image(png(10, 10)),
            Input::image(png(10, 10)),
        ];
        assert!(matches!(
            pre.check_request_inputs(&two),
            Err(RequestImagesError::OverBudget {
                images: 2,
                pixels: 200,
                limit: 150
            })
        ));
        let bad = vec![Input::text("a cat"), Input::image(b"junk".to_vec())];
        assert!(matches!(
            pre.check_request_inputs(&bad),
            Err(RequestImagesError::Image { index: 1, .. })
        ));
    }
}
