//! Decoding untrusted image bytes the way Pillow sees them.
//!
//! Owns: [`ImageLimits`] and [`decode_image`] (JPEG, PNG, WebP, GIF (first
//! frame), BMP, TIFF, with the size checked from the header before any pixel
//! buffer is allocated), and [`DecodedImage`], which keeps Pillow's "mode" of
//! the image ([`PilMode`]) so that later steps can reproduce Pillow exactly:
//!
//! * [`DecodedImage::to_rgb8`] is `Image.open(f).convert("RGB")`: alpha is
//!   dropped (not composited), grey is replicated, palettes are expanded,
//!   16-bit greyscale is clipped to 255, other 16-bit images keep their high
//!   byte. EXIF orientation is not applied, colour profiles are ignored.
//! * [`DecodedImage::resize_like_pil`] is `Image.resize(size)` (default
//!   bicubic) in the image's own mode, for pipelines that resize before
//!   converting to RGB: palette and bilevel images resize with nearest
//!   neighbour, images with alpha resize premultiplied.
//!
//! Pixel decoding is done by the `image` crate, except GIF, which is decoded
//! from its palette indices (with the `gif` crate) to reproduce how Pillow
//! builds the first frame, and greyscale and YCbCr/RGB JPEG, which are decoded
//! by libjpeg-turbo's code (as vendored by `mozjpeg`, with libjpeg's default
//! integer IDCT and "fancy" upsampling) so the pixels are exactly Pillow's. What Pillow would call the mode is read from the
//! file headers where the `image` crate does not report it (PNG colour type,
//! BMP palette, GIF palette).
//!
//! Known differences from Pillow, all in the pixel decoders:
//!
//! * CMYK JPEG (decoded by zune-jpeg through the `image` crate) and CMYK TIFF
//!   are converted to RGB by the decoder (JPEG: up to one level from Pillow);
//!   a CMYK image is resized in RGB rather than CMYK. (zune-jpeg is not used
//!   for other JPEGs: its IDCT rounding and chroma upsampling differ from
//!   libjpeg's by up to ~12 levels at sharp colour edges.)
//! * TIFF palette and grey+alpha images are not supported by the decoder.
//!
//! PNG, GIF, BMP, WebP (lossy and lossless) and the other TIFF layouts
//! decode to exactly Pillow's pixels.

//!
//! Layout: [`sniff`] reads what Pillow would call the mode from the file
//! headers, [`gif`] and [`jpeg`] hold the decoders that replace the `image`
//! crate's for those formats, and [`convert`] rearranges decoded samples
//! into Pillow's modes and converts/resizes them.

mod convert;
mod gif;
mod jpeg;
mod sniff;

use std::io::Cursor;

use image::{
    DynamicImage, GrayAlphaImage, GrayImage, ImageBuffer, ImageDecoder, ImageError, ImageFormat,
    ImageReader, Luma, RgbImage, RgbaImage,
};

use super::{PreprocessError, Size};
use convert::{bands_for_mode, mode_from_color, rescale_bmp16};
use sniff::{bmp16_widths, bmp_mode, jpeg_components, png_mode};

/// A 16-bit greyscale image (Pillow's `I;16`).
pub type Gray16Image = ImageBuffer<Luma<u16>, Vec<u16>>;

/// Resource limits for decoding untrusted images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Most pixels (width x height) an image may have. Checked from the
    /// header, before decoding.
    pub max_pixels: u64,
    /// Longest width or height accepted, in pixels.
    pub max_side: u32,
    /// Most bytes the decoder may allocate (the pixel buffer included; for
    /// JPEG also libjpeg's whole-image coefficient buffer).
    pub max_alloc_bytes: u64,
    /// Most pixels the images of one request may declare in all (the sum of
    /// their header sizes), checked by [`check_request_images`] before any
    /// of them is decoded.
    pub max_request_pixels: u64,
    /// Most scans a JPEG may have (a progressive JPEG makes a pass over all
    /// its coefficients per scan; real files have about ten).
    pub max_jpeg_scans: usize,
    /// Accept a JPEG whose scan data stops short of the image (libjpeg's
    /// "premature end of data segment"), painting the rest grey as Pillow
    /// does. Off by default: such a file can claim 40 megapixels in a few
    /// hundred bytes.
    pub allow_incomplete_jpeg: bool,
}

impl Default for ImageLimits {
    /// 40 megapixels per image and 100 megapixels per request, 32768
    /// pixels per side, 512 MiB of decoder memory, 100 JPEG scans,
    /// incomplete JPEG scans refused.
    fn default() -> Self {
        ImageLimits {
            max_pixels: 40_000_000,
            max_side: 32_768,
            max_alloc_bytes: 512 * 1024 * 1024,
            max_request_pixels: 100_000_000,
            max_jpeg_scans: 100,
            allow_incomplete_jpeg: false,
        }
    }
}

/// Pillow's mode of a decoded image (`Image.mode`), which decides how Pillow
/// resizes it and converts it to RGB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PilMode {
    /// `1`: bilevel (stored as 0 / 255). Resized with nearest neighbour.
    Bilevel,
    /// `L`: 8-bit greyscale.
    L,
    /// `LA`: 8-bit greyscale with alpha.
    La,
    /// `P`: palette. Stored here with the palette already expanded to RGB;
    /// resized with nearest neighbour, which commutes with the expansion.
    P,
    /// `RGB`: 8-bit colour (also what Pillow makes of 16-bit RGB PNG/TIFF).
    Rgb,
    /// `RGBA`: 8-bit colour with alpha (also 16-bit RGBA and grey+alpha PNG).
    Rgba,
    /// `I;16`: 16-bit greyscale.
    I16,
    /// `CMYK` (JPEG, TIFF). The decoder converts it to RGB, so it is stored
    /// and resized as RGB.
    Cmyk,
}

impl PilMode {
    /// The mode's name as Pillow spells it (`"1"`, `"L"`, `"RGB"`, `"I;16"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            PilMode::Bilevel => "1",
            PilMode::L => "L",
            PilMode::La => "LA",
            PilMode::P => "P",
            PilMode::Rgb => "RGB",
            PilMode::Rgba => "RGBA",
            PilMode::I16 => "I;16",
            PilMode::Cmyk => "CMYK",
        }
    }
}

/// The samples of a decoded image, in the layout Pillow keeps for its mode.
#[derive(Debug, Clone)]
enum Bands {
    /// Modes `1` and `L`.
    Gray(GrayImage),
    /// Mode `LA`.
    GrayAlpha(GrayAlphaImage),
    /// Modes `RGB`, `P` (expanded) and `CMYK` (converted by the decoder).
    Rgb(RgbImage),
    /// Mode `RGBA`.
    Rgba(RgbaImage),
    /// Mode `I;16`.
    Gray16(Gray16Image),
}

/// An image decoded from untrusted bytes, with Pillow's mode.
#[derive(Debug, Clone)]
pub struct DecodedImage {
    format: ImageFormat,
    mode: PilMode,
    bands: Bands,
}

/// The formats [`decode_image`] accepts.
const SUPPORTED: &str = "JPEG, PNG, WebP, GIF, BMP, TIFF";

/// Decodes an image (JPEG, PNG, WebP, GIF (first frame), BMP, TIFF) from
/// untrusted bytes.
///
/// The dimensions are read from the header and checked against `limits`
/// before the pixels are decoded: an image with too many pixels gives
/// [`PreprocessError::ImageTooLarge`]. Unrecognised, unsupported, corrupt or
/// truncated data gives [`PreprocessError::InvalidImage`], as does a side
/// longer than `limits.max_side` or a decoder needing more than
/// `limits.max_alloc_bytes`.
pub fn decode_image(bytes: &[u8], limits: &ImageLimits) -> Result<DecodedImage, PreprocessError> {
    // The decoders are third-party code fed untrusted bytes: should one of
    // them panic on malformed data, report the image as invalid instead of
    // unwinding through the caller. Nothing is shared with the closure but
    // the input slice and the limits, so no broken state can leak out.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        decode_unguarded(bytes, limits)
    }))
    .unwrap_or_else(|_| {
        Err(PreprocessError::invalid_image(
            "the image decoder failed on malformed data",
        ))
    })
}

fn decode_unguarded(bytes: &[u8], limits: &ImageLimits) -> Result<DecodedImage, PreprocessError> {
    let format = recognise(bytes)?;
    match format {
        ImageFormat::Gif => gif::decode_gif(bytes, limits),
        ImageFormat::Jpeg if matches!(jpeg_components(bytes), Some(1 | 3)) => {
            jpeg::decode_jpeg_libjpeg(bytes, limits)
        }
        ImageFormat::Jpeg
        | ImageFormat::Png
        | ImageFormat::WebP
        | ImageFormat::Bmp
        | ImageFormat::Tiff => decode_with_image_crate(bytes, format, limits),
        other => Err(unsupported(other)),
    }
}

/// The size an image's header declares, read without decoding any pixel
/// data: the frame header of a JPEG, IHDR of a PNG, the logical screen (grown
/// by the first frame) of a GIF, the first IFD of a TIFF, the header of a
/// BMP or WebP. Errs like [`decode_image`] on data it cannot recognise.
pub fn header_size(bytes: &[u8]) -> Result<Size, PreprocessError> {
    // Header parsers are third-party code too: contain their panics.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        header_size_unguarded(bytes)
    }))
    .unwrap_or_else(|_| {
        Err(PreprocessError::invalid_image(
            "the image decoder failed on a malformed header",
        ))
    })
}

fn header_size_unguarded(bytes: &[u8]) -> Result<Size, PreprocessError> {
    let format = recognise(bytes)?;
    match format {
        ImageFormat::Gif => gif::canvas_size(bytes),
        ImageFormat::Jpeg => match sniff::jpeg_info(bytes) {
            Some(info) => Ok(Size::new(info.width, info.height)),
            None => Err(PreprocessError::invalid_image(
                "JPEG data has no readable frame header",
            )),
        },
        ImageFormat::Png | ImageFormat::WebP | ImageFormat::Bmp | ImageFormat::Tiff => {
            let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
            let mut header_limits = image::Limits::default();
            header_limits.max_alloc = Some(HEADER_ALLOC_BYTES);
            reader.limits(header_limits);
            let decoder = reader.into_decoder().map_err(|e| decode_error(format, e))?;
            let (width, height) = decoder.dimensions();
            Ok(Size::new(width, height))
        }
        other => Err(unsupported(other)),
    }
}

/// Memory a header parser may use (TIFF directories, WebP chunk tables).
const HEADER_ALLOC_BYTES: u64 = 16 * 1024 * 1024;

/// Why the images of a request were refused before any was decoded.
#[derive(Debug, thiserror::Error)]
pub enum RequestImagesError {
    /// One image is unreadable or over the per-image limits: the request
    /// stops at it.
    #[error("{source}")]
    Image {
        /// The caller's index of the image (its input's position).
        index: usize,
        #[source]
        source: PreprocessError,
    },
    /// The images declare more pixels in all than one request may decode.
    #[error(
        "the request's images declare at least {pixels} pixels in all (the first {images} of them), over the per-request budget of {limit} pixels (max_request_image_pixels)"
    )]
    OverBudget {
        /// Images counted when the budget ran out.
        images: usize,
        /// Pixels declared by those images.
        pixels: u64,
        /// The budget (`max_request_pixels`).
        limit: u64,
    },
}

/// The decode budget of a request, checked from headers alone before any
/// image is decoded: every image's header must be readable and within the
/// per-image limits, and the images' declared pixels must sum to at most
/// `limits.max_request_pixels`. Stops at the first image that fails either.
///
/// `images` yields `(index, bytes)` pairs; the index (the input's position
/// in the request) is what [`RequestImagesError::Image`] reports. Returns the
/// total number of pixels declared. Costs a header parse per image (a walk
/// over the markers for JPEG), no pixel decoding.
pub fn check_request_images<'a>(
    images: impl IntoIterator<Item = (usize, &'a [u8])>,
    limits: &ImageLimits,
) -> Result<u64, RequestImagesError> {
    let mut total = 0u64;
    for (counted, (index, bytes)) in images.into_iter().enumerate() {
        let size = header_size(bytes)
            .and_then(|size| check_size(size.width, size.height, limits).map(|()| size))
            .map_err(|source| RequestImagesError::Image { index, source })?;
        total = total.saturating_add(size.pixels());
        if total > limits.max_request_pixels {
            return Err(RequestImagesError::OverBudget {
                images: counted + 1,
                pixels: total,
                limit: limits.max_request_pixels,
            });
        }
    }
    Ok(total)
}

/// The format of `bytes`, from its signature.
fn recognise(bytes: &[u8]) -> Result<ImageFormat, PreprocessError> {
    image::guess_format(bytes).map_err(|_| {
        PreprocessError::invalid_image(format!(
            "unrecognised image format (supported: {SUPPORTED})"
        ))
    })
}

fn unsupported(format: ImageFormat) -> PreprocessError {
    PreprocessError::invalid_image(format!(
        "unsupported image format {} (supported: {SUPPORTED})",
        format_name(format)
    ))
}

fn format_name(format: ImageFormat) -> String {
    match format {
        ImageFormat::Jpeg => "JPEG".into(),
        ImageFormat::Png => "PNG".into(),
        ImageFormat::WebP => "WebP".into(),
        ImageFormat::Gif => "GIF".into(),
        ImageFormat::Bmp => "BMP".into(),
        ImageFormat::Tiff => "TIFF".into(),
        other => other
            .extensions_str()
            .first()
            .map_or_else(|| format!("{other:?}"), |ext| ext.to_ascii_uppercase()),
    }
}

/// Checks the header dimensions against the limits.
fn check_size(width: u32, height: u32, limits: &ImageLimits) -> Result<(), PreprocessError> {
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_pixels {
        return Err(PreprocessError::ImageTooLarge {
            width,
            height,
            pixels,
            limit: limits.max_pixels,
        });
    }
    if width > limits.max_side || height > limits.max_side {
        return Err(PreprocessError::invalid_image(format!(
            "image is {width}x{height}, a side is over the limit of {} pixels",
            limits.max_side
        )));
    }
    if width == 0 || height == 0 {
        return Err(PreprocessError::invalid_image(format!(
            "image is {width}x{height}: it has no pixels"
        )));
    }
    Ok(())
}

/// Maps a decoder error to a client-facing one.
fn decode_error(format: ImageFormat, err: ImageError) -> PreprocessError {
    let name = format_name(format);
    let message = match &err {
        ImageError::Limits(e) => {
            format!("{name} image needs more resources than allowed to decode: {e}")
        }
        ImageError::Unsupported(e) => format!("unsupported {name} image: {e}"),
        ImageError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            format!("{name} data is truncated (image file is truncated)")
        }
        other => format!("cannot decode {name} data: {other}"),
    };
    PreprocessError::invalid_image_caused(message, err)
}

fn decode_with_image_crate(
    bytes: &[u8],
    format: ImageFormat,
    limits: &ImageLimits,
) -> Result<DecodedImage, PreprocessError> {
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_alloc = Some(limits.max_alloc_bytes);
    decoder_limits.max_image_width = None;
    decoder_limits.max_image_height = None;
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(decoder_limits.clone());
    // Only parses the header.
    let mut decoder = reader.into_decoder().map_err(|e| decode_error(format, e))?;
    let (width, height) = decoder.dimensions();
    check_size(width, height, limits)?;
    let original = decoder.original_color_type();

    decoder_limits.max_image_width = Some(limits.max_side);
    decoder_limits.max_image_height = Some(limits.max_side);
    decoder_limits
        .reserve(decoder.total_bytes())
        .map_err(|e| decode_error(format, e))?;
    decoder
        .set_limits(decoder_limits)
        .map_err(|e| decode_error(format, e))?;
    let img = DynamicImage::from_decoder(decoder).map_err(|e| decode_error(format, e))?;

    let mode = match format {
        ImageFormat::Png => png_mode(bytes).unwrap_or_else(|| mode_from_color(&img)),
        ImageFormat::Bmp => bmp_mode(bytes).unwrap_or_else(|| mode_from_color(&img)),
        ImageFormat::Jpeg if jpeg_components(bytes) == Some(4) => PilMode::Cmyk,
        ImageFormat::Jpeg | ImageFormat::Tiff => match original {
            image::ExtendedColorType::Cmyk8 | image::ExtendedColorType::Cmyk16 => PilMode::Cmyk,
            image::ExtendedColorType::L1 => PilMode::Bilevel,
            _ => mode_from_color(&img),
        },
        _ => mode_from_color(&img),
    };
    let mut bands = bands_for_mode(mode, img).map_err(|what| {
        PreprocessError::invalid_image(format!("unsupported {} image: {what}", format_name(format)))
    })?;
    if format == ImageFormat::Bmp {
        if let (Some(widths), Bands::Rgb(rgb)) = (bmp16_widths(bytes), &mut bands) {
            rescale_bmp16(rgb, widths);
        }
    }
    Ok(DecodedImage {
        format,
        mode,
        bands,
    })
}

impl DecodedImage {
    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.dimensions().0
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.dimensions().1
    }

    /// `(width, height)` in pixels.
    pub fn dimensions(&self) -> (u32, u32) {
        match &self.bands {
            Bands::Gray(i) => i.dimensions(),
            Bands::GrayAlpha(i) => i.dimensions(),
            Bands::Rgb(i) => i.dimensions(),
            Bands::Rgba(i) => i.dimensions(),
            Bands::Gray16(i) => i.dimensions(),
        }
    }

    /// Pillow's mode for this image.
    pub fn mode(&self) -> PilMode {
        self.mode
    }

    /// The container format the image was decoded from.
    pub fn format(&self) -> ImageFormat {
        self.format
    }
}

#[cfg(test)]
mod tests;
