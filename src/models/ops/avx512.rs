//! Weights packed in panels of 64 output columns and the AVX-512 kernels
//! over them: bf16 (`vdpbf16ps`, AVX512-BF16) and f32 (FMA, AVX-512F).
//!
//! Both kernels compute a register tile of up to [`MR`] rows x [`NR`]
//! columns and finish it with the same epilogue ([`store_tile`]: residual,
//! bias, masked store); [`for_rows!`] picks the tile height at run time.
//! The packed types exist only when the CPU has the kernels' features
//! ([`available`], [`available_f32`]), which is what makes calling them sound.

use candle_core::Result;
use rayon::prelude::*;

use super::{short, SendPtr};

/// Output columns per panel: 4 vectors of 16 f32.
pub const NR: usize = 64;
/// Rows per register tile.
const MR: usize = 6;

/// Whether the CPU runs the bf16 kernel (AVX512-F and AVX512-BF16).
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

/// Whether the CPU runs the f32 kernel (AVX-512F).
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

/// Rounds one row of activations to bf16 pairs as [`pair`] does (the same
/// bits, NaN included), 16 values per instruction: this conversion took 9%
/// of a bf16 text batch's time when done one value at a time.
///
/// # Safety
///
/// The CPU must have AVX512-F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_row(src: &[f32], dst: &mut [u32]) {
    use std::arch::x86_64::*;
    let vectors = src.len().min(2 * dst.len()) / 16;
    let out = dst.as_mut_ptr().cast::<u16>();
    let one = _mm512_set1_epi32(1);
    let bias = _mm512_set1_epi32(0x7fff);
    let qnan = _mm512_set1_epi32(0x7fc0);
    for v in 0..vectors {
        // SAFETY: AVX512-F is this function's contract. The load reads 16
        // values from index 16v, and 16v + 16 <= src.len(); the store
        // writes 16 u16 from u16 index 16v, and 16v + 16 <= 2 * dst.len(),
        // so inside `dst` (a u32 word holds the even value in its low half
        // and the odd one in its high half: the u16s' little-endian order).
        // Both are unaligned accesses.
        unsafe {
            let x = _mm512_loadu_ps(src.as_ptr().add(16 * v));
            let b = _mm512_castps_si512(x);
            let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), one);
            let r = _mm512_srli_epi32::<16>(_mm512_add_epi32(_mm512_add_epi32(b, bias), lsb));
            let r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x), qnan);
            _mm256_storeu_si256(out.add(16 * v).cast::<__m256i>(), _mm512_cvtepi32_epi16(r));
        }
    }
    pack_pairs(src, dst, 8 * vectors);
}

/// Without x86-64 no `PackedBf16` is ever made; this keeps `matmul`
/// compiling.
///
/// # Safety
///
/// None needed: plain Rust.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn pack_row(src: &[f32], dst: &mut [u32]) {
    pack_pairs(src, dst, 0);
}

/// `dst[p]` = the bf16 pair of `src[2p]` and `src[2p + 1]` (as [`pair`]
/// rounds them; zero past the end of `src`): 16 values per instruction
/// when the CPU has AVX-512F, one at a time otherwise.
#[cfg_attr(not(feature = "onednn"), allow(dead_code))]
pub fn bf16_pairs(src: &[f32], dst: &mut [u32]) {
    if available_f32() {
        // SAFETY: the CPU has AVX-512F, the one feature `pack_row` needs.
        unsafe { pack_row(src, dst) }
    } else {
        pack_pairs(src, dst, 0);
    }
}

/// `dst[p] = pair(src[2p], src[2p + 1])` from word `from` on (zero past
/// the end of `src`).
fn pack_pairs(src: &[f32], dst: &mut [u32], from: usize) {
    for (p, d) in dst.iter_mut().enumerate().skip(from) {
        let lo = src.get(2 * p).copied().unwrap_or(0.0);
        let hi = src.get(2 * p + 1).copied().unwrap_or(0.0);
        *d = pair(lo, hi);
    }
}

/// Checks the operands of `y[rows, n] (+)= x[rows, k] · Wᵀ + bias`.
fn check(
    what: &str,
    (rows, n, k): (usize, usize, usize),
    x: &[f32],
    y: &[f32],
    bias: Option<&[f32]>,
) -> Result<()> {
    if x.len() < rows * k {
        return Err(short(&format!("{what} input"), rows * k, x.len()));
    }
    if y.len() < rows * n {
        return Err(short(&format!("{what} output"), rows * n, y.len()));
    }
    if let Some(b) = bias {
        if b.len() < n {
            return Err(short(&format!("{what} bias"), n, b.len()));
        }
    }
    Ok(())
}

/// Calls `$kernel::<R>($args)` for the tile height `R = $mr` (1..=[`MR`]).
#[cfg(target_arch = "x86_64")]
macro_rules! for_rows {
    ($mr:expr, $kernel:ident($($arg:expr),* $(,)?)) => {
        match $mr {
            6 => $kernel::<6>($($arg),*),
            5 => $kernel::<5>($($arg),*),
            4 => $kernel::<4>($($arg),*),
            3 => $kernel::<3>($($arg),*),
            2 => $kernel::<2>($($arg),*),
            _ => $kernel::<1>($($arg),*),
        }
    };
}

/// Where a register tile goes: `R` rows of `cols <= NR` columns at `dst`
/// with row stride `ldd`, plus `bias` (one value per column) if any, plus
/// the values already there when `accumulate`.
#[derive(Clone, Copy)]
struct TileOut {
    dst: *mut f32,
    ldd: usize,
    cols: usize,
    bias: Option<*const f32>,
    accumulate: bool,
}

/// A `[n, k]` weight as panels of [`NR`] output columns; in a panel,
/// for each input pair (2p, 2p+1) the [`NR`] words
/// `w[j, 2p] | w[j, 2p+1] << 16` (zero past `n` or `k`).
#[derive(Debug, Clone)]
pub struct PackedBf16 {
    data: Vec<u32>,
    n: usize,
    k: usize,
    kp: usize,
}

impl PackedBf16 {
    /// Packs `w`, or `None` when the CPU lacks the bf16 kernel.
    pub fn new(w: &[f32], n: usize, k: usize) -> Option<Self> {
        if !available() || w.len() < n * k {
            return None;
        }
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
        Some(PackedBf16 { data, n, k, kp })
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
        let (n, k, kp) = (self.n, self.k, self.kp);
        check("bf16 linear", (rows, n, k), x, y, bias)?;
        if rows == 0 || n == 0 {
            return Ok(());
        }
        let mut xb = vec![0u32; rows * kp];
        xb.par_chunks_mut(kp)
            .zip(x.par_chunks(k))
            // SAFETY: `PackedBf16` exists only when the CPU has AVX512-F
            // (see `new`), the feature `pack_row` needs.
            .for_each(|(dst, src)| unsafe { pack_row(src, dst) });
        let out = SendPtr(y.as_mut_ptr());
        let panels = n.div_ceil(NR);
        (0..panels).into_par_iter().for_each(|pi| {
            let w = &self.data[pi * kp * NR..(pi + 1) * kp * NR];
            let cols = (n - pi * NR).min(NR);
            let mut m0 = 0;
            while m0 < rows {
                let mr = (rows - m0).min(MR);
                let xs = &xb[m0 * kp..(m0 + mr) * kp];
                let to = TileOut {
                    dst: out.ptr().wrapping_add(m0 * n + pi * NR),
                    ldd: n,
                    cols,
                    bias: bias.map(|b| b[pi * NR..].as_ptr()),
                    accumulate,
                };
                // SAFETY: the CPU has the bf16 kernel (`Self` exists only
                // then); `xs` holds mr rows of kp words and `w` one panel of
                // kp x NR; rows m0..m0+mr, columns pi*NR..pi*NR+cols of `y`
                // lie inside `y` (rows x n, checked) and belong to this
                // panel's task alone; the bias slice starts at column pi*NR
                // and holds n - pi*NR >= cols values.
                unsafe { tile_bf16(mr, xs, w, kp, to) };
                m0 += mr;
            }
        });
        Ok(())
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
    /// Packs `w`, or `None` when the CPU lacks the f32 kernel.
    pub fn new(w: &[f32], n: usize, k: usize) -> Option<Self> {
        if !available_f32() || w.len() < n * k {
            return None;
        }
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
        Some(PackedF32 { data, n, k })
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
        check("f32 linear", (rows, n, k), x, y, bias)?;
        if rows == 0 || n == 0 || k == 0 {
            return Ok(());
        }
        let out = SendPtr(y.as_mut_ptr());
        let panels = n.div_ceil(NR);
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
                    let to = TileOut {
                        dst: out.ptr().wrapping_add(m0 * n + pi * NR),
                        ldd: n,
                        cols,
                        bias: bias.filter(|_| first).map(|b| b[pi * NR..].as_ptr()),
                        accumulate: accumulate || !first,
                    };
                    // SAFETY: the CPU has the f32 kernel (`Self` exists
                    // only then); the tile reads x[m0..m0+mr, k0..k0+kb]
                    // inside `x` (rows * k, checked) and the panel's
                    // k-block inside `w`; its output rows m0..m0+mr, columns
                    // pi*NR..pi*NR+cols lie inside `y` (rows x n, checked)
                    // and belong to this panel's task alone (k-blocks of a
                    // panel run in order on one task).
                    unsafe { tile_f32(mr, &x[m0 * k + k0..], k, &w[k0 * NR..], kb, to) };
                    m0 += mr;
                }
                k0 += kb;
            }
        });
        Ok(())
    }
}

/// A tile of `mr <= MR` rows on the f32 kernel.
///
/// # Safety
/// The CPU must have AVX-512F. `x` must hold `mr` rows of `kb` inputs at
/// row stride `ldx`, `w` `kb` packed rows of [`NR`]; `to` must describe
/// `mr` rows of `to.cols` writable elements (and `to.cols` bias values)
/// that no other thread touches during the call.
unsafe fn tile_f32(mr: usize, x: &[f32], ldx: usize, w: &[f32], kb: usize, to: TileOut) {
    debug_assert!(mr <= MR && x.len() >= (mr - 1) * ldx + kb && w.len() >= kb * NR);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: forwarded from this function's contract.
    unsafe {
        for_rows!(mr, kernel_f32(x.as_ptr(), ldx, w.as_ptr(), kb, to))
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (mr, x, ldx, w, kb, to);
}

/// A tile of `mr <= MR` rows on the bf16 kernel.
///
/// # Safety
/// The CPU must have AVX-512F and AVX512-BF16. `x` must hold `mr` rows of
/// `kp` words, `w` `kp` packed rows of [`NR`] words; `to` as for
/// [`tile_f32`].
unsafe fn tile_bf16(mr: usize, x: &[u32], w: &[u32], kp: usize, to: TileOut) {
    debug_assert!(mr <= MR && x.len() >= mr * kp && w.len() >= kp * NR);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: forwarded from this function's contract.
    unsafe {
        for_rows!(mr, kernel_bf16(x.as_ptr(), w.as_ptr(), kp, to))
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (mr, x, w, kp, to);
}

/// `R` rows x 64 columns over `kb` inputs, 4R accumulators.
///
/// # Safety
/// As [`tile_f32`] with `mr = R`, `x` and `w` the starts of its slices.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel_f32<const R: usize>(
    x: *const f32,
    ldx: usize,
    w: *const f32,
    kb: usize,
    to: TileOut,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    for p in 0..kb {
        // SAFETY: rows r < R of `x` hold `kb` inputs at stride `ldx`, and
        // `w` holds `kb` rows of NR = 4 x 16 values (the caller's contract).
        unsafe {
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
    }
    // SAFETY: the caller's contract on `to`; AVX-512F is enabled here.
    unsafe { store_tile(&acc, to) }
}

/// `R` rows x 64 columns: 4R accumulators in registers over all of k.
///
/// # Safety
/// As [`tile_bf16`] with `mr = R`, `x` and `w` the starts of its slices.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel_bf16<const R: usize>(x: *const u32, w: *const u32, kp: usize, to: TileOut) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    for p in 0..kp {
        // SAFETY: rows r < R of `x` hold `kp` words and `w` holds `kp` rows
        // of NR = 4 x 16 words (the caller's contract); `__m512i` and
        // `__m512bh` are both 512 plain bits.
        unsafe {
            let wq = w.add(p * NR) as *const __m512i;
            let wv: [__m512bh; 4] = [
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(wq)),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(wq.add(1))),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(wq.add(2))),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(wq.add(3))),
            ];
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                    *x.add(r * kp + p) as i32,
                ));
                for v in 0..4 {
                    a[v] = _mm512_dpbf16_ps(a[v], xv, wv[v]);
                }
            }
        }
    }
    // SAFETY: the caller's contract on `to`; AVX-512F is enabled here.
    unsafe { store_tile(&acc, to) }
}

/// The kernels' epilogue: `dst (= or +=) acc + bias`, masked to `to.cols`.
///
/// # Safety
/// The CPU must have AVX-512F; `to` must describe `R` rows of `to.cols`
/// writable elements (and `to.cols` bias values) that no other thread
/// touches during the call.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store_tile<const R: usize>(acc: &[[std::arch::x86_64::__m512; 4]; R], to: TileOut) {
    use std::arch::x86_64::*;
    for (r, a) in acc.iter().enumerate() {
        for (v, av) in a.iter().enumerate() {
            let c0 = v * 16;
            if c0 >= to.cols {
                break;
            }
            let left = to.cols - c0;
            let mask: __mmask16 = if left >= 16 {
                0xffff
            } else {
                (1u16 << left) - 1
            };
            // SAFETY: the masked lanes are columns c0.. < to.cols of row
            // r < R, inside the destination and bias the caller vouches for.
            unsafe {
                let d = to.dst.add(r * to.ldd + c0);
                let mut y = *av;
                if to.accumulate {
                    y = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, d), y);
                }
                if let Some(b) = to.bias {
                    y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, b.add(c0)));
                }
                _mm512_mask_storeu_ps(d, mask, y);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector rounding gives the scalar rule's bits for every kind of
    /// value (normal, ties, denormals, infinities, NaN) and row length.
    #[test]
    fn pack_row_equals_the_scalar_rounding() {
        if !available_f32() {
            eprintln!("no AVX-512F here: nothing to compare");
            return;
        }
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            f32::from_bits(0x3f80_7fff),
            f32::MIN_POSITIVE / 3.0,
            -f32::MIN_POSITIVE / 7.0,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0xffc0_0001),
        ];
        let mut seed = 0x9e37_79b9u32;
        for k in [1usize, 2, 15, 16, 17, 31, 32, 33, 64, 77, 512] {
            let src: Vec<f32> = (0..k)
                .map(|i| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    if i % 5 == 0 {
                        specials[(seed >> 8) as usize % specials.len()]
                    } else {
                        f32::from_bits(seed)
                    }
                })
                .collect();
            let kp = k.div_ceil(2);
            let mut want = vec![0u32; kp];
            pack_pairs(&src, &mut want, 0);
            let mut got = vec![u32::MAX; kp];
            // SAFETY: AVX-512F was checked above.
            unsafe { pack_row(&src, &mut got) };
            assert_eq!(got, want, "k = {k}");
        }
    }
}
