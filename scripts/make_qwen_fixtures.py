#!/usr/bin/env python3
"""Make vlembed's Qwen2-VL / Qwen2.5-VL test fixtures: two tiny random-weight models
in the real architectures (transformers 4.51.3), saved in the Hub layout with a
locally trained byte-level BPE tokenizer and the Qwen2-VL chat template, plus
reference embeddings for the three prompt formats vlembed implements.

Writes (and only writes):
    tests/fixtures/qwen-images/                       two small synthetic PNGs
    tests/fixtures/qwen2-vl-tiny/                     Qwen2VLForConditionalGeneration, f32 weights,
                                                      chat template in tokenizer_config.json
    tests/fixtures/qwen25-vl-tiny/                    Qwen2_5_VLForConditionalGeneration, bf16 weights,
                                                      chat template in chat_template.json
    tests/fixtures/reference/qwen2-vl-tiny.json       reference cases (formats chat-template, gme)
    tests/fixtures/reference/qwen25-vl-tiny.json      reference cases (formats chat-template, screenshot)
    tests/fixtures/reference/qwen-vl-pixels.safetensors  pixel values of a few images (both models)

How to run (from the repository root):

    python3.11 -m venv /tmp/qwenenv
    /tmp/qwenenv/bin/pip install -r scripts/requirements-qwen-fixtures.txt
    /tmp/qwenenv/bin/python scripts/make_qwen_fixtures.py

Deterministic: fixed seeds, one CPU thread.

Reference semantics (see tests/fixtures/README.md, "Qwen2-VL / Qwen2.5-VL"):
  chat-template  messages = [system: instruction (a query with one only)] +
                 [user: image (if any), then text (if any)], rendered by the model's chat
                 template with add_generation_prompt=True; M-RoPE positions
                 (get_rope_index); pooled: the last token (the newline after "assistant").
  screenshot     the same, but the user content is the text first, then the image (what
                 could be read of BGE-VL-Screenshot's usage; see the README for what is assumed).
  gme            gme_inference.py (GmeQwen2VL.embed): the prompt
                 "<|im_start|>system\\n{instruction}<|im_end|>\\n<|im_start|>user\\n{image}{text}<|im_end|>\\n"
                 "<|im_start|>assistant\\n<|endoftext|>" with the default instruction
                 "You are a helpful assistant." unless a query has one; the image first resized by
                 qwen_vl_utils' fetch_image (smart_resize factor 28, 4..16384 tokens, ratio clamped
                 to 200), then the processor with min_pixels 256*28*28 / max_pixels 1280*28*28;
                 the decoder called WITHOUT position ids (sequential positions, no M-RoPE);
                 pooled: the last token (<|endoftext|>).
"""

import json
import math
import os
import shutil
import subprocess
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import PIL  # noqa: E402
from PIL import Image  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import tokenizers  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2TokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
IMAGES_REL = "tests/fixtures/images"
QIMAGES_REL = "tests/fixtures/qwen-images"
TORCH_VERSION = torch.__version__.split("+")[0]

SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Qwen2's pre-tokenizer split (tokenizer.json of every Qwen2 / Qwen2-VL / Qwen2.5-VL model).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# The chat template of Qwen/Qwen2-VL-2B-Instruct (also Qwen2.5-VL's): a default system
# message when the first message is not one, images as <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

GME_DEFAULT_INSTRUCTION = "You are a helpful assistant."
GME_MIN_PIXELS = 256 * 28 * 28
GME_MAX_PIXELS = 1280 * 28 * 28
# qwen_vl_utils (as copied into gme_inference.py)
FETCH_FACTOR = 28
FETCH_MIN_PIXELS = 4 * 28 * 28
FETCH_MAX_PIXELS = 16384 * 28 * 28
FETCH_MAX_RATIO = 200

MODELS = {
    "qwen2-vl-tiny": {
        "arch": "qwen2_vl", "seed": 23, "qk_gain": 3.0, "dtype": "float32", "template_in": "tokenizer_config",
        "formats": ["chat-template", "gme"],
        "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 64,
        "text": dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
                     max_position_embeddings=4096, mrope_section=[2, 2, 2]),
        "vision": dict(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2, hidden_act="quick_gelu",
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
    },
    "qwen25-vl-tiny": {
        # q/k gain 2, not 3: with 3 blocks of window attention and 3 decoder layers, gain 3
        # makes attention so sharp that transformers' own f32 result is 1e-4 from its f64 one
        "arch": "qwen2_5_vl", "seed": 25, "qk_gain": 2.0, "dtype": "bfloat16", "template_in": "chat_template_json",
        "formats": ["chat-template", "screenshot"],
        "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 64,
        "text": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
                     max_position_embeddings=4096, mrope_section=[2, 3, 3]),
        # window_size 56 = 2 merged tokens (4x4 patches) per window side; block 1 full attention
        "vision": dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, hidden_act="silu",
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                       window_size=56, fullatt_block_indexes=[1], tokens_per_second=2),
    },
}


# ------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------

def f32list(t):
    return [float(x) for x in t.detach().to(torch.float32).cpu().numpy().astype(np.float32)]


def dump_json(obj, path):
    """JSON with ASCII escapes and scalar lists on one line (like make_fixtures.py)."""

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


# ------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------

def make_images():
    """Two small synthetic RGB PNGs: 182x70 (smart_resize rounds 6.5 and 2.5 half to even)
    and 30x40 (scaled UP to min_pixels)."""
    d = os.path.join(FIXTURES, "qwen-images")
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    rng = np.random.default_rng(1234)
    for (w, h) in [(182, 70), (30, 40)]:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        r = 128 + 100 * np.sin(xx / 7.0) * np.cos(yy / 5.0)
        g = 128 + 90 * np.cos((xx + yy) / 9.0)
        b = 60 + 150 * ((xx // 10 + yy // 10) % 2)
        img = np.stack([r, g, b], -1) + rng.normal(0, 6, (h, w, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").save(
            os.path.join(d, f"rgb_{w}x{h}.png"), optimize=False)


def load_image(rel):
    return Image.open(os.path.join(REPO, rel))


# ------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------

WORDS = ("a the of and to in is on with for photo picture image cat dog dogs cats two three red blue "
         "green black white playing running sitting snow grass beach city street night day man woman "
         "child people car bus train bicycle tree house window screenshot page chart table document "
         "find retrieve represent given query candidate text description instruction assistant user "
         "system helpful you are an that this which matches similar background dark bright camera "
         "taken make it look like show me where what how many price stock closing drop compare model "
         "performance detailed intuitive between").split()
EXTRA = ["You are a helpful assistant.", "Represent the given image with the given query.",
         "Find an image that matches the given text.", "caf\u00e9 na\u00efve r\u00e9sum\u00e9",
         "\u732b\u306e\u5199\u771f", "\u4e00\u4e2a\u5c0f\u732b", "1234567890 3.14 2025", "it's don't we'll I'm",
         "https://example.com/a?b=1", "<b>bold</b>", "\U0001F431 \U0001F436"]


def corpus():
    rng = np.random.default_rng(7)
    lines = []
    for _ in range(3000):
        n = int(rng.integers(3, 14))
        ws = [WORDS[int(i)] for i in rng.integers(0, len(WORDS), n)]
        if rng.random() < 0.3:
            ws[0] = ws[0].capitalize()
        lines.append(" ".join(ws) + (". " if rng.random() < 0.5 else "\n"))
    lines += EXTRA * 20
    return lines


def build_tokenizer(template_in):
    tok = Tokenizer(models.BPE(byte_fallback=False, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=700, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    kw = dict(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
              unk_token=None, bos_token=None, errors="replace", clean_up_tokenization_spaces=False,
              model_max_length=32768, padding_side="left", split_special_tokens=False)
    if template_in == "tokenizer_config":
        kw["chat_template"] = CHAT_TEMPLATE
    return Qwen2TokenizerFast(**kw)


def token_strings():
    return [
        "a photo of a cat", "A PHOTO OF A CAT", "", " ", "  ", "\t", "\n", "\r\n", "a\nb", "a  b",
        "  leading spaces", "trailing spaces   ", "line1\r\nline2\n\nline3",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
        "<|vision_start|><|image_pad|><|vision_end|>", "<|endoftext|>", "<|IM_START|>", "<|im_end|>x",
        "caf\u00e9", "cafe\u0301", "na\u00efve r\u00e9sum\u00e9", "stra\u00dfe", "\u041f\u0440\u0438\u0432\u0435\u0442",
        "\u732b\u306e\u5199\u771f", "\U0001F431", "\U0001F44D\U0001F3FD", "a\u00a0b", "a\u3000b", "a\u200bb",
        "it's", "DON'T", "We'LL", "1234567890", "3.14159", "x86_64", "https://example.com/path?q=1&r=2",
        "<b>bold</b>", "a\x00b", "\ufb01", "Make the background dark, as if the camera has taken the photo at night",
    ]


# ------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------

def build_config(spec, tok):
    ids = {s: tok.convert_tokens_to_ids(s) for s in SPECIALS}
    t = dict(spec["text"])
    mrope = t.pop("mrope_section")
    common = dict(vocab_size=len(tok), tie_word_embeddings=True, hidden_act="silu",
                  rope_scaling={"type": "mrope", "mrope_section": mrope}, use_sliding_window=False,
                  sliding_window=32768, max_window_layers=t["num_hidden_layers"],
                  bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                  pad_token_id=ids["<|endoftext|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                  vision_token_id=ids["<|vision_pad|>"], image_token_id=ids["<|image_pad|>"],
                  video_token_id=ids["<|video_pad|>"], torch_dtype=spec["dtype"], **t)
    v = dict(spec["vision"])
    if spec["arch"] == "qwen2_vl":
        v["hidden_size"] = t["hidden_size"]
        cfg = Qwen2VLConfig(vision_config=v, **common)
        cfg.architectures = ["Qwen2VLForConditionalGeneration"]
    else:
        v["out_hidden_size"] = t["hidden_size"]
        cfg = Qwen2_5_VLConfig(vision_config=v, **common)
        cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return cfg


def rerandomise(model, seed, qk_gain):
    """Weights far from the tiny default init (which makes attention uniform and every
    input look alike): norm weights 1+0.2N, biases 0.2N, linear weights N(0,(g/sqrt(fan_in))^2)
    with gain `qk_gain` for attention q/k (qkv), 2 for v/out, 1.5 for MLPs, 1 for the patch embedding
    and the merger; token embeddings N(0,1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lm_head" in name:
                continue
            if p.dim() == 1:
                if name.endswith(".weight"):
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
                continue
            if "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
                continue
            fan_in = p[0].numel()
            if any(k in name for k in ("q_proj", "k_proj", "attn.qkv")):
                gain = qk_gain
            elif any(k in name for k in ("v_proj", "o_proj", "attn.proj")):
                gain = 2.0
            elif "mlp" in name and "merger" not in name:
                gain = 1.5
            else:
                gain = 1.0
            p.copy_(torch.randn(p.shape, generator=g) * gain / math.sqrt(fan_in))
    model.tie_weights()


def model_class(arch):
    return Qwen2VLForConditionalGeneration if arch == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration


def processor_class(arch):
    return Qwen2VLProcessor if arch == "qwen2_vl" else Qwen2_5_VLProcessor


def write_model(name, spec, out_dir):
    tok = build_tokenizer(spec["template_in"])
    cfg = build_config(spec, tok)
    torch.manual_seed(spec["seed"])
    model = model_class(spec["arch"])(cfg)
    rerandomise(model, spec["seed"], spec["qk_gain"])
    model.eval()
    if spec["dtype"] == "bfloat16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size="100GB")
    ip = Qwen2VLImageProcessor(min_pixels=spec["min_pixels"], max_pixels=spec["max_pixels"],
                               patch_size=14, temporal_patch_size=2, merge_size=2)
    chat = CHAT_TEMPLATE if spec["template_in"] == "chat_template_json" else None
    proc = processor_class(spec["arch"])(image_processor=ip, tokenizer=tok, chat_template=chat)
    proc.save_pretrained(out_dir)
    # tokenizer.json is the tokenizer; vocab.json / merges.txt would only duplicate it
    for n in ("vocab.json", "merges.txt", "added_tokens.json"):
        p = os.path.join(out_dir, n)
        if os.path.exists(p):
            os.remove(p)
    tok.backend_tokenizer.save(os.path.join(out_dir, "tokenizer.json"), pretty=False)
    if spec["template_in"] == "chat_template_json":
        tc_path = os.path.join(out_dir, "tokenizer_config.json")
        tc = json.load(open(tc_path))
        tc.pop("chat_template", None)
        with open(tc_path, "w") as f:
            json.dump(tc, f, indent=2, ensure_ascii=False)
            f.write("\n")
    else:
        assert not os.path.exists(os.path.join(out_dir, "chat_template.json"))


def reload(out_dir, arch, **proc_kw):
    model = model_class(arch).from_pretrained(out_dir, torch_dtype=torch.float32,
                                              attn_implementation="eager").eval()
    proc = processor_class(arch).from_pretrained(out_dir, **proc_kw)
    return model, proc


# ------------------------------------------------------------------------------------
# prompts (see the module doc)
# ------------------------------------------------------------------------------------

def chat_messages(fmt, role, instruction, text, has_image):
    msgs = []
    if role == "query" and instruction is not None:
        msgs.append({"role": "system", "content": instruction})
    content = []
    image = [{"type": "image"}] if has_image else []
    txt = [{"type": "text", "text": text}] if text is not None else []
    content = image + txt if fmt == "chat-template" else txt + image
    msgs.append({"role": "user", "content": content})
    return msgs


def gme_prompt(role, instruction, text, has_image):
    if role != "query" or instruction is None:
        instruction = GME_DEFAULT_INSTRUCTION
    s = "<|vision_start|><|image_pad|><|vision_end|>" if has_image else ""
    if text is not None:
        s += text
    return (f"<|im_start|>system\n{instruction}<|im_end|>\n<|im_start|>user\n{s}<|im_end|>\n"
            f"<|im_start|>assistant\n<|endoftext|>")


def render(fmt, proc, role, instruction, text, has_image):
    if fmt == "gme":
        return gme_prompt(role, instruction, text, has_image)
    msgs = chat_messages(fmt, role, instruction, text, has_image)
    if proc.chat_template is not None:
        return proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return proc.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def fetch_smart_resize(height, width):
    """qwen_vl_utils.smart_resize as gme_inference.py copies it (ratio over 200: clamped)."""
    f = FETCH_FACTOR
    h_bar = max(f, round(height / f) * f)
    w_bar = max(f, round(width / f) * f)
    if h_bar * w_bar > FETCH_MAX_PIXELS:
        beta = math.sqrt((height * width) / FETCH_MAX_PIXELS)
        h_bar = math.floor(height / beta / f) * f
        w_bar = math.floor(width / beta / f) * f
    elif h_bar * w_bar < FETCH_MIN_PIXELS:
        beta = math.sqrt(FETCH_MIN_PIXELS / (height * width))
        h_bar = math.ceil(height * beta / f) * f
        w_bar = math.ceil(width * beta / f) * f
    if max(h_bar, w_bar) / min(h_bar, w_bar) > FETCH_MAX_RATIO:
        if h_bar > w_bar:
            h_bar = w_bar * FETCH_MAX_RATIO
        else:
            w_bar = h_bar * FETCH_MAX_RATIO
    return h_bar, w_bar


def prepare_image(fmt, rel):
    img = load_image(rel)
    if fmt != "gme":
        return img
    img = img.convert("RGB")
    w, h = img.size
    rh, rw = fetch_smart_resize(h, w)
    return img.resize((rw, rh))


# ------------------------------------------------------------------------------------
# reference forward passes
# ------------------------------------------------------------------------------------

class Ref:
    def __init__(self, model, proc, fmt):
        self.model, self.proc, self.fmt = model, proc, fmt
        self.captured = []
        model.model.norm.register_forward_hook(lambda m, i, o: self.captured.append(o))

    def inputs(self, specs, padding_side):
        prompts = [s["prompt"] for s in specs]
        images = [prepare_image(self.fmt, s["file"]) for s in specs if s["file"]]
        self.proc.tokenizer.padding_side = padding_side
        return self.proc(text=prompts, images=images or None, padding=True, return_tensors="pt",
                         images_kwargs={"input_data_format": "channels_last"} if images else {})

    def raw(self, enc):
        """Final-norm hidden state of each row's last real token."""
        self.captured.clear()
        with torch.no_grad():
            if self.fmt == "gme":
                # GmeQwen2VL.forward: image features scattered into the token embeddings, then the
                # decoder WITHOUT position ids; right padding, pooled at the last real token.
                m = self.model
                emb = m.get_input_embeddings()(enc["input_ids"])
                if "pixel_values" in enc:
                    feats = m.visual(enc["pixel_values"], grid_thw=enc["image_grid_thw"])
                    mask = enc["input_ids"] == m.config.image_token_id
                    assert int(mask.sum()) == feats.shape[0]
                    emb[mask] = feats
                out = m.model(input_ids=None, position_ids=None, attention_mask=enc["attention_mask"],
                              inputs_embeds=emb)
                h = out.last_hidden_state
                lens = enc["attention_mask"].sum(1) - 1
                return h[torch.arange(h.shape[0]), lens]
            out = self.model(**enc)
            del out
        h = self.captured[-1]
        assert enc["attention_mask"][:, -1].all(), "chat-template batches are left padded"
        return h[:, -1]


def case_specs():
    img = lambda n: f"{IMAGES_REL}/{n}"  # noqa: E731
    qimg = lambda n: f"{QIMAGES_REL}/{n}"  # noqa: E731
    ins = "Find an image that matches the given text."
    long_text = " ".join(["a detailed description of a busy city street at night with people and cars"] * 8)
    return [
        dict(role="query", instruction=ins, text="a photo of a cat", file=None),
        dict(role="query", instruction=None, text="a photo of a cat", file=None),
        dict(role="candidate", instruction=None, text="Two dogs playing in the snow.", file=None),
        dict(role="candidate", instruction=ins, text="Two dogs playing in the snow.", file=None),
        dict(role="candidate", instruction=None, text=None, file=img("baseline_420_640x480.jpg")),
        dict(role="candidate", instruction=None, text=None, file=qimg("rgb_182x70.png")),
        dict(role="candidate", instruction=None, text=None, file=qimg("rgb_30x40.png")),
        dict(role="query", instruction="Represent the given image.", text=None, file=img("gray_l_wide_1000x40.png")),
        dict(role="query", instruction="Make the background dark.", text="as if at night",
             file=img("rgba_alpha_256x192.png")),
        dict(role="query", instruction=None, text="a tall banner", file=img("palette_trns_tall_40x1000.png")),
        dict(role="candidate", instruction=None, text="a rotated photo", file=img("yuv444_exif_rot6_301x199.jpg")),
        dict(role="query", instruction="Retrieve it.", text="\u732b\u306e\u5199\u771f \U0001F431 caf\u00e9", file=None),
        dict(role="candidate", instruction=None, text=long_text, file=None),
        dict(role="candidate", instruction=None, text="a progressive jpeg", file=img("progressive_480x360.jpg")),
        # under 28 pixels a side: the processor refuses it; gme's fetch_image scales it up first
        dict(role="candidate", instruction=None, text=None, file=img("tiny_5x3.bmp")),
    ]


PIXEL_CASES = {5, 6, 7}  # small pixel tensors kept for the preprocessing parity test


def build_reference(name, spec):
    out_dir = os.path.join(FIXTURES, name)
    doc = {"model": name, "model_dir": f"tests/fixtures/{name}",
           "pixels_file": "tests/fixtures/reference/qwen-vl-pixels.safetensors",
           "generated_by": {"script": "scripts/make_qwen_fixtures.py", "torch": TORCH_VERSION,
                            "transformers": transformers.__version__, "pillow": PIL.__version__,
                            "numpy": np.__version__, "tokenizers": tokenizers.__version__},
           "attn_implementation": "eager", "formats": {}}
    pixels = {}
    facts = {}
    for fmt in spec["formats"]:
        kw = dict(min_pixels=GME_MIN_PIXELS, max_pixels=GME_MAX_PIXELS) if fmt == "gme" else {}
        model, proc = reload(out_dir, spec["arch"], **kw)
        doc["dimensions"] = int(model.config.hidden_size)
        doc["image_token_id"] = int(model.config.image_token_id)
        ref = Ref(model, proc, fmt)
        pad = "right" if fmt == "gme" else "left"
        specs = case_specs()
        cases, raws, ok = [], [], []
        for i, s in enumerate(specs):
            s = dict(s)
            s["prompt"] = render(fmt, proc, s["role"], s["instruction"], s["text"], s["file"] is not None)
            e = {k: s[k] for k in ("role", "instruction", "text", "file", "prompt")}
            try:
                enc = ref.inputs([s], pad)
            except ValueError as err:
                e["error"] = str(err)
                cases.append(e)
                print(f"  [{fmt}] case {i}: refused: {err}")
                continue
            specs[i] = s
            ids = enc["input_ids"][0].tolist()
            raw = ref.raw(enc)[0]
            raws.append(raw)
            ok.append(i)
            e["ids"] = ids
            e["image_tokens"] = ids.count(int(model.config.image_token_id))
            if s["file"]:
                thw = [int(x) for x in enc["image_grid_thw"][0].tolist()]
                e["grid_thw"] = thw
                im = prepare_image(fmt, s["file"])
                e["image_size"] = list(load_image(s["file"]).size)
                e["processed_size"] = [thw[2] * 14, thw[1] * 14]
                if fmt == "gme":
                    e["fetch_size"] = list(im.size)
                pv = enc["pixel_values"].to(torch.float32).contiguous()
                assert pv.shape[0] == thw[0] * thw[1] * thw[2]
                if i in PIXEL_CASES and fmt == "chat-template":
                    key = os.path.basename(s["file"])
                    pixels[key] = pv.clone()
                    e["pixels"] = key
                else:
                    e["pixels"] = None
                e["pixels_sum"] = float(pv.double().sum())
                e["pixels_abs_sum"] = float(pv.double().abs().sum())
            else:
                e["grid_thw"] = None
                e["pixels"] = None
            e["embedding"] = f32list(F.normalize(raw, dim=-1))
            e["embedding_raw"] = f32list(raw)
            cases.append(e)
        # one batch of every case that embeds (padded on the side upstream uses)
        bspecs = [specs[i] for i in ok]
        benc = ref.inputs(bspecs, pad)
        braw = ref.raw(benc)
        bemb = F.normalize(braw, dim=-1)
        diff = max(float((bemb[k] - F.normalize(raws[k], dim=-1)).abs().max()) for k in range(len(ok)))
        print(f"  [{fmt}] {len(ok)} cases embed; batch {list(benc['input_ids'].shape)} max abs diff vs single {diff:.2e}")
        assert diff < 1e-4, diff
        # different inputs give clearly different embeddings (case 3 is case 2 with an
        # instruction, which a candidate ignores: the same prompt)
        m = F.normalize(torch.stack(raws), dim=-1)
        c = m @ m.T
        c.fill_diagonal_(-2)
        key = [(specs[i]["prompt"], specs[i]["file"]) for i in ok]
        for a in range(len(ok)):
            for b in range(len(ok)):
                if key[a] == key[b]:
                    if a != b:
                        assert float((m[a] - m[b]).abs().max()) == 0.0
                    c[a, b] = -2
        j = int(c.argmax())
        print(f"  [{fmt}] max off-diagonal cosine {float(c.max()):.4f} (cases {ok[j // len(ok)]}, {ok[j % len(ok)]})")
        assert float(c.max()) < 0.99
        lens = [len(cases[i]["ids"]) for i in ok]
        print(f"  [{fmt}] prompt lengths {min(lens)}..{max(lens)}; grids "
              f"{sorted(set(tuple(cases[i]['grid_thw']) for i in ok if cases[i]['grid_thw']))}")
        doc["formats"][fmt] = {
            "padding_side": pad,
            "processor_min_pixels": int(proc.image_processor.min_pixels),
            "processor_max_pixels": int(proc.image_processor.max_pixels),
            "cases": cases,
            "batch": {"case_indices": ok, "input_ids_shape": list(benc["input_ids"].shape),
                      "embeddings": [f32list(r) for r in bemb], "max_abs_diff_vs_single": diff},
        }
        facts[fmt] = (model, ref, specs, ok, raws)
    tok = proc.tokenizer
    doc["tokens"] = [{"text": t, "ids": tok(t, add_special_tokens=True).input_ids} for t in token_strings()]
    branch_checks(name, spec, facts)
    return doc, pixels


def branch_checks(name, spec, facts):
    """The configuration branches the fixture is meant to exercise must change the result:
    M-RoPE image positions vs sequential positions, and (Qwen2.5-VL) window vs full attention."""
    model, ref, specs, ok, raws = facts["chat-template"]
    img_cases = [k for k, i in enumerate(ok) if specs[i]["file"]]
    # sequential positions instead of M-RoPE: must differ for images
    with torch.no_grad():
        d = 0.0
        for k in img_cases[:4]:
            enc = ref.inputs([specs[ok[k]]], "left")
            m = model
            emb = m.get_input_embeddings()(enc["input_ids"])
            feats = m.visual(enc["pixel_values"], grid_thw=enc["image_grid_thw"])
            emb[enc["input_ids"] == m.config.image_token_id] = feats
            h = m.model(input_ids=None, position_ids=None, attention_mask=enc["attention_mask"],
                        inputs_embeds=emb).last_hidden_state[0, -1]
            d = max(d, float((F.normalize(h, dim=-1) - F.normalize(raws[k], dim=-1)).abs().max()))
    print(f"  M-RoPE vs sequential positions on image cases: max diff {d:.3e}")
    assert d > 1e-3
    if spec["arch"] == "qwen2_5_vl":
        vis = model.visual
        saved = list(vis.fullatt_block_indexes)
        for variant in ([], list(range(spec["vision"]["depth"]))):
            vis.fullatt_block_indexes = variant
            d = 0.0
            for k in img_cases:
                enc = ref.inputs([specs[ok[k]]], "left")
                d = max(d, float((F.normalize(ref.raw(enc)[0], dim=-1) - F.normalize(raws[k], dim=-1)).abs().max()))
            print(f"  fullatt_block_indexes {variant} instead of {saved}: max diff {d:.3e}")
            assert d > 1e-3
        vis.fullatt_block_indexes = saved


def main():
    torch.set_num_threads(1)
    t0 = time.time()
    make_images()
    ref_dir = os.path.join(FIXTURES, "reference")
    os.makedirs(ref_dir, exist_ok=True)
    total = du_bytes(os.path.join(FIXTURES, "qwen-images"))
    all_pixels = {}
    for name, spec in MODELS.items():
        out_dir = os.path.join(FIXTURES, name)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.makedirs(out_dir)
        print(f"[{name}]")
        write_model(name, spec, out_dir)
        doc, pixels = build_reference(name, spec)
        dump_json(doc, os.path.join(ref_dir, f"{name}.json"))
        for k, v in pixels.items():
            # both models share the image processor settings, so the pixels are one file
            assert k not in all_pixels or torch.equal(all_pixels[k], v), k
            all_pixels[k] = v
        sz = du_bytes(out_dir) + du_bytes(os.path.join(ref_dir, f"{name}.json"))
        total += sz
        print(f"  files: {sorted(os.listdir(out_dir))}; {sz / 1e6:.2f} MB")
    px = os.path.join(ref_dir, "qwen-vl-pixels.safetensors")
    save_file(all_pixels, px, metadata={"format": "pt"})
    total += du_bytes(px)
    print(f"Qwen fixtures: {total / 1e6:.2f} MB; done in {time.time() - t0:.1f} s")
    assert total < 15e6, total


if __name__ == "__main__":
    main()
