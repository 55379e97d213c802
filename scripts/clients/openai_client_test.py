"""The official openai Python client against a running vlembed (fixture model).

Run by scripts/openai-client-test.sh: python openai_client_test.py BASE_URL API_KEY.
Checks texts, a list, the client's default base64 (decoded by the client) against
float, the quantised encodings, our image input objects (as input items and
through extra_body), and that errors surface as the client's exception classes.
Every check raises on failure.
"""

import base64
import math
import pathlib
import sys

import openai

BASE, KEY = sys.argv[1], sys.argv[2]
ROOT = pathlib.Path(__file__).resolve().parents[2]
IMAGE = base64.b64encode((ROOT / "tests/fixtures/images/rgb_225x223.png").read_bytes()).decode()

client = openai.OpenAI(base_url=BASE + "/v1", api_key=KEY, max_retries=0, timeout=30)
MODEL = "clip-tiny"


def close(a, b, tol=1e-6):
    assert len(a) == len(b), (len(a), len(b))
    worst = max(abs(x - y) for x, y in zip(a, b))
    assert worst <= tol, f"max |diff| {worst} > {tol}"


def unit(v):
    n = math.sqrt(sum(x * x for x in v))
    assert abs(n - 1) < 1e-4, f"norm {n}"


checks = 0

# One text, default encoding (the client asks for base64 and decodes it).
r = client.embeddings.create(model=MODEL, input="a photo of a cat")
assert r.object == "list" and r.model == MODEL and len(r.data) == 1
v64 = r.data[0].embedding
assert len(v64) == 16 and all(isinstance(x, float) for x in v64)
unit(v64)
assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens
checks += 1

# The same as float: equal within 1e-6.
r = client.embeddings.create(model=MODEL, input="a photo of a cat", encoding_format="float")
close(r.data[0].embedding, v64)
checks += 1

# The raw response really was base64 (the client decoded it).
raw = client.embeddings.with_raw_response.create(model=MODEL, input="a photo of a cat")
body = raw.http_response.json()
assert isinstance(body["data"][0]["embedding"], str), body
checks += 1

# A list: one embedding per input, in order, each equal to its single embedding.
texts = ["a photo of a cat", "a dog on a beach", "hello world"]
r = client.embeddings.create(model=MODEL, input=texts)
assert [d.index for d in r.data] == [0, 1, 2]
close(r.data[0].embedding, v64)
for t, d in zip(texts, r.data):
    single = client.embeddings.create(model=MODEL, input=t, encoding_format="float")
    close(d.embedding, single.data[0].embedding)
checks += 1

# dimensions equal to the model's is accepted; user is ignored.
r = client.embeddings.create(model=MODEL, input="x", dimensions=16, user="u1")
assert len(r.data[0].embedding) == 16
checks += 1

# Our input objects: an image and a composed input as input items ...
items = [{"image": IMAGE}, {"text": "make it dark", "image": IMAGE, "role": "query"}]
r = client.embeddings.create(model=MODEL, input=items)
img, composed = r.data[0].embedding, r.data[1].embedding
unit(img)
unit(composed)
assert max(abs(a - b) for a, b in zip(img, composed)) > 1e-3, "composed differs from the image alone"
# ... and through extra_body, which replaces the typed input.
r = client.embeddings.create(model=MODEL, input="ignored", extra_body={"input": items})
close(r.data[0].embedding, img)
close(r.data[1].embedding, composed)
checks += 1

# Quantised encodings pass through the client undecoded (integers).
r = client.embeddings.create(model=MODEL, input="a photo of a cat", encoding_format="int8")
q = r.data[0].embedding
assert len(q) == 16
for x, f in zip(q, v64):
    assert x == int(x) and abs(x - f * 127) <= 0.5 + 1e-3, (x, f)
r = client.embeddings.create(model=MODEL, input="a photo of a cat", encoding_format="ubinary")
bits = "".join(f"{int(b):08b}" for b in r.data[0].embedding)
assert bits == "".join("1" if f > 0 else "0" for f in v64), bits
checks += 1

# Errors surface as the client's exception classes.
def expect(cls, status, needle, **kw):
    try:
        client.embeddings.create(**kw)
    except cls as e:
        assert e.status_code == status, (e.status_code, status)
        assert needle in str(e), str(e)
        return
    raise AssertionError(f"expected {cls.__name__}")


expect(openai.NotFoundError, 404, "no-such-model", model="no-such-model", input="a")
expect(openai.BadRequestError, 400, "token id arrays", model=MODEL, input=[[1, 2, 3]])
expect(openai.BadRequestError, 400, "dimensions", model=MODEL, input="a", dimensions=8)
expect(openai.UnprocessableEntityError, 422, "text is empty", model=MODEL, input="")
expect(openai.UnprocessableEntityError, 422, "encoding_format", model=MODEL, input="a",
       encoding_format="float16")
expect(openai.UnprocessableEntityError, 422, "input[0].image", model=MODEL,
       input=[{"image": base64.b64encode(b"not an image").decode()}])
bad = openai.OpenAI(base_url=BASE + "/v1", api_key="wrong-key", max_retries=0, timeout=30)
try:
    bad.embeddings.create(model=MODEL, input="a")
    raise AssertionError("expected AuthenticationError")
except openai.AuthenticationError as e:
    assert e.status_code == 401
checks += 1

print(f"openai {openai.__version__}: {checks} checks passed against {BASE}")
