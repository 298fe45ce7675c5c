#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv: idempotent and quiet.
# Without a GPU, torch's CPU build (torch==2.13.0) is installed first so that the package's
# `torch>=2.4` requirement is already met and no multi-GB CUDA build is downloaded.
# DeepSpeed (the `deepspeed` extra) comes after torch; on CPU its shared-memory communication
# op is compiled here once (about a minute on 2 cores) into .venv/torch_extensions.
#   bash launch/setup.sh          everything (what the tests need)
#   bash launch/setup.sh core     without DeepSpeed (the quick start; a later full set-up adds it)
set -euo pipefail
MODE=${1:-full}
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.dist_tp-installed
want=$(cat pyproject.toml launch/setup.sh | sha256sum | cut -c1-16)
have=$(cat "$stamp" 2>/dev/null || true)
if [ "$have" = "$want full" ] || [ "$have" = "$want $MODE" ]; then
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: GPU found; installing torch from the package index" >&2
  else
    echo "setup: no GPU; installing the CPU build torch==2.13.0" >&2
    .venv/bin/pip install -q torch==2.13.0
  fi
fi
if [ "$MODE" = core ]; then
  .venv/bin/pip install -q -e ".[dev]"
  echo "$want core" > "$stamp"
  exit 0
fi
.venv/bin/pip install -q -e ".[dev,deepspeed]"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
echo "setup: building DeepSpeed's ops (cached in $TORCH_EXTENSIONS_DIR)" >&2
if ! log=$(.venv/bin/python -c "from dist_tp.parallel.deepspeed_engine import build_ops; build_ops()" 2>&1); then
  echo "$log" >&2
  exit 1
fi
echo "$want full" > "$stamp"
