"""Joint training speed as a user's windows past its first L share rows (``train.row_stride``):
windows per row and windows/s of the real step, per backbone and stride, on one data set.

    .venv/bin/python benchmarks/packed_rows.py [--data ml-1m] [--strides 1,10,25,50] \\
        [--backbones sasrec,gru4rec] [--seconds 10] [--threads 1]

Uses the prepared folder ``data/<data>`` (``dist-tp prepare``) and its config
``configs/<data>/<backbone>.yaml``. All cases of a backbone are timed in one rotation of turns
(``throughput.rates``), so the ratios against stride 1 are this run's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dist_tp.config import load_config
from dist_tp.data.examples import training_rows
from dist_tp.data.stream import load_sequences

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import REPO, joint_steps, rates  # noqa: E402  (the same step and timer)


def windows_per_row(path: str, max_len: int, stride: int) -> float:
    """Training windows over rows, over all existing users."""
    seqs = load_sequences(path, roles=["existing"])
    rows = training_rows(seqs, max_len=max_len, all_positions=True, stride=stride)
    return float(rows.windows.sum()) / max(len(rows), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="ml-1m")
    ap.add_argument("--strides", default="1,10,25,50")
    ap.add_argument("--backbones", default="sasrec,gru4rec")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    strides = [int(s) for s in args.strides.split(",")]
    path = str(REPO / "data" / args.data)
    print(f"{args.data}, {args.threads} thread(s), {args.seconds:g} s per case")
    print("| backbone | row_stride | windows per row | windows/s | vs stride 1 |")
    print("| --- | --- | --- | --- | --- |")
    for backbone in args.backbones.split(","):
        configs = [
            load_config(
                REPO / "configs" / args.data / f"{backbone}.yaml",
                [f"data.path={path}", f"train.row_stride={s}", "train.progress=false"],
            )
            for s in strides
        ]
        found = rates([joint_steps(c, torch.device("cpu")) for c in configs], args.seconds)
        for stride, rate, cfg in zip(strides, found, configs):
            per_row = windows_per_row(path, cfg.model.max_len, stride)
            print(
                f"| {backbone} | {stride} | {per_row:.1f} | {rate:,.0f} | {rate / found[0]:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
