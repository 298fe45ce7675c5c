#!/usr/bin/env bash
# Several nodes: run the same command on every node.
#   NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=host0:29500 CONFIG=configs/ml-1m/sasrec-tp.yaml \
#     bash launch/torchrun_multinode.sh [key=value ...]
# A worker that dies is restarted (MAX_RESTARTS, default 3) and resumes from the run folder's
# last.pt, which must be on storage every node sees (set train.checkpoint_every for TP).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NNODES:?}" "${NPROC_PER_NODE:?}" "${RDZV_ENDPOINT:?}" "${CONFIG:?}"
exec .venv/bin/torchrun --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" \
  --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-dist_tp}" \
  --max-restarts="${MAX_RESTARTS:-3}" -m dist_tp train "$CONFIG" "$@"
