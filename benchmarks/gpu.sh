#!/usr/bin/env bash
# The GPU measurements in one command, on one GPU, in at most 8 minutes: benchmarks/gpu_step.py's
# table of joint and TP windows/s per backbone at the configs' settings and at large batches,
# on the ML-1M part and a generated 1M-item log, with the kernels' share of the step, the GPU's
# utilisation and peak memory (the module docstring says how each is measured).
#   bash benchmarks/gpu.sh [gpu_step.py options, e.g. --batch 8192 --lanes 128]
# env: PYTHON (.venv/bin/python when there, else python3: the machine's own CUDA build of torch
# with the project's requirements; nothing is installed here), DIST_TP_SHARED_DATA (the shared
# data, ../shared/data by default), LIMIT (seconds, 470), OMP_NUM_THREADS (4).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
timeout "${LIMIT:-470}" "$PYTHON" benchmarks/gpu_step.py --compile "${COMPILE-sasrec}" "$@"
