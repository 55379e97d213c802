//! The BGE-VL-CLIP processor: text through the CLIP tokenizer, images through
//! [`ClipImageProcessor`], into [`ClipInput`]. Instructions and roles do not
//! change CLIP inputs.

use std::path::Path;

use crate::input::{Content, Input};
use crate::preprocess::clip_image::ClipImageProcessor;
use crate::preprocess::image::{decode_image, ImageLimits};
use crate::preprocess::text::TextTokenizer;
use crate::preprocess::{
    Key, Pixels, Prepared, PreparedData, Preprocess, PreprocessError, SetupError, Size,
};

/// What CLIP embeds for one input: its text's token ids, its image's pixels
/// (one `3 x S x S` tile), or both (a composed input: the sum of the two
/// embeddings).
#[derive(Debug, Clone, PartialEq)]
pub enum ClipInput {
    Text(Vec<u32>),
    Image(Pixels),
    Composed { ids: Vec<u32>, pixels: Pixels },
}

impl ClipInput {
    /// The text's token ids, if any.
    pub fn ids(&self) -> Option<&[u32]> {
        match self {
            ClipInput::Text(ids) | ClipInput::Composed { ids, .. } => Some(ids),
            ClipInput::Image(_) => None,
        }
    }

    /// The image's pixels, if any.
    pub fn pixels(&self) -> Option<&Pixels> {
        match self {
            ClipInput::Image(p) | ClipInput::Composed { pixels: p, .. } => Some(p),
            ClipInput::Text(_) => None,
        }
    }

    /// The input of `ids` and/or `pixels` (`None` when neither is given).
    pub fn from_parts(ids: Option<Vec<u32>>, pixels: Option<Pixels>) -> Option<Self> {
        match (ids, pixels) {
            (Some(ids), None) => Some(ClipInput::Text(ids)),
            (None, Some(p)) => Some(ClipInput::Image(p)),
            (Some(ids), Some(pixels)) => Some(ClipInput::Composed { ids, pixels }),
            (None, None) => None,
        }
    }
}

impl PreparedData for ClipInput {
    fn write_key(&self, key: &mut Key<'_>) {
        key.tag("clip");
        match self.ids() {
            Some(ids) => {
                key.tag("ids");
                key.ids(ids);
            }
            None => key.tag("no-ids"),
        }
        match self.pixels() {
            Some(p) => p.write_key(key),
            None => key.tag("no-pixels"),
        }
    }
}

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
    ) -> Result<Self, SetupError> {
        let tokenizer = TextTokenizer::from_file(tokenizer, max_tokens)?;
        let images = ClipImageProcessor::from_file(preprocessor_config)?;
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

    /// An input's text: refused when blank (CLIP would embed the special
    /// tokens alone).
    fn text_ids(&self, text: &str, truncate: bool) -> Result<Vec<u32>, PreprocessError> {
        if text.trim().is_empty() {
            return Err(PreprocessError::EmptyText);
        }
        self.tokenize(text, truncate)
    }

    /// Pixel values for encoded image bytes, and the decoded image's size.
    pub fn image_pixels(&self, bytes: &[u8]) -> Result<(Pixels, Size), PreprocessError> {
        let decoded = decode_image(bytes, &self.limits)?;
        let size = Size::new(decoded.width(), decoded.height());
        Ok((self.images.preprocess(&decoded.to_rgb8()), size))
    }
}

impl Preprocess for ClipPreprocessor {
    type Data = ClipInput;

    /// The text first: a text that cannot be embedded is refused before
    /// its image is decoded.
    fn prepare(
        &self,
        input: &Input,
        truncate: bool,
    ) -> Result<Prepared<ClipInput>, PreprocessError> {
        let data = match &input.content {
            Content::Text(t) => ClipInput::Text(self.text_ids(t, truncate)?),
            Content::Image(bytes) => ClipInput::Image(self.image_pixels(bytes)?.0),
            Content::Composed { text, image } => ClipInput::Composed {
                ids: self.text_ids(text, truncate)?,
                pixels: self.image_pixels(image)?.0,
            },
        };
        let text_tokens = data.ids().map_or(0, <[u32]>::len);
        // An image costs about as much as a text of ~8x its patch count would;
        // we count it as the pixel rows it carries, texts as their tokens.
        let cost = text_tokens + data.pixels().map_or(0, |p| p.tiles * p.height);
        Ok(Prepared::new(input.modality(), text_tokens, cost, data))
    }

    fn image_limits(&self) -> &ImageLimits {
        &self.limits
    }

    fn set_image_limits(&mut self, limits: ImageLimits) {
        self.limits = limits;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess::{erase, RequestImagesError};

    fn png(width: u32, height: u32) -> Vec<u8> {
        let img = ::image::DynamicImage::ImageLuma8(::image::GrayImage::new(width, height));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, ::image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    fn fixture(limits: ImageLimits) -> ClipPreprocessor {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip-tiny");
        ClipPreprocessor::load(
            &dir.join("tokenizer.json"),
            &dir.join("preprocessor_config.json"),
            77,
            limits,
        )
        .unwrap()
    }

    /// The request budget sees every input's image, by input index, and
    /// uses the model's limits.
    #[test]
    fn request_inputs_are_checked_by_input_index() {
        let limits = ImageLimits {
            max_request_pixels: 150,
            ..ImageLimits::default()
        };
        let pre = erase(fixture(limits));
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
        let loose = pre.with_image_limits(ImageLimits::default());
        assert!(loose.check_request_inputs(&two).is_ok());
        assert!(loose.downcast::<ClipPreprocessor>().is_some());
    }

    #[test]
    fn inputs_become_their_own_kind_of_data() {
        let pre = fixture(ImageLimits::default());
        let text = pre.prepare(&Input::text("a cat"), true).unwrap();
        assert!(matches!(*text.data, ClipInput::Text(_)));
        assert_eq!(text.cost, text.text_tokens);
        let both = Input::new(Content::Composed {
            text: "a cat".into(),
            image: png(20, 10),
        });
        let both = pre.prepare(&both, true).unwrap();
        let ClipInput::Composed { ids, pixels } = &*both.data else {
            panic!("{:?}", both.data)
        };
        assert_eq!(ids.len(), both.text_tokens);
        assert_eq!(both.cost, ids.len() + pixels.height);
        let e = pre.prepare(&Input::text("  "), true).unwrap_err();
        assert!(matches!(e, PreprocessError::EmptyText), "{e}");
    }
}
