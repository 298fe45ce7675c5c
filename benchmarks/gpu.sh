#!/usr/bin/env bash
# The GPU measurements in one command, on one GPU: benchmarks/gpu_step.py's table of joint
# and TP windows/s per backbone at the configs' settings and at large batches, on the ML-1M
# part and a generated 1M-item log, with the kernels' share of the step, the GPU's utilisation
# and peak memory (the module docstring says how each is measured), a row as each is measured.
# On one H200 the whole table took longer than 8 minutes: the first run stopped at 420 s
# after SASRec and GRU4Rec on the ML-1M part (benchmarks/RESULTS.md, "Large steps measured on
# one H200"); --datasets and --backbones split it into parts.
#   bash benchmarks/gpu.sh [gpu_step.py options, e.g. --datasets synth --backbones sasrec]
# env: PYTHON (benchmarks/gpu_env.sh), DIST_TP_SHARED_DATA (the shared data, ../shared/data by
# default), LIMIT (seconds, 470), COMPILE (the backbones also timed with train.compile,
# "sasrec"; empty for none), OMP_NUM_THREADS (4).
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
timeout "${LIMIT:-470}" "$PYTHON" benchmarks/gpu_step.py --compile "${COMPILE-sasrec}" "$@"
