//! Element-wise and per-row kernels: bias rows, softmax, quick-GELU and
//! layer norm, with a vectorisable `exp`. Plain Rust written to
//! auto-vectorise, compiled twice by `simd_fn!`.

use candle_core::{Error, Result};
use rayon::prelude::*;

use crate::simd::simd_fn;

/// Adds `b` to every row of `y` (rows of `b.len()`).
pub fn add_rows(y: &mut [f32], b: &[f32]) {
    if b.is_empty() {
        return;
    }
    for row in y.chunks_exact_mut(b.len()) {
        for (v, bb) in row.iter_mut().zip(b) {
            *v += bb;
        }
    }
}

pub(super) const LANES: usize = 8;

#[inline(always)]
pub(super) fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    let mut s = chunks.remainder().iter().sum::<f32>();
    for a in acc {
        s += a;
    }
    s
}

#[inline(always)]
pub(super) fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in chunks.remainder().iter().chain(acc.iter()) {
        m = if v > m { v } else { m };
    }
    m
}

/// `e^x` to about 2 ulp (Cephes' `expf` polynomial), branch-free so loops
/// over it vectorise; saturates to 0 below -87.3 and to ~2^127 above 88.7.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.336_55, 88.376_26);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let r2 = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * r2 + r + 1.0;
    // n is in [-126, 127]: a normal power of two.
    let pow2 = f32::from_bits(((n as i32 + 127) as u32) << 23);
    y * pow2
}

simd_fn! {
    /// Softmax of one row in place: `x_i = e^(x_i - max) / Σ e^(x_j - max)`.
    pub fn softmax_in_place(x: &mut [f32]) {
        if x.is_empty() {
            return;
        }
        let m = max(x);
        for v in x.iter_mut() {
            *v = exp(*v - m);
        }
        let inv = 1.0 / sum(x);
        for v in x.iter_mut() {
            *v *= inv;
        }
    }
}

simd_fn! {
    fn quick_gelu_chunk(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v /= 1.0 + exp(-1.702 * *v);
        }
    }
}

/// `x · sigmoid(1.702 x)` in place, on all threads.
pub fn quick_gelu_in_place(x: &mut [f32]) {
    x.par_chunks_mut(16 * 1024).for_each(quick_gelu_chunk);
}

simd_fn! {
    fn layer_norm_rows(x: &[f32], y: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
        let d = w.len();
        for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let mean = sum(xr) / d as f32;
            for (o, v) in yr.iter_mut().zip(xr) {
                *o = v - mean;
            }
            let mut acc = [0.0f32; LANES];
            let mut chunks = yr.chunks_exact(LANES);
            for c in &mut chunks {
                for i in 0..LANES {
                    acc[i] += c[i] * c[i];
                }
            }
            let mut ss: f32 = chunks.remainder().iter().map(|v| v * v).sum();
            for a in acc {
                ss += a;
            }
            let rstd = 1.0 / (ss / d as f32 + eps).sqrt();
            for ((o, ww), bb) in yr.iter_mut().zip(w).zip(b) {
                *o = *o * rstd * ww + bb;
            }
        }
    }
}

/// PyTorch's `LayerNorm` over rows of `w.len()`: `y = (x - mean) / sqrt(var + eps) · w + b`.
pub fn layer_norm(x: &[f32], y: &mut [f32], w: &[f32], b: &[f32], eps: f32) -> Result<()> {
    let d = w.len();
    if d == 0 || b.len() != d || !x.len().is_multiple_of(d) || y.len() < x.len() {
        return Err(Error::Msg(format!(
            "ops: layer_norm of {} values in rows of {d} into {}",
            x.len(),
            y.len()
        )));
    }
    let rows_per_task = (8192 / d).max(1);
    x.par_chunks(rows_per_task * d)
        .zip(y[..x.len()].par_chunks_mut(rows_per_task * d))
        .for_each(|(xc, yc)| layer_norm_rows(xc, yc, w, b, eps));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testing::{max_diff, rand};
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0.0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = x.exp();
            let rel = ((exp(x) - want) / want).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp(-1.0e30), exp(-87.336_55));
        assert!(exp(-1.0e30) < 1e-37);
    }

    #[test]
    fn layer_norm_softmax_gelu_match_candle() {
        let dev = Device::Cpu;
        let (rows, d) = (13, 96);
        let x = rand(rows * d, 5);
        let w = rand(d, 6);
        let b = rand(d, 7);
        let mut y = vec![0.0; rows * d];
        layer_norm(&x, &mut y, &w, &b, 1e-5).unwrap();
        let xt = Tensor::from_vec(x.clone(), (rows, d), &dev).unwrap();
        let ln = candle_nn::LayerNorm::new(
            Tensor::from_vec(w, d, &dev).unwrap(),
            Tensor::from_vec(b, d, &dev).unwrap(),
            1e-5,
        );
        let want: Vec<f32> = candle_core::Module::forward(&ln, &xt)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(max_diff(&y, &want) < 1e-5, "{}", max_diff(&y, &want));

        let mut s = x.iter().map(|v| v * 30.0).collect::<Vec<_>>();
        let st = Tensor::from_vec(s.clone(), (rows, d), &dev).unwrap();
        s.chunks_exact_mut(d).for_each(softmax_in_place);
        let want: Vec<f32> = candle_nn::ops::softmax_last_dim(&st)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(max_diff(&s, &want) < 1e-6);

        let mut g = x.iter().map(|v| v * 8.0).collect::<Vec<_>>();
        let gt = Tensor::from_vec(g.clone(), rows * d, &dev).unwrap();
        quick_gelu_in_place(&mut g);
        let want: Vec<f32> = (&gt * candle_nn::ops::sigmoid(&(&gt * 1.702).unwrap()).unwrap())
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(max_diff(&g, &want) < 1e-5);
    }
}
