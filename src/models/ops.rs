//! Fast f32 CPU kernels for the transformer encoders, used where candle's CPU
//! backend is slow: matrix products straight on row-major weights (no
//! transposed copies, bias and residual accumulated in place), a per-row
//! layer norm, softmax and quick-GELU with a vectorisable `exp`, and
//! multi-head attention done per (sequence, head) in one tight task with no
//! per-head copies.
//!
//! Matrix products go to the `gemm` crate (the one candle uses); everything
//! else is plain Rust written to auto-vectorise, compiled twice: once for
//! AVX2+FMA (picked at run time when the CPU has them) and once for the
//! baseline target. Work is spread over rayon's global pool, the only
//! thread pool in use while these kernels run.
//!
//! A [`Linear`] can also hold its weight in bf16 ([`Linear::into_bf16`]):
//! on CPUs with AVX512-BF16 (AMD Zen 4, Intel Sapphire Rapids) its product
//! then runs on `vdpbf16ps` — bf16 inputs, f32 accumulation, twice the
//! multiply-adds per cycle of f32 FMA — like PyTorch's bf16 autocast.
//! Elsewhere the bf16-rounded weight is kept as f32 and used by `gemm`.
//!
//! Every function checks that its slices are long enough for the shapes it
//! is given and returns an error otherwise, so no call can read or write out
//! of bounds.

use candle_core::{Error, Result};
use rayon::prelude::*;

use crate::simd::simd_fn;

fn short(what: &str, need: usize, have: usize) -> Error {
    Error::Msg(format!("ops: {what} needs {need} elements, has {have}"))
}

/// Elements a row-major `rows x cols` view with row stride `rs` spans.
fn span(rows: usize, cols: usize, rs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + cols
    }
}

fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

fn parallelism(m: usize, n: usize, k: usize) -> gemm::Parallelism {
    let t = threads();
    // Below ~1 MFLOP the fork/join costs more than it saves.
    if t > 1 && m * n * k >= 1 << 19 {
        gemm::Parallelism::Rayon(t)
    } else {
        gemm::Parallelism::None
    }
}

/// Which way the right-hand matrix is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rhs {
    /// `b` holds `n` rows of `k` (row stride `b_rs`): computes `A · Bᵀ`
    /// (a row-major `[out, in]` weight, as stored by PyTorch's `Linear`).
    Transposed,
    /// `b` holds `k` rows of `n` (row stride `b_rs`): computes `A · B`.
    Plain,
}

/// `c[i, j] = (accumulate ? c[i, j] : 0) + scale * Σ_p a[i, p] · b(p, j)`
/// for `i < m`, `j < n`, `p < k`; `a`, `c` row-major with row strides
/// `a_rs`, `c_rs`. Runs on rayon when `parallel` and the product is large.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    a_rs: usize,
    b: &[f32],
    b_rs: usize,
    rhs: Rhs,
    c: &mut [f32],
    c_rs: usize,
    accumulate: bool,
    scale: f32,
    parallel: bool,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let need_a = span(m, k, a_rs);
    let need_b = match rhs {
        Rhs::Transposed => span(n, k, b_rs),
        Rhs::Plain => span(k, n, b_rs),
    };
    let need_c = span(m, n, c_rs);
    if a.len() < need_a || (k > 0 && a_rs < k && m > 1) {
        return Err(short("matmul lhs", need_a, a.len()));
    }
    if b.len() < need_b {
        return Err(short("matmul rhs", need_b, b.len()));
    }
    if c.len() < need_c || (c_rs < n && m > 1) {
        return Err(short("matmul dst", need_c, c.len()));
    }
    if k == 0 {
        if !accumulate {
            for row in c.chunks_mut(c_rs.max(n)).take(m) {
                row[..n].fill(0.0);
            }
        }
        return Ok(());
    }
    let (rhs_cs, rhs_rs) = match rhs {
        Rhs::Transposed => (b_rs as isize, 1),
        Rhs::Plain => (1, b_rs as isize),
    };
    let par = if parallel {
        parallelism(m, n, k)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the spans of all three matrices were checked above against
    // the slice lengths; `c` is borrowed mutably, so nothing aliases it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            c_rs as isize,
            accumulate,
            a.as_ptr(),
            1,
            a_rs as isize,
            b.as_ptr(),
            rhs_cs,
            rhs_rs,
            1.0,
            scale,
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

/// A PyTorch `Linear`: row-major weight `[out, in]` and an optional bias.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Vec<f32>,
    /// The weight in bf16, packed for the AVX512-BF16 kernel (then
    /// `weight` is empty).
    packed: Option<bf16::Packed>,
    /// The f32 weight packed for the AVX-512 kernel (then `weight` is
    /// empty); see [`Linear::into_packed`].
    packed_f32: Option<bf16::PackedF32>,
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
            weight,
            packed: None,
            packed_f32: None,
            bias,
            in_dim,
            out_dim,
        })
    }

    /// The same linear with its weight rounded to bf16 (nearest even):
    /// packed for `vdpbf16ps` when the CPU has AVX512-BF16 (activations
    /// are then rounded to bf16 too, accumulation stays f32), else kept
    /// as f32 values.
    pub fn into_bf16(mut self) -> Self {
        if self.packed.is_some() {
            return self;
        }
        if let Some(p) = self.packed_f32.take() {
            self.weight = p.unpack();
        }
        if bf16::available() {
            self.packed = Some(bf16::Packed::new(&self.weight, self.out_dim, self.in_dim));
            self.weight = Vec::new();
        } else {
            for w in &mut self.weight {
                *w = bf16::to_f32(bf16::from_f32(*w));
            }
        }
        self
    }

    /// The same linear with its f32 weight packed in panels for the
    /// AVX-512 kernel when the CPU has AVX-512F (no repacking per call, so
    /// few-row products are as efficient as large ones); unchanged
    /// otherwise. Call after [`Self::concat`].
    pub fn into_packed(mut self) -> Self {
        if self.packed.is_none() && self.packed_f32.is_none() && bf16::available_f32() {
            self.packed_f32 = Some(bf16::PackedF32::new(
                &self.weight,
                self.out_dim,
                self.in_dim,
            ));
            self.weight = Vec::new();
        }
        self
    }

    /// Whether products run on the bf16 kernel.
    pub fn is_bf16(&self) -> bool {
        self.packed.is_some()
    }

    /// Stacks linears with the same input along the output dimension (a
    /// fused Q/K/V projection); all or none must have a bias.
    pub fn concat(parts: &[Linear]) -> Result<Self> {
        let in_dim = parts.first().map_or(0, |p| p.in_dim);
        let mut weight = Vec::new();
        let mut bias = Some(Vec::new());
        let mut out_dim = 0;
        for p in parts {
            if p.packed.is_some() || p.packed_f32.is_some() {
                return Err(Error::Msg(
                    "ops: concatenate linears before into_bf16".into(),
                ));
            }
            if p.in_dim != in_dim {
                return Err(Error::Msg(
                    "ops: concatenated linears differ in input size".into(),
                ));
            }
            weight.extend_from_slice(&p.weight);
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
        if let Some(p) = &self.packed {
            return p.matmul(x, rows, y, self.bias.as_deref(), accumulate);
        }
        if let Some(p) = &self.packed_f32 {
            return p.matmul(x, rows, y, self.bias.as_deref(), accumulate);
        }
        if rows <= SMALL_ROWS {
            return self.forward_small(x, rows, y, accumulate);
        }
        match (&self.bias, accumulate) {
            (Some(b), true) => add_rows(y, b),
            (Some(b), false) => y.chunks_exact_mut(out).for_each(|r| r.copy_from_slice(b)),
            (None, _) => {}
        }
        let read = accumulate || self.bias.is_some();
        matmul(
            (rows, out, self.in_dim),
            x,
            self.in_dim,
            &self.weight,
            self.in_dim,
            Rhs::Transposed,
            y,
            out,
            read,
            1.0,
            true,
        )
    }

    /// [`Self::forward_into`] for a few rows (a text, a pooled token): dot
    /// products of the input rows with each weight row, column blocks on
    /// rayon. Memory-bound like any few-row product, but it reads the
    /// weight once, where `gemm` would first repack all of it.
    fn forward_small(&self, x: &[f32], rows: usize, y: &mut [f32], accumulate: bool) -> Result<()> {
        let (k, n) = (self.in_dim, self.out_dim);
        if rows == 0 || n == 0 {
            return Ok(());
        }
        const NB: usize = 32;
        // yt[j, r]: output column j of row r, column blocks of NB.
        let mut yt = vec![0.0f32; n * rows];
        yt.par_chunks_mut(NB * rows)
            .zip(self.weight.par_chunks(NB * k.max(1)))
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

/// Weights packed in panels of 64 output columns and the AVX-512 kernels
/// over them: bf16 (`vdpbf16ps`, AVX512-BF16) and f32 (FMA, AVX-512F).
mod bf16 {
    use super::{short, SendPtr};
    use candle_core::Result;
    use rayon::prelude::*;

    /// Output columns per panel: 4 vectors of 16 f32.
    pub const NR: usize = 64;
    /// Rows per register tile.
    const MR: usize = 6;

    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Round to nearest even, as PyTorch's `.to(torch.bfloat16)`.
    #[inline(always)]
    pub fn from_f32(x: f32) -> u16 {
        let b = x.to_bits();
        if x.is_nan() {
            0x7fc0
        } else {
            ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
        }
    }

    pub fn to_f32(h: u16) -> f32 {
        f32::from_bits((h as u32) << 16)
    }

    /// Two bf16 in one word: `lo` in the low half (the even element).
    #[inline(always)]
    fn pair(lo: f32, hi: f32) -> u32 {
        from_f32(lo) as u32 | ((from_f32(hi) as u32) << 16)
    }

    /// A `[n, k]` weight as panels of [`NR`] output columns; in a panel,
    /// for each input pair (2p, 2p+1) the [`NR`] words
    /// `w[j, 2p] | w[j, 2p+1] << 16` (zero past `n` or `k`).
    #[derive(Debug, Clone)]
    pub struct Packed {
        data: Vec<u32>,
        n: usize,
        k: usize,
        kp: usize,
    }

    impl Packed {
        pub fn new(w: &[f32], n: usize, k: usize) -> Self {
            let kp = k.div_ceil(2);
            let panels = n.div_ceil(NR);
            let at = |j: usize, i: usize| if j < n && i < k { w[j * k + i] } else { 0.0 };
            let mut data = vec![0u32; panels * kp * NR];
            for (pi, panel) in data.chunks_exact_mut(kp * NR).enumerate() {
                for (p, words) in panel.chunks_exact_mut(NR).enumerate() {
                    for (jj, word) in words.iter_mut().enumerate() {
                        let j = pi * NR + jj;
                        *word = pair(at(j, 2 * p), at(j, 2 * p + 1));
                    }
                }
            }
            Packed { data, n, k, kp }
        }

        /// `y[rows, n] (+)= x[rows, k] · Wᵀ + bias`, lengths already
        /// checked by the caller except where noted.
        pub fn matmul(
            &self,
            x: &[f32],
            rows: usize,
            y: &mut [f32],
            bias: Option<&[f32]>,
            accumulate: bool,
        ) -> Result<()> {
            let (n, k, kp) = (self.n, self.k, self.kp);
            if x.len() < rows * k {
                return Err(short("bf16 linear input", rows * k, x.len()));
            }
            if y.len() < rows * n {
                return Err(short("bf16 linear output", rows * n, y.len()));
            }
            if let Some(b) = bias {
                if b.len() < n {
                    return Err(short("bf16 linear bias", n, b.len()));
                }
            }
            if rows == 0 || n == 0 {
                return Ok(());
            }
            let mut xb = vec![0u32; rows * kp];
            xb.par_chunks_mut(kp)
                .zip(x.par_chunks(k))
                .for_each(|(dst, src)| {
                    for (p, d) in dst.iter_mut().enumerate() {
                        let lo = src[2 * p];
                        let hi = src.get(2 * p + 1).copied().unwrap_or(0.0);
                        *d = pair(lo, hi);
                    }
                });
            let out = SendPtr(y.as_mut_ptr());
            let panels = n.div_ceil(NR);
            let bias_ptr = bias.map(|b| b.as_ptr() as usize);
            (0..panels).into_par_iter().for_each(|pi| {
                let w = &self.data[pi * kp * NR..(pi + 1) * kp * NR];
                let cols = (n - pi * NR).min(NR);
                let mut m0 = 0;
                while m0 < rows {
                    let mr = (rows - m0).min(MR);
                    let xs = &xb[m0 * kp..(m0 + mr) * kp];
                    // SAFETY: rows m0..m0+mr, columns pi*NR..pi*NR+cols of
                    // `y` (checked to hold rows x n) belong to this panel's
                    // task alone; the bias has n elements; `available()`
                    // held when the weight was packed.
                    unsafe {
                        let dst = out.ptr().add(m0 * n + pi * NR);
                        let b = bias_ptr.map(|b| (b as *const f32).add(pi * NR));
                        tile(mr, xs, w, kp, dst, n, cols, b, accumulate);
                    }
                    m0 += mr;
                }
            });
            Ok(())
        }
    }

    pub fn available_f32() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Inputs per k-block of the f32 kernel (a 64 x KB panel block is
    /// 128 KiB, kept in L2 while the row tiles pass over it).
    const KB: usize = 512;

    /// A `[n, k]` f32 weight as panels of [`NR`] output columns: in a
    /// panel, for each input i the [`NR`] values `w[j, i]` (zero past `n`).
    #[derive(Debug, Clone)]
    pub struct PackedF32 {
        data: Vec<f32>,
        n: usize,
        k: usize,
    }

    impl PackedF32 {
        pub fn new(w: &[f32], n: usize, k: usize) -> Self {
            let panels = n.div_ceil(NR);
            let mut data = vec![0.0f32; panels * k * NR];
            for (pi, panel) in data.chunks_exact_mut(k * NR).enumerate() {
                for (i, vals) in panel.chunks_exact_mut(NR).enumerate() {
                    for (jj, v) in vals.iter_mut().enumerate() {
                        let j = pi * NR + jj;
                        if j < n {
                            *v = w[j * k + i];
                        }
                    }
                }
            }
            PackedF32 { data, n, k }
        }

        /// The row-major `[n, k]` weight back.
        pub fn unpack(&self) -> Vec<f32> {
            let (n, k) = (self.n, self.k);
            let mut w = vec![0.0f32; n * k];
            for j in 0..n {
                let (pi, jj) = (j / NR, j % NR);
                for i in 0..k {
                    w[j * k + i] = self.data[pi * k * NR + i * NR + jj];
                }
            }
            w
        }

        /// `y[rows, n] (+)= x[rows, k] · Wᵀ + bias`.
        pub fn matmul(
            &self,
            x: &[f32],
            rows: usize,
            y: &mut [f32],
            bias: Option<&[f32]>,
            accumulate: bool,
        ) -> Result<()> {
            let (n, k) = (self.n, self.k);
            if x.len() < rows * k {
                return Err(short("f32 linear input", rows * k, x.len()));
            }
            if y.len() < rows * n {
                return Err(short("f32 linear output", rows * n, y.len()));
            }
            if let Some(b) = bias {
                if b.len() < n {
                    return Err(short("f32 linear bias", n, b.len()));
                }
            }
            if rows == 0 || n == 0 || k == 0 {
                return Ok(());
            }
            let out = SendPtr(y.as_mut_ptr());
            let panels = n.div_ceil(NR);
            let bias_ptr = bias.map(|b| b.as_ptr() as usize);
            (0..panels).into_par_iter().for_each(|pi| {
                let w = &self.data[pi * k * NR..(pi + 1) * k * NR];
                let cols = (n - pi * NR).min(NR);
                let mut k0 = 0;
                while k0 < k {
                    let kb = (k - k0).min(KB);
                    let first = k0 == 0;
                    let mut m0 = 0;
                    while m0 < rows {
                        let mr = (rows - m0).min(MR);
                        // SAFETY: as in `Packed::matmul`; the row tile
                        // reads x[m0..m0+mr, k0..k0+kb] inside `x`
                        // (checked to hold rows * k) and the panel's
                        // k-block inside `w`.
                        unsafe {
                            let dst = out.ptr().add(m0 * n + pi * NR);
                            let b = if first {
                                bias_ptr.map(|b| (b as *const f32).add(pi * NR))
                            } else {
                                None
                            };
                            tile_f32(
                                mr,
                                x.as_ptr().add(m0 * k + k0),
                                k,
                                w.as_ptr().add(k0 * NR),
                                kb,
                                dst,
                                n,
                                cols,
                                b,
                                accumulate || !first,
                            );
                        }
                        m0 += mr;
                    }
                    k0 += kb;
                }
            });
            Ok(())
        }
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_f32(
        mr: usize,
        x: *const f32,
        ldx: usize,
        w: *const f32,
        kb: usize,
        dst: *mut f32,
        ldd: usize,
        cols: usize,
        bias: Option<*const f32>,
        acc: bool,
    ) {
        #[cfg(target_arch = "x86_64")]
        match mr {
            6 => kernel_f32::<6>(x, ldx, w, kb, dst, ldd, cols, bias, acc),
            5 => kernel_f32::<5>(x, ldx, w, kb, dst, ldd, cols, bias, acc),
            4 => kernel_f32::<4>(x, ldx, w, kb, dst, ldd, cols, bias, acc),
            3 => kernel_f32::<3>(x, ldx, w, kb, dst, ldd, cols, bias, acc),
            2 => kernel_f32::<2>(x, ldx, w, kb, dst, ldd, cols, bias, acc),
            _ => kernel_f32::<1>(x, ldx, w, kb, dst, ldd, cols, bias, acc),
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (mr, x, ldx, w, kb, dst, ldd, cols, bias, acc);
    }

    /// `R` rows x 64 columns over `kb` inputs, 4R accumulators.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel_f32<const R: usize>(
        x: *const f32,
        ldx: usize,
        w: *const f32,
        kb: usize,
        dst: *mut f32,
        ldd: usize,
        cols: usize,
        bias: Option<*const f32>,
        accumulate: bool,
    ) {
        use std::arch::x86_64::*;
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        for p in 0..kb {
            let wq = w.add(p * NR);
            let wv = [
                _mm512_loadu_ps(wq),
                _mm512_loadu_ps(wq.add(16)),
                _mm512_loadu_ps(wq.add(32)),
                _mm512_loadu_ps(wq.add(48)),
            ];
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*x.add(r * ldx + p));
                for v in 0..4 {
                    a[v] = _mm512_fmadd_ps(xv, wv[v], a[v]);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (v, av) in a.iter().enumerate() {
                let c0 = v * 16;
                if c0 >= cols {
                    break;
                }
                let left = cols - c0;
                let mask: __mmask16 = if left >= 16 {
                    0xffff
                } else {
                    (1u16 << left) - 1
                };
                let d = dst.add(r * ldd + c0);
                let mut y = *av;
                if accumulate {
                    y = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, d), y);
                }
                if let Some(b) = bias {
                    y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, b.add(c0)));
                }
                _mm512_mask_storeu_ps(d, mask, y);
            }
        }
    }

    /// Dispatches a tile of `mr <= MR` rows.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(
        mr: usize,
        x: &[u32],
        w: &[u32],
        kp: usize,
        dst: *mut f32,
        ldd: usize,
        cols: usize,
        bias: Option<*const f32>,
        acc: bool,
    ) {
        #[cfg(target_arch = "x86_64")]
        match mr {
            6 => kernel::<6>(x, w, kp, dst, ldd, cols, bias, acc),
            5 => kernel::<5>(x, w, kp, dst, ldd, cols, bias, acc),
            4 => kernel::<4>(x, w, kp, dst, ldd, cols, bias, acc),
            3 => kernel::<3>(x, w, kp, dst, ldd, cols, bias, acc),
            2 => kernel::<2>(x, w, kp, dst, ldd, cols, bias, acc),
            _ => kernel::<1>(x, w, kp, dst, ldd, cols, bias, acc),
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (mr, x, w, kp, dst, ldd, cols, bias, acc);
    }

    /// `R` rows x 64 columns: 4R accumulators in registers over all of k.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel<const R: usize>(
        x: &[u32],
        w: &[u32],
        kp: usize,
        dst: *mut f32,
        ldd: usize,
        cols: usize,
        bias: Option<*const f32>,
        accumulate: bool,
    ) {
        use std::arch::x86_64::*;
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        let xp = x.as_ptr();
        let wp = w.as_ptr();
        for p in 0..kp {
            let wq = wp.add(p * NR) as *const __m512i;
            let wv: [__m512bh; 4] = [
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(wq)),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(wq.add(1))),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(wq.add(2))),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(wq.add(3))),
            ];
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                    *xp.add(r * kp + p) as i32,
                ));
                for v in 0..4 {
                    a[v] = _mm512_dpbf16_ps(a[v], xv, wv[v]);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (v, av) in a.iter().enumerate() {
                let c0 = v * 16;
                if c0 >= cols {
                    break;
                }
                let left = cols - c0;
                let mask: __mmask16 = if left >= 16 {
                    0xffff
                } else {
                    (1u16 << left) - 1
                };
                let d = dst.add(r * ldd + c0);
                let mut y = *av;
                if accumulate {
                    y = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, d), y);
                }
                if let Some(b) = bias {
                    y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, b.add(c0)));
                }
                _mm512_mask_storeu_ps(d, mask, y);
            }
        }
    }
}

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

const LANES: usize = 8;

#[inline(always)]
fn sum(x: &[f32]) -> f32 {
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
fn max(x: &[f32]) -> f32 {
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

/// One sequence in a packed batch: rows `start .. start + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub len: usize,
}

/// Which query rows to compute attention for.
#[derive(Debug, Clone, Copy)]
pub enum Queries<'a> {
    /// Every row; the output row equals the input row.
    All,
    /// One row per sequence (absolute row index, inside that sequence);
    /// output row `s` for sequence `s`.
    One(&'a [usize]),
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the tasks that share it write disjoint regions (see `attention`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the `Send` wrapper).
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// Multi-head scaled dot-product attention over packed sequences.
///
/// `qkv`: `[rows, 3 · heads · head_dim]` with Q, K, V side by side (each
/// `heads` blocks of `head_dim`), as a fused projection produces. `causal`
/// lets row `i` of a sequence see rows `0..=i` only. Writes the context,
/// `[out_rows, heads · head_dim]` with heads side by side, into `ctx`.
/// One task per (sequence, head) on rayon.
pub fn attention(
    qkv: &[f32],
    spans: &[Span],
    heads: usize,
    head_dim: usize,
    causal: bool,
    queries: Queries,
    ctx: &mut [f32],
) -> Result<()> {
    let c = heads * head_dim;
    let rows = spans.iter().map(|s| s.start + s.len).max().unwrap_or(0);
    if qkv.len() < rows * 3 * c {
        return Err(short("attention qkv", rows * 3 * c, qkv.len()));
    }
    let out_rows = match queries {
        Queries::All => rows,
        Queries::One(q) => {
            if q.len() != spans.len() {
                return Err(Error::Msg(
                    "ops: attention needs one query row per sequence".into(),
                ));
            }
            for (r, s) in q.iter().zip(spans) {
                if *r < s.start || *r >= s.start + s.len {
                    return Err(Error::Msg(format!(
                        "ops: query row {r} is outside its sequence {s:?}"
                    )));
                }
            }
            spans.len()
        }
    };
    if ctx.len() < out_rows * c {
        return Err(short("attention ctx", out_rows * c, ctx.len()));
    }
    // Output regions of different (sequence, head) tasks are disjoint: a
    // task writes its sequence's output rows (distinct per sequence: the
    // spans must not overlap) in its head's columns.
    let mut ends: Vec<(usize, usize)> = spans.iter().map(|s| (s.start, s.start + s.len)).collect();
    ends.sort_unstable();
    if ends.windows(2).any(|w| w[1].0 < w[0].1) {
        return Err(Error::Msg("ops: attention spans overlap".into()));
    }
    let scale = (head_dim as f32).powf(-0.5);
    let out = SendPtr(ctx.as_mut_ptr());
    let tasks = spans.len() * heads;
    (0..tasks)
        .into_par_iter()
        .try_for_each(|task| -> Result<()> {
            let (s, h) = (task / heads, task % heads);
            let sp = spans[s];
            let (q0, nq, o0) = match queries {
                Queries::All => (sp.start, sp.len, sp.start),
                Queries::One(q) => (q[s], 1, s),
            };
            // Keys a query may see: all of the sequence, or up to itself.
            let nk = if causal { q0 + nq - sp.start } else { sp.len };
            let stride = 3 * c;
            let q = &qkv[q0 * stride + h * head_dim..];
            let k = &qkv[sp.start * stride + c + h * head_dim..];
            let v = &qkv[sp.start * stride + 2 * c + h * head_dim..];
            let mut scores = vec![0.0f32; nq * nk];
            matmul(
                (nq, nk, head_dim),
                q,
                stride,
                k,
                stride,
                Rhs::Transposed,
                &mut scores,
                nk,
                false,
                scale,
                false,
            )?;
            for (i, row) in scores.chunks_exact_mut(nk).enumerate() {
                let visible = if causal { q0 - sp.start + i + 1 } else { nk };
                softmax_in_place(&mut row[..visible]);
                row[visible..].fill(0.0);
            }
            let dst_len = span(nq, head_dim, c);
            // SAFETY: rows o0..o0+nq, columns h*head_dim..(h+1)*head_dim of
            // `ctx` belong to this task alone (checked disjoint above) and lie
            // inside `ctx` (out_rows * c checked above).
            let dst = unsafe {
                std::slice::from_raw_parts_mut(out.ptr().add(o0 * c + h * head_dim), dst_len)
            };
            matmul(
                (nq, head_dim, nk),
                &scores,
                nk,
                v,
                stride,
                Rhs::Plain,
                dst,
                c,
                false,
                1.0,
                false,
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

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
        assert_eq!(packed.packed_f32.is_some(), bf16::available_f32());
        let mut want = rand(rows * o, 24);
        let mut got = want.clone();
        plain.forward_into(&x, rows, &mut want, true).unwrap();
        packed.forward_into(&x, rows, &mut got, true).unwrap();
        assert!(max_diff(&got, &want) < 1e-4, "{}", max_diff(&got, &want));
        let bf = packed.into_bf16();
        assert!(bf.packed_f32.is_none());
    }

    /// The bf16 linear equals an f32 product of bf16-rounded inputs (to
    /// f32 summation error), with bias, residual and ragged shapes.
    #[test]
    fn bf16_linear_matches_rounded_f32() {
        let round = |v: &[f32]| -> Vec<f32> {
            v.iter().map(|&x| bf16::to_f32(bf16::from_f32(x))).collect()
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
        assert_eq!(bf16::from_f32(1.0), 0x3f80);
        // Ties round to even.
        assert_eq!(bf16::from_f32(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(bf16::from_f32(f32::from_bits(0x3f81_8000)), 0x3f82);
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

    /// Attention against candle's per-head formulation, with and without a
    /// causal mask, for all rows and for one pooled row per sequence.
    #[test]
    fn attention_matches_candle() {
        let dev = Device::Cpu;
        let (heads, hd) = (3, 8);
        let c = heads * hd;
        let spans = [Span { start: 0, len: 5 }, Span { start: 5, len: 9 }];
        let rows = 14;
        let qkv = rand(rows * 3 * c, 8);
        for causal in [false, true] {
            let mut ctx = vec![0.0; rows * c];
            attention(&qkv, &spans, heads, hd, causal, Queries::All, &mut ctx).unwrap();
            let pool = [3usize, 11];
            let mut pooled = vec![0.0; 2 * c];
            attention(
                &qkv,
                &spans,
                heads,
                hd,
                causal,
                Queries::One(&pool),
                &mut pooled,
            )
            .unwrap();
            let all = Tensor::from_vec(qkv.clone(), (rows, 3 * c), &dev).unwrap();
            for (si, s) in spans.iter().enumerate() {
                let t = s.len;
                let part = all.narrow(0, s.start, t).unwrap();
                let split = |i: usize| {
                    part.narrow(1, i * c, c)
                        .unwrap()
                        .reshape((t, heads, hd))
                        .unwrap()
                        .transpose(0, 1)
                        .unwrap()
                        .contiguous()
                        .unwrap()
                };
                let (q, k, v) = (split(0), split(1), split(2));
                let mut sc = (q.matmul(&k.t().unwrap()).unwrap() * (hd as f64).powf(-0.5)).unwrap();
                if causal {
                    let m: Vec<f32> = (0..t)
                        .flat_map(|i| (0..t).map(move |j| if j > i { -1e30 } else { 0.0 }))
                        .collect();
                    sc = sc
                        .broadcast_add(&Tensor::from_vec(m, (1, t, t), &dev).unwrap())
                        .unwrap();
                }
                let p = candle_nn::ops::softmax_last_dim(&sc).unwrap();
                let want: Vec<f32> = p
                    .matmul(&v)
                    .unwrap()
                    .transpose(0, 1)
                    .unwrap()
                    .contiguous()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let got = &ctx[s.start * c..(s.start + t) * c];
                assert!(max_diff(got, &want) < 1e-5, "causal {causal}");
                let r = pool[si] - s.start;
                assert!(max_diff(&pooled[si * c..(si + 1) * c], &want[r * c..(r + 1) * c]) < 1e-5);
            }
        }
        let bad = [Span { start: 0, len: 5 }, Span { start: 4, len: 5 }];
        assert!(attention(
            &qkv,
            &bad,
            heads,
            hd,
            false,
            Queries::All,
            &mut vec![0.0; rows * c]
        )
        .is_err());
    }
}
