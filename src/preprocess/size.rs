//! [`Size`]: an image's width and height in pixels, and [`PixelBounds`]:
//! the area a processor resizes images into; a leaf.

/// An image or tile size in pixels. Always named fields: the Python code
/// this crate follows mixes `(height, width)` (transformers) and
/// `(width, height)` (Pillow) tuples, which is what this type replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Size {
    pub width: u32,
    pub height: u32,
}

impl Size {
    /// A size of `width` x `height`.
    pub const fn new(width: u32, height: u32) -> Size {
        Size { width, height }
    }

    /// A square of `side` x `side`.
    pub const fn square(side: u32) -> Size {
        Size::new(side, side)
    }

    /// Number of pixels, without overflow.
    pub fn pixels(self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }
}

impl std::fmt::Display for Size {
    /// `WIDTHxHEIGHT`, as image sizes are usually written.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

/// The least and most pixels a processor resizes an image to (a family
/// whose processed size follows the image, like Qwen2-VL's `min_pixels` /
/// `max_pixels`). Reported by `/info` and hashed into the fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct PixelBounds {
    pub min: u64,
    pub max: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_displays_width_first() {
        assert_eq!(Size::new(640, 480).to_string(), "640x480");
        assert_eq!(Size::new(640, 480).pixels(), 307_200);
        assert_eq!(Size::square(3), Size::new(3, 3));
    }
}
