#!/usr/bin/env bash
# Runs every example of examples/ against the fixture model and checks its
# output (scripts/clients/examples_test.py): examples/curl.sh (every endpoint),
# examples/client.py (requests: embed, multipart upload, score, encodings,
# errors) and examples/composed_retrieval.py (a folder of images as candidates,
# a query image + modification text + instruction).
# The image folder is ../shared/testdata/bge-vl-demo when present (read in
# place), else tests/fixtures/images; EXAMPLE_IMAGES overrides it.
# Starts $VLEMBED_BIN (default target/debug/vlembed) with an API key on a
# loopback ephemeral port and stops it on exit. Python clients: pinned in
# scripts/clients/requirements.txt, installed once into a cached venv.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/clients/env.sh
source scripts/clients/env.sh
command -v curl >/dev/null || { echo "examples-test: curl is required" >&2; exit 1; }
client_venv
IMAGES=${EXAMPLE_IMAGES:-}
if [[ -z $IMAGES ]]; then
  IMAGES=tests/fixtures/images
  if [[ -d ../shared/testdata/bge-vl-demo ]]; then IMAGES=../shared/testdata/bge-vl-demo; fi
fi
KEY="examples-test-key-$RANDOM$RANDOM"
start_server VLEMBED_API_KEYS="$KEY"
"$PY" scripts/clients/examples_test.py "$BASE" "$KEY" "$IMAGES"
