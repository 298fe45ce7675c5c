"""How much of the device a training step uses: windows/s of joint training and TP for each
backbone at the configs' settings ("old") and at large ones ("large"), with the share of the
step's wall time spent in device kernels, the GPU's utilisation and its peak memory.

    bash benchmarks/gpu.sh                  # one GPU, stops at LIMIT (470 s), a row per case
    .venv/bin/python benchmarks/gpu_step.py --device cpu --seconds 1 --backbones sasrec \\
        --datasets ml-1m --batch 2048 --lanes 32     # a dry run of the same code on the CPU

Settings, for the backbone's ``configs/ml-1m/<backbone>[-tp].yaml``:
- old: joint mini-batches of ``train.batch_size`` (256) made in the loop (``train.prefetch=0``);
  TP at the config's lanes × k × K (256 windows per outer step), lanes in cost-planned buckets
  (``tp.buckets=cost``).
- large: joint mini-batches of ``--batch`` windows, ``--row-stride`` windows to a row past a
  user's first L (``train.row_stride``), made ``train.prefetch`` ahead on a thread into
  pinned memory; TP at ``--lanes`` lanes × k × ``--inner-batch`` windows, in one call per inner
  step (``tp.buckets=auto``).
- compiled (``--compile sasrec,...``, the backbones to compile): joint as large, with
  ``train.compile=default``; its first ``--compile-warmup`` steps are untimed (the compiler
  runs again as new shapes come: one SASRec epoch on Music on the CPU recompiled once, when a
  mini-batch first passed 4,096 cells).

Rows are printed as they are measured, so a run stopped at its limit keeps what it reached.

Data: the ML-1M part (full-softmax ``ce``), and a generated log of ``--items`` items (``dist-tp
synth``, prepared out of core) with sampled softmax: 128 popularity negatives shared by the
batch, row-wise Adam on the item table (``train.item_updates=auto``). The cases of one data set
are timed in one rotation of turns (``throughput.rates``), so each "vs old" is this run's.

Kernel share: a profiled stretch of ``--profile-steps`` steps (torch profiler, CPU and CUDA);
the sum of the device kernels' own times over that stretch's wall time. GPU utilisation:
``nvidia-smi``'s ``utilization.gpu`` sampled every 100 ms over an unprofiled stretch of
``--util-seconds``. Both are blank on the CPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dist_tp.config import load_config
from dist_tp.data.prepare import prepare

sys.path.insert(0, str(Path(__file__).resolve().parent))
from catalogue import make_data  # noqa: E402  (the generated log, prepared out of core)
from throughput import DATASETS, REPO, SHARED, joint_steps, rates, sync, tp_steps  # noqa: E402

SAMPLED = [
    "train.loss=sampled_softmax",
    "train.negatives=popularity",
    "train.num_negatives=128",
    "train.shared_negatives=true",
]


def case_config(backbone: str, method: str, setting: str, path: str, sampled: bool, args):
    """The config of one case: the backbone's ML-1M config on ``path``, at ``setting``."""
    name = f"{backbone}-tp" if method == "tp" else backbone
    overrides = [f"data.path={path}", "train.progress=false", f"train.device={args.device}"]
    if sampled:
        overrides += SAMPLED
    if setting == "old":
        overrides += ["train.prefetch=0"] + (["tp.buckets=cost"] if method == "tp" else [])
    elif method == "joint":
        overrides += [f"train.batch_size={args.batch}", f"train.row_stride={args.row_stride}"]
        if setting == "compiled":
            overrides += ["train.compile=default"]
    else:
        overrides += [f"tp.lanes={args.lanes}", f"tp.inner_batch={args.inner_batch}"]
    return load_config(REPO / "configs" / "ml-1m" / f"{name}.yaml", overrides)


def kernel_share(run, steps: int, device: torch.device) -> float | None:
    """Device kernels' own time over the wall time of ``steps`` profiled steps."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            next(run)
        sync(device)
        wall = time.perf_counter() - started
    kernels = 0.0
    for event in prof.key_averages():
        if str(event.device_type).endswith("CUDA"):
            kernels += getattr(event, "self_device_time_total", None) or getattr(
                event, "self_cuda_time_total", 0.0
            )
    return kernels / 1e6 / wall


def gpu_utilisation(run, seconds: float, device: torch.device) -> float | None:
    """Mean ``utilization.gpu`` (%) while ``run`` steps for ``seconds``."""
    smi = shutil.which("nvidia-smi")
    if device.type != "cuda" or smi is None:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    query = [smi, f"--id={index}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
    sampler = subprocess.Popen(
        [*query, "-lms", "100"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        next(run)
    sync(device)
    sampler.terminate()
    out, _ = sampler.communicate()
    samples = [float(x) for x in out.split() if x.replace(".", "", 1).isdigit()]
    return sum(samples[1:]) / max(len(samples) - 1, 1) if samples else None


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backbones", default="sasrec,gru4rec,caser")
    ap.add_argument("--datasets", default="ml-1m,synth", help="ml-1m and/or synth")
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per case")
    ap.add_argument("--batch", type=int, default=16384, help="large: joint windows per step")
    ap.add_argument("--row-stride", type=int, default=25, help="large: joint train.row_stride")
    ap.add_argument("--lanes", type=int, default=256, help="large: TP lanes")
    ap.add_argument("--inner-batch", type=int, default=8, help="large: TP windows per lane step")
    ap.add_argument("--items", type=int, default=1_000_000, help="the generated log's items")
    ap.add_argument("--events", type=int, default=5_000_000)
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--util-seconds", type=float, default=1.5)
    ap.add_argument("--no-tp", dest="tp", action="store_false")
    ap.add_argument(
        "--compile-warmup", type=int, default=30, help="untimed steps of a compiled case"
    )
    ap.add_argument(
        "--compile",
        default="",
        help="backbones also timed joint at large batches with train.compile (e.g. sasrec)",
    )
    ap.add_argument("--work", default=None, help="where to keep the prepared data")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = Path(args.work or tempfile.mkdtemp(prefix="dist_tp-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {where}, {args.seconds:g} s per case", flush=True)
    methods = ["joint", "tp"] if args.tp else ["joint"]
    compiled = [b for b in args.compile.split(",") if b]
    print(
        "\n| data | backbone | method | setting | windows per step | windows/s | vs old "
        "| kernel share | GPU util % | peak GiB |"
    )
    print("| --- " * 10 + "|", flush=True)
    for data in args.datasets.split(","):
        started = time.perf_counter()
        if data == "synth":
            path, sampled = make_data(work, args.items, args.events, args.users), True
        else:
            rel, form = DATASETS[data]
            path, sampled = str(work / data), False
            if not Path(path).exists():
                prepare(input_path=str(SHARED / rel), fmt=form, output=path)
        print(f"{data}: prepared in {time.perf_counter() - started:.0f} s", flush=True)
        cases, runs = [], []
        for backbone in args.backbones.split(","):
            for method in methods:
                settings = ["old", "large"]
                if method == "joint" and backbone in compiled:
                    settings.append("compiled")
                for setting in settings:
                    cfg = case_config(backbone, method, setting, path, sampled, args)
                    step = joint_steps if method == "joint" else tp_steps
                    cases.append((data, backbone, method, setting, cfg.step_windows()))
                    runs.append(step(cfg, device))
        for case, run in zip(cases, runs):
            if case[3] == "compiled":  # recompiles as new shapes come: past them first
                for _ in range(args.compile_warmup):
                    next(run)
        found = rates(runs, args.seconds, device=device)
        old = {case[1:3]: rate for case, rate in zip(cases, found) if case[3] == "old"}
        for case, run, rate in zip(cases, runs, found):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            share = kernel_share(run, args.profile_steps, device)
            util = gpu_utilisation(run, args.util_seconds, device)
            data, backbone, method, setting, per_step = case
            print(  # row by row: a run stopped at its limit keeps the rows it reached
                f"| {data} | {backbone} | {method} | {setting} | {per_step:,} | {rate:,.0f} "
                f"| {rate / old[(backbone, method)]:.2f}x | {fmt(share, '.0%')} "
                f"| {fmt(util, '.0f')} | {fmt(peak_gib(device), '.2f')} |",
                flush=True,
            )
        del runs
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
