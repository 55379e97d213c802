#!/usr/bin/env bash
# Keeps the CUDA build from rotting without a GPU: type-checks and lints the
# crate with `--features cuda` against NVIDIA's CUDA 13.0 toolkit wheels from
# PyPI (installed once into a cache, see scripts/cuda/env.sh). candle's kernels
# are compiled by nvcc for CUDA_COMPUTE_CAP (default 90) as part of the check.
# Uses its own target directory (target/cuda) so the CPU build stays warm.
#
#   scripts/cuda-check.sh            # ~6 min cold on 2 cores, seconds when warm
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=cuda/env.sh
. scripts/cuda/env.sh
export CARGO_TARGET_DIR="${CUDA_CARGO_TARGET_DIR:-target/cuda}"

echo "== cargo check --features cuda (nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), sm_${CUDA_COMPUTE_CAP})"
nice -n 10 cargo check --locked --features cuda --all-targets
echo "== cargo clippy --features cuda"
nice -n 10 cargo clippy --locked --features cuda --all-targets -- -D warnings
