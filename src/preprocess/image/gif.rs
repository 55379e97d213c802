//! GIF first frames, decoded from palette indices (with the `gif` crate)
//! to reproduce how Pillow builds the first frame.

use std::io::Cursor;
use std::num::NonZeroU64;

use image::ImageFormat;

use super::convert::from_raw_or_empty;
use super::{check_size, Bands, DecodedImage, ImageLimits, PilMode};
use crate::preprocess::{PreprocessError, Size};

fn gif_error(err: gif::DecodingError) -> PreprocessError {
    let message = match &err {
        gif::DecodingError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            "GIF data is truncated (image file is truncated)".to_string()
        }
        other => format!("cannot decode GIF data: {other}"),
    };
    PreprocessError::invalid_image_caused(message, err)
}

/// Whether Pillow keeps a GIF palette (`GifImageFile._is_palette_needed`):
/// a palette mapping every index `i` to `(i, i, i)` makes the image mode `L`.
fn gif_palette_needed(palette: &[u8]) -> bool {
    palette
        .chunks(3)
        .enumerate()
        .any(|(i, rgb)| !(rgb.len() == 3 && rgb.iter().all(|&c| usize::from(c) == i)))
}

/// The canvas a GIF's first frame is decoded onto (see [`decode_gif`]),
/// from the headers only: the logical screen grown to hold the frame.
pub(super) fn canvas_size(bytes: &[u8]) -> Result<Size, PreprocessError> {
    let mut options = gif::DecodeOptions::new();
    options.set_color_output(gif::ColorOutput::Indexed);
    let mut decoder = options.read_info(Cursor::new(bytes)).map_err(gif_error)?;
    let (screen_w, screen_h) = (u32::from(decoder.width()), u32::from(decoder.height()));
    let frame = decoder
        .next_frame_info()
        .map_err(gif_error)?
        .ok_or_else(|| PreprocessError::invalid_image("GIF file contains no image"))?;
    Ok(Size::new(
        screen_w.max(u32::from(frame.left) + u32::from(frame.width)),
        screen_h.max(u32::from(frame.top) + u32::from(frame.height)),
    ))
}

/// Decodes the first frame of a GIF as Pillow does: the canvas is the logical
/// screen (grown to hold the frame if it sticks out), filled with the
/// transparent index if the frame has one and index 0 otherwise; the frame's
/// indices are pasted at its offset; transparent pixels keep their palette
/// colour. Mode `P`, or `L` when the palette is the identity grey ramp (or
/// absent).
pub(super) fn decode_gif(
    bytes: &[u8],
    limits: &ImageLimits,
) -> Result<DecodedImage, PreprocessError> {
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
        .ok_or_else(|| PreprocessError::invalid_image("GIF file contains no image"))?;
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
