//! Pillow-exact resampling of 8-bit images.
//!
//! Owns: [`resize`] (and its raw-buffer form [`resize_interleaved`]), which
//! reproduce `PIL.Image.resize` bit for bit for 8-bit images with 1 to 4
//! interleaved channels; [`resize_interleaved_region`], the same samples for
//! one rectangle of the output only (what a center crop keeps), at a cost
//! that follows the rectangle rather than the full output; and [`Filter`],
//! the resampling filters Pillow knows.
//!
//! Pillow's convolution filters (everything but [`Filter::Nearest`]) are a
//! separable convolution:
//!
//! * per axis, for every output sample, the filter is centred on the output
//!   pixel's centre mapped into the input (`(i + 0.5) * scale`); when
//!   downscaling, its support is widened by the scale factor;
//! * the taps that fall inside the image are evaluated in `f64`, normalised
//!   so they sum to one, then converted to fixed point with 22 fractional bits
//!   (rounded half away from zero);
//! * the horizontal pass runs first, into an 8-bit intermediate (each sample
//!   rounded and clamped), restricted to the input rows the vertical pass will
//!   read; then the vertical pass. Pillow 13 (the version the project's
//!   reference environment has) runs the vertical pass first instead when the
//!   height shrinks by more than twice as many pixels as the width; this
//!   module does the same;
//! * a pass is skipped when its dimension does not change.
//!
//! [`Filter::Nearest`] reproduces Pillow's affine nearest-neighbour scaling,
//! including its accumulation of the source position in `f64`.
//!
//! Everything here is integer arithmetic on the hot path: the coefficient
//! tables are computed once per call and the inner loops run over `u8` rows
//! into `i32` accumulators with no per-pixel allocation.

use image::{ImageBuffer, Pixel};

use crate::simd::simd_fn;

/// Fractional bits of Pillow's fixed-point coefficients (`32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;
/// The rounding term every accumulator starts from (one half, fixed point).
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// A resampling filter, with the same meaning (and the same integer codes) as
/// Pillow's `Image.Resampling`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Filter {
    /// Nearest neighbour (Pillow code 0). Pillow always uses it for
    /// palette (`P`) and bilevel (`1`) images.
    Nearest,
    /// Box (Pillow code 4): each output pixel averages the input pixels it covers.
    Box,
    /// Bilinear / triangle (Pillow code 2), support 1.
    Bilinear,
    /// Hamming-windowed sinc (Pillow code 5), support 1.
    Hamming,
    /// Bicubic with `a = -0.5` (Pillow code 3), support 2; Pillow's default.
    Bicubic,
    /// Lanczos-3 (Pillow code 1), support 3.
    Lanczos,
}

impl Filter {
    /// Every filter, in Pillow's order of support width.
    pub const ALL: [Filter; 6] = [
        Filter::Nearest,
        Filter::Box,
        Filter::Bilinear,
        Filter::Hamming,
        Filter::Bicubic,
        Filter::Lanczos,
    ];
}

impl Filter {
    /// The filter for Pillow's integer code (`PIL.Image.Resampling` value), as
    /// found in `resample` fields of Hub `preprocessor_config.json` files.
    pub fn from_pil_code(code: i64) -> Option<Filter> {
        match code {
            0 => Some(Filter::Nearest),
            1 => Some(Filter::Lanczos),
            2 => Some(Filter::Bilinear),
            3 => Some(Filter::Bicubic),
            4 => Some(Filter::Box),
            5 => Some(Filter::Hamming),
            _ => None,
        }
    }

    /// Pillow's integer code for this filter.
    pub fn pil_code(self) -> i64 {
        match self {
            Filter::Nearest => 0,
            Filter::Lanczos => 1,
            Filter::Bilinear => 2,
            Filter::Bicubic => 3,
            Filter::Box => 4,
            Filter::Hamming => 5,
        }
    }

    /// Half-width of the filter kernel at scale 1 (0 for nearest neighbour).
    fn support(self) -> f64 {
        match self {
            Filter::Nearest => 0.0,
            Filter::Box => 0.5,
            Filter::Bilinear | Filter::Hamming => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    /// The kernel, evaluated exactly as Pillow's `Resample.c` does.
    fn eval(self, x: f64) -> f64 {
        match self {
            Filter::Nearest => 0.0,
            Filter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    // Pillow writes these constants as C floats.
                    x.sin() / x * (f64::from(0.54f32) + f64::from(0.46f32) * x.cos())
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

/// Normalised convolution coefficients for one axis, Pillow's
/// `precompute_coeffs`.
struct FloatCoeffs {
    /// Per output sample: first input sample used, and how many are used.
    bounds: Vec<(usize, usize)>,
    /// Per output sample: `stride` weights (only the first `bounds[i].1`
    /// are meaningful; the rest are zero).
    weights: Vec<f64>,
    stride: usize,
}

impl FloatCoeffs {
    /// Coefficients of every output sample.
    fn new(in_size: usize, out_size: usize, filter: Filter) -> FloatCoeffs {
        FloatCoeffs::window(in_size, out_size, filter, 0..out_size)
    }

    /// Coefficients of the output samples in `window` only (entry `i` is
    /// output sample `window.start + i`). Each sample's taps depend on its
    /// own index alone, so they are exactly those of [`FloatCoeffs::new`].
    fn window(
        in_size: usize,
        out_size: usize,
        filter: Filter,
        window: std::ops::Range<usize>,
    ) -> FloatCoeffs {
        // Pillow computes the box extent in C floats, then the scale in double.
        let scale = f64::from(in_size as f32) / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        // Pillow's ksize; at least as large as any tap count below.
        let stride = (support.ceil() as usize) * 2 + 1;
        let ss = 1.0 / filterscale;

        let count = window.len();
        let mut bounds = Vec::with_capacity(count);
        let mut weights = vec![0f64; count * stride];
        for (xx, row) in window.zip(weights.chunks_exact_mut(stride)) {
            let center = (xx as f64 + 0.5) * scale;
            // `as` truncates toward zero like C's (int) cast; negative values
            // are clamped to zero either way.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            let len = (xmax - xmin).clamp(0, stride as i64) as usize;
            let xmin = xmin as usize;
            let mut ww = 0.0;
            for (x, tap) in row.iter_mut().enumerate().take(len) {
                let w = filter.eval(((x + xmin) as f64 - center + 0.5) * ss);
                *tap = w;
                ww += w;
            }
            if ww != 0.0 {
                for tap in row.iter_mut().take(len) {
                    *tap /= ww;
                }
            }
            bounds.push((xmin, len));
        }
        FloatCoeffs {
            bounds,
            weights,
            stride,
        }
    }

    /// Weights of output sample `i`, trimmed to its used taps.
    #[inline(always)]
    fn taps(&self, i: usize) -> (usize, &[f64]) {
        let (start, len) = self.bounds[i];
        (start, &self.weights[i * self.stride..i * self.stride + len])
    }
}

/// Fixed-point convolution coefficients for one axis (Pillow's
/// `precompute_coeffs` followed by `normalize_coeffs_8bpc`).
struct Coeffs {
    /// Per output sample: first input sample used, and how many are used.
    bounds: Vec<(usize, usize)>,
    /// Per output sample: `stride` fixed-point weights (only the first
    /// `bounds[i].1` are meaningful).
    weights: Vec<i32>,
    stride: usize,
}

impl Coeffs {
    #[cfg(test)]
    fn new(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
        Coeffs::window(in_size, out_size, filter, 0..out_size)
    }

    /// Fixed-point coefficients of the output samples in `window` only
    /// (see [`FloatCoeffs::window`]).
    fn window(
        in_size: usize,
        out_size: usize,
        filter: Filter,
        window: std::ops::Range<usize>,
    ) -> Coeffs {
        let float = FloatCoeffs::window(in_size, out_size, filter, window);
        let one = f64::from(1u32 << PRECISION_BITS);
        let weights = float
            .weights
            .iter()
            .map(|&k| {
                if k < 0.0 {
                    (k * one - 0.5) as i32
                } else {
                    (k * one + 0.5) as i32
                }
            })
            .collect();
        Coeffs {
            bounds: float.bounds,
            weights,
            stride: float.stride,
        }
    }

    /// Weights of output sample `i`, trimmed to its used taps.
    #[inline(always)]
    fn taps(&self, i: usize) -> (usize, &[i32]) {
        let (start, len) = self.bounds[i];
        (start, &self.weights[i * self.stride..i * self.stride + len])
    }

    /// The input samples the window reads, from its first tap to its last
    /// (empty for an empty window).
    fn input_span(&self) -> std::ops::Range<usize> {
        // The bounds grow with the output index, so this is the first
        // sample's start and the last one's end; min/max keeps it true
        // without relying on that.
        let start = self.bounds.iter().map(|b| b.0).min().unwrap_or(0);
        let end = self.bounds.iter().map(|b| b.0 + b.1).max().unwrap_or(0);
        start..end.max(start)
    }
}

/// Pillow's `clip8`: drop the fractional bits and clamp to `0..=255`.
#[inline(always)]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes an 8-bit image exactly as Pillow's `Image.resize((width, height),
/// filter)` does for a mode with the same channels (`L`, `LA`-premultiplied
/// (`La`), `RGB`, `RGBA`-premultiplied (`RGBa`), …).
///
/// This is the raw resampling: it does not premultiply alpha (Pillow's
/// `resize` converts `RGBA`/`LA` to premultiplied first; see
/// [`crate::preprocess::image::DecodedImage::resize_like_pil`]) and does not
/// switch palette images to nearest neighbour. A zero target dimension gives
/// an empty image (Pillow raises an error instead).
pub fn resize<P>(
    img: &ImageBuffer<P, Vec<u8>>,
    width: u32,
    height: u32,
    filter: Filter,
) -> ImageBuffer<P, Vec<u8>>
where
    P: Pixel<Subpixel = u8>,
{
    let (w, h) = img.dimensions();
    let channels = usize::from(P::CHANNEL_COUNT);
    let needed = w as usize * h as usize * channels;
    let data = resize_interleaved(
        &img.as_raw()[..needed],
        w as usize,
        h as usize,
        channels,
        width as usize,
        height as usize,
        filter,
    );
    match ImageBuffer::from_raw(width, height, data) {
        Some(out) => out,
        // `resize_interleaved` always returns exactly width * height * channels
        // samples, so this arm is never taken; an empty image keeps it total.
        None => ImageBuffer::new(0, 0),
    }
}

/// [`resize`] on a raw buffer of `height` rows of `width` pixels with
/// `channels` interleaved 8-bit samples each (1 to 4 channels are supported
/// with specialised loops; other counts work, more slowly).
///
/// Returns `new_width * new_height * channels` samples. If `src` is shorter
/// than `width * height * channels`, the missing samples read as zero.
pub fn resize_interleaved(
    src: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    new_width: usize,
    new_height: usize,
    filter: Filter,
) -> Vec<u8> {
    let all = Region {
        x: 0,
        y: 0,
        width: new_width,
        height: new_height,
    };
    resize_interleaved_region(
        src, width, height, channels, new_width, new_height, all, filter,
    )
}

/// A rectangle of an image: `width` columns from column `x`, `height` rows
/// from row `y`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub x: usize,
    pub y: usize,
    pub width: usize,
    pub height: usize,
}

impl Region {
    /// The part of `self` inside an image of `width` x `height`.
    fn clamp(self, width: usize, height: usize) -> Region {
        let x = self.x.min(width);
        let y = self.y.min(height);
        Region {
            x,
            y,
            width: self.width.min(width - x),
            height: self.height.min(height - y),
        }
    }

    fn columns(&self) -> std::ops::Range<usize> {
        self.x..self.x + self.width
    }

    fn rows(&self) -> std::ops::Range<usize> {
        self.y..self.y + self.height
    }
}

/// The `needed` samples a resize reads from `src`: its head, or `src`
/// padded with zeros when it is short (a caller's buffer shorter than its
/// stated size reads as black, never out of bounds); `None` when nothing is
/// needed (an empty image).
fn source<T: Copy + Default>(src: &[T], needed: usize) -> Option<std::borrow::Cow<'_, [T]>> {
    if needed == 0 {
        return None;
    }
    Some(match src.get(..needed) {
        Some(head) => std::borrow::Cow::Borrowed(head),
        None => {
            let mut v = src.to_vec();
            v.resize(needed, T::default());
            std::borrow::Cow::Owned(v)
        }
    })
}

/// The `region` of [`resize_interleaved`]'s output, computed without the
/// rest: bit for bit the same samples as resizing the whole image and
/// cropping, but the work and the memory follow the region (and the input
/// rows and columns its filter taps read), not the full output size. This
/// is what keeps a 32768x1 image resized to a 224-pixel short side and
/// center-cropped from materialising a 7340032x224 image.
///
/// Why it is exact: in each pass, an output sample depends only on its own
/// coefficients (a function of its index) and on the input samples under
/// its taps; the 8-bit intermediate of the first pass is rounded sample by
/// sample. Computing fewer samples changes none of the ones computed.
///
/// `region` is clipped to the `new_width x new_height` output; returns
/// `region.width * region.height * channels` samples (after clipping).
#[allow(clippy::too_many_arguments)]
pub fn resize_interleaved_region(
    src: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    new_width: usize,
    new_height: usize,
    region: Region,
    filter: Filter,
) -> Vec<u8> {
    let region = region.clamp(new_width, new_height);
    let out_len = region.width * region.height * channels;
    if out_len == 0 {
        return Vec::new();
    }
    let needed = width * height * channels;
    let Some(src) = source(src, needed) else {
        // Nothing to sample from: Pillow would fill with zeros.
        return vec![0; out_len];
    };
    let src = &src[..];
    if width == new_width && height == new_height {
        return crop(src, width, channels, region);
    }
    if filter == Filter::Nearest {
        return nearest(src, width, height, channels, new_width, new_height, region);
    }
    let size = Sizes {
        width,
        height,
        new_width,
        new_height,
    };
    match channels {
        1 => convolve::<1>(src, size, region, filter),
        2 => convolve::<2>(src, size, region, filter),
        3 => convolve::<3>(src, size, region, filter),
        4 => convolve::<4>(src, size, region, filter),
        _ => convolve_planes(src, size, channels, region, filter),
    }
}

/// The `region` of an image of `width`-pixel rows, copied out.
fn crop<T: Copy>(src: &[T], width: usize, channels: usize, region: Region) -> Vec<T> {
    let row_len = width * channels;
    let mut out = Vec::with_capacity(region.width * region.height * channels);
    for y in region.rows() {
        let row = &src[y * row_len..(y + 1) * row_len];
        out.extend_from_slice(&row[region.x * channels..(region.x + region.width) * channels]);
    }
    out
}

/// Input and output dimensions of one resize.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    width: usize,
    height: usize,
    new_width: usize,
    new_height: usize,
}

/// Resizes a 16-bit greyscale image (Pillow mode `I;16`) exactly as
/// Pillow's `Image.resize` does for that mode with a convolution filter:
/// `f64` coefficients, each pass rounded half away from zero and clipped to
/// `0..=65535` (Pillow's `_16bpc` loops).
///
/// [`Filter::Nearest`] uses the same nearest-neighbour sampling as the 8-bit
/// path; it has not been checked against Pillow for `I;16` (which goes
/// through its generic transform there).
///
/// Returns `new_width * new_height` samples; a short `src` reads as zeros.
pub fn resize_i16(
    src: &[u16],
    width: usize,
    height: usize,
    new_width: usize,
    new_height: usize,
    filter: Filter,
) -> Vec<u16> {
    let out_len = new_width * new_height;
    if out_len == 0 {
        return Vec::new();
    }
    let Some(src) = source(src, width * height) else {
        return vec![0; out_len];
    };
    let src = &src[..];
    if width == new_width && height == new_height {
        return src.to_vec();
    }
    if filter == Filter::Nearest {
        let all = Region {
            x: 0,
            y: 0,
            width: new_width,
            height: new_height,
        };
        return nearest(src, width, height, 1, new_width, new_height, all);
    }
    let need_horizontal = new_width != width;
    let need_vertical = new_height != height;
    let vert = FloatCoeffs::new(height, new_height, filter);
    let horiz = FloatCoeffs::new(width, new_width, filter);

    if need_horizontal && need_vertical && vertical_first(width, height, new_width, new_height) {
        let rows = vertical_pass_16(src, width, 0, new_height, &vert);
        return horizontal_pass_16(&rows, width, new_width, &horiz);
    }
    let first_row = vert.bounds.first().map_or(0, |b| b.0);
    let last_row = vert.bounds.last().map_or(0, |b| b.0 + b.1);
    let horizontal;
    let (rows, row_offset) = if need_horizontal {
        horizontal = horizontal_pass_16(
            &src[first_row * width..last_row * width],
            width,
            new_width,
            &horiz,
        );
        (&horizontal[..], first_row)
    } else {
        (src, 0)
    };
    if !need_vertical {
        return rows.to_vec();
    }
    vertical_pass_16(rows, new_width, row_offset, new_height, &vert)
}

/// Pillow's store of a 16-bit convolution result: `ROUND_UP` (half away
/// from zero), then `CLIP16` to `0..=65535`.
#[inline]
fn store16(ss: f64) -> u16 {
    let v = if ss >= 0.0 {
        (ss + 0.5) as i64
    } else {
        (ss - 0.5) as i64
    };
    v.clamp(0, 65535) as u16
}

fn horizontal_pass_16(
    src: &[u16],
    in_width: usize,
    out_width: usize,
    coeffs: &FloatCoeffs,
) -> Vec<u16> {
    let rows = src.len() / in_width.max(1);
    let mut out = vec![0u16; rows * out_width];
    for (src_row, out_row) in src
        .chunks_exact(in_width)
        .zip(out.chunks_exact_mut(out_width))
    {
        for (xx, o) in out_row.iter_mut().enumerate() {
            let (start, k) = coeffs.taps(xx);
            let mut ss = 0.0;
            for (&p, &w) in src_row[start..start + k.len()].iter().zip(k) {
                ss += f64::from(p) * w;
            }
            *o = store16(ss);
        }
    }
    out
}

fn vertical_pass_16(
    src: &[u16],
    row_len: usize,
    row_offset: usize,
    out_height: usize,
    coeffs: &FloatCoeffs,
) -> Vec<u16> {
    let mut out = vec![0u16; out_height * row_len];
    for (yy, out_row) in out.chunks_exact_mut(row_len).enumerate() {
        let (start, k) = coeffs.taps(yy);
        let start = start.saturating_sub(row_offset);
        for (xx, o) in out_row.iter_mut().enumerate() {
            let mut ss = 0.0;
            for (t, &w) in k.iter().enumerate() {
                ss += f64::from(src[(start + t) * row_len + xx]) * w;
            }
            *o = store16(ss);
        }
    }
    out
}

/// Any channel count: resample each channel as its own 1-channel image.
fn convolve_planes(
    src: &[u8],
    size: Sizes,
    channels: usize,
    region: Region,
    filter: Filter,
) -> Vec<u8> {
    let mut out = vec![0u8; region.width * region.height * channels];
    let mut plane = Vec::with_capacity(size.width * size.height);
    for c in 0..channels {
        plane.clear();
        plane.extend(src.iter().skip(c).step_by(channels));
        let resized = convolve::<1>(&plane, size, region, filter);
        for (dst, v) in out.iter_mut().skip(c).step_by(channels).zip(resized) {
            *dst = v;
        }
    }
    out
}

simd_fn! {
    /// Two-pass separable convolution, Pillow's `ImagingResampleInner`,
    /// computing only the output samples in `region` (which lies inside the
    /// output). `src` holds exactly `width * height * N` samples.
    ///
    /// Each pass reads only the input rows (columns) the other pass needs
    /// for the region, as Pillow trims its first pass to the rows the second
    /// reads; Pillow's pass order and pass skipping are decided from the
    /// full sizes, so the samples are those of the full resize.
    ///
    /// The loops are plain integer code that the compiler vectorises; on
    /// x86-64 the baseline instruction set has no packed 32-bit multiply, so
    /// the body is also compiled for AVX2 and picked at run time
    /// ([`crate::simd`]; about 3x faster). Results are identical either way:
    /// it is all exact integer arithmetic.
    fn convolve<const N: usize>(src: &[u8], size: Sizes, region: Region, filter: Filter) -> Vec<u8> {
        let Sizes {
            width,
            height,
            new_width,
            new_height,
        } = size;
        let need_horizontal = new_width != width;
        let need_vertical = new_height != height;
        let vert = Coeffs::window(height, new_height, filter, region.rows());
        let horiz = Coeffs::window(width, new_width, filter, region.columns());

        if need_horizontal && need_vertical && vertical_first(width, height, new_width, new_height) {
            // Vertical pass over the input columns the horizontal pass reads.
            let cols = horiz.input_span();
            let rows = vertical_pass(src, width * N, cols.start * N..cols.end * N, 0, &vert);
            return horizontal_pass::<N>(&rows, cols.len(), cols.start, &horiz);
        }

        // Input rows the vertical pass reads (Pillow trims the horizontal
        // pass to them); without a vertical pass, the region's own rows.
        let row_span = if need_vertical {
            vert.input_span()
        } else {
            region.rows()
        };
        let row_range = &src[row_span.start * width * N..row_span.end * width * N];
        let rows = if need_horizontal {
            horizontal_pass::<N>(row_range, width, 0, &horiz)
        } else {
            crop(
                row_range,
                width,
                N,
                Region {
                    y: 0,
                    height: row_span.len(),
                    ..region
                },
            )
        };
        if !need_vertical {
            return rows;
        }
        let row_len = region.width * N;
        vertical_pass(&rows, row_len, 0..row_len, row_span.start, &vert)
    }
}

/// Pillow 13's pass order (python-pillow/Pillow#9549): when both dimensions
/// change, the vertical pass runs first if the height loses more than twice
/// as many pixels as the width. Earlier Pillow releases always ran the
/// horizontal pass first; the two orders differ by at most a level or so per
/// sample, through the rounding of the 8-bit intermediate.
fn vertical_first(width: usize, height: usize, new_width: usize, new_height: usize) -> bool {
    let shrink_h = height as i64 - new_height as i64;
    let shrink_w = width as i64 - new_width as i64;
    shrink_h > 0 && shrink_h > 2 * shrink_w
}

/// Horizontal pass over every row of `src` (`in_width * N` samples per
/// row), one output sample per coefficient entry; the coefficients' input
/// indices count from column `col_offset` (the first column `src` holds).
#[inline(always)]
fn horizontal_pass<const N: usize>(
    src: &[u8],
    in_width: usize,
    col_offset: usize,
    coeffs: &Coeffs,
) -> Vec<u8> {
    let in_row_len = in_width * N;
    let out_row_len = coeffs.bounds.len() * N;
    let rows = src.len() / in_row_len.max(1);
    let mut out = vec![0u8; rows * out_row_len];
    if out_row_len == 0 {
        return out;
    }
    for (src_row, out_row) in src
        .chunks_exact(in_row_len.max(1))
        .zip(out.chunks_exact_mut(out_row_len))
    {
        for (xx, out_px) in out_row.chunks_exact_mut(N).enumerate() {
            let (start, k) = coeffs.taps(xx);
            let start = start - col_offset;
            let pixels = &src_row[start * N..(start + k.len()) * N];
            let mut acc = [HALF; N];
            for (px, &w) in pixels.chunks_exact(N).zip(k) {
                for c in 0..N {
                    acc[c] = acc[c].wrapping_add(i32::from(px[c]).wrapping_mul(w));
                }
            }
            for c in 0..N {
                out_px[c] = clip8(acc[c]);
            }
        }
    }
    out
}

/// Vertical pass, one output row per coefficient entry, over the samples
/// `cols` of each row. `src` rows are `row_len` samples; the coefficient
/// bounds refer to source rows counted from `row_offset`.
#[inline(always)]
fn vertical_pass(
    src: &[u8],
    row_len: usize,
    cols: std::ops::Range<usize>,
    row_offset: usize,
    coeffs: &Coeffs,
) -> Vec<u8> {
    let out_len = cols.len();
    let mut out = vec![0u8; coeffs.bounds.len() * out_len];
    if out_len == 0 {
        return out;
    }
    let mut acc = vec![0i32; out_len];
    for (yy, out_row) in out.chunks_exact_mut(out_len).enumerate() {
        let (start, k) = coeffs.taps(yy);
        acc.fill(HALF);
        let start = start - row_offset;
        for (t, &w) in k.iter().enumerate() {
            let at = (start + t) * row_len;
            let row = &src[at + cols.start..at + cols.end];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a = a.wrapping_add(i32::from(p).wrapping_mul(w));
            }
        }
        for (o, &a) in out_row.iter_mut().zip(acc.iter()) {
            *o = clip8(a);
        }
    }
    out
}

/// Pillow's nearest-neighbour resize (`ImagingScaleAffine`), restricted
/// to `region` of the output: the source coordinate starts at half a step
/// and is accumulated in `f64`, then truncated. The accumulation runs over
/// every output index before the region too (cheap arithmetic, nothing
/// stored), so the positions are exactly the full resize's.
fn nearest<T: Copy>(
    src: &[T],
    width: usize,
    height: usize,
    channels: usize,
    new_width: usize,
    new_height: usize,
    region: Region,
) -> Vec<T> {
    let positions = |in_size: usize, out_size: usize, window: std::ops::Range<usize>| {
        let step = f64::from(in_size as f32) / out_size as f64;
        let mut pos = step * 0.5;
        let mut table = Vec::with_capacity(window.len());
        for i in 0..window.end {
            if i >= window.start {
                // Coordinates never leave [0, in_size) for a plain resize, but
                // clamp anyway rather than trust float accumulation.
                table.push((pos as usize).min(in_size.saturating_sub(1)));
            }
            pos += step;
        }
        table
    };
    let xs = positions(width, new_width, region.columns());
    let ys = positions(height, new_height, region.rows());
    let in_row_len = width * channels;
    let mut out: Vec<T> = Vec::with_capacity(xs.len() * ys.len() * channels);
    for &y in &ys {
        let row = &src[y * in_row_len..(y + 1) * in_row_len];
        for &x in &xs {
            out.extend_from_slice(&row[x * channels..(x + 1) * channels]);
        }
    }
    out
}

#[cfg(test)]
mod tests;
