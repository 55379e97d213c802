#!/usr/bin/env bash
# Drives the playground (/) and the API docs (/docs) in headless Chromium
# against a server with the fixture model, over loopback only:
#   - loads the page, uploads fixture images as candidates, types a query and
#     candidate texts, runs the ranking, reads it from the DOM and compares it
#     with POST /score's own answer (same order, same scores);
#   - uploads a file that is not an image and checks the 422 is shown next
#     to that image;
#   - checks the page fits a narrow (phone) screen;
#   - loads /docs and checks every operation is rendered;
#   - saves screenshots to $SHOT_DIR (default /tmp): vlembed-playground.png,
#     vlembed-playground-narrow.png, vlembed-docs.png.
# Uses Debian's chromium and chromium-driver (installed with apt-get when
# missing and running as root), curl, jq and python3 (free ports).
# Bounded: every wait has a timeout; the server, chromedriver and the browser
# are stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

SHOT_DIR=${SHOT_DIR:-/tmp}
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
CHROMEDRIVER=${CHROMEDRIVER:-/usr/bin/chromedriver}

need() { command -v "$1" >/dev/null 2>&1 || { echo "browser-test: $1 is required" >&2; exit 1; }; }
# What a fresh machine may lack: Debian's packages, installed when running as root.
missing=()
command -v jq >/dev/null 2>&1 || missing+=(jq)
[[ -x $CHROMIUM && -x $CHROMEDRIVER ]] || missing+=(chromium chromium-driver)
if (( ${#missing[@]} )); then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "== installing ${missing[*]} (Debian)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null \
      || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; }
  else
    echo "browser-test: install Debian's ${missing[*]} first" >&2
    exit 1
  fi
fi
need curl; need jq; need python3

# VLEMBED_BIN: a server binary already built (e.g. by `cargo test`, which
# builds target/debug/vlembed for the integration tests); else built here.
BIN=${VLEMBED_BIN:-}
if [[ -z $BIN ]]; then
  echo "== building the server"
  cargo build --locked --quiet --bin vlembed
  BIN=target/debug/vlembed
fi

WORK=$(mktemp -d /tmp/vlembed-browser.XXXXXX)
SERVER_PID=""; DRIVER_PID=""; SESSION=""; DRIVER=""
cleanup() {
  if [[ -n $SESSION ]]; then curl -s -m 10 -X DELETE "$DRIVER/session/$SESSION" >/dev/null || true; fi
  if [[ -n $DRIVER_PID ]]; then kill "$DRIVER_PID" 2>/dev/null || true; wait "$DRIVER_PID" 2>/dev/null || true; fi
  if [[ -n $SERVER_PID ]]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }

PORT=$(free_port)
BASE="http://127.0.0.1:$PORT"
echo "== starting the server on $BASE"
# With an API key, so the page's key field is exercised too.
KEY="browser-test-key-$RANDOM$RANDOM"
VLEMBED_API_KEYS="$KEY" VLEMBED_LOG=info "$BIN" serve --model tests/fixtures/clip-tiny --host 127.0.0.1 --port "$PORT" \
  >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 200); do
  if curl -sf -m 2 "$BASE/ready" >/dev/null; then break; fi
  sleep 0.1
done
curl -sf -m 2 "$BASE/ready" >/dev/null || { echo "server not ready:"; cat "$WORK/server.log"; exit 1; }

DPORT=$(free_port)
DRIVER="http://127.0.0.1:$DPORT"
"$CHROMEDRIVER" --port="$DPORT" --allowed-ips=127.0.0.1 >"$WORK/driver.log" 2>&1 &
DRIVER_PID=$!
for _ in $(seq 1 100); do
  if curl -sf -m 2 "$DRIVER/status" >/dev/null; then break; fi
  sleep 0.1
done

# WebDriver helpers: wd METHOD PATH [JSON]
wd() {
  local out
  out=$(curl -s -m 60 -X "$1" "$DRIVER$2" -H 'Content-Type: application/json' ${3:+-d "$3"})
  if [[ $(jq -r '.value.error? // empty' <<<"$out") != "" ]]; then
    echo "webdriver $1 $2 failed: $(jq -c .value <<<"$out" | head -c 600)" >&2
    return 1
  fi
  printf '%s' "$out"
}
js() { # js SCRIPT [ARGS_JSON] -> .value
  wd POST "/session/$SESSION/execute/sync" "$(jq -n --arg s "$1" --argjson a "${2:-[]}" '{script:$s,args:$a}')" | jq -c .value
}
find_el() {
  wd POST "/session/$SESSION/element" "$(jq -n --arg v "$1" '{using:"css selector",value:$v}')" \
    | jq -r '.value | to_entries[0].value'
}
type_into() { wd POST "/session/$SESSION/element/$(find_el "$1")/value" "$(jq -n --arg t "$2" '{text:$t}')" >/dev/null; }
click() { wd POST "/session/$SESSION/element/$(find_el "$1")/click" '{}' >/dev/null; }
wait_for() { # wait_for JS_CONDITION DESCRIPTION
  for _ in $(seq 1 300); do
    if [[ $(js "return Boolean($1);") == true ]]; then return 0; fi
    sleep 0.1
  done
  echo "timed out waiting for: $2" >&2
  js 'return document.body.innerText;' >&2
  return 1
}
shot() { wd GET "/session/$SESSION/screenshot" | jq -r .value | base64 -d >"$1"; echo "   screenshot: $1"; }

PROFILE="$WORK/profile"
mkdir -p "$PROFILE"
CAPS=$(jq -n --arg bin "$CHROMIUM" --arg prof "$PROFILE" '{capabilities: {alwaysMatch: {
  browserName: "chrome",
  "goog:chromeOptions": {binary: $bin, args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--no-default-browser-check",
    "--disable-domain-reliability", "--metrics-recording-only", "--no-proxy-server",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--disable-dev-shm-usage", "--window-size=1280,1100", ("--user-data-dir=" + $prof)]}}}}')
SESSION=$(wd POST /session "$CAPS" | jq -r .value.sessionId)
echo "== browser session $SESSION"

IMAGES=(rgb_225x223.png baseline_420_640x480.jpg gray_320x240.jpg lossy_320x240.webp)
FILES=()
for f in "${IMAGES[@]}"; do FILES+=("$PWD/tests/fixtures/images/$f"); done
QUERY="a photo of a red square"
TEXTS=("a cat on a sofa" "a gray street at night")

echo "== playground: rank ${#IMAGES[@]} images and ${#TEXTS[@]} texts"
wd POST "/session/$SESSION/url" "$(jq -n --arg u "$BASE/" '{url:$u}')" >/dev/null
wait_for "document.getElementById('error').textContent.includes('API key')" "the request for an API key"
type_into '#api-key' "$KEY"
click '#query-text'   # leaving the key field loads the model list with the key
wait_for "document.querySelectorAll('#model option').length > 0" "the model list"
[[ $(js "return document.getElementById('model').value;") == '"clip-tiny"' ]] || { echo "model list wrong"; exit 1; }
js "document.getElementById('candidate-images-input').hidden = false; document.getElementById('query-image-input').hidden = false; return true;" >/dev/null
type_into '#candidate-images-input' "$(printf '%s\n' "${FILES[@]}" | sed '$ s/\n$//')"
wait_for "document.querySelectorAll('#cand-thumbs .thumb').length == ${#IMAGES[@]}" "candidate thumbnails"
type_into '#query-text' "$QUERY"
type_into '#candidate-texts' "$(printf '%s\n' "${TEXTS[@]}")"
click '#run'
N=$(( ${#IMAGES[@]} + ${#TEXTS[@]} ))
wait_for "document.querySelectorAll('#results li').length == $N || document.getElementById('error').textContent" "the ranking"
[[ $(js "return document.getElementById('error').textContent;") == '""' ]] || { echo "page error: $(js "return document.getElementById('error').textContent;")"; exit 1; }
PAGE=$(js "return Array.from(document.querySelectorAll('#results li')).map(li => ({index: Number(li.dataset.index), score: Number(li.dataset.score)}));")
echo "   page ranking:  $(jq -c 'map(.index)' <<<"$PAGE")"
shot "$SHOT_DIR/vlembed-playground.png"

# The same request straight to /score.
for f in "${FILES[@]}"; do base64 -w0 "$f" | jq -R '{image: .}'; done >"$WORK/images.json"
printf '%s\n' "${TEXTS[@]}" | jq -R . >"$WORK/texts.json"
jq -n --arg q "$QUERY" --argjson n "$N" --slurpfile imgs "$WORK/images.json" --slurpfile texts "$WORK/texts.json" \
  '{model: "clip-tiny", query: $q, candidates: ($imgs + $texts), top_k: $n}' >"$WORK/score.json"
API=$(curl -sf -m 30 "$BASE/score" -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' --data-binary "@$WORK/score.json" | jq -c .ranking)
echo "   /score ranking: $(jq -c 'map(.index)' <<<"$API")"
jq -e -n --argjson p "$PAGE" --argjson a "$API" '
  ($p | length) == ($a | length) and
  ([range(0; $p | length)] | all(. as $i | $p[$i].index == $a[$i].index and
     (($p[$i].score - $a[$i].score) | fabs) < 1e-5))' >/dev/null \
  || { echo "FAIL: the page's ranking differs from /score"; exit 1; }
CURL=$(js "return document.getElementById('curl').textContent;")
jq -e 'contains("/score") and contains("base64 -w0")' <<<"$CURL" >/dev/null || { echo "FAIL: no curl command: $CURL"; exit 1; }
# The key stays in the page: not in the curl text, storage, cookies or the URL.
jq -e --arg k "$KEY" '(contains($k) | not) and contains("$VLEMBED_API_KEY")' <<<"$CURL" >/dev/null \
  || { echo "FAIL: the curl command shows the key or lacks the header: $CURL"; exit 1; }
[[ $(js "return localStorage.length + sessionStorage.length + document.cookie.length + (location.href.includes('$KEY') ? 1 : 0);") == 0 ]] \
  || { echo "FAIL: the key left the page's memory"; exit 1; }

echo "== playground: a file that is not an image gets its error next to it"
printf 'this is not an image' >"$WORK/not-an-image.png"
type_into '#candidate-images-input' "$WORK/not-an-image.png"
wait_for "document.querySelectorAll('#cand-thumbs .thumb').length == $(( ${#IMAGES[@]} + 1 ))" "the bad thumbnail"
click '#run'
wait_for "document.getElementById('error').textContent.includes('422')" "the 422 message"
BAD=$(js "const t = document.querySelector('#cand-thumbs .thumb.bad'); return t ? t.innerText : '';")
jq -e 'contains("not-an-image.png") and contains("candidates[4].image")' <<<"$BAD" >/dev/null \
  || { echo "FAIL: the error is not next to the bad image: $BAD"; exit 1; }
echo "   $(js "return document.getElementById('error').textContent;")"

echo "== playground: narrow screen"
wd POST "/session/$SESSION/window/rect" '{"width": 390, "height": 1400}' >/dev/null
sleep 0.3
FITS=$(js "return document.documentElement.scrollWidth <= window.innerWidth + 1;")
[[ $FITS == true ]] || { echo "FAIL: horizontal overflow on a narrow screen ($(js 'return [document.documentElement.scrollWidth, window.innerWidth];'))"; exit 1; }
shot "$SHOT_DIR/vlembed-playground-narrow.png"

echo "== playground: role candidate ranks with /embed in the page"
wd POST "/session/$SESSION/window/rect" '{"width": 1280, "height": 1100}' >/dev/null
js "document.querySelector('#cand-thumbs .thumb.bad button').click(); document.getElementById('role').value = 'candidate'; return true;" >/dev/null
click '#run'
wait_for "document.querySelectorAll('#results li').length == $N || document.getElementById('error').textContent" "the /embed ranking"
[[ $(js "return document.getElementById('error').textContent;") == '""' ]] || { echo "page error: $(js "return document.getElementById('error').textContent;")"; exit 1; }
js "return document.getElementById('curl').textContent;" | jq -e 'contains("/embed") and contains("candidate")' >/dev/null \
  || { echo "FAIL: the curl command is not the /embed call"; exit 1; }
EMBED_RANK=$(js "return Array.from(document.querySelectorAll('#results li')).map(li => Number(li.dataset.index));")
echo "   page ranking:  $EMBED_RANK"
# CLIP ignores roles: the cosine ranking equals /score's.
jq -e -n --argjson p "$EMBED_RANK" --argjson a "$API" '$p == ($a | map(.index))' >/dev/null \
  || { echo "FAIL: the /embed ranking differs from /score's"; exit 1; }

echo "== docs"
wd POST "/session/$SESSION/url" "$(jq -n --arg u "$BASE/docs" '{url:$u}')" >/dev/null
OPS=$(curl -sf -m 10 "$BASE/openapi.json" | jq '[.paths[] | keys[] | select(. == "get" or . == "post")] | length')
wait_for "document.querySelectorAll('#ops section.op').length == $OPS" "$OPS rendered operations"
js "return document.getElementById('ops').textContent;" | jq -e 'contains("/score") and contains("request_id")' >/dev/null \
  || { echo "FAIL: docs lack /score"; exit 1; }
shot "$SHOT_DIR/vlembed-docs.png"

echo "browser test passed"
