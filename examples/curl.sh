#!/usr/bin/env bash
# One curl call for every endpoint of a running vlembed, printing each answer
# (cut to 300 characters). Copy the lines you need.
#
#   BASE=http://127.0.0.1:8080 [API_KEY=...] [IMAGE=cat.jpg] [IMAGE2=dog.png] examples/curl.sh
#
# IMAGE/IMAGE2 default to fixture images of this repository. Exits non-zero
# at the first call that does not answer 2xx (curl --fail-with-body).
# scripts/examples-test.sh runs it against the fixture model.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
BASE=${BASE:-http://127.0.0.1:8080}
IMAGE=${IMAGE:-$here/../tests/fixtures/images/rgb_225x223.png}
IMAGE2=${IMAGE2:-$here/../tests/fixtures/images/baseline_420_640x480.jpg}
AUTH=()
if [[ -n ${API_KEY:-} ]]; then AUTH=(-H "Authorization: Bearer $API_KEY"); fi
IMG64=$(base64 -w0 "$IMAGE")

call() { # call TITLE CURL-ARGS...
  local title=$1 out
  shift
  echo "== $title"
  out=$(curl -sS --fail-with-body -m 60 "${AUTH[@]}" "$@") || { echo "$out"; echo "FAILED: $title" >&2; return 1; }
  printf '%s\n' "${out:0:300}"
}
# The JSON body goes through stdin (-d @-): a base64 image can be longer than
# one command-line argument may be.
json() { printf '%s' "$3" | call "$1" "$BASE$2" -H 'Content-Type: application/json' -d @-; }

# Operations (no key needed for health, ready, metrics, openapi.json).
call "GET /health" "$BASE/health"
call "GET /ready" "$BASE/ready"
call "GET /info" "$BASE/info"
call "GET /metrics" "$BASE/metrics"
call "GET /openapi.json" "$BASE/openapi.json"

# /embed, JSON: a text, an image (base64), a composed query (image + text).
json "POST /embed (JSON)" /embed '{
  "inputs": ["a photo of a cat",
             {"image": "'"$IMG64"'"},
             {"image": "data:image/png;base64,'"$IMG64"'", "text": "make it dark", "role": "query"}],
  "normalize": true, "truncate": true, "encoding_format": "float"}'
# Compact encodings: base64 f32, int8, uint8, binary, ubinary.
for f in base64 int8 uint8 binary ubinary; do
  json "POST /embed (encoding_format=$f)" /embed '{"inputs": ["a photo of a cat"], "encoding_format": "'$f'"}'
done
# Several encodings from one forward pass (Cohere-style): embeddings keyed by type.
json "POST /embed (embedding_types)" /embed '{"inputs": ["a photo of a cat"], "embedding_types": ["binary", "int8"]}'
# /embed, multipart: two composed inputs (texts and image files paired in order).
call "POST /embed (multipart)" "$BASE/embed" -F text='a cat' -F image=@"$IMAGE" \
  -F text='a dog' -F image=@"$IMAGE2" -F role=query -F encoding_format=float

# /score, JSON and multipart.
json "POST /score (JSON)" /score '{
  "query": "a photo of a cat",
  "candidates": ["a cat on a sofa", {"image": "'"$IMG64"'"}],
  "top_k": 1}'
call "POST /score (multipart)" "$BASE/score" -F query_text='a photo of a cat' \
  -F candidate_image=@"$IMAGE" -F candidate_image=@"$IMAGE2" -F top_k=2

# /v1/embeddings (OpenAI-compatible): texts, base64 (what the openai clients
# ask for), and an image input object.
json "POST /v1/embeddings" /v1/embeddings '{"input": ["a photo of a cat", "a dog"], "encoding_format": "float"}'
json "POST /v1/embeddings (base64)" /v1/embeddings '{"input": "a photo of a cat", "encoding_format": "base64"}'
json "POST /v1/embeddings (image)" /v1/embeddings '{"input": [{"image": "'"$IMG64"'"}]}'
echo "== all calls answered 2xx"
