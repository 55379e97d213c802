use super::super::testing::{max_diff, rand};
use super::*;

/// `post(x · Wᵀ + b)` in f64, the reference.
fn reference(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    rows: usize,
    k: usize,
    post: Post,
    y0: &[f32],
) -> Vec<f32> {
    let n = b.len();
    let mut y = vec![0.0f32; rows * n];
    for r in 0..rows {
        for j in 0..n {
            let mut s = b[j] as f64;
            for i in 0..k {
                s += x[r * k + i] as f64 * w[j * k + i] as f64;
            }
            let v = match post {
                Post::Store => s,
                Post::Accumulate => s + y0[r * n + j] as f64,
                Post::Swish(a) => s / (1.0 + (-(a as f64) * s).exp()),
            };
            y[r * n + j] = v as f32;
        }
    }
    y
}

fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|&x| avx512::to_f32(avx512::from_f32(x)))
        .collect()
}

#[test]
fn the_library_writes_no_byte_past_the_declared_descriptor() {
    // A descriptor inside a larger buffer of a known pattern: the
    // library may write only the bytes `sys` declares.
    #[repr(C)]
    struct Guarded {
        md: sys::dnnl_memory_desc_t,
        tail: [u64; 64],
    }
    let mut g = Guarded {
        md: sys::dnnl_memory_desc_t::zeroed(),
        tail: [0x5a5a_5a5a_5a5a_5a5a; 64],
    };
    let dims = [3i64, 5];
    // SAFETY: a valid out-pointer to at least the declared size.
    let st = unsafe {
        sys::dnnl_memory_desc_init_by_tag(&mut g.md, 2, dims.as_ptr(), sys::DNNL_F32, sys::DNNL_AB)
    };
    assert_eq!(st, sys::DNNL_SUCCESS);
    assert!(g.tail.iter().all(|&w| w == 0x5a5a_5a5a_5a5a_5a5a));
    // The fields this module's layout puts first read back right.
    assert_eq!((g.md.ndims, g.md.dims[0], g.md.dims[1]), (2, 3, 5));
    assert_eq!(g.md.data_type, sys::DNNL_F32);
    assert_eq!(md_size(&g.md), 3 * 5 * 4);
    let info = info().unwrap();
    assert!(info.version.starts_with("2."), "{info}");
}

/// Every post-op, with and without bias, in both types, at row counts
/// that exercise the kernels' tails, against an f64 reference (bf16:
/// of the bf16-rounded operands).
#[test]
fn products_match_the_reference() {
    for dtype in [Dtype::F32, Dtype::Bf16] {
        for (rows, k, n) in [(1, 64, 48), (7, 33, 70), (37, 130, 200), (300, 96, 64)] {
            let x = rand(rows * k, 1);
            let w = rand(n * k, 2);
            let b = rand(n, 3);
            let (xr, wr) = match dtype {
                Dtype::F32 => (x.clone(), w.clone()),
                Dtype::Bf16 => (round_bf16(&x), round_bf16(&w)),
            };
            let zero = vec![0.0; n];
            for bias in [true, false] {
                let lin = Weights::new(&w, bias.then(|| b.clone()), n, k, dtype).unwrap();
                let bb = if bias { &b } else { &zero };
                for post in [Post::Store, Post::Accumulate, Post::Swish(1.702)] {
                    let y0 = rand(rows * n, 4);
                    let mut got = y0.clone();
                    lin.matmul(&x, rows, &mut got, post).unwrap();
                    let want = reference(&xr, &wr, bb, rows, k, post, &y0);
                    let d = max_diff(&got, &want);
                    assert!(
                        d < 1e-4,
                        "{dtype:?} {rows}x{k}x{n} bias {bias} {post:?}: {d}"
                    );
                }
            }
        }
    }
}

/// One weight serves any number of rows (the layout is per shape), and
/// short slices are errors, not reads out of bounds.
#[test]
fn any_row_count_and_short_slices() {
    let (k, n) = (256, 192);
    let w = rand(n * k, 5);
    let b = rand(n, 6);
    for dtype in [Dtype::F32, Dtype::Bf16] {
        let lin = Weights::new(&w, Some(b.clone()), n, k, dtype).unwrap();
        for rows in [
            1, 2, 3, 5, 16, 17, 31, 64, 65, 197, 255, 256, 257, 788, 1000,
        ] {
            let x = rand(rows * k, rows as u64);
            let mut got = vec![f32::NAN; rows * n];
            lin.matmul(&x, rows, &mut got, Post::Store).unwrap();
            let (xr, wr) = match dtype {
                Dtype::F32 => (x.clone(), w.clone()),
                Dtype::Bf16 => (round_bf16(&x), round_bf16(&w)),
            };
            let want = reference(&xr, &wr, &b, rows, k, Post::Store, &[]);
            assert!(max_diff(&got, &want) < 1e-4, "{dtype:?} rows {rows}");
        }
        let x = rand(4 * k, 7);
        assert!(lin
            .matmul(&x, 5, &mut vec![0.0; 5 * n], Post::Store)
            .is_err());
        assert!(lin
            .matmul(&x, 4, &mut vec![0.0; 4 * n - 1], Post::Store)
            .is_err());
        assert!(lin.implementation(197, Post::Store).unwrap().len() > 2);
    }
    assert!(Weights::new(&w[1..], None, n, k, Dtype::F32).is_err());
    assert!(Weights::new(&w, Some(vec![0.0; n - 1]), n, k, Dtype::F32).is_err());
}

/// Products from several threads at once (each with its own buffers)
/// all come out right: the lock serialises them.
#[test]
fn concurrent_products_from_several_threads() {
    let (k, n, rows) = (128, 96, 40);
    let w = rand(n * k, 8);
    let b = rand(n, 9);
    let lin = Weights::new(&w, Some(b.clone()), n, k, Dtype::F32).unwrap();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let lin = &lin;
            let (w, b) = (&w, &b);
            s.spawn(move || {
                for i in 0..10 {
                    let x = rand(rows * k, 100 * t + i);
                    let mut got = vec![0.0; rows * n];
                    lin.matmul(&x, rows, &mut got, Post::Store).unwrap();
                    let want = reference(&x, w, b, rows, k, Post::Store, &[]);
                    assert!(max_diff(&got, &want) < 1e-4);
                }
            });
        }
    });
}
