#!/usr/bin/env bash
# Renders every Kubernetes kustomization under deploy/kubernetes with
# `kubectl kustomize` and validates each object offline:
#  - built-in kinds against the Kubernetes OpenAPI schemas bundled in
#    kubernetes-validate (PyPI), strict (unknown fields fail), for the oldest and
#    newest Kubernetes versions we claim (K8S_VERSIONS);
#  - KEDA's ScaledObject (a CRD: no bundled schema) against
#    deploy/kubernetes/schemas/scaledobject-keda.sh-v1alpha1.json, a hand-written
#    subset of KEDA's spec, and its HPA behavior block against autoscaling/v2;
#  - the deployment contract vlembed relies on (scripts/validate_manifests.py).
# Needs kubectl (installed with apt-get when missing and running as root) and
# python3 with pip; kubernetes-validate goes into a cache directory.
# Runs in ~10 s once the tools are installed.
set -euo pipefail
cd "$(dirname "$0")/.."

KV_VERSION=1.37.0
K8S_VERSIONS="${K8S_VERSIONS:-1.29.0 1.37.0}"
cache="${VLEMBED_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vlembed}/kubernetes-validate-$KV_VERSION"

if ! command -v kubectl >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing kubectl (apt-get)" >&2
    apt-get install -y -q kubectl >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q kubectl >/dev/null; }
  else
    echo "kubectl is required (apt-get install kubectl)" >&2
    exit 1
  fi
fi
if [ ! -e "$cache/.installed" ]; then
  echo "== installing kubernetes-validate==$KV_VERSION into $cache (PyPI)" >&2
  rm -rf "$cache"
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --target "$cache" \
    "kubernetes-validate==$KV_VERSION" >&2
  touch "$cache/.installed"
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
root="$PWD/deploy/kubernetes"

for overlay in "$root"/overlays/*/; do
  name="$(basename "$overlay")"
  kubectl kustomize "$overlay" >"$out/overlay-$name.yaml"
done

PYTHONPATH="$cache${PYTHONPATH:+:$PYTHONPATH}" python3 scripts/validate_manifests.py \
  --schemas "$root/schemas" --versions "$K8S_VERSIONS" "$out"/*.yaml
