#!/usr/bin/env bash
# Runs each fuzz target of examples/fuzz_inputs.rs for a bounded time, niced,
# and prints one line per target (executions, findings, slowest execution,
# peak RSS). Exits non-zero when a target found something (inputs are kept in
# fuzz-findings/) or crashed (a panic escaping, an abort, a signal).
#
#   scripts/fuzz.sh [seconds per target (default 120)] [targets...]
#
# Environment: FUZZ_SEED (default: the date), FUZZ_MAX_RSS_MB (default 2048),
# FUZZ_PROFILE (release or dev; default release).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
SECONDS_PER=${1:-120}
shift || true
TARGETS=("$@")
[[ ${#TARGETS[@]} -gt 0 ]] || TARGETS=(json multipart image)
SEED=${FUZZ_SEED:-$(date +%s)}
MAX_RSS=${FUZZ_MAX_RSS_MB:-2048}
PROFILE=${FUZZ_PROFILE:-release}
if [[ $PROFILE == release ]]; then
    nice -n 10 cargo build --release --locked --example fuzz_inputs
    BIN=target/release/examples/fuzz_inputs
else
    nice -n 10 cargo build --locked --example fuzz_inputs
    BIN=target/debug/examples/fuzz_inputs
fi
status=0
for t in "${TARGETS[@]}"; do
    # A hard wall-clock bound on top of the harness's own.
    if ! timeout --signal=KILL $((SECONDS_PER + 120)) \
        nice -n 10 "$BIN" "$t" "$SECONDS_PER" "$SEED" --max-rss-mb "$MAX_RSS"; then
        echo "fuzz target $t FAILED (exit status above; seed $SEED)" >&2
        status=1
    fi
done
exit $status
