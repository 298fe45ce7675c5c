#!/usr/bin/env bash
# The main job, from a fresh clone: set up .venv, prepare MovieLens-100K, train SASRec and
# SASRec-TP briefly (tracked in the local MLflow store, sqlite:///mlflow.db here), and print
# the comparison table from MLflow (a few minutes on 2 CPU cores).
#   EPOCHS=N           training epochs of each model (default 3)
#   DIST_TP_DATA=DIR   a folder holding ml-100k/u.data[.gz]; otherwise the file is downloaded
#   MLFLOW_TRACKING_URI=URI   track somewhere else (a server, another store)
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh core
if [ -z "${DIST_TP_DATA:-}" ] && [ -f ../shared/data/ml-100k/u.data.gz ]; then
  DIST_TP_DATA="$(cd ../shared/data && pwd)"
  export DIST_TP_DATA
fi
EPOCHS=${EPOCHS:-3}
EXPERIMENT=quickstart-$(date +%Y%m%d-%H%M%S)
.venv/bin/dist-tp prepare ml-100k --output data/ml-100k
for model in sasrec sasrec-tp; do
  .venv/bin/dist-tp train "configs/ml-100k/$model.yaml" "train.epochs=$EPOCHS" \
    "track.experiment=$EXPERIMENT" --output "runs/$EXPERIMENT/$model"
done
.venv/bin/dist-tp compare --experiment "$EXPERIMENT"
URI=${MLFLOW_TRACKING_URI:-sqlite:///$(pwd)/mlflow.db}
echo "Browse the runs: .venv/bin/mlflow ui --backend-store-uri $URI  (then open http://127.0.0.1:5000)"
