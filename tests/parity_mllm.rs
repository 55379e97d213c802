//! Parity of the BGE-VL-MLLM (LLaVA-NeXT + Mistral) path with the reference
//! outputs of transformers 4.45.2 (`tests/fixtures/reference/mllm-tiny-{a,b}.json`,
//! made by `scripts/make_mllm_fixtures.py`), for both tiny models: A (sharded
//! weights, rope_theta 1e6, no sliding window, `<pad>` padding) and B
//! (rope_theta 1e4, sliding window 40, `<unk>` padding, other pinpoints).
//!
//! Bounds: token ids identical (plain texts and whole prompts, `<image>`
//! expanded); image-token counts identical; pixel tiles max |diff| <= 0.02
//! and mean <= 0.002; embeddings within 1e-4 max abs (f32) from identical
//! ids + pixels and end to end from image bytes; batch invariance <= 1e-4.
//! On the device `VLEMBED_TEST_DEVICE` names (default cpu; tests/common
//! `test_device`), with its f32 bounds (`tol::mllm_f32`).

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use serde_json::Value;
use vlembed::embedder::{l2_normalize, Embedder};
use vlembed::input::{Content, Input, Modality, Role};
use vlembed::models::llava::preprocess::build_prompt;
use vlembed::models::llava::{LlavaImage, LlavaInput, LlavaPreprocessor};
use vlembed::models::ModelSource;
use vlembed::preprocess::{Pixels, Prepared, Size};

mod common;
use common::*;

const MODELS: [&str; 2] = ["mllm-tiny-a", "mllm-tiny-b"];

fn mllm_reference(model: &str) -> Value {
    reference_file(&format!("{model}.json"))
}

fn llava(e: &Embedder) -> &LlavaPreprocessor {
    e.loaded
        .preprocessor
        .downcast::<LlavaPreprocessor>()
        .expect("a LLaVA preprocessor")
}

/// The family data of a prepared input.
fn data(p: &Prepared) -> &LlavaInput {
    p.data::<LlavaInput>().expect("LLaVA data")
}

fn role(case: &Value) -> Role {
    case["role"].as_str().unwrap().parse().unwrap()
}

/// The case's image file, `None` (case skipped, said visibly; a failure
/// in CI) for the shared demo photos when `../shared/testdata` is absent.
fn image_bytes(case: &Value) -> Option<Option<Vec<u8>>> {
    let Some(rel) = case["file"].as_str() else {
        return Some(None);
    };
    Some(Some(std::fs::read(fixture_file(rel)?).unwrap()))
}

fn input_of(case: &Value) -> Option<Input> {
    let image = image_bytes(case)?;
    let text = case["text"].as_str().map(str::to_string);
    let content = Content::from_parts(text, image).expect("a case has text or an image");
    Some(
        Input::new(content)
            .with_role(role(case))
            .with_instruction(case["instruction"].as_str().map(str::to_string)),
    )
}

fn ref_pixels(model: &str) -> HashMap<String, Tensor> {
    let p = repo().join(format!(
        "tests/fixtures/reference/{model}-pixels.safetensors"
    ));
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

fn pixels_of(t: &Tensor) -> Pixels {
    let (tiles, c, h, w) = t.dims4().unwrap();
    assert_eq!(c, 3);
    Pixels {
        data: t.flatten_all().unwrap().to_vec1().unwrap(),
        tiles,
        height: h,
        width: w,
    }
}

fn size_of(case: &Value) -> Option<Size> {
    case["image_size"]
        .as_array()
        .map(|s| Size::new(s[0].as_u64().unwrap() as u32, s[1].as_u64().unwrap() as u32))
}

/// The reference's own ids and pixels, as LLaVA data.
fn reference_data(case: &Value, px: &HashMap<String, Tensor>) -> LlavaInput {
    let image = case["pixels"].as_str().map(|k| LlavaImage {
        tiles: pixels_of(&px[k]),
        size: size_of(case).expect("an image case has its size"),
    });
    LlavaInput {
        ids: ids(&case["ids"]),
        image,
    }
}

/// A prepared item made from the reference's own ids and pixels.
fn reference_prepared(case: &Value, px: &HashMap<String, Tensor>) -> Prepared {
    let data = reference_data(case, px);
    let modality = match (case["text"].is_string(), data.image.is_some()) {
        (true, true) => Modality::Composed,
        (false, true) => Modality::Image,
        _ => Modality::Text,
    };
    Prepared::new(modality, data.ids.len(), 1, data).erase()
}

#[test]
fn loads_as_llava_next_with_its_facts() {
    for model in MODELS {
        let e = load(model);
        let r = mllm_reference(model);
        let info = e.info();
        assert_eq!(info.architecture, "LlavaNextForConditionalGeneration");
        assert!(info.uses_instructions);
        assert_eq!(info.dimensions, r["dimensions"].as_u64().unwrap() as usize);
        assert!(info.max_text_tokens >= 4096, "{}", info.max_text_tokens);
    }
}

#[test]
fn token_ids_equal_the_reference() {
    for model in MODELS {
        let e = load(model);
        let pre = llava(&e);
        let r = mllm_reference(model);
        let cases = r["tokens"].as_array().unwrap();
        assert!(cases.len() >= 20);
        for case in cases {
            let text = case["text"].as_str().unwrap();
            assert_eq!(
                pre.tokenize(text).unwrap(),
                ids(&case["ids"]),
                "{model}: {text:?}"
            );
        }
    }
}

#[test]
fn prompts_ids_and_image_token_counts_equal_the_reference() {
    for model in MODELS {
        let e = load(model);
        let pre = llava(&e);
        let r = mllm_reference(model);
        for (i, case) in r["cases"].as_array().unwrap().iter().enumerate() {
            let has_image = !case["file"].is_null();
            let prompt = build_prompt(
                role(case),
                case["instruction"].as_str(),
                case["text"].as_str(),
                has_image,
            );
            assert_eq!(prompt, case["prompt"].as_str().unwrap(), "{model} case {i}");
            let text = case["text"].as_str().map(str::to_string);
            let content = Content::from_parts(text, has_image.then(Vec::new)).unwrap();
            let input = Input::new(content)
                .with_role(role(case))
                .with_instruction(case["instruction"].as_str().map(str::to_string));
            let got = pre.prompt_ids(&input, false).unwrap();
            assert_eq!(got, ids(&case["ids"]), "{model} case {i}: {prompt:?}");
            let want_n = case["image_tokens"].as_u64().unwrap() as usize;
            let got_n = got.iter().filter(|&&t| t == 32000).count();
            assert_eq!(got_n, want_n, "{model} case {i}");
            if has_image {
                assert_eq!(pre.image_tokens(), want_n);
            }
        }
    }
}

#[test]
fn pixel_tiles_match_the_reference() {
    for model in MODELS {
        let e = load(model);
        let r = mllm_reference(model);
        let px = ref_pixels(model);
        let (mut worst_max, mut worst_mean, mut n) = (0f32, 0f64, 0);
        for case in r["cases"].as_array().unwrap() {
            let Some(key) = case["pixels"].as_str() else {
                continue;
            };
            let Some(input) = input_of(case) else {
                continue;
            };
            let p = e.prepare(&input, false).unwrap();
            let image = data(&p).image.as_ref().unwrap();
            let got = &image.tiles;
            let want = pixels_of(&px[key]);
            assert_eq!(
                (got.tiles, got.height, got.width),
                (want.tiles, want.height, want.width),
                "{model} {key}"
            );
            assert_eq!(got.tiles as u64, case["tiles"].as_u64().unwrap());
            let m = max_abs_diff(&got.data, &want.data);
            let mean = got
                .data
                .iter()
                .zip(&want.data)
                .map(|(a, b)| f64::from((a - b).abs()))
                .sum::<f64>()
                / got.data.len() as f64;
            assert!(
                m <= 0.02 && mean <= 0.002,
                "{model} {key}: max {m}, mean {mean}"
            );
            assert_eq!(Some(image.size), size_of(case));
            worst_max = worst_max.max(m);
            worst_mean = worst_mean.max(mean);
            n += 1;
        }
        assert!(n >= 15, "{model}: only {n} image cases");
        eprintln!(
            "{model}: pixels over {n} images: max abs {worst_max:.3e}, worst mean {worst_mean:.3e}"
        );
    }
}

/// On every CPU backend (the vision tower's products run on it; the
/// decoder is candle's either way).
#[test]
fn embeddings_from_identical_inputs_match() {
    for (name, backend) in MODELS
        .iter()
        .flat_map(|m| backends().into_iter().map(move |b| (*m, b)))
    {
        let e = load_with(name, vlembed::models::Precision::F32, backend);
        let r = mllm_reference(name);
        let px = ref_pixels(name);
        let model = format!("{name} ({backend})");
        let mut worst = [0f32; 3]; // text, image, composed
        let mut worst_raw = [0f32; 3];
        for (i, case) in r["cases"].as_array().unwrap().iter().enumerate() {
            let p = reference_prepared(case, &px);
            let k = match p.modality {
                Modality::Text => 0,
                Modality::Image => 1,
                Modality::Composed => 2,
            };
            let raw = e.embed_prepared(&[&p], false).unwrap().remove(0);
            let want_raw = vector(&case["embedding_raw"]);
            let scale = want_raw.iter().fold(1f32, |m, x| m.max(x.abs()));
            let d_raw = max_abs_diff(&raw, &want_raw);
            let mut norm = raw.clone();
            l2_normalize(&mut norm);
            let d = max_abs_diff(&norm, &vector(&case["embedding"]));
            // Normalised: 1e-4 absolute; unnormalised (entries up to ~4):
            // 1e-4 relative to the largest entry.
            assert!(
                d <= tol::mllm_f32() && d_raw <= tol::mllm_f32() * scale,
                "{model} case {i}: raw {d_raw} (largest entry {scale}), normalised {d}"
            );
            worst[k] = worst[k].max(d);
            worst_raw[k] = worst_raw[k].max(d_raw);
        }
        eprintln!(
            "{model}: identical ids+pixels, normalised max abs: text {:.2e}, image {:.2e}, composed {:.2e}; unnormalised: {:.2e}, {:.2e}, {:.2e}",
            worst[0], worst[1], worst[2], worst_raw[0], worst_raw[1], worst_raw[2]
        );
    }
}

#[test]
fn end_to_end_from_bytes_matches() {
    for model in MODELS {
        let e = load(model);
        let r = mllm_reference(model);
        let mut worst = 0f32;
        let mut n = 0;
        for (i, case) in r["cases"].as_array().unwrap().iter().enumerate() {
            let Some(input) = input_of(case) else {
                continue;
            };
            let got = e.embed(&[input], true, false).unwrap().remove(0);
            let d = max_abs_diff(&got, &vector(&case["embedding"]));
            assert!(d <= tol::mllm_f32(), "{model} case {i}: {d}");
            worst = worst.max(d);
            n += 1;
        }
        eprintln!("{model}: end to end over {n} cases, max abs {worst:.2e}");
    }
}

#[test]
fn results_do_not_depend_on_batch_mates() {
    for model in MODELS {
        let e = load(model);
        let r = mllm_reference(model);
        let cases = r["cases"].as_array().unwrap();
        let batch = &r["batch"];
        let mut prepared = Vec::new();
        let mut want = Vec::new();
        for (k, idx) in batch["case_indices"].as_array().unwrap().iter().enumerate() {
            let case = &cases[idx.as_u64().unwrap() as usize];
            let Some(input) = input_of(case) else {
                continue;
            };
            prepared.push(e.prepare(&input, false).unwrap());
            want.push(vector(&batch["embeddings"][k]));
        }
        let lens: std::collections::BTreeSet<usize> =
            prepared.iter().map(|p| data(p).ids.len()).collect();
        assert!(
            lens.len() >= 4,
            "{model}: the batch should mix lengths: {lens:?}"
        );
        let refs: Vec<&Prepared> = prepared.iter().collect();
        let batched = e.embed_prepared(&refs, true).unwrap();
        let mut worst_alone = 0f32;
        let mut worst_ref = 0f32;
        for (i, p) in prepared.iter().enumerate() {
            let alone = e.embed_prepared(&[p], true).unwrap().remove(0);
            let d = max_abs_diff(&alone, &batched[i]);
            assert!(
                d <= tol::mllm_f32(),
                "{model} input {i}: alone vs batched {d}"
            );
            let d_ref = max_abs_diff(&batched[i], &want[i]);
            assert!(
                d_ref <= tol::mllm_f32(),
                "{model} input {i}: vs reference batch {d_ref}"
            );
            worst_alone = worst_alone.max(d);
            worst_ref = worst_ref.max(d_ref);
        }
        // Reversed order: same results.
        let rev: Vec<&Prepared> = prepared.iter().rev().collect();
        let reversed = e.embed_prepared(&rev, true).unwrap();
        for (i, row) in reversed.iter().rev().enumerate() {
            assert!(
                max_abs_diff(row, &batched[i]) <= tol::mllm_f32(),
                "{model} input {i}: reordered"
            );
        }
        eprintln!(
            "{model}: batch of {} ({} lengths): alone vs batched {worst_alone:.2e}, vs reference batch {worst_ref:.2e}",
            prepared.len(),
            lens.len()
        );
    }
}

#[test]
fn lm_head_is_never_loaded() {
    // Model B without `lm_head.weight`: it loads and gives the same embeddings.
    let src = repo().join("tests/fixtures/mllm-tiny-b");
    let dir = std::env::temp_dir().join(format!("vlembed-no-lm-head-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name == "model.safetensors" {
            continue;
        }
        std::fs::copy(entry.path(), dir.join(&name)).unwrap();
    }
    let mut tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(
        tensors.remove("language_model.lm_head.weight").is_some(),
        "fixture has no lm_head"
    );
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let e = load_dir(&dir);
    let r = mllm_reference("mllm-tiny-b");
    for case in r["cases"].as_array().unwrap().iter().take(5) {
        let input = input_of(case).unwrap();
        let got = e.embed(&[input], true, false).unwrap().remove(0);
        assert!(max_abs_diff(&got, &vector(&case["embedding"])) <= tol::mllm_f32());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn long_prompts_truncate_the_text_or_are_refused() {
    let e = load("mllm-tiny-b");
    let pre = llava(&e);
    let limit = e.info().max_text_tokens;
    let long = "word ".repeat(limit + 10);
    let input = Input::text(long)
        .with_role(Role::Query)
        .with_instruction(Some("Find it.".into()));
    let err = e.prepare(&input, false).unwrap_err().to_string();
    assert!(err.contains("tokens"), "{err}");
    let ids = pre.prompt_ids(&input, true).unwrap();
    assert!(ids.len() <= limit && ids.len() > limit - 8, "{}", ids.len());
    // The template's end survives truncation: "[/INST]" closes the prompt.
    let tail = pre.tokenize(" \n [/INST]").unwrap();
    assert_eq!(&ids[ids.len() - 3..], &tail[tail.len() - 3..]);
    let p = e.prepare(&input, true).unwrap();
    let v = e.embed_prepared(&[&p], true).unwrap();
    assert!(v[0].iter().all(|x| x.is_finite()));
}

#[test]
fn image_token_in_text_is_refused_only_with_an_image() {
    let e = load("mllm-tiny-a");
    let png = std::fs::read(repo().join("tests/fixtures/images/rgb_225x223.png")).unwrap();
    let input = Input::new(Content::Composed {
        text: "look: <image>".into(),
        image: png,
    });
    let err = e.prepare(&input, true).unwrap_err().to_string();
    assert!(err.contains("<image>"), "{err}");
    // Text only: one ordinary token, as upstream embeds it.
    let p = e.prepare(&Input::text("look: <image>"), true).unwrap();
    let ids = &data(&p).ids;
    assert_eq!(ids.iter().filter(|&&t| t == 32000).count(), 1);
    let v = e.embed_prepared(&[&p], true).unwrap();
    assert!(v[0].iter().all(|x| x.is_finite()));
}

#[test]
fn half_precision_runs_and_stays_close() {
    use vlembed::models::Precision;
    let r = mllm_reference("mllm-tiny-a");
    let dir = repo().join("tests/fixtures/mllm-tiny-a");
    let src = ModelSource::parse(dir.to_str().unwrap(), None);
    for dtype in [Precision::F16, Precision::Bf16] {
        let e = Embedder::load(&src, test_device(), &load_options(dtype)).unwrap();
        let cases: Vec<&Value> = r["cases"].as_array().unwrap().iter().take(7).collect();
        let inputs: Vec<Input> = cases.iter().map(|c| input_of(c).unwrap()).collect();
        let got = e.embed(&inputs, true, false).unwrap();
        let mut worst = 1f64;
        for (g, c) in got.iter().zip(&cases) {
            assert!(
                g.iter().all(|x| x.is_finite()),
                "{dtype}: non-finite values"
            );
            let w = vector(&c["embedding"]);
            let cos: f64 = g.iter().zip(&w).map(|(a, b)| f64::from(a * b)).sum();
            worst = worst.min(cos);
        }
        eprintln!("mllm-tiny-a {dtype}: worst cosine vs f32 reference {worst:.5}");
        let bound = if dtype == Precision::F16 {
            tol::MLLM_F16_COSINE
        } else {
            tol::MLLM_BF16_COSINE
        };
        assert!(worst > bound, "{dtype}: cosine {worst}");
    }
}

#[test]
fn image_token_count_must_match_the_features() {
    let e = load("mllm-tiny-a");
    let r = mllm_reference("mllm-tiny-a");
    let px = ref_pixels("mllm-tiny-a");
    let case = &r["cases"][2];
    assert!(case["pixels"].is_string());
    let mut d = reference_data(case, &px);
    let at = d.ids.iter().position(|&t| t == 32000).unwrap();
    d.ids.remove(at);
    let p = Prepared::new(Modality::Image, 0, 1, d).erase();
    let err = e.embed_prepared(&[&p], true).unwrap_err().to_string();
    assert!(
        err.contains("87 image tokens") && err.contains("88 features"),
        "{err}"
    );
    // Wrong tile count: a clear error too.
    let mut d = reference_data(case, &px);
    let tiles = &mut d.image.as_mut().unwrap().tiles;
    let per = tiles.data.len() / tiles.tiles;
    tiles.data.truncate(per * 3);
    tiles.tiles = 3;
    let p = Prepared::new(Modality::Image, 0, 1, d).erase();
    let err = e.embed_prepared(&[&p], true).unwrap_err().to_string();
    assert!(err.contains("tiles"), "{err}");
}

/// A batch of texts, images and composed inputs run stepped (the worker's
/// preemption hook called before every vision and decoder layer) gives the
/// vectors of an uninterrupted pass bit for bit, and a `Break` from the
/// hook stops the pass.
#[test]
fn stepped_passes_equal_uninterrupted_ones_and_can_be_stopped() {
    use std::ops::ControlFlow;
    use vlembed::models::ModelError;
    for model in MODELS {
        let e = load(model);
        let r = mllm_reference(model);
        let cases = r["cases"].as_array().unwrap();
        let prepared: Vec<Prepared> = cases
            .iter()
            .filter_map(input_of)
            .map(|input| e.prepare(&input, false).unwrap())
            .collect();
        let with_image = prepared.iter().filter(|p| p.modality.has_image()).count();
        assert!(
            with_image > 0 && with_image < prepared.len(),
            "{model}: mix texts and images"
        );
        let refs: Vec<&Prepared> = prepared.iter().collect();
        let replica = e.loaded.replica(&test_device().open().unwrap()).unwrap();
        let plain = replica.embed(&refs).unwrap();
        let mut calls = 0usize;
        let stepped = replica
            .embed_stepped(&refs, &mut || {
                calls += 1;
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(stepped, plain, "{model}: stepped vectors differ");
        // Every decoder layer (2 or 3) and vision layer run at least once.
        assert!(calls > 3, "{model}: the hook ran {calls} times");
        for stop_at in [1, calls / 2, calls] {
            let mut n = 0usize;
            let out = replica.embed_stepped(&refs, &mut || {
                n += 1;
                if n == stop_at {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            });
            assert!(
                matches!(out, Err(ModelError::Interrupted)),
                "{model}: a Break at call {stop_at} of {calls} did not stop the pass"
            );
        }
        eprintln!(
            "{model}: {} inputs ({with_image} with an image), hook called {calls} times",
            prepared.len()
        );
    }
}
