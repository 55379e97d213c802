//! Unit tests of `mistral.rs`: config defaults, rotary tables, masks (the
//! device-made ones against the host reference), blocked attention, batch
//! independence.

use super::*;
use candle_nn::VarMap;

use crate::models::decoder::SCORE_BUDGET;
use crate::models::mask::MASKED;

#[test]
fn config_defaults_follow_transformers() {
    let c: MistralConfig = serde_json::from_value(serde_json::json!({})).unwrap();
    assert_eq!(c.hidden_size, 4096);
    assert_eq!(c.kv_heads(), 8);
    assert_eq!(c.head_dim(), 128);
    assert_eq!(c.sliding_window, Some(4096));
    assert_eq!(c.rope_theta, 10000.0);
    assert_eq!(c.max_position_embeddings, 131072);
    c.validate().unwrap();
    let c: MistralConfig = serde_json::from_value(serde_json::json!({
        "sliding_window": null, "num_key_value_heads": null, "hidden_size": 64,
        "num_attention_heads": 4, "rope_theta": 1000000.0
    }))
    .unwrap();
    assert_eq!(c.sliding_window, None);
    assert_eq!(c.kv_heads(), 4);
    assert_eq!(c.head_dim(), 16);
    let bad: MistralConfig =
        serde_json::from_value(serde_json::json!({"num_key_value_heads": 5})).unwrap();
    assert!(bad.validate().unwrap_err().to_string().contains("multiple"));
}

#[test]
fn rope_tables_match_the_plain_formula() {
    let (theta, d, n) = (1.0e6, 16, 50);
    let (cos, sin) = rope_tables(theta, d, n);
    for p in 0..n {
        for i in 0..d / 2 {
            let a = p as f64 / theta.powf(2.0 * i as f64 / d as f64);
            let k = p * d / 2 + i;
            assert!((cos[k] as f64 - a.cos()).abs() < 2e-5, "cos p={p} i={i}");
            assert!((sin[k] as f64 - a.sin()).abs() < 2e-5, "sin p={p} i={i}");
        }
    }
}

#[test]
fn rope_rotates_halves_like_transformers() {
    // q' = q * cos + rotate_half(q) * sin, rotate_half(q) = [-q2, q1].
    let d = 8;
    let (cos, sin) = rope_tables(10000.0, d, 3);
    let dev = Device::Cpu;
    let q: Vec<f32> = (0..3 * d).map(|i| (i as f32 * 0.37).sin()).collect();
    let qt = Tensor::from_vec(q.clone(), (1, 1, 3, d), &dev).unwrap();
    let ct = Tensor::from_vec(cos.clone(), (3, d / 2), &dev).unwrap();
    let st = Tensor::from_vec(sin.clone(), (3, d / 2), &dev).unwrap();
    let out: Vec<f32> = candle_nn::rotary_emb::rope(&qt, &ct, &st)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for p in 0..3 {
        for i in 0..d {
            let h = d / 2;
            let (c, s) = (cos[p * h + i % h], sin[p * h + i % h]);
            let x = q[p * d + i];
            let rot = if i < h {
                -q[p * d + i + h]
            } else {
                q[p * d + i - h]
            };
            let want = x * c + rot * s;
            assert!((out[p * d + i] - want).abs() < 1e-6);
        }
    }
}

#[test]
fn masks_are_causal_windowed_and_skip_padding() {
    assert!(attends(3, 3, 5, None));
    assert!(!attends(3, 4, 5, None));
    assert!(!attends(4, 4, 4, None));
    assert!(attends(9, 0, 10, None));
    // Window 3: a token sees itself and the two before it.
    assert!(attends(5, 3, 10, Some(3)));
    assert!(!attends(5, 2, 10, Some(3)));
    for w in [None, Some(1), Some(3), Some(40)] {
        for len in 1..12 {
            for i in 0..15 {
                let (lo, hi) = attended_keys(i, len, w);
                for j in 0..15 {
                    assert_eq!(
                        (lo..hi).contains(&j),
                        attends(i, j, len, w),
                        "{i} {j} {len} {w:?}"
                    );
                }
            }
        }
    }
}

/// The mask as it was filled on the host before (every batch): the
/// device-made one must equal it bit for bit, padding rows included.
fn host_mask(lens: &[usize], t: usize, last_only: bool, w: Option<usize>) -> Vec<f32> {
    let tq = if last_only { 1 } else { t };
    let mut mask = vec![MASKED; lens.len() * tq * t];
    for (s, &len) in lens.iter().enumerate() {
        for qi in 0..tq {
            let i = if last_only { len.saturating_sub(1) } else { qi };
            let (lo, hi) = attended_keys(i, len, w);
            let row = (s * tq + qi) * t;
            mask[row + lo..row + hi].fill(0.0);
        }
    }
    mask
}

#[test]
fn device_masks_equal_the_host_masks_and_are_kept_by_shape() {
    for window in [None, Some(1), Some(3), Some(40)] {
        let m = tiny(window);
        for (lens, t) in [
            (vec![7, 4], 7),
            (vec![1], 1),
            (vec![9, 9, 2], 9),
            (vec![5], 12),
        ] {
            for last_only in [false, true] {
                let got: Vec<f32> = m
                    .mask(&lens, t, last_only)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let want = host_mask(&lens, t, last_only, window);
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "window {window:?} lens {lens:?} t {t} last {last_only}"
                );
            }
        }
        assert_eq!(m.masks.len(), 8);
        m.mask(&[7, 4], 7, true).unwrap();
        assert_eq!(m.masks.len(), 8, "a kept shape is not made again");
    }
}

#[test]
fn rotary_rows_come_from_one_table_grown_on_demand() {
    let m = tiny(None);
    let (rope, _) = m.setup(&[3, 2], 3, false).unwrap();
    let (cos, sin) = rope_tables(1000000.0, 4, 3);
    let got: Vec<f32> = rope.cos.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(got, cos);
    let last: Vec<f32> = rope.last_sin.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(last, [&sin[4..6], &sin[2..4]].concat());
    assert_eq!(m.rope_table(3).unwrap().len, 4);
    assert_eq!(m.rope_table(9).unwrap().len, 16);
    assert_eq!(m.rope_table(5).unwrap().len, 16, "kept, not shrunk");
}

fn tiny(window: Option<usize>) -> MistralModel {
    let cfg: MistralConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 50, "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "sliding_window": window, "rope_theta": 1000000.0
    }))
    .unwrap();
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let m = MistralModel::new(&cfg, vb).unwrap();
    // Random-ish weights everywhere (VarMap initialises norms to 1 etc.).
    for (i, var) in map.all_vars().iter().enumerate() {
        let t = var.as_tensor();
        let n = t.elem_count();
        let v: Vec<f32> = (0..n)
            .map(|k| (((k * 7919 + i * 104729) % 1000) as f32 / 1000.0 - 0.5) * 0.8)
            .collect();
        var.set(&Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    m
}

/// Attention over blocks of query rows (a small score budget) equals
/// attention over all rows at once.
#[test]
fn attention_in_blocks_matches_one_block() {
    let dev = Device::Cpu;
    let x: Vec<f32> = (0..2 * 9 * 16).map(|k| (k as f32 * 0.029).sin()).collect();
    let x = Tensor::from_vec(x, (2, 9, 16), &dev).unwrap();
    for window in [None, Some(3)] {
        let mut m = tiny(window);
        for lens in [[9, 6], [4, 9]] {
            let run = |m: &MistralModel| -> Vec<Vec<Vec<f32>>> {
                m.forward(&x, &lens).unwrap().to_vec3().unwrap()
            };
            let a = run(&m);
            for l in &mut m.layers {
                // 2 x 4 heads x 9 keys: blocks of 1 query row.
                l.set_score_budget(2 * 4 * 9);
            }
            let b = run(&m);
            for l in &mut m.layers {
                l.set_score_budget(SCORE_BUDGET);
            }
            for (s, &len) in lens.iter().enumerate() {
                for i in 0..len {
                    let d = a[s][i]
                        .iter()
                        .zip(&b[s][i])
                        .map(|(p, q)| (p - q).abs())
                        .fold(0f32, f32::max);
                    assert!(d < 1e-6, "window {window:?} seq {s} row {i}: {d}");
                }
            }
        }
    }
}

#[test]
fn results_do_not_depend_on_batch_mates_and_last_matches_full() {
    for window in [None, Some(3)] {
        let m = tiny(window);
        let dev = Device::Cpu;
        let emb = |n: usize, seed: usize| -> Vec<f32> {
            (0..n * 16)
                .map(|k| ((k * 31 + seed * 17) as f32 * 0.013).sin())
                .collect()
        };
        let (a, b) = (emb(7, 1), emb(4, 2));
        let single = |v: &[f32], n: usize| -> Vec<f32> {
            let x = Tensor::from_vec(v.to_vec(), (1, n, 16), &dev).unwrap();
            m.forward_last(&x, &[n])
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let sa = single(&a, 7);
        let sb = single(&b, 4);
        let mut padded = a.clone();
        padded.extend_from_slice(&b);
        padded.extend(std::iter::repeat_n(9.0f32, 3 * 16));
        let x = Tensor::from_vec(padded, (2, 7, 16), &dev).unwrap();
        let both: Vec<Vec<f32>> = m.forward_last(&x, &[7, 4]).unwrap().to_vec2().unwrap();
        let full: Vec<Vec<Vec<f32>>> = m.forward(&x, &[7, 4]).unwrap().to_vec3().unwrap();
        let diff = |p: &[f32], q: &[f32]| {
            p.iter()
                .zip(q)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        assert!(diff(&both[0], &sa) < 1e-5);
        assert!(diff(&both[1], &sb) < 1e-5);
        assert!(diff(&full[0][6], &sa) < 1e-5);
        assert!(diff(&full[1][3], &sb) < 1e-5);
    }
}
