//! The CLIP image processor: RGB image in, normalised pixel tile out.
//!
//! Owns: [`ClipImageProcessor`], a reimplementation of transformers 4.45.2
//! `CLIPImageProcessor` configured from a Hub `preprocessor_config.json`:
//!
//! 1. resize (Pillow-exact, see [`super::resize`]) so the shortest edge is
//!    `size.shortest_edge` and the other is `int(long * shortest / short)`, or
//!    to exactly `size.height x size.width`;
//! 2. center-crop to `crop_size`, offset `(size - crop) // 2`, padding with
//!    zeros when the image is smaller, as transformers' `center_crop` does;
//! 3. rescale (`float32(float64(v) * rescale_factor)`, as numpy does it);
//! 4. normalise in `float32`: `(x - mean) / std`.
//!
//! Steps 1 and 2 are done together: only the pixels of the resized image
//! that the crop keeps are computed ([`resize::resize_interleaved_region`]),
//! bit for bit what resizing everything and cropping gives, so the memory
//! and time of an image follow the crop size, never its aspect ratio (a
//! 32768x1 image would otherwise be resized to 7340032x224 first).
//!
//! Steps 3 and 4 only ever see 8-bit values, so they are a per-channel
//! lookup table computed once with exactly those operations.
//!
//! Converting to RGB (`do_convert_rgb`) is the caller's job: pass
//! [`crate::preprocess::image::DecodedImage::to_rgb8`]. Unlike transformers,
//! every image is treated as height x width x channels (transformers guesses
//! the channel axis from the shape and gets images 1 or 3 pixels tall wrong).

use std::path::Path;

use image::RgbImage;
use serde_json::Value;

use super::resize::{self, Filter};
use super::{Pixels, SetupError};

/// The file whose keys this module reads.
const CONFIG_FILE: &str = "preprocessor_config.json";

/// transformers' `OPENAI_CLIP_MEAN`.
const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// transformers' `OPENAI_CLIP_STD`.
const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// How an image is resized before cropping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTo {
    /// Shortest edge to this length, keeping the aspect ratio
    /// (`{"shortest_edge": n}`, or a plain integer `size`).
    ShortestEdge(u32),
    /// Exactly this size (`{"height": h, "width": w}`).
    Exact {
        /// Output height.
        height: u32,
        /// Output width.
        width: u32,
    },
}

/// transformers' `CLIPImageProcessor`, as configured by a
/// `preprocessor_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipImageProcessor {
    do_resize: bool,
    size: ResizeTo,
    resample: Filter,
    do_center_crop: bool,
    /// (height, width)
    crop: (u32, u32),
    do_rescale: bool,
    rescale_factor: f64,
    do_normalize: bool,
    image_mean: [f32; 3],
    image_std: [f32; 3],
    /// Normalised value of every 8-bit sample, per channel.
    lut: Box<[[f32; 256]; 3]>,
}

impl Default for ClipImageProcessor {
    /// transformers' defaults: shortest edge 224, bicubic, center crop 224x224,
    /// rescale by 1/255, OpenAI CLIP mean and std.
    fn default() -> Self {
        ClipImageProcessor {
            do_resize: true,
            size: ResizeTo::ShortestEdge(224),
            resample: Filter::Bicubic,
            do_center_crop: true,
            crop: (224, 224),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: OPENAI_CLIP_MEAN.map(|v| v as f32),
            image_std: OPENAI_CLIP_STD.map(|v| v as f32),
            lut: Box::new([[0.0; 256]; 3]),
        }
        .with_lut()
    }
}

/// A configuration error in `preprocessor_config.json` (the model's files
/// are wrong, not the client).
fn bad_config(msg: impl std::fmt::Display) -> SetupError {
    SetupError::invalid(CONFIG_FILE, msg)
}

fn get_bool(
    obj: &serde_json::Map<String, Value>,
    key: &str,
    default: bool,
) -> Result<bool, SetupError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(bad_config(format!("{key} must be a boolean, got {other}"))),
    }
}

fn as_dim(v: &Value, what: &str) -> Result<u32, SetupError> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .filter(|&n| n > 0)
        .ok_or_else(|| bad_config(format!("{what} must be a positive integer, got {v}")))
}

/// transformers' `get_size_dict`: an integer is a square when
/// `default_to_square`, else a shortest edge; a list is `[height, width]`.
fn parse_size(v: &Value, key: &str, default_to_square: bool) -> Result<ResizeTo, SetupError> {
    match v {
        Value::Number(_) => {
            let n = as_dim(v, key)?;
            Ok(if default_to_square {
                ResizeTo::Exact {
                    height: n,
                    width: n,
                }
            } else {
                ResizeTo::ShortestEdge(n)
            })
        }
        Value::Array(items) if items.len() == 2 => Ok(ResizeTo::Exact {
            height: as_dim(&items[0], key)?,
            width: as_dim(&items[1], key)?,
        }),
        Value::Object(map) => {
            if let Some(edge) = map.get("shortest_edge") {
                // CLIPImageProcessor.resize ignores a `longest_edge` beside it.
                let extra = map
                    .keys()
                    .any(|k| k != "shortest_edge" && k != "longest_edge");
                if extra {
                    return Err(bad_config(format!("unexpected keys in {key}: {v}")));
                }
                Ok(ResizeTo::ShortestEdge(as_dim(edge, key)?))
            } else if let (Some(h), Some(w), 2) = (map.get("height"), map.get("width"), map.len()) {
                Ok(ResizeTo::Exact {
                    height: as_dim(h, key)?,
                    width: as_dim(w, key)?,
                })
            } else {
                Err(bad_config(format!(
                    "{key} must have \"shortest_edge\" or \"height\" and \"width\", got {v}"
                )))
            }
        }
        other => Err(bad_config(format!("cannot read {key} from {other}"))),
    }
}

/// A mean or std: one number for every channel, or a list of three.
fn parse_triple(v: &Value, key: &str) -> Result<[f32; 3], SetupError> {
    let num = |x: &Value| {
        x.as_f64()
            .ok_or_else(|| bad_config(format!("{key} must hold numbers, got {x}")))
    };
    match v {
        Value::Number(_) => {
            let x = num(v)? as f32;
            Ok([x, x, x])
        }
        Value::Array(items) if items.len() == 3 => Ok([
            num(&items[0])? as f32,
            num(&items[1])? as f32,
            num(&items[2])? as f32,
        ]),
        other => Err(bad_config(format!(
            "{key} must be a number or a list of 3 numbers, got {other}"
        ))),
    }
}

impl ClipImageProcessor {
    /// The processor with its lookup table filled from its settings (the
    /// table built with it is a placeholder).
    fn with_lut(mut self) -> Self {
        let (do_rescale, rescale_factor) = (self.do_rescale, self.rescale_factor);
        let (do_normalize, image_mean, image_std) =
            (self.do_normalize, self.image_mean, self.image_std);
        for (c, table) in self.lut.iter_mut().enumerate() {
            for (v, out) in table.iter_mut().enumerate() {
                // numpy: uint8 * python float -> float64, then astype(float32).
                let x = if do_rescale {
                    (v as f64 * rescale_factor) as f32
                } else {
                    v as f32
                };
                // transformers' normalize: float32 arithmetic throughout.
                *out = if do_normalize {
                    (x - image_mean[c]) / image_std[c]
                } else {
                    x
                };
            }
        }
        self
    }

    /// Reads a Hub-layout `preprocessor_config.json` (the JSON text).
    pub fn from_json_str(json: &str) -> Result<Self, SetupError> {
        let value: Value = serde_json::from_str(json).map_err(bad_config)?;
        Self::from_value(&value)
    }

    /// Reads a `preprocessor_config.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, SetupError> {
        let path = path.as_ref();
        Self::from_value(&SetupError::read_json(path)?).map_err(|e| match e {
            // Name the file by its path, not only its usual name.
            SetupError::Invalid { message, .. } => SetupError::invalid(path.display(), message),
            other => other,
        })
    }

    /// Builds the processor from a parsed `preprocessor_config.json`. Missing
    /// keys take transformers' `CLIPImageProcessor` defaults; unknown keys are
    /// ignored. A malformed value is a [`SetupError::Invalid`].
    pub fn from_value(config: &Value) -> Result<Self, SetupError> {
        let obj = config
            .as_object()
            .ok_or_else(|| bad_config("expected a JSON object"))?;
        let do_resize = get_bool(obj, "do_resize", true)?;
        let mut size = match obj.get("size") {
            None | Some(Value::Null) => ResizeTo::ShortestEdge(224),
            Some(v) => parse_size(v, "size", false)?,
        };
        if get_bool(obj, "use_square_size", false)? {
            if let ResizeTo::ShortestEdge(n) = size {
                size = ResizeTo::Exact {
                    height: n,
                    width: n,
                };
            }
        }
        let resample = match obj.get("resample") {
            None | Some(Value::Null) => Filter::Bicubic,
            Some(v) => v
                .as_i64()
                .and_then(Filter::from_pil_code)
                .ok_or_else(|| bad_config(format!("unknown resample {v}")))?,
        };
        let do_center_crop = get_bool(obj, "do_center_crop", true)?;
        let crop = match obj.get("crop_size") {
            None | Some(Value::Null) => (224, 224),
            Some(v) => match parse_size(v, "crop_size", true)? {
                ResizeTo::Exact { height, width } => (height, width),
                ResizeTo::ShortestEdge(_) => {
                    return Err(bad_config(format!(
                        "crop_size must be a size or {{\"height\", \"width\"}}, got {v}"
                    )))
                }
            },
        };
        let do_rescale = get_bool(obj, "do_rescale", true)?;
        let rescale_factor = match obj.get("rescale_factor") {
            None | Some(Value::Null) => 1.0 / 255.0,
            Some(v) => v
                .as_f64()
                .ok_or_else(|| bad_config(format!("rescale_factor must be a number, got {v}")))?,
        };
        let do_normalize = get_bool(obj, "do_normalize", true)?;
        let image_mean = match obj.get("image_mean") {
            None | Some(Value::Null) => OPENAI_CLIP_MEAN.map(|v| v as f32),
            Some(v) => parse_triple(v, "image_mean")?,
        };
        let image_std = match obj.get("image_std") {
            None | Some(Value::Null) => OPENAI_CLIP_STD.map(|v| v as f32),
            Some(v) => parse_triple(v, "image_std")?,
        };
        // `do_convert_rgb` is accepted and ignored: images always reach
        // `preprocess` as RGB.
        get_bool(obj, "do_convert_rgb", true)?;
        Ok(ClipImageProcessor {
            do_resize,
            size,
            resample,
            do_center_crop,
            crop,
            do_rescale,
            rescale_factor,
            do_normalize,
            image_mean,
            image_std,
            lut: Box::new([[0.0; 256]; 3]),
        }
        .with_lut())
    }

    /// The center-crop size as `(height, width)`: the size of every tile
    /// [`preprocess`](Self::preprocess) returns when `do_center_crop` is set
    /// (as in every CLIP config).
    pub fn crop_size(&self) -> (usize, usize) {
        (self.crop.0 as usize, self.crop.1 as usize)
    }

    /// Whether the output is center-cropped (always so for CLIP models).
    pub fn center_crops(&self) -> bool {
        self.do_center_crop
    }

    /// The size `(width, height)` the resize step gives an image of
    /// `width x height` (the image's own size when `do_resize` is off).
    pub fn resized_size(&self, width: u32, height: u32) -> (u32, u32) {
        if !self.do_resize {
            return (width, height);
        }
        match self.size {
            ResizeTo::Exact { height, width } => (width, height),
            ResizeTo::ShortestEdge(edge) => {
                let (short, long) = if width <= height {
                    (width, height)
                } else {
                    (height, width)
                };
                if short == 0 {
                    return (width, height);
                }
                // Python: int(edge * long / short), a float64 division truncated.
                let new_long = (f64::from(edge) * f64::from(long) / f64::from(short)) as u32;
                if width <= height {
                    (edge, new_long)
                } else {
                    (new_long, edge)
                }
            }
        }
    }

    /// Runs the processor on one RGB image: one tile of channel-first
    /// normalised values, `3 x crop_height x crop_width` (or the resized size
    /// when `do_center_crop` is off).
    pub fn preprocess(&self, img: &RgbImage) -> Pixels {
        let (w, h) = img.dimensions();
        let (rw, rh) = self.resized_size(w, h);
        let (out_h, out_w) = if self.do_center_crop {
            self.crop
        } else {
            (rh, rw)
        };
        let (out_h, out_w) = (out_h as usize, out_w as usize);
        // transformers' center_crop, per axis: crop at (size - crop) // 2 when
        // the image is large enough, else pad with ceil((crop - size) / 2)
        // zeros before the image.
        let place = |size: usize, crop: usize| -> (usize, usize, usize) {
            // (first source index, first output index, count)
            if size >= crop {
                ((size - crop) / 2, 0, crop)
            } else {
                (0, (crop - size).div_ceil(2), size)
            }
        };
        let (sy, oy, ny) = place(rh as usize, out_h);
        let (sx, ox, nx) = place(rw as usize, out_w);
        // Only the part of the resized image that survives the crop is
        // computed (bit for bit what resizing everything and cropping
        // gives): the work and memory follow the crop, not the aspect ratio
        // (a 32768x1 image would otherwise become 7340032x224 first).
        let region = resize::Region {
            x: sx,
            y: sy,
            width: nx,
            height: ny,
        };
        let kept = resize::resize_interleaved_region(
            img.as_raw(),
            w as usize,
            h as usize,
            3,
            rw as usize,
            rh as usize,
            region,
            self.resample,
        );

        let plane = out_h * out_w;
        let mut data = vec![0f32; 3 * plane];
        for (c, out_plane) in data.chunks_exact_mut(plane.max(1)).enumerate().take(3) {
            let table = &self.lut[c];
            // Padding is the value 0, normalised.
            out_plane.fill(table[0]);
            if nx == 0 {
                continue;
            }
            for (row, src) in kept.chunks_exact(nx * 3).take(ny).enumerate() {
                let dst_row = (oy + row) * out_w + ox;
                for (dst, px) in out_plane[dst_row..dst_row + nx]
                    .iter_mut()
                    .zip(src[c..].iter().step_by(3))
                {
                    *dst = table[usize::from(*px)];
                }
            }
        }
        Pixels {
            data,
            tiles: 1,
            height: out_h,
            width: out_w,
        }
    }

    /// The rescale factor (1/255 in every CLIP config).
    pub fn rescale_factor(&self) -> Option<f64> {
        self.do_rescale.then_some(self.rescale_factor)
    }

    /// Per-channel mean and std when normalising is on.
    pub fn normalization(&self) -> Option<([f32; 3], [f32; 3])> {
        self.do_normalize
            .then_some((self.image_mean, self.image_std))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BGE_VL_BASE: &str = r#"{
      "crop_size": {"height": 224, "width": 224},
      "do_center_crop": true,
      "do_convert_rgb": true,
      "do_normalize": true,
      "do_rescale": true,
      "do_resize": true,
      "image_mean": [0.48145466, 0.4578275, 0.40821073],
      "image_processor_type": "CLIPImageProcessor",
      "image_std": [0.26862954, 0.26130258, 0.27577711],
      "resample": 3,
      "rescale_factor": 0.00392156862745098,
      "size": {"shortest_edge": 224}
    }"#;

    #[test]
    fn parses_hub_config_and_matches_defaults() {
        let p = ClipImageProcessor::from_json_str(BGE_VL_BASE).unwrap();
        assert_eq!(p, ClipImageProcessor::default());
        assert_eq!(p.crop_size(), (224, 224));
        // serde_json reads transformers' printed 1/255 back exactly.
        assert_eq!(p.rescale_factor(), Some(1.0 / 255.0));
    }

    #[test]
    fn parses_legacy_and_alternative_forms() {
        let p = ClipImageProcessor::from_json_str(r#"{"size": 336, "crop_size": 336}"#).unwrap();
        assert_eq!(p.size, ResizeTo::ShortestEdge(336));
        assert_eq!(p.crop_size(), (336, 336));
        let p = ClipImageProcessor::from_json_str(
            r#"{"size": {"height": 30, "width": 40}, "crop_size": [20, 10], "resample": 2,
                "image_mean": 0.5, "image_std": [1, 2, 3]}"#,
        )
        .unwrap();
        assert_eq!(
            p.size,
            ResizeTo::Exact {
                height: 30,
                width: 40
            }
        );
        assert_eq!(p.crop_size(), (20, 10));
        assert_eq!(p.resample, Filter::Bilinear);
        assert_eq!(p.normalization(), Some(([0.5; 3], [1.0, 2.0, 3.0])));
        let p =
            ClipImageProcessor::from_json_str(r#"{"size": 224, "use_square_size": true}"#).unwrap();
        assert_eq!(p.resized_size(640, 480), (224, 224));
    }

    #[test]
    fn rejects_malformed_configs() {
        for bad in [
            "[]",
            "not json",
            r#"{"size": {"longest_edge": 3}}"#,
            r#"{"size": -1}"#,
            r#"{"crop_size": {"shortest_edge": 3}}"#,
            r#"{"resample": 9}"#,
            r#"{"image_mean": [1, 2]}"#,
            r#"{"do_resize": "yes"}"#,
        ] {
            assert!(
                matches!(
                    ClipImageProcessor::from_json_str(bad),
                    Err(SetupError::Invalid { .. })
                ),
                "{bad}"
            );
        }
        assert!(ClipImageProcessor::from_file("/nonexistent/preprocessor_config.json").is_err());
    }

    #[test]
    fn resized_size_follows_transformers() {
        let p = ClipImageProcessor::default();
        assert_eq!(p.resized_size(640, 480), (298, 224));
        assert_eq!(p.resized_size(480, 640), (224, 298));
        assert_eq!(p.resized_size(3504, 2336), (336, 224));
        assert_eq!(p.resized_size(1000, 40), (5600, 224));
        assert_eq!(p.resized_size(224, 224), (224, 224));
        assert_eq!(p.resized_size(1, 1), (224, 224));
        // int(224 * 333 / 100) = int(745.92) = 745
        assert_eq!(p.resized_size(333, 100), (745, 224));
    }

    #[test]
    fn normalises_with_float32_arithmetic() {
        let p = ClipImageProcessor::default();
        let img = RgbImage::from_pixel(224, 224, image::Rgb([0, 128, 255]));
        let px = p.preprocess(&img);
        assert_eq!((px.tiles, px.height, px.width), (1, 224, 224));
        assert_eq!(px.data.len(), 3 * 224 * 224);
        let expect = |v: u8, c: usize| {
            let x = (f64::from(v) * (1.0 / 255.0)) as f32;
            (x - OPENAI_CLIP_MEAN[c] as f32) / OPENAI_CLIP_STD[c] as f32
        };
        assert_eq!(px.data[0], expect(0, 0));
        assert_eq!(px.data[224 * 224], expect(128, 1));
        assert_eq!(px.data[2 * 224 * 224 + 5], expect(255, 2));
        // Values computed once with transformers 4.45.2 (numpy float32).
        assert_eq!(px.data[0], -1.792_262_6);
        assert_eq!(px.data[2 * 224 * 224], 2.145_897);
        assert_eq!(px.data[224 * 224], 0.168_897_32);
    }

    #[test]
    fn center_crop_takes_the_middle_and_pads_small_images() {
        let p = ClipImageProcessor::from_json_str(
            r#"{"do_resize": false, "crop_size": {"height": 4, "width": 4},
                "do_rescale": false, "do_normalize": false}"#,
        )
        .unwrap();
        // 7 wide, 2 tall: columns 1..5 are kept, one zero row above, one below.
        let img = RgbImage::from_fn(7, 2, |x, y| image::Rgb([x as u8 + 10 * y as u8 + 1, 0, 0]));
        let px = p.preprocess(&img);
        let red: Vec<f32> = px.data[..16].to_vec();
        assert_eq!(
            red,
            vec![
                0.0, 0.0, 0.0, 0.0, //
                2.0, 3.0, 4.0, 5.0, //
                12.0, 13.0, 14.0, 15.0, //
                0.0, 0.0, 0.0, 0.0,
            ]
        );
        // Odd padding: 1 column wide into 4 -> ceil(3 / 2) = 2 zeros before.
        let img = RgbImage::from_pixel(1, 4, image::Rgb([9, 9, 9]));
        let px = p.preprocess(&img);
        assert_eq!(&px.data[..4], &[0.0, 0.0, 9.0, 0.0]);
    }

    #[test]
    fn empty_image_gives_a_padded_tile() {
        let p = ClipImageProcessor::default();
        let px = p.preprocess(&RgbImage::new(0, 0));
        assert_eq!(px.data.len(), 3 * 224 * 224);
    }

    /// The processor as it was before it resized only the crop: the whole
    /// resized image, then transformers' center crop (pads included).
    fn full_resize_then_crop(p: &ClipImageProcessor, img: &RgbImage) -> Vec<f32> {
        let (w, h) = img.dimensions();
        let (rw, rh) = p.resized_size(w, h);
        let resized = resize::resize(img, rw, rh, p.resample);
        let (out_h, out_w) = (p.crop.0 as usize, p.crop.1 as usize);
        let (src_w, src_h) = (rw as usize, rh as usize);
        let mut data = vec![0f32; 3 * out_h * out_w];
        for c in 0..3 {
            for y in 0..out_h {
                for x in 0..out_w {
                    // Output (x, y) reads source (x + sx - ox, y + sy - oy).
                    let pick = |o: usize, size: usize, crop: usize| -> Option<usize> {
                        if size >= crop {
                            Some(o + (size - crop) / 2)
                        } else {
                            let pad = (crop - size).div_ceil(2);
                            (o >= pad && o - pad < size).then(|| o - pad)
                        }
                    };
                    let v = match (pick(x, src_w, out_w), pick(y, src_h, out_h)) {
                        (Some(sx), Some(sy)) => resized.get_pixel(sx as u32, sy as u32).0[c],
                        _ => 0,
                    };
                    data[c * out_h * out_w + y * out_w + x] = p.lut[c][usize::from(v)];
                }
            }
        }
        data
    }

    /// Resizing only the crop gives exactly the old full resize + crop,
    /// including images smaller than the crop (padded) and extreme aspects.
    #[test]
    fn crop_only_resize_matches_full_resize_and_crop() {
        let processors = [
            ClipImageProcessor::default(),
            ClipImageProcessor::from_json_str(
                r#"{"size": 100, "crop_size": {"height": 60, "width": 90}}"#,
            )
            .unwrap(),
            ClipImageProcessor::from_json_str(
                r#"{"size": {"height": 50, "width": 30}, "crop_size": 40, "resample": 2}"#,
            )
            .unwrap(),
        ];
        let sizes = [
            (225, 223),
            (223, 225),
            (640, 480),
            (1000, 40),
            (40, 1000),
            (3000, 1),
            (1, 3000),
            (1, 1),
            (224, 224),
            (97, 13),
        ];
        for p in &processors {
            for &(w, h) in &sizes {
                let mut s = w * 31 + h;
                let data: Vec<u8> = (0..w * h * 3)
                    .map(|_| {
                        s ^= s << 13;
                        s ^= s >> 17;
                        s ^= s << 5;
                        (s >> 24) as u8
                    })
                    .collect();
                let img = RgbImage::from_raw(w, h, data).unwrap();
                assert!(
                    p.preprocess(&img).data == full_resize_then_crop(p, &img),
                    "{w}x{h} with {:?}",
                    p.size
                );
            }
        }
    }

    /// A constant grey PNG, compressed as tightly as the encoder can.
    fn small_png(width: u32, height: u32) -> Vec<u8> {
        use image::codecs::png::{CompressionType, FilterType, PngEncoder};
        use image::ImageEncoder;
        let img = image::GrayImage::from_pixel(width, height, image::Luma([77]));
        let mut png = Vec::new();
        PngEncoder::new_with_quality(&mut png, CompressionType::Best, FilterType::Adaptive)
            .write_image(img.as_raw(), width, height, image::ExtendedColorType::L8)
            .unwrap();
        png
    }

    /// A 32768x1 PNG (110 bytes) used to become a 7340032x224 RGB image
    /// (4.9 GB) before the crop; now the work is the 224x224 crop.
    #[test]
    fn extreme_aspect_png_costs_the_crop_only() {
        use crate::preprocess::image::{decode_image, ImageLimits};
        let p = ClipImageProcessor::default();
        for (w, h) in [(32768, 1), (1, 32768)] {
            let png = small_png(w, h);
            assert!(png.len() < 1000, "{}", png.len());
            let started = std::time::Instant::now();
            let decoded = decode_image(&png, &ImageLimits::default()).unwrap();
            let px = p.preprocess(&decoded.to_rgb8());
            assert!(started.elapsed() < std::time::Duration::from_secs(5));
            assert_eq!((px.tiles, px.height, px.width), (1, 224, 224));
            for c in 0..3 {
                let plane = &px.data[c * 224 * 224..(c + 1) * 224 * 224];
                assert!(plane.iter().all(|&v| v == p.lut[c][77]), "{w}x{h}");
            }
        }
    }
}
