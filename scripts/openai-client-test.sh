#!/usr/bin/env bash
# /v1/embeddings with the official openai Python client (pinned in
# scripts/clients/requirements.txt, installed from PyPI into a cached venv):
# texts, a list, the default base64 decoded by the client against float (1e-6),
# quantised encodings, our image input objects (as items and via extra_body),
# and errors as the client's exception classes (NotFoundError, BadRequestError,
# UnprocessableEntityError, AuthenticationError with an API key set).
# Starts $VLEMBED_BIN (default target/debug/vlembed) with the fixture model on a
# loopback ephemeral port and stops it on exit. ~5 s with a warm venv.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/clients/env.sh
source scripts/clients/env.sh
client_venv
KEY="openai-test-key-$RANDOM$RANDOM"
start_server VLEMBED_API_KEYS="$KEY"
"$PY" scripts/clients/openai_client_test.py "$BASE" "$KEY"
