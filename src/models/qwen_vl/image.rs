//! transformers 4.51.3 `Qwen2VLImageProcessor` (the PIL one; there is no
//! torchvision in the reference environment), and the image step of GME's
//! `fetch_image` (qwen_vl_utils' `smart_resize` + PIL resize).
//!
//! Owns: [`QwenImageProcessor`] (read from `preprocessor_config.json`),
//! [`smart_resize`] and [`fetch_size`] (pure size arithmetic, checked before
//! any pixel is decoded), [`GridThw`], and the patch flattening.
//!
//! Why the size arithmetic is in `f64` with `round_ties_even`: Python's
//! `round` rounds halves to even (a 182x70 image has 6.5 and 2.5 patches of
//! 28 pixels per side and becomes 168x56, not 196x84), and `math.floor` /
//! `math.ceil` of the same `f64` quotients give the same integers here.
//!
//! Resizing is Pillow-exact ([`resize::resize`]), after converting to RGB
//! (transformers' `convert_to_rgb`: alpha dropped) as the processor does.
//! The work and memory of a resize follow the decoded image and the target
//! size, both bounded before decoding (the decode limits; `max_pixels`).

use image::RgbImage;
use serde_json::Value;

use crate::preprocess::resize::{self, Filter};
use crate::preprocess::{SetupError, Size};

/// `(temporal, height, width)` in patches, as `image_grid_thw`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GridThw {
    pub t: usize,
    pub h: usize,
    pub w: usize,
}

impl GridThw {
    /// Patches (rows of flattened pixel values).
    pub fn patches(self) -> usize {
        self.t * self.h * self.w
    }
}

/// Why an image size cannot be processed (the client's image).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error(
        "the image is {width}x{height}: the model needs at least {factor} pixels on each side"
    )]
    TooSmall {
        width: u32,
        height: u32,
        factor: u32,
    },
    #[error("the image is {width}x{height}: its aspect ratio is over the model's limit of 200")]
    AspectRatio { width: u32, height: u32 },
    #[error("the image is {width}x{height}: it cannot be resized within {max_pixels} pixels in multiples of {factor}")]
    NoFit {
        width: u32,
        height: u32,
        factor: u32,
        max_pixels: u64,
    },
}

/// transformers 4.51.3 `smart_resize(height, width, factor, min_pixels,
/// max_pixels)` as a [`Size`] (width, height): sides rounded (half to even)
/// to multiples of `factor`, scaled down into `max_pixels` (floor) or up into
/// `min_pixels` (ceil), keeping the aspect ratio. Errs where transformers
/// raises (a side under `factor`, aspect ratio over 200) and where it would
/// make a side of 0 (PIL refuses that resize).
pub fn smart_resize(
    size: Size,
    factor: u32,
    min_pixels: u64,
    max_pixels: u64,
) -> Result<Size, SizeError> {
    let (w, h) = (size.width, size.height);
    if h < factor || w < factor {
        return Err(SizeError::TooSmall {
            width: w,
            height: h,
            factor,
        });
    }
    let (hf, wf, f) = (f64::from(h), f64::from(w), f64::from(factor));
    if hf.max(wf) / hf.min(wf) > 200.0 {
        return Err(SizeError::AspectRatio {
            width: w,
            height: h,
        });
    }
    let mut h_bar = (hf / f).round_ties_even() * f;
    let mut w_bar = (wf / f).round_ties_even() * f;
    let pixels = (u64::from(h) * u64::from(w)) as f64;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = (pixels / max_pixels as f64).sqrt();
        h_bar = (hf / beta / f).floor() * f;
        w_bar = (wf / beta / f).floor() * f;
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / pixels).sqrt();
        h_bar = (hf * beta / f).ceil() * f;
        w_bar = (wf * beta / f).ceil() * f;
    }
    to_size(w_bar, h_bar).ok_or(SizeError::NoFit {
        width: w,
        height: h,
        factor,
        max_pixels,
    })
}

/// A positive size from `f64` sides that fit `u32` (never larger than the
/// 32768-pixel sides the decoder accepts times a bounded scale).
fn to_size(w: f64, h: f64) -> Option<Size> {
    let ok = |v: f64| v >= 1.0 && v <= f64::from(u32::MAX);
    (ok(w) && ok(h)).then(|| Size::new(w as u32, h as u32))
}

/// The multiple of `fetch_image` (qwen_vl_utils' `IMAGE_FACTOR`).
pub const FETCH_FACTOR: u32 = 28;
/// qwen_vl_utils' `MIN_PIXELS` (4 tokens).
pub const FETCH_MIN_PIXELS: u64 = 4 * 28 * 28;
/// qwen_vl_utils' `MAX_PIXELS` (16384 tokens).
pub const FETCH_MAX_PIXELS: u64 = 16384 * 28 * 28;
/// qwen_vl_utils' `MAX_RATIO`.
pub const FETCH_MAX_RATIO: f64 = 200.0;

/// The size GME's `fetch_image` resizes an image to before the processor
/// sees it: qwen_vl_utils' `smart_resize` as `gme_inference.py` copies it
/// (sides at least 28, within 4..16384 tokens; an aspect ratio over 200 is
/// clamped, with a warning, instead of refused). `None` where it would make
/// a side of 0.
pub fn fetch_size(size: Size) -> Option<Size> {
    let (hf, wf, f) = (
        f64::from(size.height),
        f64::from(size.width),
        f64::from(FETCH_FACTOR),
    );
    let mut h_bar = f.max((hf / f).round_ties_even() * f);
    let mut w_bar = f.max((wf / f).round_ties_even() * f);
    let pixels = size.pixels() as f64;
    if pixels == 0.0 {
        return None;
    }
    if h_bar * w_bar > FETCH_MAX_PIXELS as f64 {
        let beta = (pixels / FETCH_MAX_PIXELS as f64).sqrt();
        h_bar = (hf / beta / f).floor() * f;
        w_bar = (wf / beta / f).floor() * f;
    } else if h_bar * w_bar < FETCH_MIN_PIXELS as f64 {
        let beta = (FETCH_MIN_PIXELS as f64 / pixels).sqrt();
        h_bar = (hf * beta / f).ceil() * f;
        w_bar = (wf * beta / f).ceil() * f;
    }
    if h_bar < 1.0 || w_bar < 1.0 {
        return None;
    }
    if h_bar.max(w_bar) / h_bar.min(w_bar) > FETCH_MAX_RATIO {
        if h_bar > w_bar {
            h_bar = w_bar * FETCH_MAX_RATIO;
        } else {
            w_bar = h_bar * FETCH_MAX_RATIO;
        }
    }
    to_size(w_bar, h_bar)
}

/// The most pixels a configuration may allow per image (16384 merged
/// tokens of 28x28): bounds the vision tower's work whatever the files say.
pub const MAX_PIXELS_CAP: u64 = 16384 * 28 * 28;

/// transformers' `Qwen2VLImageProcessor` as `preprocessor_config.json`
/// configures it.
#[derive(Clone)]
pub struct QwenImageProcessor {
    min_pixels: u64,
    max_pixels: u64,
    patch: u32,
    temporal: u32,
    merge: u32,
    resample: Filter,
    /// Normalised value of every 8-bit sample, per channel.
    lut: Box<[[f32; 256]; 3]>,
}

impl std::fmt::Debug for QwenImageProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QwenImageProcessor")
            .field("min_pixels", &self.min_pixels)
            .field("max_pixels", &self.max_pixels)
            .field("patch", &self.patch)
            .field("temporal", &self.temporal)
            .field("merge", &self.merge)
            .field("resample", &self.resample)
            .finish_non_exhaustive()
    }
}

const OPENAI_CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const OPENAI_CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// The file [`QwenImageProcessor::from_value`] reads, for its errors.
const CONFIG_FILE: &str = "preprocessor_config.json";

fn bad(msg: impl std::fmt::Display) -> SetupError {
    SetupError::invalid(CONFIG_FILE, msg)
}

/// `min_pixels` / `max_pixels` that no image can be resized within.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("min_pixels {min} / max_pixels {max} must satisfy {floor} <= max_pixels <= {MAX_PIXELS_CAP} and min_pixels <= max_pixels")]
pub struct PixelBoundsError {
    pub min: u64,
    pub max: u64,
    /// One merged token's pixels (`factor²`): the least `max_pixels`.
    pub floor: u64,
}

fn get_u64(v: &Value, key: &str, default: u64) -> Result<u64, SetupError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x
            .as_u64()
            .ok_or_else(|| bad(format!("{key} must be a non-negative integer, got {x}"))),
    }
}

fn get_bool(v: &Value, key: &str, default: bool) -> Result<bool, SetupError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x
            .as_bool()
            .ok_or_else(|| bad(format!("{key} must be true or false, got {x}"))),
    }
}

fn get_triple(v: &Value, key: &str, default: [f32; 3]) -> Result<[f32; 3], SetupError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Number(n)) => {
            let x = n.as_f64().unwrap_or(f64::NAN) as f32;
            Ok([x; 3])
        }
        Some(Value::Array(a)) if a.len() == 3 => {
            let mut out = [0f32; 3];
            for (o, x) in out.iter_mut().zip(a) {
                *o = x
                    .as_f64()
                    .ok_or_else(|| bad(format!("{key} must hold numbers, got {x}")))?
                    as f32;
            }
            Ok(out)
        }
        Some(x) => Err(bad(format!("{key} must be three numbers, got {x}"))),
    }
}

impl QwenImageProcessor {
    /// Reads a parsed `preprocessor_config.json`. `min_pixels` / `max_pixels`
    /// default to transformers' 3136 and 1003520; `size` is ignored, as
    /// transformers 4.51.3's constructor ignores it.
    pub fn from_value(v: &Value) -> Result<Self, SetupError> {
        if !v.is_object() {
            return Err(bad("not a JSON object"));
        }
        if !get_bool(v, "do_resize", true)? {
            return Err(bad(
                "do_resize false is not supported (sides must be multiples of the patch grid)",
            ));
        }
        if !get_bool(v, "do_convert_rgb", true)? {
            return Err(bad("do_convert_rgb false is not supported"));
        }
        let patch = get_u64(v, "patch_size", 14)?;
        let temporal = get_u64(v, "temporal_patch_size", 2)?;
        let merge = get_u64(v, "merge_size", 2)?;
        if !(1..=64).contains(&patch) || !(1..=8).contains(&temporal) || !(1..=8).contains(&merge) {
            return Err(bad(format!(
                "patch_size {patch}, temporal_patch_size {temporal}, merge_size {merge} are out of range"
            )));
        }
        let resample = match v.get("resample") {
            None | Some(Value::Null) => Filter::Bicubic,
            Some(x) => x
                .as_i64()
                .and_then(Filter::from_pil_code)
                .ok_or_else(|| bad(format!("resample {x} is not a PIL filter")))?,
        };
        let do_rescale = get_bool(v, "do_rescale", true)?;
        let rescale_factor = match v.get("rescale_factor") {
            None | Some(Value::Null) => 1.0 / 255.0,
            Some(x) => x
                .as_f64()
                .ok_or_else(|| bad(format!("rescale_factor must be a number, got {x}")))?,
        };
        let do_normalize = get_bool(v, "do_normalize", true)?;
        let mean = get_triple(v, "image_mean", OPENAI_CLIP_MEAN)?;
        let std = get_triple(v, "image_std", OPENAI_CLIP_STD)?;
        if do_normalize && std.iter().any(|s| !s.is_finite() || *s == 0.0) {
            return Err(bad("image_std must be finite and non-zero"));
        }
        let mut lut = Box::new([[0f32; 256]; 3]);
        for (c, table) in lut.iter_mut().enumerate() {
            for (i, out) in table.iter_mut().enumerate() {
                // numpy: uint8 * python float -> float64, then float32; normalise in float32.
                let x = if do_rescale {
                    (i as f64 * rescale_factor) as f32
                } else {
                    i as f32
                };
                *out = if do_normalize {
                    (x - mean[c]) / std[c]
                } else {
                    x
                };
            }
        }
        let p = QwenImageProcessor {
            min_pixels: 0,
            max_pixels: 0,
            patch: patch as u32,
            temporal: temporal as u32,
            merge: merge as u32,
            resample,
            lut,
        };
        p.with_pixel_bounds(
            get_u64(v, "min_pixels", 56 * 56)?,
            get_u64(v, "max_pixels", 28 * 28 * 1280)?,
        )
        .map_err(bad)
    }

    /// The same processor with other `min_pixels` / `max_pixels` (a
    /// per-model setting, or a prompt format's own, as GME's).
    pub fn with_pixel_bounds(
        mut self,
        min_pixels: u64,
        max_pixels: u64,
    ) -> Result<Self, PixelBoundsError> {
        let f = u64::from(self.factor());
        if max_pixels < f * f || min_pixels > max_pixels || max_pixels > MAX_PIXELS_CAP {
            return Err(PixelBoundsError {
                min: min_pixels,
                max: max_pixels,
                floor: f * f,
            });
        }
        self.min_pixels = min_pixels;
        self.max_pixels = max_pixels;
        Ok(self)
    }

    pub fn min_pixels(&self) -> u64 {
        self.min_pixels
    }

    pub fn max_pixels(&self) -> u64 {
        self.max_pixels
    }

    pub fn patch_size(&self) -> u32 {
        self.patch
    }

    pub fn temporal_patch_size(&self) -> u32 {
        self.temporal
    }

    pub fn merge_size(&self) -> u32 {
        self.merge
    }

    /// Sides are multiples of this (`patch_size * merge_size`).
    pub fn factor(&self) -> u32 {
        self.patch * self.merge
    }

    /// Values per flattened patch (`3 * temporal * patch * patch`).
    pub fn patch_len(&self) -> usize {
        3 * (self.temporal * self.patch * self.patch) as usize
    }

    /// The size the processor resizes an image of `size` to.
    pub fn target_size(&self, size: Size) -> Result<Size, SizeError> {
        smart_resize(size, self.factor(), self.min_pixels, self.max_pixels)
    }

    /// The patch grid of an image resized to `target` (from [`Self::target_size`]).
    pub fn grid(&self, target: Size) -> GridThw {
        GridThw {
            t: 1,
            h: (target.height / self.patch) as usize,
            w: (target.width / self.patch) as usize,
        }
    }

    /// Tokens the language model sees for `grid`: `t * h * w / merge²`.
    pub fn merged_tokens(&self, grid: GridThw) -> usize {
        let m = self.merge as usize;
        grid.patches() / (m * m)
    }

    /// Resizes `img` to `target` (a [`Self::target_size`]) and flattens it
    /// into `grid.patches()` rows of [`Self::patch_len`] values, in the
    /// processor's order: merge blocks row by row, the `merge x merge`
    /// patches of a block row by row, each patch channel x temporal x
    /// row x column (a still image repeated over the temporal patch).
    pub fn patches(&self, img: &RgbImage, target: Size) -> (Vec<f32>, GridThw) {
        let resized;
        let src = if img.dimensions() == (target.width, target.height) {
            img
        } else {
            resized = resize::resize(img, target.width, target.height, self.resample);
            &resized
        };
        let grid = self.grid(target);
        let (p, m, tp) = (
            self.patch as usize,
            self.merge as usize,
            self.temporal as usize,
        );
        let width = target.width as usize;
        let raw = src.as_raw();
        let mut out = Vec::with_capacity(grid.patches() * self.patch_len());
        for bh in 0..grid.h / m {
            for bw in 0..grid.w / m {
                for mh in 0..m {
                    for mw in 0..m {
                        let y0 = (bh * m + mh) * p;
                        let x0 = (bw * m + mw) * p;
                        for c in 0..3 {
                            let table = &self.lut[c];
                            for _ in 0..tp {
                                for y in y0..y0 + p {
                                    let row = &raw[(y * width + x0) * 3..(y * width + x0 + p) * 3];
                                    out.extend(
                                        row[c..].iter().step_by(3).map(|&v| table[usize::from(v)]),
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
        (out, grid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sr(w: u32, h: u32, min: u64, max: u64) -> Result<(u32, u32), SizeError> {
        smart_resize(Size::new(w, h), 28, min, max).map(|s| (s.width, s.height))
    }

    #[test]
    fn smart_resize_follows_transformers() {
        // Half to even: 182/28 = 6.5 -> 6, 70/28 = 2.5 -> 2.
        assert_eq!(sr(182, 70, 3136, 50176), Ok((168, 56)));
        // 7.5 -> 8 (even), 3.5 -> 4.
        assert_eq!(sr(210, 98, 3136, 1_003_520), Ok((224, 112)));
        // Scaled down into max_pixels (floor), up into min_pixels (ceil).
        assert_eq!(sr(640, 480, 3136, 50176), Ok((252, 168)));
        assert_eq!(sr(30, 40, 3136, 50176), Ok((56, 84)));
        assert_eq!(sr(1000, 40, 3136, 50176), Ok((1008, 28)));
        assert!(matches!(
            sr(5, 3, 3136, 50176),
            Err(SizeError::TooSmall { .. })
        ));
        assert!(matches!(
            sr(27, 500, 3136, 50176),
            Err(SizeError::TooSmall { .. })
        ));
        assert!(matches!(
            sr(32768, 28, 3136, 50176),
            Err(SizeError::AspectRatio { .. })
        ));
        // 200 exactly is allowed.
        assert_eq!(sr(5600, 28, 3136, 12_845_056), Ok((5600, 28)));
        // A thin image whose short side would floor to 0 within max_pixels.
        assert!(matches!(
            sr(5600, 28, 784, 784),
            Err(SizeError::NoFit { .. })
        ));
        for (w, h) in [(640, 480), (1000, 40), (40, 1000), (3000, 2000), (29, 29)] {
            let (rw, rh) = sr(w, h, 3136, 50176).unwrap();
            assert!(
                rw % 28 == 0 && rh % 28 == 0 && u64::from(rw * rh) <= 50176,
                "{w}x{h}"
            );
        }
    }

    #[test]
    fn fetch_size_follows_gme() {
        let f = |w, h| fetch_size(Size::new(w, h)).map(|s| (s.width, s.height));
        assert_eq!(f(640, 480), Some((644, 476)));
        assert_eq!(f(5, 3), Some((84, 56)));
        // Ratio over 200: the long side is clamped to 200 x the short one.
        assert_eq!(f(32768, 1), Some((5600, 28)));
        assert_eq!(f(1, 32768), Some((28, 5600)));
        assert_eq!(f(0, 10), None);
    }

    #[test]
    fn patches_are_in_the_processors_order() {
        let v = serde_json::json!({"do_rescale": false, "do_normalize": false,
                                   "min_pixels": 3136, "max_pixels": 3136});
        let p = QwenImageProcessor::from_value(&v).unwrap();
        // 56x56: 4x4 patches, 2x2 merge blocks. Pixel value = its x (row 0) or a marker.
        let img = RgbImage::from_fn(56, 56, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let (data, grid) = p.patches(&img, Size::new(56, 56));
        assert_eq!(grid, GridThw { t: 1, h: 4, w: 4 });
        let n = p.patch_len();
        assert_eq!(n, 3 * 2 * 14 * 14);
        assert_eq!(data.len(), 16 * n);
        // Row 5: block (0, 1), inner (0, 1): patch row 0, patch column 3.
        let row = &data[5 * n..6 * n];
        assert_eq!(row[0], 42.0); // channel R = x of (x0 = 42, y0 = 0)
        assert_eq!(row[14 * 14 + 1], 43.0); // temporal copy, next column
        assert_eq!(row[2 * 14 * 14 + 14], 1.0); // channel G, second row: y = 1
        assert_eq!(row[4 * 14 * 14], 7.0); // channel B
                                           // Row 10: block (1, 0), inner (1, 0): patch row 3, column 0.
        assert_eq!(data[10 * n + 2 * 14 * 14], 42.0); // G = y0 = 42
    }
}
