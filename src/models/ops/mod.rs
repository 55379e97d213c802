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
//! thread pool in use while these kernels run (oneDNN's products, when
//! chosen, run on an OpenMP team of the same size, one product at a time).
//!
//! A [`Linear`] can also hold its weight in bf16 ([`Linear::into_bf16`]):
//! on CPUs with AVX512-BF16 (AMD Zen 4, Intel Sapphire Rapids) its product
//! then runs on `vdpbf16ps` — bf16 inputs, f32 accumulation, twice the
//! multiply-adds of an f32 FMA per instruction — like PyTorch's bf16
//! autocast. That pays on AMD Zen 4/5; on Intel Xeons, where the FMA issues
//! on two ports and `vdpbf16ps` (as far as we know) on one, it does not
//! (BENCHMARKS.md, issue 20): there oneDNN's AMX products are the fast bf16.
//! Elsewhere the bf16-rounded weight is kept as f32 and used by `gemm`.
//!
//! Every function checks that its slices are long enough for the shapes it
//! is given and returns an error otherwise, so no call can read or write out
//! of bounds.
//!
//! With the `onednn` build feature the products of a [`Linear`] can run on
//! oneDNN's matmul instead ([`Linear::into_backend`], module `onednn`): on Intel
//! Xeons with AMX its bf16 products use the matrix tiles. Which one a model
//! uses is [`backend`]'s decision (`cpu_backend`: `auto` measures both at
//! load). Everything but the products (layer norm, attention, GELU where
//! not fused) stays on the native kernels either way.
//!
//! Layout: [`gemm`] (the strided product descriptor), [`linear`] (weights
//! in their kernel's layout), [`avx512`] (packed weights and their
//! kernels), [`rows`] (element-wise and per-row kernels), [`attention`],
//! [`backend`] (the choice), `onednn` (the bindings, feature `onednn`).

use candle_core::Error;

mod attention;
mod avx512;
pub mod backend;
mod gemm;
mod linear;
#[cfg(feature = "onednn")]
pub mod onednn;
mod rows;

pub use attention::{attention, Queries, Span};
pub use backend::{Backend, BackendChoice, CpuBackend, MatmulShape};
pub use gemm::{MatMul, Output, Rhs, Threads};
pub use linear::{Act, Linear};
pub use rows::{add_rows, exp, layer_norm, quick_gelu_in_place, softmax_in_place};

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

/// An output pointer handed to the rayon tasks that write disjoint parts
/// of one buffer (attention heads, weight panels).
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);

// SAFETY: the pointer is only dereferenced by kernels whose callers give
// each task a region no other task touches; sending it is like sending a
// `&mut` to that region.
unsafe impl Send for SendPtr {}
// SAFETY: shared between tasks only to compute each task's own region
// (see `Send` above); no task reads or writes another's.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the `Send` wrapper).
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

#[cfg(test)]
mod testing {
    pub fn rand(n: usize, seed: u64) -> Vec<f32> {
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

    pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }
}
