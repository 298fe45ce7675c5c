"""TP's touched rows per lane: one ``torch.unique`` per lane against one sort over all lanes
(``lanes.lane_unique``), per call, on random ids of a 1M-item catalogue.

    .venv/bin/python benchmarks/lane_rows.py [--lanes 16,256,1024] [--ids 3000] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from dist_tp.algorithms.tp.lanes import lane_unique


def per_lane(ids: torch.Tensor) -> torch.Tensor:
    """The earlier way: each lane's ``unique``, padded by repeating its largest."""
    rows = [torch.unique(ids[m]) for m in range(len(ids))]
    width = max(len(r) for r in rows)
    return torch.stack([torch.cat([r, r[-1:].expand(width - len(r))]) for r in rows])


def ms_per_call(fn, ids: torch.Tensor, calls: int = 5) -> float:
    fn(ids)
    started = time.perf_counter()
    for _ in range(calls):
        fn(ids)
    return (time.perf_counter() - started) / calls * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lanes", default="16,256,1024")
    ap.add_argument("--ids", type=int, default=3000, help="ids per lane (k·K·(L + 1 + negatives))")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| lanes | per-lane unique ms | one sort ms | ratio |")
    print("| --- | --- | --- | --- |")
    for lanes in (int(x) for x in args.lanes.split(",")):
        ids = torch.randint(0, 1_000_000, (lanes, args.ids))
        assert torch.equal(per_lane(ids), lane_unique(ids))
        old, new = ms_per_call(per_lane, ids), ms_per_call(lane_unique, ids)
        print(f"| {lanes:,} | {old:.1f} | {new:.1f} | {old / new:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
