//! General matrix products on strided row-major f32 views, through the
//! `gemm` crate (the one candle uses). [`MatMul`] describes one product;
//! [`MatMul::run`] checks its views against slices, [`MatMul::run_raw`]
//! writes through a pointer for callers that hand disjoint parts of one
//! output to concurrent tasks (attention).

use candle_core::Result;

use super::{short, span, threads};

/// Which way the right-hand matrix is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rhs {
    /// `b` holds `n` rows of `k` (row stride `b_rs`): computes `A · Bᵀ`
    /// (a row-major `[out, in]` weight, as stored by PyTorch's `Linear`).
    Transposed,
    /// `b` holds `k` rows of `n` (row stride `b_rs`): computes `A · B`.
    Plain,
}

/// What a product does with the destination's previous values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// `c = scale · A·B`.
    Overwrite,
    /// `c += scale · A·B` (a bias or a residual already in `c`).
    Accumulate,
}

/// Whether a product may fork onto rayon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// On rayon's pool when the product is large enough to gain from it.
    Pool,
    /// On the calling thread (the caller is already one of many tasks).
    Caller,
}

/// One product `c[i, j] (+)= scale · Σ_p a[i, p] · b(p, j)` for `i < m`,
/// `j < n`, `p < k`; `a`, `c` row-major with row strides `a_rs`, `c_rs`,
/// `b` laid out as [`Rhs`] says with row stride `b_rs`.
#[derive(Debug, Clone, Copy)]
pub struct MatMul {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a_rs: usize,
    pub b_rs: usize,
    pub c_rs: usize,
    pub rhs: Rhs,
    pub output: Output,
    pub scale: f32,
    pub threads: Threads,
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

impl MatMul {
    /// Elements of `c` the product touches, counted from its first one.
    pub fn c_span(&self) -> usize {
        span(self.m, self.n, self.c_rs)
    }

    /// Checks that `a` and `b` hold the views and that `c_rs` keeps the
    /// destination rows apart.
    fn check_inputs(&self, a: &[f32], b: &[f32]) -> Result<()> {
        let (m, n, k) = (self.m, self.n, self.k);
        let need_a = span(m, k, self.a_rs);
        let need_b = match self.rhs {
            Rhs::Transposed => span(n, k, self.b_rs),
            Rhs::Plain => span(k, n, self.b_rs),
        };
        if a.len() < need_a || (k > 0 && self.a_rs < k && m > 1) {
            return Err(short("matmul lhs", need_a, a.len()));
        }
        if b.len() < need_b {
            return Err(short("matmul rhs", need_b, b.len()));
        }
        if self.c_rs < n && m > 1 {
            return Err(short("matmul dst row", n, self.c_rs));
        }
        Ok(())
    }

    /// Runs the product into `c`.
    pub fn run(&self, a: &[f32], b: &[f32], c: &mut [f32]) -> Result<()> {
        if self.m == 0 || self.n == 0 {
            return Ok(());
        }
        if c.len() < self.c_span() {
            return Err(short("matmul dst", self.c_span(), c.len()));
        }
        // SAFETY: `c` is borrowed mutably for the whole call, so nothing
        // else reads or writes it, and it holds `c_span()` elements.
        unsafe { self.run_raw(a, b, c.as_mut_ptr()) }
    }

    /// Runs the product into the destination at `c`.
    ///
    /// # Safety
    /// `c` must be valid for reads and writes of [`Self::c_span`] elements,
    /// and while the call runs no other thread may read or write the
    /// elements the product touches (rows `i < m`, columns `j < n` at
    /// `c + i · c_rs + j`); elements between those may be in use elsewhere.
    pub unsafe fn run_raw(&self, a: &[f32], b: &[f32], c: *mut f32) -> Result<()> {
        let (m, n, k) = (self.m, self.n, self.k);
        if m == 0 || n == 0 {
            return Ok(());
        }
        self.check_inputs(a, b)?;
        if k == 0 {
            if self.output == Output::Overwrite {
                for i in 0..m {
                    // SAFETY: row `i`'s first `n` elements are inside the
                    // span the caller vouches for, and exclusively ours.
                    unsafe { std::slice::from_raw_parts_mut(c.add(i * self.c_rs), n) }.fill(0.0);
                }
            }
            return Ok(());
        }
        let (rhs_cs, rhs_rs) = match self.rhs {
            Rhs::Transposed => (self.b_rs as isize, 1),
            Rhs::Plain => (1, self.b_rs as isize),
        };
        let par = match self.threads {
            Threads::Pool => parallelism(m, n, k),
            Threads::Caller => gemm::Parallelism::None,
        };
        // SAFETY: `a` and `b` hold their views (checked above); the caller
        // guarantees `c` holds the destination view and that nobody else
        // touches its elements during the call. `gemm` reads `c` only when
        // accumulating and writes exactly the `m x n` view.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c,
                1,
                self.c_rs as isize,
                self.output == Output::Accumulate,
                a.as_ptr(),
                1,
                self.a_rs as isize,
                b.as_ptr(),
                rhs_cs,
                rhs_rs,
                1.0,
                self.scale,
                false,
                false,
                false,
                par,
            );
        }
        Ok(())
    }
}
