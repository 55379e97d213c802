# shellcheck shell=bash
# Sourced by scripts/openai-client-test.sh and scripts/examples-test.sh.
#
# client_venv: creates (once) a venv with scripts/clients/requirements.txt
#   from PyPI in $VLEMBED_CLIENTS_CACHE (default ~/.cache/vlembed/clients-<hash
#   of the requirements>) and sets PY to its python.
# start_server [ENV=VALUE...]: starts $VLEMBED_BIN (default: target/debug/vlembed,
#   built with cargo when absent) serving the fixture model tests/fixtures/clip-tiny
#   on 127.0.0.1 and a free port, with the given environment; waits for /ready
#   (20 s at most) and sets BASE (http://127.0.0.1:PORT) and SERVER_PID.
#   The server is stopped on exit (stop_server).
# Loopback only: nothing here talks to anything but 127.0.0.1 and the registry
# pip uses.

clients_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_dir="$(cd "$clients_dir/../.." && pwd)"

client_venv() {
  local req="$clients_dir/requirements.txt" sum dir
  sum="$(sha256sum "$req" | cut -c1-16)"
  dir="${VLEMBED_CLIENTS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vlembed/clients-$sum}"
  if [[ ! -e $dir/.installed ]]; then
    echo "== installing the Python clients into $dir (from PyPI)" >&2
    rm -rf "$dir"
    python3 -m venv "$dir"
    PIP_ROOT_USER_ACTION=ignore "$dir/bin/pip" install --quiet --disable-pip-version-check \
      --only-binary=:all: -r "$req" >&2
    touch "$dir/.installed"
  fi
  PY="$dir/bin/python"
}

SERVER_PID=""
SERVER_LOG=""
stop_server() {
  if [[ -n $SERVER_PID ]]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
  fi
  if [[ -n $SERVER_LOG ]]; then rm -f "$SERVER_LOG"; SERVER_LOG=""; fi
}

start_server() {
  local bin="${VLEMBED_BIN:-}" port
  if [[ -z $bin ]]; then
    bin="$repo_dir/target/debug/vlembed"
    if [[ ! -x $bin ]]; then
      echo "== building the server" >&2
      (cd "$repo_dir" && cargo build --locked --quiet --bin vlembed)
    fi
  fi
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
  BASE="http://127.0.0.1:$port"
  SERVER_LOG=$(mktemp /tmp/vlembed-clients.XXXXXX)
  trap stop_server EXIT
  env "$@" VLEMBED_LOG=warn "$bin" serve --model "$repo_dir/tests/fixtures/clip-tiny" \
    --model-name clip-tiny --host 127.0.0.1 --port "$port" >"$SERVER_LOG" 2>&1 &
  SERVER_PID=$!
  local i
  for i in $(seq 1 200); do
    if python3 - "$BASE" <<'PYEOF' 2>/dev/null; then return 0; fi
import sys, urllib.request
urllib.request.urlopen(sys.argv[1] + "/ready", timeout=2)
PYEOF
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then break; fi
    sleep 0.1
  done
  echo "the server did not become ready:" >&2
  cat "$SERVER_LOG" >&2
  return 1
}
