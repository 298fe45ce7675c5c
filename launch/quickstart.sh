#!/usr/bin/env bash
# The main job, from a fresh clone: set up .venv, prepare MovieLens-100K, train SASRec and
# SASRec-TP briefly, and print their test metrics side by side (a few minutes on 2 CPU cores).
#   EPOCHS=N   training epochs of each model (default 5)
#   DIST_TP_DATA=DIR   a folder holding ml-100k/u.data[.gz]; otherwise the file is downloaded
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
if [ -z "${DIST_TP_DATA:-}" ] && [ -f ../shared/data/ml-100k/u.data.gz ]; then
  DIST_TP_DATA="$(cd ../shared/data && pwd)"
  export DIST_TP_DATA
fi
EPOCHS=${EPOCHS:-5}
.venv/bin/dist-tp prepare ml-100k --output data/ml-100k
.venv/bin/dist-tp train configs/ml-100k/sasrec.yaml "train.epochs=$EPOCHS" --output runs/quickstart/sasrec
.venv/bin/dist-tp train configs/ml-100k/sasrec-tp.yaml "train.epochs=$EPOCHS" --output runs/quickstart/sasrec-tp
.venv/bin/dist-tp table runs/quickstart/sasrec runs/quickstart/sasrec-tp
