#!/usr/bin/env python3
"""Composed image retrieval with vlembed: find the images that look like a
query image changed the way a text says.

    python examples/composed_retrieval.py --url http://127.0.0.1:8080 \
        --images ../shared/testdata/bge-vl-demo \
        --query ../shared/testdata/bge-vl-demo/cir_query.png \
        --text "Make the background dark, as if the camera has taken the photo at night" \
        --instruction "Retrieve the target image that matches the modification" \
        --top-k 3

Walk-through:
  1. Index: every image of the folder is uploaded (multipart /embed, role
     "candidate", a few per request) and its normalised embedding kept, here in
     memory; a real index would store them (as int8 or binary to save space:
     see README "Output encodings").
  2. Query: the query image, the modification text and the task instruction
     make one composed input with role "query". BGE-VL-MLLM reads the
     instruction and the text in its prompt; the CLIP models embed
     normalize(text + image) and ignore the instruction.
  3. Rank: embeddings are L2-normalised, so the dot product is the cosine; the
     best top-k are printed (or written as JSON with --json).
  Step 2-3 can also be one /score call (query + candidates) when the
  candidates are few; --check-score does that and checks both agree.

Only needs `pip install requests`.
"""

import argparse
import base64
import json
import pathlib
import sys

import requests

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def post(session, url, **kw):
    r = session.post(url, timeout=120, **kw)
    if r.status_code != 200:
        sys.exit(f"{url}: {r.status_code} {r.text[:300]}")
    return r.json()


def index_folder(session, url, folder, model=None, per_request=8):
    """Embeds every image of `folder` as a candidate: (paths, embeddings)."""
    paths = sorted(p for p in pathlib.Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        sys.exit(f"no images in {folder}")
    vectors = []
    for i in range(0, len(paths), per_request):
        chunk = paths[i : i + per_request]
        files = [("image", (p.name, p.read_bytes())) for p in chunk]
        data = [("role", "candidate")] + ([("model", model)] if model else [])
        vectors += post(session, url + "/embed", files=files, data=data)["embeddings"]
    return paths, vectors


def embed_query(session, url, image, text, instruction, model=None):
    """The composed query: image + modification text (+ instruction)."""
    q = {"image": base64.b64encode(pathlib.Path(image).read_bytes()).decode(), "role": "query"}
    if text:
        q["text"] = text
    if instruction:
        q["instruction"] = instruction
    body = {"inputs": [q]}
    if model:
        body["model"] = model
    return post(session, url + "/embed", json=body)["embeddings"][0], q


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--api-key")
    ap.add_argument("--model")
    ap.add_argument("--images", required=True, help="folder of candidate images")
    ap.add_argument("--query", required=True, help="query image file")
    ap.add_argument("--text", default="", help="modification text (empty: image-only query)")
    ap.add_argument("--instruction", default="Retrieve the target image that matches the modification")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--check-score", action="store_true", help="also rank with one /score call and compare")
    a = ap.parse_args(argv)

    s = requests.Session()
    if a.api_key:
        s.headers["Authorization"] = f"Bearer {a.api_key}"
    url = a.url.rstrip("/")

    paths, vectors = index_folder(s, url, a.images, a.model)
    qv, q = embed_query(s, url, a.query, a.text, a.instruction, a.model)
    scores = [sum(x * y for x, y in zip(qv, v)) for v in vectors]
    order = sorted(range(len(paths)), key=lambda i: (-scores[i], i))[: a.top_k]
    result = {
        "query": str(a.query),
        "text": a.text,
        "candidates": len(paths),
        "dimensions": len(qv),
        "ranking": [{"image": str(paths[i]), "index": i, "score": scores[i]} for i in order],
    }

    if a.check_score:
        cands = [{"image": base64.b64encode(p.read_bytes()).decode()} for p in paths]
        body = {"query": q, "candidates": cands, "top_k": a.top_k}
        if a.model:
            body["model"] = a.model
        r = post(s, url + "/score", json=body)
        got = [x["index"] for x in r["ranking"]]
        worst = max(abs(x - y) for x, y in zip(r["scores"], scores))
        result["score_endpoint"] = {"ranking": got, "max_abs_diff": worst}
        if worst > 1e-4 or [r["scores"][i] for i in got] != sorted(r["scores"], reverse=True)[: a.top_k]:
            sys.exit(f"/score disagrees: {result['score_endpoint']}")

    if a.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{len(paths)} candidates, query {a.query} + {a.text!r}:")
        for rank, x in enumerate(result["ranking"], 1):
            print(f"  {rank}. {x['score']:.4f}  {x['image']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
