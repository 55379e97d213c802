//! Plain vector arithmetic on embeddings, shared by every front end (the
//! batcher, the synchronous [`crate::embedder`], the parity tests).
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

#[cfg(test)]
mod tests {
    use super::l2_normalize;

    #[test]
    fn normalizes_to_unit_length_and_keeps_zero() {
        let mut v = vec![3.0f32, 4.0];
        l2_normalize(&mut v);
        assert!((v[0] - 0.6).abs() < 1e-7 && (v[1] - 0.8).abs() < 1e-7);
        let mut z = vec![0.0f32; 3];
        l2_normalize(&mut z);
        assert_eq!(z, vec![0.0; 3]);
    }
}
