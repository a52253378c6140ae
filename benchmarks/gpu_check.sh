#!/usr/bin/env bash
# The prepared GPU check (docs/performance.md, "GPU check"): the CUDA tests, fp32 vs bf16 vs
# fp16 agreement of the paper's heat SMoE, epochs per second of the quick and the paper SMoE
# recipes, and the paper recipe's time to 100 % validation prcntclose1.0, in one call of
# under 8 minutes on one GPU, written to one JSON file (benchmarks/gpu_check.py does the work).
#
#   bash benchmarks/gpu_check.sh [--out gpu_check.json] [--dry-run] [--cap-s S] [--budget-s S]
#       [--work DIR]
#
# --dry-run runs the same code on the CPU with tiny sizes (tests/test_gpu_check.py runs it).
# Without --dry-run and without a CUDA device it stops at once with exit status 2.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# This checkout's package, whatever smoe the environment has installed.
export PYTHONPATH="${root}${PYTHONPATH:+:${PYTHONPATH}}"
# The trainers run deterministically; cuBLAS reads its workspace setting at its first call in a
# process, so it is set before Python starts (the value the trainers would set).
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"
exec "${PYTHON:-python}" "${root}/benchmarks/gpu_check.py" "$@"
