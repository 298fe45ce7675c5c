#!/usr/bin/env bash
# Quality at large GPU batches: joint SASRec on the ML-1M part, 3 seeds side by side on one GPU,
# at the large settings of benchmarks/gpu.sh (16,384 windows per step, packed rows of stride
# 25, lr_scaling=sqrt), trained to early stopping; prints each seed's test HR@10 by group and
# the mean ± std, to set beside the converged 256-window figures of benchmarks/RESULTS.md
# (existing HR@10 .3129 ± .0111).
#   bash benchmarks/gpu_quality.sh [key=value overrides for all seeds]
# env: PYTHON (benchmarks/gpu_env.sh), DIST_TP_SHARED_DATA (../shared/data by default), BATCH
# (16384), STRIDE (25), SEEDS ("0 1 2"), LIMIT (seconds per seed, 400), WORK (a temp folder),
# OMP_NUM_THREADS (4).
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh"
SHARED=${DIST_TP_SHARED_DATA:-../shared/data}
WORK=${WORK:-$(mktemp -d -t dist_tp-quality-XXXX)}
DEVICE=${DEVICE:-cuda}
"$PYTHON" -m dist_tp prepare --input "$SHARED/ml-1m/partial/ratings.dat.gz" --format ml-1m \
  --output "$WORK/ml-1m" >/dev/null
for seed in ${SEEDS:-0 1 2}; do
  timeout "${LIMIT:-400}" "$PYTHON" -m dist_tp train configs/ml-1m/sasrec.yaml \
    "data.path=$WORK/ml-1m" "train.device=$DEVICE" "train.batch_size=${BATCH:-16384}" \
    "train.row_stride=${STRIDE:-25}" train.lr_scaling=sqrt "train.seed=$seed" \
    track.enabled=false train.progress=false "$@" \
    --output "$WORK/seed$seed" >"$WORK/seed$seed.log" 2>&1 &
done
status=0
wait || status=$?
"$PYTHON" - "$WORK" <<'EOF'
import json
import statistics
import sys
from pathlib import Path

work = Path(sys.argv[1])
groups = [(s, g) for s in ("existing", "new") for g in ("all", "head", "tail")]
print("| seed | epochs | best epoch | train s | " + " | ".join(f"{s} {g}" for s, g in groups) + " |")
print("| --- " * (4 + len(groups)) + "|")
found = []
for run in sorted(work.glob("seed*/")):
    history = json.loads((run / "history.json").read_text()) if (run / "history.json").exists() else []
    if not (run / "metrics.json").exists():
        print(f"| {run.name} | {len(history)} | (did not finish) |")
        continue
    m = json.loads((run / "metrics.json").read_text())
    hr = [m[s][g]["HR@10"] for s, g in groups]
    best = max(history, key=lambda h: h.get("valid_ndcg10", -1))["epoch"] + 1 if history else 0
    seconds = sum(h.get("seconds", 0) for h in history)
    found.append(hr)
    print(f"| {run.name} | {len(history)} | {best} | {seconds:.0f} | "
          + " | ".join(f"{x:.4f}" for x in hr) + " |")
if len(found) > 1:
    cols = list(zip(*found))
    print("| mean ± std | | | | " + " | ".join(
        f"{statistics.mean(c):.4f} ± {statistics.stdev(c):.4f}" for c in cols) + " |")
EOF
exit $status
