//! Unit tests of the Qwen-VL preprocessor on the tiny fixtures: what the
//! prepared data writes into cache keys, costs and counts, which limit an
//! over-long prompt is reported against, and typed prompt failures.

use std::path::PathBuf;

use super::*;
use crate::input::{Content as InputContent, Modality};
use crate::models::qwen_vl::config::QwenVlConfig;
use crate::preprocess::KeySink;

fn dir(model: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(model)
}

fn load(model: &str, format: PromptFormat, max_tokens: usize) -> QwenPreprocessor {
    let cfg = SetupError::read_json(&dir(model).join("config.json")).unwrap();
    let cfg = QwenVlConfig::from_json(&cfg).unwrap();
    QwenPreprocessor::load(
        &QwenFiles::in_dir(&dir(model)),
        &cfg.facts(max_tokens),
        format,
        QwenOptions::default(),
        ImageLimits::default(),
    )
    .unwrap()
}

fn png(width: u32, height: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x % 251) as u8, (y % 251) as u8, 90])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

struct Bytes(Vec<u8>);

impl KeySink for Bytes {
    fn write(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }
}

fn key(p: &QwenPrepared) -> Vec<u8> {
    let mut sink = Bytes(Vec::new());
    p.write_key(&mut Key::new(&mut sink));
    sink.0
}

#[test]
fn keys_write_ids_positions_grid_and_patches() {
    let image = QwenImage {
        patches: vec![0.5; 8],
        grid: GridThw { t: 1, h: 2, w: 2 },
        first_token: 3,
        tokens: 1,
    };
    let base = QwenPrepared {
        token_ids: vec![1, 2, 3, 9, 4],
        image: Some(image.clone()),
        positions: PositionIds::Multimodal,
    };
    assert_eq!(key(&base), key(&base.clone()));
    let mut variants = Vec::new();
    let mut v = base.clone();
    v.positions = PositionIds::Sequential;
    variants.push(v);
    let mut v = base.clone();
    v.token_ids[0] = 7;
    variants.push(v);
    for change in [
        |im: &mut QwenImage| im.patches[1] = 0.25,
        |im: &mut QwenImage| im.grid = GridThw { t: 1, h: 1, w: 4 },
        |im: &mut QwenImage| im.first_token = 2,
    ] {
        let mut v = base.clone();
        change(v.image.as_mut().unwrap());
        variants.push(v);
    }
    let mut v = base.clone();
    v.image = None;
    variants.push(v);
    for (i, v) in variants.iter().enumerate() {
        assert_ne!(key(v), key(&base), "variant {i}");
    }
}

#[test]
fn composed_inputs_cost_their_tokens_and_patches() {
    let pre = load("qwen25-vl-tiny", PromptFormat::ChatTemplate, 8192);
    let input = Input::new(InputContent::Composed {
        text: "a cat".into(),
        image: png(64, 48),
    })
    .with_role(Role::Query)
    .with_instruction(Some("Find it.".into()));
    let p = pre.prepare(&input, false).unwrap();
    assert_eq!(p.modality, Modality::Composed);
    let d = &p.data;
    let im = d.image.as_ref().unwrap();
    // The probe image: 64x48 rounds to 56x56, 4x4 patches, 4 tokens.
    assert_eq!(im.grid, GridThw { t: 1, h: 4, w: 4 });
    assert_eq!(im.tokens, 4);
    assert_eq!(p.cost, d.token_ids.len() + 16);
    assert_eq!(p.text_tokens, d.token_ids.len() - 4);
    assert_eq!(d.positions, PositionIds::Multimodal);
    assert_eq!(pre.prompt_format(), Some("chat-template"));
    assert_eq!(
        pre.pixel_bounds(),
        Some(PixelBounds {
            min: 3136,
            max: 50176
        })
    );
    // GME: the probe image is scaled up into GME's 256-token minimum.
    let gme = load("qwen2-vl-tiny", PromptFormat::Gme, 8192);
    let p = gme.prepare(&Input::image(png(64, 48)), false).unwrap();
    let im = p.data.image.as_ref().unwrap();
    assert_eq!((im.grid.h, im.grid.w, im.tokens), (32, 32, 256));
    assert_eq!(p.data.positions, PositionIds::Sequential);
}

#[test]
fn a_prompt_over_the_limit_blames_the_image_only_when_the_text_is_not_the_cause() {
    // 640x480 is 54 image tokens with the fixtures' max_pixels.
    let image = png(640, 480);
    let pre = load("qwen25-vl-tiny", PromptFormat::ChatTemplate, 60);
    let alone = pre.prepare(&Input::image(image.clone()), true).unwrap_err();
    assert!(
        matches!(
            alone,
            PreprocessError::ImageTokens {
                image_tokens: 54,
                limit: 60,
                ..
            }
        ),
        "{alone}"
    );
    let composed = Input::new(InputContent::Composed {
        text: "word ".repeat(50),
        image: image.clone(),
    });
    let e = pre.prepare(&composed, true).unwrap_err();
    assert!(matches!(e, PreprocessError::ImageTokens { .. }), "{e}");
    // With room for the image, the text is what is too long (or cut).
    let pre = load("qwen25-vl-tiny", PromptFormat::ChatTemplate, 100);
    let e = pre.prepare(&composed, false).unwrap_err();
    assert!(
        matches!(e, PreprocessError::TextTooLong { limit: 100, .. }),
        "{e}"
    );
    let p = pre.prepare(&composed, true).unwrap();
    assert!(p.data.token_ids.len() <= 100);
}

#[test]
fn template_failures_are_typed_prompt_errors() {
    let mut pre = load("qwen25-vl-tiny", PromptFormat::ChatTemplate, 8192);
    pre.template = Some(ChatTemplate::new("{{ raise_exception('no') }}".into(), vec![]).unwrap());
    let e = pre.prepare(&Input::text("a cat"), false).unwrap_err();
    let PreprocessError::Prompt(source) = &e else {
        panic!("{e}")
    };
    assert!(
        matches!(
            source.downcast_ref::<PromptError>(),
            Some(PromptError::Template(_))
        ),
        "{e}"
    );
    // A template that places the image twice cannot be expanded.
    let twice = "{% for m in messages %}{% for c in m.content %}{% if c.type == 'image' %}<|image_pad|><|image_pad|>{% endif %}{% endfor %}{% endfor %}";
    pre.template = Some(ChatTemplate::new(twice.into(), vec![]).unwrap());
    let e = pre.prepare(&Input::image(png(56, 56)), false).unwrap_err();
    let PreprocessError::Prompt(source) = &e else {
        panic!("{e}")
    };
    assert!(
        matches!(
            source.downcast_ref::<PromptError>(),
            Some(PromptError::Placeholders { found: 2 })
        ),
        "{e}"
    );
}

#[test]
fn prompts_are_bounded_in_bytes() {
    let gme = load("qwen2-vl-tiny", PromptFormat::Gme, 8192);
    let huge = "x".repeat(MAX_RENDERED_BYTES + 1);
    let input = Input::text("a cat")
        .with_role(Role::Query)
        .with_instruction(Some(huge));
    let e = gme.prepare(&input, true).unwrap_err();
    assert!(
        matches!(e, PreprocessError::PromptTooLarge { limit } if limit == MAX_RENDERED_BYTES),
        "{e}"
    );
}
