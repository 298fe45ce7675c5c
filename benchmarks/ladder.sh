#!/usr/bin/env bash
# The TP ablation ladder on one dataset and backbone (benchmarks/RESULTS.md, "TP variants"):
# each rung 3 seeds, the same epoch cap and early stopping for all, tracked in MLflow under
# experiment ladder-<data>. Usage: benchmarks/ladder.sh [DATA [BACKBONE [PARALLEL]]]
#   DATA: a configs/ folder (ml-100k), BACKBONE: sasrec | gru4rec | caser; runs go to
#   results/ladder/<data>/; then the tables:
#   dist-tp table --pairs ... results/ladder/<data>     (see RESULTS.md for the exact command)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-ml-100k}
B=${2:-sasrec}
PAR=${3:-2}
BIN=.venv/bin/dist-tp
COMMON=(train.epochs=${EPOCHS:-12} train.patience=${PATIENCE:-5} train.threads=1)
RUN=(--seeds "${SEEDS:-3}" --parallel "$PAR" --out "results/ladder/$DATA" --experiment "ladder-$DATA")
C=configs/$DATA
FIXES=(--grid tp.distinct_windows=true --grid tp.normalize=true)
# 1. the backbone
$BIN sweep "$C/$B.yaml" "${COMMON[@]}" "${RUN[@]}"
# 2. TP as the paper specifies it (4 lanes: the backbone's Adam steps per epoch)
$BIN sweep "$C/$B-tp.yaml" "${COMMON[@]}" "${RUN[@]}"
# 3. + the fixes (min(K, n_u) distinct windows, pseudo-gradient / alpha) and one user per lane
#    for all k steps (Reptile on user tasks)
SAME=("${FIXES[@]}" --grid tp.same_user=true)
$BIN sweep "$C/$B-tp.yaml" "${COMMON[@]}" "${SAME[@]}" "${RUN[@]}"
# 4. + more users per outer step: 16 lanes x 8 windows (the same 256 windows per Adam step)
MORE=("${SAME[@]}" --grid tp.lanes=16 --grid tp.inner_batch=8)
$BIN sweep "$C/$B-tp.yaml" "${COMMON[@]}" "${MORE[@]}" "${RUN[@]}"
# 5. the fixes alone (new users at every inner step, as the paper)
$BIN sweep "$C/$B-tp.yaml" "${COMMON[@]}" "${FIXES[@]}" "${RUN[@]}"
# 6. the backbone with partial re-weighting (each user's windows weigh n_u^0.5 in all)
$BIN sweep "$C/$B.yaml" "${COMMON[@]}" --grid train.balance=power "${RUN[@]}"
# 7. rung 4 with the same partial re-weighting (users drawn in proportion to n_u^0.5)
$BIN sweep "$C/$B-tp.yaml" "${COMMON[@]}" "${MORE[@]}" --grid tp.user_sampling=power "${RUN[@]}"
