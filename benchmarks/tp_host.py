"""Where a TP outer step's host time goes, on the CPU: what a GPU waits for.

    .venv/bin/python benchmarks/tp_host.py --lanes 256 1024
    .venv/bin/python benchmarks/tp_host.py --prefetch --seconds 6   # also train.prefetch 0 vs 2

For ``configs/<data>/sasrec-tp.yaml`` at each lane count (one thread): the milliseconds of
drawing one outer step's lane batch (``TaskSampler.sample``, as the trainer calls it), of
planning the inner steps' lane buckets (``tp.buckets=cost``) and how many buckets, each a
vmapped call, an inner step has. Then the host cost of one vmapped call: an outer step of one
lane and one window at d = 4 (k = 2: two calls), where the arithmetic is next to nothing.
``--prefetch``: TP windows/s with lane batches drawn in the loop and ahead on a thread, beside
joint training, in one rotation of turns (``throughput.rates``).

The first table and the call cost use only what the trainer has had since before
``train.prefetch`` reached TP, so this script, copied into an earlier checkout, times that
code too (``PYTHONPATH=<checkout> python tp_host.py`` from its ``benchmarks/``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dist_tp.algorithms.tp.trainer import TPStepper
from dist_tp.config import load_config
from dist_tp.data.prepare import prepare
from dist_tp.data.stream import open_prepared
from dist_tp.models.saved import build

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import DATASETS, REPO, SHARED, case_config, joint_steps, rates, tp_steps  # noqa: E402


def tp_config(data: str, path: str, *overrides: str):
    config = REPO / "configs" / data / "sasrec-tp.yaml"
    return load_config(config, [f"data.path={path}", "train.progress=false", *overrides])


def draw(stepper: TPStepper, step: int):
    """One outer step's lane batch, drawn as the trainer draws it. Spelled out rather than
    ``stepper.sample_step``, which checkouts before ``train.prefetch`` reached TP lack, so
    the script still times them (the "before" figures in RESULTS)."""
    cfg, tp = stepper.cfg, stepper.cfg.tp
    rngs = [np.random.default_rng([cfg.train.seed, 0, step, m]) for m in range(tp.lanes)]
    return stepper.sampler.sample(
        rngs,
        k=tp.k,
        users_per_step=tp.users_per_step,
        inner_batch=tp.inner_batch,
        num_negatives=0,
        num_items=stepper.model.num_items,
        all_positions=stepper.model.supports_all_positions,
        user_power=tp.power,
        same_user=tp.same_user,
        distinct=tp.distinct_windows,
    )


def sampling_and_plans(data: str, path: str, lanes: int, repeats: int = 5) -> str:
    cfg = tp_config(data, path, f"tp.lanes={lanes}")
    stepper = TPStepper(build(cfg, open_prepared(path)), cfg)
    draw(stepper, 0)  # warm-up
    started = time.perf_counter()
    for step in range(repeats):
        batch = draw(stepper, step)
    sample_ms = (time.perf_counter() - started) / repeats * 1e3
    stepper.inner.bucketing = True  # tp.buckets=cost, whatever the device
    started = time.perf_counter()
    plans = stepper.inner._plans(batch)
    plan_ms = (time.perf_counter() - started) * 1e3
    buckets = "/".join(str(len(plan)) for plan in plans)
    return f"| {lanes} | {sample_ms:.1f} | {plan_ms:.1f} | {buckets} |"


def call_cost(data: str, path: str, steps: int = 20) -> float:
    """Milliseconds of one outer step of 1 lane × 1 window at d = 4 (two vmapped calls)."""
    cfg = tp_config(
        data, path, "tp.lanes=1", "tp.inner_batch=1", "model.dim=4", "tp.disc_hidden=[4]"
    )
    run = tp_steps(cfg, torch.device("cpu"))
    for _ in range(3):
        next(run)
    started = time.perf_counter()
    for _ in range(steps):
        next(run)
    return (time.perf_counter() - started) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="ml-1m", choices=sorted(DATASETS))
    ap.add_argument("--lanes", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--prefetch", action="store_true", help="also train.prefetch 0 against 2")
    ap.add_argument("--backbones", default="sasrec,gru4rec", help="for --prefetch")
    ap.add_argument("--seconds", type=float, default=6.0, help="for --prefetch")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        rel, form = DATASETS[args.data]
        path = f"{tmp}/{args.data}"
        prepare(input_path=str(SHARED / rel), fmt=form, output=path)
        print(f"{args.data}, sasrec-tp.yaml, one thread")
        print("| lanes | sampling ms | bucket plans ms | buckets per inner step |")
        print("| --- | --- | --- | --- |")
        for lanes in args.lanes:
            print(sampling_and_plans(args.data, path, lanes), flush=True)
        ms = call_cost(args.data, path)
        print(f"\none lane, one window, d = 4: {ms:.1f} ms per outer step of 2 vmapped calls")
        if not args.prefetch:
            return
        torch.set_num_threads(2)
        print("\n| backbone | joint windows/s | TP prefetch 0 | TP prefetch 2 |")
        print("| --- | --- | --- | --- |")
        for backbone in args.backbones.split(","):
            case = (backbone, args.data, path, "ce", "train.progress=false")
            runs = [joint_steps(case_config(*case), torch.device("cpu"))]
            for depth in (0, 2):
                cfg = case_config(*case, f"train.prefetch={depth}")
                runs.append(tp_steps(cfg, torch.device("cpu")))
            joint, drawn, ahead = rates(runs, args.seconds)
            print(
                f"| {backbone} | {joint:,.0f} | {drawn:,.0f} ({joint / drawn:.2f}x) "
                f"| {ahead:,.0f} ({joint / ahead:.2f}x) |",
                flush=True,
            )


if __name__ == "__main__":
    main()
