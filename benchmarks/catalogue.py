"""Training speed as the catalogue grows: joint SASRec and SASRec-TP windows/s with sampled
softmax, on generated logs of 10K to 10M items.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/catalogue.py --items 10000 100000 1000000

Each log comes from ``dist-tp synth`` (``--events`` events, ``--users`` users, the given
items; ``--events-per-item`` raises the events of the larger catalogues so that most items
occur) and is prepared out of core with ``--min-item-count 1``, so the catalogue keeps every
item that occurs. Joint training (the product's stepper: 256-window mini-batches, Adam, and
``train.item_updates=auto``: row-wise from 50K items) and TP (the configs' defaults but
``tp.lanes``) run the real steps with ``train.loss=sampled_softmax``,
``train.negatives=popularity`` and 128 negatives, per window and shared by the batch
(``train.shared_negatives``). Every case of every catalogue is timed in one rotation of
turns (``throughput.rates``), so all see the same load and every ratio is this run's.
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
    log, out = work / f"log-{items}-{events}", work / f"data-{items}-{events}"
    if not out.exists():
        cmd = [*DIST_TP, "synth", "--events", str(events), "--users", str(users)]
        subprocess.run([*cmd, "--items", str(items), "--output", str(log)], check=True)
        cmd = [*DIST_TP, "prepare", "--input", str(log), "--format", "parquet"]
        cmd += ["--columns", "user=user,item=item,timestamp=timestamp", "--output", str(out)]
        cmd += ["--min-item-count", "1", "--engine", "out-of-core"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return str(out)


def rss_gib() -> float:
    """This process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--events", type=int, default=3_000_000)
    ap.add_argument("--events-per-item", type=int, default=0, help="events >= this x items")
    ap.add_argument("--users", type=int, default=30_000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--lanes", type=int, default=4)
    ap.add_argument("--no-tp", dest="tp", action="store_false")
    ap.add_argument("--work", default=None)
    ap.add_argument(
        "--prepared",
        nargs="*",
        default=[],
        metavar="ITEMS=FOLDER",
        help="a folder already prepared for that --items value (e.g. the 100M-event log)",
    )
    ap.add_argument(
        "--negatives", default="per window,shared", help="comma list: per window, shared"
    )
    ap.add_argument(
        "--dense",
        action="store_true",
        help="also joint with train.item_updates=dense (shared negatives), from 100K items",
    )
    args = ap.parse_args()
    given = {int(float(k)): v for k, v in (p.split("=", 1) for p in args.prepared)}
    work = Path(args.work or tempfile.mkdtemp(prefix="dist_tp-catalogue-"))
    work.mkdir(parents=True, exist_ok=True)
    common = [
        "train.loss=sampled_softmax",
        "train.negatives=popularity",
        "train.num_negatives=128",
        "train.progress=false",
    ]
    negatives = {"per window": [], "shared": ["train.shared_negatives=true"]}
    negatives = {k: negatives[k] for k in args.negatives.split(",")}
    cpu = torch.device("cpu")
    cases, runs = [], []
    print(f"threads {torch.get_num_threads()}, {args.seconds:.0f} s per case", flush=True)
    for items in args.items:
        events = max(args.events, args.events_per_item * items)
        path = given.get(items) or make_data(work, items, events, args.users)
        prepared = open_prepared(path)
        catalogue, events = prepared.num_items, int(prepared.meta["stats"]["interactions"])
        for name, extra in negatives.items():
            joint = load_config(None, [f"data.path={path}", *common, *extra])
            runs.append(joint_steps(joint, cpu))
            cases.append((items, catalogue, events, name, "joint"))
            if args.tp:
                tp = load_config(
                    None,
                    [
                        f"data.path={path}",
                        *common,
                        *extra,
                        "train.method=tp",
                        f"tp.lanes={args.lanes}",
                    ],
                )
                runs.append(tp_steps(tp, cpu))
                cases.append((items, catalogue, events, name, "tp"))
        built = len(negatives) * (1 + args.tp)
        if args.dense and catalogue >= 100_000:
            dense = ["train.shared_negatives=true", "train.item_updates=dense"]
            runs.append(joint_steps(load_config(None, [f"data.path={path}", *common, *dense]), cpu))
            cases.append((items, catalogue, events, "shared, dense Adam", "joint"))
            built += 1
        for run in runs[-built:]:
            next(run)  # built and one step taken: its memory is held from here on
        print(f"items {catalogue:,} ({events:,} interactions): RSS {rss_gib():.2f} GiB", flush=True)
    found = rates(runs, args.seconds)
    rate = dict(zip(cases, found))
    print()
    print(
        "| synth items | catalogue | interactions | negatives | joint windows/s | vs first | "
        "TP windows/s | TP epoch / joint epoch |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    first = {}
    for items, catalogue, events, name, method in cases:
        if method != "joint":
            continue
        j = rate[(items, catalogue, events, name, "joint")]
        base = first.setdefault(name.split(",")[0], j)  # dense Adam: against the first shared
        t = rate.get((items, catalogue, events, name, "tp"))
        tp = "-" if t is None else f"{t:,.0f} | {j / t:.2f}"
        print(
            f"| {items:,} | {catalogue:,} | {events:,} | {name} | {j:,.0f} | "
            f"{j / base:.2f} | {tp} |"
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\npeak RSS of the process (all cases held at once): {peak:.2f} GiB")


if __name__ == "__main__":
    main()
