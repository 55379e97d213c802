#!/usr/bin/env bash
# vlembed benchmark: the model alone, the server end to end, and the PyTorch
# reference, on a full-size random-weight BGE-VL model. See BENCHMARKS.md.
#
#   scripts/bench.sh [base|large] [--quick] [--no-reference] [--no-write]
#
#   base|large      which architecture (default base)
#   --quick         short run (batch sizes 1 and 8, short load phases; ~5 min for base)
#   --no-reference  skip the PyTorch reference
#   --no-write      do not update BENCHMARKS.md (the report still goes to $WORK)
#
# Environment:
#   VLEMBED_BENCH_PYTHON   python with torch 2.5.1 + transformers 4.45.2 (default:
#                          a virtual environment $VLEMBED_BENCH_WORK/venv that the
#                          script creates from scripts/requirements-fixtures.txt
#                          with python3 -m venv + pip, once; re-made when that
#                          file changes)
#   VLEMBED_BENCH_MODEL    model directory (default /tmp/bge-vl-<kind>-random;
#                          made with scripts/make_fixtures.py --full when absent)
#   VLEMBED_BENCH_WORK     scratch folder (default /tmp/vlembed-bench)
#   VLEMBED_BENCH_PORT     server port (default: a free loopback port)
#   VLEMBED_BENCH_DTYPE    vlembed's dtype, model alone and server (default f32;
#                          bf16 uses the AVX512-BF16 kernels where the CPU has them)
#   VLEMBED_BENCH_BACKENDS the CPU backends the model alone is measured on, in turn
#                          (default "native onednn" when Debian's libdnnl-dev is
#                          installed, which also builds with --features onednn;
#                          else "native")
#   VLEMBED_BENCH_CPU_BACKEND  the server's --cpu-backend (default auto: it
#                          measures at load; the choice is in the report)
#   VLEMBED_BENCH_QUERY_INTERVAL_MS  pause of the query client between two
#                          single-text requests in the mixed scenario (default 200)
#   RAYON_NUM_THREADS      passed through to the model and the server
#
# Everything runs on loopback; the server is stopped on exit, whatever happens.
set -euo pipefail

# The whole script is one block, read before it runs: editing the file during a
# run does not affect that run.
{

KIND=base
QUICK=0
REFERENCE=1
WRITE=1
for arg in "$@"; do
    case "$arg" in
        base|large) KIND=$arg ;;
        --quick) QUICK=1 ;;
        --no-reference) REFERENCE=0 ;;
        --no-write) WRITE=0 ;;
        -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
COMMAND="scripts/bench.sh $*"
MODEL=${VLEMBED_BENCH_MODEL:-/tmp/bge-vl-$KIND-random}
DTYPE=${VLEMBED_BENCH_DTYPE:-f32}
WORK=${VLEMBED_BENCH_WORK:-/tmp/vlembed-bench}
QUERY_MS=${VLEMBED_BENCH_QUERY_INTERVAL_MS:-200}
# oneDNN when its headers are there (Debian's libdnnl-dev): built in, measured.
FEATURES=()
if [[ -e /usr/include/oneapi/dnnl/dnnl.h ]]; then
    FEATURES=(--features onednn)
    BACKENDS=${VLEMBED_BENCH_BACKENDS:-native onednn}
else
    BACKENDS=${VLEMBED_BENCH_BACKENDS:-native}
fi
SERVER_BACKEND=${VLEMBED_BENCH_CPU_BACKEND:-auto}
# oneDNN's OpenMP threads sleep as soon as a product ends (README, CPU backends).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
RUN="$WORK/run-$KIND"
INPUTS="$WORK/inputs"
HELPER="$REPO/scripts/bench_reference.py"

if [[ $QUICK == 1 ]]; then
    MODE=quick
    BATCHES=1,4,8       # 4: the image batches the server forms (max_batch_cost 1024 / 224)
    REPS=3
    WARMUP=1
    TEXT_REPS=20
    LOAD_S=8            # seconds each server scenario issues requests
    MIXED_CLIENTS="8"
    LEVELS="1 8 32 64"
else
    MODE=full
    BATCHES=1,4,8,32
    REPS=5
    WARMUP=1
    TEXT_REPS=50
    LOAD_S=30
    MIXED_CLIENTS="8 32"
    LEVELS="1 8 32 64"
fi
TEXT_BATCHES=1,8,32     # 32: the text batches 32 single-text clients get
TEXT_CLIENTS=32
REQ_TIMEOUT=120         # per request, seconds (the server's own limit is 30 s)

log() { printf '\n[bench %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

SERVER_PID=""
cleanup() {
    local rc=$?
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
    if [[ $rc != 0 ]]; then
        echo "bench: failed (exit $rc); logs in $RUN" >&2
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- CPU accounting: how much CPU did other processes use meanwhile? ----------
# Appends "stage busy_ticks our_ticks" to cpu.txt: busy ticks of the whole
# machine (/proc/stat) and ticks of this script, its waited-for children and
# the running server. The difference is what other processes took.
cpu_mark() {
    local busy ours s
    busy=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9; exit}' /proc/stat)
    ours=$(awk '{print $14+$15+$16+$17}' "/proc/$$/stat")
    if [[ -n "$SERVER_PID" && -r "/proc/$SERVER_PID/stat" ]]; then
        s=$(awk '{print $14+$15}' "/proc/$SERVER_PID/stat" 2>/dev/null || echo 0)
        ours=$((ours + s))
    fi
    echo "$1 $busy $ours $(date +%s.%N) $(cut -d' ' -f1 /proc/loadavg)" >>"$RUN/cpu.txt"
}

# --- 0. python, model, inputs, build -------------------------------------------
mkdir -p "$WORK"
# The Python side (random model, inputs, PyTorch reference, report): the given
# interpreter, else a virtual environment of our own from the pinned
# requirements, made once and re-made when the requirements change.
if [[ -n "${VLEMBED_BENCH_PYTHON:-}" ]]; then
    PY=$VLEMBED_BENCH_PYTHON
else
    VENV="$WORK/venv"
    REQS="$REPO/scripts/requirements-fixtures.txt"
    STAMP="$VENV/.requirements.sha256"
    want=$(sha256sum "$REQS" | cut -d' ' -f1)
    if [[ ! -x "$VENV/bin/python" || "$(cat "$STAMP" 2>/dev/null)" != "$want" ]]; then
        command -v python3 >/dev/null || { echo "bench: python3 is needed (or set VLEMBED_BENCH_PYTHON)" >&2; exit 1; }
        log "creating $VENV from $REQS (once; downloads torch, a few minutes)"
        rm -rf "$VENV"
        python3 -m venv "$VENV"
        timeout 3600 "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQS"
        echo "$want" >"$STAMP"
    fi
    PY="$VENV/bin/python"
fi
rm -rf "$RUN"
mkdir -p "$RUN"
START_EPOCH=$(date +%s)
LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "mode $MODE, model $KIND, load average at start: $LOAD_AT_START"

if [[ ! -f "$MODEL/model.safetensors" && ! -f "$MODEL/model.safetensors.index.json" ]] \
    || [[ ! -f "$MODEL/config.json" || ! -f "$MODEL/tokenizer.json" ]]; then
    log "making the random-weight $KIND model in $MODEL (a few minutes)"
    timeout 3600 "$PY" scripts/make_fixtures.py --full "$KIND" --out "$MODEL"
fi
if [[ $(find "$INPUTS/images" -name '*.jpg' 2>/dev/null | wc -l) -lt 32 || ! -s "$INPUTS/texts.txt" ]]; then
    log "making the benchmark inputs in $INPUTS"
    timeout 600 "$PY" "$HELPER" inputs --out "$INPUTS" --n 32
fi

log "building (release)"
timeout 3600 cargo build --release --locked "${FEATURES[@]}" --bin vlembed --example bench_model --example loadgen
BIN=$REPO/target/release/vlembed
EX=$REPO/target/release/examples

{
    echo "mode=$MODE"
    echo "kind=$KIND"
    echo "dtype=$DTYPE"
    echo "command=$COMMAND"
    echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "dirty=$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null | wc -l)"
    echo "cpu=$(awk -F': *' '/^vendor_id/{v=$2} /^model name/{n=$2} /^cpu family/{f=$2} /^model\t/{m=$2} /^cpu MHz/{z=$2}
        /^flags/{b=($0 ~ / avx512_bf16/) ? ", avx512_bf16" : ($0 ~ / avx2/ ? ", avx2" : "")
                 a=($0 ~ / amx_bf16/) ? ", amx_bf16 amx_tile" : ", no AMX"}
        END{printf "%s %s (family %s model %s, %.0f MHz%s%s)", v, n, f, m, z, b, a}' /proc/cpuinfo)"
    # One key per CPU kind for BENCHMARKS.md's sections.
    echo "cpu_key=$(awk -F': *' '/^vendor_id/{v=$2} /^cpu family/{f=$2} /^model\t/{m=$2}
        END{printf "%s-%s-%s", v, f, m}' /proc/cpuinfo)"
    echo "backends=$BACKENDS"
    echo "server_backend=$SERVER_BACKEND"
    echo "omp_wait_policy=${OMP_WAIT_POLICY:-}"
    echo "cores=$(nproc)"
    echo "mem_gib=$(awk '/MemTotal/{printf "%.0f", $2/1048576}' /proc/meminfo)"
    echo "load_at_start=$LOAD_AT_START"
    echo "rayon_num_threads=${RAYON_NUM_THREADS:-}"
    echo "model_dir=$MODEL"
    echo "weights_bytes=$(find "$MODEL" -maxdepth 1 -name 'model*.safetensors' -printf '%s\n' | awk '{s+=$1} END{print s+0}')"
    echo "batches=$BATCHES"
    echo "text_batches=$TEXT_BATCHES"
    echo "text_clients=$TEXT_CLIENTS"
    echo "reps=$REPS"
    echo "warmup=$WARMUP"
    echo "load_s=$LOAD_S"
    echo "query_interval_ms=$QUERY_MS"
    echo "rustc=$(rustc --version)"
} >"$RUN/meta.txt"

# Five idle seconds: whatever CPU is used now is other processes'.
cpu_mark before
sleep 5
cpu_mark idle-5s

# --- 1. the model alone, on each CPU backend -------------------------------------
for backend in $BACKENDS; do
    log "model alone (vlembed, $backend, $BATCHES)"
    timeout 3600 "$EX/bench_model" --model "$MODEL" --dtype "$DTYPE" --cpu-backend "$backend" --inputs "$INPUTS" \
        --batch-sizes "$BATCHES" --text-batch-sizes "$TEXT_BATCHES" --reps "$REPS" --warmup "$WARMUP" \
        --text-latency-reps "$TEXT_REPS" --json "$RUN/model-$backend.json"
done
cpu_mark model

# --- 2. the PyTorch reference --------------------------------------------------
if [[ $REFERENCE == 1 ]]; then
    log "model alone (PyTorch reference, f32 and bf16 autocast)"
    timeout 3600 "$PY" "$HELPER" run --model "$MODEL" --inputs "$INPUTS" --batch-sizes "$BATCHES" \
        --text-batch-sizes "$TEXT_BATCHES" --reps "$REPS" --warmup "$WARMUP" --text-latency-reps "$TEXT_REPS" --json "$RUN/reference.json"
fi
cpu_mark reference

# --- 3. the server end to end --------------------------------------------------
PORT=${VLEMBED_BENCH_PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
URL="http://127.0.0.1:$PORT"
log "server on $URL"
# The embedding cache is off: the benchmark repeats its 32 inputs, and it
# measures the model behind the server, not cache hits.
VLEMBED_MODEL_DEFAULTS__EMBEDDING_CACHE_BYTES=0 VLEMBED_LOG=${VLEMBED_LOG:-warn} "$BIN" serve --model "$MODEL" --dtype "$DTYPE" \
    --cpu-backend "$SERVER_BACKEND" --host 127.0.0.1 --port "$PORT" \
    >"$RUN/server.log" 2>&1 &
SERVER_PID=$!
echo "$SERVER_PID" >"$RUN/server.pid"
ready=0
for _ in $(seq 600); do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "the server exited; its log:" >&2
        tail -20 "$RUN/server.log" >&2
        exit 1
    fi
    if curl -fsS -m 2 "$URL/ready" >/dev/null 2>&1; then ready=1; break; fi
    sleep 0.5
done
[[ $ready == 1 ]] || { echo "the server was not ready after 300 s" >&2; exit 1; }
rss_all() {
    awk '$1 ~ /^(VmHWM|VmRSS|RssAnon|RssFile):$/ {sub(":", "", $1); printf "%s_kB=%s ", $1, $2}' \
        "/proc/$SERVER_PID/status"
}
echo "ready $(rss_all)" >"$RUN/rss.txt"
curl -fsS -m 5 "$URL/info" >"$RUN/info.json" || true
# The model alone as the server runs it: the backend it settled on.
CHOSEN=$("$PY" -c 'import json,sys; print((json.load(open(sys.argv[1]))["models"][0].get("cpu_backend") or {}).get("backend", "native"))' "$RUN/info.json" 2>/dev/null || echo native)
echo "server_backend_chosen=$CHOSEN" >>"$RUN/meta.txt"
if [[ -f "$RUN/model-$CHOSEN.json" ]]; then
    cp "$RUN/model-$CHOSEN.json" "$RUN/model.json"
else
    cp "$RUN/model-${BACKENDS%% *}.json" "$RUN/model.json"
fi
"$PY" "$HELPER" threads --pid "$SERVER_PID" --json "$RUN/threads-idle.json"

# Batches the server formed: counters of its vlembed_batch_size histogram
# before and after each scenario ("label count sum" lines).
batch_mark() {
    curl -fsS -m 5 "$URL/metrics" 2>/dev/null | awk -v label="$1" '
        /^vlembed_batch_size_count/ {c += $2} /^vlembed_batch_size_sum/ {s += $2}
        END {print label, c + 0, s + 0}' >>"$RUN/batches.txt" || true
}

LG=("$EX/loadgen" --url "$URL" --images-dir "$INPUTS/images" --texts-file "$INPUTS/texts.txt"
    --timeout "$REQ_TIMEOUT")
log "warm-up"
timeout 600 "${LG[@]}" --concurrency 2 --requests 4 --duration 120 --label warmup \
    --json "$RUN/warmup.json"
cpu_mark server-ready

# Waits until the server has nothing left to do: a single text goes through
# only after the batch in progress (and anything queued before it).
settle() {
    timeout $((REQ_TIMEOUT + 30)) "${LG[@]}" --kind text --concurrency 1 --requests 1 --duration 300 \
        --label settle --json "$RUN/settle.json" 2>/dev/null || true
    sleep 1
}

log "server: text probe alone (idle server), $((LOAD_S / 2 + 2)) s"
timeout $((LOAD_S + REQ_TIMEOUT + 60)) "${LG[@]}" --concurrency 0 --mixed --duration $((LOAD_S / 2 + 2)) \
    --probe-interval-ms 50 --label "text-idle" --json "$RUN/text-idle.json"

"$PY" "$HELPER" threads --pid "$SERVER_PID" --json "$RUN/threads-before.json"
for n in $LEVELS; do
    log "server: $n concurrent clients, single images, $LOAD_S s"
    batch_mark "before-images-c$n"
    timeout $((LOAD_S + REQ_TIMEOUT + 60)) "${LG[@]}" --concurrency "$n" --duration "$LOAD_S" \
        --label "images-c$n" --json "$RUN/server-c$n.json"
    batch_mark "after-images-c$n"
    echo "c$n $(rss_all)" >>"$RUN/rss.txt"
    cpu_mark "server-c$n"
    settle
done
"$PY" "$HELPER" threads --pid "$SERVER_PID" --json "$RUN/threads-after.json"

# The model alone at the text batch size, just before and after the server's
# text phase (the server idles meanwhile): on a shared VM its speed drifts by
# ±10% within minutes, more than the overhead measured, so the server is
# compared with these two runs rather than with stage 1.
text_model_mark() {
    timeout 600 "$EX/bench_model" --model "$MODEL" --dtype "$DTYPE" --cpu-backend "$CHOSEN" --inputs "$INPUTS" --no-images \
        --batch-sizes 1 --text-batch-sizes "${TEXT_BATCHES##*,}" --reps "$REPS" --warmup "$WARMUP" \
        --text-latency-reps 1 --json "$RUN/model-texts-$1.json" 2>/dev/null || true
}
text_model_mark before
log "server: $TEXT_CLIENTS concurrent clients, single short texts, $LOAD_S s"
batch_mark "before-texts-c$TEXT_CLIENTS"
timeout $((LOAD_S + REQ_TIMEOUT + 60)) "${LG[@]}" --kind text --concurrency "$TEXT_CLIENTS" \
    --duration "$LOAD_S" --label "texts-c$TEXT_CLIENTS" --json "$RUN/texts-c$TEXT_CLIENTS.json"
batch_mark "after-texts-c$TEXT_CLIENTS"
cpu_mark "server-texts"
settle
text_model_mark after

for n in $MIXED_CLIENTS; do
    log "server: mixed, $n image clients + a query client (one short text every $QUERY_MS ms), $LOAD_S s"
    timeout $((LOAD_S + REQ_TIMEOUT + 60)) "${LG[@]}" --concurrency "$n" --mixed --duration "$LOAD_S" \
        --probe-interval-ms "$QUERY_MS" --label "mixed-c$n" --json "$RUN/mixed-c$n.json"
    echo "mixed-c$n $(rss_all)" >>"$RUN/rss.txt"
    settle
done
curl -fsS -m 5 "$URL/metrics" >"$RUN/metrics.txt" || true
cpu_mark server-mixed

log "stopping the server"
kill -TERM "$SERVER_PID"
for _ in $(seq 150); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
kill -KILL "$SERVER_PID" 2>/dev/null || true
wait "$SERVER_PID" 2>/dev/null || true
SERVER_PID=""
cpu_mark end
echo "elapsed_s=$(($(date +%s) - START_EPOCH))" >>"$RUN/meta.txt"

# --- 4. report -----------------------------------------------------------------
REPORT_ARGS=(report --run "$RUN" --out "$RUN/report.md")
[[ $WRITE == 1 ]] && REPORT_ARGS+=(--update "$REPO/BENCHMARKS.md")
"$PY" "$HELPER" "${REPORT_ARGS[@]}"
log "done in $(($(date +%s) - START_EPOCH)) s; report: $RUN/report.md"
exit 0
}
