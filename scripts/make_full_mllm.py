#!/usr/bin/env python3
"""Write a FULL-SIZE random-weight BGE-VL-MLLM (llava-v1.6-mistral-7b architecture:
CLIP ViT-L/14-336 + GELU projector + Mistral-7B, 7.57B parameters) in the llava-hf
Hub layout, for load-time and memory measurements. Never committed.

    /opt/fixenv/bin/python scripts/make_full_mllm.py --out /tmp/bge-vl-mllm-random [--dtype bf16]

The tensors' names and shapes come from transformers' own model built on the meta
device (no memory); each ~4 GB shard is filled with seeded random values, written
and freed before the next, so the script needs a few GB of RAM, not 15. The
tokenizer, processor and image-processor files are those of the tiny MLLM fixture
(the real Mistral tokenizer) with the real 336px configuration.
"""

import argparse
import json
import os
import shutil
import time

import torch
from safetensors.torch import save_file
from transformers import (CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                          MistralConfig)

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, "..", "tests", "fixtures", "mllm-tiny-a")
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
SHARD_BYTES = 4 * 1000 ** 3


def config():
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14,
                              projection_dim=768, hidden_act="quick_gelu")
    text = MistralConfig(vocab_size=32064, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6,
                         sliding_window=None, tie_word_embeddings=False)
    cfg = LlavaNextConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                          image_token_index=32000, projector_hidden_act="gelu",
                          vision_feature_select_strategy="default", vision_feature_layer=-2,
                          image_grid_pinpoints=PINPOINTS, tie_word_embeddings=False,
                          pad_token_id=32001)
    cfg.architectures = ["LlavaNextForConditionalGeneration"]
    return cfg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f16"])
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    cfg = config()
    cfg.torch_dtype = dtype
    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(cfg)
    shapes = [(n, tuple(p.shape)) for n, p in model.state_dict().items()]
    total = sum(torch.Size(s).numel() for _, s in shapes)
    print(f"{len(shapes)} tensors, {total / 1e9:.2f}B parameters")
    gen = torch.Generator().manual_seed(0)
    shards, current, size = [], [], 0
    for name, shape in shapes:
        nbytes = torch.Size(shape).numel() * 2
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            if name.endswith("norm.weight") or "layernorm" in name or "layer_norm" in name:
                t = torch.ones(shape, dtype=dtype) if name.endswith("weight") else torch.zeros(shape, dtype=dtype)
            else:
                t = (torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02).to(dtype)
            tensors[name] = t
            weight_map[name] = fname
        save_file(tensors, os.path.join(args.out, fname), metadata={"format": "pt"})
        del tensors
        print(f"wrote {fname} ({time.time() - t0:.0f} s)")
    with open(os.path.join(args.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total * 2}, "weight_map": weight_map}, f)
    cfg.save_pretrained(args.out)
    for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(os.path.realpath(os.path.join(TINY, n)), os.path.join(args.out, n))
    pre = json.load(open(os.path.join(TINY, "preprocessor_config.json")))
    pre.update({"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336},
                "image_grid_pinpoints": PINPOINTS})
    json.dump(pre, open(os.path.join(args.out, "preprocessor_config.json"), "w"), indent=2)
    proc = json.load(open(os.path.join(TINY, "processor_config.json")))
    proc["patch_size"] = 14
    json.dump(proc, open(os.path.join(args.out, "processor_config.json"), "w"), indent=2)
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
