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
mod tests {
    use super::convert::{muldiv255, unpremultiply};
    use super::*;

    fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    #[test]
    fn muldiv255_and_unpremultiply_match_pillow_formulas() {
        assert_eq!(muldiv255(255, 255), 255);
        assert_eq!(muldiv255(255, 0), 0);
        assert_eq!(muldiv255(100, 128), 50);
        assert_eq!(unpremultiply(50, 128), 99);
        assert_eq!(unpremultiply(200, 100), 255);
        assert_eq!(unpremultiply(7, 0), 7);
    }

    #[test]
    fn unrecognised_and_unsupported_formats_are_rejected() {
        let err = decode_image(b"hello world", &ImageLimits::default()).unwrap_err();
        assert!(matches!(&err, PreprocessError::InvalidImage(m) if m.contains("unrecognised")));
        let err = decode_image(b"", &ImageLimits::default()).unwrap_err();
        assert!(matches!(err, PreprocessError::InvalidImage(_)));
        // A QOI header: recognised, but not a supported format.
        let err =
            decode_image(b"qoif\0\0\0\x02\0\0\0\x02\x03\0", &ImageLimits::default()).unwrap_err();
        assert!(matches!(&err, PreprocessError::InvalidImage(m) if m.contains("unsupported")));
    }

    #[test]
    fn truncated_png_is_invalid() {
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(40, 30, image::Rgb([1, 2, 3])));
        let bytes = encode(&img, ImageFormat::Png);
        for cut in [8, 20, 40, bytes.len() - 20] {
            let err = decode_image(&bytes[..cut], &ImageLimits::default()).unwrap_err();
            assert!(
                matches!(err, PreprocessError::InvalidImage(_)),
                "{cut}: {err:?}"
            );
        }
    }

    #[test]
    fn pixel_limit_is_checked_from_the_header() {
        let img = DynamicImage::ImageLuma8(GrayImage::new(100, 50));
        let bytes = encode(&img, ImageFormat::Png);
        let limits = ImageLimits {
            max_pixels: 4999,
            ..ImageLimits::default()
        };
        match decode_image(&bytes, &limits) {
            Err(PreprocessError::ImageTooLarge {
                width: 100,
                height: 50,
                pixels: 5000,
                limit: 4999,
            }) => {}
            other => panic!("{other:?}"),
        }
        let limits = ImageLimits {
            max_side: 99,
            ..ImageLimits::default()
        };
        assert!(matches!(
            decode_image(&bytes, &limits),
            Err(PreprocessError::InvalidImage(_))
        ));
        assert!(decode_image(&bytes, &ImageLimits::default()).is_ok());
    }

    /// A PNG claiming 100000 x 100000 pixels is refused before any allocation.
    #[test]
    fn huge_png_header_is_refused() {
        let img = DynamicImage::ImageLuma8(GrayImage::new(1, 1));
        let mut bytes = encode(&img, ImageFormat::Png);
        bytes[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        bytes[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        // The CRC no longer matches; fix it so only the size is wrong.
        let crc = crc32(&bytes[12..29]);
        bytes[29..33].copy_from_slice(&crc.to_be_bytes());
        assert!(matches!(
            decode_image(&bytes, &ImageLimits::default()),
            Err(PreprocessError::ImageTooLarge { .. })
        ));
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn jpeg_component_count_is_read_from_the_frame_header() {
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(9, 7, image::Rgb([9, 90, 200])));
        let bytes = encode(&img, ImageFormat::Jpeg);
        assert_eq!(jpeg_components(&bytes), Some(3));
        let img = DynamicImage::ImageLuma8(GrayImage::from_pixel(9, 7, Luma([80])));
        let bytes = encode(&img, ImageFormat::Jpeg);
        assert_eq!(jpeg_components(&bytes), Some(1));
        let decoded = decode_image(&bytes, &ImageLimits::default()).unwrap();
        assert_eq!(decoded.mode(), PilMode::L);
        assert_eq!(jpeg_components(&bytes[..5]), None);
        assert_eq!(jpeg_components(b"\xff\xd8\xff\xe0\xff\xff"), None);
    }

    #[test]
    fn png_modes_follow_pillow() {
        let rgba = RgbaImage::from_fn(5, 3, |x, y| {
            image::Rgba([x as u8 * 40, y as u8 * 80, 7, 128])
        });
        let decoded = decode_image(
            &encode(&DynamicImage::ImageRgba8(rgba.clone()), ImageFormat::Png),
            &ImageLimits::default(),
        )
        .unwrap();
        assert_eq!(decoded.mode(), PilMode::Rgba);
        assert_eq!(decoded.format(), ImageFormat::Png);
        assert_eq!(decoded.dimensions(), (5, 3));
        // Alpha is dropped, not composited.
        assert_eq!(decoded.to_rgb8().get_pixel(4, 2).0, [160, 160, 7]);

        let gray16 = Gray16Image::from_fn(4, 1, |x, _| Luma([[0, 255, 256, 65535][x as usize]]));
        let decoded = decode_image(
            &encode(&DynamicImage::ImageLuma16(gray16), ImageFormat::Png),
            &ImageLimits::default(),
        )
        .unwrap();
        assert_eq!(decoded.mode(), PilMode::I16);
        // Pillow clips I;16 to 255 when converting to RGB.
        let rgb = decoded.to_rgb8();
        let firsts: Vec<u8> = rgb.pixels().map(|p| p.0[0]).collect();
        assert_eq!(firsts, vec![0, 255, 255, 255]);

        let rgb16 = ImageBuffer::<image::Rgb<u16>, Vec<u16>>::from_fn(2, 1, |x, _| {
            image::Rgb([[0x12ff, 0xff00][x as usize], 0x8080, 0x00ff])
        });
        let decoded = decode_image(
            &encode(&DynamicImage::ImageRgb16(rgb16), ImageFormat::Png),
            &ImageLimits::default(),
        )
        .unwrap();
        assert_eq!(decoded.mode(), PilMode::Rgb);
        // Pillow keeps the high byte of 16-bit colour samples.
        assert_eq!(decoded.to_rgb8().get_pixel(0, 0).0, [0x12, 0x80, 0x00]);
        assert_eq!(decoded.to_rgb8().get_pixel(1, 0).0, [0xff, 0x80, 0x00]);
    }

    /// Builds a GIF by hand: logical screen `screen`, one frame at `offset`
    /// of size `size`, uncompressed-style LZW (clear code before every pixel).
    fn gif_bytes(
        screen: (u16, u16),
        palette: &[[u8; 3]; 4],
        transparent: Option<u8>,
        offset: (u16, u16),
        size: (u16, u16),
        pixels: &[u8],
    ) -> Vec<u8> {
        let mut out = b"GIF89a".to_vec();
        out.extend_from_slice(&screen.0.to_le_bytes());
        out.extend_from_slice(&screen.1.to_le_bytes());
        out.extend_from_slice(&[0x81, 0, 0]); // global table of 4 entries
        for rgb in palette {
            out.extend_from_slice(rgb);
        }
        if let Some(t) = transparent {
            out.extend_from_slice(&[0x21, 0xf9, 4, 1, 0, 0, t, 0]);
        }
        out.push(0x2c);
        for v in [offset.0, offset.1, size.0, size.1] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.push(0);
        // LZW with minimum code size 2: codes are 3 bits; emitting a clear
        // code (4) before each pixel keeps the code size at 3 bits.
        out.push(2);
        let mut codes: Vec<u16> = Vec::new();
        for &p in pixels {
            codes.push(4);
            codes.push(u16::from(p));
        }
        codes.push(5); // end of information
        let mut data = Vec::new();
        let (mut acc, mut nbits) = (0u32, 0u32);
        for c in codes {
            acc |= u32::from(c) << nbits;
            nbits += 3;
            while nbits >= 8 {
                data.push(acc as u8);
                acc >>= 8;
                nbits -= 8;
            }
        }
        if nbits > 0 {
            data.push(acc as u8);
        }
        for block in data.chunks(255) {
            out.push(block.len() as u8);
            out.extend_from_slice(block);
        }
        out.push(0);
        out.push(0x3b);
        out
    }

    const PALETTE: [[u8; 3]; 4] = [[10, 20, 30], [200, 0, 0], [0, 200, 0], [0, 0, 200]];

    #[test]
    fn gif_small_frame_is_placed_on_a_pillow_canvas() {
        // Without transparency the canvas is index 0; with it, the transparent index.
        let bytes = gif_bytes((4, 3), &PALETTE, None, (1, 1), (2, 1), &[1, 3]);
        let decoded = decode_image(&bytes, &ImageLimits::default()).unwrap();
        assert_eq!(decoded.mode(), PilMode::P);
        assert_eq!(decoded.format(), ImageFormat::Gif);
        let rgb = decoded.to_rgb8();
        assert_eq!(rgb.dimensions(), (4, 3));
        assert_eq!(rgb.get_pixel(0, 0).0, [10, 20, 30]);
        assert_eq!(rgb.get_pixel(1, 1).0, [200, 0, 0]);
        assert_eq!(rgb.get_pixel(2, 1).0, [0, 0, 200]);

        let bytes = gif_bytes((4, 3), &PALETTE, Some(2), (1, 1), (2, 1), &[1, 2]);
        let rgb = decode_image(&bytes, &ImageLimits::default())
            .unwrap()
            .to_rgb8();
        assert_eq!(rgb.get_pixel(0, 0).0, [0, 200, 0]);
        // A transparent pixel keeps its palette colour.
        assert_eq!(rgb.get_pixel(2, 1).0, [0, 200, 0]);

        // A frame sticking out of the logical screen grows the canvas.
        let bytes = gif_bytes((2, 2), &PALETTE, None, (1, 1), (2, 2), &[1, 1, 1, 1]);
        let decoded = decode_image(&bytes, &ImageLimits::default()).unwrap();
        assert_eq!(decoded.dimensions(), (3, 3));
    }

    #[test]
    fn gif_with_identity_palette_is_mode_l() {
        let grey = [[0, 0, 0], [1, 1, 1], [2, 2, 2], [3, 3, 3]];
        let bytes = gif_bytes((2, 1), &grey, None, (0, 0), (2, 1), &[3, 1]);
        let decoded = decode_image(&bytes, &ImageLimits::default()).unwrap();
        assert_eq!(decoded.mode(), PilMode::L);
        assert_eq!(decoded.to_rgb8().get_pixel(0, 0).0, [3, 3, 3]);
    }

    #[test]
    fn truncated_gif_is_invalid() {
        let bytes = gif_bytes((8, 8), &PALETTE, None, (0, 0), (8, 8), &[1; 64]);
        for cut in [6, 13, 20, 30, bytes.len() - 3] {
            assert!(
                matches!(
                    decode_image(&bytes[..cut], &ImageLimits::default()),
                    Err(PreprocessError::InvalidImage(_))
                ),
                "{cut}"
            );
        }
    }

    #[test]
    fn resize_like_pil_keeps_mode_and_uses_nearest_for_palettes() {
        let bytes = gif_bytes((2, 1), &PALETTE, None, (0, 0), (2, 1), &[1, 3]);
        let decoded = decode_image(&bytes, &ImageLimits::default()).unwrap();
        let resized = decoded.resize_like_pil(5, 2);
        assert_eq!(resized.mode(), PilMode::P);
        let rgb = resized.to_rgb8();
        // Nearest neighbour: only palette colours appear.
        assert!(rgb
            .pixels()
            .all(|p| p.0 == [200, 0, 0] || p.0 == [0, 0, 200]));
        let empty = decoded.resize_like_pil(0, 3);
        assert_eq!(empty.width() * empty.height(), 0);
    }

    fn noise(n: usize, seed: u32) -> Vec<u8> {
        let mut s = seed.max(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s >> 24) as u8
            })
            .collect()
    }

    fn fnv(data: &[u8]) -> u64 {
        data.iter().fold(0xcbf29ce484222325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
        })
    }

    /// `resize_like_pil(..).to_rgb8()` against Pillow 13.0.0:
    /// `Image.frombytes(mode, (w, h), noise).resize((nw, nh)).convert("RGB")`,
    /// hashed with FNV-1a (digests computed once in Python).
    #[test]
    fn resize_like_pil_matches_pillow_with_alpha() {
        let cases: &[(bool, u32, u32, u32, u32, u64)] = &[
            (true, 37, 23, 13, 7, 0x9836c4a7af97e91b),
            (false, 37, 23, 13, 7, 0x002e2902bdc4a77b),
            (true, 20, 11, 45, 30, 0x909d8c3d02178b80),
            (false, 20, 11, 45, 30, 0xb0b2e671d2cac9d3),
        ];
        for &(rgba, w, h, nw, nh, digest) in cases {
            let seed = w * 31 + h;
            let img = if rgba {
                let data = noise((w * h * 4) as usize, seed);
                DynamicImage::ImageRgba8(RgbaImage::from_raw(w, h, data).unwrap())
            } else {
                let data = noise((w * h * 2) as usize, seed);
                DynamicImage::ImageLumaA8(GrayAlphaImage::from_raw(w, h, data).unwrap())
            };
            let decoded =
                decode_image(&encode(&img, ImageFormat::Png), &ImageLimits::default()).unwrap();
            assert_eq!(
                decoded.mode(),
                if rgba { PilMode::Rgba } else { PilMode::La }
            );
            let out = decoded.resize_like_pil(nw, nh).to_rgb8();
            assert_eq!(
                fnv(out.as_raw()),
                digest,
                "rgba={rgba} {w}x{h} -> {nw}x{nh}"
            );
        }
    }

    #[test]
    fn rgba_resizes_premultiplied() {
        // A fully transparent red pixel next to an opaque blue one: premultiplied
        // resizing keeps the red out of the blend.
        let rgba = RgbaImage::from_fn(2, 1, |x, _| {
            if x == 0 {
                image::Rgba([255, 0, 0, 0])
            } else {
                image::Rgba([0, 0, 255, 255])
            }
        });
        let bytes = encode(&DynamicImage::ImageRgba8(rgba), ImageFormat::Png);
        let decoded = decode_image(&bytes, &ImageLimits::default()).unwrap();
        let out = decoded.resize_like_pil(1, 1).to_rgb8();
        assert_eq!(out.get_pixel(0, 0).0[0], 0);
        assert_eq!(out.get_pixel(0, 0).0[2], 255);
    }

    const BASELINE_JPEG: &[u8] =
        include_bytes!("../../../tests/fixtures/images/baseline_420_640x480.jpg");
    const PROGRESSIVE_JPEG: &[u8] =
        include_bytes!("../../../tests/fixtures/images/progressive_480x360.jpg");

    fn noisy_rgb(width: u32, height: u32) -> RgbImage {
        let data = noise((width * height * 3) as usize, width * 7 + height);
        RgbImage::from_raw(width, height, data).unwrap()
    }

    fn is_invalid(r: Result<DecodedImage, PreprocessError>) -> bool {
        matches!(r, Err(PreprocessError::InvalidImage(_)))
    }

    /// Files cut short are refused, as Pillow refuses them ("image file is
    /// truncated"); the reference cannot embed them either.
    #[test]
    fn truncated_files_of_every_format_are_refused() {
        let img = DynamicImage::ImageRgb8(noisy_rgb(64, 48));
        for format in [
            ImageFormat::Png,
            ImageFormat::Jpeg,
            ImageFormat::WebP,
            ImageFormat::Gif,
            ImageFormat::Tiff,
        ] {
            let bytes = encode(&img, format);
            assert!(
                decode_image(&bytes, &ImageLimits::default()).is_ok(),
                "{format:?}"
            );
            let half = &bytes[..bytes.len() / 2];
            assert!(
                is_invalid(decode_image(half, &ImageLimits::default())),
                "{format:?} cut in half"
            );
        }
    }

    /// A real photo cut in half (no end marker): libjpeg would paint the
    /// rest grey; Pillow refuses it, so do we.
    #[test]
    fn real_jpeg_cut_in_half_is_truncated() {
        let limits = ImageLimits::default();
        for fixture in [BASELINE_JPEG, PROGRESSIVE_JPEG] {
            assert!(decode_image(fixture, &limits).is_ok());
            let err = decode_image(&fixture[..fixture.len() / 2], &limits).unwrap_err();
            assert!(
                matches!(&err, PreprocessError::InvalidImage(m) if m.contains("truncated")),
                "{err:?}"
            );
        }
    }

    /// A JPEG frame header with its dimensions replaced, scan data removed
    /// (the scan header is kept) and an end marker: 6324x6324 in a few
    /// hundred bytes.
    fn empty_scan_jpeg(width: u16, height: u16) -> Vec<u8> {
        let small = encode(
            &DynamicImage::ImageRgb8(noisy_rgb(16, 16)),
            ImageFormat::Jpeg,
        );
        let mut out = Vec::new();
        let mut at = 2;
        out.extend_from_slice(&small[..2]);
        loop {
            assert_eq!(small[at], 0xff);
            let marker = small[at + 1];
            let len = usize::from(u16::from_be_bytes([small[at + 2], small[at + 3]]));
            let mut segment = small[at..at + 2 + len].to_vec();
            if marker == 0xc0 {
                segment[5..7].copy_from_slice(&height.to_be_bytes());
                segment[7..9].copy_from_slice(&width.to_be_bytes());
            }
            out.extend_from_slice(&segment);
            at += 2 + len;
            if marker == 0xda {
                break;
            }
        }
        out.extend_from_slice(&[0xff, 0xd9]);
        out
    }

    #[test]
    fn jpeg_with_an_empty_scan_is_refused_by_default() {
        let bytes = empty_scan_jpeg(6324, 6324);
        assert!(bytes.len() < 1000, "{}", bytes.len());
        assert_eq!(header_size(&bytes).unwrap(), Size::new(6324, 6324));
        let started = std::time::Instant::now();
        let err = decode_image(&bytes, &ImageLimits::default()).unwrap_err();
        assert!(
            matches!(&err, PreprocessError::InvalidImage(m) if m.contains("premature end of data segment")),
            "{err:?}"
        );
        // Refused at the first missing block, not after painting 40 MP grey.
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        // Pillow's behaviour, on request: the missing data is grey (but for
        // the first MCU, decoded from the zero bits libjpeg pads with).
        let lenient = ImageLimits {
            allow_incomplete_jpeg: true,
            ..ImageLimits::default()
        };
        let decoded = decode_image(&empty_scan_jpeg(40, 24), &lenient).unwrap();
        assert_eq!(decoded.dimensions(), (40, 24));
        let rgb = decoded.to_rgb8();
        let grey = rgb.pixels().filter(|p| p.0 == [128, 128, 128]).count();
        assert!(grey >= 40 * 24 - 16 * 16, "{grey}");
    }

    #[test]
    fn jpeg_scans_and_working_memory_are_bounded_before_decoding() {
        let info = sniff::jpeg_info(PROGRESSIVE_JPEG).unwrap();
        assert!(info.progressive);
        assert!(info.scans > 1 && info.scans < 20, "{}", info.scans);
        assert_eq!((info.width, info.height), (480, 360));
        let base = sniff::jpeg_info(BASELINE_JPEG).unwrap();
        assert_eq!((base.progressive, base.scans), (false, 1));
        assert_eq!(base.coefficient_bytes(), 0);
        // 4:2:0 at 480x360: luma 60x45 blocks (rounded to 60x46), chroma
        // 30x23 each; 128 bytes a block.
        assert_eq!(info.sampling, vec![(2, 2), (1, 1), (1, 1)]);
        assert_eq!(info.coefficient_bytes(), (60 * 46 + 2 * 30 * 23) * 128);

        let few_scans = ImageLimits {
            max_jpeg_scans: info.scans - 1,
            ..ImageLimits::default()
        };
        let err = decode_image(PROGRESSIVE_JPEG, &few_scans).unwrap_err();
        assert!(
            matches!(&err, PreprocessError::InvalidImage(m) if m.contains("scans")),
            "{err:?}"
        );
        // The output alone (480 * 360 * 3) fits, with the coefficients it does not.
        let little_memory = ImageLimits {
            max_alloc_bytes: 480 * 360 * 3 + 1000,
            ..ImageLimits::default()
        };
        let err = decode_image(PROGRESSIVE_JPEG, &little_memory).unwrap_err();
        assert!(
            matches!(&err, PreprocessError::InvalidImage(m) if m.contains("bytes")),
            "{err:?}"
        );
        assert!(decode_image(BASELINE_JPEG, &little_memory).is_err());
        let enough = ImageLimits {
            max_alloc_bytes: 640 * 480 * 3,
            ..ImageLimits::default()
        };
        assert!(decode_image(BASELINE_JPEG, &enough).is_ok());

        // Scans are counted from the markers: a stream repeating its scan.
        let mut many = Vec::new();
        let sos = BASELINE_JPEG
            .windows(2)
            .position(|w| w == [0xff, 0xda])
            .unwrap();
        let eoi = BASELINE_JPEG.len() - 2;
        many.extend_from_slice(&BASELINE_JPEG[..sos]);
        for _ in 0..150 {
            many.extend_from_slice(&BASELINE_JPEG[sos..eoi]);
        }
        many.extend_from_slice(&[0xff, 0xd9]);
        assert_eq!(sniff::jpeg_info(&many).unwrap().scans, 150);
        let err = decode_image(&many, &ImageLimits::default()).unwrap_err();
        assert!(
            matches!(&err, PreprocessError::InvalidImage(m) if m.contains("150 scans")),
            "{err:?}"
        );
    }

    #[test]
    fn header_size_reads_every_format_without_decoding() {
        let img = DynamicImage::ImageRgb8(noisy_rgb(37, 23));
        for format in [
            ImageFormat::Png,
            ImageFormat::Jpeg,
            ImageFormat::WebP,
            ImageFormat::Gif,
            ImageFormat::Tiff,
            ImageFormat::Bmp,
        ] {
            let bytes = encode(&img, format);
            assert_eq!(
                header_size(&bytes).unwrap(),
                Size::new(37, 23),
                "{format:?}"
            );
        }
        let gif = gif_bytes((2, 2), &PALETTE, None, (1, 1), (2, 2), &[1, 1, 1, 1]);
        assert_eq!(header_size(&gif).unwrap(), Size::new(3, 3));
        assert!(header_size(b"nonsense").is_err());
    }

    /// 256 images each claiming 40 MP are refused from their headers, at
    /// the image that breaks the budget, before any is decoded; a bad image
    /// stops the check at its index.
    #[test]
    fn request_budget_is_checked_from_headers() {
        let big = empty_scan_jpeg(6324, 6324);
        let limits = ImageLimits::default();
        let started = std::time::Instant::now();
        let images: Vec<(usize, &[u8])> = (0..256).map(|i| (i, big.as_slice())).collect();
        match check_request_images(images.iter().copied(), &limits) {
            Err(RequestImagesError::OverBudget {
                images: 3,
                pixels,
                limit: 100_000_000,
            }) => assert_eq!(pixels, 3 * 6324 * 6324),
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let err = check_request_images(images.iter().copied(), &limits).unwrap_err();
        assert!(
            err.to_string().contains("max_request_image_pixels"),
            "{err}"
        );

        let small = encode(
            &DynamicImage::ImageRgb8(noisy_rgb(10, 10)),
            ImageFormat::Png,
        );
        let two = [(0, small.as_slice()), (4, small.as_slice())];
        assert_eq!(check_request_images(two, &limits).unwrap(), 200);
        let bad = [
            (0, small.as_slice()),
            (7, b"junk".as_slice()),
            (9, small.as_slice()),
        ];
        match check_request_images(bad, &limits) {
            Err(RequestImagesError::Image {
                index: 7,
                source: PreprocessError::InvalidImage(_),
            }) => {}
            other => panic!("{other:?}"),
        }
        // The per-image cap applies too.
        let capped = ImageLimits {
            max_pixels: 99,
            ..limits
        };
        assert!(matches!(
            check_request_images([(0, small.as_slice())], &capped),
            Err(RequestImagesError::Image {
                index: 0,
                source: PreprocessError::ImageTooLarge { .. }
            })
        ));
    }

    /// Decodes every file in `$VLEMBED_IMAGE_DIR` with the default limits
    /// (a check that real photos pass the stricter JPEG rules):
    /// `VLEMBED_IMAGE_DIR=... cargo test --lib decodes_a_directory -- --ignored`.
    #[test]
    #[ignore = "needs VLEMBED_IMAGE_DIR"]
    fn decodes_a_directory() {
        let dir = std::env::var("VLEMBED_IMAGE_DIR").expect("VLEMBED_IMAGE_DIR");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            if image::guess_format(&bytes).is_err() {
                continue;
            }
            let decoded = decode_image(&bytes, &ImageLimits::default());
            assert!(decoded.is_ok(), "{}: {:?}", path.display(), decoded.err());
            let size = header_size(&bytes).unwrap();
            assert_eq!((size.width, size.height), decoded.unwrap().dimensions());
            n += 1;
        }
        println!("{n} images decoded");
    }

    /// The JPEG marker walk is not behind the decoders' panic guard in every
    /// caller: it must not panic on any cut or corrupted stream.
    #[test]
    fn jpeg_marker_walk_survives_corruption() {
        let mut state = 0x2545_f491u32;
        let mut rand = |n: usize| -> usize {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as usize % n.max(1)
        };
        for fixture in [BASELINE_JPEG, PROGRESSIVE_JPEG] {
            for cut in (0..fixture.len()).step_by(97) {
                let _ = sniff::jpeg_info(&fixture[..cut]);
                let _ = header_size(&fixture[..cut]);
            }
            for _ in 0..300 {
                let mut bytes = fixture.to_vec();
                for _ in 0..1 + rand(8) {
                    let at = rand(bytes.len());
                    bytes[at] = [0x00, 0xff, 0xd9, 0xda, 0xc2, rand(256) as u8][rand(6)];
                }
                let _ = sniff::jpeg_info(&bytes);
                let _ = decode_image(&bytes[..rand(bytes.len()) + 1], &ImageLimits::default());
            }
        }
    }
}
