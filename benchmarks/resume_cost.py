"""What exact mid-epoch resume costs joint training: the per-step seeding
(``dist_tp.core.seeding.seed_step``); what ``--resume`` reads before its first step, which is the
pool of users it stopped in (from the stream position in ``last.pt``; timed for the largest
pool), against reading and packing the whole epoch up to there (what it read before positions
were kept); and, for scale, the time of a few training steps.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/resume_cost.py --data data/ml-1m --dataset ml-1m
"""

import argparse
import time

import torch

from dist_tp.algorithms.joint import JointStepper
from dist_tp.config import load_config
from dist_tp.core.seeding import seed_step
from dist_tp.data.stream import open_prepared
from dist_tp.models.saved import build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a prepared folder")
    parser.add_argument("--dataset", default="ml-1m", help="configs/<dataset>/<backbone>.yaml")
    parser.add_argument("--backbones", default="sasrec,caser")
    parser.add_argument("--steps", type=int, default=10, help="training steps timed, for scale")
    args = parser.parse_args()
    torch.set_num_threads(1)

    t0, n = time.perf_counter(), 10_000
    for step in range(n):
        seed_step(0, 1, step, 0, extra=1)
    print(f"seed_step: {(time.perf_counter() - t0) / n * 1e6:.0f} µs per step")

    data = open_prepared(args.data)
    for backbone in args.backbones.split(","):
        cfg = load_config(
            f"configs/{args.dataset}/{backbone}.yaml",
            [f"data.path={args.data}", "train.progress=false"],
        )
        stepper = JointStepper(build(cfg, data), cfg, data=data)
        t0 = time.perf_counter()
        positions = [position for _, position in stepper.positioned_batches(0)]
        read, batches = time.perf_counter() - t0, len(positions)
        ends = {p.pool: p for p in positions}  # a pool's last mini-batch
        largest = max(ends.values(), key=lambda position: position.done)
        t0 = time.perf_counter()
        for _ in stepper.positioned_batches(0, largest):  # reads that pool and the next one
            break
        resume = time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            stepper.run_epoch(0, on_step=lambda step, _: _stop_after(step, args.steps))
        except _Enough:
            pass
        per_step = (time.perf_counter() - t0) / args.steps
        print(
            f"{backbone}: an epoch's {batches:,} mini-batches ({len(ends)} pools) read and "
            f"packed in {read:.3f} s; resumed after the largest pool "
            f"({largest.done} mini-batches), "
            f"it has its next mini-batch in {resume:.3f} s ({read / resume:.0f}x less); training "
            f"{per_step:.3f} s per step (the epoch ≈ {batches * per_step:.0f} s)"
        )


class _Enough(Exception):
    pass


def _stop_after(step: int, steps: int) -> None:
    if step + 1 >= steps:
        raise _Enough


if __name__ == "__main__":
    main()
