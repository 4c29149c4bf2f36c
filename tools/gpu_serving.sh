#!/usr/bin/env bash
# The serving trace (tools/bench_serving.py) for this checkout and, where BASE_DIR is given, a
# baseline copy of the package, one GPU, in one call (same machine, same warm GPU).
# Usage: [GIT_NEW=<commit>] [GIT_BASE=<commit>] [REQUESTS=200] [SECS=280] bash tools/gpu_serving.sh OUT_DIR [BASE_DIR]
#   BASE_DIR holds an earlier `tpcomp_megatron/` (git archive <commit> tpcomp_megatron | tar -x -C BASE_DIR).
set -uo pipefail
out=${1:?usage: gpu_serving.sh OUT_DIR [BASE_DIR]}; base=${2:-}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
builds="new"; [ -n "$base" ] && builds="new base"
for build in $builds; do
  if [ "$build" = base ]; then pp="$base"; export GIT_COMMIT=${GIT_BASE:-base}; else pp="$PWD"; export GIT_COMMIT=${GIT_NEW:-$(git rev-parse --short HEAD)}; fi
  PYTHONPATH="$pp:${PYTHONPATH:-}" timeout "${SECS:-280}" python3 tools/bench_serving.py --tag "$build" \
    --requests "${REQUESTS:-200}" --out "$out/serving.jsonl" 2>&1 | grep -v -i warn | tee -a "$out/serving.log"
done
python3 -c "import sys; sys.path.insert(0, 'tools'); from bench_serving import write_page; write_page('$out/serving.jsonl', '$out/serving.md')" || true
