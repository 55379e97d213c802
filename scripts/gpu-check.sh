#!/usr/bin/env bash
# The GPU check: one call on a bare GPU machine (no Rust, no internet; NVIDIA
# driver, CUDA 13, Python 3 with torch + transformers + NVIDIA's cu13 wheels),
# at most 8 minutes, everything time-boxed, a report whatever fails.
#
#   scripts/gpu-check.sh              # on the GPU machine, with dist/gpu-bundle carried over
#   scripts/gpu-check.sh --dry-run    # here: CPU release build, cpu device, small models (< 5 min)
#
# Steps (README, "GPU check"):
#   setup      unpack the bundle (vlembed.xz, loadgen.xz; made here by
#              scripts/build-gpu-bundle.sh), put the host's NVIDIA wheel
#              libraries on LD_LIBRARY_PATH, `ldd -r` the binaries (fails fast)
#   smoke      `vlembed embed` of one text on $DEVICE (fails fast)
#   prep-clip  full-size random BGE-VL-base and -large made with the host's
#              torch on the GPU, their references (f32, bf16), and the PyTorch
#              bf16 model alone at several batch sizes (the baseline)
#   prep-mllm  the same for a full-size random BGE-VL-MLLM (LLaVA-NeXT +
#              Mistral-7B, bf16, ~15 GB), in the background during `parity`
#   parity     one server with the committed fixtures in f32 and bf16 on
#              $DEVICE (plus f32 on cpu as a control) and the full-size base
#              and large in f32: /embed against the references
#   base, mllm, large
#              one server each (bf16, cache off, request limits raised):
#              parity against PyTorch f32 and bf16, then closed-loop clients:
#              single images and single texts at $LEVELS (CLIP), composed
#              queries at $MLLM_LEVELS (MLLM); batches formed, GPU memory and
#              utilisation, preprocessing vs inference time, CPU
#   report     $OUT (or OUT_DIR)/gpu-check.md, gpu-check.json,
#              gpu-check-logs.tar.xz, written even after failures/timeouts
#
# Environment (defaults for the GPU run; the dry run uses small values):
#   OUT / OUT_DIR     report folder (default $WORK/out)
#   WORK              scratch (default /dev/shm/vlembed-gpu-check when it has
#                     24 GB free, else /tmp/vlembed-gpu-check)
#   BUNDLE            the bundle folder (default dist/gpu-bundle)
#   BUDGET_S          the whole check, seconds (450; dry run 270)
#   DEVICE            cuda:0 (dry run: cpu)
#   PY                Python with torch + transformers (python3; dry run:
#                     GPU_CHECK_PYTHON, else a venv made once from
#                     scripts/requirements-gpu-check.txt)
#   LEVELS            CLIP client counts ("1 64 256"); MLLM_LEVELS ("1 8 32")
#   LOAD_S            seconds per CLIP level (6); MLLM_LOAD_S (10)
#   PREPROCESS_THREADS server.preprocess_threads (default: vlembed's "auto": on
#                     a GPU all cores but HTTP's and the worker's; /info's
#                     resolved value goes to the report)
#   MAX_BATCH_SIZE    CLIP model's max_batch_size (default: "auto", 256 on a
#                     GPU); MAX_DELAY_MS (0)
#   LOADGEN_THREADS   client threads at >= 64 clients (4)
#   CUDA_LIB_DIRS     instead of the host's nvidia wheel folders
#   SKIP              phases to skip, e.g. "large mllm" (smoke, prep-clip,
#                     prep-mllm, parity, base, mllm, large)
#   KEEP_MODELS=1     leave the made models in $WORK
#   SIZE              full | small (the made models; dry run: small)
#   PACK_PY           dry run: the Python that packs the inputs (default: as PY)
# Exit status: 0 when every phase ran, 1 when one failed or timed out, 3 when
# setup failed (the report is written in every case).
# Loopback only; every server and client it starts is stopped by PID.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$REPO/scripts/gpu-check.sh"
HELPER="$REPO/scripts/gpu_check.py"
cd "$REPO"

usage() { sed -n '2,/^set -uo/p' "$SELF" | sed '$d' | sed 's/^# \{0,1\}//'; }

# --- the per-phase entry points (this script runs itself under `timeout`) ----------
ts() { date -u +%H:%M:%S; }
say() { echo "[gpu-check $(ts)] $*"; }
now_s() { date +%s.%N; }
left_s() { echo $(( ${1:-$DEADLINE} - $(date +%s) )); }
note() { echo "$*" >>"$WORK/notes.txt"; say "note: $*"; }
# the line of a log that most likely says why a step failed
reason() {
  { grep -iE 'error|panic|cannot|failed|not found|no such|killed|refused' "$1" | grep -v '^\[gpu-check' ||
    grep -v '^\[gpu-check' "$1" | grep -v '^\s*$'; } 2>/dev/null | tail -1 | tr '\t' ' ' | cut -c1-240
}

SERVER_PID=""
stop_server() {
  [ -n "$SERVER_PID" ] || return 0
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  local i
  for i in $(seq 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
  kill -KILL "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
}

# http_get URL SECONDS: the body on stdout, non-zero unless 2xx (curl when the host has it)
if command -v curl >/dev/null 2>&1; then
  http_get() { curl -fsS -m "$2" "$1"; }
else
  http_get() {
    python3 -c 'import sys, urllib.request; sys.stdout.buffer.write(urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])).read())' "$1" "$2"
  }
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# The batch limits and preprocessing threads are vlembed's device-dependent
# defaults ("auto": the GPU's on $DEVICE = cuda:N; `vlembed config`, logged per
# server, and /info show what they resolved to); only what a load test needs
# beyond them is written here.
write_server_config() { # file port max_batch_size (empty: auto) max_queue_inputs models-toml
  cat >"$1" <<TOML
# written by scripts/gpu-check.sh: loopback, request limits raised, cache off
[server]
host = "127.0.0.1"
port = $2
max_concurrent_requests = 1024
max_inputs_per_request = 256
max_connections = 2048
request_timeout_ms = 120000
preprocess_threads = ${PREPROCESS_THREADS:-\"auto\"}
access_log = false
shutdown_timeout_ms = 20000

[model_defaults]
devices = ["$DEVICE"]
max_batch_size = ${3:-\"auto\"}
max_queue_inputs = $4
max_delay_ms = $MAX_DELAY_MS
embedding_cache_bytes = 0

$5
TOML
}

# start_server NAME CONFIG: sets SERVER_PID, URL, READY_S (seconds from start to /ready) and
# SERVER_THREADS (the preprocessing threads it resolved)
start_server() {
  local name="$1" cfg="$2" port
  port=$(sed -n 's/^port = //p' "$cfg" | head -1)
  URL="http://127.0.0.1:$port"
  if "$BIN" config --help >/dev/null 2>&1; then # issue 21's `vlembed config`, when present
    timeout --foreground 20 "$BIN" config --config "$cfg" >"$LOGS/config-$name.txt" 2>&1 || true
  fi
  local t0 t1
  t0=$(now_s)
  VLEMBED_LOG="${VLEMBED_LOG:-warn}" "$BIN" serve --config "$cfg" >"$LOGS/server-$name.log" 2>&1 &
  SERVER_PID=$!
  echo "$SERVER_PID" >>"$WORK/pids"
  while :; do
    if http_get "$URL/ready" 2 >/dev/null 2>&1; then break; fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      say "server $name exited before it was ready; its log:" >&2
      { grep -iE 'error|panic|warn' "$LOGS/server-$name.log" || tail -5 "$LOGS/server-$name.log"; } | tail -5 |
        sed 's/^/[server log] /' >&2
      SERVER_PID=""
      return 1
    fi
    if [ "$(left_s "$PHASE_DEADLINE")" -le 5 ]; then
      say "server $name not ready before the phase's time ran out" >&2
      tail -5 "$LOGS/server-$name.log" | sed 's/^/[server log] /' >&2
      return 1
    fi
    sleep 0.2
  done
  t1=$(now_s)
  http_get "$URL/info" 5 >"$LOGS/info-$name.json" 2>/dev/null || true
  READY_S=$(python3 -c "print(f'{$t1 - $t0:.2f}')")
  SERVER_THREADS=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["server"]["preprocess_threads"])' \
    "$LOGS/info-$name.json" 2>/dev/null) || SERVER_THREADS="${PREPROCESS_THREADS:-$(nproc)}"
}

gpu_sampler() { # out-file pid: "mem_used_mib util_pct server_mem_mib" every second
  local out="$1" pid="$2" g p
  while :; do
    g=$(nvidia-smi -i "$GPU_INDEX" --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits 2>/dev/null | tr -d ',' | head -1)
    p=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null |
      awk -F', *' -v p="$pid" '$1 == p {print $2}' | head -1)
    [ -n "$g" ] && echo "$g ${p:--}" >>"$out"
    sleep 1
  done
}

# measure FAMILY MODEL DTYPE MODALITY CLIENTS SECONDS [loadgen args...]
measure() {
  local family="$1" model="$2" dtype="$3" modality="$4" c="$5" secs="$6"
  shift 6
  local tag="$family-$modality-c$c" threads=1 rc=0
  if [ "$(left_s "$PHASE_DEADLINE")" -lt $((secs + 12)) ]; then
    note "$family $modality x$c skipped: the phase's time ran out"
    return 0
  fi
  [ "$c" -ge 64 ] && threads="$LOADGEN_THREADS"
  local kind=image
  [ "$modality" = text ] && kind=text
  [ "$modality" = composed ] && kind=composed
  http_get "$URL/metrics" 10 >"$LOGS/metrics-$tag-before.txt" 2>/dev/null || true
  local ticks0 ticks1 t0 t1 sampler=""
  ticks0=$(awk '{print $14 + $15}' "/proc/$SERVER_PID/stat" 2>/dev/null || echo "")
  local stat0 stat1
  stat0=$(awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6; exit}' /proc/stat)
  : >"$LOGS/gpu-$tag.txt"
  if [ "$HAVE_GPU" = 1 ]; then
    gpu_sampler "$LOGS/gpu-$tag.txt" "$SERVER_PID" &
    sampler=$!
  fi
  t0=$(now_s)
  timeout --foreground -k 5 $((secs + 90)) "$LOADGEN" --url "$URL" --kind "$kind" --concurrency "$c" --threads "$threads" \
    --duration "$secs" --timeout 60 --label "$tag" --json "$LOGS/loadgen-$tag.json" "$@" \
    2>>"$LOGS/loadgen.log" || rc=$?
  t1=$(now_s)
  [ -n "$sampler" ] && { kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null; }
  ticks1=$(awk '{print $14 + $15}' "/proc/$SERVER_PID/stat" 2>/dev/null || echo "")
  stat1=$(awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6; exit}' /proc/stat)
  http_get "$URL/metrics" 10 >"$LOGS/metrics-$tag-after.txt" 2>/dev/null || true
  [ "$rc" = 0 ] || note "loadgen $tag exited $rc"
  python3 "$HELPER" load --result "$RESULTS/throughput.json" --loadgen-json "$LOGS/loadgen-$tag.json" \
    --metrics-before "$LOGS/metrics-$tag-before.txt" --metrics-after "$LOGS/metrics-$tag-after.txt" \
    --gpu-samples "$LOGS/gpu-$tag.txt" --model "$model" --family "$family" --dtype "$dtype" \
    --device "$DEVICE" --modality "$modality" --concurrency "$c" --t0 "$t0" --t1 "$t1" \
    --ticks0 "$ticks0" --ticks1 "$ticks1" --hz "$(getconf CLK_TCK)" --cores "$(nproc)" \
    --preprocess-threads "${SERVER_THREADS:-${PREPROCESS_THREADS:-$(nproc)}}" --machine-stat0 "$stat0" --machine-stat1 "$stat1"
}

parity() { # model label dtype device [flags] -- reference specs as NAME=FILE
  local model="$1" label="$2" dtype="$3" device="$4"
  shift 4
  timeout --foreground -k 5 "$(( $(left_s "$PHASE_DEADLINE") > 10 ? $(left_s "$PHASE_DEADLINE") - 5 : 5 ))" \
    python3 "$HELPER" parity --url "$URL" --model "$model" --label "$label" --dtype "$dtype" \
    --device "$device" --result "$RESULTS/parity.json" --timeout 120 "$@" || true
}

# The parity server's models, one line each:
# name|source|dtype|device|label|reference|flags
parity_models() {
  local m d full="$WORK/models"
  for m in clip-tiny clip-tiny-eos mllm-tiny-a mllm-tiny-b; do
    for d in f32 bf16; do
      echo "fx-$m-$d|$REPO/tests/fixtures/$m|$d|$DEVICE|$m|tests/fixtures/reference/$m.json|"
    done
    if [ "$DEVICE" != cpu ]; then
      for d in f32 bf16; do
        echo "cpu-$m-$d|$REPO/tests/fixtures/$m|$d|cpu|$m|tests/fixtures/reference/$m.json|--control"
      done
    fi
  done
  for m in base large; do
    [ -f "$full/bge-vl-$m/ref-f32.json" ] &&
      echo "full-$m-f32|$full/bge-vl-$m|f32|$DEVICE|bge-vl-$m ($SIZE_LABEL)|$full/bge-vl-$m/ref-f32.json|--full"
  done
  if [ "$DEVICE" != cpu ] && [ -f "$full/bge-vl-base/ref-f32.json" ]; then
    echo "cpu-base-f32|$full/bge-vl-base|f32|cpu|bge-vl-base ($SIZE_LABEL)|$full/bge-vl-base/ref-f32.json|--control --full"
  fi
}

phase_parity() {
  trap 'stop_server' EXIT
  local cfg="$WORK/parity.toml" lines name src dtype dev label ref flags models tries failed
  lines=$(parity_models)
  # One server for all; a model that fails to load is recorded and left out of the next try.
  for tries in 1 2 3 4 5 6; do
    models=""
    while IFS='|' read -r name src dtype dev label ref flags; do
      [ -n "$name" ] || continue
      models+=$'\n'"[[models]]"$'\n'"name = \"$name\""$'\n'"source = \"$src\""$'\n'"dtype = \"$dtype\""$'\n'"devices = [\"$dev\"]"$'\n'
    done <<<"$lines"
    [ -n "$models" ] || return 1
    write_server_config "$cfg" "$(free_port)" "" 1024 "$models"
    if start_server "parity-$tries" "$cfg"; then break; fi
    failed=$(sed -n 's/.*model \([^ ]*\) failed to load.*/\1/p' "$LOGS/server-parity-$tries.log" | head -1)
    [ -n "$failed" ] && grep -q "^$failed|" <<<"$lines" || return 1
    IFS='|' read -r name src dtype dev label ref flags <<<"$(grep "^$failed|" <<<"$lines")"
    # shellcheck disable=SC2086
    python3 "$HELPER" parity --url - --model "$name" --label "$label" --dtype "$dtype" --device "$dev" \
      --result "$RESULTS/parity.json" --reference "reference=$ref" $flags \
      --error "failed to load: $(grep 'failed to load: ' "$LOGS/server-parity-$tries.log" | tail -1 | sed 's/.*failed to load: //' | cut -c1-300)"
    lines=$(grep -v "^$failed|" <<<"$lines")
    say "left $failed out of the parity server; trying again"
  done
  [ -n "$SERVER_PID" ] || return 1
  say "parity server ready in ${READY_S} s"
  while IFS='|' read -r name src dtype dev label ref flags; do
    [ -n "$name" ] || continue
    # shellcheck disable=SC2086
    parity "$name" "$label" "$dtype" "$dev" --reference "reference=$ref" $flags
  done <<<"$lines"
  stop_server
}

phase_clip() { # base|large
  trap 'stop_server' EXIT
  local kind="$1" dir="$WORK/models/bge-vl-$1" cfg="$WORK/$1.toml"
  [ -f "$dir/config.json" ] || { echo "error: no model in $dir (prep-clip failed)"; return 1; }
  write_server_config "$cfg" "$(free_port)" "$MAX_BATCH_SIZE" 4096 \
    "[[models]]
name = \"bge-vl-$kind\"
source = \"$dir\"
dtype = \"bf16\""
  start_server "$kind" "$cfg" || return 1
  echo "$kind $READY_S" >>"$RESULTS/load-times.tsv"
  say "bge-vl-$kind bf16 ready in ${READY_S} s"
  parity "bge-vl-$kind" "bge-vl-$kind ($SIZE_LABEL)" bf16 "$DEVICE" --full \
    --reference "reference=$dir/ref-f32.json" --reference "torch-bf16=$dir/ref-bf16.json"
  local img=(--images-dir "$INPUTS/images") txt=(--texts-file "$INPUTS/texts.txt")
  # warm-up (kernels load, cuBLAS picks its algorithms for the batch shapes): not measured
  timeout --foreground 60 "$LOADGEN" --url "$URL" --kind image --concurrency 64 --threads "$LOADGEN_THREADS" --duration "$WARM_S" \
    "${img[@]}" --json "$LOGS/warmup-$kind-image.json" 2>>"$LOGS/loadgen.log" || true
  timeout --foreground 60 "$LOADGEN" --url "$URL" --kind text --concurrency 64 --threads "$LOADGEN_THREADS" --duration "$WARM_S" \
    "${txt[@]}" --json "$LOGS/warmup-$kind-text.json" 2>>"$LOGS/loadgen.log" || true
  local c
  for c in $LEVELS; do measure "$kind" "bge-vl-$kind" bf16 image "$c" "$LOAD_S" "${img[@]}"; done
  for c in $LEVELS; do measure "$kind" "bge-vl-$kind" bf16 text "$c" "$LOAD_S" "${txt[@]}"; done
  stop_server
}

phase_mllm() {
  trap 'stop_server' EXIT
  local dir="$WORK/models/bge-vl-mllm" cfg="$WORK/mllm.toml"
  [ -f "$dir/config.json" ] || { echo "error: no model in $dir (prep-mllm failed)"; return 1; }
  write_server_config "$cfg" "$(free_port)" "" 1024 \
    "[[models]]
name = \"bge-vl-mllm\"
source = \"$dir\"
dtype = \"bf16\""
  start_server mllm "$cfg" || return 1
  echo "mllm $READY_S" >>"$RESULTS/load-times.tsv"
  say "bge-vl-mllm bf16 ready in ${READY_S} s"
  local refs=()
  [ -f "$dir/ref-f32.json" ] && refs+=(--reference "reference=$dir/ref-f32.json")
  refs+=(--reference "torch-bf16=$dir/ref-bf16.json")
  parity bge-vl-mllm "bge-vl-mllm ($SIZE_LABEL)" bf16 "$DEVICE" --full "${refs[@]}"
  local args=(--images-dir "$INPUTS/images" --texts-file "$INPUTS/texts.txt" --role query
    --instruction "Retrieve the target image that best meets the combined criteria by using both the provided image and the image retrieval instructions: ")
  timeout --foreground 120 "$LOADGEN" --url "$URL" --kind composed --concurrency 2 --requests 4 --duration 60 "${args[@]}" \
    --json "$LOGS/warmup-mllm.json" 2>>"$LOGS/loadgen.log" || true
  local c
  for c in $MLLM_LEVELS; do measure mllm bge-vl-mllm bf16 composed "$c" "$MLLM_LOAD_S" "${args[@]}"; done
  stop_server
  # f32 parity last, when the phase has time left (30 GB of weights on the GPU)
  if [ -f "$dir/ref-f32.json" ] && [ "$(left_s "$PHASE_DEADLINE")" -ge 45 ]; then
    write_server_config "$WORK/mllm-f32.toml" "$(free_port)" 8 1024 \
      "[[models]]
name = \"bge-vl-mllm-f32\"
source = \"$dir\"
dtype = \"f32\""
    start_server mllm-f32 "$WORK/mllm-f32.toml" || return 0
    say "bge-vl-mllm f32 ready in ${READY_S} s"
    parity bge-vl-mllm-f32 "bge-vl-mllm ($SIZE_LABEL)" f32 "$DEVICE" --full \
      --reference "reference=$dir/ref-f32.json" --reference "torch-bf16=$dir/ref-bf16.json"
    stop_server
  else
    note "bge-vl-mllm f32 parity skipped (no f32 reference, or under 45 s left in the phase)"
  fi
}

if [ "${1:-}" = --phase ]; then
  shift
  case "$1" in
    parity) phase_parity ;;
    base | large) phase_clip "$1" ;;
    mllm) phase_mllm ;;
    *) echo "unknown phase $1" >&2; exit 2 ;;
  esac
  exit $?
fi

# --- the main run ----------------------------------------------------------------
MODE=gpu
for arg in "$@"; do
  case "$arg" in
    --dry-run) MODE=dry-run ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

if [ "$MODE" = dry-run ]; then # the fixture environment, made once (before the budget starts)
  GPU_CHECK_PYTHON=$("$REPO/scripts/gpu-check-venv.sh") || { echo "no Python environment for the dry run" >&2; exit 3; }
fi

START=$(date +%s)
if [ "$MODE" = gpu ]; then
  : "${BUDGET_S:=450}" "${DEVICE:=cuda:0}" "${SIZE:=full}" "${LEVELS:=1 64 256}" "${MLLM_LEVELS:=1 8 32}"
  : "${LOAD_S:=6}" "${MLLM_LOAD_S:=10}" "${WARM_S:=3}" "${IMAGE_BATCHES:=64,128,256,512}"
  : "${TEXT_BATCHES:=64,256,1024}" "${MLLM_BATCHES:=1,4,8,16}" "${MIN_S:=1.0}" "${MLLM_SHARD_GB:=4}"
  if [ -z "${WORK:-}" ]; then
    shm_free=$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 {print int($4 / 1048576)}')
    if [ "${shm_free:-0}" -ge 24 ]; then WORK=/dev/shm/vlembed-gpu-check; else WORK=/tmp/vlembed-gpu-check; fi
  fi
  PY="${PY:-python3}"
else
  : "${BUDGET_S:=270}" "${DEVICE:=cpu}" "${SIZE:=small}" "${LEVELS:=1 64}" "${MLLM_LEVELS:=1 2}"
  : "${LOAD_S:=2}" "${MLLM_LOAD_S:=2}" "${WARM_S:=1}" "${IMAGE_BATCHES:=1,4}" "${TEXT_BATCHES:=4,16}"
  : "${MLLM_BATCHES:=1,2}" "${MIN_S:=0.2}" "${MLLM_SHARD_GB:=0.004}" "${WORK:=/tmp/vlembed-gpu-dry-run}"
fi
: "${PREPROCESS_THREADS:=}" "${MAX_BATCH_SIZE:=}" "${MAX_DELAY_MS:=0}" "${LOADGEN_THREADS:=4}"
: "${BUNDLE:=dist/gpu-bundle}" "${SKIP:=}"
OUT="${OUT:-${OUT_DIR:-$WORK/out}}"
DEADLINE=$((START + BUDGET_S))
PHASE_DEADLINE=$DEADLINE
GPU_INDEX="${DEVICE#cuda:}"
HAVE_GPU=0
[ "$DEVICE" != cpu ] && command -v nvidia-smi >/dev/null 2>&1 && HAVE_GPU=1

# A previous run's folder (marked) is emptied; any other non-empty folder is refused.
if [ -d "$WORK" ] && [ -n "$(ls -A "$WORK" 2>/dev/null)" ]; then
  [ -f "$WORK/.vlembed-gpu-check" ] || { echo "WORK=$WORK is not empty and not a gpu-check folder" >&2; exit 2; }
  rm -rf "${WORK:?}"/*
fi
mkdir -p "$WORK"
touch "$WORK/.vlembed-gpu-check"
mkdir -p "$WORK/bin" "$WORK/logs" "$WORK/results" "$WORK/models" "$OUT"
LOGS="$WORK/logs"
RESULTS="$WORK/results"
: >"$WORK/phases.tsv"
: >"$WORK/pids"
: >"$WORK/notes.txt"
SIZE_LABEL="full size"
[ "$SIZE" = small ] && SIZE_LABEL="small, dry run"
export NO_COLOR=1 SIZE_LABEL # plain server logs; the label of the made models
export REPO SELF HELPER WORK OUT LOGS RESULTS DEVICE GPU_INDEX HAVE_GPU DEADLINE PREPROCESS_THREADS \
  MAX_BATCH_SIZE MAX_DELAY_MS LOADGEN_THREADS LEVELS MLLM_LEVELS LOAD_S MLLM_LOAD_S WARM_S MODE

record() { # phase status seconds note
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >>"$WORK/phases.tsv"
  say "phase $1: $2 (${3:-0} s)${4:+ - $4}"
}

# run_phase NAME LIMIT CMD...: under timeout, within the budget; output to logs/NAME.log,
# progress lines ("[...") also to stdout
run_phase() {
  local name="$1" limit="$2"
  shift 2
  case " $SKIP " in *" $name "*) record "$name" skipped "" "SKIP"; return 1 ;; esac
  local left
  left=$(left_s)
  if [ "$left" -lt 20 ]; then
    record "$name" skipped "" "time budget spent (${left} s left)"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "phase $name (at most $limit s; $left s of the budget left)"
  local t0 rc
  t0=$(now_s)
  PHASE_DEADLINE=$(( $(date +%s) + limit )) timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOGS/$name.log" |
    { grep --line-buffered '^\[' || true; }
  rc=${PIPESTATUS[0]}
  local dt
  dt=$(python3 -c "print(f'{$(now_s) - $t0:.1f}')")
  case "$rc" in
    0) record "$name" ok "$dt" ;;
    124 | 137) record "$name" timeout "$dt" "stopped after $limit s"; tail -5 "$LOGS/$name.log" ;;
    *) record "$name" failed "$dt" "exit $rc: $(reason "$LOGS/$name.log")"
       tail -8 "$LOGS/$name.log" ;;
  esac
  return "$rc"
}

BG_PID=""
BG_NAME=""
BG_T0=""
start_bg_phase() { # name limit cmd...: like run_phase, in the background
  local name="$1" limit="$2"
  shift 2
  case " $SKIP " in *" $name "*) record "$name" skipped "" "SKIP"; return 1 ;; esac
  local left
  left=$(left_s)
  [ "$limit" -gt "$left" ] && limit=$left
  say "phase $name in the background (at most $limit s)"
  BG_NAME=$name
  BG_T0=$(now_s)
  timeout -k 10 "$limit" "$@" >"$LOGS/$name.log" 2>&1 &
  BG_PID=$!
  echo "$BG_PID" >>"$WORK/pids"
}
wait_bg_phase() {
  [ -n "$BG_PID" ] || return 0
  local rc=0
  wait "$BG_PID" || rc=$?
  grep '^\[' "$LOGS/$BG_NAME.log" | sed 's/^/  /'
  local dt
  dt=$(python3 -c "print(f'{$(now_s) - $BG_T0:.1f}')")
  case "$rc" in
    0) record "$BG_NAME" ok "$dt" ;;
    124 | 137) record "$BG_NAME" timeout "$dt" ;;
    *) record "$BG_NAME" failed "$dt" "exit $rc: $(reason "$LOGS/$BG_NAME.log")"
       tail -8 "$LOGS/$BG_NAME.log" ;;
  esac
  BG_PID=""
  return "$rc"
}

write_meta() {
  ELAPSED=$(( $(date +%s) - START )) python3 - "$WORK/meta.json" <<'PY'
import json, os, subprocess, sys, platform
def sh(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        return ""
e = os.environ
meta = {"mode": e.get("MODE"), "started": e.get("STARTED"), "budget_s": int(e.get("BUDGET_S", 0)),
        "elapsed_s": float(e.get("ELAPSED", 0)), "device": e.get("DEVICE"), "models_dir": e.get("WORK", "") + "/models",
        "cores": os.cpu_count(), "cuda_libs": e.get("CUDA_LIB_DIRS") or "-",
        "python": f"{e.get('PY', 'python3')} ({sh(e.get('PY', 'python3'), '-c', 'import sys; print(sys.version.split()[0])')})",
        "binary": e.get("BIN_INFO", "-"), "bundle": e.get("BUNDLE_INFO", "-"), "commit": e.get("COMMIT", "-")}
try:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            meta["cpu"] = line.split(":", 1)[1].strip(); break
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal"):
            meta["mem_gib"] = round(int(line.split()[1]) / 1048576); break
except OSError:
    pass
if e.get("HAVE_GPU") == "1":
    q = sh("nvidia-smi", "-i", e["GPU_INDEX"], "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader")
    meta["gpu"] = q
    meta["driver"] = q.split(",")[-1].strip() if q else "-"
    for line in sh("nvidia-smi").splitlines():
        if "CUDA Version" in line:
            meta["cuda"] = line.split("CUDA Version:")[1].split()[0]
else:
    meta["gpu"] = "none (" + e.get("DEVICE", "?") + ")"
json.dump(meta, open(sys.argv[1], "w"), indent=1)
PY
}

finish() {
  local rc=$?
  trap - EXIT INT TERM
  [ -n "$BG_PID" ] && { kill -TERM "$BG_PID" 2>/dev/null; wait "$BG_PID" 2>/dev/null; record "$BG_NAME" stopped ""; }
  # whatever this run started and is still alive, by PID
  local p
  while read -r p; do
    [ -n "$p" ] && kill -0 "$p" 2>/dev/null && kill -TERM "$p" 2>/dev/null
  done <"$WORK/pids"
  sleep 1
  while read -r p; do
    [ -n "$p" ] && kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null
  done <"$WORK/pids"
  write_meta
  timeout 60 python3 "$HELPER" report --work "$WORK" --out "$OUT" --print || say "the report failed"
  # logs, compressed (the few files that come back: .md, .json, this)
  ( cd "$WORK" && timeout 60 python3 - "$OUT/gpu-check-logs.tar.xz" <<'PY'
import os, sys, tarfile
with tarfile.open(sys.argv[1], "w:xz", preset=6) as t:
    for d in ("logs", "results"):
        for root, _, files in os.walk(d):
            for f in sorted(files):
                p = os.path.join(root, f)
                if os.path.getsize(p) <= 8 << 20:
                    t.add(p)
    for f in ("phases.tsv", "notes.txt", "meta.json", "parity.toml", "base.toml", "large.toml", "mllm.toml", "mllm-f32.toml"):
        if os.path.exists(f):
            t.add(f)
PY
  ) || true
  [ "${KEEP_MODELS:-0}" = 1 ] || rm -rf "$WORK/models" "$WORK/bin"
  say "report: $OUT/gpu-check.md ($(( $(date +%s) - START )) s in all)"
  ls -la "$OUT" 2>/dev/null | tail -n +2
  exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT TERM

STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
export STARTED BUDGET_S PY
say "mode $MODE, device $DEVICE, budget $BUDGET_S s, work $WORK, report to $OUT"

# --- setup: binaries, CUDA libraries, ldd -r ------------------------------------------
unpack() { # file.xz -> dest
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"), 1 << 20)' "$1" "$2" &&
    chmod +x "$2"
}
SETUP_ERR="see the lines above"
setup_error() { SETUP_ERR="$*"; say "$*"; }
setup() {
  local t0 b
  t0=$(now_s)
  if [ "$MODE" = dry-run ]; then
    # this checkout's CPU release build, packed and unpacked like the bundle
    for b in target/release/vlembed target/release/examples/loadgen; do
      [ -x "$b" ] || { setup_error "missing $b: cargo build --release --locked --bin vlembed --example loadgen"; return 1; }
    done
    if readelf -d target/release/vlembed 2>/dev/null | grep -q 'libcuda'; then
      setup_error "target/release/vlembed is a --features cuda build: cargo build --release --locked --bin vlembed --example loadgen"
      return 1
    fi
    mkdir -p "$WORK/bundle"
    for b in vlembed examples/loadgen; do
      cp "target/release/$b" "$WORK/bin/$(basename "$b").raw" && { strip "$WORK/bin/$(basename "$b").raw" 2>/dev/null || true; }
      python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(open(sys.argv[1], "rb"), lzma.open(sys.argv[2], "wb", preset=0), 1 << 20)' \
        "$WORK/bin/$(basename "$b").raw" "$WORK/bundle/$(basename "$b").xz" || return 1
      rm -f "$WORK/bin/$(basename "$b").raw"
    done
    BUNDLE="$WORK/bundle"
    echo "dry run: target/release (CPU build), $(git rev-parse --short HEAD 2>/dev/null)" >"$BUNDLE/BUILD-INFO.txt"
    PY="$GPU_CHECK_PYTHON"
    say "packing the inputs (scripts/gpu_check.py pack) with $PY"
    timeout 120 "${PACK_PY:-$PY}" "$HELPER" pack --compress --out "$BUNDLE/inputs" >>"$LOGS/pack.log" 2>&1 ||
      { tail -5 "$LOGS/pack.log"; setup_error "pack failed: $(tail -1 "$LOGS/pack.log" | cut -c1-200)"; return 1; }
  fi
  for b in vlembed loadgen; do
    [ -f "$BUNDLE/$b.xz" ] || { setup_error "missing $BUNDLE/$b.xz: make the bundle here with scripts/build-gpu-bundle.sh and carry $BUNDLE"; return 1; }
    unpack "$BUNDLE/$b.xz" "$WORK/bin/$b" || return 1
  done
  [ -f "$BUNDLE/inputs/texts.txt" ] || { setup_error "missing $BUNDLE/inputs (scripts/build-gpu-bundle.sh packs them)"; return 1; }
  BIN="$WORK/bin/vlembed"
  LOADGEN="$WORK/bin/loadgen"
  INPUTS="$BUNDLE/inputs"
  if [ -z "${CUDA_LIB_DIRS:-}" ]; then
    CUDA_LIB_DIRS=$(timeout 30 "$PY" - <<'PY'
import glob, os
dirs = []
try:
    import nvidia  # NVIDIA's wheels (torch's dependencies): nvidia/cu13/lib, nvidia/*/lib
    for base in nvidia.__path__:
        for d in sorted(glob.glob(os.path.join(base, "**", "lib"), recursive=True)):
            if glob.glob(os.path.join(d, "lib*.so*")) and d not in dirs:
                dirs.append(d)
except ImportError:
    pass
print(":".join(dirs))
PY
)
  fi
  export LD_LIBRARY_PATH="${CUDA_LIB_DIRS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  # The driver's libcuda.so.1: where the loader finds it, else in the usual
  # container locations (never a toolkit stub).
  if ldd "$BIN" 2>/dev/null | grep -q 'libcuda.so.1 => not found'; then
    local d
    for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/cuda/compat \
      /usr/local/cuda/lib64; do
      if [ -e "$d/libcuda.so.1" ]; then
        export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$d"
        CUDA_LIB_DIRS="$CUDA_LIB_DIRS:$d"
        say "libcuda.so.1 found in $d"
        break
      fi
    done
  fi
  BIN_INFO="NEEDED: $(readelf -d "$BIN" 2>/dev/null | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')"
  BUNDLE_INFO="$(head -3 "$BUNDLE/BUILD-INFO.txt" 2>/dev/null | tr '\n' ' ')"
  COMMIT=$(git rev-parse --short HEAD 2>/dev/null || sed -n 's/^commit: //p' "$BUNDLE/BUILD-INFO.txt" 2>/dev/null || echo -)
  export BIN_INFO BUNDLE_INFO COMMIT
  local bad=""
  for b in "$BIN" "$LOADGEN"; do
    ldd -r "$b" >"$LOGS/ldd-$(basename "$b").txt" 2>&1
    bad+=$(grep -E 'not found|undefined symbol' "$LOGS/ldd-$(basename "$b").txt")
  done
  if [ -n "$bad" ]; then
    say "ldd -r: unresolved libraries or symbols with LD_LIBRARY_PATH=$LD_LIBRARY_PATH:"
    echo "$bad" | head -20
    say "the binary needs: $(readelf -d "$BIN" 2>/dev/null | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')"
    setup_error "ldd -r: $(echo "$bad" | head -3 | tr '\n\t' '  ' | cut -c1-300) (install the NVIDIA wheels nvidia-cublas, -cuda-runtime, -cuda-nvrtc, -curand, or set CUDA_LIB_DIRS)"
    return 1
  fi
  BIN_INFO="$("$BIN" --version 2>&1 | head -1); $BIN_INFO"
  export BIN LOADGEN INPUTS CUDA_LIB_DIRS BIN_INFO BUNDLE_INFO COMMIT PY
  say "binaries: $BIN_INFO"
  say "CUDA libraries from: ${CUDA_LIB_DIRS:-(none found; system paths)}"
  record setup ok "$(python3 -c "print(f'{$(now_s) - $t0:.1f}')")"
}

if ! setup; then
  record setup failed "" "$SETUP_ERR"
  exit 3
fi
write_meta

# --- smoke: one embedding on the device --------------------------------------------
run_phase smoke 60 "$BIN" embed --model tests/fixtures/clip-tiny --device "$DEVICE" --dtype f32 \
  --text "a photo of a cat" || note "vlembed could not embed on $DEVICE: the server phases will fail the same way"

# --- models, references, PyTorch baseline ------------------------------------------
run_phase prep-clip 150 "$PY" "$HELPER" make-clip --size "$SIZE" --kinds base,large --out "$WORK/models" \
  --device "$DEVICE" --result "$RESULTS/prep-clip.json" --image-batches "$IMAGE_BATCHES" \
  --text-batches "$TEXT_BATCHES" --min-s "$MIN_S"
start_bg_phase prep-mllm 180 "$PY" "$HELPER" make-mllm --size "$SIZE" --inputs "$INPUTS" --out "$WORK/models" \
  --device "$DEVICE" --result "$RESULTS/prep-mllm.json" --batches "$MLLM_BATCHES" --min-s "$MIN_S" \
  --shard-gb "$MLLM_SHARD_GB"

# --- parity (while the MLLM is made) --------------------------------------------------
run_phase parity 100 "$SELF" --phase parity
wait_bg_phase

# --- throughput ------------------------------------------------------------------------
run_phase base 120 "$SELF" --phase base
run_phase mllm 150 "$SELF" --phase mllm
run_phase large 120 "$SELF" --phase large
# exit status: 0 when every phase ran, 1 when one failed or timed out (the report is complete either way)
if grep -qE $'\t(failed|timeout)\t' "$WORK/phases.tsv"; then exit 1; fi
exit 0
