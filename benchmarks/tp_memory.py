"""TP memory grows with lanes × touched rows, not lanes × items.

    .venv/bin/python benchmarks/tp_memory.py [--items 1000000] [--lanes 1,16,64]

For each lane count, a fresh process builds SASRec (D = 64, L = 50) over ``--items`` items,
samples users with random histories, runs 3 outer steps with the ``bce`` loss (sparse lanes)
and prints its peak RSS, the rows each lane carries (T) and what dense per-lane item tables
(M × (N+1) × D floats) would have needed instead.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
sys.path.insert(0, {repo!r})
import numpy as np, torch
from dist_tp.config import load_config
from dist_tp.data.stream import UserSequences
from dist_tp.models import build_model
from dist_tp.algorithms.tp.sampler import TaskSampler
from dist_tp.algorithms.tp.trainer import TPStepper

items, lanes = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(2)
rng = np.random.default_rng(0)
lengths = rng.integers(12, 200, 20000)
seqs = UserSequences(
    user=np.arange(1, len(lengths) + 1, dtype=np.int32),
    is_new=np.zeros(len(lengths), bool),
    is_head=lengths > np.quantile(lengths, 0.8),
    offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
    items=rng.integers(1, items + 1, int(lengths.sum())).astype(np.int32),
)
cfg = load_config(None, ["model.name=sasrec", "train.loss=bce", "train.method=tp",
                         f"tp.lanes={{lanes}}".format(lanes=lanes)])
model = build_model(cfg.model, items)
stepper = TPStepper(model, cfg, sampler=TaskSampler(seqs, max_len=cfg.model.max_len))
t0 = time.perf_counter()
touched = 0
for step in range(3):
    stats = stepper.outer_step(0, step)
    touched = max(touched, stats.touched_rows)
seconds = (time.perf_counter() - t0) / 3
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({{"rss_gib": int(hwm.split()[1]) / 2**20, "touched": touched,
                   "seconds_per_step": seconds}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--lanes", default="1,16,64")
    args = parser.parse_args()
    dim = 64
    print(f"SASRec, D = {dim}, L = 50, N = {args.items:,} items, bce loss, k = 2, K = 32")
    print("| lanes M | rows per lane T | peak RSS | s / outer step | dense M×(N+1)×D tables |")
    print("| --- | --- | --- | --- | --- |")
    for lanes in (int(x) for x in args.lanes.split(",")):
        code = CHILD.format(repo=str(REPO))
        res = subprocess.run(
            [sys.executable, "-c", code, str(args.items), str(lanes)],
            check=True,
            capture_output=True,
            text=True,
        )
        r = json.loads(res.stdout.strip().splitlines()[-1])
        dense = lanes * (args.items + 1) * dim * 4 / 2**30
        print(
            f"| {lanes} | {r['touched']:,} | {r['rss_gib']:.2f} GiB | "
            f"{r['seconds_per_step']:.2f} | {dense:.1f} GiB |",
            flush=True,
        )


if __name__ == "__main__":
    main()
