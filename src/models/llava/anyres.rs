//! LLaVA-NeXT any-resolution geometry: pure arithmetic on image sizes.
//!
//! Owns: the grid pinpoints ([`DEFAULT_PINPOINTS`],
//! [`parse_pinpoints`]), the best resolution for an image
//! ([`select_best_resolution`]), the size an image is resized to inside it
//! ([`patch_output_size`]), the tile grid ([`grid_shape`]), the unpadding of
//! the feature map ([`unpad_bounds`]) and the feature counts as the
//! processor ([`processor_feature_count`]) and the model
//! ([`model_feature_count`]) compute them.
//!
//! Both the preprocessor ([`super::preprocess`]) and the model
//! ([`super::model`]) depend on it, so the two compute the same geometry
//! without depending on each other. It knows nothing of pixels or tensors.

use serde_json::Value;

use crate::models::error::ConfigError;
use crate::preprocess::Size;

/// transformers' default `image_grid_pinpoints` (`[height, width]` pairs in
/// the config: `[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]`).
pub const DEFAULT_PINPOINTS: [Size; 5] = [
    Size::new(672, 336),
    Size::new(336, 672),
    Size::new(672, 672),
    Size::new(336, 1008),
    Size::new(1008, 336),
];

/// Reads `image_grid_pinpoints`: a non-empty list of `[height, width]` pairs.
pub fn parse_pinpoints(v: &Value) -> Result<Vec<Size>, ConfigError> {
    let err = || {
        ConfigError::Invalid(format!(
            "image_grid_pinpoints must be a list of [height, width] pairs, got {v}"
        ))
    };
    let list = v.as_array().ok_or_else(err)?;
    let mut out = Vec::with_capacity(list.len());
    for p in list {
        let pair = p.as_array().filter(|a| a.len() == 2).ok_or_else(err)?;
        let dim = |x: &Value| {
            x.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|&n| n > 0)
                .ok_or_else(err)
        };
        out.push(Size {
            height: dim(&pair[0])?,
            width: dim(&pair[1])?,
        });
    }
    if out.is_empty() {
        return Err("image_grid_pinpoints is empty".into());
    }
    Ok(out)
}

/// transformers' `select_best_resolution`: among `pinpoints`, the one
/// keeping the most of an image of `size`, then the least waste; the first
/// wins ties. `None` when `pinpoints` is empty.
pub fn select_best_resolution(size: Size, pinpoints: &[Size]) -> Option<Size> {
    let (oh, ow) = (f64::from(size.height), f64::from(size.width));
    let mut best = None;
    let mut max_effective: u64 = 0;
    let mut min_wasted = f64::INFINITY;
    for &p in pinpoints {
        let scale = (f64::from(p.width) / ow).min(f64::from(p.height) / oh);
        let dw = (ow * scale) as u64;
        let dh = (oh * scale) as u64;
        let effective = (dw * dh).min(size.pixels());
        let wasted = p.pixels() as f64 - effective as f64;
        if effective > max_effective || (effective == max_effective && wasted < min_wasted) {
            max_effective = effective;
            min_wasted = wasted;
            best = Some(p);
        }
    }
    best
}

/// `_get_patch_output_size`: the size an image of `size` is resized to
/// inside `target`, keeping its aspect.
pub fn patch_output_size(size: Size, target: Size) -> Size {
    let (oh, ow) = (f64::from(size.height), f64::from(size.width));
    let scale_w = f64::from(target.width) / ow;
    let scale_h = f64::from(target.height) / oh;
    if scale_w < scale_h {
        Size {
            width: target.width,
            height: ((oh * scale_w).ceil() as u32).min(target.height),
        }
    } else {
        Size {
            width: ((ow * scale_h).ceil() as u32).min(target.width),
            height: target.height,
        }
    }
}

/// `get_anyres_image_grid_shape`: the grid of `tile`-pixel tiles, as
/// (rows, columns), for an image of `size`. `None` without pinpoints or
/// with a zero tile.
pub fn grid_shape(size: Size, pinpoints: &[Size], tile: u32) -> Option<(usize, usize)> {
    if tile == 0 {
        return None;
    }
    let best = select_best_resolution(size, pinpoints)?;
    Some(((best.height / tile) as usize, (best.width / tile) as usize))
}

/// transformers 4.45.2 `unpad_image`: the rows `r0..r1` and columns `c0..c1`
/// of a `current` (rows, cols) feature map to keep for an image of
/// `original` size. Python float arithmetic (f64) throughout.
pub fn unpad_bounds(original: Size, current: (usize, usize)) -> (usize, usize, usize, usize) {
    let (oh, ow) = (f64::from(original.height), f64::from(original.width));
    let (ch, cw) = current;
    let original_aspect = ow / oh;
    let current_aspect = cw as f64 / ch as f64;
    if original_aspect > current_aspect {
        let scale = cw as f64 / ow;
        let new_h = (oh * scale) as usize;
        let pad = ch.saturating_sub(new_h) / 2;
        (pad, ch - pad, 0, cw)
    } else {
        let scale = ch as f64 / oh;
        let new_w = (ow * scale) as usize;
        let pad = cw.saturating_sub(new_w) / 2;
        (0, ch, pad, cw - pad)
    }
}

/// The number of image features the model makes for an image of `size`
/// (`pack_image_features`): base tile + unpadded grid with one newline per
/// row, for `tile`-pixel tiles of `patch`-pixel patches.
pub fn model_feature_count(size: Size, pinpoints: &[Size], tile: u32, patch: u32) -> Option<usize> {
    if patch == 0 {
        return None;
    }
    let (gh, gw) = grid_shape(size, pinpoints, tile)?;
    let p = (tile / patch) as usize;
    let (r0, r1, c0, c1) = unpad_bounds(size, (gh * p, gw * p));
    Some(p * p + (r1 - r0) * (c1 - c0 + 1))
}

/// `LlavaNextProcessor._get_number_of_features` minus the CLS token
/// ("default" strategy): the `<image>` tokens for an image of `size` with
/// `tile`-pixel tiles of `patch`-pixel patches. The processor's own integer
/// arithmetic, which the model's ([`model_feature_count`]) must agree with.
pub fn processor_feature_count(
    size: Size,
    pinpoints: &[Size],
    tile: u32,
    patch: u32,
) -> Option<usize> {
    let best = select_best_resolution(size, pinpoints)?;
    if tile == 0 || patch == 0 || size.width == 0 || size.height == 0 {
        return None;
    }
    let (scale_h, scale_w) = (i64::from(best.height / tile), i64::from(best.width / tile));
    let p = i64::from(tile / patch);
    let (h, w) = (i64::from(size.height), i64::from(size.width));
    let mut cur_h = p * scale_h;
    let mut cur_w = p * scale_w;
    if cur_h == 0 || cur_w == 0 {
        return None;
    }
    let original_aspect = w as f64 / h as f64;
    let current_aspect = cur_w as f64 / cur_h as f64;
    if original_aspect > current_aspect {
        let new_h = (h * cur_w).div_euclid(w);
        let pad = (cur_h - new_h).div_euclid(2);
        cur_h -= pad * 2;
    } else {
        let new_w = (w * cur_h).div_euclid(h);
        let pad = (cur_w - new_w).div_euclid(2);
        cur_w -= pad * 2;
    }
    let total = cur_h * cur_w + cur_h + p * p;
    usize::try_from(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A size from transformers' `(height, width)` order, as the expected
    /// values below were written.
    fn hw(height: u32, width: u32) -> Size {
        Size { width, height }
    }

    const LLAVA_16: [Size; 5] = DEFAULT_PINPOINTS;

    #[test]
    fn default_pinpoints_read_like_the_config() {
        let v = serde_json::json!([[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]);
        assert_eq!(parse_pinpoints(&v).unwrap(), DEFAULT_PINPOINTS.to_vec());
        assert!(parse_pinpoints(&serde_json::json!([])).is_err());
        assert!(parse_pinpoints(&serde_json::json!([[1, 0]])).is_err());
        assert!(parse_pinpoints(&serde_json::json!([[1, 2, 3]])).is_err());
    }

    #[test]
    fn best_resolution_follows_transformers() {
        let best = |h, w, p: &[Size]| select_best_resolution(hw(h, w), p);
        assert_eq!(best(512, 512, &LLAVA_16), Some(hw(672, 672)));
        assert_eq!(best(300, 1000, &LLAVA_16), Some(hw(336, 1008)));
        assert_eq!(best(480, 640, &LLAVA_16), Some(hw(672, 672)));
        assert_eq!(best(200, 500, &LLAVA_16), Some(hw(336, 672)));
        // Ties on effective resolution: the least waste, then the first.
        let b = [
            hw(48, 192),
            hw(192, 48),
            hw(96, 144),
            hw(144, 96),
            hw(96, 96),
        ];
        assert_eq!(best(512, 512, &b), Some(hw(96, 96)));
        let a = [hw(32, 64), hw(64, 32), hw(64, 64), hw(32, 96), hw(96, 32)];
        assert_eq!(best(512, 512, &a), Some(hw(64, 64)));
        assert_eq!(best(512, 512, &[]), None);
    }

    #[test]
    fn patch_output_size_keeps_the_aspect() {
        let out = |s: Size, t: Size| patch_output_size(s, t);
        assert_eq!(out(hw(512, 512), hw(672, 672)), hw(672, 672));
        assert_eq!(out(hw(512, 512), hw(96, 144)), hw(96, 96));
        assert_eq!(out(hw(300, 1000), hw(336, 1008)), hw(303, 1008));
        assert_eq!(out(hw(1000, 300), hw(1008, 336)), hw(1008, 303));
    }

    #[test]
    fn feature_counts_follow_the_processor_and_the_model() {
        // llava-v1.6-mistral: 576 base + 48 rows of 48 + 48 newlines.
        let square = Size::square(512);
        assert_eq!(
            processor_feature_count(square, &LLAVA_16, 336, 14),
            Some(2928)
        );
        assert_eq!(model_feature_count(square, &LLAVA_16, 336, 14), Some(2928));
        assert_eq!(grid_shape(square, &LLAVA_16, 336), Some((2, 2)));
        // tiny fixture A: 32px tiles of 8px patches, 2x2 grid: 16 + 8 * 9.
        let a = [hw(32, 64), hw(64, 32), hw(64, 64), hw(32, 96), hw(96, 32)];
        assert_eq!(processor_feature_count(square, &a, 32, 8), Some(88));
        assert_eq!(model_feature_count(square, &a, 32, 8), Some(88));
        // A wide image: best 336x1008 (1x3), 24x72 patches, unpadded rows.
        // new_h = 300 * 72 // 1000 = 21, pad 1 -> 22 rows of 72 + 22 newlines + 576.
        assert_eq!(
            processor_feature_count(hw(300, 1000), &LLAVA_16, 336, 14),
            Some(22 * 73 + 576)
        );
        assert_eq!(grid_shape(square, &LLAVA_16, 0), None);
    }

    #[test]
    fn unpad_follows_transformers_arithmetic() {
        // Square image in a square grid: nothing removed.
        assert_eq!(unpad_bounds(hw(512, 512), (48, 48)), (0, 48, 0, 48));
        // Wide image (h 300, w 800) in 48x96: scale 96/800 = 0.12, new_h = 36, pad 6.
        assert_eq!(unpad_bounds(hw(300, 800), (48, 96)), (6, 42, 0, 96));
        // Values checked against transformers 4.45.2 `unpad_image`.
        assert_eq!(unpad_bounds(hw(1000, 400), (72, 24)), (6, 66, 0, 24));
        assert_eq!(unpad_bounds(hw(1000, 200), (72, 48)), (0, 72, 17, 31));
        assert_eq!(unpad_bounds(hw(333, 1000), (24, 72)), (0, 24, 0, 72));
        assert_eq!(unpad_bounds(hw(517, 100), (48, 24)), (0, 48, 7, 17));
    }
}
