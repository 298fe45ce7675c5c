"""What TP's user data costs each rank: the training tasks a rank holds (``load_part``: its own
users only) against the whole dataset (what every rank held before), and the time to load.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rank_data.py --data data/ml-1m --worlds 1,2,4,8

For each world size W, rank 0's part is loaded as ``TPStepper`` loads it under torchrun; the
bytes are those of the sampler's arrays (items, offsets, the flat int64 copy and per-user
arrays), which stay held for the whole run. The same for W = 1 is the whole dataset. Loading
for W > 1 reads the files twice (all users' lengths, then the rank's users); one untimed load
warms the file cache first. Then the split itself (``balanced_parts``, every rank at start-up)
on ``--split-users`` synthetic users, against the plain argmin loop it replaced, same run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from dist_tp.algorithms.tp.sampler import TaskSampler, balanced_parts, load_part


def held_bytes(sampler: TaskSampler) -> int:
    """Bytes of the numpy arrays a sampler keeps for the run."""
    seqs = sampler.seqs
    arrays = [seqs.user, seqs.is_new, seqs.is_head, seqs.offsets, seqs.items]
    arrays += [sampler.flat, sampler.n_windows, sampler.cum_windows]
    return sum(a.nbytes for a in arrays)


def argmin_parts(n_windows: np.ndarray, world_size: int) -> list[np.ndarray]:
    """The earlier split: the same greedy, an ``np.argmin`` over the loads per user."""
    loads = np.zeros(world_size, dtype=np.int64)
    owner = np.empty(len(n_windows), dtype=np.int64)
    for u in np.lexsort((np.arange(len(n_windows)), -n_windows)):
        owner[u] = np.argmin(loads)
        loads[owner[u]] += n_windows[u]
    return [np.flatnonzero(owner == r) for r in range(world_size)]


def time_split(users: int, world_size: int) -> None:
    n_windows = np.random.default_rng(0).integers(1, 500, size=users)
    t0 = time.perf_counter()
    parts = balanced_parts(n_windows, world_size)
    heap = time.perf_counter() - t0
    reference = argmin_parts(n_windows, world_size)
    argmin = time.perf_counter() - t0 - heap
    same = all((a == b).all() for a, b in zip(parts, reference, strict=True))
    assert same, "balanced_parts and the argmin loop split differently"
    print(
        f"split of {users:,} users into {world_size} parts: {heap:.2f} s "
        f"(argmin loop {argmin:.2f} s, {argmin / heap:.1f}x; the same split)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a prepared folder")
    parser.add_argument("--worlds", default="1,2,4,8")
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--split-users", type=int, default=1_000_000)
    args = parser.parse_args()
    print("| ranks | rank 0's users | rank 0's windows | held by rank 0 | share | load s |")
    print("| --- | --- | --- | --- | --- | --- |")
    load_part(args.data, max_len=args.max_len, rank=0, world_size=2)  # warm the file cache
    whole = None
    for world in (int(w) for w in args.worlds.split(",")):
        t0 = time.perf_counter()
        sampler, loads = load_part(args.data, max_len=args.max_len, rank=0, world_size=world)
        seconds = time.perf_counter() - t0
        held = held_bytes(sampler)
        whole = whole or (held if world == 1 else None)
        share = f"{held / whole:.3f}" if whole else "—"
        print(
            f"| {world} | {len(sampler):,} | {loads[0]:,} | {held / 2**20:.2f} MiB | {share} | "
            f"{seconds:.2f} |"
        )
    for world in (8, 64):
        time_split(args.split_users, world)


if __name__ == "__main__":
    main()
