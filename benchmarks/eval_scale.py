"""Full-ranking evaluation over large catalogues: seconds per 10K users, and peak memory.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/eval_scale.py --items 10000 100000 1000000

A SASRec of the default size (64 dims, 2 blocks, windows of 50; untrained: the cost of ranking
does not depend on the weights) ranks the targets of ``--users`` random windows (each window
also its history mask) among all N items, as ``dist-tp evaluate`` does: item chunks of
``eval.item_chunk`` columns whenever N+1 exceeds it. Where the whole ``[batch, N+1]`` matrix
fits (``--whole-max``), the unchunked path runs beside it, on the same queries, and the ranks
are checked equal.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from dist_tp.config import ModelConfig
from dist_tp.data.examples import Queries
from dist_tp.evaluation.evaluate import _rank
from dist_tp.models import build_model


def queries(users: int, items: int, max_len: int, seed: int = 0) -> Queries:
    rng = np.random.default_rng(seed)
    inputs = rng.integers(1, items + 1, (users, max_len))
    return Queries(
        inputs=inputs,
        targets=rng.integers(1, items + 1, users),
        history=inputs,
        is_head=np.zeros(users, dtype=bool),
        user=np.arange(users),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--item-chunk", type=int, default=65_536)
    ap.add_argument("--whole-max", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=50)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"threads {torch.get_num_threads()}, users {args.users}, batch {args.batch}")
    print("| items | path | seconds | s per 10K users | peak RSS |")
    print("| --- | --- | --- | --- | --- |")
    for items in args.items:
        cfg = ModelConfig(name="sasrec", dim=args.dim, max_len=args.max_len)
        model = build_model(cfg, items).eval()
        q = queries(args.users, items, args.max_len)
        paths = [("chunks", args.item_chunk)]
        if items <= args.whole_max:
            paths.append(("whole matrix", items + 1))
        ranks = {}
        for name, chunk in paths:
            start = time.perf_counter()
            ranks[name] = _rank(model, q, exclude_history=True, chunk=args.batch, item_chunk=chunk)
            seconds = time.perf_counter() - start
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            print(
                f"| {items:,} | {name} | {seconds:.1f} | {seconds * 10_000 / args.users:.1f} | "
                f"{peak:.2f} GiB (process so far) |",
                flush=True,
            )
        if len(ranks) == 2:
            assert torch.equal(ranks["chunks"], ranks["whole matrix"]), "ranks differ"


if __name__ == "__main__":
    main()
