"""Kill -9 one rank mid-epoch on a large prepared log, let torchrun restart the ranks, and
check that the resumed run ends with the parameters of an uninterrupted one.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kill_resume.py configs/synthetic/sasrec.yaml \\
        data.path=/path/to/data/synth-100m train.epochs=1 train.epoch_steps=300 \\
        train.checkpoint_every=100 eval.max_users=2000 --kill-at 150

Runs the config twice under ``torchrun --nproc-per-node 2`` (gloo on the CPU): once straight
through, once with ``--max-restarts=1`` and a SIGKILL of one worker as soon as a mid-epoch
``last.pt`` at step ``--kill-at`` or later is on disk. Prints both runs' seconds, the step the
kill came after, and the largest difference between the two runs' final parameters (model and,
for TP, discriminator) and test metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(config: str, overrides: list[str], out: Path, restarts: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{_port()}",
        f"--max-restarts={restarts}",
        "-m",
        "dist_tp",
        "train",
        config,
        *overrides,
        "track.enabled=false",
        "--output",
        str(out),
    ]


def _last(path: Path) -> dict | None:
    try:
        return torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError):
        return None


def _run(cmd: list[str], log: Path) -> float:
    started = time.perf_counter()
    with open(log, "wb") as f:
        subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - started


def _killed_run(cmd: list[str], out: Path, log: Path, kill_at: int) -> tuple[float, int]:
    started = time.perf_counter()
    with open(log, "wb") as f:
        agent = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        killed_after = -1
        try:
            while agent.poll() is None and killed_after < 0:
                state = _last(out / "last.pt")
                if state is not None and not state["epoch_done"] and state["next_step"] >= kill_at:
                    workers = subprocess.run(
                        ["pgrep", "-P", str(agent.pid)], capture_output=True, text=True
                    ).stdout.split()
                    os.kill(int(workers[-1]), signal.SIGKILL)
                    killed_after = int(state["next_step"])
                time.sleep(0.1)
            agent.wait()
        finally:
            if agent.poll() is None:
                agent.kill()
    if agent.returncode != 0:
        raise SystemExit(f"the killed run failed: see {log}")
    if killed_after < 0:
        raise SystemExit(f"the run ended before step {kill_at}: raise train.epoch_steps")
    return time.perf_counter() - started, killed_after


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="key=value")
    ap.add_argument("--kill-at", type=int, required=True, help="kill after this step's last.pt")
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="dist_tp-kill-"))
    work.mkdir(parents=True, exist_ok=True)
    plain, killed = work / "plain", work / "killed"
    seconds = _run(_command(args.config, args.overrides, plain, 0), work / "plain.log")
    print(f"uninterrupted run: {seconds:.0f} s ({plain})", flush=True)
    seconds, step = _killed_run(
        _command(args.config, args.overrides, killed, 1), killed, work / "killed.log", args.kill_at
    )
    resumed = b"resumed from" in (work / "killed.log").read_bytes()
    print(f"killed run: one rank SIGKILLed after step {step}, resumed: {resumed}, {seconds:.0f} s")
    a, b = _last(plain / "last.pt"), _last(killed / "last.pt")
    worst = 0.0
    for part in ("model", "disc"):
        for name, value in a.get(part, {}).items():
            worst = max(worst, float((b[part][name] - value).abs().max()))
    print(f"largest parameter difference: {worst:.3g}")
    ma = json.loads((plain / "metrics.json").read_text())
    mb = json.loads((killed / "metrics.json").read_text())
    for group in ("existing", "new"):
        hr_a, hr_b = ma[group]["all"]["HR@10"], mb[group]["all"]["HR@10"]
        print(f"{group} HR@10: uninterrupted {hr_a:.4f}, resumed {hr_b:.4f}")


if __name__ == "__main__":
    main()
