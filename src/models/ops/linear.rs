//! [`Linear`]: a PyTorch `Linear` whose weight is kept in the layout its
//! fastest kernel wants ([`Weight`]), on the native kernels or on oneDNN
//! ([`Linear::into_backend`]), and the few-row dot-product kernel.

use candle_core::{Error, Result};
use rayon::prelude::*;

use super::avx512;
use super::backend::Backend;
use super::gemm::{MatMul, Output, Rhs, Threads};
#[cfg(feature = "onednn")]
use super::onednn;
use super::rows::{add_rows, quick_gelu_in_place, LANES};
use super::short;

use crate::simd::simd_fn;

/// How a [`Linear`] holds its `[out, in]` weight.
#[derive(Debug, Clone)]
enum Weight {
    /// Row-major f32 (possibly bf16-rounded values): `gemm` or the
    /// few-row kernel.
    RowMajor(Vec<f32>),
    /// bf16 packed for the AVX512-BF16 kernel; see [`Linear::into_bf16`].
    Bf16(avx512::PackedBf16),
    /// f32 packed for the AVX-512 kernel; see [`Linear::into_packed`].
    PackedF32(avx512::PackedF32),
    /// Reordered for oneDNN's matmul (f32 or bf16); see
    /// [`Linear::into_backend`].
    #[cfg(feature = "onednn")]
    Onednn(onednn::Weights),
}

/// An activation applied to a product's output ([`Linear::forward_act`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// `x · sigmoid(1.702 x)` (CLIP's MLP).
    QuickGelu,
}

/// A PyTorch `Linear`: weight `[out, in]` and an optional bias.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Vec<f32>>,
    in_dim: usize,
    out_dim: usize,
}

impl Linear {
    pub fn new(
        weight: Vec<f32>,
        bias: Option<Vec<f32>>,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<Self> {
        if weight.len() != in_dim * out_dim {
            return Err(short("linear weight", in_dim * out_dim, weight.len()));
        }
        if let Some(b) = &bias {
            if b.len() != out_dim {
                return Err(short("linear bias", out_dim, b.len()));
            }
        }
        Ok(Linear {
            weight: Weight::RowMajor(weight),
            bias,
            in_dim,
            out_dim,
        })
    }

    /// The same linear with its weight rounded to bf16 (nearest even):
    /// packed for `vdpbf16ps` when the CPU has AVX512-BF16 (activations
    /// are then rounded to bf16 too, accumulation stays f32), else kept
    /// as f32 values.
    pub fn into_bf16(self) -> Self {
        let (n, k) = (self.out_dim, self.in_dim);
        let mut w = match self.weight {
            Weight::Bf16(_) => return self,
            Weight::PackedF32(p) => p.unpack(),
            Weight::RowMajor(w) => w,
            #[cfg(feature = "onednn")]
            Weight::Onednn(_) => return self,
        };
        let weight = match avx512::PackedBf16::new(&w, n, k) {
            Some(p) => Weight::Bf16(p),
            None => {
                for v in &mut w {
                    *v = avx512::to_f32(avx512::from_f32(*v));
                }
                Weight::RowMajor(w)
            }
        };
        Linear { weight, ..self }
    }

    /// The same linear with its f32 weight packed in panels for the
    /// AVX-512 kernel when the CPU has AVX-512F (no repacking per call, so
    /// few-row products are as efficient as large ones); unchanged
    /// otherwise. Call after [`Self::concat`].
    pub fn into_packed(self) -> Self {
        let Weight::RowMajor(w) = &self.weight else {
            return self;
        };
        match avx512::PackedF32::new(w, self.out_dim, self.in_dim) {
            Some(p) => Linear {
                weight: Weight::PackedF32(p),
                ..self
            },
            None => self,
        }
    }

    /// The same linear with its weight laid out for `backend`: the native
    /// kernels ([`Self::into_bf16`] with `bf16`, else [`Self::into_packed`])
    /// or oneDNN (weights reordered once into its layout, in bf16 with
    /// `bf16`: activations then rounded to bf16 too, accumulation f32).
    /// oneDNN fails without the `onednn` feature or when it cannot run the
    /// shape. Call after [`Self::concat`].
    pub fn into_backend(self, backend: Backend, bf16: bool) -> Result<Self> {
        match backend {
            Backend::Native if bf16 => Ok(self.into_bf16()),
            Backend::Native => Ok(self.into_packed()),
            Backend::Onednn => self.into_onednn(bf16),
        }
    }

    #[cfg(feature = "onednn")]
    fn into_onednn(self, bf16: bool) -> Result<Self> {
        let w = match &self.weight {
            Weight::RowMajor(w) => std::borrow::Cow::Borrowed(w.as_slice()),
            Weight::PackedF32(p) => std::borrow::Cow::Owned(p.unpack()),
            Weight::Bf16(_) | Weight::Onednn(_) => {
                return Err(Error::Msg(
                    "ops: a linear moves to oneDNN from its f32 weight only".into(),
                ))
            }
        };
        let dtype = if bf16 {
            onednn::Dtype::Bf16
        } else {
            onednn::Dtype::F32
        };
        let weights = onednn::Weights::new(&w, self.bias.clone(), self.out_dim, self.in_dim, dtype)
            .map_err(Error::wrap)?;
        Ok(Linear {
            weight: Weight::Onednn(weights),
            ..self
        })
    }

    #[cfg(not(feature = "onednn"))]
    fn into_onednn(self, _bf16: bool) -> Result<Self> {
        Err(Error::wrap(super::backend::BackendError::NotBuilt))
    }

    /// Whether products run on the bf16 kernel.
    pub fn is_bf16(&self) -> bool {
        matches!(self.weight, Weight::Bf16(_))
    }

    /// The backend its products run on.
    pub fn backend(&self) -> Backend {
        match self.weight {
            #[cfg(feature = "onednn")]
            Weight::Onednn(_) => Backend::Onednn,
            _ => Backend::Native,
        }
    }

    /// Stacks linears with the same input along the output dimension (a
    /// fused Q/K/V projection); all or none must have a bias.
    pub fn concat(parts: &[Linear]) -> Result<Self> {
        let in_dim = parts.first().map_or(0, |p| p.in_dim);
        let mut weight = Vec::new();
        let mut bias = Some(Vec::new());
        let mut out_dim = 0;
        for p in parts {
            let Weight::RowMajor(w) = &p.weight else {
                return Err(Error::Msg(
                    "ops: concatenate linears before packing them".into(),
                ));
            };
            if p.in_dim != in_dim {
                return Err(Error::Msg(
                    "ops: concatenated linears differ in input size".into(),
                ));
            }
            weight.extend_from_slice(w);
            match (&mut bias, &p.bias) {
                (Some(all), Some(b)) => all.extend_from_slice(b),
                _ => bias = None,
            }
            out_dim += p.out_dim;
        }
        Linear::new(weight, bias, in_dim, out_dim)
    }

    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// `y[rows, out] = x[rows, in] · Wᵀ + b`, or with `accumulate`
    /// `y += x · Wᵀ + b` (a residual connection in place).
    pub fn forward_into(
        &self,
        x: &[f32],
        rows: usize,
        y: &mut [f32],
        accumulate: bool,
    ) -> Result<()> {
        let out = self.out_dim;
        if y.len() < rows * out {
            return Err(short("linear output", rows * out, y.len()));
        }
        let y = &mut y[..rows * out];
        if x.len() < rows * self.in_dim {
            return Err(short("linear input", rows * self.in_dim, x.len()));
        }
        if self.in_dim == 0 {
            // An empty product: the bias alone (the kernels assume k > 0).
            match (&self.bias, accumulate) {
                (Some(b), true) => add_rows(y, b),
                (Some(b), false) => y.chunks_exact_mut(out).for_each(|r| r.copy_from_slice(b)),
                (None, true) => {}
                (None, false) => y.fill(0.0),
            }
            return Ok(());
        }
        let w = match &self.weight {
            Weight::Bf16(p) => return p.matmul(x, rows, y, self.bias.as_deref(), accumulate),
            Weight::PackedF32(p) => return p.matmul(x, rows, y, self.bias.as_deref(), accumulate),
            #[cfg(feature = "onednn")]
            Weight::Onednn(p) => {
                let post = if accumulate {
                    onednn::Post::Accumulate
                } else {
                    onednn::Post::Store
                };
                return p.matmul(x, rows, y, post).map_err(Error::wrap);
            }
            Weight::RowMajor(w) => w,
        };
        if rows <= SMALL_ROWS {
            return self.forward_small(w, x, rows, y, accumulate);
        }
        match (&self.bias, accumulate) {
            (Some(b), true) => add_rows(y, b),
            (Some(b), false) => y.chunks_exact_mut(out).for_each(|r| r.copy_from_slice(b)),
            (None, _) => {}
        }
        let read = accumulate || self.bias.is_some();
        MatMul {
            m: rows,
            n: out,
            k: self.in_dim,
            a_rs: self.in_dim,
            b_rs: self.in_dim,
            c_rs: out,
            rhs: Rhs::Transposed,
            output: if read {
                Output::Accumulate
            } else {
                Output::Overwrite
            },
            scale: 1.0,
            threads: Threads::Pool,
        }
        .run(x, w, y)
    }

    /// [`Self::forward_into`] for a few rows (a text, a pooled token): dot
    /// products of the input rows with each weight row `w`, column blocks
    /// on rayon. Memory-bound like any few-row product, but it reads the
    /// weight once, where `gemm` would first repack all of it.
    fn forward_small(
        &self,
        w: &[f32],
        x: &[f32],
        rows: usize,
        y: &mut [f32],
        accumulate: bool,
    ) -> Result<()> {
        let (k, n) = (self.in_dim, self.out_dim);
        if rows == 0 || n == 0 {
            return Ok(());
        }
        const NB: usize = 32;
        // yt[j, r]: output column j of row r, column blocks of NB.
        let mut yt = vec![0.0f32; n * rows];
        yt.par_chunks_mut(NB * rows)
            .zip(w.par_chunks(NB * k.max(1)))
            .for_each(|(dst, w)| dot_block(&x[..rows * k], rows, k, w, dst));
        for (r, yr) in y.chunks_exact_mut(n).take(rows).enumerate() {
            for (j, v) in yr.iter_mut().enumerate() {
                let b = self.bias.as_ref().map_or(0.0, |b| b[j]);
                let d = yt[j * rows + r] + b;
                *v = if accumulate { *v + d } else { d };
            }
        }
        Ok(())
    }

    /// `x[rows, in] · Wᵀ + b` in a new buffer.
    pub fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let mut y = vec![0.0; rows * self.out_dim];
        self.forward_into(x, rows, &mut y, false)?;
        Ok(y)
    }

    /// `act(x[rows, in] · Wᵀ + b)` in a new buffer: on oneDNN the
    /// activation is fused into the product (a post-op), on the native
    /// kernels it is a second pass.
    pub fn forward_act(&self, x: &[f32], rows: usize, act: Act) -> Result<Vec<f32>> {
        #[cfg(feature = "onednn")]
        if let (Weight::Onednn(p), Act::QuickGelu) = (&self.weight, act) {
            if self.in_dim > 0 {
                let mut y = vec![0.0; rows * self.out_dim];
                p.matmul(x, rows, &mut y, onednn::Post::Swish(1.702))
                    .map_err(Error::wrap)?;
                return Ok(y);
            }
        }
        let mut y = self.forward(x, rows)?;
        match act {
            Act::QuickGelu => quick_gelu_in_place(&mut y),
        }
        Ok(y)
    }
}

/// Up to this many rows a product goes to [`Linear::forward_small`].
const SMALL_ROWS: usize = 32;

simd_fn! {
    /// `dst[j * rows + r] = x_r · w_j` for the weight rows `w_j` in `w`.
    fn dot_block(x: &[f32], rows: usize, k: usize, w: &[f32], dst: &mut [f32]) {
        if k == 0 {
            dst.fill(0.0);
            return;
        }
        for (wj, out) in w.chunks_exact(k).zip(dst.chunks_exact_mut(rows)) {
            let mut r = 0;
            while r + 4 <= rows {
                let d = dot4(&x[r * k..(r + 4) * k], wj);
                out[r..r + 4].copy_from_slice(&d);
                r += 4;
            }
            while r < rows {
                let xr = &x[r * k..(r + 1) * k];
                let mut acc = [0.0f32; LANES];
                let mut xc = xr.chunks_exact(LANES);
                let mut wc = wj.chunks_exact(LANES);
                for (a, b) in (&mut xc).zip(&mut wc) {
                    for l in 0..LANES {
                        acc[l] += a[l] * b[l];
                    }
                }
                let mut s: f32 = xc.remainder().iter().zip(wc.remainder()).map(|(a, b)| a * b).sum();
                for a in acc {
                    s += a;
                }
                out[r] = s;
                r += 1;
            }
        }
    }
}

/// Four rows of `x` (each `w.len()` long) dotted with `w`.
#[inline(always)]
fn dot4(x: &[f32], w: &[f32]) -> [f32; 4] {
    let k = w.len();
    let (x0, rest) = x.split_at(k);
    let (x1, rest) = rest.split_at(k);
    let (x2, x3) = rest.split_at(k);
    let mut acc = [[0.0f32; LANES]; 4];
    let n8 = k / LANES;
    for c in 0..n8 {
        let o = c * LANES;
        let wv = &w[o..o + LANES];
        let (a0, a1, a2, a3) = (
            &x0[o..o + LANES],
            &x1[o..o + LANES],
            &x2[o..o + LANES],
            &x3[o..o + LANES],
        );
        for l in 0..LANES {
            acc[0][l] += a0[l] * wv[l];
            acc[1][l] += a1[l] * wv[l];
            acc[2][l] += a2[l] * wv[l];
            acc[3][l] += a3[l] * wv[l];
        }
    }
    let mut out = [0.0f32; 4];
    for (i, xi) in [x0, x1, x2, x3].iter().enumerate() {
        let mut s: f32 = xi[n8 * LANES..]
            .iter()
            .zip(&w[n8 * LANES..])
            .map(|(a, b)| a * b)
            .sum();
        for a in acc[i] {
            s += a;
        }
        out[i] = s;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::testing::{max_diff, rand};
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn linear_matches_candle() {
        for rows in [1, 5, 37] {
            linear_case(rows);
        }
    }

    fn linear_case(rows: usize) {
        let (i, o) = (70, 45);
        let x = rand(rows * i, 1);
        let w = rand(o * i, 2);
        let b = rand(o, 3);
        let lin = Linear::new(w.clone(), Some(b.clone()), i, o).unwrap();
        let got = lin.forward(&x, rows).unwrap();
        let dev = Device::Cpu;
        let cl = candle_nn::Linear::new(
            Tensor::from_vec(w, (o, i), &dev).unwrap(),
            Some(Tensor::from_vec(b, o, &dev).unwrap()),
        );
        let want: Vec<f32> = candle_core::Module::forward(
            &cl,
            &Tensor::from_vec(x.clone(), (rows, i), &dev).unwrap(),
        )
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
        assert!(max_diff(&got, &want) < 1e-5);
        // Accumulating onto a residual.
        let mut acc = rand(rows * o, 4);
        let base = acc.clone();
        lin.forward_into(&x, rows, &mut acc, true).unwrap();
        let want_acc: Vec<f32> = base.iter().zip(&want).map(|(a, b)| a + b).collect();
        assert!(max_diff(&acc, &want_acc) < 1e-5);
        assert!(lin
            .forward_into(&x, rows + 1, &mut vec![0.0; rows * o], false)
            .is_err());
        // The packed f32 kernel (when the CPU has it), K-blocked past 512.
        let k = 1100;
        let x = rand(rows * k, 21);
        let w = rand(o * k, 22);
        let b = rand(o, 23);
        let plain = Linear::new(w.clone(), Some(b.clone()), k, o).unwrap();
        let packed = Linear::new(w, Some(b), k, o).unwrap().into_packed();
        assert_eq!(
            matches!(packed.weight, Weight::PackedF32(_)),
            avx512::available_f32()
        );
        let mut want = rand(rows * o, 24);
        let mut got = want.clone();
        plain.forward_into(&x, rows, &mut want, true).unwrap();
        packed.forward_into(&x, rows, &mut got, true).unwrap();
        assert!(max_diff(&got, &want) < 1e-4, "{}", max_diff(&got, &want));
        let bf = packed.into_bf16();
        assert!(!matches!(bf.weight, Weight::PackedF32(_)));
    }

    /// On oneDNN a linear computes what the native one does, in f32 and in
    /// bf16, with the residual and with the fused quick-GELU; it reports
    /// its backend; a weight already packed for bf16 does not move.
    #[cfg(feature = "onednn")]
    #[test]
    fn onednn_linear_matches_native() {
        for (rows, i, o) in [(1, 64, 48), (9, 100, 70), (197, 96, 200)] {
            let x = rand(rows * i, 31);
            let w = rand(o * i, 32);
            let b = rand(o, 33);
            for bf16 in [false, true] {
                let lin = Linear::new(w.clone(), Some(b.clone()), i, o).unwrap();
                let native = lin.clone().into_backend(Backend::Native, bf16).unwrap();
                let dnnl = lin.into_backend(Backend::Onednn, bf16).unwrap();
                assert_eq!(
                    (native.backend(), dnnl.backend()),
                    (Backend::Native, Backend::Onednn)
                );
                let mut want = rand(rows * o, 34);
                let mut got = want.clone();
                native.forward_into(&x, rows, &mut want, true).unwrap();
                dnnl.forward_into(&x, rows, &mut got, true).unwrap();
                let d = max_diff(&got, &want);
                assert!(d < 1e-4, "{rows}x{i}x{o} bf16 {bf16}: {d}");
                let want = native.forward_act(&x, rows, Act::QuickGelu).unwrap();
                let got = dnnl.forward_act(&x, rows, Act::QuickGelu).unwrap();
                let d = max_diff(&got, &want);
                assert!(d < 1e-4, "{rows}x{i}x{o} bf16 {bf16} gelu: {d}");
            }
        }
        let packed = Linear::new(rand(64 * 64, 35), None, 64, 64)
            .unwrap()
            .into_bf16();
        if packed.is_bf16() {
            assert!(packed.into_backend(Backend::Onednn, true).is_err());
        }
    }

    /// Without the `onednn` feature asking for oneDNN is an error that says
    /// how to get it.
    #[cfg(not(feature = "onednn"))]
    #[test]
    fn onednn_needs_the_feature() {
        let lin = Linear::new(rand(16, 36), None, 4, 4).unwrap();
        let err = lin
            .into_backend(Backend::Onednn, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--features onednn"), "{err}");
    }

    /// The bf16 linear equals an f32 product of bf16-rounded inputs (to
    /// f32 summation error), with bias, residual and ragged shapes.
    #[test]
    fn bf16_linear_matches_rounded_f32() {
        let round = |v: &[f32]| -> Vec<f32> {
            v.iter()
                .map(|&x| avx512::to_f32(avx512::from_f32(x)))
                .collect()
        };
        for (rows, i, o) in [(1, 64, 64), (7, 33, 70), (13, 128, 200)] {
            let x = rand(rows * i, 11);
            let w = rand(o * i, 12);
            let b = rand(o, 13);
            let lin = Linear::new(w.clone(), Some(b.clone()), i, o)
                .unwrap()
                .into_bf16();
            let exact = Linear::new(round(&w), Some(b), i, o).unwrap();
            let xr = if lin.is_bf16() { round(&x) } else { x.clone() };
            let mut want = rand(rows * o, 14);
            let mut got = want.clone();
            exact.forward_into(&xr, rows, &mut want, true).unwrap();
            lin.forward_into(&x, rows, &mut got, true).unwrap();
            assert!(
                max_diff(&got, &want) < 1e-4,
                "{rows}x{i}x{o}: {}",
                max_diff(&got, &want)
            );
        }
        assert_eq!(avx512::from_f32(1.0), 0x3f80);
        // Ties round to even.
        assert_eq!(avx512::from_f32(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(avx512::from_f32(f32::from_bits(0x3f81_8000)), 0x3f82);
    }
}
