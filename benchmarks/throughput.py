"""Training throughput (windows/s) per backbone and loss, and full-ranking evaluation time.

    .venv/bin/python benchmarks/throughput.py [--seconds 20] [--threads 2] [--device cuda] [--bf16]
        [--compile]

Also times TP (configs' ``tp`` defaults: 16 lanes × k = 2 × K = 32 windows per outer step):
an epoch has as many windows either way, so TP epoch / joint epoch = joint rate / TP rate.
Joint and TP steps are timed in alternating turns of 0.5 s, so both see the same load.
``--padded`` also times TP with every lane padded to the step's largest shape in one vmapped
call (no lane buckets, the earlier inner loop), in the same run.

Uses the real training step (rows → mini-batches of 256 windows → forward, loss, backward,
Adam) on Amazon Music and the ML-1M part, prepared from ../shared/data into a temp folder.
RecBole 1.2.1's figures were measured on the same kind of 2-core machine (CE loss, d = 64,
L = 50, batch 256); it is not installed here, so the ratio uses those figures.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from dist_tp.config import load_config
from dist_tp.core.device import to_device
from dist_tp.data.prepare import prepare
from dist_tp.data.stream import open_prepared
from dist_tp.evaluation.evaluate import evaluate
from dist_tp.models.saved import build

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DIST_TP_SHARED_DATA", REPO.parent / "shared" / "data"))
DATASETS = {  # the shared copies of the raw files (../shared/data) and their formats
    "ml-100k": ("ml-100k/u.data.gz", "ml-100k"),
    "amazon-music": ("amazon-music/Music.txt.gz", "seq-txt"),
    "amazon-games": ("amazon-games/Video.txt.gz", "seq-txt"),
    "ml-1m": ("ml-1m/partial/ratings.dat.gz", "ml-1m"),
}
RECBOLE = {  # training windows/s, RecBole 1.2.1, 2 CPU cores, CE loss
    ("sasrec", "amazon-music"): 560,
    ("sasrec", "ml-1m"): 703,
    ("gru4rec", "amazon-music"): 1599,
    ("gru4rec", "ml-1m"): 1574,
    ("caser", "amazon-music"): 213,
}


COMPILE_WARMUP = 60  # untimed steps of --compile's run: the compiler runs again on new shapes


def joint_steps(cfg, device: torch.device):
    """The joint training step, endlessly: yields the windows of each mini-batch it trained.
    The product's own stepper (its loss, optimizer and ``train.item_updates`` choice), one
    process."""
    from dist_tp.algorithms.joint import JointStepper

    torch.manual_seed(0)
    model = build(cfg, open_prepared(cfg.data.path)).to(device)
    stepper = JointStepper(model, cfg)
    model.train()
    epoch = 0
    while True:  # mini-batches made train.prefetch ahead, pinned on a GPU, as in training
        for mb, _ in stepper.host_batches(stepper.positioned_batches(epoch)):
            weights = None if mb.weights is None else to_device(mb.weights, device)
            with stepper._autocast():  # the stepper's own bf16 choice
                loss = stepper.opt(
                    to_device(mb.inputs, device),
                    to_device(mb.targets, device),
                    generator=stepper.gen,
                    weights=weights,
                )
            stepper.opt.update(loss)
            yield mb.windows
        epoch += 1


def tp_steps(cfg, device: torch.device, bucketing: bool = True):
    """TP outer steps (lanes × k × users × K windows each), endlessly: yields their windows."""
    from dist_tp.algorithms.tp.trainer import TPStepper

    torch.manual_seed(0)
    model = build(cfg, open_prepared(cfg.data.path)).to(device)
    stepper = TPStepper(model, cfg)
    stepper.inner.bucketing = bucketing and stepper.inner.bucketing
    epoch = 0
    while True:  # lane batches drawn ahead on a thread (train.prefetch), as in training
        for step, batch in enumerate(stepper.lane_batches(epoch)):
            stepper.outer_step(epoch, step, batch)
            yield stepper.windows_per_step
        epoch += 1


def case_config(backbone: str, data: str, path: str, loss: str, *extra: str):
    """``configs/<data>/<backbone>.yaml`` on the prepared ``path`` with ``loss``, and ``extra``."""
    return load_config(
        REPO / "configs" / data / f"{backbone}.yaml",
        [f"data.path={path}", f"train.loss={loss}", *extra],
    )


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a GPU runs behind the Python that feeds it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rates(runs: list, seconds: float, turn: float = 0.5, device=None) -> list[float]:
    """Windows/s of each run of steps, timed in turns of about ``turn`` seconds taken in
    rotation until each has run ``seconds``, after 3 untimed warm-up steps each: on a busy
    machine every run sees about the same load, so their ratios hold."""
    device = device or torch.device("cpu")
    for run in runs:
        for _ in range(3):
            next(run)
    windows, spent = [0] * len(runs), [0.0] * len(runs)
    while min(spent) < seconds:
        for i, run in enumerate(runs):
            sync(device)
            started = time.perf_counter()
            while time.perf_counter() - started < turn:
                windows[i] += next(run)
            sync(device)
            spent[i] += time.perf_counter() - started
    return [w / t for w, t in zip(windows, spent)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per case")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backbones", default="sasrec,gru4rec,caser")
    parser.add_argument("--no-tp", dest="tp", action="store_false", help="skip the TP figures")
    parser.add_argument(
        "--padded", action="store_true", help="also time TP without lane buckets (same run)"
    )
    parser.add_argument("--datasets", default="amazon-music,ml-1m", help=", ".join(DATASETS))
    parser.add_argument("--losses", default="ce,bce")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--bf16", action="store_true", help="also joint training under bf16 autocast (a GPU's)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also joint training with train.compile=default (compiled in the warm-up steps)",
    )
    args = parser.parse_args()
    unknown = sorted(set(args.datasets.split(",")) - set(DATASETS))
    if unknown:
        parser.error(f"--datasets: unknown {', '.join(unknown)} (known: {', '.join(DATASETS)})")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        datasets = args.datasets.split(",")
        for name in sorted(set(datasets) | {"ml-1m"}):
            rel, fmt = DATASETS[name]
            paths[name] = f"{tmp}/{name}"
            prepare(input_path=str(SHARED / rel), fmt=fmt, output=paths[name])
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {where}")
        padded = " | TP padded windows/s | TP padded epoch / joint epoch" if args.padded else ""
        padded += " | joint bf16 windows/s | bf16 / fp32" if args.bf16 else ""
        padded += " | joint compiled windows/s | compiled / eager" if args.compile else ""
        print(
            "| backbone | data | loss | joint windows/s | RecBole (CE) | ratio to RecBole "
            f"| TP windows/s | TP epoch / joint epoch{padded} |"
        )
        print("| --- " * (8 + 2 * args.padded + 2 * args.bf16 + 2 * args.compile) + "|")
        for backbone in args.backbones.split(","):
            for data in datasets:
                for loss in args.losses.split(","):
                    case = (backbone, data, paths[data], loss)
                    cfg = case_config(*case, "train.progress=false")
                    runs = [joint_steps(cfg, device)]
                    if args.tp:
                        runs.append(tp_steps(cfg, device))
                    if args.tp and args.padded:
                        runs.append(tp_steps(cfg, device, bucketing=False))
                    if args.bf16:
                        runs.append(joint_steps(case_config(*case, "train.precision=bf16"), device))
                    if args.compile:
                        runs.append(
                            joint_steps(case_config(*case, "train.compile=default"), device)
                        )
                        for _ in range(COMPILE_WARMUP):  # past the compiler and its recompiles
                            next(runs[-1])
                    timed = rates(runs, args.seconds, device=device)
                    compiled_rate = timed.pop() if args.compile else float("nan")
                    half_rate = timed.pop() if args.bf16 else float("nan")
                    rate, tp, slow = [*timed, float("nan"), float("nan")][:3]
                    ref = RECBOLE.get((backbone, data)) if loss == "ce" else None
                    ratio = f"{rate / ref:.1f}x" if ref else "-"
                    extra = f" | {slow:,.0f} | {rate / slow:.2f}" if args.padded else ""
                    extra += f" | {half_rate:,.0f} | {half_rate / rate:.2f}" if args.bf16 else ""
                    if args.compile:
                        extra += f" | {compiled_rate:,.0f} | {compiled_rate / rate:.2f}"
                    print(
                        f"| {backbone} | {data} | {loss} | {rate:,.0f} | {ref or '-'} | {ratio} "
                        f"| {tp:,.0f} | {rate / tp:.2f}{extra} |",
                        flush=True,
                    )
        cfg = load_config(
            REPO / "configs" / "ml-1m" / "sasrec.yaml", [f"data.path={paths['ml-1m']}"]
        )
        model = build(cfg, open_prepared(cfg.data.path)).to(device)
        evaluate(model, cfg.data.path, max_len=50, ks=[10], splits=("test",))  # warm-up
        t0 = time.perf_counter()
        res = evaluate(model, cfg.data.path, max_len=50, ks=[1, 5, 10, 20, 50], splits=("test",))
        seconds = time.perf_counter() - t0  # evaluate() returns figures read back from the device
        users = res["test"]["existing"]["all"]["users"] + res["test"]["new"]["all"]["users"]
        print(
            f"\nfull-ranking evaluation (test split), SASRec, ML-1M part: {users:,} users "
            f"x 3,266 items in {seconds:.3f}s"
        )


if __name__ == "__main__":
    main()
