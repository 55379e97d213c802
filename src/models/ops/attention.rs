//! Multi-head scaled dot-product attention over packed sequences, one
//! task per (sequence, head) with no per-head copies.

use candle_core::{Error, Result};
use rayon::prelude::*;

use super::gemm::{MatMul, Output, Rhs, Threads};
use super::rows::softmax_in_place;
use super::{short, SendPtr};

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

/// Multi-head scaled dot-product attention over packed sequences.
///
/// `qkv`: `[rows, 3 · heads · head_dim]` with Q, K, V side by side (each
/// `heads` blocks of `head_dim`), as a fused projection produces. `causal`
/// lets row `i` of a sequence see rows `0..=i` only. Writes the context,
/// `[out_rows, heads · head_dim]` with heads side by side, into `ctx`.
/// One task per (sequence, head) on rayon.
///
/// The tasks write disjoint parts of `ctx` (their sequence's rows, their
/// head's columns) that interleave in memory, so no task gets a slice of
/// `ctx`: each writes through a raw pointer and the row stride
/// ([`MatMul::run_raw`]), and no two tasks hold overlapping references.
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
            MatMul {
                m: nq,
                n: nk,
                k: head_dim,
                a_rs: stride,
                b_rs: stride,
                c_rs: nk,
                rhs: Rhs::Transposed,
                output: Output::Overwrite,
                scale,
                threads: Threads::Caller,
            }
            .run(q, k, &mut scores)?;
            for (i, row) in scores.chunks_exact_mut(nk).enumerate() {
                let visible = if causal { q0 - sp.start + i + 1 } else { nk };
                softmax_in_place(&mut row[..visible]);
                row[visible..].fill(0.0);
            }
            let pv = MatMul {
                m: nq,
                n: head_dim,
                k: nk,
                a_rs: nk,
                b_rs: stride,
                c_rs: c,
                rhs: Rhs::Plain,
                output: Output::Overwrite,
                scale: 1.0,
                threads: Threads::Caller,
            };
            // SAFETY: the product's view starts at row o0, column
            // h*head_dim of `ctx` and spans nq rows of head_dim columns at
            // stride c: rows o0..o0+nq <= out_rows and columns inside the
            // row, so it lies inside `ctx` (out_rows * c, checked above).
            // Those elements belong to this (sequence, head) task alone
            // (sequences' output rows are disjoint, checked above; heads own
            // disjoint columns), and `ctx` stays mutably borrowed by this
            // function while the tasks run, so nothing else reads it.
            unsafe { pv.run_raw(&scores, v, out.ptr().wrapping_add(o0 * c + h * head_dim)) }
        })
}

#[cfg(test)]
mod tests {
    use super::super::testing::max_diff;
    use super::super::testing::rand;
    use super::*;
    use candle_core::{Device, Tensor};

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
