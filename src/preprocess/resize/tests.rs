//! Unit tests of `preprocess/resize.rs`.

use super::*;
use image::{GrayImage, RgbImage};

/// A deterministic pseudo-random image (xorshift), the same generator as
/// the one used to compute the Pillow digests below.
fn noise(width: usize, height: usize, channels: usize, seed: u32) -> Vec<u8> {
    crate::preprocess::testing::noise(width * height * channels, seed)
}

#[test]
fn filter_codes_round_trip() {
    for code in 0..6 {
        let f = Filter::from_pil_code(code).unwrap();
        assert_eq!(f.pil_code(), code);
    }
    assert_eq!(Filter::from_pil_code(6), None);
    assert_eq!(Filter::from_pil_code(-1), None);
}

#[test]
fn coefficients_sum_to_one_in_fixed_point() {
    for (i, o) in [(640, 298), (298, 640), (7, 3), (1, 5), (3504, 336)] {
        let c = Coeffs::new(i, o, Filter::Bicubic);
        for j in 0..o {
            let (start, k) = c.taps(j);
            assert!(start + k.len() <= i);
            let sum: i32 = k.iter().sum();
            assert!(
                (sum - (1 << PRECISION_BITS)).abs() <= k.len() as i32,
                "{sum}"
            );
        }
    }
}

#[test]
fn same_size_is_a_copy() {
    let src = noise(5, 4, 3, 7);
    let out = resize_interleaved(&src, 5, 4, 3, 5, 4, Filter::Bicubic);
    assert_eq!(out, src);
}

#[test]
fn constant_image_stays_constant() {
    let img = RgbImage::from_pixel(37, 23, image::Rgb([12, 200, 255]));
    for filter in Filter::ALL {
        for (w, h) in [(5, 3), (80, 61), (37, 9), (1, 1), (100, 23)] {
            let out = resize(&img, w, h, filter);
            assert_eq!(out.dimensions(), (w, h));
            assert!(
                out.pixels().all(|p| p.0 == [12, 200, 255]),
                "{filter:?} {w}x{h}"
            );
        }
    }
}

#[test]
fn zero_target_is_empty_and_empty_source_is_handled() {
    let img = GrayImage::from_pixel(4, 4, image::Luma([9]));
    assert_eq!(resize(&img, 0, 3, Filter::Bicubic).dimensions(), (0, 3));
    let empty = GrayImage::new(0, 0);
    let out = resize(&empty, 3, 2, Filter::Bicubic);
    assert_eq!(out.dimensions(), (3, 2));
    let out = resize(&empty, 3, 2, Filter::Nearest);
    assert_eq!(out.dimensions(), (3, 2));
    assert!(out.as_raw().iter().all(|&v| v == 0));
    // Short raw buffers read as zeros instead of panicking.
    assert_eq!(
        resize_interleaved(&[1, 2], 2, 2, 1, 1, 1, Filter::Bilinear).len(),
        1
    );
}

#[test]
fn five_channels_match_per_channel_resize() {
    let src = noise(13, 11, 5, 3);
    let out = resize_interleaved(&src, 13, 11, 5, 6, 17, Filter::Bicubic);
    for c in 0..5 {
        let plane: Vec<u8> = src.iter().skip(c).step_by(5).copied().collect();
        let expect = resize_interleaved(&plane, 13, 11, 1, 6, 17, Filter::Bicubic);
        let got: Vec<u8> = out.iter().skip(c).step_by(5).copied().collect();
        assert_eq!(got, expect);
    }
}

/// FNV-1a, to compare whole outputs against digests computed with Pillow.
fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

/// Bit-exactness against Pillow 13.0.0. The expected digests were computed
/// once in Python by building the same `noise` image, resizing it with
/// `Image.frombytes(mode, (w, h), data).resize((nw, nh), filter)` and
/// hashing `tobytes()` with the same FNV-1a.
#[test]
fn matches_pillow_digests() {
    let cases: &[(usize, usize, usize, usize, usize, Filter, u64)] = &[
        (640, 480, 3, 298, 224, Filter::Bicubic, 0x004499e964ed709f),
        (512, 512, 3, 672, 672, Filter::Bicubic, 0xfa1ee3d16ddaad0c),
        (17, 31, 3, 224, 409, Filter::Bicubic, 0xb1faa9cf8bb7015a),
        (1000, 40, 3, 224, 9, Filter::Bicubic, 0xf9996189720fc6b9),
        // The height shrinks by more than twice the width: vertical pass first.
        (40, 1000, 1, 9, 224, Filter::Bicubic, 0x66c715db779332e5),
        (1, 1, 3, 5, 7, Filter::Bicubic, 0x30e357a4f460f167),
        (7, 5, 4, 1000, 3, Filter::Bicubic, 0xa981294e514b4436),
        (33, 47, 1, 20, 100, Filter::Bilinear, 0xad68ac2ac8a511ab),
        (33, 47, 2, 70, 10, Filter::Lanczos, 0xefa8788357da72bf),
        (101, 37, 4, 30, 30, Filter::Hamming, 0xcf715e70f2464648),
        (101, 37, 3, 50, 18, Filter::Box, 0xd054d6457bafa5b8),
        (13, 9, 3, 40, 20, Filter::Nearest, 0x082f716fa3ed7350),
        (40, 20, 3, 13, 9, Filter::Nearest, 0xb0d98e555d7acf19),
        (300, 1, 3, 17, 1, Filter::Bicubic, 0x19b5715a99c52052),
        (1, 300, 3, 1, 17, Filter::Bicubic, 0x770260dfed52d25b),
    ];
    for &(w, h, c, nw, nh, filter, digest) in cases {
        let src = noise(w, h, c, (w * 31 + h) as u32);
        let out = resize_interleaved(&src, w, h, c, nw, nh, filter);
        assert_eq!(fnv(&out), digest, "{w}x{h}x{c} -> {nw}x{nh} {filter:?}");
    }
}

/// Pillow 13.0.0 digests of `Image.frombytes("I;16", (w, h), data)
/// .resize((nw, nh), BICUBIC).tobytes()` (little-endian samples), with the
/// samples read little-endian from the same `noise` bytes.
#[test]
fn i16_matches_pillow_digests() {
    let cases: &[(usize, usize, usize, usize, u64)] = &[
        (37, 23, 64, 48, 0x53acd59a6c11fe05),
        (64, 48, 20, 50, 0x4ae9cc584509866b),
        (30, 90, 25, 20, 0x54653b0ebaa9b557),
    ];
    for &(w, h, nw, nh, digest) in cases {
        let bytes = noise(w, h, 2, (w * 31 + h) as u32);
        let src: Vec<u16> = bytes
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        let out = resize_i16(&src, w, h, nw, nh, Filter::Bicubic);
        let out_bytes: Vec<u8> = out.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(fnv(&out_bytes), digest, "{w}x{h} -> {nw}x{nh}");
    }
}

/// Crops `region` out of a full `width`-pixel-wide output.
fn crop_of(full: &[u8], width: usize, channels: usize, r: Region) -> Vec<u8> {
    crop(full, width, channels, r)
}

/// `resize_interleaved_region` is bit for bit the crop of the full
/// resize: random sizes and regions, every filter, 1 to 5 channels,
/// extreme aspect ratios (32768x1 and 1x32768 with a short side small
/// enough that the full resize fits in a test), and the CLIP geometry
/// (short side to 224, centre crop 224x224) on sizes around it.
#[test]
fn region_is_the_crop_of_the_full_resize() {
    let mut rand = crate::preprocess::testing::xorshift(0x9e37_79b9);
    let filters = Filter::ALL;
    // (width, height, new_width, new_height)
    let mut cases: Vec<(usize, usize, usize, usize)> = vec![
        (32768, 1, 131072, 4),
        (1, 32768, 4, 131072),
        (32768, 1, 64, 3),
        (1, 32768, 3, 64),
        (225, 223, 226, 224),
        (223, 225, 224, 226),
        (224, 224, 224, 224),
        (640, 480, 298, 224),
        (480, 640, 224, 298),
        (3000, 7, 9600, 22),
        (7, 3000, 22, 9600),
        (5000, 20, 300, 1),
        (1, 1, 224, 224),
        (300, 300, 300, 17),
        (300, 300, 17, 300),
    ];
    for _ in 0..40 {
        let (w, h) = (1 + rand(400), 1 + rand(400));
        cases.push((w, h, 1 + rand(400), 1 + rand(400)));
    }
    for (i, &(w, h, nw, nh)) in cases.iter().enumerate() {
        let channels = 1 + i % 5;
        let filter = filters[i % filters.len()];
        let src = noise(w, h, channels, (w * 31 + h) as u32);
        let full = resize_interleaved(&src, w, h, channels, nw, nh, filter);
        // The centre 224x224 (or smaller) crop, then random regions.
        let (cw, ch) = (nw.min(224), nh.min(224));
        let mut regions = vec![Region {
            x: (nw - cw) / 2,
            y: (nh - ch) / 2,
            width: cw,
            height: ch,
        }];
        for _ in 0..4 {
            let (x, y) = (rand(nw), rand(nh));
            regions.push(Region {
                x,
                y,
                width: 1 + rand(nw - x),
                height: 1 + rand(nh - y),
            });
        }
        for r in regions {
            let got = resize_interleaved_region(&src, w, h, channels, nw, nh, r, filter);
            assert!(
                got == crop_of(&full, nw, channels, r),
                "{w}x{h}x{channels} -> {nw}x{nh} {filter:?} {r:?}"
            );
        }
        // Every filter on the CLIP-like centre crop of the extreme cases.
        if i < 4 {
            for f in filters {
                let full = resize_interleaved(&src, w, h, channels, nw, nh, f);
                let r = regions_centre(nw, nh);
                let got = resize_interleaved_region(&src, w, h, channels, nw, nh, r, f);
                assert!(got == crop_of(&full, nw, channels, r), "{f:?} {w}x{h}");
            }
        }
    }
}

fn regions_centre(nw: usize, nh: usize) -> Region {
    let (cw, ch) = (nw.min(224), nh.min(224));
    Region {
        x: (nw - cw) / 2,
        y: (nh - ch) / 2,
        width: cw,
        height: ch,
    }
}

/// The case the region exists for: 32768x1 to a 224 short side is a
/// 7340032x224 image (4.9 GB as RGB); its centre crop costs a few
/// hundred KB. A constant image stays constant, which checks the
/// region against the full resize's value without computing it.
#[test]
fn extreme_aspect_centre_crop_is_cheap() {
    for (w, h, nw, nh) in [(32768, 1, 7_340_032, 224), (1, 32768, 224, 7_340_032)] {
        let src = vec![77u8; w * h * 3];
        let r = regions_centre(nw, nh);
        let got = resize_interleaved_region(&src, w, h, 3, nw, nh, r, Filter::Bicubic);
        assert_eq!(got.len(), 224 * 224 * 3);
        assert!(got.iter().all(|&v| v == 77), "{w}x{h}");
    }
}

/// A region sticking out of the output is clipped to it.
#[test]
fn region_is_clipped_to_the_output() {
    let src = noise(10, 10, 3, 5);
    let r = Region {
        x: 8,
        y: 9,
        width: 100,
        height: 100,
    };
    let got = resize_interleaved_region(&src, 10, 10, 3, 12, 11, r, Filter::Bicubic);
    assert_eq!(got.len(), 4 * 2 * 3);
    let empty = Region { x: 50, ..r };
    assert!(resize_interleaved_region(&src, 10, 10, 3, 12, 11, empty, Filter::Bicubic).is_empty());
}

#[test]
fn store16_clips_like_pillow() {
    assert_eq!(store16(-3.2), 0);
    assert_eq!(store16(0.49), 0);
    assert_eq!(store16(0.5), 1);
    assert_eq!(store16(65535.4), 65535);
    assert_eq!(store16(65536.0 + 7.0), 65535);
}
