"""Runs examples/ against a running vlembed with the fixture model and checks
their outputs: the mechanics (shapes, order, agreement between endpoints and
forms), not semantic quality (the fixture model has random weights).

Run by scripts/examples-test.sh: python examples_test.py BASE_URL API_KEY IMAGES_DIR.
Every check raises on failure.
"""

import contextlib
import importlib.util
import io
import json
import math
import os
import pathlib
import subprocess
import sys

BASE, KEY, IMAGES = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
ROOT = pathlib.Path(__file__).resolve().parents[2]
FIX = ROOT / "tests/fixtures/images"


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def close(a, b, tol=1e-6):
    assert len(a) == len(b), (len(a), len(b))
    worst = max(abs(x - y) for x, y in zip(a, b))
    assert worst <= tol, f"max |diff| {worst} > {tol}"


def run_main(mod, args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = mod.main(args)
    assert rc == 0, rc
    return out.getvalue()


# ---- examples/curl.sh -------------------------------------------------------
r = subprocess.run([str(ROOT / "examples/curl.sh")], env={**os.environ, "BASE": BASE, "API_KEY": KEY},
                   capture_output=True, text=True, timeout=120)
assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
titles = [l for l in r.stdout.splitlines() if l.startswith("== ")]
assert len(titles) == 19 and titles[-1] == "== all calls answered 2xx", titles
print(f"examples/curl.sh: {len(titles) - 1} calls answered 2xx")
# Without the key the first call needing one fails, and the script says so.
r = subprocess.run([str(ROOT / "examples/curl.sh")], env={**os.environ, "BASE": BASE, "API_KEY": ""},
                   capture_output=True, text=True, timeout=120)
assert r.returncode != 0 and "FAILED: GET /info" in r.stderr, r.stderr[-500:]

# ---- examples/client.py -----------------------------------------------------
client = load("client")
c = client.Vlembed(BASE, api_key=KEY)
imgs = [FIX / "rgb_225x223.png", FIX / "baseline_420_640x480.jpg", FIX / "gray_320x240.jpg"]
b64 = [client.image_b64(p) for p in imgs]

r = c.embed(["a photo of a cat", {"image": b64[0]}, {"text": "make it dark", "image": b64[0], "role": "query"}])
assert r["dimensions"] == 16 and len(r["embeddings"]) == 3, r
for v in r["embeddings"]:
    assert len(v) == 16 and abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4
text_v, img_v, comp_v = r["embeddings"]

# Multipart upload: the same vectors as JSON, images alone and composed pairs.
up = c.embed_files(images=imgs)
assert len(up["embeddings"]) == 3 and up["usage"]["images"] == 3, up["usage"]
close(up["embeddings"][0], img_v)
up = c.embed_files(images=imgs[:1], texts=["make it dark"], role="query")
close(up["embeddings"][0], comp_v)
up = c.embed_files(texts=["a photo of a cat"])
close(up["embeddings"][0], text_v)

# Quantised forms follow the float vector.
q = c.embed(["a photo of a cat"], encoding_format="int8")["embeddings"][0]
assert all(abs(x - f * 127) <= 0.5 + 1e-3 for x, f in zip(q, text_v)), q
u = c.embed(["a photo of a cat"], encoding_format="ubinary")["embeddings"][0]
assert "".join(f"{b:08b}" for b in u) == "".join("1" if f > 0 else "0" for f in text_v)

# /score: scores are the dot products, ranking sorted, multipart agrees.
s = c.score("a photo of a cat", [{"image": x} for x in b64], top_k=2)
close(s["scores"], [sum(a * b for a, b in zip(text_v, v))
                    for v in c.embed([{"image": x} for x in b64])["embeddings"]], 1e-5)
ranked = sorted(range(3), key=lambda i: -s["scores"][i])[:2]
assert [x["index"] for x in s["ranking"]] == ranked, s
m = c.score_files(query_text="a photo of a cat", candidate_images=imgs, top_k=2)
close(m["scores"], s["scores"])
assert [x["index"] for x in m["ranking"]] == ranked
# An image query against its own image ranks it first with score 1.
s = c.score({"image": b64[1]}, [{"image": x} for x in b64], top_k=1)
assert s["ranking"][0]["index"] == 1 and abs(s["ranking"][0]["score"] - 1) < 1e-4, s
m = c.score_files(query_image=imgs[1], candidate_images=imgs, top_k=1)
assert m["ranking"][0]["index"] == 1, m

# Errors come back as VlembedError with the server's status and message.
try:
    c.embed([""])
    raise AssertionError("expected an error")
except client.VlembedError as e:
    assert e.status == 422 and "inputs[0].text: text is empty" in e.message, e
try:
    client.Vlembed(BASE, api_key="wrong").embed(["a"])
    raise AssertionError("expected an error")
except client.VlembedError as e:
    assert e.status == 401, e

out = run_main(client, ["--url", BASE, "--api-key", KEY] + [str(p) for p in imgs])
for needle in ["/embed JSON: model clip-tiny, 3 embeddings of 16 dimensions", "/embed multipart: 3 images",
               "/score JSON ranking", "/score multipart ranking", "an error answer: 422"]:
    assert needle in out, out
print("examples/client.py: embed, multipart upload, encodings, score, errors and the demo checked")

# ---- examples/composed_retrieval.py ------------------------------------------
cir = load("composed_retrieval")
cands = sorted(p for p in IMAGES.iterdir() if p.suffix.lower() in cir.IMAGE_SUFFIXES)
query = next((p for p in cands if p.name == "cir_query.png"), cands[0])
common = ["--url", BASE, "--api-key", KEY, "--images", str(IMAGES), "--query", str(query), "--json"]

# Image-only query: its own image (in the folder) is first with score ~1.
res = json.loads(run_main(cir, common + ["--text", "", "--top-k", "3", "--check-score"]))
assert res["candidates"] == len(cands) and res["dimensions"] == 16, res
top = res["ranking"][0]
assert pathlib.Path(top["image"]).name == query.name and abs(top["score"] - 1) < 1e-4, res["ranking"]

# Composed query: k results, best first, the /score endpoint agrees.
text = "Make the background dark, as if the camera has taken the photo at night"
res = json.loads(run_main(cir, common + ["--text", text, "--top-k", "3", "--check-score"]))
scores = [x["score"] for x in res["ranking"]]
assert len(scores) == min(3, len(cands)) and scores == sorted(scores, reverse=True), res
assert res["score_endpoint"]["ranking"] == [x["index"] for x in res["ranking"]], res
assert top["score"] - scores[0] > 1e-4 or res["ranking"][0]["image"] != top["image"], \
    "the modification text must change the query"
out = run_main(cir, common[:-1] + ["--text", text, "--top-k", "2"])
assert out.startswith(f"{len(cands)} candidates, query") and out.count("\n") == 3, out
print(f"examples/composed_retrieval.py: {len(cands)} images of {IMAGES}, own image first, /score agrees")
