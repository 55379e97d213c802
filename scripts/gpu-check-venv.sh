#!/usr/bin/env bash
# Prints a Python with torch 2.5.1, transformers 4.45.2 and Pillow (the versions
# the fixtures were made with), for scripts/gpu-check.sh --dry-run and
# scripts/build-gpu-bundle.sh (which packs the inputs with it): GPU_CHECK_PYTHON
# when set, else a venv made once from scripts/requirements-gpu-check.txt in
# ~/.cache/vlembed/gpu-check-venv (re-made when that file changes; downloads
# torch from PyPI: a few minutes). Progress goes to stderr.
set -euo pipefail
if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
  echo "$GPU_CHECK_PYTHON"
  exit 0
fi
req="$(cd "$(dirname "$0")" && pwd)/requirements-gpu-check.txt"
venv="${XDG_CACHE_HOME:-$HOME/.cache}/vlembed/gpu-check-venv"
want=$(sha256sum "$req" | cut -c1-16)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.requirements" 2>/dev/null)" != "$want" ]; then
  echo "== making $venv from $req (once; downloads torch: minutes)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  timeout 1800 "$venv/bin/pip" install -q --disable-pip-version-check -r "$req" >&2
  echo "$want" >"$venv/.requirements"
fi
echo "$venv/bin/python"
