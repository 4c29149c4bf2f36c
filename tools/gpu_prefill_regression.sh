#!/usr/bin/env bash
# The fixed-shape one-rank prefill (tools/bench_prefill.py, mirror stand-in, eager pairs) for a
# baseline copy of the package and this checkout, one GPU, in one call.
# Usage: GIT_BASE=<commit> GIT_NEW=<commit> bash tools/gpu_prefill_regression.sh OUT_DIR BASE_DIR
set -uo pipefail
out=${1:?usage: gpu_prefill_regression.sh OUT_DIR BASE_DIR}; base=${2:?BASE_DIR}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
for build in base new; do
  if [ "$build" = base ]; then pp="$base"; export GIT_COMMIT=${GIT_BASE:-base}; else pp="$PWD"; export GIT_COMMIT=${GIT_NEW:-new}; fi
  PYTHONPATH="$pp:${PYTHONPATH:-}" timeout "${SECS:-150}" python3 tools/bench_prefill.py --tag "$build" --pg mirror \
    --tp 2 8 --reps "${REPS:-10}" --prompts 512 2048 8192 --out "$out/prefill.jsonl" 2>&1 | grep -E "^TP" | tee -a "$out/prefill.log"
done
