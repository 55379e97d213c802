#!/usr/bin/env python3
"""Make vlembed's BGE-VL-MLLM test fixtures: two tiny random-weight
`LlavaNextForConditionalGeneration` models (CLIP vision tower + Mistral decoder) in
the llava-hf Hub layout, with the REAL Mistral-7B SentencePiece tokenizer, plus
reference embeddings computed the way upstream BGE-VL-MLLM computes them.

Writes (and only writes):
    tests/fixtures/mllm-tiny-a/                    model A, sharded safetensors + index
    tests/fixtures/mllm-tiny-b/                    model B, single model.safetensors
    tests/fixtures/reference/mllm-tiny-a.json      reference cases for A
    tests/fixtures/reference/mllm-tiny-a-pixels.safetensors
    tests/fixtures/reference/mllm-tiny-b.json
    tests/fixtures/reference/mllm-tiny-b-pixels.safetensors

How to run (from the repository root, after scripts/make_fixtures.py has made
tests/fixtures/images/; this script reuses that script's image generator to check
that the committed images are the ones it makes):

    /tmp/fixenv/bin/pip install -r scripts/requirements-fixtures.txt sentencepiece==0.2.3 protobuf==7.36.2
    /tmp/fixenv/bin/python scripts/make_mllm_fixtures.py

sentencepiece + protobuf are needed only to convert mistral_common's
`tokenizer.model.v1` into a fast tokenizer (transformers' LlamaConverter). The
script is deterministic (fixed seeds, one CPU thread): a rerun with the same
versions gives byte-identical files.

Reference semantics (upstream BGE-VL-MLLM with transformers 4.45.2), see
/work/shared/REFERENCE.md and tests/fixtures/README.md:
  prompt: query    "[INST] \\n <instruct> {instruction} <query> "  (no instruction:
                   "[INST] \\n <instruct>  <query>"),  candidate "[INST] ";
          then f"{s} {text} \\n" if text, f"{s} <image>" if image, f"{s} [/INST]"
  image:  PIL.Image.open(path).resize((512, 512)).convert("RGB")
  inputs: LlavaNextProcessor(images=..., text=prompts, padding=True, return_tensors="pt")
  output: model(**inputs, output_hidden_states=True).hidden_states[-1][:, -1, :], L2-normalised
"""

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import PIL
from PIL import Image

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import transformers
from transformers import (
    CLIPVisionConfig,
    LlamaTokenizerFast,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    MistralConfig,
)
from transformers.image_processing_utils import select_best_resolution
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

import mistral_common

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures as mf  # noqa: E402  (image generator, JSON writer, helpers)

REPO = mf.REPO
FIXTURES = mf.FIXTURES
IMAGES_REL = mf.IMAGES_REL
DEMO_REL = mf.DEMO_REL

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = 32000
VOCAB = 32064  # like llava-v1.6-mistral-7b-hf (ids >= 32002 unused)
RESIZE_TO = 512  # upstream resizes every image to exactly 512x512 first

INSTRUCTION = ("Retrieve the target image that best meets the combined criteria by using both "
               "the provided image and the image retrieval instructions: ")

# ------------------------------------------------------------------------------------
# the two models
# ------------------------------------------------------------------------------------

MODELS = {
    "mllm-tiny-a": dict(
        seed=5101,
        # mirrors llava-v1.6-mistral-7b (336px tiles, patch 14, pinpoints in multiples
        # of 336) scaled down to 32px tiles: a 512x512 image picks 64x64 = a 2x2 grid
        vision=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                    num_hidden_layers=3, num_attention_heads=4),
        pinpoints=[[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]],
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rope_theta=1000000.0, sliding_window=None,
                  max_position_embeddings=32768),
        pad=("<pad>", 32001),  # added special token, like llava-hf
        sharded=True,
    ),
    "mllm-tiny-b": dict(
        seed=5202,
        # different tile size / patch size / vision width; 512x512 picks 96x96 (2x2 grid
        # of 48px tiles) over 96x144 / 144x96 (same effective resolution, more waste)
        vision=dict(image_size=48, patch_size=12, hidden_size=48, intermediate_size=96,
                    num_hidden_layers=2, num_attention_heads=4),
        pinpoints=[[48, 192], [192, 48], [96, 144], [144, 96], [96, 96]],
        # sliding window 40 < most prompts (up to 150 tokens); 4 layers so that the last
        # token still reaches the whole prompt (receptive field 4 * 39 + 1 = 157 tokens)
        text=dict(hidden_size=32, intermediate_size=80, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, rope_theta=10000.0, sliding_window=40,
                  max_position_embeddings=4096),
        # same tokenizer.json as A (symlinked; it has <pad> 32001 as an added token), but
        # the pad token (tokenizer_config / special_tokens_map / config) is <unk> = 0
        pad=("<unk>", 0),
        sharded=False,
    ),
}


def mistral_vocab_file():
    p = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    assert os.path.isfile(p), p
    return p


def build_tokenizer(pad_token):
    """The real Mistral-7B SentencePiece model, converted by transformers' LlamaConverter
    in legacy mode (what llava-hf/llava-v1.6-mistral-7b-hf ships: normalizer
    Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer), plus <image> (32000) and,
    for model A, <pad> (32001). add_prefix_space=True must be passed explicitly: with
    None transformers 4.45 builds the normalizer WITHOUT the Prepend."""
    tok = LlamaTokenizerFast(
        vocab_file=mistral_vocab_file(),
        legacy=True,
        add_prefix_space=True,
        add_bos_token=True,
        add_eos_token=False,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    assert len(tok) == 32000, len(tok)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == IMAGE_TOKEN_ID
    tok.add_special_tokens({"pad_token": "<pad>"})
    assert tok.pad_token_id == 32001
    if pad_token != "<pad>":
        tok.pad_token = pad_token
    tok.padding_side = "left"
    # the real Mistral ids
    assert tok("[INST]").input_ids == [1, 733, 16289, 28793], tok("[INST]").input_ids
    assert tok("a photo of a cat").input_ids == [1, 264, 8428, 302, 264, 5255], tok("a photo of a cat").input_ids
    return tok


def build_image_processor(spec):
    s = spec["vision"]["image_size"]
    return LlavaNextImageProcessor(
        do_resize=True,
        size={"shortest_edge": s},
        image_grid_pinpoints=spec["pinpoints"],
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": s, "width": s},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_pad=True,
        do_convert_rgb=True,
    )


def build_config(spec, pad_id):
    v = dict(spec["vision"])
    vision = CLIPVisionConfig(hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3,
                              projection_dim=v["hidden_size"], **v)
    t = dict(spec["text"])
    text = MistralConfig(vocab_size=VOCAB, hidden_act="silu", rms_norm_eps=1e-5, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=None, attention_dropout=0.0, **t)
    grid = v["image_size"] // v["patch_size"]
    cfg = LlavaNextConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=IMAGE_TOKEN_ID,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_grid_pinpoints=spec["pinpoints"],
        tie_word_embeddings=False,
        # transformers 4.45 decides "legacy processing" (the model expands <image> itself)
        # when the number of <image> tokens in a row is < image_seq_length (default 576):
        # it must be <= the expanded count, or the processor-expanded ids get expanded again.
        image_seq_length=grid * grid,
        pad_token_id=pad_id,
    )
    cfg.architectures = ["LlavaNextForConditionalGeneration"]
    cfg.torch_dtype = torch.float32
    return cfg


def rerandomise(model, seed):
    """Overwrite every parameter with seeded values at healthy magnitudes."""
    g = torch.Generator().manual_seed(seed)

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=g, dtype=torch.float32) * std + mean

    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = tuple(p.shape)
            if "layer_norm" in name or "layrnorm" in name or "layernorm" in name or name.endswith("norm.weight"):
                # CLIP LayerNorms (weight+bias) and Mistral RMSNorms (weight only)
                if name.endswith(".weight"):
                    p.copy_(normal(shape, 0.2, 1.0))
                else:
                    p.copy_(normal(shape, 0.2))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(normal(shape, 1.0))
            elif name.endswith("position_embedding.weight") or name.endswith("class_embedding"):
                p.copy_(normal(shape, 0.5))
            elif name == "image_newline":
                p.copy_(normal(shape, 1.0))
            elif name.endswith("patch_embedding.weight"):
                fan_in = shape[1] * shape[2] * shape[3]
                p.copy_(normal(shape, 1.0 / math.sqrt(fan_in)))
            elif name.endswith(".bias"):
                p.copy_(normal(shape, 0.5 if ".q_proj." in name else 0.2))
            elif name.endswith(".weight") and len(shape) == 2:
                fan_in = shape[1]
                if ".q_proj." in name or ".k_proj." in name:
                    gain = 3.0
                elif ".v_proj." in name or ".out_proj." in name or ".o_proj." in name:
                    gain = 2.0
                elif ".mlp." in name:
                    gain = 1.5
                else:  # projector, lm_head
                    gain = 1.0
                p.copy_(normal(shape, gain / math.sqrt(fan_in)))
            else:
                raise RuntimeError(f"parameter not re-randomised: {name} {shape}")


# ------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------

def prompt_for(role, instruction, text, has_image):
    """Upstream BGE-VL-MLLM's prompt (REFERENCE.md, "BGE-VL-MLLM")."""
    if role == "query":
        if instruction is not None:
            s = f"[INST] \n <instruct> {instruction} <query> "
        else:
            s = "[INST] \n <instruct>  <query>"
    elif role == "candidate":
        s = "[INST] "
    else:
        raise ValueError(role)
    if text:
        s = f"{s} {text} \n"
    if has_image:
        s = f"{s} {IMAGE_TOKEN}"
    s = f"{s} [/INST]"
    return s


def load_image(rel):
    path = os.path.normpath(os.path.join(REPO, rel))
    with Image.open(path) as im:
        im = im.resize((RESIZE_TO, RESIZE_TO))  # PIL default resample: BICUBIC (NEAREST for P / 1)
        return im.convert("RGB")


def pixel_key(rel):
    return os.path.basename(rel) if rel.startswith(IMAGES_REL) else "demo/" + os.path.basename(rel)


def case_specs(demo):
    I = lambda n: f"{IMAGES_REL}/{n}"
    D = lambda n: f"{DEMO_REL}/{n}"
    dark = "Make the background dark, as if the camera has taken the photo at night"
    long_text = ("A wide street in an old European town at dusk, with wet cobblestones reflecting "
                 "the warm lights of the cafes, a red tram in the distance and people with umbrellas")
    q, c = "query", "candidate"
    cases = [
        # query with instruction
        (q, INSTRUCTION, "a photo of a cat", None),
        (q, INSTRUCTION, long_text, None),
        (q, INSTRUCTION, None, I("baseline_420_640x480.jpg")),
        (q, INSTRUCTION, None, I("palette_trns_tall_40x1000.png")),
        (q, INSTRUCTION, dark, I("rgba_alpha_256x192.png")),
        (q, INSTRUCTION, "change the color to red", I("gray_l_wide_1000x40.png")),
        (q, "Find a caption for the image.", "\u732b\u306e\u5199\u771f \U0001F431", I("tiny_5x3.bmp")),
        # query without instruction
        (q, None, "a photo of a cat", None),
        (q, None, "  whitespace\t\nruns   everywhere  ", None),
        (q, None, None, I("gray16_150x200.png")),
        (q, None, None, I("gray_alpha_la_17x31.png")),
        (q, None, dark, I("progressive_480x360.jpg")),
        (q, None, "it's a dog's life, isn't it?", I("rgb16_200x150.png")),
        # candidate
        (c, None, "a photo of a cat", None),
        (c, None, "A dog running on the beach at sunset.", None),
        (c, None, "caf\u00e9 na\u00efve r\u00e9sum\u00e9 [INST] fake marker [/INST]", None),
        (c, None, long_text, None),
        (c, None, None, I("baseline_420_640x480.jpg")),
        (c, None, None, I("gray_320x240.jpg")),
        (c, None, None, I("lossless_alpha_192x144.webp")),
        (c, None, None, I("animated_3frames_160x120.gif")),
        (c, None, None, I("yuv444_exif_rot6_301x199.jpg")),
        (c, None, "a photo of a cat", I("rgb_225x223.png")),
        (c, None, "same scene in winter, with snow on the ground", I("rgb_lzw_200x150.tiff")),
        (c, None, None, I("lossy_320x240.webp")),
    ]
    if demo:
        cases += [
            (q, INSTRUCTION, dark, D("cir_query.png")),
            (c, None, None, D("cir_candi_1.png")),
            (c, None, None, D("cir_candi_2.png")),
            (c, None, None, D("000000032077.jpg")),
        ]
    return [dict(role=r, instruction=i, text=t, file=f) for r, i, t, f in cases]


BATCH_CASES = [0, 2, 4, 7, 9, 11, 13, 15, 17, 22, 16, 5]  # texts, images, composed; q (+/- instr) and c


def token_strings():
    return [
        "a photo of a cat", "A PHOTO OF A CAT", "", " ", "  ", "\t", "\n", "\r\n", "a\nb", "a  b",
        "  leading spaces", "trailing spaces   ", "line1\r\nline2\n\nline3",
        "[INST]", "[/INST]", "[INST] hello [/INST]", "[INST] \n <instruct>  <query>",
        "[INST] \n <instruct> Retrieve the image. <query>  a dog \n [/INST]",
        "[INST]  <image> [/INST]", "<image>", "a<image>b", "<image><image>", "<s>", "</s>", "<unk>", "<pad>",
        "<s>[INST] hi [/INST]</s>", "<IMAGE>",
        "caf\u00e9", "cafe\u0301", "na\u00efve r\u00e9sum\u00e9", "stra\u00dfe",
        "\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440", "\u3053\u3093\u306b\u3061\u306f\u4e16\u754c",
        "\u732b\u306e\u5199\u771f", "\u0645\u0631\u062d\u0628\u0627", "\u0939\u093f\u0928\u094d\u0926\u0940",
        "\U0001F431", "\U0001F468\u200d\U0001F469\u200d\U0001F467\u200d\U0001F466", "\U0001F44D\U0001F3FD",
        "\U0001F1EB\U0001F1F7", "a\u00a0b", "a\u3000b", "a\u200bb", "\ufeffbom",
        "it's", "don't", "McDonald's", "1234567890", "3.14159", "x86_64", "https://example.com/path?q=1&r=2",
        "<b>bold</b>", "a\x00b", "\u2581already\u2581metaspace", "\u00bd", "\uff21\uff22\uff23",
    ]


# ------------------------------------------------------------------------------------
# build, save, reload
# ------------------------------------------------------------------------------------

def write_model(name, spec, out_dir, tok_cache):
    pad_token, pad_id = spec["pad"]
    cfg = build_config(spec, pad_id)
    torch.manual_seed(spec["seed"])
    model = LlavaNextForConditionalGeneration(cfg)
    rerandomise(model, spec["seed"])
    model.eval()
    if spec["sharded"]:
        model.save_pretrained(out_dir, safe_serialization=True, max_shard_size="5MB")
    else:
        model.save_pretrained(out_dir, safe_serialization=True, max_shard_size="100GB")

    tok = build_tokenizer(pad_token)
    ip = build_image_processor(spec)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok,
                              patch_size=spec["vision"]["patch_size"],
                              vision_feature_select_strategy="default")
    proc.save_pretrained(out_dir)
    # only the fast tokenizer's files (like legacy_format=False): tokenizer.json is the
    # tokenizer; the SentencePiece model and added_tokens.json would only duplicate it
    for n in ("tokenizer.model", "added_tokens.json"):
        os.remove(os.path.join(out_dir, n))
    # save_pretrained stores add_prefix_space=true, which makes from_pretrained re-convert
    # from the (absent) tokenizer.model; llava-hf's config has it null. tokenizer.json is
    # authoritative either way.
    tc_path = os.path.join(out_dir, "tokenizer_config.json")
    tc = json.load(open(tc_path))
    tc["add_prefix_space"] = None
    with open(tc_path, "w") as f:
        json.dump(tc, f, indent=2, ensure_ascii=False)
        f.write("\n")
    tj = os.path.join(out_dir, "tokenizer.json")
    if tok_cache.get("path") is None:
        tok.backend_tokenizer.save(tj, pretty=False)  # same document, no indentation
        tok_cache["path"] = tj
        tok_cache["sha"] = hashlib.sha256(open(tj, "rb").read()).hexdigest()
        tok_cache["dir"] = os.path.basename(out_dir)
    else:
        tmp = tj + ".tmp"
        tok.backend_tokenizer.save(tmp, pretty=False)
        if hashlib.sha256(open(tmp, "rb").read()).hexdigest() == tok_cache["sha"]:
            os.remove(tmp)
            os.remove(tj)
            os.symlink(os.path.join("..", tok_cache["dir"], "tokenizer.json"), tj)
        else:
            os.replace(tmp, tj)
    return model


def reload(out_dir, attn="eager"):
    model = LlavaNextForConditionalGeneration.from_pretrained(
        out_dir, torch_dtype=torch.float32, attn_implementation=attn).eval()
    proc = LlavaNextProcessor.from_pretrained(out_dir)
    assert isinstance(proc.tokenizer, LlamaTokenizerFast)
    assert proc.tokenizer.padding_side == "left"
    return model, proc


class Ref:
    def __init__(self, model, proc):
        self.model, self.proc = model, proc

    def inputs(self, specs):
        prompts = [s["prompt"] for s in specs]
        images = [load_image(s["file"]) for s in specs if s["file"]]
        return self.proc(images=images or None, text=prompts, padding=True, return_tensors="pt")

    def raw(self, enc, **kw):
        with torch.no_grad():
            out = self.model(**enc, output_hidden_states=True, **kw)
        if "pixel_values" in enc:
            # the model packed exactly as many image features as the processor made
            # <image> tokens (masked_scatter would silently ignore extra features)
            n_tok = int((enc["input_ids"] == IMAGE_TOKEN_ID).sum())
            assert out.image_hidden_states.shape[0] == n_tok, (out.image_hidden_states.shape, n_tok)
        return out.hidden_states[-1][:, -1, :]


def maxcos(vecs):
    m = F.normalize(torch.tensor(vecs), dim=-1)
    c = m @ m.T
    c.fill_diagonal_(-2)
    i = int(c.argmax())
    return float(c.max()), divmod(i, c.shape[0])


def sensitivity_check(model, ref, specs):
    """Every parameter that can matter must matter (see the CLIP script). Exempt: the
    vision tower's last encoder layer and post_layernorm (vision_feature_layer=-2 takes
    the output of the second-to-last layer), k_proj.bias (cancels in softmax), lm_head
    (logits are not used)."""
    enc = ref.inputs(specs)
    n_vis = model.config.vision_config.num_hidden_layers

    def outputs():
        return F.normalize(ref.raw(enc, num_logits_to_keep=1), dim=-1).flatten()

    base = outputs()
    g = torch.Generator().manual_seed(7)
    ablate, perturb, exempt = [], [], []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (f"encoder.layers.{n_vis - 1}." in name or "post_layernorm" in name
                    or name.endswith("k_proj.bias") or "lm_head" in name):
                exempt.append(name)
                continue
            saved = p.detach().clone()
            is_norm_w = name.endswith(".weight") and ("norm" in name or "layrnorm" in name)
            p.fill_(1.0 if is_norm_w else 0.0)
            ablate.append((float((outputs() - base).abs().max()), name))
            p.copy_(saved)
            p.add_(torch.randn(p.shape, generator=g) * 0.01 * float(saved.std()))
            perturb.append((float((outputs() - base).abs().max()), name))
            p.copy_(saved)
        # the exempt ones really are unused
        for name, p in model.named_parameters():
            if name in exempt and "k_proj.bias" not in name:
                saved = p.detach().clone()
                p.fill_(0.0)
                d = float((outputs() - base).abs().max())
                p.copy_(saved)
                assert d == 0.0, (name, d)
    ablate.sort()
    perturb.sort()
    print(f"  sensitivity over {len(ablate)} parameter tensors ({len(exempt)} exempt):")
    print("    neutralised, smallest: " + ", ".join(f"{d:.2e} {n}" for d, n in ablate[:3]))
    print("    1% perturbed, smallest: " + ", ".join(f"{d:.2e} {n}" for d, n in perturb[:3]))
    assert ablate[0][0] > 1e-2, ablate[0]
    assert perturb[0][0] > 1e-5, perturb[0]


def build_reference(name, spec, out_dir, demo):
    model, proc = reload(out_dir, "eager")
    ref = Ref(model, proc)
    tok = proc.tokenizer
    cfg = model.config
    specs = case_specs(demo)
    for s in specs:
        s["prompt"] = prompt_for(s["role"], s["instruction"], s["text"], s["file"] is not None)

    doc = {
        "model": name,
        "model_dir": f"tests/fixtures/{name}",
        "dimensions": int(cfg.text_config.hidden_size),
        "image_token_id": int(cfg.image_token_index),
        "pad_token_id": int(tok.pad_token_id),
        "bos_token_id": int(tok.bos_token_id),
        "padding_side": tok.padding_side,
        "resize_to": [RESIZE_TO, RESIZE_TO],
        "attn_implementation": "eager",
        "pixels_file": f"tests/fixtures/reference/{name}-pixels.safetensors",
        "generated_by": {
            "script": "scripts/make_mllm_fixtures.py",
            "torch": mf.TORCH_VERSION, "transformers": transformers.__version__,
            "pillow": PIL.__version__, "numpy": np.__version__,
        },
    }
    pixels = {}
    cases = []
    raws = []
    for s in specs:
        enc = ref.inputs([s])
        ids = enc["input_ids"][0].tolist()
        assert enc["attention_mask"][0].tolist() == [1] * len(ids)
        n_img = ids.count(IMAGE_TOKEN_ID)
        raw = ref.raw(enc)[0]
        raws.append(raw)
        e = {k: s[k] for k in ("role", "instruction", "text", "file", "prompt")}
        e["ids"] = ids
        e["image_tokens"] = n_img
        if s["file"]:
            key = pixel_key(s["file"])
            pv = enc["pixel_values"][0].to(torch.float32).contiguous().clone()
            if key in pixels:
                assert torch.equal(pixels[key], pv), key
            pixels[key] = pv
            h, w = enc["image_sizes"][0].tolist()
            assert (h, w) == (RESIZE_TO, RESIZE_TO)
            best = select_best_resolution((h, w), cfg.image_grid_pinpoints)
            e["pixels"] = key
            e["image_size"] = [w, h]
            e["best_resolution"] = [int(best[0]), int(best[1])]
            e["tiles"] = int(pv.shape[0])
        else:
            assert n_img == 0 and "pixel_values" not in enc
            e["pixels"] = None
            e["image_size"] = None
            e["best_resolution"] = None
            e["tiles"] = 0
        e["embedding"] = mf.f32list(F.normalize(raw, dim=-1))
        e["embedding_raw"] = mf.f32list(raw)
        cases.append(e)
    doc["cases"] = cases

    doc["tokens"] = [{"text": t, "ids": tok(t, add_special_tokens=True).input_ids} for t in token_strings()]

    # one mixed batch (left padded, all images in one pixel tensor)
    idx = [i for i in BATCH_CASES if i < len(specs)]
    benc = ref.inputs([specs[i] for i in idx])
    braw = ref.raw(benc)
    bemb = F.normalize(braw, dim=-1)
    diff = max(float((bemb[k] - F.normalize(raws[i], dim=-1)).abs().max()) for k, i in enumerate(idx))
    # left padding: each row's unpadded ids equal the single-case ids
    for k, i in enumerate(idx):
        m = benc["attention_mask"][k].bool()
        assert benc["input_ids"][k][m].tolist() == cases[i]["ids"]
        assert not m[: int((~m).sum())].any(), "padding is not on the left"
    doc["batch"] = {
        "case_indices": idx,
        "input_ids_shape": list(benc["input_ids"].shape),
        "embeddings": [mf.f32list(r) for r in bemb],
        "max_abs_diff_vs_single": diff,
    }

    # ---- checks and facts for the README / report
    facts = {}
    mc, pair = maxcos([c["embedding"] for c in cases])
    facts["max_cos"] = (mc, pair)
    print(f"  {len(cases)} cases; max off-diagonal cosine {mc:.4f} (cases {pair})")
    lens = [len(c["ids"]) for c in cases]
    facts["lens"] = (min(lens), max(lens))
    print(f"  prompt lengths {min(lens)}..{max(lens)}, image tokens "
          f"{sorted(set(c['image_tokens'] for c in cases))}, tiles {sorted(set(c['tiles'] for c in cases))}")
    print(f"  batch {doc['batch']['input_ids_shape']}: max abs diff vs single {diff:.3e}")
    # same input, different role/instruction -> different embedding
    sdpa_model, _ = reload(out_dir, "sdpa")
    sd = Ref(sdpa_model, proc)
    d_sdpa = max(float((F.normalize(sd.raw(ref.inputs([s]))[0], dim=-1)
                        - torch.tensor(c["embedding"])).abs().max()) for s, c in zip(specs[:6], cases[:6]))
    facts["sdpa_vs_eager"] = d_sdpa
    print(f"  sdpa vs eager (first 6 cases): max abs diff {d_sdpa:.3e}")
    sw = cfg.text_config.sliding_window
    if sw is not None:
        nowin = LlavaNextForConditionalGeneration.from_pretrained(
            out_dir, torch_dtype=torch.float32, attn_implementation="eager").eval()
        nowin.config.text_config.sliding_window = None
        nowin.language_model.config.sliding_window = None
        nw = Ref(nowin, proc)
        changed = []
        for s, c in zip(specs, cases):
            d = float((F.normalize(nw.raw(ref.inputs([s]))[0], dim=-1) - torch.tensor(c["embedding"])).abs().max())
            changed.append((len(c["ids"]), d))
        short = [d for n, d in changed if n <= sw]
        longer = [d for n, d in changed if n > sw]
        facts["sliding"] = (max(short) if short else None, min(longer) if longer else None)
        print(f"  sliding_window {sw}: vs no window, max diff for prompts <= {sw} tokens "
              f"{facts['sliding'][0]}, min diff for longer prompts {facts['sliding'][1]}")
        assert (not short or max(short) < 1e-6) and longer and min(longer) > 1e-3
        reach = cfg.text_config.num_hidden_layers * (sw - 1) + 1
        assert max(lens) <= reach, (max(lens), reach)  # the last token still sees the whole prompt
    sensitivity_check(model, ref, [specs[i] for i in (4, 6, 11, 15)])
    return doc, pixels, facts


def check_images():
    """The committed images must be exactly what make_fixtures.py generates."""
    img_dir = os.path.join(FIXTURES, "images")
    if not os.path.isdir(img_dir):
        sys.exit("tests/fixtures/images/ is missing: run scripts/make_fixtures.py first")
    with tempfile.TemporaryDirectory() as tmp:
        made = mf.make_images(tmp)
        for n, _ in made:
            a = open(os.path.join(tmp, n), "rb").read()
            b = open(os.path.join(img_dir, n), "rb").read()
            assert a == b, f"tests/fixtures/images/{n} differs from what make_fixtures.make_images writes"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    check_images()
    demo = bool(mf.demo_files())
    ref_dir = os.path.join(FIXTURES, "reference")
    os.makedirs(ref_dir, exist_ok=True)
    tok_cache = {}
    total = 0
    for name, spec in MODELS.items():
        out_dir = os.path.join(FIXTURES, name)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.makedirs(out_dir)
        print(f"[{name}]")
        write_model(name, spec, out_dir, tok_cache)
        doc, pixels, facts = build_reference(name, spec, out_dir, demo)
        mf.dump_json(doc, os.path.join(ref_dir, f"{name}.json"))
        save_file(pixels, os.path.join(ref_dir, f"{name}-pixels.safetensors"), metadata={"format": "pt"})
        sz = (mf.du_bytes(out_dir) + mf.du_bytes(os.path.join(ref_dir, f"{name}.json"))
              + mf.du_bytes(os.path.join(ref_dir, f"{name}-pixels.safetensors")))
        total += sz
        print(f"  files: {sorted(os.listdir(out_dir))}; {sz / 1e6:.2f} MB")
    print(f"MLLM fixtures: {total / 1e6:.2f} MB; done in {time.time() - t0:.1f} s")
    assert total < 25e6, total


if __name__ == "__main__":
    main()
