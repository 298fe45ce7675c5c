"""Training speed as the catalogue grows: joint SASRec and SASRec-TP windows/s with sampled
softmax, on generated logs of 10K to 1M items.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/catalogue.py --items 10000 100000 1000000

Each log comes from ``dist-tp synth`` (``--events`` events, ``--users`` users, the given
items) and is prepared with ``--min-item-count 1`` so that the catalogue keeps every item
that occurs. Joint training (256-window mini-batches, Adam) and TP (the configs' defaults but
``tp.lanes``) run the real steps with ``train.loss=sampled_softmax``,
``train.negatives=popularity`` and 128 negatives, timed in alternating turns (as
``throughput.py`` does) so both see the same load; the ratios to the smallest catalogue are
this run's.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from dist_tp.config import load_config
from dist_tp.data.stream import open_prepared

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import joint_steps, rates, tp_steps  # noqa: E402  (the same steps and timer)

DIST_TP = [sys.executable, "-m", "dist_tp"]


def make_data(work: Path, items: int, events: int, users: int) -> str:
    log, out = work / f"log-{items}", work / f"data-{items}"
    if not out.exists():
        cmd = [*DIST_TP, "synth", "--events", str(events), "--users", str(users)]
        subprocess.run([*cmd, "--items", str(items), "--output", str(log)], check=True)
        cmd = [*DIST_TP, "prepare", "--input", str(log), "--format", "parquet"]
        cmd += ["--columns", "user=user,item=item,timestamp=timestamp", "--output", str(out)]
        subprocess.run([*cmd, "--min-item-count", "1"], check=True, stdout=subprocess.DEVNULL)
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--events", type=int, default=3_000_000)
    ap.add_argument("--users", type=int, default=30_000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--lanes", type=int, default=4)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="dist_tp-catalogue-"))
    work.mkdir(parents=True, exist_ok=True)
    common = [
        "train.loss=sampled_softmax",
        "train.negatives=popularity",
        "train.num_negatives=128",
        "train.progress=false",
    ]
    rows, base = [], None
    print(f"threads {torch.get_num_threads()}, {args.seconds:.0f} s per case")
    for items in args.items:
        path = make_data(work, items, args.events, args.users)
        catalogue = open_prepared(path).num_items
        joint = load_config(None, [f"data.path={path}", *common])
        tp = load_config(
            None, [f"data.path={path}", *common, "train.method=tp", f"tp.lanes={args.lanes}"]
        )
        cpu = torch.device("cpu")
        j, t = rates([joint_steps(joint, cpu), tp_steps(tp, cpu)], args.seconds)
        base = base or j
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        rows.append((items, catalogue, j, j / base, t, j / t, peak))
        print(
            f"items {catalogue:,}: joint {j:,.0f} windows/s ({j / base:.2f}x the first), "
            f"TP {t:,.0f} windows/s (TP epoch / joint epoch {j / t:.2f}), "
            f"peak RSS so far {peak:.2f} GiB",
            flush=True,
        )
    print()
    head = "| synth items | catalogue | joint windows/s | vs first | TP windows/s "
    print(head + "| TP epoch / joint epoch | peak RSS |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for items, catalogue, j, rel, t, ratio, peak in rows:
        print(
            f"| {items:,} | {catalogue:,} | {j:,.0f} | {rel:.2f} | {t:,.0f} | {ratio:.2f} | "
            f"{peak:.2f} GiB |"
        )


if __name__ == "__main__":
    main()
