#!/usr/bin/env bash
# The GPU check, ready for a machine with an NVIDIA GPU and driver (>= 580)
# but no Rust toolchain. Give it the bundle from scripts/build-cuda-release.sh
# (bin/vlembed linked against CUDA 13.0, its libraries, bin/loadgen) and this
# repository's fixtures. It:
#
#  1. runs the parity cases of every fixture model (CLIP clip-tiny,
#     clip-tiny-eos; MLLM mllm-tiny-a, mllm-tiny-b) on $DEVICE through /embed
#     against the committed PyTorch references: f32 within the CPU bounds
#     (cosine >= 0.9999, |diff| <= 1e-4 end to end), f16 and bf16 cosine >= 0.999;
#  2. serves a full-size random BGE-VL-base and -large (made on the fly with
#     scripts/make_fixtures.py --full, which needs python with torch +
#     transformers: $PY; or given as BASE_MODEL / LARGE_MODEL directories) in
#     the default dtype (bf16 on CUDA) and reports images/s and texts/s at
#     1/8/32/128 concurrent clients, the GPU memory the server holds, and the
#     CPU preprocessing share (preprocessing seconds / (preprocessing +
#     inference seconds), from /metrics) plus the CPU cores the process used.
#
# The report goes to $OUT_DIR/gpu-check.md (and stdout); paste it into
# BENCHMARKS.md with the machine's description.
#
#   scripts/gpu-check.sh [BUNDLE_DIR]     # default: dist/vlembed-cuda13-sm90
#
# Environment: DEVICE (cuda:0), PORT (18380), LOAD_S (seconds per load level,
# 20), LEVELS ("1 8 32 128"), PY (python3), BASE_MODEL, LARGE_MODEL,
# OUT_DIR (/tmp/vlembed-gpu-check), SKIP_PARITY=1, SKIP_LOAD=1.
# Loopback only; every server it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

BUNDLE="${1:-dist/vlembed-cuda13-sm90}"
BIN="${VLEMBED_BIN:-$BUNDLE/bin/vlembed}"
LOADGEN="${LOADGEN_BIN:-$BUNDLE/bin/loadgen}"
DEVICE="${DEVICE:-cuda:0}"
PORT="${PORT:-18380}"
LOAD_S="${LOAD_S:-20}"
LEVELS="${LEVELS:-1 8 32 128}"
PY="${PY:-python3}"
OUT_DIR="${OUT_DIR:-/tmp/vlembed-gpu-check}"
URL="http://127.0.0.1:$PORT"
mkdir -p "$OUT_DIR"
REPORT="$OUT_DIR/gpu-check.md"

for f in "$BIN" "$LOADGEN"; do
  [ -x "$f" ] || { echo "missing $f (make the bundle with scripts/build-cuda-release.sh)" >&2; exit 1; }
done
command -v nvidia-smi >/dev/null 2>&1 || { echo "nvidia-smi not found: no NVIDIA driver here" >&2; exit 1; }
gpu_index="${DEVICE#cuda:}"

SERVER_PID=""
stop_server() {
  if [ -n "$SERVER_PID" ]; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    local rc=0
    wait "$SERVER_PID" || rc=$?
    SERVER_PID=""
    return "$rc"
  fi
}
trap 'stop_server || true' EXIT

start_server() { # log-name, args...
  local name="$1"
  shift
  VLEMBED_LOG=warn "$BIN" serve --host 127.0.0.1 --port "$PORT" --devices "$DEVICE" "$@" \
    >"$OUT_DIR/$name.log" 2>&1 &
  SERVER_PID=$!
  local deadline=$((SECONDS + 600))
  until curl -fsS -o /dev/null "$URL/ready" 2>/dev/null; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
      echo "the server did not become ready ($name):" >&2
      tail -20 "$OUT_DIR/$name.log" >&2
      exit 1
    fi
    sleep 0.2
  done
}

{
  echo "# GPU check ($(date -u +%Y-%m-%dT%H:%MZ), $(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
  echo
  echo "GPU: $(nvidia-smi -i "$gpu_index" --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
  echo "CPU: $(nproc) cores, $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)"
  echo "binary: $BIN ($("$BIN" --version))"
  echo
} | tee "$REPORT"

# --- 1. parity on the GPU -----------------------------------------------------
failed=0
if [ "${SKIP_PARITY:-0}" != 1 ]; then
  echo "## Parity on $DEVICE (/embed vs the committed references)" | tee -a "$REPORT"
  echo | tee -a "$REPORT"
  for model in clip-tiny clip-tiny-eos mllm-tiny-a mllm-tiny-b; do
    for dtype in f32 f16 bf16; do
      if [ "$dtype" = f32 ]; then bounds=(--min-cosine 0.9999 --max-abs-diff 1e-4); else bounds=(--min-cosine 0.999); fi
      start_server "parity-$model-$dtype" --model "tests/fixtures/$model" --model-name "$model" --dtype "$dtype"
      if ! python3 scripts/check_reference.py --url "$URL" --reference "tests/fixtures/reference/$model.json" \
        "${bounds[@]}" --label "- $model $dtype" | tee -a "$REPORT"; then
        failed=1
      fi
      stop_server || { echo "- $model $dtype: the server did not exit 0 at SIGTERM" | tee -a "$REPORT"; failed=1; }
    done
  done
  echo | tee -a "$REPORT"
fi

# --- 2. throughput on full-size random models ------------------------------------
metric_sum() { # text name
  awk -v n="$2" '$1 ~ "^"n"(\\{|$)" {s += $2} END {printf "%.6f", s}' <<<"$1"
}
gpu_mem_mib() {
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null |
    awk -F', *' -v p="$SERVER_PID" '$1 == p {print $2}' | head -1
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$SERVER_PID/stat"; }

if [ "${SKIP_LOAD:-0}" != 1 ]; then
  inputs="$OUT_DIR/inputs"
  if [ ! -d "$inputs/images" ]; then
    mkdir -p "$inputs/images"
    cp tests/fixtures/images/*.jpg tests/fixtures/images/*.png tests/fixtures/images/*.webp "$inputs/images/" 2>/dev/null || true
    python3 - "$inputs/texts.txt" <<'PY'
import sys
subjects = ["a cat", "a dog", "a red car", "two people", "a city street", "a bowl of fruit", "a mountain lake", "a train"]
places = ["at night", "in the rain", "on a sunny beach", "in an old town", "in a kitchen", "in the snow"]
with open(sys.argv[1], "w") as f:
    for i in range(96):
        f.write(f"a photo of {subjects[i % len(subjects)]} {places[i % len(places)]}, picture {i}\n")
PY
  fi
  hz=$(getconf CLK_TCK)
  for kind in base large; do
    var=$(echo "${kind}_MODEL" | tr a-z A-Z)
    model="${!var:-/tmp/bge-vl-$kind-random}"
    if [ ! -f "$model/model.safetensors" ]; then
      echo "== making a full-size random BGE-VL-$kind in $model ($PY scripts/make_fixtures.py --full $kind)" >&2
      "$PY" scripts/make_fixtures.py --full "$kind" --out "$model" >&2
    fi
    VLEMBED_MODEL_DEFAULTS__MAX_BATCH_COST=16384 VLEMBED_MODEL_DEFAULTS__MAX_BATCH_SIZE=128 \
      start_server "load-$kind" --model "$model" --model-name "bge-vl-$kind"
    dtype=$(curl -fsS "$URL/info" | python3 -c 'import json,sys; d=json.load(sys.stdin); m=d.get("models",[d])[0]; print(m.get("dtype","?"))' 2>/dev/null || echo "?")
    {
      echo "## BGE-VL-$kind (random weights, full size), $DEVICE, dtype $dtype"
      echo
      echo "| clients | inputs | per s | p50 ms | p99 ms | errors | GPU MiB | preprocess share | CPU cores used |"
      echo "|---:|---|---:|---:|---:|---|---:|---:|---:|"
    } | tee -a "$REPORT"
    for what in image text; do
      for c in $LEVELS; do
        if [ "$what" = image ]; then src=(--kind image --images-dir "$inputs/images"); else src=(--kind text --texts-file "$inputs/texts.txt"); fi
        m0=$(curl -fsS "$URL/metrics")
        t0=$(date +%s.%N)
        k0=$(cpu_ticks)
        mem=0
        "$LOADGEN" --url "$URL" --concurrency "$c" --duration "$LOAD_S" --timeout 120 "${src[@]}" \
          --json "$OUT_DIR/load-$kind-$what-$c.json" 2>/dev/null &
        lg=$!
        while kill -0 "$lg" 2>/dev/null; do
          m=$(gpu_mem_mib || true)
          [ -n "$m" ] && [ "$m" -gt "$mem" ] && mem=$m
          sleep 1
        done
        wait "$lg" || failed=1
        k1=$(cpu_ticks)
        t1=$(date +%s.%N)
        m1=$(curl -fsS "$URL/metrics")
        pre=$(python3 -c "print($(metric_sum "$m1" vlembed_preprocess_duration_seconds_sum) - $(metric_sum "$m0" vlembed_preprocess_duration_seconds_sum))")
        inf=$(python3 -c "print($(metric_sum "$m1" vlembed_inference_duration_seconds_sum) - $(metric_sum "$m0" vlembed_inference_duration_seconds_sum))")
        python3 - "$OUT_DIR/load-$kind-$what-$c.json" "$c" "$what" "$mem" "$pre" "$inf" "$k0" "$k1" "$hz" "$t0" "$t1" <<'PY' | tee -a "$REPORT"
import json, sys
f, c, what, mem, pre, inf, k0, k1, hz, t0, t1 = sys.argv[1:]
r = json.load(open(f))["main"]
share = float(pre) / (float(pre) + float(inf)) if float(pre) + float(inf) > 0 else float("nan")
cores = (int(k1) - int(k0)) / int(hz) / (float(t1) - float(t0))
errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
l = r["latency_ms"]
print(f"| {c} | {what}s | {r['throughput_per_s']:.1f} | {l['p50']:.0f} | {l['p99']:.0f} | {errors} | {mem} | {share:.0%} | {cores:.1f} |")
PY
      done
    done
    echo | tee -a "$REPORT"
    stop_server || failed=1
  done
fi

echo "report: $REPORT"
exit "$failed"
