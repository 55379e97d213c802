"""Checks a running vlembed server's /embed against a committed reference.

    python3 scripts/check_reference.py --url http://127.0.0.1:8080 \
        --reference tests/fixtures/reference/clip-tiny.json [--model NAME] \
        [--min-cosine 0.9999] [--max-abs-diff 1e-4]

Reads the reference embeddings written by scripts/make_fixtures.py (CLIP:
texts, images, composed; MLLM: cases with role and instruction), sends the
same inputs in one /embed request (images as base64 of the fixture files) and
compares the normalized embeddings. Standard library only: it runs where the
server runs (the container smoke test, the GPU machine). Exits 1 on a miss.
"""

import argparse
import base64
import json
import math
import os
import sys
import urllib.error
import urllib.request


def unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def image(path):
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode()


def cases(ref):
    out = []
    for t in ref.get("texts", []):
        if not t["text"].strip():
            continue  # the server refuses empty texts (422) by contract
        out.append((f"text {t['text'][:30]!r}", t["text"], t["embedding"]))
    for i in ref.get("images", []):
        out.append((f"image {os.path.basename(i['file'])}", {"image": image(i["file"])}, i["embedding"]))
    for c in ref.get("composed", []):
        if os.path.exists(c["file"]) and c["text"].strip():
            out.append((f"composed {os.path.basename(c['file'])}",
                        {"text": c["text"], "image": image(c["file"])}, c["embedding"]))
    for c in ref.get("cases", []):
        inp = {"role": c["role"]}
        if c.get("instruction") is not None:
            inp["instruction"] = c["instruction"]
        if c.get("text") is not None:
            if not c["text"].strip():
                continue
            inp["text"] = c["text"]
        if c.get("file") is not None:
            if not os.path.exists(c["file"]):
                continue
            inp["image"] = image(c["file"])
        name = f"{c['role']} {(c.get('text') or '')[:20]!r} {os.path.basename(c.get('file') or '')}"
        out.append((name, inp, c["embedding"]))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--reference", required=True)
    ap.add_argument("--model")
    ap.add_argument("--min-cosine", type=float, default=0.9999)
    ap.add_argument("--max-abs-diff", type=float, default=None)
    ap.add_argument("--label", default="")
    a = ap.parse_args()
    with open(a.reference) as f:
        ref = json.load(f)
    todo = cases(ref)
    if not todo:
        sys.exit(f"no usable cases in {a.reference}")
    body = {"inputs": [c[1] for c in todo]}
    if a.model:
        body["model"] = a.model
    req = urllib.request.Request(a.url.rstrip("/") + "/embed", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            got = json.load(r)["embeddings"]
    except urllib.error.HTTPError as e:
        sys.exit(f"/embed answered {e.code}: {e.read().decode(errors='replace')[:500]}")
    worst_cos, worst_diff, bad = 1.0, 0.0, []
    for (name, _, want), g in zip(todo, got):
        x, y = unit(g), unit(want)
        cos = sum(p * q for p, q in zip(x, y))
        diff = max(abs(p - q) for p, q in zip(x, y))
        worst_cos, worst_diff = min(worst_cos, cos), max(worst_diff, diff)
        if cos < a.min_cosine or (a.max_abs_diff is not None and diff > a.max_abs_diff):
            bad.append(f"{name}: cosine {cos:.6f}, max |diff| {diff:.2e}")
    label = a.label or os.path.basename(a.reference)
    print(f"{label}: {len(todo)} cases, min cosine {worst_cos:.7f}, max |diff| {worst_diff:.2e}"
          f" (bounds: cosine >= {a.min_cosine}"
          + (f", |diff| <= {a.max_abs_diff:g})" if a.max_abs_diff is not None else ")"))
    for b in bad:
        print(f"  MISS {b}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
