#!/usr/bin/env python3
"""The Python side of scripts/gpu-check.sh (see there and README, "GPU check").

Commands (each one step of the check; the shell script time-boxes them):

    gpu_check.py pack --out DIR
        HERE, before the GPU run (needs Pillow and transformers 4.45.2, the
        fixture environment): 640x480 JPEG benchmark inputs and captions, and
        the BGE-VL-MLLM reference inputs (prompt ids, and the uint8 image tiles
        of the LLaVA-NeXT preprocessing of transformers 4.45.2) for the full-size
        and the small (dry-run) MLLM. The GPU host has no Pillow, so images are
        prepared here and carried over.

    gpu_check.py make-clip --size full|small --kinds base,large --out DIR
                           --device cuda:0|cpu --result FILE
        builds random-weight BGE-VL-base/-large CLIP models with the host's
        torch + transformers directly on the device, writes them in the Hub
        layout (own safetensors writer, f32), computes the references of the
        committed CLIP fixture cases (texts from their ids, images from their
        committed pixel tensors: no Pillow needed) in f32 and bf16, and measures
        the PyTorch bf16 model alone (image and text forward) at several batch
        sizes.

    gpu_check.py make-mllm --size full|small --inputs DIR --out DIR
                           --device cuda:0|cpu --result FILE
        the same for BGE-VL-MLLM (LLaVA-NeXT + Mistral-7B), in bf16, written in
        the llava-hf layout; references in bf16 and f32; composed queries/s of
        the PyTorch bf16 model alone.

    gpu_check.py parity --url URL --model NAME --label L --dtype D --device D
                        --reference NAME=FILE [...] --result FILE
        one /embed request with a reference file's cases (the format of
        tests/fixtures/reference/*.json, read by scripts/check_reference.py),
        compared with every given reference.

    gpu_check.py load --result FILE --loadgen-json F --metrics-before F
                      --metrics-after F [...]
        one load level's row: loadgen's report, the batches formed, the
        preprocessing and inference seconds from /metrics, GPU samples, CPU.

    gpu_check.py report --work DIR --out DIR
        merges the results into gpu-check.json and gpu-check.md (standard
        library only; runs even when every other step failed).

Works with transformers 4.45.2 (the fixture environment, for the dry run) and
5.x (the GPU host: 5.17): models are built from config objects (not
from_pretrained), config.json is written by this script in the 4.x layout that
the Hub's BGE-VL checkpoints use (transformers 5 writes `rope_parameters`,
which vlembed does not read), tensor names are mapped to the llava-hf layout
whatever the installed version calls them, features are taken from submodules
(`vision_model`, `text_model`, projections) rather than `get_*_features`
(whose return type changed in 5.x), and the MLLM's last hidden state is read
with its `lm_head` replaced by an identity (no dependence on how
`hidden_states` are collected).
"""

import argparse
import glob
import json
import math
import os
import re
import shutil
import struct
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(REPO, "tests", "fixtures")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

IMAGE_TOKEN_ID = 32000
RESIZE_TO = 512  # upstream BGE-VL-MLLM resizes every image to 512x512 first
INSTRUCTION = ("Retrieve the target image that best meets the combined criteria by using both "
               "the provided image and the image retrieval instructions: ")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# --------------------------------------------------------------------------------------
# architectures (config.json in the 4.x layout of the Hub checkpoints)
# --------------------------------------------------------------------------------------

CLIP_ARCH = {
    # openai/clip-vit-base-patch16 == BAAI/BGE-VL-base
    ("full", "base"): dict(text=(512, 2048, 12, 8), vision=(768, 3072, 12, 12, 16), proj=512, seed=150),
    # openai/clip-vit-large-patch14 == BAAI/BGE-VL-large
    ("full", "large"): dict(text=(768, 3072, 12, 12), vision=(1024, 4096, 24, 16, 14), proj=768, seed=428),
    # dry run: the same code path, small
    ("small", "base"): dict(text=(64, 128, 2, 4), vision=(64, 128, 2, 4, 32), proj=32, seed=150),
    ("small", "large"): dict(text=(96, 192, 2, 4), vision=(96, 192, 3, 4, 32), proj=48, seed=428),
}


def clip_config_dict(size, kind):
    a = CLIP_ARCH[(size, kind)]
    th, ti, tl, ta = a["text"]
    vh, vi, vl, va, vp = a["vision"]
    p = a["proj"]
    common = dict(hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=p, initializer_range=0.02,
                  initializer_factor=1.0, attention_dropout=0.0)
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": p,
        "logit_scale_init_value": 2.6592,
        "initializer_factor": 1.0,
        "torch_dtype": "float32",
        "transformers_version": "4.45.2",
        "text_config": dict(model_type="clip_text_model", vocab_size=49408, hidden_size=th, intermediate_size=ti,
                            num_hidden_layers=tl, num_attention_heads=ta, max_position_embeddings=77,
                            bos_token_id=0, eos_token_id=2, pad_token_id=1, **common),
        "vision_config": dict(model_type="clip_vision_model", hidden_size=vh, intermediate_size=vi,
                              num_hidden_layers=vl, num_attention_heads=va, image_size=224, patch_size=vp,
                              num_channels=3, **common),
    }


MLLM_PINPOINTS = {
    "full": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "small": [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]],  # tests/fixtures/mllm-tiny-a
}


def mllm_config_dict(size):
    if size == "full":  # llava-hf/llava-v1.6-mistral-7b-hf == BAAI/BGE-VL-MLLM-S1
        v = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 image_size=336, patch_size=14, projection_dim=768)
        t = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1000000.0)
    else:
        v = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 image_size=32, patch_size=8, projection_dim=32)
        t = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0)
    grid = v["image_size"] // v["patch_size"]
    return {
        "architectures": ["LlavaNextForConditionalGeneration"],
        "model_type": "llava_next",
        "ignore_index": -100,
        "image_token_index": IMAGE_TOKEN_ID,
        "projector_hidden_act": "gelu",
        "vision_feature_select_strategy": "default",
        "vision_feature_layer": -2,
        "image_grid_pinpoints": MLLM_PINPOINTS[size],
        # transformers 4.45 expands <image> itself when a row has fewer image
        # tokens than this ("legacy processing"); the ids here are expanded.
        "image_seq_length": grid * grid,
        "tie_word_embeddings": False,
        "pad_token_id": 32001,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.45.2",
        "vision_config": dict(model_type="clip_vision_model", hidden_act="quick_gelu", layer_norm_eps=1e-5,
                              num_channels=3, attention_dropout=0.0, initializer_range=0.02,
                              initializer_factor=1.0, **v),
        "text_config": dict(model_type="mistral", vocab_size=32064, hidden_act="silu", rms_norm_eps=1e-5,
                            sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                            attention_dropout=0.0, initializer_range=0.02, **t),
    }


def mllm_preprocessor_dict(size):
    s = 336 if size == "full" else 32
    return {
        "crop_size": {"height": s, "width": s},
        "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_pad": True,
        "do_rescale": True, "do_resize": True,
        "image_grid_pinpoints": MLLM_PINPOINTS[size],
        "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "image_processor_type": "LlavaNextImageProcessor",
        "processor_class": "LlavaNextProcessor",
        "resample": 3, "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": s},
    }


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------

def now():
    return time.time()


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=True)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def log(msg):
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def versions():
    import torch
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": getattr(torch.version, "cuda", None)}


def set_precise(torch):
    """f32 references without TF32 (torch's default for cuDNN convolutions is
    TF32 on Ampere and later; CLIP's patch embedding is a convolution)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        torch.set_float32_matmul_precision("highest")
    except Exception:
        pass


def sync(torch, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def unit(v):
    n = math.sqrt(sum(x * x for x in v)) or 1.0
    return [x / n for x in v]


def cos(a, b):
    a, b = unit(a), unit(b)
    return sum(x * y for x, y in zip(a, b))


# --------------------------------------------------------------------------------------
# safetensors, written directly (one copy device -> host -> file per tensor)
# --------------------------------------------------------------------------------------

def write_safetensors(path, items):
    """items: [(name, tensor)] in file order."""
    import torch
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.uint8: "U8",
             torch.int64: "I64"}
    header, off = {}, 0
    for n, t in items:
        nb = t.numel() * t.element_size()
        header[n] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + nb]}
        off += nb
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for _, t in items:
            b = t.detach().contiguous().reshape(-1)
            if b.device.type != "cpu":
                b = b.cpu()
            f.write(memoryview(b.view(torch.uint8).numpy()))
    return off


def write_weights(out, items, shard_bytes, threads=4):
    """Writes model.safetensors, or shards + model.safetensors.index.json when
    larger than shard_bytes; shards are written by a few threads at once."""
    from concurrent.futures import ThreadPoolExecutor
    shards, cur, size = [], [], 0
    for n, t in items:
        nb = t.numel() * t.element_size()
        if cur and size + nb > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((n, t))
        size += nb
    shards.append(cur)
    if len(shards) == 1:
        return write_safetensors(os.path.join(out, "model.safetensors"), shards[0])
    files = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    with ThreadPoolExecutor(max_workers=threads) as ex:
        total = sum(ex.map(lambda a: write_safetensors(os.path.join(out, a[0]), a[1]), zip(files, shards)))
    weight_map = {n: f for f, shard in zip(files, shards) for n, _ in shard}
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def copy_real(src, dst):
    shutil.copyfile(os.path.realpath(src), dst)


def hf_layout(name):
    """transformers >= 4.52 names LLaVA-NeXT's tensors model.language_model.*,
    model.vision_tower.*, lm_head.*; the llava-hf checkpoints (and vlembed)
    use the older layout."""
    if name.startswith("model.vision_tower."):  # 5.x: the CLIP vision model without its `vision_model.`
        rest = name[len("model.vision_tower."):]
        return "vision_tower." + (rest if rest.startswith("vision_model.") else "vision_model." + rest)
    for a, b in (("model.language_model.", "language_model.model."),
                 ("model.multi_modal_projector.", "multi_modal_projector."),
                 ("model.image_newline", "image_newline"), ("lm_head.", "language_model.lm_head.")):
        if name.startswith(a):
            return b + name[len(a):]
    return name


def build_on(torch, cls, cfg, device, dtype):
    """Constructs cls(cfg) with its parameters created on `device` in `dtype`
    (transformers' own random initialisation, run there: seconds for 7B on a
    GPU)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def bench_batches(torch, device, fn, make, batches, min_s):
    """Items/s of fn(make(b)) at each batch size (warm-up, then repetitions for
    at least min_s seconds, synchronised). Stops at the first out-of-memory."""
    out = {}
    for b in batches:
        try:
            x = make(b)
            with torch.inference_mode():
                fn(x)
                sync(torch, device)
                t0 = now()
                fn(x)
                sync(torch, device)
                one = max(now() - t0, 1e-6)
                reps = max(2, min(200, int(min_s / one)))
                t0 = now()
                for _ in range(reps):
                    fn(x)
                sync(torch, device)
                dt = now() - t0
            out[str(b)] = {"per_s": b * reps / dt, "batch_ms": dt / reps * 1e3, "reps": reps}
            log(f"  batch {b}: {b * reps / dt:.1f}/s ({dt / reps * 1e3:.2f} ms per batch)")
            del x
        except Exception as e:  # noqa: BLE001 - out of memory above some batch: keep the smaller ones
            out[str(b)] = {"error": f"{type(e).__name__}: {e}"[:200]}
            log(f"  batch {b}: {out[str(b)]['error']}")
            break
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    ok = {k: v for k, v in out.items() if "per_s" in v}
    best = max(ok, key=lambda k: ok[k]["per_s"]) if ok else None
    return {"by_batch": out, "best_batch": int(best) if best else None,
            "best_per_s": ok[best]["per_s"] if best else None}


# --------------------------------------------------------------------------------------
# pack (here, with Pillow and transformers 4.45.2)
# --------------------------------------------------------------------------------------

MLLM_CASES = [
    # role, instruction, text, image index
    ("query", INSTRUCTION, "make the background dark, as if the photo was taken at night", 0),
    ("query", INSTRUCTION, "a red car parked on the street", None),
    ("candidate", None, None, 1),
    ("candidate", None, "a dog running on the beach", None),
]


def prompt_for(role, instruction, text, has_image):
    """Upstream BGE-VL-MLLM's prompt (see scripts/make_mllm_fixtures.py)."""
    if role == "query":
        s = f"[INST] \n <instruct> {instruction} <query> " if instruction is not None else "[INST] \n <instruct>  <query>"
    else:
        s = "[INST] "
    if text:
        s = f"{s} {text} \n"
    if has_image:
        s = f"{s} <image>"
    return f"{s} [/INST]"


def cmd_pack(a):
    import numpy as np
    from PIL import Image
    import transformers
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor
    from transformers.image_utils import ChannelDimension, to_numpy_array
    import bench_reference

    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    t0 = now()
    if not (os.path.isdir(os.path.join(out, "images")) and os.path.exists(os.path.join(out, "texts.txt"))):
        bench_reference.make_inputs(out, a.n)
    images = sorted(glob.glob(os.path.join(out, "images", "*.jpg")))
    assert len(images) >= 2, images
    tiny = os.path.join(FIX, "mllm-tiny-a")
    base_proc = LlavaNextProcessor.from_pretrained(tiny)
    tok = base_proc.tokenizer
    for size in ("full", "small"):
        pre = mllm_preprocessor_dict(size)
        cfg = mllm_config_dict(size)
        ip = LlavaNextImageProcessor(**{k: v for k, v in pre.items()
                                        if k not in ("image_processor_type", "processor_class")})
        proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=cfg["vision_config"]["patch_size"],
                                  vision_feature_select_strategy="default")
        cases, tiles = [], {}
        for i, (role, instr, text, img) in enumerate(MLLM_CASES):
            prompt = prompt_for(role, instr, text, img is not None)
            pil = None
            if img is not None:
                with Image.open(images[img]) as im:
                    pil = im.resize((RESIZE_TO, RESIZE_TO)).convert("RGB")
            enc = proc(images=[pil] if pil is not None else None, text=[prompt], return_tensors="np")
            ids = [int(x) for x in enc["input_ids"][0]]
            n_img = sum(1 for x in ids if x == IMAGE_TOKEN_ID)
            first = ids.index(IMAGE_TOKEN_ID) if n_img else None
            short = ids if not n_img else ids[:first] + [IMAGE_TOKEN_ID] + ids[first + n_img:]
            case = dict(role=role, instruction=instr, text=text, prompt=prompt, ids=short, image_tokens=n_img,
                        file=os.path.basename(images[img]) if img is not None else None)
            if pil is not None:
                arr = to_numpy_array(pil)
                s = pre["size"]["shortest_edge"]
                patches = ip.get_image_patches(arr, pre["image_grid_pinpoints"], size=(s, s),
                                               patch_size=pre["crop_size"]["height"], resample=pre["resample"],
                                               data_format=ChannelDimension.LAST,
                                               input_data_format=ChannelDimension.LAST)
                u8 = np.stack(patches).astype(np.uint8)
                assert all(p.dtype == np.uint8 for p in patches)
                # the tiles, normalised here as on the GPU host, must be the processor's pixels
                got = normalise_tiles(np, u8)
                want = enc["pixel_values"][0]
                diff = float(np.abs(got - want).max())
                assert got.shape == want.shape and diff <= 1e-6, (got.shape, want.shape, diff)
                key = f"case{i}"
                tiles[key] = u8
                case.update(tiles=key, image_size=[int(x) for x in enc["image_sizes"][0]])
            cases.append(case)
        import torch
        tiles_path = os.path.join(out, f"mllm-{size}-tiles.safetensors")
        write_safetensors(tiles_path, [(k, torch.from_numpy(v)) for k, v in tiles.items()])
        if a.compress:  # the bundle carries it as .xz (the GPU host reads it with Python's lzma)
            import lzma
            with open(tiles_path, "rb") as src, lzma.open(tiles_path + ".xz", "wb", preset=6) as dst:
                shutil.copyfileobj(src, dst)
            os.remove(tiles_path)
        write_json(os.path.join(out, f"mllm-{size}.json"), {
            "size": size, "cases": cases, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
            "rescale_factor": pre["rescale_factor"],
            "made_with": f"transformers {transformers.__version__} LlavaNextProcessor (slow image processor), "
                         f"tokenizer of tests/fixtures/mllm-tiny-a",
        })
    log(f"pack: {len(images)} images, MLLM reference inputs (full, small) in {out} ({now() - t0:.1f} s)")


def normalise_tiles(np, u8):
    """uint8 tiles [n, H, W, 3] -> f32 [n, 3, H, W] exactly as transformers'
    rescale (f64 multiply, then f32) and normalize (f32) do."""
    x = (u8 * 0.00392156862745098).astype(np.float32)
    x = (x - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


# --------------------------------------------------------------------------------------
# CLIP: build, write, references, PyTorch baseline
# --------------------------------------------------------------------------------------

def clip_cases():
    """The committed CLIP fixture cases with their ids and pixel tensors."""
    from safetensors.torch import load_file
    ref = read_json(os.path.join(FIX, "reference", "clip-tiny.json"))
    px = load_file(os.path.join(FIX, "reference", "clip-tiny-pixels.safetensors"))
    by_file = {}
    for i in ref["images"]:
        if i.get("pixels") in px:
            by_file[i["file"]] = px[i["pixels"]]
    texts = [(t["text"], t["ids"]) for t in ref["texts"] if t["text"].strip()]
    images = [(f, p) for f, p in by_file.items()]
    composed = [(c["text"], c["ids"], c["file"]) for c in ref["composed"]
                if c["text"].strip() and c["file"] in by_file]
    return texts, images, composed, by_file


def clip_features(torch, model, ids=None, pixels=None):
    if ids is not None:
        out = model.text_model(input_ids=ids, attention_mask=torch.ones_like(ids))
        return model.text_projection(out.pooler_output)
    out = model.vision_model(pixel_values=pixels)
    return model.visual_projection(out.pooler_output)


def clip_reference(torch, model, device, dtype, cases):
    texts, images, composed, by_file = cases
    F = torch.nn.functional

    def raw_text(ids):
        x = torch.tensor([ids], device=device)
        return clip_features(torch, model, ids=x)[0].float()

    with torch.inference_mode():
        doc = {"texts": [], "images": [], "composed": []}
        # texts one at a time (no padding); images in one batch (no padding either)
        raw_t = {text: raw_text(ids) for text, ids in texts + [(t, i) for t, i, _ in composed]}
        px = torch.stack([p for _, p in images]).to(device=device, dtype=dtype)
        raw_i = dict(zip([f for f, _ in images], clip_features(torch, model, pixels=px).float()))
        for text, _ in texts:
            doc["texts"].append({"text": text, "embedding": F.normalize(raw_t[text], dim=0).tolist()})
        for f, _ in images:
            doc["images"].append({"file": f, "embedding": F.normalize(raw_i[f], dim=0).tolist()})
        for text, _, f in composed:
            v = raw_t[text] + raw_i[f]
            doc["composed"].append({"text": text, "file": f, "embedding": F.normalize(v, dim=0).tolist()})
    return doc


def ref_vectors(doc):
    return [e["embedding"] for k in ("texts", "images", "composed", "cases") for e in doc.get(k, [])]


def cmd_make_clip(a):
    import torch
    from transformers import CLIPConfig, CLIPModel
    set_precise(torch)
    device = a.device
    result = read_json(a.result, {}) or {}
    result.update({"versions": versions(), "device": device, "size": a.size})
    cases = clip_cases()
    for kind in a.kinds.split(","):
        r = result.setdefault(kind, {})
        t0 = now()
        out = os.path.join(a.out, f"bge-vl-{kind}")
        os.makedirs(out, exist_ok=True)
        cfgd = clip_config_dict(a.size, kind)
        torch.manual_seed(CLIP_ARCH[(a.size, kind)]["seed"])
        model = build_on(torch, CLIPModel, CLIPConfig.from_dict(cfgd), device, torch.float32)
        sync(torch, device)
        r["build_s"] = now() - t0
        r["parameters"] = sum(p.numel() for p in model.parameters())
        t1 = now()
        items = list(model.state_dict().items())
        r["weights_bytes"] = write_weights(out, items, 5 * 1000 ** 3)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfgd, f, indent=2)
        for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "preprocessor_config.json"):
            copy_real(os.path.join(FIX, "clip-tiny", n), os.path.join(out, n))
        r["write_s"] = now() - t1
        r["dir"] = out
        log(f"{kind}: {r['parameters'] / 1e6:.1f}M parameters, built in {r['build_s']:.1f} s, "
            f"{r['weights_bytes'] / 1e9:.2f} GB written in {r['write_s']:.1f} s")
        write_json(a.result, result)

        t2 = now()
        f32 = clip_reference(torch, model, device, torch.float32, cases)
        write_json(os.path.join(out, "ref-f32.json"), {"model": f"bge-vl-{kind}", **f32})
        model = model.to(torch.bfloat16)
        bf16 = clip_reference(torch, model, device, torch.bfloat16, cases)
        write_json(os.path.join(out, "ref-bf16.json"), {"model": f"bge-vl-{kind}", **bf16})
        c = [cos(x, y) for x, y in zip(ref_vectors(f32), ref_vectors(bf16))]
        r["torch_bf16_vs_f32"] = {"cases": len(c), "min_cosine": min(c)}
        r["reference_s"] = now() - t2
        log(f"{kind}: references ({len(c)} cases) in {r['reference_s']:.1f} s; PyTorch's own bf16 vs f32: "
            f"min cosine {min(c):.6f}")
        write_json(a.result, result)

        # the PyTorch bf16 model alone, on tensors already on the device
        g = torch.Generator(device="cpu").manual_seed(0)
        img_b = [int(x) for x in a.image_batches.split(",")]
        txt_b = [int(x) for x in a.text_batches.split(",")]
        log(f"{kind}: PyTorch bf16 alone, images (batches {img_b})")
        r["baseline_image"] = bench_batches(
            torch, device, lambda x: clip_features(torch, model, pixels=x),
            lambda b: torch.randn(b, 3, 224, 224, generator=g).to(device=device, dtype=torch.bfloat16),
            img_b, a.min_s)
        write_json(a.result, result)
        log(f"{kind}: PyTorch bf16 alone, texts of 16 tokens (batches {txt_b})")

        def ids(b):
            x = torch.randint(300, 49000, (b, 16), generator=g)
            x[:, 0], x[:, -1] = 49406, 49407
            return x.to(device)
        r["baseline_text"] = bench_batches(torch, device, lambda x: clip_features(torch, model, ids=x),
                                           ids, txt_b, a.min_s)
        r["baseline_text"]["tokens"] = 16
        r["total_s"] = now() - t0
        write_json(a.result, result)
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------
# MLLM: build, write, references, PyTorch baseline
# --------------------------------------------------------------------------------------

def load_safetensors(path):
    """A safetensors file, or its .xz (the bundle compresses the tiles)."""
    import safetensors.torch
    if os.path.exists(path):
        return safetensors.torch.load_file(path)
    import lzma
    with lzma.open(path + ".xz") as f:
        return safetensors.torch.load(f.read())


def mllm_inputs(torch, np, inputs, size):
    doc = read_json(os.path.join(inputs, f"mllm-{size}.json"))
    tiles = load_safetensors(os.path.join(inputs, f"mllm-{size}-tiles.safetensors"))
    out = []
    for c in doc["cases"]:
        ids = []
        for x in c["ids"]:
            ids += [x] * c["image_tokens"] if x == IMAGE_TOKEN_ID else [x]
        px = None
        if c.get("tiles"):
            px = torch.from_numpy(normalise_tiles(np, tiles[c["tiles"]].numpy()))
        file = os.path.join(inputs, "images", c["file"]) if c.get("file") else None
        out.append(dict(c, ids_full=ids, pixels=px, path=file))
    return out


def mllm_last_hidden(torch, model, device, dtype, case_list):
    """Normalised last-token hidden states (after the final norm), one case at a time."""
    F = torch.nn.functional
    res = []
    with torch.inference_mode():
        for c in case_list:
            ids = torch.tensor([c["ids_full"]], device=device)
            kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
            if c["pixels"] is not None:
                kw["pixel_values"] = c["pixels"][None].to(device=device, dtype=dtype)
                kw["image_sizes"] = torch.tensor([c["image_size"]], device=device)
            out = model(**kw)
            res.append(F.normalize(out.logits[0, -1].float(), dim=0).tolist())
    return res


def strip_lm_head(torch, model):
    """Replaces lm_head (4.x: language_model.lm_head, 5.x: lm_head) by an
    identity: the 'logits' are then the final-norm hidden states."""
    for name, mod in list(model.named_modules()):
        if name.endswith("lm_head") and isinstance(mod, torch.nn.Linear):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], torch.nn.Identity())
            return name
    raise RuntimeError("no lm_head found")


def cmd_make_mllm(a):
    import numpy as np
    import torch
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration
    set_precise(torch)
    device = a.device
    result = read_json(a.result, {}) or {}
    result.update({"versions": versions(), "device": device, "size": a.size})
    r = result.setdefault("mllm", {})
    t0 = now()
    out = os.path.join(a.out, "bge-vl-mllm")
    os.makedirs(out, exist_ok=True)
    cfgd = mllm_config_dict(a.size)
    torch.manual_seed(5101)
    model = build_on(torch, LlavaNextForConditionalGeneration, LlavaNextConfig.from_dict(cfgd), device,
                     torch.bfloat16)
    sync(torch, device)
    r["build_s"] = now() - t0
    r["parameters"] = sum(p.numel() for p in model.parameters())
    log(f"mllm: {r['parameters'] / 1e9:.3f}B parameters built in {r['build_s']:.1f} s")
    t1 = now()
    items = [(hf_layout(n), t) for n, t in model.state_dict().items()]
    r["weights_bytes"] = write_weights(out, items, int(a.shard_gb * 1000 ** 3), threads=a.write_threads)
    del items
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfgd, f, indent=2)
    tiny = os.path.join(FIX, "mllm-tiny-a")
    for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        copy_real(os.path.join(tiny, n), os.path.join(out, n))
    with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
        json.dump(mllm_preprocessor_dict(a.size), f, indent=2)
    proc = read_json(os.path.join(tiny, "processor_config.json"))
    proc["patch_size"] = cfgd["vision_config"]["patch_size"]
    with open(os.path.join(out, "processor_config.json"), "w") as f:
        json.dump(proc, f, indent=2)
    r["write_s"] = now() - t1
    r["dir"] = out
    r["write_gb_per_s"] = r["weights_bytes"] / 1e9 / max(r["write_s"], 1e-6)
    log(f"mllm: {r['weights_bytes'] / 1e9:.2f} GB written to {out} in {r['write_s']:.1f} s "
        f"({r['write_gb_per_s']:.2f} GB/s)")
    write_json(a.result, result)

    t2 = now()
    lm_head = strip_lm_head(torch, model)
    cases = mllm_inputs(torch, np, a.inputs, a.size)
    ref_doc = lambda vecs, dt: {"model": "bge-vl-mllm", "dtype": dt, "cases": [
        {"role": c["role"], "instruction": c["instruction"], "text": c["text"], "file": c["path"],
         "embedding": v} for c, v in zip(cases, vecs)]}
    bf16 = mllm_last_hidden(torch, model, device, torch.bfloat16, cases)
    write_json(os.path.join(out, "ref-bf16.json"), ref_doc(bf16, "bf16"))
    r["reference_bf16_s"] = now() - t2
    r["lm_head_replaced"] = lm_head
    log(f"mllm: bf16 references ({len(cases)} cases) in {r['reference_bf16_s']:.1f} s")
    write_json(a.result, result)

    # composed queries/s of the PyTorch bf16 model alone (same prompt and image in every row)
    comp = next(c for c in cases if c["pixels"] is not None and c["text"])
    log(f"mllm: PyTorch bf16 alone, composed queries of {len(comp['ids_full'])} tokens "
        f"(batches {a.batches})")

    def make(b):
        ids = torch.tensor([comp["ids_full"]] * b, device=device)
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                    pixel_values=comp["pixels"][None].expand(b, *comp["pixels"].shape).to(
                        device=device, dtype=torch.bfloat16).contiguous(),
                    image_sizes=torch.tensor([comp["image_size"]] * b, device=device))
    r["baseline_composed"] = bench_batches(torch, device, lambda kw: model(**kw), make,
                                           [int(x) for x in a.batches.split(",")], a.min_s)
    r["baseline_composed"]["tokens"] = len(comp["ids_full"])
    write_json(a.result, result)

    if not a.no_f32:
        t3 = now()
        model = model.float()
        f32 = mllm_last_hidden(torch, model, device, torch.float32, cases)
        write_json(os.path.join(out, "ref-f32.json"), ref_doc(f32, "f32"))
        c = [cos(x, y) for x, y in zip(f32, bf16)]
        r["torch_bf16_vs_f32"] = {"cases": len(c), "min_cosine": min(c)}
        r["reference_f32_s"] = now() - t3
        log(f"mllm: f32 references in {r['reference_f32_s']:.1f} s; PyTorch's own bf16 vs f32: "
            f"min cosine {min(c):.6f}")
    r["total_s"] = now() - t0
    write_json(a.result, result)


# --------------------------------------------------------------------------------------
# parity through the server
# --------------------------------------------------------------------------------------

def cmd_parity(a):
    import urllib.error
    import urllib.request
    import check_reference
    refs = []
    for spec in a.reference:
        name, path = spec.split("=", 1)
        refs.append((name, read_json(path)))
    todo = check_reference.cases(refs[0][1])
    row = {"model": a.model, "label": a.label, "dtype": a.dtype, "device": a.device, "cases": len(todo),
           "against": {}}
    if a.error:  # the model could not be served: a row that says so
        row.update(status="error", error=a.error)
        rows = read_json(a.result, []) or []
        rows.append(row)
        write_json(a.result, rows)
        log(f"parity {a.label} {a.dtype} on {a.device}: {a.error}")
        return 1
    try:
        body = {"model": a.model, "inputs": [c[1] for c in todo]}
        req = urllib.request.Request(a.url.rstrip("/") + "/embed", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        t0 = now()
        with urllib.request.urlopen(req, timeout=a.timeout) as resp:
            got = json.load(resp)["embeddings"]
        row["request_s"] = now() - t0
        for name, ref in refs:
            want = check_reference.cases(ref)
            assert [w[0] for w in want] == [t[0] for t in todo], f"{name}: different cases"
            worst_c, worst_d, worst_case = 1.0, 0.0, None
            for (label, _, w), g in zip(want, got):
                x, y = unit(g), unit(w)
                c = sum(p * q for p, q in zip(x, y))
                d = max(abs(p - q) for p, q in zip(x, y))
                if c < worst_c:
                    worst_c, worst_case = c, label
                worst_d = max(worst_d, d)
            row["against"][name] = {"min_cosine": worst_c, "max_abs_diff": worst_d, "worst_case": worst_case}
        row["status"] = "ok"
    except urllib.error.HTTPError as e:
        row.update(status="error", error=f"/embed {e.code}: {e.read().decode(errors='replace')[:300]}")
    except Exception as e:  # noqa: BLE001 - recorded in the report
        row.update(status="error", error=f"{type(e).__name__}: {e}"[:400])
    rows = read_json(a.result, []) or []
    rows.append(row)
    write_json(a.result, rows)
    for name, v in row.get("against", {}).items():
        log(f"parity {a.label} {a.dtype} on {a.device} vs {name}: {row['cases']} cases, min cosine "
            f"{v['min_cosine']:.7f}, max |diff| {v['max_abs_diff']:.2e} (worst: {v['worst_case']})")
    if row["status"] != "ok":
        log(f"parity {a.label} {a.dtype}: {row['error']}")
        return 1
    return 0


# --------------------------------------------------------------------------------------
# one load level
# --------------------------------------------------------------------------------------

def parse_metrics(path):
    """{(name, labels-string): value} of a Prometheus text file."""
    out = {}
    try:
        with open(path) as f:
            for line in f:
                if not line or line[0] == "#":
                    continue
                m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
                if m:
                    try:
                        out[(m.group(1), m.group(2) or "")] = float(m.group(3))
                    except ValueError:
                        pass
    except OSError:
        pass
    return out


def msum(metrics, name, **labels):
    s = 0.0
    for (n, lab), v in metrics.items():
        if n != name:
            continue
        if all(f'{k}="{val}"' in lab for k, val in labels.items()):
            s += v
    return s


def batch_hist(before, after, model):
    """Per-bucket counts of vlembed_batch_size formed between two snapshots."""
    cum = []
    for (n, lab), v in after.items():
        if n == "vlembed_batch_size_bucket" and f'model="{model}"' in lab:
            le = re.search(r'le="([^"]+)"', lab).group(1)
            cum.append((float("inf") if le == "+Inf" else float(le), v - before.get((n, lab), 0.0)))
    cum.sort()
    hist, prev = {}, 0.0
    for le, c in cum:
        if c - prev > 0:
            hist["+Inf" if le == float("inf") else f"<={le:g}"] = int(round(c - prev))
        prev = c
    return hist


def cmd_load(a):
    lg = read_json(a.loadgen_json, {}) or {}
    m0, m1 = parse_metrics(a.metrics_before), parse_metrics(a.metrics_after)
    d = lambda name, **lab: msum(m1, name, model=a.model, **lab) - msum(m0, name, model=a.model, **lab)
    main = lg.get("main", {})
    wall = float(a.t1) - float(a.t0)
    row = {
        "model": a.model, "family": a.family, "dtype": a.dtype, "device": a.device, "modality": a.modality,
        "concurrency": int(a.concurrency), "threads": lg.get("threads"), "wall_s": wall,
        "requests": main.get("requests"), "ok": main.get("ok"), "errors": main.get("errors", {}),
        "per_s": main.get("throughput_per_s"), "latency_ms": main.get("latency_ms", {}),
        "client_cpu_cores": (lg.get("client_cpu") or {}).get("cores"),
    }
    batches = d("vlembed_batch_size_count")
    row["batches"] = {"count": int(batches), "mean": d("vlembed_batch_size_sum") / batches if batches else None,
                      "hist": batch_hist(m0, m1, a.model)}
    pre_s = d("vlembed_preprocess_duration_seconds_sum")
    pre_n = d("vlembed_preprocess_duration_seconds_count")
    inf_s = d("vlembed_inference_duration_seconds_sum")
    row["preprocess"] = {"seconds": pre_s, "inputs": int(pre_n), "ms_per_input": pre_s / pre_n * 1e3 if pre_n else None,
                         "busy_slots": pre_s / wall if wall > 0 else None, "slots": int(a.preprocess_threads)}
    row["inference"] = {"seconds": inf_s, "busy_fraction": inf_s / wall if wall > 0 else None,
                        "ms_per_batch": inf_s / batches * 1e3 if batches else None}
    ticks = (int(a.ticks1) - int(a.ticks0)) if a.ticks0 and a.ticks1 else None
    row["server_cpu_cores"] = ticks / int(a.hz) / wall if ticks is not None and wall > 0 else None
    try:  # the whole machine: "busy idle" jiffies before and after
        b0, i0 = (int(x) for x in a.machine_stat0.split())
        b1, i1 = (int(x) for x in a.machine_stat1.split())
        row["machine_cpu_busy"] = (b1 - b0) / ((b1 - b0) + (i1 - i0))
    except (ValueError, ZeroDivisionError):
        row["machine_cpu_busy"] = None
    # GPU samples: "mem_used_mib util_pct proc_mem_mib" per line
    mem, util, pmem = [], [], []
    try:
        for line in open(a.gpu_samples):
            p = line.split()
            if len(p) >= 2:
                mem.append(float(p[0]))
                util.append(float(p[1]))
            if len(p) >= 3 and p[2] not in ("", "-"):
                pmem.append(float(p[2]))
    except (OSError, ValueError):
        pass
    row["gpu"] = {"samples": len(util), "util_mean_pct": sum(util) / len(util) if util else None,
                  "mem_used_max_mib": max(mem) if mem else None, "server_mem_max_mib": max(pmem) if pmem else None}
    row["bottleneck"] = bottleneck(row, int(a.cores))
    rows = read_json(a.result, []) or []
    rows.append(row)
    write_json(a.result, rows)
    lat = row["latency_ms"]
    log(f"{a.family} {a.dtype} {a.modality} x{a.concurrency}: {fmt(row['per_s'], 1)}/s, p50 {fmt(lat.get('p50'), 1)} "
        f"ms, p99 {fmt(lat.get('p99'), 1)} ms, errors {row['errors'] or 0}, batch mean "
        f"{fmt(row['batches']['mean'], 1)}, preprocess {fmt(row['preprocess']['ms_per_input'], 2)} ms/input "
        f"({fmt(row['preprocess']['busy_slots'], 1)} of {a.preprocess_threads} slots busy), inference busy "
        f"{fmt(row['inference']['busy_fraction'], 2)}, server CPU {fmt(row['server_cpu_cores'], 1)} cores -> "
        f"{row['bottleneck']}")


def bottleneck(row, cores):
    """Which resource the level ran out of, from the server's own counters."""
    inf = row["inference"]["busy_fraction"] or 0.0
    pre = row["preprocess"]
    cpu = row["server_cpu_cores"] or 0.0
    client = row["client_cpu_cores"] or 0.0
    threads = row.get("threads") or 1
    if inf >= 0.85:
        return "model (the worker computed batches {:.0%} of the time)".format(inf)
    if pre["slots"] and (pre["busy_slots"] or 0) >= 0.85 * pre["slots"]:
        return "preprocessing ({:.1f} of {} slots busy)".format(pre["busy_slots"], pre["slots"])
    if cpu >= 0.85 * cores:
        return "CPU ({:.1f} of {} cores)".format(cpu, cores)
    if (row.get("machine_cpu_busy") or 0) >= 0.9:
        return "CPU (the machine's {} cores {:.0%} busy; the server used {:.1f})".format(
            cores, row["machine_cpu_busy"], cpu)
    if client >= 0.85 * threads:
        return "load generator ({:.2f} cores of {} threads)".format(client, threads)
    return "none saturated (latency-bound: too few requests in flight)"


def fmt(v, digits=2):
    if v is None or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))):
        return "-"
    return f"{v:,.{digits}f}"


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------

TARGETS = {
    "base_images_per_s": 3000.0,
    "base_images_vs_torch": 0.8,
    "base_texts_per_s": 20000.0,
    "mllm_composed_per_s": 8.0,
    "parity_f32_cosine": 0.99999,
    "parity_bf16_cosine": 0.999,
    "preprocess_ms_per_image_core": 3.5,
}


def best(rows, **where):
    sel = [r for r in rows if all(r.get(k) == v for k, v in where.items()) and r.get("per_s")]
    return max(sel, key=lambda r: r["per_s"]) if sel else None


def targets(doc):
    rows, par = doc.get("throughput", []), doc.get("parity", [])
    prep = doc.get("prep", {})
    dry = doc.get("meta", {}).get("mode") == "dry-run"
    out = []

    def add(name, value, bound, ok, note=""):
        verdict = "no data" if value is None else ("meets" if ok else "misses")
        if dry and value is not None:
            verdict = f"(dry run: {verdict})"
        out.append({"target": name, "value": value, "bound": bound, "verdict": verdict, "note": note})

    bi = best(rows, family="base", modality="image")
    add("BGE-VL-base bf16 single-image requests/s", bi and bi["per_s"], TARGETS["base_images_per_s"],
        bi and bi["per_s"] >= TARGETS["base_images_per_s"],
        f"best at {bi['concurrency']} clients; target stated for an H100" if bi else "")
    torch_img = (prep.get("base") or {}).get("baseline_image", {}).get("best_per_s")
    ratio = bi["per_s"] / torch_img if bi and torch_img else None
    add("BGE-VL-base images / PyTorch bf16 model alone (best batch)", ratio, TARGETS["base_images_vs_torch"],
        ratio is not None and ratio >= TARGETS["base_images_vs_torch"],
        f"PyTorch {torch_img:,.0f}/s at batch {prep['base']['baseline_image']['best_batch']} (forward only, "
        f"tensors on the device)" if torch_img else "")
    bt = best(rows, family="base", modality="text")
    add("BGE-VL-base bf16 single-text requests/s", bt and bt["per_s"], TARGETS["base_texts_per_s"],
        bt and bt["per_s"] >= TARGETS["base_texts_per_s"], f"best at {bt['concurrency']} clients" if bt else "")
    mc = best(rows, family="mllm", modality="composed")
    add("BGE-VL-MLLM composed queries/s", mc and mc["per_s"], TARGETS["mllm_composed_per_s"],
        mc and mc["per_s"] >= TARGETS["mllm_composed_per_s"], f"best at {mc['concurrency']} clients" if mc else "")
    gpu = [p for p in par if p.get("status") == "ok" and not p.get("control")]
    f32 = [(p["against"]["reference"]["min_cosine"], p["label"]) for p in gpu
           if p["dtype"] == "f32" and "reference" in p["against"]]
    if f32:
        v, lab = min(f32)
        add("parity f32 (min cosine, every model)", v, TARGETS["parity_f32_cosine"],
            v >= TARGETS["parity_f32_cosine"], f"worst: {lab}")
    else:
        add("parity f32 (min cosine, every model)", None, TARGETS["parity_f32_cosine"], False)
    b16 = [(p["against"]["reference"]["min_cosine"], p["label"]) for p in gpu
           if p["dtype"] == "bf16" and p.get("full") and "reference" in p["against"]]
    if b16:
        v, lab = min(b16)
        add("parity bf16 (min cosine, full-size models vs PyTorch f32)", v, TARGETS["parity_bf16_cosine"],
            v >= TARGETS["parity_bf16_cosine"], f"worst: {lab}; fixtures in bf16 are listed apart (tiny "
            "random models with sharp attention: PyTorch itself gets 0.97 on mllm-tiny-a)")
    else:
        add("parity bf16 (min cosine, full-size models vs PyTorch f32)", None, TARGETS["parity_bf16_cosine"], False)
    if bi:
        pre = bi["preprocess"]
        ms = pre["ms_per_input"]
        slots = pre["slots"]
        cap = slots / ms * 1e3 if ms else None
        note = (f"{ms:.2f} ms per image per slot, {slots} slots: at most {cap:,.0f} images/s from "
                f"preprocessing; {pre['busy_slots']:.1f} slots busy at {bi['per_s']:,.0f}/s; bottleneck: "
                f"{bi['bottleneck']}") if ms else ""
        add("preprocessing per 640x480 JPEG (ms per image per core)", ms,
            TARGETS["preprocess_ms_per_image_core"], ms is not None and ms <= TARGETS["preprocess_ms_per_image_core"],
            note)
        if ms:
            b = bi["bottleneck"]
            if b.startswith("preprocessing") or bi["per_s"] >= 0.85 * cap:
                answer = f"yes: {bi['per_s']:,.0f}/s is {bi['per_s'] / cap:.0%} of what {slots} slots can preprocess"
            elif b.startswith("model"):
                answer = "no: the model (GPU worker) is"
            else:
                answer = f"no: {b}"
            out.append({"target": "is preprocessing the bound? (base, best image level)", "value": None,
                        "bound": "", "verdict": answer, "note": f"{bi['concurrency']} clients"})
    return out


def md_table(head, rows):
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def render(doc):
    m = doc.get("meta", {})
    L = [f"# vlembed GPU check ({m.get('mode', '?')}, {m.get('started', '?')})", ""]
    L += [f"- machine: {m.get('gpu', '-')}; driver {m.get('driver', '-')}; CUDA (driver) {m.get('cuda', '-')}; "
          f"{m.get('cores', '-')} cores ({m.get('cpu', '-')}), {m.get('mem_gib', '-')} GiB",
          f"- binary: {m.get('binary', '-')}",
          f"- bundle: {m.get('bundle', '-')}",
          f"- host Python: {m.get('python', '-')}; torch {m.get('torch', '-')}, transformers "
          f"{m.get('transformers', '-')}",
          f"- model files on {m.get('models_dir', '-')}; CUDA libraries from {m.get('cuda_libs', '-')}",
          f"- budget {m.get('budget_s', '-')} s; took {fmt(m.get('elapsed_s'), 0)} s; commit {m.get('commit', '-')}",
          ""]
    L += ["## Targets", ""]
    L += md_table(["target", "value", "bound", "verdict", "note"],
                  [[t["target"], fmt(t["value"], 7 if "cosine" in t["target"] else 2 if "/ PyTorch" in t["target"]
                                     or "ms per" in t["target"] else 1),
                    t["bound"], t["verdict"], t["note"]] for t in doc.get("targets", [])])
    L += ["", "## Phases", ""]
    L += md_table(["phase", "status", "seconds", "note"],
                  [[p["phase"], p["status"], fmt(p.get("seconds"), 1), p.get("note", "")] for p in doc.get("phases", [])])
    prep = doc.get("prep", {})
    if prep:
        L += ["", "## Models made on the host", ""]
        rows = []
        for k in ("base", "large", "mllm"):
            r = prep.get(k)
            if r:
                rows.append([k, fmt((r.get("parameters") or 0) / 1e6, 1) + " M", fmt(r.get("build_s"), 1),
                             fmt((r.get("weights_bytes") or 0) / 1e9, 2) + " GB", fmt(r.get("write_s"), 1),
                             fmt(r.get("load_s"), 1),
                             fmt((r.get("torch_bf16_vs_f32") or {}).get("min_cosine"), 6)])
        L += md_table(["model", "parameters", "build s", "weights", "write s", "vlembed load s (start to /ready)",
                       "PyTorch bf16 vs f32 (min cosine)"], rows)
    par = doc.get("parity", [])
    if par:
        L += ["", "## Parity (/embed on the server vs the reference: min cosine, max |diff| of normalised vectors)", ""]
        rows = []
        for p in par:
            if p.get("status") != "ok":
                rows.append([p.get("label"), p.get("dtype"), p.get("device"), p.get("cases"), "error", p.get("error", ""),
                             "", ""])
                continue
            for name, v in p["against"].items():
                bound = TARGETS["parity_f32_cosine"] if p["dtype"] == "f32" else TARGETS["parity_bf16_cosine"]
                if name != "reference":
                    verdict = "context"  # against PyTorch's own bf16: not a target
                elif p["dtype"] != "f32" and not p.get("full"):
                    verdict = "context: tiny fixture in bf16 (compare the cpu control)"
                else:
                    verdict = ("meets" if v["min_cosine"] >= bound else "MISSES") + f" >= {bound}"
                rows.append([p["label"], p["dtype"], p["device"] + (" (control)" if p.get("control") else ""),
                             p["cases"], name, f"{v['min_cosine']:.7f}", f"{v['max_abs_diff']:.2e}",
                             f"{verdict}; worst {v['worst_case']}"])
        L += md_table(["model", "dtype", "device", "cases", "against", "min cosine", "max abs diff", "target"], rows)
    thr = doc.get("throughput", [])
    if thr:
        L += ["", "## Throughput (cache off, one input per request, closed-loop clients)", ""]
        rows = []
        for r in thr:
            lat = r.get("latency_ms", {})
            errs = ", ".join(f"{k}: {v}" for k, v in (r.get("errors") or {}).items()) or "0"
            hist = " ".join(f"{k}:{v}" for k, v in r["batches"]["hist"].items())
            rows.append([r["family"], r["dtype"], r["modality"], r["concurrency"], fmt(r["per_s"], 1),
                         fmt(lat.get("p50"), 1), fmt(lat.get("p99"), 1), errs, fmt(r["batches"]["mean"], 1), hist,
                         fmt(r["gpu"]["server_mem_max_mib"] or r["gpu"]["mem_used_max_mib"], 0),
                         fmt(r["gpu"]["util_mean_pct"], 0), fmt(r["preprocess"]["ms_per_input"], 2),
                         f"{fmt(r['preprocess']['busy_slots'], 1)}/{r['preprocess']['slots']}",
                         fmt(r["inference"]["busy_fraction"], 2), fmt(r["server_cpu_cores"], 1),
                         fmt(r["client_cpu_cores"], 2),
                         fmt(100 * r["machine_cpu_busy"], 0) if r.get("machine_cpu_busy") is not None else "-",
                         r["bottleneck"]])
        L += md_table(["model", "dtype", "inputs", "clients", "per s", "p50 ms", "p99 ms", "errors", "mean batch",
                       "batches formed", "GPU MiB", "GPU util %", "preprocess ms/input", "preprocess slots busy",
                       "inference busy", "server CPU cores", "client CPU cores", "machine CPU busy %",
                       "bottleneck"], rows)
    if prep:
        L += ["", "## PyTorch bf16 model alone (same GPU, same call; forward only, inputs already on the device)", ""]
        rows = []
        for k, key, what in (("base", "baseline_image", "images 224px"), ("base", "baseline_text", "texts, 16 tokens"),
                             ("large", "baseline_image", "images 224px"), ("large", "baseline_text", "texts, 16 tokens"),
                             ("mllm", "baseline_composed", "composed queries")):
            b = (prep.get(k) or {}).get(key)
            if b:
                per = ", ".join(f"{bs}: {fmt(v.get('per_s'), 1)}" for bs, v in b["by_batch"].items())
                rows.append([k, what, b.get("best_batch"), fmt(b.get("best_per_s"), 1), per])
        L += md_table(["model", "inputs", "best batch", "per s", "per s by batch"], rows)
    notes = doc.get("notes", [])
    if notes:
        L += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(L) + "\n"


def cmd_report(a):
    w = a.work
    doc = {"meta": read_json(os.path.join(w, "meta.json"), {}) or {}}
    phases = []
    try:
        for line in open(os.path.join(w, "phases.tsv")):
            p = line.rstrip("\n").split("\t")
            if len(p) >= 3:
                phases.append({"phase": p[0], "status": p[1], "seconds": float(p[2]) if p[2] else None,
                               "note": p[3] if len(p) > 3 else ""})
    except OSError:
        pass
    doc["phases"] = phases
    prep = {}
    for f in ("prep-clip.json", "prep-mllm.json"):
        d = read_json(os.path.join(w, "results", f), {}) or {}
        for k in ("base", "large", "mllm"):
            if k in d:
                prep[k] = d[k]
        if d.get("versions"):
            doc["meta"].setdefault("torch", d["versions"].get("torch"))
            doc["meta"].setdefault("transformers", d["versions"].get("transformers"))
    try:
        for line in open(os.path.join(w, "results", "load-times.tsv")):
            k, v = line.split()[:2]
            prep.setdefault(k, {})["load_s"] = float(v)
    except (OSError, ValueError):
        pass
    doc["prep"] = prep
    doc["parity"] = read_json(os.path.join(w, "results", "parity.json"), []) or []
    doc["throughput"] = read_json(os.path.join(w, "results", "throughput.json"), []) or []
    try:
        doc["notes"] = [l.strip() for l in open(os.path.join(w, "notes.txt")) if l.strip()]
    except OSError:
        doc["notes"] = []
    doc["targets"] = targets(doc)
    os.makedirs(a.out, exist_ok=True)
    write_json(os.path.join(a.out, "gpu-check.json"), doc)
    md = render(doc)
    with open(os.path.join(a.out, "gpu-check.md"), "w") as f:
        f.write(md)
    if a.print:  # the head of the report (machine, targets, phases): the rest is in the file
        sys.stdout.write(md.split("\n## Models made on the host")[0].split("\n## Parity")[0])


def cmd_selftest(a):
    """The report path on synthetic results (standard library only; CI runs it
    so that the part every GPU run depends on cannot rot)."""
    import tempfile
    with tempfile.TemporaryDirectory() as w:
        os.makedirs(os.path.join(w, "results"))
        os.makedirs(os.path.join(w, "logs"))
        write_json(os.path.join(w, "meta.json"), {"mode": "selftest", "started": "now", "budget_s": 1})
        with open(os.path.join(w, "phases.tsv"), "w") as f:
            f.write("setup\tok\t1.0\t\nparity\ttimeout\t9.0\tstopped\n")
        base = {"parameters": 1e8, "build_s": 1, "weights_bytes": 1e9, "write_s": 1,
                "torch_bf16_vs_f32": {"min_cosine": 0.9999},
                "baseline_image": {"by_batch": {"64": {"per_s": 5000.0}}, "best_batch": 64, "best_per_s": 5000.0},
                "baseline_text": {"by_batch": {"256": {"per_s": 9e4}}, "best_batch": 256, "best_per_s": 9e4}}
        write_json(os.path.join(w, "results", "prep-clip.json"), {"base": base, "versions": {"torch": "t"}})
        with open(os.path.join(w, "results", "load-times.tsv"), "w") as f:
            f.write("base 2.5\n")
        write_json(os.path.join(w, "results", "parity.json"), [
            {"model": "m", "label": "clip-tiny", "dtype": "f32", "device": "cuda:0", "cases": 3, "status": "ok",
             "against": {"reference": {"min_cosine": 0.999999, "max_abs_diff": 1e-6, "worst_case": "x"}}},
            {"model": "m", "label": "bge-vl-base (full size)", "dtype": "bf16", "device": "cuda:0", "cases": 3,
             "status": "ok", "full": True,
             "against": {"reference": {"min_cosine": 0.9995, "max_abs_diff": 1e-3, "worst_case": "y"}}},
            {"model": "m", "label": "mllm", "dtype": "bf16", "device": "cuda:0", "cases": 3, "status": "error",
             "error": "boom"}])
        m0 = os.path.join(w, "m0.txt")
        m1 = os.path.join(w, "m1.txt")
        with open(m0, "w") as f:
            f.write('vlembed_batch_size_bucket{model="b",le="1"} 1\nvlembed_batch_size_bucket{model="b",le="64"} 1\n'
                    'vlembed_batch_size_bucket{model="b",le="+Inf"} 1\nvlembed_batch_size_sum{model="b"} 1\nvlembed_batch_size_count{model="b"} 1\n')
        with open(m1, "w") as f:
            f.write('# HELP x\nvlembed_batch_size_bucket{model="b",le="1"} 1\n'
                    'vlembed_batch_size_bucket{model="b",le="64"} 11\nvlembed_batch_size_bucket{model="b",le="+Inf"} 11\n'
                    'vlembed_batch_size_sum{model="b"} 401\nvlembed_batch_size_count{model="b"} 11\n'
                    'vlembed_preprocess_duration_seconds_sum{model="b",modality="image"} 1.4\n'
                    'vlembed_preprocess_duration_seconds_count{model="b",modality="image"} 400\n'
                    'vlembed_inference_duration_seconds_sum{model="b"} 0.5\n')
        lg = os.path.join(w, "lg.json")
        write_json(lg, {"threads": 4, "main": {"requests": 400, "ok": 400, "errors": {}, "throughput_per_s": 3500.0,
                                               "latency_ms": {"p50": 1, "p99": 2}}, "client_cpu": {"cores": 0.5}})
        samples = os.path.join(w, "gpu.txt")
        with open(samples, "w") as f:
            f.write("1000 50 900\n2000 70 -\n")
        ns = argparse.Namespace(result=os.path.join(w, "results", "throughput.json"), loadgen_json=lg,
                                metrics_before=m0, metrics_after=m1, gpu_samples=samples, model="b",
                                family="base", dtype="bf16", device="cuda:0", modality="image", concurrency="64",
                                t0="0", t1="1", ticks0="0", ticks1="800", hz="100", cores="16",
                                preprocess_threads="16", machine_stat0="100 900", machine_stat1="500 1000")
        cmd_load(ns)
        row = read_json(ns.result)[0]
        assert row["batches"] == {"count": 10, "mean": 40.0, "hist": {"<=64": 10}}, row["batches"]
        assert abs(row["preprocess"]["ms_per_input"] - 3.5) < 1e-9 and row["gpu"]["server_mem_max_mib"] == 900
        cmd_report(argparse.Namespace(work=w, out=os.path.join(w, "out"), print=False))
        md = open(os.path.join(w, "out", "gpu-check.md")).read()
        doc = read_json(os.path.join(w, "out", "gpu-check.json"))
        for h in ("## Targets", "## Phases", "## Parity", "## Throughput", "## PyTorch bf16 model alone"):
            assert h in md, h
        t = {x["target"].split(" (")[0]: x for x in doc["targets"]}
        assert t["BGE-VL-base bf16 single-image requests/s"]["verdict"].endswith("meets)") or \
            t["BGE-VL-base bf16 single-image requests/s"]["verdict"] == "meets", t
        assert t["BGE-VL-base images / PyTorch bf16 model alone"]["verdict"] == "misses"
        assert t["BGE-VL-MLLM composed queries/s"]["verdict"] == "no data"
    print("gpu_check.py selftest: ok")


# --------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--compress", action="store_true", help="the tiles as .xz")
    p = sub.add_parser("make-clip")
    p.add_argument("--size", choices=["full", "small"], required=True)
    p.add_argument("--kinds", default="base,large")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--result", required=True)
    p.add_argument("--image-batches", default="64,128,256,512")
    p.add_argument("--text-batches", default="64,256,1024")
    p.add_argument("--min-s", type=float, default=1.0)
    p = sub.add_parser("make-mllm")
    p.add_argument("--size", choices=["full", "small"], required=True)
    p.add_argument("--inputs", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--result", required=True)
    p.add_argument("--batches", default="1,4,8,16")
    p.add_argument("--min-s", type=float, default=1.0)
    p.add_argument("--shard-gb", type=float, default=4.0)
    p.add_argument("--write-threads", type=int, default=4)
    p.add_argument("--no-f32", action="store_true")
    p = sub.add_parser("parity")
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--label", required=True)
    p.add_argument("--dtype", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--reference", action="append", required=True, help="NAME=FILE; the first one's cases are sent")
    p.add_argument("--result", required=True)
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--control", action="store_true")
    p.add_argument("--full", action="store_true")
    p.add_argument("--error", default="", help="record this error instead of asking the server")
    p = sub.add_parser("load")
    for k in ("result", "loadgen-json", "metrics-before", "metrics-after", "gpu-samples", "model", "family",
              "dtype", "device", "modality", "concurrency", "t0", "t1", "ticks0", "ticks1", "hz", "cores",
              "preprocess-threads", "machine-stat0", "machine-stat1"):
        p.add_argument("--" + k, default="")
    p = sub.add_parser("report")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--print", action="store_true")
    sub.add_parser("selftest")
    a = ap.parse_args()
    if a.cmd == "parity":
        rc = cmd_parity(a)
        # mark control / full rows (kept out of the targets)
        rows = read_json(a.result, [])
        rows[-1]["control"] = a.control
        rows[-1]["full"] = a.full
        write_json(a.result, rows)
        return rc
    return {"pack": cmd_pack, "make-clip": cmd_make_clip, "make-mllm": cmd_make_mllm, "load": cmd_load,
            "report": cmd_report, "selftest": cmd_selftest}[a.cmd](a) or 0


if __name__ == "__main__":
    sys.exit(main())
