#!/usr/bin/env bash
# Host cost and one-rank prefill, this checkout against a baseline copy of the package, one GPU,
# in one call (same machine, same warm GPU), each tool interleaving its own baselines.
# Usage: GIT_BASE=<commit> [PGS="mirror fake"] bash tools/gpu_overhead.sh OUT_DIR BASE_DIR LINKS_JSON
#   BASE_DIR holds an earlier `tpcomp_megatron/` (git archive <commit> tpcomp_megatron | tar -x -C BASE_DIR),
#   with tpcomp_megatron/testing/onerank.py (the stand-in process groups) copied in when it predates it.
set -uo pipefail
out=${1:?usage: gpu_overhead.sh OUT_DIR BASE_DIR LINKS_JSON}; base=${2:?BASE_DIR}; links=${3:?LINKS_JSON}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
# a device's copy of the tree may carry a stale .git: the commits are named here
new_git=${GIT_NEW:-$(git rev-parse --short HEAD)}; base_git=${GIT_BASE:-base}
for build in base new; do
  if [ "$build" = base ]; then pp="$base"; export GIT_COMMIT=$base_git; else pp="$PWD"; export GIT_COMMIT=$new_git; fi
  PYTHONPATH="$pp:${PYTHONPATH:-}" timeout 200 python3 tools/bench_host.py --tag "$build" --calls 1000 \
    --out "$out/host.jsonl" 2>&1 | grep -v -i warn | tee -a "$out/host.log"
done
for pg in ${PGS:-mirror fake}; do
  for build in base new; do
    if [ "$build" = base ]; then pp="$base"; export GIT_COMMIT=$base_git; else pp="$PWD"; export GIT_COMMIT=$new_git; fi
    if [ "$pg" = mirror ]; then args=(--prompts 128 512 2048 8192 --graph --links "$links"); else args=(--prompts 512 2048); fi
    PYTHONPATH="$pp:${PYTHONPATH:-}" timeout 200 python3 tools/bench_prefill.py --tag "$build" --pg "$pg" --tp 2 8 \
      --reps 10 "${args[@]}" --out "$out/prefill.jsonl" 2>&1 | grep -E "^TP" | grep -v modelled | tee -a "$out/prefill.log"
  done
done
