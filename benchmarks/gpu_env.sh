# Sourced by benchmarks/gpu.sh and benchmarks/gpu_quality.sh: the repository root as the
# working folder, the Python to run (PYTHON; .venv/bin/python when there, else python3: on a
# GPU machine its own CUDA build of torch with the project's requirements), the checkout on
# PYTHONPATH, unbuffered output, and OMP_NUM_THREADS (4 unless set).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
