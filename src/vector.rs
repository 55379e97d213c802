//! Plain vector arithmetic on embeddings, shared by every front end (the
//! batcher, the synchronous [`crate::embedder`], the parity tests).
//!
//! Also the quantisers of the compact output types (`int8`, `uint8`,
//! `binary`, `ubinary`; README "Output encodings"): pure functions from an
//! f32 vector to the integers a response carries.
//!
//! A leaf: it imports nothing from the crate.

/// L2-normalises `v` in place (a zero vector stays zero). The norm is summed
/// in f64 so long vectors do not lose precision.
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v
        .iter()
        .map(|x| (*x as f64) * (*x as f64))
        .sum::<f64>()
        .sqrt();
    if norm > 0.0 {
        let inv = (1.0 / norm) as f32;
        v.iter_mut().for_each(|x| *x *= inv);
    }
}

/// The fixed scale of [`quantize_int8`] for L2-normalised vectors: every
/// component of a unit vector lies in [-1, 1], so `x * 127` never clips and
/// the int8 dot product of two vectors is `127²` times their cosine plus
/// rounding noise, the same for every model and dimension.
pub const INT8_SCALE: f32 = 127.0;

/// `int8` of an L2-normalised vector: `round(clamp(x * 127, -128, 127))`
/// per component (round half away from zero; NaN becomes 0).
pub fn quantize_int8(v: &[f32]) -> Vec<i8> {
    v.iter()
        .map(|&x| {
            // `as` saturates and maps NaN to 0; the clamp states the rule.
            (x * INT8_SCALE).clamp(-128.0, 127.0).round() as i8
        })
        .collect()
}

/// `uint8`: [`quantize_int8`] shifted by 128 (`int8 + 128`), so the order of
/// values is kept and 0.0 maps to 128.
pub fn quantize_uint8(v: &[f32]) -> Vec<u8> {
    quantize_int8(v)
        .into_iter()
        .map(|q| (i16::from(q) + 128) as u8)
        .collect()
}

/// `ubinary`: one sign bit per dimension (1 when `x > 0`, so 0.0, -0.0 and
/// NaN give 0), packed 8 per byte with the first dimension in the most
/// significant bit (numpy's `packbits`). A dimension count that is not a
/// multiple of 8 pads the last byte with zero bits; the length is
/// `ceil(len / 8)`.
pub fn quantize_ubinary(v: &[f32]) -> Vec<u8> {
    v.chunks(8)
        .map(|chunk| {
            chunk
                .iter()
                .enumerate()
                .fold(0u8, |byte, (i, &x)| byte | (u8::from(x > 0.0) << (7 - i)))
        })
        .collect()
}

/// `binary`: the bytes of [`quantize_ubinary`] as signed values,
/// `ubinary - 128` (the convention of sentence-transformers'
/// `quantize_embeddings(precision="binary")` and of Cohere's signed
/// `binary`). In two's complement `b - 128` is `b XOR 0x80`, so Hamming
/// distances between two `binary` vectors equal those between their
/// `ubinary` forms; to unpack, add 128 first.
pub fn quantize_binary(v: &[f32]) -> Vec<i8> {
    quantize_ubinary(v)
        .into_iter()
        .map(|b| (i16::from(b) - 128) as i8)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_to_unit_length_and_keeps_zero() {
        let mut v = vec![3.0f32, 4.0];
        l2_normalize(&mut v);
        assert!((v[0] - 0.6).abs() < 1e-7 && (v[1] - 0.8).abs() < 1e-7);
        let mut z = vec![0.0f32; 3];
        l2_normalize(&mut z);
        assert_eq!(z, vec![0.0; 3]);
    }

    #[test]
    fn int8_is_the_scaled_rounded_clamped_value() {
        let v = [
            1.0f32,
            -1.0,
            0.0,
            0.5,
            -0.5,
            0.003_937,
            0.001,
            -0.004,
            2.0,
            -2.0,
            f32::NAN,
        ];
        // 0.5 * 127 = 63.5 rounds away from zero; 0.003937 * 127 = 0.49999 → 0;
        // out-of-range values clamp; NaN is 0.
        assert_eq!(
            quantize_int8(&v),
            vec![127, -127, 0, 64, -64, 0, 0, -1, 127, -128, 0]
        );
        let u = quantize_uint8(&v);
        assert_eq!(u, vec![255, 1, 128, 192, 64, 128, 128, 127, 255, 0, 128]);
        for (q, u) in quantize_int8(&v).into_iter().zip(u) {
            assert_eq!(i16::from(q) + 128, i16::from(u));
        }
    }

    #[test]
    fn int8_dot_product_tracks_the_cosine() {
        // Two unit vectors in 64 dimensions from a fixed pseudo-random walk.
        let mut seed = 7u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        let mut a: Vec<f32> = (0..64).map(|_| next()).collect();
        let mut b: Vec<f32> = (0..64).map(|_| next()).collect();
        l2_normalize(&mut a);
        l2_normalize(&mut b);
        let cos: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        let (qa, qb) = (quantize_int8(&a), quantize_int8(&b));
        let dot: i32 = qa
            .iter()
            .zip(&qb)
            .map(|(x, y)| i32::from(*x) * i32::from(*y))
            .sum();
        let approx = dot as f32 / (INT8_SCALE * INT8_SCALE);
        assert!((approx - cos).abs() < 0.01, "{approx} vs {cos}");
    }

    #[test]
    fn binary_packs_sign_bits_msb_first_and_pads_with_zeros() {
        let v = [
            0.5f32,
            -0.1,
            0.0,
            1e-9,
            -0.0,
            0.2,
            -3.0,
            0.7, // 1001 0101 = 0x95
            -1.0,
            2.0,
            f32::NAN, // 010 + 5 zero bits = 0x40
        ];
        assert_eq!(quantize_ubinary(&v), vec![0x95, 0x40]);
        assert_eq!(quantize_binary(&v), vec![21i8, -64]); // 0x95 - 128, 0x40 - 128
        assert_eq!(quantize_ubinary(&[]), Vec::<u8>::new());
        assert_eq!(quantize_ubinary(&[1.0; 16]), vec![255, 255]);
        assert_eq!(quantize_binary(&[1.0; 8]), vec![127]);
        assert_eq!(quantize_binary(&[-1.0; 8]), vec![-128]);
        // ceil(d / 8) bytes for every d.
        for d in 0..40 {
            assert_eq!(quantize_ubinary(&vec![1.0; d]).len(), d.div_ceil(8));
        }
        // binary's bit pattern is ubinary's with the top bit flipped.
        for (s, u) in quantize_binary(&v).into_iter().zip(quantize_ubinary(&v)) {
            assert_eq!(s as u8, u ^ 0x80);
        }
    }
}
