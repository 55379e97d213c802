//! Mode conversion: decoded samples rearranged into the layout of Pillow's
//! mode ([`bands_for_mode`]), and Pillow's `convert("RGB")` and
//! `resize` in the image's own mode ([`DecodedImage::to_rgb8`],
//! [`DecodedImage::resize_like_pil`]).

use image::{DynamicImage, GrayAlphaImage, ImageBuffer, RgbImage, RgbaImage};

use super::{Bands, DecodedImage, PilMode};
use crate::preprocess::resize::{self, Filter};

/// The `image` crate expands an n-bit BMP sample `v` to
/// `round(v * 255 / max)`; Pillow truncates (`v * 255 / max`). Both are
/// one-to-one, so the decoded value is mapped back to `v` and re-expanded.
pub(super) fn rescale_bmp16(img: &mut RgbImage, widths: [u32; 3]) {
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
pub(super) fn mode_from_color(img: &DynamicImage) -> PilMode {
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

/// High byte of a 16-bit sample, which is what Pillow keeps when it loads a
/// 16-bit colour image into an 8-bit mode.
#[inline]
fn msb(v: u16) -> u8 {
    (v >> 8) as u8
}

/// A sample format Pillow cannot load either.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("32-bit floating point samples")]
pub(super) struct FloatSamples;

/// Rearranges decoded samples into the layout of Pillow's `mode`.
/// Errs on sample formats Pillow cannot load either.
pub(super) fn bands_for_mode(mode: PilMode, img: DynamicImage) -> Result<Bands, FloatSamples> {
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
                return Err(FloatSamples)
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
                return Err(FloatSamples)
            }
            other => other.to_rgba8(),
        }),
    })
}

/// Builds an image of pixel type `Q` from one of pixel type `P`, pixel by pixel.
pub(super) fn map_pixels<P, Q, const M: usize>(
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
pub(super) fn from_raw_or_empty<Q: image::Pixel>(
    width: u32,
    height: u32,
    data: Vec<Q::Subpixel>,
) -> ImageBuffer<Q, Vec<Q::Subpixel>> {
    ImageBuffer::from_raw(width, height, data).unwrap_or_else(|| ImageBuffer::new(0, 0))
}

/// Pillow's `MULDIV255`: `a * b / 255`, rounded.
#[inline]
pub(super) fn muldiv255(a: u8, b: u8) -> u8 {
    let t = u32::from(a) * u32::from(b) + 128;
    (((t >> 8) + t) >> 8) as u8
}

/// Pillow's un-premultiplication of one sample (`rgba2rgbA`, `la2lA`).
#[inline]
pub(super) fn unpremultiply(c: u8, alpha: u8) -> u8 {
    if alpha == 0 || alpha == 255 {
        c
    } else {
        ((255 * u32::from(c)) / u32::from(alpha)).min(255) as u8
    }
}

impl DecodedImage {
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
