#!/usr/bin/env bash
# Builds the release binary with --features cuda on a machine without a GPU,
# driver or CUDA install, and packs it with the CUDA libraries it links, for a
# GPU machine that has the NVIDIA driver (>= 580) but no Rust toolchain:
#
#   dist/vlembed-cuda13-sm${CUDA_COMPUTE_CAP}/
#     bin/vlembed        RUNPATH $ORIGIN/../lib
#     bin/loadgen        examples/loadgen.rs, for scripts/gpu-check.sh
#     lib/               libcudart.so.13, libcublas(Lt).so.13, libcurand.so.10,
#                        libnvrtc.so.13 (+ builtins) from NVIDIA's CUDA 13.0 wheels
#
# The toolkit and libraries come from PyPI (scripts/cuda/*-requirements.txt,
# pinned with hashes); libcuda.so.1, the driver, is linked against a stub made
# by scripts/cuda/make-libcuda-stub.sh and comes from the GPU machine's driver.
# Copy the directory over and run bin/vlembed, or scripts/gpu-check.sh.
#
#   CUDA_COMPUTE_CAP=90 scripts/build-cuda-release.sh   # default 90 (H100/H200)
#   PREFLIGHT_ONLY=1 scripts/build-cuda-release.sh      # wheels + link check only
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_WITH_LIBS=1
# shellcheck source=cuda/env.sh
. scripts/cuda/env.sh
export CARGO_TARGET_DIR="${CUDA_CARGO_TARGET_DIR:-target/cuda}"

libs="$VLEMBED_CUDA_CACHE/libs/nvidia/cu13/lib"
link="$VLEMBED_CUDA_CACHE/link"
rm -rf "$link"
mkdir -p "$link"
scripts/cuda/make-libcuda-stub.sh "$link"
# Unversioned names for the linker (-lcublas ...), as a toolkit install has them.
for so in "$libs"/libcublas.so.13 "$libs"/libcublasLt.so.13 "$libs"/libcurand.so.10 \
  "$libs"/libnvrtc.so.13 "$CUDA_ROOT"/lib/libcudart.so.13; do
  ln -s "$so" "$link/$(basename "$so" | sed 's/\.so\..*/.so/')"
done

# Preflight (seconds, before the long build): a C program calling one entry
# point of each library links against the same directory.
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
cc -o "$link/probe" "$link/probe.c" -L"$link" -lcuda -lcublas -lcurand -lnvrtc -lcudart \
  -Wl,-rpath,"$libs:$CUDA_ROOT/lib"
probe_missing=$(ldd "$link/probe" | awk '/not found/ {print $1}' | tr '\n' ' ')
if [ "$probe_missing" != "libcuda.so.1 " ]; then
  echo "link preflight: unresolved '$probe_missing' (expected only libcuda.so.1)" >&2
  exit 1
fi
echo "== link preflight passed (stub libcuda + wheel libraries)" >&2
if [ "${PREFLIGHT_ONLY:-0}" = 1 ]; then exit 0; fi

export RUSTFLAGS="${RUSTFLAGS:-} -L native=$link -C link-arg=-Wl,-rpath,\$ORIGIN/../lib"
echo "== cargo build --release --features cuda (sm_${CUDA_COMPUTE_CAP})" >&2
t0=$SECONDS
nice -n 10 cargo build --release --locked --features cuda --bin vlembed --example loadgen
echo "== built in $((SECONDS - t0)) s" >&2

dist="dist/vlembed-cuda13-sm${CUDA_COMPUTE_CAP}"
rm -rf "$dist"
mkdir -p "$dist/bin" "$dist/lib"
cp "$CARGO_TARGET_DIR/release/vlembed" "$CARGO_TARGET_DIR/release/examples/loadgen" "$dist/bin/"
strip "$dist/bin/vlembed" "$dist/bin/loadgen"
cp -L "$libs"/libcublas.so.13 "$libs"/libcublasLt.so.13 "$libs"/libcurand.so.10 \
  "$libs"/libnvrtc.so.13 "$libs"/libnvrtc-builtins.so.13.0 "$CUDA_ROOT"/lib/libcudart.so.13 "$dist/lib/"

# Every library it needs resolves inside the bundle or the base system, except
# the driver.
missing=$(LD_LIBRARY_PATH= ldd "$dist/bin/vlembed" | awk '/not found/ {print $1}' | sort | tr '\n' ' ')
if [ "$missing" != "libcuda.so.1 " ]; then
  echo "unexpected unresolved libraries: '$missing' (expected only libcuda.so.1, the driver)" >&2
  exit 1
fi
echo "NEEDED: $(readelf -d "$dist/bin/vlembed" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')"
du -sh "$dist" "$dist/bin/vlembed"
echo "bundle ready: $dist (needs an NVIDIA driver >= 580 providing libcuda.so.1)"
