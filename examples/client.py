#!/usr/bin/env python3
"""A small vlembed client with `requests`: /embed (JSON and multipart upload),
/score (JSON and multipart) and the quantised encodings.

Copy the `Vlembed` class into your code, or run this file for a demo:

    python examples/client.py --url http://127.0.0.1:8080 [--api-key KEY] IMAGE...

Only needs `pip install requests`.
"""

import argparse
import base64
import pathlib
import sys

import requests


class VlembedError(Exception):
    """An error answer: `status`, `type` and `message` from the server's JSON."""

    def __init__(self, status, kind, message):
        super().__init__(f"{status} {kind}: {message}")
        self.status, self.kind, self.message = status, kind, message


def image_b64(path):
    """An image file as the base64 string an input's "image" takes."""
    return base64.b64encode(pathlib.Path(path).read_bytes()).decode()


def multipart(files, fields):
    """requests' `files` for a multipart/form-data body with file parts and
    text fields (with `data=` and no files, requests would send a urlencoded
    form, which the server refuses with 415)."""
    return files + [(name, (None, value)) for name, value in fields]


class Vlembed:
    def __init__(self, url="http://127.0.0.1:8080", api_key=None, model=None, timeout=60):
        self.url = url.rstrip("/")
        self.model = model
        self.timeout = timeout
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def _post(self, path, **kw):
        r = self.session.post(self.url + path, timeout=self.timeout, **kw)
        if r.status_code != 200:
            try:
                err = r.json()["error"]
                raise VlembedError(r.status_code, err.get("type"), err.get("message"))
            except (ValueError, KeyError, TypeError):
                raise VlembedError(r.status_code, "http", r.text[:200]) from None
        return r.json()

    def _model(self, body):
        if self.model:
            body["model"] = self.model
        return body

    def embed(self, inputs, normalize=True, encoding_format="float"):
        """Embeds a list of inputs: strings (texts) or dicts with "text",
        "image" (base64), "instruction", "role". Returns the response JSON
        ("embeddings": one per input, in order)."""
        body = {"inputs": inputs, "normalize": normalize, "encoding_format": encoding_format}
        return self._post("/embed", json=self._model(body))

    def embed_files(self, images=(), texts=(), role=None, instruction=None, encoding_format="float"):
        """Multipart upload: image files (paths) and/or texts. Only texts, only
        images, or as many of each (paired in order into composed inputs)."""
        files = [("image", (pathlib.Path(p).name, pathlib.Path(p).read_bytes())) for p in images]
        data = [("text", t) for t in texts] + [("encoding_format", encoding_format)]
        if role:
            data.append(("role", role))
        if instruction:
            data.append(("instruction", instruction))
        if self.model:
            data.append(("model", self.model))
        return self._post("/embed", files=multipart(files, data))

    def score(self, query, candidates, top_k=None):
        """Scores candidates against a query (inputs as for embed). Returns the
        response JSON ("scores" in candidate order, "ranking" with top_k)."""
        body = {"query": query, "candidates": candidates}
        if top_k is not None:
            body["top_k"] = top_k
        return self._post("/score", json=self._model(body))

    def score_files(self, query_text=None, query_image=None, candidate_images=(), candidate_texts=(), top_k=None):
        """/score as multipart: a query text and/or image file against
        candidate image files and/or texts."""
        files = [("candidate_image", (pathlib.Path(p).name, pathlib.Path(p).read_bytes())) for p in candidate_images]
        if query_image:
            files.append(("query_image", (pathlib.Path(query_image).name, pathlib.Path(query_image).read_bytes())))
        data = [("candidate_text", t) for t in candidate_texts]
        if query_text:
            data.append(("query_text", query_text))
        if top_k is not None:
            data.append(("top_k", str(top_k)))
        if self.model:
            data.append(("model", self.model))
        return self._post("/score", files=multipart(files, data))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--api-key")
    ap.add_argument("--model")
    ap.add_argument("images", nargs="+", help="image files")
    a = ap.parse_args(argv)
    c = Vlembed(a.url, a.api_key, a.model)

    r = c.embed(["a photo of a cat", {"image": image_b64(a.images[0])},
                 {"text": "make it dark", "image": image_b64(a.images[0]), "role": "query"}])
    print(f"/embed JSON: model {r['model']}, {len(r['embeddings'])} embeddings of {r['dimensions']} dimensions")
    r = c.embed_files(images=a.images)
    print(f"/embed multipart: {len(r['embeddings'])} images uploaded, usage {r['usage']}")
    r8 = c.embed(["a photo of a cat"], encoding_format="int8")
    rb = c.embed(["a photo of a cat"], encoding_format="binary")
    print(f"int8: {r8['embeddings'][0][:8]}...  binary: {rb['embeddings'][0]}")
    r = c.score("a photo of a cat", [{"image": image_b64(p)} for p in a.images], top_k=3)
    print("/score JSON ranking:", [(a.images[x["index"]], round(x["score"], 4)) for x in r["ranking"]])
    r = c.score_files(query_text="a photo of a cat", candidate_images=a.images, top_k=3)
    print("/score multipart ranking:", [(a.images[x["index"]], round(x["score"], 4)) for x in r["ranking"]])
    try:
        c.embed([""])
    except VlembedError as e:
        print(f"an error answer: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
