//! Unit tests of `preprocess/image/mod.rs`.

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
    let err = decode_image(b"qoif\0\0\0\x02\0\0\0\x02\x03\0", &ImageLimits::default()).unwrap_err();
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
    crate::preprocess::testing::noise(n, seed)
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

/// The formats the tests encode images in (BMP last: it cannot be cut
/// short detectably).
const LOSSLESS_AND_LOSSY: [ImageFormat; 6] = [
    ImageFormat::Png,
    ImageFormat::Jpeg,
    ImageFormat::WebP,
    ImageFormat::Gif,
    ImageFormat::Tiff,
    ImageFormat::Bmp,
];

fn is_invalid(r: Result<DecodedImage, PreprocessError>) -> bool {
    matches!(r, Err(PreprocessError::InvalidImage(_)))
}

/// Files cut short are refused, as Pillow refuses them ("image file is
/// truncated"); the reference cannot embed them either.
#[test]
fn truncated_files_of_every_format_are_refused() {
    let img = DynamicImage::ImageRgb8(noisy_rgb(64, 48));
    for format in LOSSLESS_AND_LOSSY[..5].iter().copied() {
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
    for format in LOSSLESS_AND_LOSSY {
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
    let mut rand = crate::preprocess::testing::xorshift(0x2545_f491);
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
