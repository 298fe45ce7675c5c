"""The lane bucket planner's cost: Python against numpy dynamic programme, by lane count.

    .venv/bin/python benchmarks/bucket_planner.py [--lanes 16,32,64,256,1024] [--repeats 5]

At every TP inner step ``plan_buckets`` groups the lanes by shape; its split runs three
times per call (one per lane order). This times one split of each kind on the same random
lane shapes (rows used 1..K = 32, real columns 1..L = 50, SASRec's cost model), one thread,
median of ``--repeats``, checks that both find the same least cost, and prints the figures
behind ``lanes.VECTOR_DP_FROM``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from dist_tp.algorithms.tp.lanes import BUCKET_COSTS, VECTOR_DP_FROM, split_numpy, split_python


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(lanes: int, repeats: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    rows = rng.integers(1, 33, size=lanes)
    cols = rng.integers(1, 51, size=lanes)
    order = np.lexsort((np.arange(lanes), cols, rows))
    rows, cols = rows[order], cols[order]
    cost = BUCKET_COSTS["SASRec"]
    py_cost, _ = split_python(rows, cols, cost)
    np_cost, _ = split_numpy(rows, cols, cost)
    if not np.isclose(py_cost, np_cost, rtol=1e-9):
        raise AssertionError(f"{lanes} lanes: python {py_cost} != numpy {np_cost}")
    return {
        "lanes": lanes,
        "python_ms": _median_ms(lambda: split_python(rows, cols, cost), repeats),
        "numpy_ms": _median_ms(lambda: split_numpy(rows, cols, cost), repeats),
        "used": "numpy" if lanes > VECTOR_DP_FROM else "python",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lanes", default="16,32,64,256,1024")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="one JSON line per lane count")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"one split, one thread, median of {args.repeats}; VECTOR_DP_FROM = {VECTOR_DP_FROM}")
    print(f"{'lanes':>6} {'python ms':>10} {'numpy ms':>10} {'used':>7}")
    for lanes in (int(x) for x in args.lanes.split(",")):
        row = measure(lanes, args.repeats)
        if args.json:
            print(json.dumps(row))
        else:
            print(f"{lanes:>6} {row['python_ms']:>10.2f} {row['numpy_ms']:>10.2f} {row['used']:>7}")


if __name__ == "__main__":
    main()
