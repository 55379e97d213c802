#!/usr/bin/env bash
# Builds ./Dockerfile, unchanged, on a machine without a container registry
# and checks the image serves: the smoke test of the container.
#
#  1. Local stand-ins for the base images (cached): a Debian bookworm rootfs
#     from debootstrap (for RUNTIME_IMAGE) and the same plus build tools and
#     this machine's Rust toolchain (for BUILDER_IMAGE).
#  2. buildah bud --storage-driver vfs --isolation chroot --format docker with
#     those as build arguments; crates come from crates.io as usual. Timed.
#  3. Starts the image (podman run; or, where podman cannot start containers,
#     buildah run --isolation chroot, which runs the entrypoint in the image's
#     filesystem on the host's network) with tests/fixtures/clip-tiny mounted
#     read-only, waits for /ready, runs the image's HEALTHCHECK, checks /embed
#     against tests/fixtures/reference/clip-tiny.json, checks the server runs
#     as a non-root user, sends SIGTERM during a request and checks that the
#     request completes and the container exits 0.
#  4. Prints the image size and the build time.
#
# Needs root, buildah and debootstrap (apt-get installed when missing), curl,
# python3, and ~20 GB of free disk (vfs). CPU-heavy (a release build inside the
# image: ~25-40 min on 2 cores, so it is not part of .ci/run). Loopback only,
# besides the package registries (deb.debian.org for debootstrap, crates.io).
#
# Environment: VLEMBED_SMOKE_CACHE (stand-ins, image storage; default
# ~/.cache/vlembed/container-smoke), SMOKE_PORT (default 18280),
# DEBIAN_MIRROR (default http://deb.debian.org/debian), KEEP_IMAGE=1,
# SMOKE_STANDINS_ONLY=1 (prepare the stand-ins and stop), SMOKE_IMAGE=IMAGE (run
# the checks on an image already in the cache's storage instead of building),
# SMOKE_PREBUILT_BIN=target/release/vlembed (quick: build only the runtime stage
# around that binary, then run every check).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"

CACHE="${VLEMBED_SMOKE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vlembed/container-smoke}"
PORT="${SMOKE_PORT:-18280}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
IMAGE=localhost/vlembed:smoke
RUNTIME_STANDIN=localhost/standin/debian:bookworm-slim
BUILDER_STANDIN=localhost/standin/rust:bookworm

if [ "$(id -u)" != 0 ]; then
  echo "run as root (buildah with the vfs driver and chroot isolation, debootstrap)" >&2
  exit 1
fi
need=()
for tool in buildah debootstrap; do command -v "$tool" >/dev/null 2>&1 || need+=("$tool"); done
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing ${need[*]} (apt-get)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
fi
mkdir -p "$CACHE"
# The vfs driver copies the whole filesystem for every layer: a full build
# needs ~20 GB free (the quick modes ~2 GB). Refuse rather than fill a shared disk.
need_gb=20
if [ -n "${SMOKE_IMAGE:-}${SMOKE_PREBUILT_BIN:-}" ] || [ "${SMOKE_STANDINS_ONLY:-0}" = 1 ]; then need_gb=3; fi
free_gb=$(df -Pk "$CACHE" | awk 'NR == 2 {print int($4 / 1048576)}')
if [ "$free_gb" -lt "$need_gb" ]; then
  echo "only ${free_gb} GB free under $CACHE; this mode needs ~${need_gb} GB (vfs storage)" >&2
  exit 1
fi
STORE=(--root "$CACHE/storage" --runroot "$CACHE/run" --storage-driver vfs)
bah() { buildah "${STORE[@]}" "$@"; }

log() { printf '== %s\n' "$*" >&2; }
have_image() { bah inspect --type image "$1" >/dev/null 2>&1; }

# Imports a directory tree as a single-layer image.
import_rootfs() { # dir image [buildah config args...]
  local dir="$1" image="$2" ctr
  shift 2
  tar -C "$dir" -cf "$CACHE/rootfs.tar" .
  ctr=$(bah from scratch)
  bah add "$ctr" "$CACHE/rootfs.tar" / >/dev/null
  bah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd /bin/bash "$@" "$ctr"
  bah commit --quiet --rm "$ctr" "$image" >/dev/null
  rm -f "$CACHE/rootfs.tar"
}

# --- 1. base image stand-ins -------------------------------------------------
if ! have_image "$RUNTIME_STANDIN"; then
  log "stand-in for debian:bookworm-slim: debootstrap --variant=minbase bookworm"
  rm -rf "$CACHE/rootfs-slim"
  mkdir -p "$CACHE/debs"
  nice -n 10 debootstrap --variant=minbase --cache-dir="$CACHE/debs" bookworm \
    "$CACHE/rootfs-slim" "$MIRROR" >"$CACHE/debootstrap-slim.log" 2>&1
  rm -rf "$CACHE/rootfs-slim/var/cache/apt/archives/"*.deb "$CACHE/rootfs-slim/var/lib/apt/lists/"*
  import_rootfs "$CACHE/rootfs-slim" "$RUNTIME_STANDIN"
  rm -rf "$CACHE/rootfs-slim"
fi
quick=0
if [ -n "${SMOKE_IMAGE:-}${SMOKE_PREBUILT_BIN:-}" ]; then quick=1; fi
if [ "$quick" = 0 ] && ! have_image "$BUILDER_STANDIN"; then
  sysroot="$(rustc --print sysroot)"
  log "stand-in for rust:1.95-bookworm: bookworm + build tools + $(rustc --version) from $sysroot"
  rm -rf "$CACHE/rootfs-builder"
  mkdir -p "$CACHE/debs"
  nice -n 10 debootstrap --variant=minbase --cache-dir="$CACHE/debs" \
    --include=build-essential,ca-certificates,pkg-config,binutils,curl,git \
    bookworm "$CACHE/rootfs-builder" "$MIRROR" >"$CACHE/debootstrap-builder.log" 2>&1
  rm -rf "$CACHE/rootfs-builder/var/cache/apt/archives/"*.deb "$CACHE/rootfs-builder/var/lib/apt/lists/"*
  # The toolchain without its documentation, where the official image keeps it.
  mkdir -p "$CACHE/rootfs-builder/usr/local/rust" "$CACHE/rootfs-builder/usr/local/cargo"
  tar -C "$sysroot" --exclude=./share/doc -cf - . | tar -C "$CACHE/rootfs-builder/usr/local/rust" -xf -
  import_rootfs "$CACHE/rootfs-builder" "$BUILDER_STANDIN" \
    --env PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env CARGO_HOME=/usr/local/cargo
  rm -rf "$CACHE/rootfs-builder"
fi

# The builder reaches crates.io the way this machine does: with this machine's
# CA certificates (a TLS-intercepting egress proxy's CA, if any, is among them).
if [ "$quick" = 0 ] && [ "$(bah inspect --type image --format '{{index .OCIv1.Config.Labels "vlembed.host-cas"}}' "$BUILDER_STANDIN" 2>/dev/null)" != 1 ]; then
  log "stand-in builder: adding this machine's CA certificates"
  ctr=$(bah from --quiet "$BUILDER_STANDIN")
  bah copy "$ctr" /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt >/dev/null
  if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
    bah copy "$ctr" /usr/local/share/ca-certificates/ /usr/local/share/ca-certificates/ >/dev/null
  fi
  bah config --label vlembed.host-cas=1 "$ctr"
  bah commit --quiet --rm "$ctr" "$BUILDER_STANDIN" >/dev/null
fi

if [ "${SMOKE_STANDINS_ONLY:-0}" = 1 ]; then
  log "stand-ins ready: $RUNTIME_STANDIN, $BUILDER_STANDIN"
  exit 0
fi

# --- 2. build the unchanged Dockerfile ---------------------------------------
if [ -n "${SMOKE_IMAGE:-}" ]; then
  # Checks an image built elsewhere (e.g. to test this script's checks).
  IMAGE="$SMOKE_IMAGE"
  KEEP_IMAGE=1
  build_s="(not built here)"
elif [ -n "${SMOKE_PREBUILT_BIN:-}" ]; then
  # Quick mode: the Dockerfile's runtime stage, unchanged but for its COPY
  # --from=build, around a binary built on this machine; then every check.
  log "building the Dockerfile's runtime stage around $SMOKE_PREBUILT_BIN"
  ctx="$CACHE/prebuilt-context"
  rm -rf "$ctx"
  mkdir -p "$ctx"
  cp "$SMOKE_PREBUILT_BIN" "$ctx/vlembed"
  strip "$ctx/vlembed"
  {
    grep '^ARG RUNTIME_IMAGE' Dockerfile
    sed -n '/^FROM \${RUNTIME_IMAGE}/,$p' Dockerfile |
      sed 's#^COPY --from=build /src/target/release/vlembed #COPY vlembed #'
  } >"$ctx/Dockerfile"
  grep -q '^COPY vlembed ' "$ctx/Dockerfile" || { echo "cannot find the runtime stage's COPY" >&2; exit 1; }
  IMAGE=localhost/vlembed:smoke-prebuilt
  t0=$SECONDS
  buildah "${STORE[@]}" bud --isolation chroot --format docker \
    --build-arg RUNTIME_IMAGE="$RUNTIME_STANDIN" -t "$IMAGE" -f "$ctx/Dockerfile" "$ctx" \
    >"$CACHE/build.log" 2>&1 || { tail -40 "$CACHE/build.log" >&2; exit 1; }
  build_s="$((SECONDS - t0)) (runtime stage only)"
else
  log "buildah bud Dockerfile (release build inside; long)"
  t0=$SECONDS
  nice -n 10 buildah "${STORE[@]}" bud --isolation chroot --format docker --layers \
    --build-arg BUILDER_IMAGE="$BUILDER_STANDIN" --build-arg RUNTIME_IMAGE="$RUNTIME_STANDIN" \
    -t "$IMAGE" -f Dockerfile . >"$CACHE/build.log" 2>&1 || {
    tail -40 "$CACHE/build.log" >&2
    exit 1
  }
  build_s=$((SECONDS - t0))
fi
size_bytes=$(bah images --noheading --format '{{.Size}}' "$IMAGE" | head -1)
log "image $IMAGE ($size_bytes), build ${build_s} s"

# --- 3. run it ----------------------------------------------------------------
# A field of the image's Docker config, one list item per line.
image_config() { # User | Entrypoint | Healthcheck (its Test)
  bah inspect --type image "$IMAGE" | python3 -c '
import json, sys
c = json.load(sys.stdin)["Docker"]["config"]
v = c.get(sys.argv[1])
if sys.argv[1] == "Healthcheck":
    v = (v or {}).get("Test") or []
print("\n".join(v) if isinstance(v, list) else (v or ""))' "$1"
}
ctr_name=vlembed-smoke-$$
mode=""
server_pid_of_port() {
  ss -Hltnp "sport = :$PORT" 2>/dev/null | sed -n 's/.*pid=\([0-9]*\).*/\1/p' | head -1
}
runner_pid=""
working_ctr=""
cleanup() {
  if [ "$mode" = podman ]; then
    podman "${STORE[@]}" rm -f -t 0 "$ctr_name" >/dev/null 2>&1 || true
  fi
  if [ -n "$runner_pid" ]; then
    # The server this script started inside the chroot, then buildah itself.
    local spid
    spid=$(server_pid_of_port)
    [ -n "$spid" ] && kill -TERM "$spid" 2>/dev/null
    kill "$runner_pid" 2>/dev/null || true
  fi
  if [ -n "$working_ctr" ]; then bah rm "$working_ctr" >/dev/null 2>&1 || true; fi
  if [ "${KEEP_IMAGE:-0}" != 1 ]; then bah rmi "$IMAGE" >/dev/null 2>&1 || true; fi
  wait 2>/dev/null || true
}
trap cleanup EXIT

args=(--model /models/clip-tiny --model-name clip-tiny --host 127.0.0.1 --port "$PORT")
if command -v podman >/dev/null 2>&1 &&
  podman "${STORE[@]}" run -d --name "$ctr_name" --network host \
    -v "$repo/tests/fixtures/clip-tiny:/models/clip-tiny:ro" "$IMAGE" "${args[@]}" \
    >"$CACHE/podman-run.log" 2>&1; then
  mode=podman
else
  [ -s "$CACHE/podman-run.log" ] && log "podman cannot start the container here: $(tail -1 "$CACHE/podman-run.log")"
  podman "${STORE[@]}" rm -f "$ctr_name" >/dev/null 2>&1 || true
  mode=buildah
  working_ctr=$(bah from --quiet "$IMAGE")
  user=$(image_config User)
  mapfile -t ep < <(image_config Entrypoint)
  bah run --isolation chroot --user "$user" \
    -v "$repo/tests/fixtures/clip-tiny:/models/clip-tiny:ro" \
    "$working_ctr" -- "${ep[@]}" "${args[@]}" >"$CACHE/server.log" 2>&1 &
  runner_pid=$!
fi
log "started with $mode"

deadline=$((SECONDS + 120))
until curl -fsS -o /dev/null "http://127.0.0.1:$PORT/ready" 2>/dev/null; do
  if [ $SECONDS -ge $deadline ]; then
    echo "no 200 from /ready in 120 s" >&2
    [ "$mode" = podman ] && podman "${STORE[@]}" logs "$ctr_name" >&2 || tail -20 "$CACHE/server.log" >&2
    exit 1
  fi
  sleep 0.2
done
log "/ready answers 200"

# The image's HEALTHCHECK, run the way its engine would.
if [ "$mode" = podman ]; then
  podman "${STORE[@]}" healthcheck run "$ctr_name"
else
  mapfile -t hcv < <(image_config Healthcheck)
  [ "${hcv[0]:-}" = CMD ] || { echo "no HEALTHCHECK CMD in the image: ${hcv[*]}" >&2; exit 1; }
  hcv=("${hcv[@]:1}")
  VLEMBED_PORT=$PORT "${hcv[@]}"
fi
log "HEALTHCHECK passes"

pid=$(server_pid_of_port)
uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")
if [ -z "$uid" ] || [ "$uid" = 0 ]; then
  echo "the server (pid $pid) runs as uid '$uid', not as a non-root user" >&2
  exit 1
fi
log "the server runs as uid $uid (non-root)"

python3 scripts/check_reference.py --url "http://127.0.0.1:$PORT" \
  --reference tests/fixtures/reference/clip-tiny.json --min-cosine 0.9999 --max-abs-diff 1e-4 \
  --label "/embed vs tests/fixtures/reference/clip-tiny.json" >&2

# SIGTERM during a request: a batch of 256 images takes long enough to be in
# flight when the signal arrives (timed first).
python3 - >"$CACHE/big.json" <<'PY'
import base64, json
img = base64.b64encode(open("tests/fixtures/images/baseline_420_640x480.jpg", "rb").read()).decode()
print(json.dumps({"inputs": [{"image": img}] * 256}))
PY
t=$(curl -fsS -o /dev/null -w '%{time_total}' -H 'content-type: application/json' \
  --data-binary @"$CACHE/big.json" "http://127.0.0.1:$PORT/embed")
delay=$(python3 -c "print(max(0.05, $t / 4))")
log "a 256-image request takes ${t} s; SIGTERM ${delay} s into the next one"
if python3 -c "import sys; sys.exit(0 if $t >= 0.2 else 1)"; then :; else
  echo "the request is too fast (${t} s) to be in flight at SIGTERM" >&2
  exit 1
fi
curl -sS -o "$CACHE/big-reply.json" -w '%{http_code}' -H 'content-type: application/json' \
  --data-binary @"$CACHE/big.json" "http://127.0.0.1:$PORT/embed" >"$CACHE/big-status" &
curl_pid=$!
sleep "$delay"
if [ "$mode" = podman ]; then
  podman "${STORE[@]}" kill --signal TERM "$ctr_name" >/dev/null
else
  kill -TERM "$pid"
fi
wait "$curl_pid"
status=$(cat "$CACHE/big-status")
count=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["embeddings"]))' "$CACHE/big-reply.json" 2>/dev/null || echo 0)
if [ "$status" != 200 ] || [ "$count" != 256 ]; then
  echo "the request in flight at SIGTERM got $status with $count embeddings" >&2
  exit 1
fi
if [ "$mode" = podman ]; then
  code=$(timeout 60 podman "${STORE[@]}" wait "$ctr_name")
else
  set +e
  wait "$runner_pid"
  code=$?
  set -e
  runner_pid=""
fi
if [ "$code" != 0 ]; then
  echo "the container exited with $code after SIGTERM" >&2
  exit 1
fi
log "SIGTERM during a request: it completed (200, 256 embeddings), the container exited 0"

echo "container smoke test passed ($mode): image $IMAGE, $size_bytes, build ${build_s} s"
