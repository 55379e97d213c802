#!/usr/bin/env bash
# Is the first request after /ready as fast as the steady state? (issue 21:
# every replica is warmed up before it serves.) Starts the server on a
# loopback port, waits for /ready, then times single requests one after the
# other with curl: the first, then N more; prints the first and the median
# of the rest, per kind (image, text), and stops the server. Bounded: at
# most 2 x (1 + N) requests and a 300 s wait for readiness.
#
#   scripts/first-request.sh MODEL_DIR [N]     (N: default 10)
#
# Environment: VLEMBED_BIN (default target/release/vlembed), VLEMBED_DTYPE
# (default f32), FIRST_REQUEST_IMAGE (default tests/fixtures/images/
# baseline_420_640x480.jpg). The embedding cache is off: repeated inputs
# must reach the model.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${1:?usage: scripts/first-request.sh MODEL_DIR [N]}
N=${2:-10}
BIN=${VLEMBED_BIN:-target/release/vlembed}
DTYPE=${VLEMBED_DTYPE:-f32}
IMAGE=${FIRST_REQUEST_IMAGE:-tests/fixtures/images/baseline_420_640x480.jpg}
WORK=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$PORT"

VLEMBED_MODEL_DEFAULTS__EMBEDDING_CACHE_BYTES=0 VLEMBED_LOG=${VLEMBED_LOG:-info} \
    timeout 900 "$BIN" serve --model "$MODEL" --dtype "$DTYPE" --host 127.0.0.1 --port "$PORT" \
    >"$WORK/server.log" 2>&1 &
PID=$!
trap 'kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 600); do
    kill -0 "$PID" 2>/dev/null || { tail -20 "$WORK/server.log" >&2; exit 1; }
    curl -fsS -m 2 "$URL/ready" >/dev/null 2>&1 && break
    sleep 0.5
done
curl -fsS -m 2 "$URL/ready" >/dev/null || { echo "not ready after 300 s" >&2; exit 1; }
grep -o 'replica warmed up.*' "$WORK/server.log" | head -2 | cut -c1-200 || true

python3 - "$IMAGE" >"$WORK/image.json" <<'EOF'
import base64, json, sys
print(json.dumps({"inputs": [{"image": base64.b64encode(open(sys.argv[1], "rb").read()).decode()}]}))
EOF
echo '{"inputs": "a photo of a cat sitting on a red sofa"}' >"$WORK/text.json"

# One request's wall time in ms (curl's time_total); fails on a non-2xx.
once() {
    curl -fsS -m 60 -o /dev/null -w '%{time_total}\n' -H 'content-type: application/json' \
        --data-binary "@$1" "$URL/embed" | awk '{printf "%.1f\n", $1 * 1000}'
}

for kind in image text; do
    first=$(once "$WORK/$kind.json")
    rest=()
    for _ in $(seq "$N"); do rest+=("$(once "$WORK/$kind.json")"); done
    median=$(printf '%s\n' "${rest[@]}" | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}')
    echo "$kind: first request after /ready ${first} ms; the next $N: median ${median} ms (all: ${rest[*]})"
done
