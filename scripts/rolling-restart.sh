#!/usr/bin/env bash
# Rolling restart with zero lost requests, proven with a real load balancer.
#
# Three release servers with the fixture model (tests/fixtures/clip-tiny) on
# loopback ports behind Debian's haproxy, which health-checks /ready every
# 250 ms and retries only connection failures (never a 503: a Kubernetes
# Service retries nothing). A bounded closed-loop load (examples/loadgen.rs)
# runs through haproxy while each replica in turn gets SIGTERM, exits, and is
# started again. Every request must get 200.
#
# The replicas run with server.drain_delay_ms (DRAIN_DELAY_MS, default 1500):
# after SIGTERM /ready answers 503 at once, haproxy takes the replica out
# within 2 checks (500 ms), and the replica keeps serving whatever still
# reaches it until the delay ends; only then does it close its listener and
# drain. Run with DRAIN_DELAY_MS=0 to see what happens without it.
#
#   scripts/rolling-restart.sh           # builds the release binary if missing
#
# Environment: VLEMBED_BIN, LOADGEN_BIN (default target/release/...),
# BASE_PORT (default 18180: haproxy; replicas on +1..+3, haproxy stats on +9), CLIENTS (4),
# DRAIN_DELAY_MS (1500). Loopback only; every process it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN="${VLEMBED_BIN:-target/release/vlembed}"
LOADGEN="${LOADGEN_BIN:-target/release/examples/loadgen}"
BASE_PORT="${BASE_PORT:-18180}"
CLIENTS="${CLIENTS:-4}"
DRAIN_DELAY_MS="${DRAIN_DELAY_MS:-1500}"
REPLICAS=3
MODEL="$PWD/tests/fixtures/clip-tiny"

if ! command -v haproxy >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing haproxy (apt-get)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q haproxy >/dev/null
  else
    echo "haproxy is required (apt-get install haproxy)" >&2
    exit 1
  fi
fi
if [ ! -x "$BIN" ] || [ ! -x "$LOADGEN" ]; then
  echo "== building the release binary and the load generator" >&2
  nice -n 10 cargo build --release --locked --bin vlembed --example loadgen
fi

work="$(mktemp -d)"
declare -a PIDS=()
HAPROXY_PID=""
cleanup() {
  for p in "${PIDS[@]}" $HAPROXY_PID; do
    [ -n "$p" ] && kill "$p" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

port_of() { echo $((BASE_PORT + $1)); }

start_replica() { # index
  local i="$1"
  VLEMBED_SERVER__DRAIN_DELAY_MS="$DRAIN_DELAY_MS" \
    VLEMBED_SERVER__SHUTDOWN_TIMEOUT_MS=30000 \
    VLEMBED_LOG=warn \
    "$BIN" serve --host 127.0.0.1 --port "$(port_of "$i")" \
    --model "$MODEL" --model-name clip-tiny >>"$work/replica-$i.log" 2>&1 &
  PIDS[$i]=$!
}

wait_ready() { # url, seconds
  local deadline=$((SECONDS + $2))
  until curl -fsS -o /dev/null "$1/ready" 2>/dev/null; do
    if [ $SECONDS -ge $deadline ]; then
      echo "no 200 from $1/ready in $2 s" >&2
      return 1
    fi
    sleep 0.05
  done
}

# The haproxy side, as a new user would write it: /ready every 250 ms, out
# after 2 failures, back after 2 successes; retries on connection failures
# only (retry-on conn-failure), never on a status.
cat >"$work/haproxy.cfg" <<CFG
global
    maxconn 2000
defaults
    mode http
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch 1
    retry-on conn-failure
listen stats
    bind 127.0.0.1:$((BASE_PORT + 9))
    stats enable
    stats uri /stats
frontend fe
    bind 127.0.0.1:$BASE_PORT
    default_backend vlembed
backend vlembed
    balance roundrobin
    option httpchk GET /ready
    http-check expect status 200
    default-server check inter 250ms fall 2 rise 2
$(for i in $(seq 1 $REPLICAS); do echo "    server r$i 127.0.0.1:$(port_of "$i")"; done)
CFG
haproxy -c -q -f "$work/haproxy.cfg"

for i in $(seq 1 $REPLICAS); do start_replica "$i"; done
for i in $(seq 1 $REPLICAS); do wait_ready "http://127.0.0.1:$(port_of "$i")" 60; done
haproxy -db -f "$work/haproxy.cfg" >"$work/haproxy.log" 2>&1 &
HAPROXY_PID=$!
wait_ready "http://127.0.0.1:$BASE_PORT" 10
sleep 1 # every server UP (rise 2 x 250 ms)

# Load: CLIENTS closed-loop clients sending one fixture image per request
# through haproxy, bounded in time (and count).
duration=$(( 6 + REPLICAS * (DRAIN_DELAY_MS / 1000 + 5) ))
"$LOADGEN" --url "http://127.0.0.1:$BASE_PORT" --concurrency "$CLIENTS" \
  --duration "$duration" --requests 200000 --timeout 60 \
  --images-dir tests/fixtures/images --label rolling-restart \
  --json "$work/load.json" 2>"$work/loadgen.log" &
LOAD_PID=$!
sleep 3

restart_start=$SECONDS
for i in $(seq 1 $REPLICAS); do
  t0=$(date +%s.%N)
  kill -TERM "${PIDS[$i]}"
  set +e
  wait "${PIDS[$i]}"
  rc=$?
  set -e
  t1=$(date +%s.%N)
  if [ "$rc" != 0 ]; then
    echo "replica $i exited with status $rc after SIGTERM" >&2
    exit 1
  fi
  start_replica "$i"
  wait_ready "http://127.0.0.1:$(port_of "$i")" 60
  # Back in haproxy's pool (rise 2 x 250 ms) before the next one goes.
  for _ in $(seq 1 100); do
    state=$(curl -fsS "http://127.0.0.1:$((BASE_PORT + 9))/stats;csv" 2>/dev/null |
      awk -F, -v s="r$i" '$1 == "vlembed" && $2 == s {print $18}') || true
    [ "$state" = UP ] && break
    sleep 0.05
  done
  printf 'replica %d: SIGTERM -> exit 0 in %.1f s, back in the pool after %.1f s\n' \
    "$i" "$(echo "$t1 - $t0" | bc)" "$(echo "$(date +%s.%N) - $t0" | bc)"
done
restart_s=$((SECONDS - restart_start))
wait "$LOAD_PID"

python3 - "$work/load.json" "$restart_s" "$DRAIN_DELAY_MS" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["main"]
non200 = r["requests"] - r["ok"]
l = r["latency_ms"]
print(f"requests sent: {r['requests']}, 200: {r['ok']}, non-200: {non200} {r['errors'] or ''}")
print(f"load: {r['wall_s']:.1f} s, {r['throughput_per_s']:.1f} req/s; the 3 restarts took {sys.argv[2]} s "
      f"(drain_delay_ms={sys.argv[3]})")
print(f"latency ms: p50 {l['p50']:.1f}  p95 {l['p95']:.1f}  p99 {l['p99']:.1f}  max {l['max']:.1f}")
sys.exit(1 if non200 else 0)
PY
