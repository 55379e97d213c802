#!/usr/bin/env python3
"""Make vlembed's test fixtures: tiny random-weight BGE-VL-CLIP models in the Hub
layout, synthetic test images, and reference outputs computed with transformers.

The Rust test suite does not run Python: everything it needs is committed under
tests/fixtures/. Rerun this script only to regenerate those files; it is
deterministic (fixed seeds, one CPU thread), so a rerun with the pinned versions
gives byte-identical files.

How to run (from the repository root):

    python3.11 -m venv /tmp/fixenv
    /tmp/fixenv/bin/pip install -r scripts/requirements-fixtures.txt
    /tmp/fixenv/bin/python scripts/make_fixtures.py

That (re)writes tests/fixtures/{clip-tiny,clip-tiny-eos,images,reference}/ and
checks the results (tokenizer ids, non-degenerate embeddings, sensitivity of the
outputs to every parameter, batch invariance, total size under 20 MB).
No network access is needed: the real CLIP BPE comes from open_clip_torch's
bundled `bpe_simple_vocab_16e6.txt.gz`.

Full-size mode (for benchmarks and manual parity checks; never writes into the
repository):

    /tmp/fixenv/bin/python scripts/make_fixtures.py --full base  --out /tmp/bge-vl-base-random
    /tmp/fixenv/bin/python scripts/make_fixtures.py --full large --out /tmp/bge-vl-large-random

writes a random-weight model with the exact BGE-VL-base (openai/clip-vit-base-patch16)
or BGE-VL-large (openai/clip-vit-large-patch14) architecture, standard (seeded)
transformers initialisation, the real tokenizer and preprocessor config, plus
DIR/reference.json and DIR/reference-pixels.safetensors in the same format as
tests/fixtures/reference/clip-tiny.json.

Reference semantics (what upstream BGE-VL's CLIP `encode()` does with
transformers 4.45.2): texts go through the processor with padding=True,
truncation=True, max_length=77; images are opened with `PIL.Image.open(path)`
and passed to the image processor (which converts to RGB), always with
input_data_format="channels_last" (transformers otherwise guesses the channel
axis and mis-reads images 1 or 3 pixels tall); text = get_text_features,
image = get_image_features (both unnormalised, "embedding_raw");
text-only and image-only results are L2-normalised ("embedding");
composed = normalize(text_raw + image_raw).
"""

import argparse
import gzip
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np
import PIL
from PIL import Image, ImageDraw, ImageFilter

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import transformers
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizerFast,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

import open_clip
from open_clip.tokenizer import bytes_to_unicode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
IMAGES_REL = "tests/fixtures/images"
DEMO_REL = "../shared/testdata/bge-vl-demo"
MAX_LENGTH = 77
SIZE_BUDGET = 20 * 1000 * 1000  # bytes (du, 4 KiB blocks) for the CLIP fixtures

SEED_TINY = 1234
SEED_IMAGES = 20240601
SEED_FULL = {"base": 150, "large": 428}

SOT, EOT = 49406, 49407
TORCH_VERSION = torch.__version__.split("+")[0]  # same for the CPU and CUDA wheels


# --------------------------------------------------------------------------------------
# tokenizer and image processor (the real ones)
# --------------------------------------------------------------------------------------

def build_tokenizer(tmp):
    """The real CLIP BPE, built from open_clip's bpe_simple_vocab_16e6.txt.gz exactly
    like CLIP's simple tokenizer builds its vocabulary and merges."""
    bpe = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408 and len(set(vocab)) == 49408
    vocab_file = os.path.join(tmp, "vocab.json")
    merges_file = os.path.join(tmp, "merges.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(merges_file, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizerFast(
        vocab_file,
        merges_file,
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=MAX_LENGTH,
    )
    ids = tok("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407], ids
    assert tok.pad_token_id == EOT and tok.model_max_length == MAX_LENGTH
    return tok


def build_image_processor():
    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": 224},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    )


def save_tokenizer_and_processor(tok, ip, out):
    # legacy_format=False: only the fast tokenizer's files (tokenizer.json,
    # tokenizer_config.json, special_tokens_map.json), no duplicate vocab.json/merges.txt.
    tok.save_pretrained(out, legacy_format=False)
    # save_pretrained pretty-prints tokenizer.json (3.6 MB); the same document written
    # by the tokenizers library without indentation is 1.7 MB, which keeps the
    # committed fixtures under their size budget. Content is identical.
    tok.backend_tokenizer.save(os.path.join(out, "tokenizer.json"), pretty=False)
    ip.save_pretrained(out)
    # the saved files must load back and tokenize identically
    tok2 = CLIPTokenizerFast.from_pretrained(out)
    for s in ["a photo of a cat", "Caf\u00e9 \U0001F431 <b>x</b> it's", ""]:
        assert tok2(s).input_ids == tok(s).input_ids
    ip2 = CLIPImageProcessor.from_pretrained(out)
    assert ip2.to_dict() == ip.to_dict()


# --------------------------------------------------------------------------------------
# model configs
# --------------------------------------------------------------------------------------

def clip_config(arch, legacy_eos=True):
    if arch == "tiny":
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      patch_size=32)
        proj = 16
    elif arch == "base":  # openai/clip-vit-base-patch16 == BAAI/BGE-VL-base
        text = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8)
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      patch_size=16)
        proj = 512
    elif arch == "large":  # openai/clip-vit-large-patch14 == BAAI/BGE-VL-large
        text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      patch_size=14)
        proj = 768
    else:
        raise ValueError(arch)
    text.update(vocab_size=49408, max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu",
                layer_norm_eps=1e-5, projection_dim=proj, initializer_range=0.02, initializer_factor=1.0)
    if legacy_eos:
        # exactly like the openai / BGE-VL configs: pooling uses argmax(input_ids)
        text.update(bos_token_id=0, eos_token_id=2, pad_token_id=1)
    else:
        # post-#24773 configs: pooling at the first position of eos_token_id
        text.update(bos_token_id=SOT, eos_token_id=EOT, pad_token_id=1)
    vision.update(image_size=224, num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                  projection_dim=proj, initializer_range=0.02, initializer_factor=1.0)
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj,
                     logit_scale_init_value=2.6592)
    cfg.architectures = ["CLIPModel"]
    cfg.torch_dtype = torch.float32
    return cfg


def rerandomise_tiny(model, seed):
    """Overwrite EVERY parameter (except logit_scale, unused for embeddings) with
    seeded values sized so that activations stay O(1), attention is far from uniform
    and every weight, bias and LayerNorm affine visibly moves the outputs."""
    g = torch.Generator().manual_seed(seed)

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=g, dtype=torch.float32) * std + mean

    with torch.no_grad():
        for name, p in model.named_parameters():  # registration order: deterministic
            shape = tuple(p.shape)
            if name == "logit_scale":
                continue
            if "layer_norm" in name or "layrnorm" in name or "post_layernorm" in name:
                if name.endswith(".weight"):
                    p.copy_(normal(shape, 0.2, 1.0))
                else:
                    p.copy_(normal(shape, 0.2))
            elif name.endswith("token_embedding.weight") or name.endswith("position_embedding.weight"):
                p.copy_(normal(shape, 0.5))
            elif name.endswith("class_embedding"):
                p.copy_(normal(shape, 0.5))
            elif name.endswith("patch_embedding.weight"):
                fan_in = shape[1] * shape[2] * shape[3]
                p.copy_(normal(shape, 1.0 / math.sqrt(fan_in)))
            elif name.endswith(".bias"):
                # a query bias shifts logits by b_q.k: give it weight; k_proj.bias cancels in softmax
                p.copy_(normal(shape, 0.5 if ".q_proj." in name else 0.2))
            elif name.endswith(".weight") and len(shape) == 2:
                fan_in = shape[1]
                # gains picked so that attention is far from uniform and different images
                # and texts give clearly different embeddings (the script checks that)
                if ".q_proj." in name or ".k_proj." in name:
                    gain = 3.0
                elif ".v_proj." in name or ".out_proj." in name:
                    gain = 2.0
                elif ".mlp.fc" in name:
                    gain = 1.5
                else:  # text_projection, visual_projection
                    gain = 1.0
                p.copy_(normal(shape, gain / math.sqrt(fan_in)))
            else:
                raise RuntimeError(f"parameter not re-randomised: {name} {shape}")


# --------------------------------------------------------------------------------------
# synthetic images
# --------------------------------------------------------------------------------------

def scene(w, h, seed, noise=3.0):
    """Photo-like RGB float image: smooth gradients and blobs, a few sharp-edged
    shapes and lines, mild gaussian noise. Deterministic for a given seed."""
    rs = np.random.RandomState(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    u = (x + 0.5) / w
    v = (y + 0.5) / h
    c0, c1 = rs.uniform(20, 235, 3), rs.uniform(20, 235, 3)
    img = c0 * (1 - v)[..., None] + c1 * v[..., None]
    for _ in range(4):
        fx, fy = rs.uniform(0.5, 3.0, 2)
        ph = rs.uniform(0, 2 * np.pi)
        amp = rs.uniform(-30, 30, 3)
        img += amp * np.sin(2 * np.pi * (fx * u + fy * v) + ph)[..., None]
    for _ in range(3):
        cx, cy = rs.uniform(0, 1, 2)
        s = rs.uniform(0.08, 0.3)
        amp = rs.uniform(-70, 70, 3)
        img += amp * np.exp(-((u - cx) ** 2 + (v - cy) ** 2) / (2 * s * s))[..., None]
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(im)
    for _ in range(4):
        x0, x1 = sorted(rs.uniform(-0.1, 1.1, 2) * w)
        y0, y1 = sorted(rs.uniform(-0.1, 1.1, 2) * h)
        col = tuple(int(c) for c in rs.randint(0, 256, 3))
        if rs.rand() < 0.5:
            d.rectangle([x0, y0, x1, y1], fill=col)
        else:
            d.ellipse([x0, y0, x1, y1], fill=col)
    for _ in range(3):
        pts = [(float(a * w), float(b * h)) for a, b in rs.uniform(0, 1, (2, 2))]
        d.line(pts, fill=tuple(int(c) for c in rs.randint(0, 256, 3)), width=max(1, min(w, h) // 60))
    # soften a bit (photos are not perfectly sharp), then add noise
    im = im.filter(ImageFilter.GaussianBlur(0.6))
    arr = np.asarray(im).astype(np.float64) + rs.normal(0, noise, (h, w, 3))
    return np.clip(np.round(arr), 0, 255).astype(np.uint8)


def alpha_map(w, h, seed):
    """Varying alpha: gradient + rings, with fully transparent and fully opaque areas."""
    rs = np.random.RandomState(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    u = (x + 0.5) / w
    v = (y + 0.5) / h
    a = 1.4 * u - 0.2 + 0.25 * np.sin(2 * np.pi * (3 * v + rs.uniform()))
    r = np.hypot(u - 0.6, v - 0.4)
    a = np.where((r > 0.15) & (r < 0.22), 1.0 - a, a)
    return np.clip(np.round(a * 255), 0, 255).astype(np.uint8)


def png16(arr):
    """Encode a uint16 array (H,W) or (H,W,3) as a 16-bit PNG (PIL cannot write 16-bit RGB)."""
    h, w = arr.shape[:2]
    ctype = 0 if arr.ndim == 2 else 2
    rows = np.frombuffer(arr.astype(">u2").tobytes(), dtype=np.uint8).reshape(h, -1)
    # PNG filter type 2 ("Up") on every row except the first (type 0): compresses well
    up = rows.copy()
    up[1:] = rows[1:] - rows[:-1]  # uint8 arithmetic wraps mod 256, as the filter needs
    raw = b"".join((b"\x00" if yy == 0 else b"\x02") + up[yy].tobytes() for yy in range(h))

    def chunk(t, data):
        return struct.pack(">I", len(data)) + t + data + struct.pack(">I", zlib.crc32(t + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, ctype, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b""))


def bmp24(arr):
    """Plain 24-bit BI_RGB bottom-up BMP (what PIL writes too, spelled out here)."""
    h, w = arr.shape[:2]
    stride = (w * 3 + 3) & ~3
    rows = []
    for yy in range(h - 1, -1, -1):
        row = arr[yy, :, ::-1].tobytes()
        rows.append(row + b"\x00" * (stride - len(row)))
    pix = b"".join(rows)
    header = struct.pack("<2sIHHI", b"BM", 14 + 40 + len(pix), 0, 0, 14 + 40)
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, len(pix), 2835, 2835, 0, 0)
    return header + info + pix


def make_images(out_dir):
    """Writes the synthetic test images; returns [(file name, description)]."""
    os.makedirs(out_dir, exist_ok=True)
    made = []

    def path(name):
        return os.path.join(out_dir, name)

    s = SEED_IMAGES

    # 1. baseline JPEG, 4:2:0
    Image.fromarray(scene(640, 480, s + 1)).save(
        path("baseline_420_640x480.jpg"), "JPEG", quality=85, subsampling=2, progressive=False, optimize=False)
    made.append(("baseline_420_640x480.jpg", "baseline JPEG, YCbCr 4:2:0, 640x480"))

    # 2. progressive JPEG
    Image.fromarray(scene(480, 360, s + 2)).save(
        path("progressive_480x360.jpg"), "JPEG", quality=85, subsampling=2, progressive=True, optimize=True)
    made.append(("progressive_480x360.jpg", "progressive JPEG, 4:2:0, 480x360"))

    # 3. grayscale JPEG
    g = Image.fromarray(scene(320, 240, s + 3)).convert("L")
    g.save(path("gray_320x240.jpg"), "JPEG", quality=90)
    made.append(("gray_320x240.jpg", "grayscale (1-component) JPEG, 320x240"))

    # 4. JPEG 4:4:4, odd size, EXIF orientation 6 (must NOT be applied)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(scene(301, 199, s + 4)).save(
        path("yuv444_exif_rot6_301x199.jpg"), "JPEG", quality=92, subsampling=0, exif=exif.tobytes())
    made.append(("yuv444_exif_rot6_301x199.jpg",
                 "JPEG 4:4:4, odd size 301x199, EXIF Orientation=6 (the reference ignores it)"))

    # 5. PNG RGB, odd size
    Image.fromarray(scene(225, 223, s + 5, noise=2.0)).save(path("rgb_225x223.png"), "PNG", compress_level=9)
    made.append(("rgb_225x223.png", "PNG RGB 8-bit, odd size 225x223"))

    # 6. PNG RGBA with varying alpha (RGB under alpha=0 is not black: dropping != compositing)
    rgb = scene(256, 192, s + 6, noise=1.5)
    a = alpha_map(256, 192, s + 6)
    Image.fromarray(np.dstack([rgb, a]), "RGBA").save(path("rgba_alpha_256x192.png"), "PNG", compress_level=9)
    made.append(("rgba_alpha_256x192.png", "PNG RGBA, alpha 0..255 incl. fully transparent areas"))

    # 7. PNG grayscale L, extreme wide
    g = Image.fromarray(scene(1000, 40, s + 7, noise=1.0)).convert("L")
    g.save(path("gray_l_wide_1000x40.png"), "PNG", compress_level=9)
    made.append(("gray_l_wide_1000x40.png", "PNG grayscale (L), extreme aspect 1000x40 (resized to 5600x224)"))

    # 8. PNG LA, small (must be upscaled)
    rgb = scene(17, 31, s + 8, noise=0.0)
    l = np.asarray(Image.fromarray(rgb).convert("L"))
    a = alpha_map(17, 31, s + 8)
    Image.fromarray(np.dstack([l, a]), "LA").save(path("gray_alpha_la_17x31.png"), "PNG", compress_level=9)
    made.append(("gray_alpha_la_17x31.png", "PNG grayscale+alpha (LA), 17x31: upscaled to 224x408"))

    # 9. PNG palette with tRNS transparency, extreme tall
    rgb = Image.fromarray(scene(40, 1000, s + 9, noise=1.0))
    p = rgb.quantize(colors=48, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    trns = bytes([0, 40, 90, 140, 200, 255, 0, 128] + [255] * 40)  # several partially/fully transparent entries
    p.save(path("palette_trns_tall_40x1000.png"), "PNG", transparency=trns, compress_level=9)
    made.append(("palette_trns_tall_40x1000.png",
                 "PNG palette (P) with tRNS alpha entries, extreme aspect 40x1000 (224x5600)"))

    # 10. 16-bit RGB PNG (low bytes non-trivial)
    # high byte = the 8-bit image, low byte = a smooth non-zero pattern, so that
    # "keep the high byte" and "round v/257" give different 8-bit values
    base = scene(200, 150, s + 10, noise=0.0).astype(np.uint32)
    yy, xx = np.mgrid[0:150, 0:200]
    low = ((xx * 3 + yy * 5) % 256).astype(np.uint32)
    v16 = (base * 256 + low[..., None]).astype(np.uint16)
    with open(path("rgb16_200x150.png"), "wb") as f:
        f.write(png16(v16))
    made.append(("rgb16_200x150.png", "PNG RGB 16 bits per sample (PIL keeps the high byte)"))

    # 11. 16-bit grayscale PNG: top half a normal 16-bit image (v*257), bottom half
    # only uses values 0..255. PIL opens it as I;16 and convert('RGB') CLIPS to 255.
    base = np.asarray(Image.fromarray(scene(150, 200, s + 11, noise=0.0)).convert("L")).astype(np.uint32)
    yy, xx = np.mgrid[0:200, 0:150]
    v16 = base * 256 + ((xx * 5 + yy * 3) % 256).astype(np.uint32)
    v16[100:] = base[100:]
    v16 = v16.astype(np.uint16)
    with open(path("gray16_150x200.png"), "wb") as f:
        f.write(png16(v16))
    made.append(("gray16_150x200.png",
                 "PNG grayscale 16-bit; top half full-range (saturates to 255 in PIL), bottom half values 0..255"))

    # 12. WebP lossy
    Image.fromarray(scene(320, 240, s + 12)).save(path("lossy_320x240.webp"), "WEBP", quality=80, method=4)
    made.append(("lossy_320x240.webp", "WebP lossy (VP8), 320x240"))

    # 13. WebP lossless with alpha
    rgb = scene(192, 144, s + 13, noise=1.0)
    a = alpha_map(192, 144, s + 13)
    Image.fromarray(np.dstack([rgb, a]), "RGBA").save(
        path("lossless_alpha_192x144.webp"), "WEBP", lossless=True, exact=True, quality=100, method=4)
    made.append(("lossless_alpha_192x144.webp", "WebP lossless (VP8L) RGBA, exact RGB under transparent pixels"))

    # 14. animated GIF, 3 different frames; only the first counts
    frames = []
    for k in range(3):
        fr = Image.fromarray(scene(160, 120, s + 14 + 100 * k, noise=0.0))
        frames.append(fr.quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE))
    frames[0].save(path("animated_3frames_160x120.gif"), "GIF", save_all=True, append_images=frames[1:],
                   duration=200, loop=0, optimize=False, disposal=1)
    made.append(("animated_3frames_160x120.gif", "animated GIF, 3 different frames (first frame is the image)"))

    # 15. BMP 5x3 (5 wide, 3 tall: transformers' channel guess would misread it)
    rs = np.random.RandomState(s + 15)
    tiny = rs.randint(0, 256, (3, 5, 3)).astype(np.uint8)
    with open(path("tiny_5x3.bmp"), "wb") as f:
        f.write(bmp24(tiny))
    made.append(("tiny_5x3.bmp", "BMP 24-bit, 5x3 pixels (upscaled to 373x224)"))

    # 16. TIFF, LZW
    Image.fromarray(scene(200, 150, s + 16, noise=0.5)).save(path("rgb_lzw_200x150.tiff"), "TIFF",
                                                             compression="tiff_lzw")
    made.append(("rgb_lzw_200x150.tiff", "TIFF RGB 8-bit, LZW compression"))

    for name, _ in made:
        sz = os.path.getsize(path(name))
        assert sz < 100_000, (name, sz)
    return made


# --------------------------------------------------------------------------------------
# test strings
# --------------------------------------------------------------------------------------

def token_strings():
    caption = "a photo of a cat sitting on a wooden table next to a window"
    long_en = ("Make the background dark, as if the camera has taken the photo at night. " * 6).strip()
    strings = [
        # basics and case
        "a photo of a cat", "A PHOTO OF A CAT", "A Photo Of A Cat", "a photo of a dog",
        "a red car parked on the street", "two people riding bikes in the park",
        "Make the background dark, as if the camera has taken the photo at night",
        "iPhone 15 Pro Max", "camelCaseWord", "snake_case_word", "kebab-case-word", "ALLCAPS",
        "McDonald's", "x86_64", "GPT-4o", "MiXeD cAsE tExT",
        # empty and whitespace
        "", " ", "   ", "\t", "\n", "\r\n", "a\tb", "a\nb", "a  b", "a     b", "\t\t\tx\t\t\t",
        "  leading spaces", "trailing spaces   ", "  both sides  ", "line1\r\nline2\n\nline3",
        "a\u00a0b (no-break space)", "a\u2003b (em space)", "a\u3000b (ideographic space)",
        "a\u200bb (zero width space)", "\ufeffbom at start", "a\u2028b (line separator)",
        # apostrophes and contractions
        "it's", "IT'S", "don't", "they're", "we've", "I'm", "you'll", "he'd", "rock'n'roll",
        "'s", "dogs'", "O'Neil", "it\u2019s (curly apostrophe)", "\u2018single\u2019 \u201cdouble\u201d quotes",
        "the cat's toy isn't here, we're sure",
        # punctuation
        "!!!", "...", "?!?!", "a,b,c", "(parentheses)", "[brackets]", "{braces}", "hello, world!",
        "--", "\u2014em dash\u2014", "\u00abguillemets\u00bb", "#hashtag", "@mention", "C++", "e.g.",
        "$100", "50%", "a/b\\c", "~`^|", "...!?,;:", "***bold***", "__init__",
        # special-token look-alikes
        "<|endoftext|>", "<|startoftext|>", "a <|endoftext|> b", "<|ENDOFTEXT|>", "<|unknown|>",
        # numbers
        "1234567890", "3.14159", "1,000,000", "2024-06-01", "0x1F", "1st 2nd 3rd 4th", "007",
        "\u00bd \u00be", "\u0663\u0664\u0665", "\u2460\u2461\u2462", "\u00b2\u00b3", "H\u2082O", "E=mc\u00b2",
        # URLs, e-mail, HTML
        "https://example.com/path?q=1&r=2#frag", "www.baai.ac.cn", "user@example.com",
        "<b>bold</b>", "&amp; &lt; &gt;", "<img src=\"x.png\" alt='cat'>", "&nbsp;", "&#39;",
        # accents, normalisation
        "caf\u00e9", "cafe\u0301", "na\u00efve r\u00e9sum\u00e9", "\u00c5ngstr\u00f6m", "stra\u00dfe",
        "\u0130stanbul", "\u03a3\u038a\u03a3\u03a5\u03a6\u039f\u03a3", "\u01c4 \u01c5 \u01c6",
        "\ufb01 ligature", "\uff21\uff22\uff23\uff11\uff12\uff13", "\u210c\U0001d522\U0001d529\U0001d529\U0001d52c",
        "Ti\u1ebfng Vi\u1ec7t", "\u00e5\u00e4\u00f6 \u00c5\u00c4\u00d6",
        # scripts
        "\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440", "\u041a\u041e\u0422",
        "\u3053\u3093\u306b\u3061\u306f\u4e16\u754c", "\u732b\u306e\u5199\u771f",
        "\u4e00\u53ea\u732b\u7684\u7167\u7247", "\uace0\uc591\uc774 \uc0ac\uc9c4",
        "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645", "\u05e9\u05dc\u05d5\u05dd",
        "\u0939\u093f\u0928\u094d\u0926\u0940", "\u0e44\u0e17\u0e22", "\u10e5\u10d0\u10e0\u10d7\u10e3\u10da\u10d8",
        "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac",
        # emoji
        "\U0001F431", "\U0001F600\U0001F603\U0001F604", "\U0001F44D\U0001F3FD",
        "\U0001F468\u200d\U0001F469\u200d\U0001F467\u200d\U0001F466",
        "\U0001F3F3\ufe0f\u200d\U0001F308", "\U0001F1EB\U0001F1F7\U0001F1EF\U0001F1F5", "\u2764\ufe0f",
        "I \u2764 NY", "cat\U0001F431dog\U0001F436", "1\ufe0f\u20e3", "\U0001F9D1\U0001F3FF\u200d\U0001F4BB",
        "a photo of a \U0001F431 on a \U0001F6CB\ufe0f",
        # control characters
        "a\x00b", "a\x07b", "tab\there",
        # long inputs (truncated to 77 ids, last one 49407)
        long_en, (caption + ", ") * 8,
        "a " * 74, "a " * 75, "a " * 76, "a " * 200, "a" * 300,
        "\U0001F431" * 60, "\u732b" * 100, ("\u041f\u0440\u0438\u0432\u0435\u0442 " * 40).strip(),
        " ".join(str(i) for i in range(100)),
    ]
    assert len(strings) == len(set(strings)), "duplicate test strings"
    return strings


TEXTS = [
    "a photo of a cat",
    "",
    "A dog running on the beach at sunset.",
    "Make the background dark, as if the camera has taken the photo at night",
    "\u732b\u306e\u5199\u771f",
    "\U0001F468\u200d\U0001F469\u200d\U0001F467\u200d\U0001F466 family picnic",
    "  whitespace\t\nruns   everywhere  ",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9",
    "https://example.com/images/cat.jpg?size=large",
    "it's a dog's life, isn't it?",
    "a <|endoftext|> in the middle",
    ("Make the background dark, as if the camera has taken the photo at night. " * 6).strip(),
    "a " * 75,
]

COMPOSED = [
    ("Make the background dark, as if the camera has taken the photo at night", "baseline_420_640x480.jpg"),
    ("a photo of a cat", "rgb_225x223.png"),
    ("change the color to red", "rgba_alpha_256x192.png"),
    ("", "progressive_480x360.jpg"),
    ("\u732b\u306e\u5199\u771f", "palette_trns_tall_40x1000.png"),
    ("same scene in winter, with snow on the ground " * 8, "tiny_5x3.bmp"),
]

DEMO_COMPOSED = [
    ("Make the background dark, as if the camera has taken the photo at night", "cir_query.png"),
]


# --------------------------------------------------------------------------------------
# reference computations
# --------------------------------------------------------------------------------------

def f32list(t):
    return [float(x) for x in t.detach().to(torch.float32).cpu().numpy().astype(np.float32)]


class Ref:
    def __init__(self, model, processor):
        self.model = model.eval()
        self.processor = processor

    def ids(self, texts):
        enc = self.processor(text=texts, padding=True, truncation=True, max_length=MAX_LENGTH,
                             return_tensors="pt")
        return enc

    def text_raw(self, texts):
        enc = self.ids(texts)
        with torch.no_grad():
            return self.model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])

    def pixels(self, paths):
        images = [Image.open(p) for p in paths]
        out = self.processor(images=images, return_tensors="pt", input_data_format="channels_last")
        return out["pixel_values"]

    def image_raw(self, pixel_values):
        with torch.no_grad():
            return self.model.get_image_features(pixel_values=pixel_values)


def single_ids(tok, text):
    ids = tok(text, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    assert ids[0] == SOT and ids[-1] == EOT and len(ids) <= MAX_LENGTH, (text, ids)
    return ids


def image_entries(ref, files, abs_of, key_of):
    """files: list of repo-relative paths. Returns (entries, pixels dict)."""
    entries, pixels = [], {}
    for rel in files:
        path = abs_of(rel)
        pv = ref.pixels([path])
        raw = ref.image_raw(pv)[0]
        with Image.open(path) as im:
            mode, size = im.mode, list(im.size)
        key = key_of(rel)
        pixels[key] = pv[0].contiguous().clone()
        entries.append({"file": rel, "pixels": key, "mode": mode, "size": size,
                        "embedding": f32list(F.normalize(raw, dim=-1)), "embedding_raw": f32list(raw)})
    return entries, pixels


def build_reference(name, ref, tok, *, token_texts, texts, image_files, composed, demo_files,
                    batch_spec, pixels_file):
    abs_of = lambda rel: os.path.normpath(os.path.join(REPO, rel))
    doc = {
        "model": name,
        "max_length": MAX_LENGTH,
        "dimensions": int(ref.model.config.projection_dim),
        "pixels_file": pixels_file,
        "generated_by": {
            "script": "scripts/make_fixtures.py",
            "torch": TORCH_VERSION, "transformers": transformers.__version__,
            "pillow": PIL.__version__, "numpy": np.__version__,
        },
    }
    doc["tokens"] = [{"text": t, "ids": single_ids(tok, t)} for t in token_texts]

    text_raw = {}
    doc["texts"] = []
    for t in texts:
        raw = ref.text_raw([t])[0]
        text_raw[t] = raw
        doc["texts"].append({"text": t, "ids": single_ids(tok, t),
                             "embedding": f32list(F.normalize(raw, dim=-1)), "embedding_raw": f32list(raw)})

    key_of = lambda rel: os.path.basename(rel) if rel.startswith(IMAGES_REL) else "demo/" + os.path.basename(rel)
    doc["images"], pixels = image_entries(ref, image_files, abs_of, key_of)
    img_raw = {e["file"]: torch.tensor(e["embedding_raw"]) for e in doc["images"]}

    if demo_files:
        doc["demo_images"], demo_pixels = image_entries(ref, demo_files, abs_of, key_of)
        img_raw.update({e["file"]: torch.tensor(e["embedding_raw"]) for e in doc["demo_images"]})
    else:
        demo_pixels = {}

    doc["composed"] = []
    for t, rel in composed:
        if t not in text_raw:
            text_raw[t] = ref.text_raw([t])[0]
        s = text_raw[t] + img_raw[rel]
        doc["composed"].append({"text": t, "file": rel, "ids": single_ids(tok, t),
                                "embedding": f32list(F.normalize(s, dim=-1)), "embedding_raw": f32list(s)})

    # one mixed batch: one padded forward for all texts, one forward for all images
    if batch_spec:
        b_texts = [it["text"] for it in batch_spec if "text" in it]
        b_files = [it["file"] for it in batch_spec if "file" in it]
        t_raw = ref.text_raw(b_texts) if b_texts else None
        i_raw = ref.image_raw(ref.pixels([abs_of(f) for f in b_files])) if b_files else None
        ti = ii = 0
        embs, max_diff = [], 0.0
        for it in batch_spec:
            acc = torch.zeros(doc["dimensions"])
            single = torch.zeros(doc["dimensions"])
            if "text" in it:
                acc = acc + t_raw[ti]
                ti += 1
                single = single + (text_raw[it["text"]] if it["text"] in text_raw else ref.text_raw([it["text"]])[0])
            if "file" in it:
                acc = acc + i_raw[ii]
                ii += 1
                if it["file"] not in img_raw:
                    img_raw[it["file"]] = ref.image_raw(ref.pixels([abs_of(it["file"])]))[0]
                single = single + img_raw[it["file"]]
            e = F.normalize(acc, dim=-1)
            max_diff = max(max_diff, float((e - F.normalize(single, dim=-1)).abs().max()))
            embs.append(f32list(e))
        doc["batch"] = {
            "inputs": batch_spec,
            "text_batch_ids_shape": list(ref.ids(b_texts)["input_ids"].shape) if b_texts else None,
            "embeddings": embs,
            "max_abs_diff_vs_single": max_diff,
        }
    return doc, pixels, demo_pixels


# --------------------------------------------------------------------------------------
# output helpers
# --------------------------------------------------------------------------------------

def dump_json(obj, path):
    """JSON with ASCII escapes (invisible characters stay visible) and scalar lists on one line."""

    def enc(o, ind):
        pad = " " * ind
        if isinstance(o, dict):
            if not o:
                return "{}"
            items = [f'{pad} {json.dumps(k)}: {enc(v, ind + 1)}' for k, v in o.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(o, list):
            if all(not isinstance(x, (dict, list)) for x in o):
                return "[" + ", ".join(json.dumps(x, ensure_ascii=True) for x in o) + "]"
            items = [f"{pad} {enc(v, ind + 1)}" for v in o]
            return "[\n" + ",\n".join(items) + "\n" + pad + "]"
        return json.dumps(o, ensure_ascii=True)

    text = enc(obj, 0) + "\n"
    json.loads(text)
    with open(path, "w", encoding="ascii") as f:
        f.write(text)


def du_bytes(path):
    return int(subprocess.check_output(["du", "-s", "--block-size=1", path]).split()[0])


def check_embeddings(doc, label):
    """Different inputs must give clearly different embeddings."""
    def maxcos(vecs):
        m = torch.tensor(vecs)
        c = m @ m.T
        c.fill_diagonal_(-2)
        return float(c.max())
    tx = [t["embedding"] for t in doc["texts"]]
    im = [i["embedding"] for i in doc["images"]]
    print(f"[{label}] max off-diagonal cosine: texts {maxcos(tx):.4f}, images {maxcos(im):.4f}")
    return maxcos(tx), maxcos(im)


def sensitivity_check(model, ref, texts, files):
    """Every parameter tensor must matter: replacing it by its neutral value (LayerNorm
    weight -> 1, anything else -> 0, i.e. the usual "forgot to load/apply it" bug) must
    move the normalised outputs by more than 1e-2, and a 1% random perturbation of it
    by more than 1e-5 (well above f32 rounding)."""
    enc = ref.ids(texts)
    pv = ref.pixels(files)

    def outputs():
        with torch.no_grad():
            t = F.normalize(model.get_text_features(**enc), dim=-1)
            i = F.normalize(model.get_image_features(pixel_values=pv), dim=-1)
        return torch.cat([t.flatten(), i.flatten()])

    base = outputs()
    g = torch.Generator().manual_seed(7)
    ablate, perturb = [], []
    with torch.no_grad():
        for name, p in model.named_parameters():
            # logit_scale is not used for embeddings; a k_proj bias adds the same
            # q.b_k to every logit of a softmax row, so it cancels exactly (in any CLIP)
            if name == "logit_scale" or name.endswith("k_proj.bias"):
                continue
            saved = p.detach().clone()
            is_ln_weight = ("layer_norm" in name or "layrnorm" in name) and name.endswith(".weight")
            p.fill_(1.0 if is_ln_weight else 0.0)
            ablate.append((float((outputs() - base).abs().max()), name))
            p.copy_(saved)
            p.add_(torch.randn(p.shape, generator=g) * 0.01 * float(saved.std()))
            perturb.append((float((outputs() - base).abs().max()), name))
            p.copy_(saved)
    ablate.sort()
    perturb.sort()
    print(f"sensitivity over {len(ablate)} parameter tensors (max-abs change of normalised outputs):")
    print("  neutralised, smallest: " + ", ".join(f"{d:.2e} {n}" for d, n in ablate[:3]))
    print("  1% perturbed, smallest: " + ", ".join(f"{d:.2e} {n}" for d, n in perturb[:3]))
    assert ablate[0][0] > 1e-2, ablate[0]
    assert perturb[0][0] > 1e-5, perturb[0]
    return ablate[0], perturb[0]


# --------------------------------------------------------------------------------------
# main modes
# --------------------------------------------------------------------------------------

def demo_files():
    d = os.path.normpath(os.path.join(REPO, DEMO_REL))
    if not os.path.isdir(d):
        print(f"note: {d} absent; skipping demo_images")
        return []
    return [f"{DEMO_REL}/{n}" for n in sorted(os.listdir(d))
            if n.lower().endswith((".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"))]


def batch_spec(image_files):
    imgs = [f"{IMAGES_REL}/{n}" for n in ["baseline_420_640x480.jpg", "tiny_5x3.bmp", "rgba_alpha_256x192.png",
                                          "gray_l_wide_1000x40.png", "rgb16_200x150.png"]]
    assert all(i in image_files for i in imgs)
    return [
        {"text": "a photo of a cat"},
        {"file": imgs[0]},
        {"text": TEXTS[11]},  # long, truncated to 77
        {"text": "Make the background dark, as if the camera has taken the photo at night", "file": imgs[2]},
        {"text": ""},
        {"file": imgs[1]},
        {"text": "\U0001F468\u200d\U0001F469\u200d\U0001F467\u200d\U0001F466 family picnic"},
        {"text": "change the color to red", "file": imgs[3]},
        {"file": imgs[4]},
    ]


def make_tiny():
    torch.set_num_threads(1)
    t0 = time.time()
    img_dir = os.path.join(FIXTURES, "images")
    ref_dir = os.path.join(FIXTURES, "reference")
    tiny_dir = os.path.join(FIXTURES, "clip-tiny")
    eos_dir = os.path.join(FIXTURES, "clip-tiny-eos")
    for d in (img_dir, tiny_dir, eos_dir):
        if os.path.isdir(d):
            shutil.rmtree(d)
        os.makedirs(d)
    # reference/ also holds the MLLM references (scripts/make_mllm_fixtures.py):
    # remove only the CLIP ones.
    os.makedirs(ref_dir, exist_ok=True)
    for name in os.listdir(ref_dir):
        if name.startswith("clip-tiny"):
            os.remove(os.path.join(ref_dir, name))

    made = make_images(img_dir)
    image_files = [f"{IMAGES_REL}/{n}" for n, _ in made]

    with tempfile.TemporaryDirectory() as tmp:
        tok = build_tokenizer(tmp)
        ip = build_image_processor()

        # ---- clip-tiny (legacy eos_token_id = 2, like the real BGE-VL configs)
        torch.manual_seed(SEED_TINY)
        model = CLIPModel(clip_config("tiny", legacy_eos=True))
        rerandomise_tiny(model, SEED_TINY)
        model.eval()
        model.save_pretrained(tiny_dir, safe_serialization=True)
        save_tokenizer_and_processor(tok, ip, tiny_dir)

    # reload exactly like a user would (from the Hub layout)
    model = CLIPModel.from_pretrained(tiny_dir, torch_dtype=torch.float32).eval()
    assert model.text_model.eos_token_id == 2
    processor = CLIPProcessor.from_pretrained(tiny_dir)
    tok = processor.tokenizer
    assert isinstance(tok, CLIPTokenizerFast)
    ref = Ref(model, processor)

    sensitivity_check(model, ref, [TEXTS[0], TEXTS[5], TEXTS[11], "a <|endoftext|> in the middle"],
                      [os.path.join(img_dir, n) for n in ["baseline_420_640x480.jpg", "tiny_5x3.bmp",
                                                          "gray_alpha_la_17x31.png"]])

    demos = demo_files()
    doc, pixels, demo_pixels = build_reference(
        "clip-tiny", ref, tok, token_texts=token_strings(), texts=TEXTS, image_files=image_files,
        composed=[(t, f"{IMAGES_REL}/{f}") for t, f in COMPOSED]
        + ([(t, f"{DEMO_REL}/{f}") for t, f in DEMO_COMPOSED] if demos else []),
        demo_files=demos, batch_spec=batch_spec(image_files),
        pixels_file="tests/fixtures/reference/clip-tiny-pixels.safetensors")
    doc["image_notes"] = {n: d for n, d in made}
    mt, mi = check_embeddings(doc, "clip-tiny")
    assert mt < 0.95 and mi < 0.95, (mt, mi)
    assert doc["batch"]["max_abs_diff_vs_single"] < 1e-5, doc["batch"]["max_abs_diff_vs_single"]

    # ---- clip-tiny-eos: same weights and tokenizer (symlinked: size budget), config
    # with the non-legacy eos_token_id = 49407 (pooling at the first 49407).
    cfg = json.load(open(os.path.join(tiny_dir, "config.json")))
    cfg["text_config"]["eos_token_id"] = EOT
    cfg["text_config"]["bos_token_id"] = SOT
    with open(os.path.join(eos_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    for n in sorted(os.listdir(tiny_dir)):
        if n == "config.json":
            continue
        if n in ("model.safetensors", "tokenizer.json"):
            os.symlink(os.path.join("..", "clip-tiny", n), os.path.join(eos_dir, n))
        else:
            shutil.copyfile(os.path.join(tiny_dir, n), os.path.join(eos_dir, n))
    eos_model = CLIPModel.from_pretrained(eos_dir, torch_dtype=torch.float32).eval()
    assert eos_model.text_model.eos_token_id == EOT
    eos_ref = Ref(eos_model, CLIPProcessor.from_pretrained(eos_dir))
    eos_doc, _, _ = build_reference(
        "clip-tiny-eos", eos_ref, tok, token_texts=[], texts=TEXTS,
        image_files=[f"{IMAGES_REL}/{n}" for n in ["baseline_420_640x480.jpg", "rgb_225x223.png",
                                                    "rgba_alpha_256x192.png", "tiny_5x3.bmp"]],
        composed=[(t, f"{IMAGES_REL}/{f}") for t, f in COMPOSED[:3]],
        demo_files=[], batch_spec=batch_spec(image_files),
        pixels_file="tests/fixtures/reference/clip-tiny-pixels.safetensors")
    del eos_doc["tokens"]
    # same weights => same embeddings: eos pooling == legacy argmax pooling for this tokenizer
    for a, b in zip(doc["texts"], eos_doc["texts"]):
        assert a["embedding"] == b["embedding"], a["text"]

    # ---- write references; demo pixel tensors only if the budget allows
    dump_json(doc, os.path.join(ref_dir, "clip-tiny.json"))
    dump_json(eos_doc, os.path.join(ref_dir, "clip-tiny-eos.json"))
    pix_path = os.path.join(ref_dir, "clip-tiny-pixels.safetensors")
    # a single metadata key: safetensors writes the metadata map in hash order
    meta = {"format": "pt"}
    save_file({**pixels, **demo_pixels}, pix_path, metadata=meta)
    write_readme(made, doc)
    if demo_pixels and clip_fixture_bytes() > SIZE_BUDGET:
        print("note: demo pixel tensors exceed the size budget; keeping only demo embeddings")
        for e in doc["demo_images"]:
            e["pixels"] = None
        dump_json(doc, os.path.join(ref_dir, "clip-tiny.json"))
        save_file(pixels, pix_path, metadata=meta)
    total = clip_fixture_bytes()
    print(f"CLIP fixtures: {total / 1e6:.2f} MB (budget {SIZE_BUDGET / 1e6:.0f} MB)")
    assert total <= SIZE_BUDGET
    print(f"batch max abs diff vs single: {doc['batch']['max_abs_diff_vs_single']:.3e}")
    print(f"done in {time.time() - t0:.1f} s")


def make_full(arch, out):
    out = os.path.abspath(out)
    if os.path.commonpath([out, REPO]) == REPO:
        sys.exit("--out must be outside the repository")
    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    image_files = [f"{IMAGES_REL}/{n}" for n in sorted(os.listdir(os.path.join(FIXTURES, "images")))]
    if not image_files:
        sys.exit("run without --full first: the fixture images are needed")
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_tokenizer(tmp)
        ip = build_image_processor()
        torch.manual_seed(SEED_FULL[arch])
        model = CLIPModel(clip_config(arch, legacy_eos=True)).eval()  # standard transformers init
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(out, safe_serialization=True)
        save_tokenizer_and_processor(tok, ip, out)
    t_save = time.time() - t0
    print(f"{arch}: {n_params / 1e6:.1f}M parameters, built and saved in {t_save:.1f} s")

    model = CLIPModel.from_pretrained(out, torch_dtype=torch.float32).eval()
    processor = CLIPProcessor.from_pretrained(out)
    ref = Ref(model, processor)
    demos = demo_files()
    texts = [TEXTS[i] for i in (0, 1, 2, 3, 4, 5, 9, 11)]
    doc, pixels, demo_pixels = build_reference(
        f"bge-vl-{arch}-random", ref, processor.tokenizer, token_texts=texts, texts=texts,
        image_files=image_files,
        composed=[(t, f"{IMAGES_REL}/{f}") for t, f in COMPOSED]
        + ([(t, f"{DEMO_REL}/{f}") for t, f in DEMO_COMPOSED] if demos else []),
        demo_files=demos, batch_spec=batch_spec(image_files),
        pixels_file="reference-pixels.safetensors")
    doc["model_dir"] = out
    check_embeddings(doc, doc["model"])
    dump_json(doc, os.path.join(out, "reference.json"))
    save_file({**pixels, **demo_pixels}, os.path.join(out, "reference-pixels.safetensors"),
              metadata={"format": "pt"})
    print(f"batch max abs diff vs single: {doc['batch']['max_abs_diff_vs_single']:.3e}")
    print(f"total time {time.time() - t0:.1f} s (model build+save {t_save:.1f} s, references "
          f"{time.time() - t0 - t_save:.1f} s)")


def clip_fixture_bytes():
    """Size of the CLIP fixtures alone (the MLLM ones have their own budget)."""
    ref_dir = os.path.join(FIXTURES, "reference")
    total = sum(du_bytes(os.path.join(FIXTURES, d)) for d in ("clip-tiny", "clip-tiny-eos", "images"))
    for name in os.listdir(ref_dir):
        if name.startswith("clip-tiny"):
            total += du_bytes(os.path.join(ref_dir, name))
    return total


MLLM_README_HEADING = "## BGE-VL-MLLM"


def write_readme(made, doc):
    rows = "\n".join(f"| `{n}` | {d} |" for n, d in made)
    text = README.format(image_rows=rows, n_tokens=len(doc["tokens"]), n_texts=len(doc["texts"]),
                         n_images=len(doc["images"]), n_composed=len(doc["composed"]),
                         n_demo=len(doc.get("demo_images", [])),
                         torch=TORCH_VERSION, transformers=transformers.__version__,
                         pillow=PIL.__version__)
    path = os.path.join(FIXTURES, "README.md")
    # Keep the section that scripts/make_mllm_fixtures.py maintains.
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if MLLM_README_HEADING in old:
            text = text.rstrip("\n") + "\n\n" + old[old.index(MLLM_README_HEADING):]
    with open(path, "w") as f:
        f.write(text)


README = """# Test fixtures

Generated by `scripts/make_fixtures.py` (torch {torch}, transformers {transformers},
Pillow {pillow}; exact pins in `scripts/requirements-fixtures.txt`). Do not edit by
hand. To regenerate (deterministic: same versions give byte-identical files):

```sh
python3.11 -m venv /tmp/fixenv
/tmp/fixenv/bin/pip install -r scripts/requirements-fixtures.txt
/tmp/fixenv/bin/python scripts/make_fixtures.py
```

No network access is needed and no real weights are involved. The tests read these
files; they never run Python.

## `clip-tiny/`

A tiny random-weight `CLIPModel` in the Hub layout, saved by transformers:
`config.json`, `model.safetensors` (f32), `tokenizer.json`, `tokenizer_config.json`,
`special_tokens_map.json`, `preprocessor_config.json`.

- Tokenizer: the REAL CLIP BPE (49408 ids; `<|startoftext|>` 49406,
  `<|endoftext|>` 49407 = pad token; `model_max_length` 77), built from open_clip's
  `bpe_simple_vocab_16e6.txt.gz` the way CLIP's simple tokenizer builds it, then
  `CLIPTokenizerFast(...).save_pretrained(dir, legacy_format=False)`. `tokenizer.json`
  is then rewritten by the tokenizers library without indentation
  (`backend_tokenizer.save(path, pretty=False)`: same document, half the size).
  "a photo of a cat" → `49406 320 1125 539 320 2368 49407`.
- Image processor: `CLIPImageProcessor` with the real CLIP values (shortest edge
  224, bicubic, center crop 224x224, rescale 1/255, CLIP mean/std).
- Model: text vocab 49408, 77 positions, hidden 32, 2 layers, 4 heads, MLP 64;
  vision 224px, patch 32, hidden 32, 2 layers, 4 heads, MLP 64; projection 16;
  quick_gelu; layer_norm_eps 1e-5. `text_config.eos_token_id` is the legacy value 2,
  like the real openai/BGE-VL configs (transformers then pools at the argmax of the
  ids = the first 49407). After init every parameter (except the unused
  `logit_scale`) is re-drawn from a seeded generator: LayerNorm weights 1+0.2·N(0,1),
  LayerNorm and linear biases 0.2·N(0,1) (query biases 0.5·N(0,1)), token/position/class embeddings 0.5·N(0,1),
  linear weights N(0,(g/√fan_in)²) with gain g = 3 for q/k (far from uniform attention),
  2 for v/out, 1.5 for the MLP, 1 for the projections. The script checks that
  every parameter tensor matters (set to its neutral value — LayerNorm weight 1,
  anything else 0 — it moves the normalised outputs by > 1e-2; perturbed by 1% of
  its std, by > 1e-5), except `k_proj.bias`, which cancels in softmax in any CLIP,
  and that different inputs give clearly different embeddings (max cosine between
  distinct texts / images < 0.95).
- `config.json` is what `save_pretrained` writes in transformers 4.45: nested
  `text_config` / `vision_config` hold only values that differ from the
  `CLIPTextConfig` / `CLIPVisionConfig` defaults. Omitted here (defaults):
  `vocab_size` 49408, `max_position_embeddings` 77, `hidden_act` "quick_gelu",
  `layer_norm_eps` 1e-5, `image_size` 224, `patch_size` 32, `num_channels` 3.
  (A full-size base config omits even the hidden sizes: they equal the defaults.)

## `clip-tiny-eos/`

The same model with the non-legacy `text_config.eos_token_id = 49407` (and
`bos_token_id = 49406`): pooling at the first position of 49407. `model.safetensors`
and `tokenizer.json` are relative symlinks to `../clip-tiny/` (a second 7 MB model
would break the 20 MB fixture budget). With this tokenizer both pooling rules pick
the same position, so its embeddings equal clip-tiny's; the script asserts that.

## `images/`

Synthetic, deterministic images (smooth photo-like content, sharp shapes, mild noise):

| file | what it covers |
|---|---|
{image_rows}

## `reference/`

Computed with transformers' `CLIPModel` and `CLIPProcessor`, as upstream BGE-VL's
`encode()` does: text through the processor with `padding=True, truncation=True,
max_length=77`; images opened with `PIL.Image.open(path)` and given to the image
processor (which converts to RGB: alpha dropped, not composited; EXIF orientation
ignored), always with `input_data_format="channels_last"` (transformers otherwise
guesses the channel axis from the shape and misreads images 1 or 3 pixels tall, e.g.
`tiny_5x3.bmp`). `get_text_features` / `get_image_features` give the unnormalised
embeddings (`embedding_raw`); `embedding` is L2-normalised; composed = normalize(text_raw
+ image_raw), and its `embedding_raw` is the unnormalised sum. Floats are the exact
f32 values (Python repr).

`clip-tiny.json`:

- `model`, `max_length` (77), `dimensions` (16), `pixels_file`, `generated_by`
- `tokens`: {n_tokens} × `{{"text", "ids"}}` — the tokenizer's ids with truncation at
  77 (the last id stays 49407); unicode, emoji (ZWJ, skin tones, flags), whitespace,
  apostrophes, punctuation, special-token look-alikes, numbers, URLs, HTML, long inputs
- `texts`: {n_texts} × `{{"text", "ids", "embedding", "embedding_raw"}}`
- `images`: {n_images} × `{{"file", "pixels", "mode", "size", "embedding", "embedding_raw"}}`;
  `file` is relative to the repository root, `pixels` is the key of the
  preprocessed [3,224,224] f32 tensor in `clip-tiny-pixels.safetensors`, `mode` and
  `size` ([width, height]) are what PIL reports when opening the file
- `demo_images`: {n_demo} × the same, for `../shared/testdata/bge-vl-demo/*` (real photos read in
  place, never copied here); `pixels` is `null` where the tensors did not fit the budget
- `composed`: {n_composed} × `{{"text", "file", "ids", "embedding", "embedding_raw"}}`
- `batch`: `{{"inputs": [{{"text"?, "file"?}}...], "text_batch_ids_shape", "embeddings",
  "max_abs_diff_vs_single"}}` — one mixed batch (texts of different lengths padded in
  a single text forward, all images in a single image forward, composed items
  summed), normalised; the max abs difference against the one-at-a-time results
  documents that the reference is batch-invariant
- `image_notes`: file name → what the image covers

`clip-tiny-eos.json`: the same keys without `tokens`, `image_notes` and `demo_images`,
fewer cases. Both use `clip-tiny-pixels.safetensors`.

`clip-tiny-pixels.safetensors`: one f32 tensor [3,224,224] per image, keyed by file
name (demo photos as `demo/NAME` when they fit the budget).

Reference behaviour these files pin down (transformers 4.45.2 + Pillow):

- `convert("RGB")` drops alpha (RGBA, LA, WebP with alpha, palette with tRNS: the
  palette colour is kept whatever its alpha); nothing is composited on white.
- 16-bit RGB PNG: PIL opens it as 8-bit `RGB` keeping the HIGH byte of each sample
  (not `round(v/257)`). 16-bit grayscale PNG: PIL opens it as `I;16`, and
  `convert("RGB")` CLIPS the value to 0..255 (no scaling), so a normal 16-bit
  grayscale image turns almost white: the top half of `gray16_150x200.png` becomes
  255 everywhere, the bottom half (values < 256) survives.
- GIF: the first frame (palette) only.
- EXIF orientation is ignored.
- Text: an `<|endoftext|>` written literally in the text is the special token 49407
  (so pooling stops there), and so is `<|ENDOFTEXT|>`: the special tokens are
  "normalized" added tokens, matched after the NFC + whitespace + lowercase
  normaliser; whitespace (incl. NBSP, U+2028, U+3000) separates words, zero-width
  space does not.
- One text or image at a time vs the mixed padded batch: `batch.max_abs_diff_vs_single`
  (f32 rounding only).

## Full-size random models (not committed)

```sh
/tmp/fixenv/bin/python scripts/make_fixtures.py --full base  --out /tmp/bge-vl-base-random
/tmp/fixenv/bin/python scripts/make_fixtures.py --full large --out /tmp/bge-vl-large-random
```

writes the exact BGE-VL-base / BGE-VL-large architecture with the standard seeded
transformers initialisation, the same tokenizer and preprocessor config, and
`reference.json` + `reference-pixels.safetensors` (same format as `clip-tiny.json`)
into the given directory (never into the repository).
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", choices=["base", "large"], help="write a full-size random model instead")
    ap.add_argument("--out", help="output directory for --full (outside the repository)")
    args = ap.parse_args()
    if args.full:
        if not args.out:
            ap.error("--full needs --out DIR")
        make_full(args.full, args.out)
    else:
        if args.out:
            ap.error("--out is only for --full")
        make_tiny()


if __name__ == "__main__":
    main()
