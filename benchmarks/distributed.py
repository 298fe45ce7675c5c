"""Bytes on the wire per training window, and time per TP outer step split into compute and
communication, for W = 1 and 2 processes on CPU (gloo).

    .venv/bin/python benchmarks/distributed.py [--steps 30] [--lanes 4]

TP all-reduces the flattened pseudo-gradient once per outer step, i.e. once per
M·k·K windows per rank. Data-parallel joint training (DDP) all-reduces the full gradient once
per mini-batch of B windows per rank. Both move one model-sized buffer per exchange, so
TP / DDP bytes per window = B / (M·k·K); with B = K (DDP stepping on the same per-rank
mini-batch as one inner step) that is 1 / (k·M). The DDP figure is computed from the parameter count
(joint training under DDP, ``dist_tp.algorithms.joint``, all-reduces every gradient once per
step, plus one 8-byte window count); the TP figure is what the ranks actually sent.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, sys, time
sys.path.insert(0, {repo!r})
import torch
from dist_tp.config import load_config
from dist_tp.data.stream import open_prepared
from dist_tp.parallel.distributed import init_distributed, leave
from dist_tp.models import build_model
from dist_tp.algorithms.tp.trainer import TPStepper

class TimedComm:  # what the stepper is given: the real communicator, its all-reduces timed
    def __init__(self, comm):
        self.comm, self.seconds = comm, 0.0
    def __getattr__(self, name):
        return getattr(self.comm, name)
    def all_reduce_mean(self, tensor):
        t0 = time.perf_counter()
        out = self.comm.all_reduce_mean(tensor)
        self.seconds += time.perf_counter() - t0
        return out

path, steps, lanes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
comm = TimedComm(init_distributed())
cfg = load_config("configs/ml-100k/sasrec-tp-paper.yaml",
                  [f"data.path={{path}}", f"tp.lanes={{lanes}}", "train.progress=false"])
model = build_model(cfg.model, open_prepared(path).num_items)
stepper = TPStepper(model, cfg, comm=comm)
stepper.outer_step(0, 0)
comm.seconds = 0.0
sent0 = stepper.outer.bytes_sent
t0 = time.perf_counter()
for step in range(1, steps + 1):
    stepper.outer_step(0, step)
total = time.perf_counter() - t0
params = sum(p.numel() for p in stepper.params)
if comm.rank == 0:
    print(json.dumps({{"total": total / steps, "comm": comm.seconds / steps,
        "bytes": (stepper.outer.bytes_sent - sent0) / steps, "params": params,
        "windows": stepper.windows_per_step}}), flush=True)
comm.close()
leave(0)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, path: str, steps: int, lanes: int) -> dict:
    code = WORKER.format(repo=str(REPO))
    script = Path(tempfile.mkdtemp()) / "worker.py"
    script.write_text(code)
    cmd = [sys.executable, str(script), path, str(steps), str(lanes)]
    if world > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={world}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{free_port()}",
            str(script),
            path,
            str(steps),
            str(lanes),
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return json.loads([line for line in res.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    from dist_tp.data.prepare import prepare

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lanes", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32, help="DDP windows per rank and step (= K)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/ml-100k"
        src = REPO.parent / "shared" / "data" / "ml-100k" / "u.data.gz"
        prepare(input_path=str(src), fmt="ml-100k", output=path)
        print(f"SASRec-TP on ML-100K, k = 2, K = 32, {args.lanes} lanes per rank, 1 thread each")
        print(
            "| W | s / outer step | of which all-reduce | TP bytes / window | "
            "DDP bytes / window | TP / DDP |"
        )
        print("| --- | --- | --- | --- | --- | --- |")
        for world in (1, 2):
            r = run(world, path, args.steps, args.lanes)
            ddp = r["params"] * 4 / args.batch
            tp = r["bytes"] / r["windows"] if world > 1 else 0.0
            ratio = f"{tp / ddp:.4f}" if world > 1 else "-"
            print(
                f"| {world} | {r['total']:.3f} | {r['comm']:.4f} | {tp:,.0f} | {ddp:,.0f} | "
                f"{ratio} |",
                flush=True,
            )
        print(
            f"\nBound: B / (M·k·K) = {args.batch} / ({args.lanes}·2·32) = "
            f"{args.batch / (args.lanes * 64):.4f}"
        )


if __name__ == "__main__":
    main()
