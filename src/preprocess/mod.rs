//! Preprocessing: turns an [`Input`] into a model-ready [`Prepared`] item.
//!
//! Owns the interface every model family's preprocessing implements
//! ([`Preprocess`], typed by the family's [`PreparedData`]; batching runs it
//! as a [`Preprocessor`] trait object), the shared tools families build
//! theirs from (decoding untrusted images under limits, Pillow-exact
//! resampling, transformers' `CLIPImageProcessor`, tokenization), and the
//! errors ([`PreprocessError`] for a client's input, [`SetupError`] for a
//! model's preprocessing files). Produces plain vectors, never tensors, so it
//! runs on any thread pool. It knows nothing of HTTP, queues, devices, or of
//! any one family (each family's preprocessor lives in its module under
//! `models/`).
//!
//! Layout: [`prepared`] (the items and their cache keys), [`image`]
//! (decoding), [`resize`], [`clip_image`], [`text`], [`size`].

pub mod clip_image;
pub mod image;
pub mod prepared;
pub mod resize;
pub mod size;
pub mod text;

use std::any::Any;
use std::path::PathBuf;
use std::sync::Arc;

use crate::input::Input;
use image::ImageLimits;
pub use image::RequestImagesError;
pub use prepared::{Key, KeySink, Pixels, Prepared, PreparedData};
pub use size::{PixelBounds, Size};

/// Why an input could not be preprocessed. Every variant is the client's
/// fault except [`PreprocessError::Tokenizer`], [`PreprocessError::Prompt`]
/// and [`PreprocessError::Internal`].
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
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
    /// The image alone (with the prompt around it) makes more tokens than
    /// the model takes: cutting the text cannot help.
    #[error("the prompt is {tokens} tokens long, {image_tokens} of them for the image, over the model's limit of {limit} tokens (max_input_tokens; a smaller image makes fewer tokens)")]
    ImageTokens {
        tokens: usize,
        image_tokens: usize,
        limit: usize,
    },
    /// The prompt made around the text and instruction would be larger
    /// than a prompt may be, in bytes (checked while it is made, before it
    /// is tokenised).
    #[error(
        "the prompt made of the text and instruction would be over the limit of {limit} bytes"
    )]
    PromptTooLarge { limit: usize },
    /// The tokenizer failed on a text it should take.
    #[error("the tokenizer failed: {0}")]
    Tokenizer(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The model's prompt template failed on an input it should take (the
    /// model's files are at fault).
    #[error("cannot make the model's prompt: {0}")]
    Prompt(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Preprocessing stopped for a reason of the server's (a panic).
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

/// Why a model's preprocessing files (tokenizer, processor configs) cannot
/// be used: the model's files are wrong, not a client's input.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid {}: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot load tokenizer {}: {source}", path.display())]
    Tokenizer {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A value of `file` that parses but cannot be used.
    #[error("invalid {file}: {message}")]
    Invalid { file: String, message: String },
    /// A prompt template of `file` that does not compile.
    #[error("the prompt template of {file} does not compile: {source}")]
    Template {
        file: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The files do not fit the model (or each other).
    #[error("{0}")]
    Mismatch(String),
}

impl SetupError {
    /// [`SetupError::Invalid`] for `file` (a path or a file name).
    pub fn invalid(file: impl std::fmt::Display, message: impl std::fmt::Display) -> Self {
        SetupError::Invalid {
            file: file.to_string(),
            message: message.to_string(),
        }
    }

    /// Reads a JSON file.
    pub fn read_json(path: &std::path::Path) -> Result<serde_json::Value, SetupError> {
        let text = std::fs::read_to_string(path).map_err(|source| SetupError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| SetupError::Json {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// One model family's preprocessing, typed by the data it makes (which the
/// family's model reads). A family implements this; batching runs it through
/// [`Preprocessor`] (see [`erase`]).
pub trait Preprocess: Clone + Send + Sync + 'static {
    type Data: PreparedData;

    /// Validates and converts one input. `truncate` decides what happens to
    /// a text longer than the model's limit.
    fn prepare(
        &self,
        input: &Input,
        truncate: bool,
    ) -> Result<Prepared<Self::Data>, PreprocessError>;

    /// The limits images are decoded under.
    fn image_limits(&self) -> &ImageLimits;

    /// Replaces the limits images are decoded under.
    fn set_image_limits(&mut self, limits: ImageLimits);

    /// The prompt template inputs are wrapped in (for the model
    /// fingerprint), `None` when there is none.
    fn prompt_template(&self) -> Option<String> {
        None
    }

    /// The name of the prompt format inputs follow, for families that
    /// offer a choice (`/info`), `None` for the others.
    fn prompt_format(&self) -> Option<&'static str> {
        None
    }

    /// The bounds images are resized into, for families whose processed
    /// image size follows the image (`/info`, the fingerprint), `None` for
    /// the others.
    fn pixel_bounds(&self) -> Option<PixelBounds> {
        None
    }
}

/// Any family's preprocessing, as batching, the probes and the CLI run it.
pub trait Preprocessor: Send + Sync {
    /// [`Preprocess::prepare`], its result erased.
    fn prepare(&self, input: &Input, truncate: bool) -> Result<Prepared, PreprocessError>;

    /// The limits images are decoded under.
    fn image_limits(&self) -> &ImageLimits;

    /// A copy that decodes images under `limits`: for inputs the server
    /// makes itself (the startup probes), which must not depend on how
    /// tightly the operator limits clients' images.
    fn with_image_limits(&self, limits: ImageLimits) -> Arc<dyn Preprocessor>;

    /// [`Preprocess::prompt_template`].
    fn prompt_template(&self) -> Option<String>;

    /// [`Preprocess::prompt_format`].
    fn prompt_format(&self) -> Option<&'static str>;

    /// [`Preprocess::pixel_bounds`].
    fn pixel_bounds(&self) -> Option<PixelBounds>;

    /// The family's own preprocessor, for callers that know the family
    /// (tests, tools): `downcast_ref` it.
    fn as_any(&self) -> &dyn Any;
}

impl<'a> dyn Preprocessor + 'a {
    /// The decode budget of one request, from the images' headers alone,
    /// before any is decoded (see [`image::check_request_images`]): call it
    /// with every input of the request before preprocessing any. Images are
    /// reported by their input's index.
    pub fn check_request_inputs(&self, inputs: &[Input]) -> Result<u64, RequestImagesError> {
        image::check_request_images(
            inputs
                .iter()
                .enumerate()
                .filter_map(|(index, input)| input.image_part().map(|b| (index, b.as_slice()))),
            self.image_limits(),
        )
    }

    /// The family's preprocessor, when it is a `P`.
    pub fn downcast<P: 'static>(&self) -> Option<&P> {
        self.as_any().downcast_ref::<P>()
    }
}

/// A family's [`Preprocess`] as a [`Preprocessor`].
pub fn erase<P: Preprocess>(p: P) -> Arc<dyn Preprocessor> {
    Arc::new(Erased(p))
}

/// The one place a typed preprocessor's output is erased.
struct Erased<P>(P);

impl<P: Preprocess> Preprocessor for Erased<P> {
    fn prepare(&self, input: &Input, truncate: bool) -> Result<Prepared, PreprocessError> {
        self.0.prepare(input, truncate).map(Prepared::erase)
    }

    fn image_limits(&self) -> &ImageLimits {
        self.0.image_limits()
    }

    fn with_image_limits(&self, limits: ImageLimits) -> Arc<dyn Preprocessor> {
        let mut p = self.0.clone();
        p.set_image_limits(limits);
        erase(p)
    }

    fn prompt_template(&self) -> Option<String> {
        self.0.prompt_template()
    }

    fn prompt_format(&self) -> Option<&'static str> {
        self.0.prompt_format()
    }

    fn pixel_bounds(&self) -> Option<PixelBounds> {
        self.0.pixel_bounds()
    }

    fn as_any(&self) -> &dyn Any {
        &self.0
    }
}

/// Shared by the unit tests of the image modules.
#[cfg(test)]
pub(crate) mod testing {
    /// One xorshift32 step.
    fn step(state: &mut u32) -> u32 {
        *state ^= *state << 13;
        *state ^= *state >> 17;
        *state ^= *state << 5;
        *state
    }

    /// A xorshift generator of numbers below `n` (0 when `n` is 0): the
    /// tests' fuzz loops, reproducible from `seed`.
    pub fn xorshift(seed: u32) -> impl FnMut(usize) -> usize {
        let mut state = seed;
        move |n| step(&mut state) as usize % n.max(1)
    }

    /// `n` pseudo-random bytes from `seed` (the generator the Pillow
    /// digests of the resize tests were computed with: the top byte of each
    /// xorshift32 step).
    pub fn noise(n: usize, seed: u32) -> Vec<u8> {
        let mut state = seed.max(1);
        (0..n).map(|_| (step(&mut state) >> 24) as u8).collect()
    }
}
