//! Greyscale and YCbCr/RGB JPEG through libjpeg-turbo's code (as vendored by
//! `mozjpeg`, with libjpeg's default integer IDCT and "fancy" upsampling),
//! so the pixels are exactly Pillow's.
//!
//! Bounded before decoding, from the markers alone ([`super::sniff::jpeg_info`]):
//! the number of scans (each scan of a progressive JPEG is a pass over the
//! whole coefficient buffer, so thousands of tiny scans are a CPU bomb) and
//! the decoder's working memory (the output buffer plus, for progressive and
//! multi-scan images, the whole-image coefficient buffer).
//!
//! Refused while decoding, through libjpeg's warnings:
//! * data that ends before the image does (libjpeg's "Premature end of JPEG
//!   file"): Pillow refuses it too ("image file is truncated");
//! * scan data that stops short at a marker (libjpeg's "Corrupt JPEG data:
//!   premature end of data segment"). Pillow accepts such a file and paints
//!   the missing part grey, so a 625-byte file can claim 40 megapixels of
//!   grey; vlembed refuses it by default (a deliberate deviation from
//!   Pillow, see [`ImageLimits::allow_incomplete_jpeg`]).
//!
//! Other libjpeg warnings (extraneous bytes before a marker, …) are ignored,
//! as Pillow ignores them.

use std::os::raw::c_int;

use image::{GrayImage, ImageFormat, RgbImage};
use mozjpeg_sys::{jpeg_common_struct, jpeg_error_mgr, JWRN_HIT_MARKER, JWRN_JPEG_EOF};

use super::sniff::jpeg_info;
use super::{check_size, Bands, DecodedImage, ImageLimits, PilMode};
use crate::preprocess::PreprocessError;

/// libjpeg's `global_state` while `jpeg_finish_decompress` reads the rest of
/// the file (`DSTATE_STOPPING` in jpegint.h): all pixels are decoded by then.
const DSTATE_STOPPING: c_int = 210;

/// Why libjpeg stopped, carried out of the C code by unwinding.
#[derive(Debug)]
enum Abort {
    /// The data ended before the image did.
    Truncated,
    /// Scan data stopped short at a marker.
    IncompleteScan,
    /// libjpeg's fatal error, with its message.
    Fatal(String),
}

/// libjpeg's message for `code`, from its message table.
fn message(err: &jpeg_error_mgr, code: c_int) -> String {
    if err.jpeg_message_table.is_null() || code < 0 || code > err.last_jpeg_message {
        return format!("libjpeg error {code}");
    }
    // SAFETY: `jpeg_std_error` points `jpeg_message_table` at libjpeg's
    // static table of `last_jpeg_message + 1` NUL-terminated strings (or
    // null entries), and `code` was checked to be in range.
    let text = unsafe {
        let entry = *err.jpeg_message_table.offset(code as isize);
        if entry.is_null() {
            return format!("libjpeg error {code}");
        }
        std::ffi::CStr::from_ptr(entry)
            .to_string_lossy()
            .into_owned()
    };
    // The table's messages are printf formats; their arguments are not
    // needed to name the problem.
    text.split('%')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// `error_exit`: libjpeg calls it on a fatal error and must not return.
///
/// # Safety
/// Called by libjpeg with a valid `cinfo` whose `err` is our error manager.
unsafe extern "C-unwind" fn error_exit(cinfo: &mut jpeg_common_struct) {
    // SAFETY: libjpeg passes the structure it was created with; `err` points
    // at the error manager that `decode_jpeg_libjpeg` keeps alive.
    let err = unsafe { &*cinfo.err };
    let text = message(err, err.msg_code);
    std::panic::resume_unwind(Box::new(Abort::Fatal(text)));
}

/// `emit_message` with a flag to say whether incomplete scans are accepted:
/// level -1 is a warning; trace messages (level >= 0) are dropped.
///
/// # Safety
/// Called by libjpeg with a valid `cinfo` whose `err` is our error manager.
unsafe extern "C-unwind" fn emit_message_strict(cinfo: &mut jpeg_common_struct, level: c_int) {
    // SAFETY: as for `error_exit`.
    unsafe { emit(cinfo, level, false) }
}

/// [`emit_message_strict`], accepting scans that stop short (as Pillow).
///
/// # Safety
/// Called by libjpeg with a valid `cinfo` whose `err` is our error manager.
unsafe extern "C-unwind" fn emit_message_lenient(cinfo: &mut jpeg_common_struct, level: c_int) {
    // SAFETY: as for `error_exit`.
    unsafe { emit(cinfo, level, true) }
}

/// # Safety
/// `cinfo.err` must point at a live error manager.
unsafe fn emit(cinfo: &mut jpeg_common_struct, level: c_int, allow_incomplete: bool) {
    if level >= 0 {
        return;
    }
    // SAFETY: guaranteed by the caller.
    let code = unsafe { (*cinfo.err).msg_code };
    // Past the last scanline libjpeg only looks for the end marker: a file
    // whose pixels are all there decodes (as in Pillow).
    let stopping = cinfo.global_state == DSTATE_STOPPING;
    if code == JWRN_JPEG_EOF as c_int && !stopping {
        std::panic::resume_unwind(Box::new(Abort::Truncated));
    }
    if code == JWRN_HIT_MARKER as c_int && !allow_incomplete && !stopping {
        std::panic::resume_unwind(Box::new(Abort::IncompleteScan));
    }
}

/// An error manager that reports through [`Abort`] unwinds.
fn error_manager(allow_incomplete: bool) -> jpeg_error_mgr {
    // SAFETY: `jpeg_error_mgr` is a C struct of integers, raw pointers and
    // optional function pointers, for all of which all-zero bytes are valid
    // (null / `None`); `jpeg_std_error` then fills in its defaults.
    let mut err: jpeg_error_mgr = unsafe { std::mem::zeroed() };
    // SAFETY: `err` is a valid, exclusively borrowed error manager.
    unsafe { mozjpeg_sys::jpeg_std_error(&mut err) };
    err.error_exit = Some(error_exit);
    err.emit_message = Some(if allow_incomplete {
        emit_message_lenient
    } else {
        emit_message_strict
    });
    err
}

/// Checks what the markers say against the limits: size, scan count,
/// working memory.
fn check_markers(bytes: &[u8], limits: &ImageLimits) -> Result<(), PreprocessError> {
    let Some(info) = jpeg_info(bytes) else {
        // No readable frame header: libjpeg will say what is wrong.
        return Ok(());
    };
    check_size(info.width, info.height, limits)?;
    if info.scans > limits.max_jpeg_scans {
        return Err(PreprocessError::invalid_image(format!(
            "JPEG has {} scans, over the limit of {}",
            info.scans, limits.max_jpeg_scans
        )));
    }
    let channels: u64 = if info.sampling.len() == 1 { 1 } else { 3 };
    let output = u64::from(info.width) * u64::from(info.height) * channels;
    let working = output + info.coefficient_bytes();
    if working > limits.max_alloc_bytes {
        return Err(PreprocessError::invalid_image(format!(
            "JPEG image needs {working} bytes to decode, over the {} bytes allowed",
            limits.max_alloc_bytes
        )));
    }
    Ok(())
}

/// Decodes a greyscale or three-component JPEG with libjpeg-turbo's decoder,
/// as Pillow does. libjpeg reports errors and the warnings we refuse by
/// unwinding (the `unwinding` feature of mozjpeg-sys), caught here.
pub(super) fn decode_jpeg_libjpeg(
    bytes: &[u8],
    limits: &ImageLimits,
) -> Result<DecodedImage, PreprocessError> {
    check_markers(bytes, limits)?;
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decode(bytes, limits))) {
        Ok(result) => result,
        Err(payload) => Err(match payload.downcast::<Abort>() {
            Ok(abort) => match *abort {
                Abort::Truncated => PreprocessError::invalid_image(
                    "JPEG data is truncated (image file is truncated)",
                ),
                Abort::IncompleteScan => PreprocessError::invalid_image(
                    "JPEG scan data ends before the image does (premature end of data segment)",
                ),
                Abort::Fatal(text) => {
                    PreprocessError::invalid_image(format!("cannot decode JPEG data: {text}"))
                }
            },
            Err(_) => PreprocessError::invalid_image("the JPEG decoder failed on malformed data"),
        }),
    }
}

fn decode(bytes: &[u8], limits: &ImageLimits) -> Result<DecodedImage, PreprocessError> {
    let invalid = |e: std::io::Error| {
        PreprocessError::invalid_image_caused(format!("cannot decode JPEG data: {e}"), e)
    };
    let decoder = mozjpeg::Decompress::with_err(error_manager(limits.allow_incomplete_jpeg))
        .from_mem(bytes)
        .map_err(invalid)?;
    let (width, height) = (decoder.width(), decoder.height());
    let (w, h) = (
        u32::try_from(width).unwrap_or(u32::MAX),
        u32::try_from(height).unwrap_or(u32::MAX),
    );
    check_size(w, h, limits)?;
    let gray = decoder.components().len() == 1;
    let channels: u64 = if gray { 1 } else { 3 };
    if u64::from(w) * u64::from(h) * channels > limits.max_alloc_bytes {
        return Err(PreprocessError::invalid_image(format!(
            "JPEG image needs more than the {} bytes allowed to decode",
            limits.max_alloc_bytes
        )));
    }
    let truncated = || PreprocessError::invalid_image("JPEG data is truncated");
    let (mode, bands) = if gray {
        let mut started = decoder.grayscale().map_err(invalid)?;
        let px = started.read_scanlines::<u8>().map_err(invalid)?;
        started.finish().map_err(invalid)?;
        let img = GrayImage::from_raw(w, h, px).ok_or_else(truncated)?;
        (PilMode::L, Bands::Gray(img))
    } else {
        let mut started = decoder.rgb().map_err(invalid)?;
        let px = started.read_scanlines::<u8>().map_err(invalid)?;
        started.finish().map_err(invalid)?;
        let img = RgbImage::from_raw(w, h, px).ok_or_else(truncated)?;
        (PilMode::Rgb, Bands::Rgb(img))
    };
    Ok(DecodedImage {
        format: ImageFormat::Jpeg,
        mode,
        bands,
    })
}
