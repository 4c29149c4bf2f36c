#!/usr/bin/env bash
# Collective benchmark on a multi-GPU host for the three link classes, one torchrun per class.
# Usage: bash tools/gpu_collectives.sh OUT_DIR [extra bench_collectives.py args]
set -uo pipefail
out=${1:?usage: gpu_collectives.sh OUT_DIR [args]}; shift
mkdir -p "$out"
# NVLink multicast stays off on shared hosts (see the device notes); keep these in every child.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
ngpu=$(python3 -c 'import torch; print(torch.cuda.device_count())')
jsonl="$out/collectives.jsonl"
run() { env "$@" torchrun --nproc-per-node "$ngpu" tools/bench_collectives.py --out "$jsonl" "${ARGS[@]}"; }
ARGS=("$@")
run NCCL_P2P_DISABLE=0 2>&1 | tee "$out/nvlink.log"
run NCCL_P2P_DISABLE=1 2>&1 | tee "$out/pcie.log"
run NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 2>&1 | tee "$out/network.log"
