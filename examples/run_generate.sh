#!/usr/bin/env bash
# torchrun launcher for examples/generate.py: TP = number of processes (default 2).
#   NPROC=2 bash examples/run_generate.sh --tp-comm-compression fp4_e2m1/b32/e8m0 --compare
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --standalone --nproc-per-node "${NPROC:-2}" examples/generate.py "$@"
