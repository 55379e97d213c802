# shellcheck shell=bash
# Sourced by scripts/cuda-check.sh and scripts/build-cuda-release.sh: installs
# NVIDIA's CUDA 13.0 wheels (pinned, hash-checked) from PyPI into a cache
# directory once, and exports what candle's and cudarc's build scripts need.
#
#   VLEMBED_CUDA_CACHE  cache directory (default ~/.cache/vlembed/cuda-13.0)
#   CUDA_COMPUTE_CAP    GPU architecture the kernels are built for (default 90: H100/H200)
#   CUDA_WITH_LIBS=1    also install the libraries needed to link a binary
#
# After sourcing: CUDA_ROOT (= CUDA_HOME) is the toolkit (nvidia/cu13 layout),
# nvcc is on PATH, CUDARC_CUDA_VERSION=13000.

cuda_env_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VLEMBED_CUDA_CACHE="${VLEMBED_CUDA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vlembed/cuda-13.0}"

cuda_install_wheels() { # requirements-file target-dir
  local req="$1" dir="$2" stamp sum
  sum="$(sha256sum "$req" | cut -c1-16)"
  stamp="$dir/.installed-$sum"
  if [ -e "$stamp" ]; then return 0; fi
  echo "== installing $(basename "$req") into $dir (from PyPI)" >&2
  rm -rf "$dir"
  mkdir -p "$dir"
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: --require-hashes --target "$dir" -r "$req" >&2
  touch "$stamp"
}

if ! command -v python3 >/dev/null 2>&1 || ! python3 -m pip --version >/dev/null 2>&1; then
  echo "python3 with pip is required to install the CUDA wheels" >&2
  return 1 2>/dev/null || exit 1
fi

cuda_install_wheels "$cuda_env_dir/toolkit-requirements.txt" "$VLEMBED_CUDA_CACHE/toolkit"
if [ "${CUDA_WITH_LIBS:-0}" = 1 ]; then
  cuda_install_wheels "$cuda_env_dir/link-requirements.txt" "$VLEMBED_CUDA_CACHE/libs"
fi

export CUDA_ROOT="$VLEMBED_CUDA_CACHE/toolkit/nvidia/cu13"
export CUDA_HOME="$CUDA_ROOT"
export PATH="$CUDA_ROOT/bin:$PATH"
# cudarc 0.19.10 reads the toolkit version from `nvcc --version` or this
# variable; naming it keeps the bindings fixed to CUDA 13.0 whatever nvcc says.
export CUDARC_CUDA_VERSION=13000
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"

if ! nvcc --version | grep -q 'release 13\.0'; then
  echo "unexpected nvcc under $CUDA_ROOT:" >&2
  nvcc --version >&2
  return 1 2>/dev/null || exit 1
fi
