#!/usr/bin/env bash
# The TP ablation ladder on one dataset and backbone (benchmarks/RESULTS.md, "TP variants"):
# each rung 3 seeds, the same epoch cap and early stopping for every rung, tracked in MLflow
# under experiment ladder-<data>. Every (rung, seed) is one job; PARALLEL jobs run at a time,
# so no core idles between rungs. A finished run is skipped, so the script can be rerun.
#   benchmarks/ladder.sh [DATA [BACKBONE [PARALLEL]]]     (ml-100k sasrec 2)
# env: EPOCHS (12), PATIENCE (5), SEEDS (3), ONLY (the rungs to run, e.g. "1 2 7"; all by
# default), EXTRA (an --extra-eval spec, e.g. the adapted evaluation
# 's1lr01 eval.adapt_steps=1 eval.adapt_lr=0.1'). Runs go to results/ladder/<data>/<rung>_seed<s>.
# Rungs 8, 12 and 13 (second stages) start from rung 1's checkpoints: run them once rung 1 is
# done (ONLY=8, ONLY="12 13"), e.g. with EPOCHS=8 PATIENCE=3.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-ml-100k}
B=${2:-sasrec}
PAR=${3:-2}
C=configs/$DATA
COMMON="train.epochs=${EPOCHS:-12} train.patience=${PATIENCE:-5} train.threads=1"
FIXES="--grid tp.distinct_windows=true --grid tp.normalize=true"
SAME="$FIXES --grid tp.same_user=true"
MORE="$SAME --grid tp.lanes=16 --grid tp.inner_batch=8"
FROM1="train.init_from=results/ladder/$DATA/${B}_seed{seed}"
RUNGS=(
  "$C/$B.yaml"                                               # 1. the backbone
  "$C/$B-tp-paper.yaml"                                      # 2. TP as the paper has it (4 lanes)
  "$C/$B-tp-paper.yaml $SAME"                                # 3. + fixes, one user per lane for k steps
  "$C/$B-tp-paper.yaml $MORE"                                # 4. + 16 lanes x 8 windows per Adam step
  "$C/$B-tp-paper.yaml $FIXES"                               # 5. the fixes alone
  "$C/$B.yaml --grid train.balance=power"                    # 6. the backbone, users weigh n_u^0.5
  "$C/$B-tp-paper.yaml $MORE --grid tp.user_sampling=power"  # 7. rung 4, users drawn ∝ n_u^0.5
  "$C/$B-tp.yaml $FROM1"                                     # 8. the -tp config
                                                             #    from rung 1's weights
  "$C/$B-tp-paper.yaml $MORE --grid tp.user_sampling=power --grid tp.user_power=0.75"
                                                             # 9. rung 7 at γ = 0.75
  "$C/$B-tp-paper.yaml $MORE --grid tp.user_sampling=power --grid tp.outer_gradient=query"
                                                             # 10. rung 7, first-order MAML
  "$C/$B-tp-paper.yaml $SAME --grid tp.lanes=16 --grid tp.user_sampling=power --grid tp.k=4 --grid tp.inner_lr=0.05 --grid tp.inner_batch=4"
                                                             # 11. rung 7 at k = 4 (α·k and the
                                                             #     windows per Adam step held)
  "$C/$B-tp.yaml $FROM1 --grid train.lr=0.0001"              # 12. rung 8 at Adam lr 1e-4
  "$C/$B.yaml $FROM1 --grid train.lr=0.0001"                 # 13. its control: joint training
                                                             #     from rung 1's weights at 1e-4
  "$C/$B.yaml --grid train.lr_decays=1"                      # 14. rungs 1 and 13 in one run: the
                                                             #     backbone, lr x 0.1 at a stall
  "$C/$B-tp.yaml --grid train.lr_decays=1"                   # 15. rung 14 for the -tp config:
)                                                            #     TP, lr x 0.1 at a stall
jobs() {
  for i in "${!RUNGS[@]}"; do
    rung=${RUNGS[$i]}
    [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $((i + 1)) "* ]] || continue
    for seed in $(seq 0 $((${SEEDS:-3} - 1))); do
      echo "$rung --seeds $seed-$seed"
    done
  done
}
extra=()
[ -n "${EXTRA:-}" ] && extra=(--extra-eval "$EXTRA")
export COMMON DATA
# one job: "CONFIG [--grid ...] --seeds S-S": the config, then every run's overrides, then the rest
jobs | xargs -P "$PAR" -I{} bash -c 'set -- $0 "$@"; config=$1; shift
    ${DIST_TP:-.venv/bin/dist-tp} sweep "$config" $COMMON "$@" --parallel 1 \
        --out "results/ladder/$DATA" --experiment "ladder-$DATA"' {} "${extra[@]}"
