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

use std::io::Cursor;
use std::num::NonZeroU64;

use image::{
    DynamicImage, GrayAlphaImage, GrayImage, ImageBuffer, ImageDecoder, ImageError, ImageFormat,
    ImageReader, Luma, RgbImage, RgbaImage,
};

use super::resize::{self, Filter};
use super::PreprocessError;

/// A 16-bit greyscale image (Pillow's `I;16`).
pub type Gray16Image = ImageBuffer<Luma<u16>, Vec<u16>>;

/// Resource limits for decoding one untrusted image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Most pixels (width x height) an image may have. Checked from the
    /// header, before decoding.
    pub max_pixels: u64,
    /// Longest width or height accepted, in pixels.
    pub max_side: u32,
    /// Most bytes the decoder may allocate (the pixel buffer included).
    pub max_alloc_bytes: u64,
}

impl Default for ImageLimits {
    /// 40 megapixels, 32768 pixels per side, 512 MiB of decoder memory.
    fn default() -> Self {
        ImageLimits {
            max_pixels: 40_000_000,
            max_side: 32_768,
            max_alloc_bytes: 512 * 1024 * 1024,
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
        Err(PreprocessError::InvalidImage(
            "the image decoder failed on malformed data".into(),
        ))
    })
}

fn decode_unguarded(bytes: &[u8], limits: &ImageLimits) -> Result<DecodedImage, PreprocessError> {
    let format = image::guess_format(bytes).map_err(|_| {
        PreprocessError::InvalidImage(format!(
            "unrecognised image format (supported: {SUPPORTED})"
        ))
    })?;
    match format {
        ImageFormat::Gif => decode_gif(bytes, limits),
        ImageFormat::Jpeg if matches!(jpeg_components(bytes), Some(1 | 3)) => {
            decode_jpeg_libjpeg(bytes, limits)
        }
        ImageFormat::Jpeg
        | ImageFormat::Png
        | ImageFormat::WebP
        | ImageFormat::Bmp
        | ImageFormat::Tiff => decode_with_image_crate(bytes, format, limits),
        other => Err(PreprocessError::InvalidImage(format!(
            "unsupported image format {} (supported: {SUPPORTED})",
            format_name(other)
        ))),
    }
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
        return Err(PreprocessError::InvalidImage(format!(
            "image is {width}x{height}, a side is over the limit of {} pixels",
            limits.max_side
        )));
    }
    if width == 0 || height == 0 {
        return Err(PreprocessError::InvalidImage(format!(
            "image is {width}x{height}: it has no pixels"
        )));
    }
    Ok(())
}

/// Maps a decoder error to a client-facing one.
fn decode_error(format: ImageFormat, err: ImageError) -> PreprocessError {
    let name = format_name(format);
    match err {
        ImageError::Limits(e) => PreprocessError::InvalidImage(format!(
            "{name} image needs more resources than allowed to decode: {e}"
        )),
        ImageError::Unsupported(e) => {
            PreprocessError::InvalidImage(format!("unsupported {name} image: {e}"))
        }
        ImageError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            PreprocessError::InvalidImage(format!("{name} data is truncated"))
        }
        other => PreprocessError::InvalidImage(format!("cannot decode {name} data: {other}")),
    }
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
        PreprocessError::InvalidImage(format!("unsupported {} image: {what}", format_name(format)))
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

/// Decodes a greyscale or three-component JPEG with libjpeg-turbo's decoder,
/// as Pillow does. libjpeg reports errors by unwinding (the `unwinding`
/// feature of mozjpeg-sys); [`decode_image`] catches that.
fn decode_jpeg_libjpeg(
    bytes: &[u8],
    limits: &ImageLimits,
) -> Result<DecodedImage, PreprocessError> {
    let invalid =
        |e: std::io::Error| PreprocessError::InvalidImage(format!("cannot decode JPEG data: {e}"));
    let decoder = mozjpeg::Decompress::new_mem(bytes).map_err(invalid)?;
    let (width, height) = (decoder.width(), decoder.height());
    let (w, h) = (
        u32::try_from(width).unwrap_or(u32::MAX),
        u32::try_from(height).unwrap_or(u32::MAX),
    );
    check_size(w, h, limits)?;
    let gray = decoder.components().len() == 1;
    let channels: u64 = if gray { 1 } else { 3 };
    if u64::from(w) * u64::from(h) * channels > limits.max_alloc_bytes {
        return Err(PreprocessError::InvalidImage(format!(
            "JPEG image needs more than the {} bytes allowed to decode",
            limits.max_alloc_bytes
        )));
    }
    let (mode, bands) = if gray {
        let mut started = decoder.grayscale().map_err(invalid)?;
        let px = started.read_scanlines::<u8>().map_err(invalid)?;
        started.finish().map_err(invalid)?;
        let img = GrayImage::from_raw(w, h, px)
            .ok_or_else(|| PreprocessError::InvalidImage("JPEG data is truncated".into()))?;
        (PilMode::L, Bands::Gray(img))
    } else {
        let mut started = decoder.rgb().map_err(invalid)?;
        let px = started.read_scanlines::<u8>().map_err(invalid)?;
        started.finish().map_err(invalid)?;
        let img = RgbImage::from_raw(w, h, px)
            .ok_or_else(|| PreprocessError::InvalidImage("JPEG data is truncated".into()))?;
        (PilMode::Rgb, Bands::Rgb(img))
    };
    Ok(DecodedImage {
        format: ImageFormat::Jpeg,
        mode,
        bands,
    })
}

/// Bit widths of the red, green and blue fields of a 16-bit BMP (`None` for
/// other BMPs): 5-6-5 when the bit fields say so, else 5-5-5.
fn bmp16_widths(bytes: &[u8]) -> Option<[u32; 3]> {
    let u32_at = |at: usize| -> Option<u32> {
        let b = bytes.get(at..at + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if u32_at(14)? < 40 || bytes.get(28..30)? != [16, 0] {
        return None;
    }
    if u32_at(30)? == 3 {
        let widths = [
            u32_at(54)?.count_ones(),
            u32_at(58)?.count_ones(),
            u32_at(62)?.count_ones(),
        ];
        widths.iter().all(|w| (1..=8).contains(w)).then_some(widths)
    } else {
        Some([5, 5, 5])
    }
}

/// The `image` crate expands an n-bit BMP sample `v` to
/// `round(v * 255 / max)`; Pillow truncates (`v * 255 / max`). Both are
/// one-to-one, so the decoded value is mapped back to `v` and re-expanded.
fn rescale_bmp16(img: &mut RgbImage, widths: [u32; 3]) {
    let mut luts = [[0u8; 256]; 3];
    for (lut, bits) in luts.iter_mut().zip(widths) {
        let max = (1u32 << bits) - 1;
        for (i, entry) in lut.iter_mut().enumerate() {
            *entry = i as u8;
        }
        for v in 0..=max {
            let decoded = (v * 255 + max / 2) / max;
            lut[decoded as usize] = (v * 255 / max) as u8;
        }
    }
    for px in img.pixels_mut() {
        for (c, lut) in px.0.iter_mut().zip(&luts) {
            *c = lut[usize::from(*c)];
        }
    }
}

/// Pillow's mode for an image known only by its decoded colour type.
fn mode_from_color(img: &DynamicImage) -> PilMode {
    match img {
        DynamicImage::ImageLuma8(_) => PilMode::L,
        DynamicImage::ImageLumaA8(_) => PilMode::La,
        DynamicImage::ImageLuma16(_) => PilMode::I16,
        // Pillow opens 16-bit grey+alpha as RGBA.
        DynamicImage::ImageLumaA16(_) => PilMode::Rgba,
        DynamicImage::ImageRgba8(_)
        | DynamicImage::ImageRgba16(_)
        | DynamicImage::ImageRgba32F(_) => PilMode::Rgba,
        _ => PilMode::Rgb,
    }
}

/// Pillow's mode for a PNG, from the IHDR chunk (always the first chunk).
fn png_mode(bytes: &[u8]) -> Option<PilMode> {
    if bytes.get(12..16)? != b"IHDR" {
        return None;
    }
    let depth = *bytes.get(24)?;
    let color_type = *bytes.get(25)?;
    Some(match (color_type, depth) {
        (0, 1) => PilMode::Bilevel,
        (0, 16) => PilMode::I16,
        (0, _) => PilMode::L,
        (2, _) => PilMode::Rgb,
        (3, _) => PilMode::P,
        (4, 16) => PilMode::Rgba,
        (4, _) => PilMode::La,
        (6, _) => PilMode::Rgba,
        _ => return None,
    })
}

/// Number of components in a JPEG's frame header (1 grey, 3 colour, 4 CMYK
/// or YCCK), found by walking the marker segments up to the first SOF.
fn jpeg_components(bytes: &[u8]) -> Option<u8> {
    let mut at = 2; // after SOI
    loop {
        if *bytes.get(at)? != 0xff {
            return None;
        }
        let marker = *bytes.get(at + 1)?;
        match marker {
            // Fill bytes before a marker.
            0xff => at += 1,
            // Standalone markers carry no length.
            0x01 | 0xd0..=0xd7 => at += 2,
            // SOF0..SOF15, except DHT (C4), JPG (C8) and DAC (CC).
            0xc0..=0xcf if !matches!(marker, 0xc4 | 0xc8 | 0xcc) => {
                return bytes.get(at + 9).copied();
            }
            _ => {
                let len = bytes.get(at + 2..at + 4)?;
                at += 2 + usize::from(u16::from_be_bytes([len[0], len[1]]));
            }
        }
    }
}

/// Pillow's mode for a BMP (`BmpImagePlugin`): palettes of exact greys are
/// dropped (`1` for two entries black and white, `L` for `i -> (i, i, i)`),
/// other palettes give `P`; 32-bit images are `RGB` unless their bit fields
/// name an alpha channel.
fn bmp_mode(bytes: &[u8]) -> Option<PilMode> {
    let u16_at = |at: usize| -> Option<u32> {
        let b = bytes.get(at..at + 2)?;
        Some(u32::from(u16::from_le_bytes([b[0], b[1]])))
    };
    let u32_at = |at: usize| -> Option<u32> {
        let b = bytes.get(at..at + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    const BITFIELDS: u32 = 3;
    let header_size = u32_at(14)?;
    let (bits, compression, colors, entry_size) = if header_size == 12 {
        (u16_at(24)?, 0, 0, 3usize)
    } else {
        (u16_at(28)?, u32_at(30)?, u32_at(46)?, 4usize)
    };
    match bits {
        1 | 4 | 8 => {
            let colors = if colors == 0 { 1u32 << bits } else { colors };
            let palette_at = 14 + header_size as usize;
            let is_grey = |index: u32, value: u32| -> bool {
                let at = palette_at + index as usize * entry_size;
                match bytes.get(at..at + 3) {
                    Some(bgr) => bgr.iter().all(|&c| u32::from(c) == value),
                    None => false,
                }
            };
            let grey = if colors == 2 {
                is_grey(0, 0) && is_grey(1, 255)
            } else {
                (0..colors.min(256)).all(|i| is_grey(i, i)) && colors <= 256
            };
            Some(match (grey, colors <= 2) {
                (true, true) => PilMode::Bilevel,
                (true, false) => PilMode::L,
                (false, _) => PilMode::P,
            })
        }
        32 if compression == BITFIELDS => {
            // The colour masks follow a 40-byte header or sit inside larger
            // ones, at the same offset; only headers of 56 bytes and more
            // carry an alpha mask. Pillow reads all-zero masks as BGRA.
            let alpha_mask = if header_size >= 56 {
                u32_at(14 + 52)?
            } else {
                0
            };
            let masks = [
                u32_at(14 + 40)?,
                u32_at(14 + 44)?,
                u32_at(14 + 48)?,
                alpha_mask,
            ];
            Some(if alpha_mask != 0 || masks == [0; 4] {
                PilMode::Rgba
            } else {
                PilMode::Rgb
            })
        }
        16 | 24 | 32 => Some(PilMode::Rgb),
        _ => None,
    }
}

/// High byte of a 16-bit sample, which is what Pillow keeps when it loads a
/// 16-bit colour image into an 8-bit mode.
#[inline]
fn msb(v: u16) -> u8 {
    (v >> 8) as u8
}

/// Rearranges decoded samples into the layout of Pillow's `mode`.
/// Errs (with a description) on sample formats Pillow cannot load either.
fn bands_for_mode(mode: PilMode, img: DynamicImage) -> Result<Bands, String> {
    Ok(match mode {
        PilMode::Bilevel | PilMode::L => Bands::Gray(match img {
            DynamicImage::ImageLuma8(g) => g,
            DynamicImage::ImageLumaA8(g) => map_pixels(&g, |p| [p[0]]),
            // A greyscale palette expanded by the decoder.
            DynamicImage::ImageRgb8(g) => map_pixels(&g, |p| [p[0]]),
            DynamicImage::ImageRgba8(g) => map_pixels(&g, |p| [p[0]]),
            other => other.to_luma8(),
        }),
        PilMode::La => Bands::GrayAlpha(match img {
            DynamicImage::ImageLumaA8(g) => g,
            DynamicImage::ImageLumaA16(g) => map_pixels(&g, |p| [msb(p[0]), msb(p[1])]),
            DynamicImage::ImageRgba8(g) => map_pixels(&g, |p| [p[0], p[3]]),
            DynamicImage::ImageLuma8(g) => map_pixels(&g, |p| [p[0], 255]),
            other => other.to_luma_alpha8(),
        }),
        PilMode::I16 => Bands::Gray16(match img {
            DynamicImage::ImageLuma16(g) => g,
            DynamicImage::ImageLumaA16(g) => map_pixels(&g, |p| [p[0]]),
            DynamicImage::ImageLuma8(g) => map_pixels(&g, |p| [u16::from(p[0])]),
            other => other.to_luma16(),
        }),
        PilMode::P | PilMode::Rgb | PilMode::Cmyk => Bands::Rgb(match img {
            DynamicImage::ImageRgb8(g) => g,
            DynamicImage::ImageRgba8(g) => map_pixels(&g, |p| [p[0], p[1], p[2]]),
            DynamicImage::ImageLuma8(g) => map_pixels(&g, |p| [p[0], p[0], p[0]]),
            DynamicImage::ImageLumaA8(g) => map_pixels(&g, |p| [p[0], p[0], p[0]]),
            DynamicImage::ImageRgb16(g) => map_pixels(&g, |p| [msb(p[0]), msb(p[1]), msb(p[2])]),
            DynamicImage::ImageRgba16(g) => map_pixels(&g, |p| [msb(p[0]), msb(p[1]), msb(p[2])]),
            DynamicImage::ImageLuma16(g) => map_pixels(&g, |p| [msb(p[0]), msb(p[0]), msb(p[0])]),
            DynamicImage::ImageLumaA16(g) => map_pixels(&g, |p| [msb(p[0]), msb(p[0]), msb(p[0])]),
            DynamicImage::ImageRgb32F(_) | DynamicImage::ImageRgba32F(_) => {
                return Err("32-bit floating point samples".into())
            }
            other => other.to_rgb8(),
        }),
        PilMode::Rgba => Bands::Rgba(match img {
            DynamicImage::ImageRgba8(g) => g,
            DynamicImage::ImageRgba16(g) => {
                map_pixels(&g, |p| [msb(p[0]), msb(p[1]), msb(p[2]), msb(p[3])])
            }
            DynamicImage::ImageLumaA16(g) => {
                map_pixels(&g, |p| [msb(p[0]), msb(p[0]), msb(p[0]), msb(p[1])])
            }
            DynamicImage::ImageLumaA8(g) => map_pixels(&g, |p| [p[0], p[0], p[0], p[1]]),
            DynamicImage::ImageRgb8(g) => map_pixels(&g, |p| [p[0], p[1], p[2], 255]),
            DynamicImage::ImageRgb32F(_) | DynamicImage::ImageRgba32F(_) => {
                return Err("32-bit floating point samples".into())
            }
            other => other.to_rgba8(),
        }),
    })
}

/// Builds an image of pixel type `Q` from one of pixel type `P`, pixel by pixel.
fn map_pixels<P, Q, const M: usize>(
    src: &ImageBuffer<P, Vec<P::Subpixel>>,
    f: impl Fn(&[P::Subpixel]) -> [Q::Subpixel; M],
) -> ImageBuffer<Q, Vec<Q::Subpixel>>
where
    P: image::Pixel,
    Q: image::Pixel,
{
    let (width, height) = src.dimensions();
    let channels = usize::from(P::CHANNEL_COUNT);
    let pixels = width as usize * height as usize;
    let mut data = Vec::with_capacity(pixels * M);
    for px in src.as_raw().chunks_exact(channels).take(pixels) {
        data.extend_from_slice(&f(px));
    }
    from_raw_or_empty(width, height, data)
}

/// `ImageBuffer::from_raw`, which cannot fail when `data` has exactly
/// `width * height` pixels; an empty image otherwise keeps this total.
fn from_raw_or_empty<Q: image::Pixel>(
    width: u32,
    height: u32,
    data: Vec<Q::Subpixel>,
) -> ImageBuffer<Q, Vec<Q::Subpixel>> {
    ImageBuffer::from_raw(width, height, data).unwrap_or_else(|| ImageBuffer::new(0, 0))
}

fn gif_error(err: gif::DecodingError) -> PreprocessError {
    match err {
        gif::DecodingError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            PreprocessError::InvalidImage("GIF data is truncated".into())
        }
        other => PreprocessError::InvalidImage(format!("cannot decode GIF data: {other}")),
    }
}

/// Whether Pillow keeps a GIF palette (`GifImageFile._is_palette_needed`):
/// a palette mapping every index `i` to `(i, i, i)` makes the image mode `L`.
fn gif_palette_needed(palette: &[u8]) -> bool {
    palette
        .chunks(3)
        .enumerate()
        .any(|(i, rgb)| !(rgb.len() == 3 && rgb.iter().all(|&c| usize::from(c) == i)))
}

/// Decodes the first frame of a GIF as Pillow does: the canvas is the logical
/// screen (grown to hold the frame if it sticks out), filled with the
/// transparent index if the frame has one and index 0 otherwise; the frame's
/// indices are pasted at its offset; transparent pixels keep their palette
/// colour. Mode `P`, or `L` when the palette is the identity grey ramp (or
/// absent).
fn decode_gif(bytes: &[u8], limits: &ImageLimits) -> Result<DecodedImage, PreprocessError> {
    let mut options = gif::DecodeOptions::new();
    options.set_color_output(gif::ColorOutput::Indexed);
    if let Some(bytes_limit) = NonZeroU64::new(limits.max_alloc_bytes) {
        options.set_memory_limit(gif::MemoryLimit::Bytes(bytes_limit));
    }
    let mut decoder = options.read_info(Cursor::new(bytes)).map_err(gif_error)?;
    let screen = (u32::from(decoder.width()), u32::from(decoder.height()));
    let global = decoder.global_palette().map(<[u8]>::to_vec);
    let frame = decoder
        .next_frame_info()
        .map_err(gif_error)?
        .ok_or_else(|| PreprocessError::InvalidImage("GIF file contains no image".into()))?;
    let (left, top) = (u32::from(frame.left), u32::from(frame.top));
    let (frame_w, frame_h) = (u32::from(frame.width), u32::from(frame.height));
    let transparent = frame.transparent;
    let local = frame.palette.clone();
    let width = screen.0.max(left + frame_w);
    let height = screen.1.max(top + frame_h);
    check_size(width, height, limits)?;

    let mut indices = vec![0u8; frame_w as usize * frame_h as usize];
    if !indices.is_empty() {
        decoder.read_into_buffer(&mut indices).map_err(gif_error)?;
    }

    let palette = match (&local, &global) {
        (Some(p), _) => gif_palette_needed(p).then_some(p.as_slice()),
        (None, Some(p)) => gif_palette_needed(p).then_some(p.as_slice()),
        (None, None) => None,
    };
    let colour = |index: u8| -> [u8; 3] {
        match palette {
            Some(p) => {
                let at = usize::from(index) * 3;
                match p.get(at..at + 3) {
                    Some(rgb) => [rgb[0], rgb[1], rgb[2]],
                    None => [0, 0, 0],
                }
            }
            None => [index, index, index],
        }
    };
    let background = transparent.unwrap_or(0);
    let (w, h) = (width as usize, height as usize);
    let mut canvas = vec![background; w * h];
    if frame_w > 0 {
        for (row, src) in indices.chunks_exact(frame_w as usize).enumerate() {
            let start = (top as usize + row) * w + left as usize;
            canvas[start..start + src.len()].copy_from_slice(src);
        }
    }
    let (mode, bands) = if palette.is_some() {
        let mut rgb = Vec::with_capacity(w * h * 3);
        for &index in &canvas {
            rgb.extend_from_slice(&colour(index));
        }
        (
            PilMode::P,
            Bands::Rgb(from_raw_or_empty(width, height, rgb)),
        )
    } else {
        (
            PilMode::L,
            Bands::Gray(from_raw_or_empty(width, height, canvas)),
        )
    };
    Ok(DecodedImage {
        format: ImageFormat::Gif,
        mode,
        bands,
    })
}

/// Pillow's `MULDIV255`: `a * b / 255`, rounded.
#[inline]
fn muldiv255(a: u8, b: u8) -> u8 {
    let t = u32::from(a) * u32::from(b) + 128;
    (((t >> 8) + t) >> 8) as u8
}

/// Pillow's un-premultiplication of one sample (`rgba2rgbA`, `la2lA`).
#[inline]
fn unpremultiply(c: u8, alpha: u8) -> u8 {
    if alpha == 0 || alpha == 255 {
        c
    } else {
        ((255 * u32::from(c)) / u32::from(alpha)).min(255) as u8
    }
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

    /// Pillow's `convert("RGB")`: alpha dropped (not composited), grey
    /// replicated, palette expanded, `I;16` clipped to 0..=255.
    pub fn to_rgb8(&self) -> RgbImage {
        match &self.bands {
            Bands::Rgb(i) => i.clone(),
            Bands::Rgba(i) => map_pixels(i, |p| [p[0], p[1], p[2]]),
            Bands::Gray(i) => map_pixels(i, |p| [p[0], p[0], p[0]]),
            Bands::GrayAlpha(i) => map_pixels(i, |p| [p[0], p[0], p[0]]),
            Bands::Gray16(i) => map_pixels(i, |p| {
                let v = p[0].min(255) as u8;
                [v, v, v]
            }),
        }
    }

    /// Pillow's `Image.resize((width, height))` with its default filter, in
    /// this image's mode: nearest neighbour for `P` and `1`, bicubic for the
    /// rest, with `RGBA`/`LA` premultiplied by alpha around the resize (and
    /// un-premultiplied after, as Pillow does). The mode is kept, so
    /// `resize_like_pil(w, h).to_rgb8()` is `im.resize((w, h)).convert("RGB")`.
    ///
    /// A zero width or height gives an empty image (Pillow raises instead).
    pub fn resize_like_pil(&self, width: u32, height: u32) -> DecodedImage {
        if (width, height) == self.dimensions() {
            return self.clone();
        }
        let filter = match self.mode {
            PilMode::P | PilMode::Bilevel => Filter::Nearest,
            _ => Filter::Bicubic,
        };
        let bands = match &self.bands {
            Bands::Gray(i) => Bands::Gray(resize::resize(i, width, height, filter)),
            Bands::Rgb(i) => Bands::Rgb(resize::resize(i, width, height, filter)),
            Bands::GrayAlpha(i) if filter == Filter::Nearest => {
                Bands::GrayAlpha(resize::resize(i, width, height, filter))
            }
            Bands::Rgba(i) if filter == Filter::Nearest => {
                Bands::Rgba(resize::resize(i, width, height, filter))
            }
            Bands::GrayAlpha(i) => {
                let pre: GrayAlphaImage = map_pixels(i, |p| [muldiv255(p[0], p[1]), p[1]]);
                let out = resize::resize(&pre, width, height, filter);
                Bands::GrayAlpha(map_pixels(&out, |p| [unpremultiply(p[0], p[1]), p[1]]))
            }
            Bands::Rgba(i) => {
                let pre: RgbaImage = map_pixels(i, |p| {
                    [
                        muldiv255(p[0], p[3]),
                        muldiv255(p[1], p[3]),
                        muldiv255(p[2], p[3]),
                        p[3],
                    ]
                });
                let out = resize::resize(&pre, width, height, filter);
                Bands::Rgba(map_pixels(&out, |p| {
                    [
                        unpremultiply(p[0], p[3]),
                        unpremultiply(p[1], p[3]),
                        unpremultiply(p[2], p[3]),
                        p[3],
                    ]
                }))
            }
            Bands::Gray16(i) => {
                let (w, h) = i.dimensions();
                let data = resize::resize_i16(
                    i.as_raw(),
                    w as usize,
                    h as usize,
                    width as usize,
                    height as usize,
                    filter,
                );
                Bands::Gray16(from_raw_or_empty(width, height, data))
            }
        };
        DecodedImage {
            format: self.format,
            mode: self.mode,
            bands,
        }
    }
}

#[cfg(test)]
mod tests {
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
}
