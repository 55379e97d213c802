//! Header sniffers: what Pillow would call an image's mode (and the few
//! layout facts the decoders need), read from the raw file bytes without
//! decoding pixels. Pure functions over byte slices; they never panic on
//! short or malformed input (`None` instead).

use super::PilMode;

/// Bit widths of the red, green and blue fields of a 16-bit BMP (`None` for
/// other BMPs): 5-6-5 when the bit fields say so, else 5-5-5.
pub(super) fn bmp16_widths(bytes: &[u8]) -> Option<[u32; 3]> {
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

/// Pillow's mode for a PNG, from the IHDR chunk (always the first chunk).
pub(super) fn png_mode(bytes: &[u8]) -> Option<PilMode> {
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
pub(super) fn jpeg_components(bytes: &[u8]) -> Option<u8> {
    u8::try_from(jpeg_info(bytes)?.sampling.len()).ok()
}

/// What a JPEG's markers say about the work of decoding it, read by walking
/// the whole stream (marker segments and entropy-coded data) without
/// decoding anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct JpegInfo {
    pub width: u32,
    pub height: u32,
    /// Horizontal and vertical sampling factors of each component.
    pub sampling: Vec<(u8, u8)>,
    /// A progressive frame (SOF2, SOF6, SOF10, SOF14).
    pub progressive: bool,
    /// Start-of-scan markers found.
    pub scans: usize,
}

impl JpegInfo {
    /// Bytes of the whole-image coefficient buffer libjpeg allocates for a
    /// progressive or multi-scan image (zero for one baseline scan, which
    /// is decoded a row of blocks at a time): 64 coefficients of 2 bytes per
    /// 8x8 block of every component, blocks rounded up to whole MCUs.
    pub fn coefficient_bytes(&self) -> u64 {
        if !self.progressive && self.scans <= 1 {
            return 0;
        }
        let hmax = u64::from(self.sampling.iter().map(|s| s.0).max().unwrap_or(1).max(1));
        let vmax = u64::from(self.sampling.iter().map(|s| s.1).max().unwrap_or(1).max(1));
        let (w, h) = (u64::from(self.width), u64::from(self.height));
        self.sampling
            .iter()
            .map(|&(hs, vs)| {
                let (hs, vs) = (u64::from(hs.max(1)), u64::from(vs.max(1)));
                let bw = (w * hs).div_ceil(hmax * 8).next_multiple_of(hs);
                let bh = (h * vs).div_ceil(vmax * 8).next_multiple_of(vs);
                bw * bh * 128
            })
            .sum()
    }
}

/// Walks a JPEG's markers: the first frame header (size, components,
/// progressive or not) and the number of scans. `None` when there is no
/// frame header or a segment is cut short before it. Entropy-coded data is
/// skipped byte by byte (stuffed `FF 00`, restart markers and fill bytes
/// belong to it); the walk ends at EOI or at the end of the data.
pub(super) fn jpeg_info(bytes: &[u8]) -> Option<JpegInfo> {
    if bytes.get(..2)? != [0xff, 0xd8] {
        return None;
    }
    let mut info: Option<JpegInfo> = None;
    let mut scans = 0usize;
    let mut at = 2; // after SOI
    while at + 1 < bytes.len() {
        if bytes[at] != 0xff {
            // Not a marker where one must be: stop here.
            break;
        }
        let marker = bytes[at + 1];
        match marker {
            // Fill bytes before a marker.
            0xff => at += 1,
            // Standalone markers carry no length.
            0x01 | 0xd0..=0xd7 => at += 2,
            // EOI.
            0xd9 => break,
            _ => {
                let Some(len) = bytes.get(at + 2..at + 4) else {
                    break;
                };
                let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
                let segment = bytes.get(at + 4..at + 2 + len.max(2));
                // SOF0..SOF15, except DHT (C4), JPG (C8) and DAC (CC).
                if (0xc0..=0xcf).contains(&marker)
                    && !matches!(marker, 0xc4 | 0xc8 | 0xcc)
                    && info.is_none()
                {
                    info = Some(frame_header(segment?, marker)?);
                }
                at += 2 + len;
                if marker == 0xda {
                    scans += 1;
                    at = skip_entropy_data(bytes, at);
                }
            }
        }
    }
    let mut info = info?;
    info.scans = scans;
    Some(info)
}

/// A frame header segment (after its length): precision, height, width,
/// then 3 bytes per component (id, sampling factors, table).
fn frame_header(segment: &[u8], marker: u8) -> Option<JpegInfo> {
    let height = u32::from(u16::from_be_bytes([*segment.get(1)?, *segment.get(2)?]));
    let width = u32::from(u16::from_be_bytes([*segment.get(3)?, *segment.get(4)?]));
    let n = usize::from(*segment.get(5)?);
    let mut sampling = Vec::with_capacity(n);
    for c in 0..n {
        let factors = *segment.get(6 + c * 3 + 1)?;
        sampling.push((factors >> 4, factors & 0x0f));
    }
    Some(JpegInfo {
        width,
        height,
        sampling,
        progressive: matches!(marker, 0xc2 | 0xc6 | 0xca | 0xce),
        scans: 0,
    })
}

/// The index of the first marker after entropy-coded data starting at `at`
/// (or the end of the data).
fn skip_entropy_data(bytes: &[u8], mut at: usize) -> usize {
    while at < bytes.len() {
        match memchr_ff(&bytes[at..]) {
            None => return bytes.len(),
            Some(i) => at += i,
        }
        match bytes.get(at + 1) {
            None => return bytes.len(),
            // Stuffed zero and restart markers are part of the data.
            Some(0x00 | 0xd0..=0xd7) => at += 2,
            // Fill byte: the marker starts at the next FF.
            Some(0xff) => at += 1,
            Some(_) => return at,
        }
    }
    at
}

fn memchr_ff(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| b == 0xff)
}

/// Pillow's mode for a BMP (`BmpImagePlugin`): palettes of exact greys are
/// dropped (`1` for two entries black and white, `L` for `i -> (i, i, i)`),
/// other palettes give `P`; 32-bit images are `RGB` unless their bit fields
/// name an alpha channel.
pub(super) fn bmp_mode(bytes: &[u8]) -> Option<PilMode> {
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
