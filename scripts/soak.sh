#!/usr/bin/env bash
# vlembed soak test: a release server under a bounded mix of valid, malformed
# and hostile traffic, client disconnects and slow uploads, on loopback only.
#
#   scripts/soak.sh [SECONDS]          (default 600; at least 60)
#
# Environment:
#   VLEMBED_SOAK_BIN      server binary (default target/release/vlembed; built
#                         with `cargo build --release` when absent)
#   VLEMBED_SOAK_MODEL    model directory (default tests/fixtures/clip-tiny;
#                         a full-size random model from scripts/make_fixtures.py
#                         --full gives realistic latencies)
#   VLEMBED_SOAK_CLIENTS  concurrent valid-traffic clients (default 4)
#   VLEMBED_SOAK_MAX_REQ  stop after this many requests in all (default 200000)
#   VLEMBED_SOAK_WORK     scratch folder (default /tmp/vlembed-soak)
#
# Reports requests by status, the 5xx count (must be 0), p50/p99 latency of the
# valid traffic, RSS and open file descriptors at start (after a warm-up of a
# tenth of the run) and at the end (RSS at the end must be at most 1.1x). Exits
# non-zero when a check fails. The server is stopped on exit, whatever happens.
set -euo pipefail

{
DURATION=${1:-600}
if (( DURATION < 60 )); then
  echo "soak: run for at least 60 seconds" >&2
  exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${VLEMBED_SOAK_BIN:-$ROOT/target/release/vlembed}
MODEL=${VLEMBED_SOAK_MODEL:-$ROOT/tests/fixtures/clip-tiny}
CLIENTS=${VLEMBED_SOAK_CLIENTS:-4}
MAX_REQ=${VLEMBED_SOAK_MAX_REQ:-200000}
WORK=${VLEMBED_SOAK_WORK:-/tmp/vlembed-soak}
mkdir -p "$WORK"

if [[ ! -x $BIN ]]; then
  (cd "$ROOT" && nice -n 10 cargo build --release --bin vlembed)
fi

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
VLEMBED_LOG=warn "$BIN" serve --host 127.0.0.1 --port "$PORT" --model "$MODEL" \
  >"$WORK/server.log" 2>&1 &
PID=$!
cleanup() {
  if kill -0 "$PID" 2>/dev/null; then
    kill -TERM "$PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT

for _ in $(seq 1 600); do
  if curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1; then break; fi
  kill -0 "$PID" 2>/dev/null || { echo "soak: the server exited:" >&2; cat "$WORK/server.log" >&2; exit 1; }
  sleep 0.1
done

python3 - "$PORT" "$PID" "$DURATION" "$CLIENTS" "$MAX_REQ" "$ROOT/tests/fixtures/images" <<'EOF'
import base64, http.client, json, os, random, socket, sys, threading, time

port, pid, duration, clients, max_req, images_dir = sys.argv[1:7]
port, pid, duration, clients, max_req = int(port), int(pid), int(duration), int(clients), int(max_req)
HOST = "127.0.0.1"  # loopback only
images = [base64.b64encode(open(os.path.join(images_dir, f), "rb").read()).decode()
          for f in sorted(os.listdir(images_dir))]
rng = random.Random(1)
lock = threading.Lock()
statuses, latencies = {}, []
sent = [0]
stop_at = time.time() + duration

def rss_kb():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0

def fds():
    return len(os.listdir(f"/proc/{pid}/fd"))

def budget_left():
    with lock:
        if sent[0] >= max_req or time.time() >= stop_at:
            return False
        sent[0] += 1
        return True

def record(kind, status, dt=None):
    with lock:
        statuses[(kind, status)] = statuses.get((kind, status), 0) + 1
        if dt is not None and status == 200:
            latencies.append(dt)

def request(method, path, body=None, ctype="application/json", timeout=60):
    c = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        headers = {"content-type": ctype} if body is not None else {}
        c.request(method, path, body=body, headers=headers)
        r = c.getresponse()
        r.read()
        return r.status
    finally:
        c.close()

def valid_body():
    k = rng.randrange(5)
    if k == 0:
        return "/embed", {"inputs": [f"a photo of thing {rng.randrange(1000)}"] * rng.randint(1, 4)}
    if k == 1:
        return "/embed", {"inputs": [{"image": rng.choice(images)}]}
    if k == 2:
        return "/embed", {"inputs": [{"image": rng.choice(images), "text": "make it brighter"}]}
    if k == 3:
        return "/score", {"query": "a cat", "candidates": [{"image": rng.choice(images)}, "a dog"]}
    return "/v1/embeddings", {"input": ["hello", "world"]}

def valid_client():
    while budget_left():
        path, body = valid_body()
        t = time.time()
        try:
            s = request("POST", path, json.dumps(body).encode())
        except Exception:
            s = "error"
        record("valid", s, time.time() - t)

HOSTILE = [
    ("/embed", b"{not json", "application/json"),
    ("/embed", json.dumps({"inputs": [{"image": "!!!notbase64"}]}).encode(), "application/json"),
    ("/embed", json.dumps({"inputs": ["x"] * 100000}).encode(), "application/json"),
    ("/embed", json.dumps({"inputs": [{"image": base64.b64encode(os.urandom(3000)).decode()}]}).encode(), "application/json"),
    ("/embed", b"--x\r\n", "multipart/form-data; boundary=x"),
    ("/score", json.dumps({"query": "q"}).encode(), "application/json"),
    ("/embed", json.dumps({"inputs": "x" * 200000}).encode(), "text/plain"),
]

def hostile_client():
    while budget_left():
        path, body, ctype = rng.choice(HOSTILE)
        try:
            s = request("POST", path, body, ctype)
        except Exception:
            s = "error"
        record("hostile", s)
        time.sleep(0.02)

def disconnect_client():
    # Sends a valid request and hangs up before the answer.
    while budget_left():
        path, body = valid_body()
        data = json.dumps(body).encode()
        try:
            s = socket.create_connection((HOST, port), timeout=5)
            s.sendall(f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      f"content-length: {len(data)}\r\n\r\n".encode() + data)
            time.sleep(rng.random() * 0.05)
            s.close()
            record("disconnect", "sent")
        except Exception:
            record("disconnect", "error")
        time.sleep(0.05)

def slow_upload_client():
    # Announces a large body, trickles a few bytes, then gives up.
    while budget_left():
        try:
            s = socket.create_connection((HOST, port), timeout=30)
            s.sendall(b"POST /embed HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      b"content-length: 8000000\r\n\r\n{")
            for _ in range(rng.randint(1, 6)):
                time.sleep(0.5)
                s.sendall(b" ")
            s.close()
            record("slow_upload", "sent")
        except Exception:
            record("slow_upload", "closed_by_server")

threads = [threading.Thread(target=valid_client) for _ in range(clients)]
threads += [threading.Thread(target=hostile_client), threading.Thread(target=disconnect_client)]
threads += [threading.Thread(target=slow_upload_client) for _ in range(8)]
for t in threads:
    t.daemon = True
    t.start()
time.sleep(duration / 10)
rss0, fd0 = rss_kb(), fds()
for t in threads:
    t.join(timeout=max(1, stop_at - time.time() + 120))
time.sleep(2)
rss1, fd1 = rss_kb(), fds()

by_status = {}
for (kind, s), n in sorted(statuses.items(), key=lambda x: str(x)):
    by_status.setdefault(kind, {})[str(s)] = n
fivexx = sum(n for (k, s), n in statuses.items() if isinstance(s, int) and s >= 500)
lat = sorted(latencies)
p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")
report = {
    "seconds": duration, "requests": sent[0], "by_status": by_status, "5xx": fivexx,
    "valid_p50_ms": round(p(0.50), 1), "valid_p99_ms": round(p(0.99), 1),
    "rss_kb_start": rss0, "rss_kb_end": rss1, "fds_start": fd0, "fds_end": fd1,
}
print(json.dumps(report, indent=2))
ok = fivexx == 0 and rss1 <= 1.1 * rss0 and by_status.get("valid", {}).get("200", 0) > 0
print("soak:", "PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
EOF
}
