#!/usr/bin/env bash
# One node, N processes:  NPROC=4 bash launch/torchrun_single.sh configs/ml-1m/sasrec-tp.yaml [key=value ...]
# Each process takes its share of the users; TP lanes are averaged across all of them.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: launch/torchrun_single.sh CONFIG [key=value ...]}
shift
exec .venv/bin/torchrun --standalone --nproc-per-node="${NPROC:-2}" --max-restarts="${MAX_RESTARTS:-1}" \
  -m dist_tp train "$CONFIG" "$@"
