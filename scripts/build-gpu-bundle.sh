#!/usr/bin/env bash
# Builds the bundle that scripts/gpu-check.sh runs on a GPU machine (no Rust,
# no internet there), on any x86-64 Linux machine without a GPU:
#
#   dist/gpu-bundle/            (ignored by git; carried with `carry: ["dist/gpu-bundle"]`)
#     vlembed.xz, loadgen.xz    `--release --features cuda` for sm_$CUDA_COMPUTE_CAP (90:
#                               H100/H200), stripped, xz-compressed (the GPU host
#                               unpacks them with Python's lzma)
#     inputs/                   16 640x480 JPEGs and captions (the load), the
#                               BGE-VL-MLLM reference inputs (prompt ids, uint8
#                               LLaVA-NeXT tiles as .xz; the host has no Pillow)
#     BUILD-INFO.txt            commit, toolchain, build time, sizes, NEEDED libraries
#
# No CUDA library travels: the binaries link cuBLAS, cuBLASLt, cuRAND, NVRTC and
# the CUDA runtime dynamically (sonames .so.13 / .so.10, CUDA 13.0 wheels from
# PyPI at link time, scripts/cuda/) and find the GPU host's own copies (its
# torch's nvidia-* wheels) through LD_LIBRARY_PATH, which gpu-check.sh sets and
# checks with `ldd -r`; libcuda.so.1 is the host's driver (a generated stub here).
#
#   scripts/build-gpu-bundle.sh              # cold: ~16-20 min on 2 quiet cores (nice 10)
#   INPUTS_ONLY=1 scripts/build-gpu-bundle.sh   # re-pack the inputs only (seconds)
#
# Environment: CUDA_COMPUTE_CAP (90), CUDA_CARGO_TARGET_DIR (target/cuda, apart
# from the CPU build), GPU_CHECK_PYTHON (the Python that packs the inputs; default
# scripts/gpu-check-venv.sh's venv), BUNDLE (dist/gpu-bundle).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
BUNDLE="${BUNDLE:-dist/gpu-bundle}"
say() { echo "== $*" >&2; }
t_start=$SECONDS

mkdir -p "$BUNDLE"
# --- inputs ---------------------------------------------------------------------------
PY=$(scripts/gpu-check-venv.sh)
rm -rf "$BUNDLE/inputs"
say "packing the inputs with $PY"
timeout 600 "$PY" scripts/gpu_check.py pack --compress --out "$BUNDLE/inputs" >&2

if [ "${INPUTS_ONLY:-0}" != 1 ]; then
  # --- the CUDA build -------------------------------------------------------------------
  export CUDA_WITH_LIBS=1
  # shellcheck source=cuda/env.sh
  . scripts/cuda/env.sh
  export CARGO_TARGET_DIR="${CUDA_CARGO_TARGET_DIR:-target/cuda}"
  libs="$VLEMBED_CUDA_CACHE/libs/nvidia/cu13/lib"
  link="$VLEMBED_CUDA_CACHE/link"
  rm -rf "$link"
  mkdir -p "$link"
  scripts/cuda/make-libcuda-stub.sh "$link"
  # unversioned names for the linker (-lcublas ...), as a toolkit install has them
  for so in "$libs"/libcublas.so.13 "$libs"/libcublasLt.so.13 "$libs"/libcurand.so.10 \
    "$libs"/libnvrtc.so.13 "$CUDA_ROOT"/lib/libcudart.so.13; do
    ln -s "$so" "$link/$(basename "$so" | sed 's/\.so\..*/.so/')"
  done
  # The linker finds them through LIBRARY_PATH, and their own dependencies
  # (libcublas.so.13 -> libcublasLt.so.13) through LD_LIBRARY_PATH; nothing is
  # recorded in the binaries (no RUNPATH: at run time the host's libraries come
  # from the LD_LIBRARY_PATH that gpu-check.sh sets).
  export LIBRARY_PATH="$link${LIBRARY_PATH:+:$LIBRARY_PATH}"
  export LD_LIBRARY_PATH="$libs:$CUDA_ROOT/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  cat >"$link/probe.c" <<'C'
int cuInit(unsigned);
int cublasCreate_v2(void **);
int curandCreateGenerator(void **, int);
int nvrtcVersion(int *, int *);
int cudaGetDeviceCount(int *);
int main(void) {
  void *h; int a, b;
  return cuInit(0) + cublasCreate_v2(&h) + curandCreateGenerator(&h, 100) + nvrtcVersion(&a, &b) +
         cudaGetDeviceCount(&a);
}
C
  cc -o "$link/probe" "$link/probe.c" -lcuda -lcublas -lcurand -lnvrtc -lcudart
  say "link preflight passed (stub libcuda + wheel libraries through LIBRARY_PATH)"

  commit="$(git rev-parse --short=12 HEAD)$( [ -z "$(git status --porcelain --untracked-files=no -- src examples Cargo.toml Cargo.lock build.rs config)" ] || echo ' (+ local changes)')"
  say "cargo build --release --features cuda (sm_${CUDA_COMPUTE_CAP}) in $CARGO_TARGET_DIR"
  t0=$SECONDS
  nice -n 10 cargo build --release --locked --features cuda --bin vlembed --example loadgen
  build_s=$((SECONDS - t0))
  say "built in $build_s s"

  tmp="$BUNDLE/.tmp"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  cp "$CARGO_TARGET_DIR/release/vlembed" "$CARGO_TARGET_DIR/release/examples/loadgen" "$tmp/"
  strip "$tmp/vlembed" "$tmp/loadgen"
  # Every library resolves with the wheels' folders on LD_LIBRARY_PATH, except
  # the driver (as on the GPU host, whose torch brings the same wheels).
  missing=$(LD_LIBRARY_PATH="$libs:$CUDA_ROOT/lib" ldd "$tmp/vlembed" | awk '/not found/ {print $1}' | sort | tr '\n' ' ')
  if [ "$missing" != "libcuda.so.1 " ]; then
    echo "unexpected unresolved libraries: '$missing' (expected only libcuda.so.1, the driver)" >&2
    exit 1
  fi
  needed=$(readelf -d "$tmp/vlembed" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')
  say "NEEDED: $needed"
  raw_v=$(stat -c %s "$tmp/vlembed")
  raw_l=$(stat -c %s "$tmp/loadgen")
  say "compressing (xz -9e)"
  for b in vlembed loadgen; do
    if command -v xz >/dev/null 2>&1; then
      xz -9e -T0 -c "$tmp/$b" >"$BUNDLE/$b.xz"
    else
      python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(open(sys.argv[1], "rb"), lzma.open(sys.argv[2], "wb", preset=9 | lzma.PRESET_EXTREME))' \
        "$tmp/$b" "$BUNDLE/$b.xz"
    fi
  done
  {
    echo "commit: $commit (the source tree when the build started)"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ), cargo build --release --features cuda, sm_${CUDA_COMPUTE_CAP}, CUDA 13.0 wheels, $(rustc --version)"
    echo "build_s: $build_s"
    echo "vlembed: $raw_v bytes stripped, $(stat -c %s "$BUNDLE/vlembed.xz") xz, sha256 $(sha256sum "$tmp/vlembed" | cut -c1-16)"
    echo "loadgen: $raw_l bytes stripped, $(stat -c %s "$BUNDLE/loadgen.xz") xz, sha256 $(sha256sum "$tmp/loadgen" | cut -c1-16)"
    echo "NEEDED: $needed"
  } >"$BUNDLE/BUILD-INFO.txt"
  rm -rf "$tmp"
fi

# --- what travels ------------------------------------------------------------------------
bundle_b=$(du -sb "$BUNDLE" | cut -f1)
tracked_b=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
untracked_b=$(git ls-files -z --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
total=$((bundle_b + tracked_b + untracked_b))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
cat "$BUNDLE/BUILD-INFO.txt" 2>/dev/null >&2 || true
say "bundle $BUNDLE: $(mib "$bundle_b"); with the working tree ($(mib "$tracked_b") tracked, $(mib "$untracked_b") untracked): $(mib "$total") of the 64 MiB carried"
if [ "$total" -gt $((60 * 1048576)) ]; then
  say "WARNING: over 60 MiB: the device run may refuse it (remove untracked files, or shrink the bundle)"
fi
say "done in $((SECONDS - t_start)) s. On the GPU machine (README, \"GPU check\"):"
echo "  run(command: \"scripts/gpu-check.sh\", carry: [\"$BUNDLE\"], timeout_s: 540)"
