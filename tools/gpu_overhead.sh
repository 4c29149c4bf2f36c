#!/usr/bin/env bash
# Host cost and one-rank prefill, this checkout against a baseline copy of the package, one GPU.
# Usage: bash tools/gpu_overhead.sh OUT_DIR BASE_DIR [bench_prefill.py args]
#   BASE_DIR holds an earlier `tpcomp_megatron/` (git archive <commit> tpcomp_megatron | tar -x -C BASE_DIR,
#   plus tpcomp_megatron/testing/onerank.py, the harness, copied in when the commit predates it).
# The two builds run one after the other on the same warm GPU; each tool interleaves its own
# baseline (NCCL, compression off) with the compressed runs.
set -uo pipefail
out=${1:?usage: gpu_overhead.sh OUT_DIR BASE_DIR [args]}; base=${2:?BASE_DIR}; shift 2
mkdir -p "$out"
dev=$(python3 -c 'import torch; print(torch.cuda.get_device_name().split()[1].lower())')
day=$(date +%F)
for build in base new; do
  if [ "$build" = base ]; then pp="$base"; else pp="$PWD"; fi
  PYTHONPATH="$pp:${PYTHONPATH:-}" python3 tools/bench_host.py --tag "$build" \
    --out "$out/host_${dev}_${day}.jsonl" 2>&1 | grep -v -i warn | tee -a "$out/host_${build}.log"
  PYTHONPATH="$pp:${PYTHONPATH:-}" python3 tools/bench_prefill.py --tag "$build" "$@" \
    --out "$out/prefill_${dev}_${day}.jsonl" 2>&1 | grep -v -i warn | tee -a "$out/prefill_${build}.log"
done
