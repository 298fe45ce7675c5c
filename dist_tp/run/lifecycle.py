"""A training run's lifecycle around the loop: join the process group (torchrun) or not,
decide whether to resume, open the tracker, turn SIGTERM into a clean stop, and leave: close
the process group after success, abort it after a failure, mark the tracked run FINISHED,
KILLED or FAILED.

``dist-tp train`` is ``run(config, out)`` and its exit code; so is any other driver.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from dist_tp.config import Config, ConfigError
from dist_tp.parallel import closed, init_distributed, leave
from dist_tp.run.checkpoints import RunCheckpoints
from dist_tp.run.folder_lock import run_folder_held
from dist_tp.run.loop import run_training
from dist_tp.tracking import make_tracker

log = logging.getLogger(__name__)


class Terminated(BaseException):
    """SIGTERM arrived: a scheduler's preemption, a sweep or torchrun stopping the worker."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated(signum)


@dataclass
class Outcome:
    """How a run ended: its exit code, and on success its metrics (on every rank) and, on
    rank 0, where it was tracked."""

    code: int
    out: Path
    is_main: bool
    metrics: dict | None = None
    tracking: str | None = None  # "MLflow run ... at URI; browse it with ..."


def run(cfg: Config, out: str | Path, *, resume: bool = False, overwrite: bool = False) -> Outcome:
    """Train ``cfg`` into run folder ``out`` (``--resume``: continue from its ``last.pt``;
    ``--overwrite``: replace the run the folder holds).

    Under torchrun every rank calls this; rank 0 logs and writes. A restarted worker
    (``torchrun --max-restarts``) resumes by itself. SIGTERM and Ctrl-C stop the run with
    its files whole (atomic writes) and the tracked run marked KILLED; SIGTERM returns 143.
    Other failures propagate after the tracked run is marked FAILED."""
    if not cfg.data.path:
        raise ConfigError("data.path is not set: pass data.path=DIR (a 'dist-tp prepare' output)")
    out = Path(out)
    comm = init_distributed(timeout_s=cfg.train.dist_timeout)
    if not comm.is_main:  # one voice: rank 0 logs, the others only warn
        logging.getLogger("dist_tp").setLevel(logging.WARNING)
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    resume = resume or restarted
    # rank 0 writes the folder: no other training may write it meanwhile
    with run_folder_held(out) if comm.is_main else contextlib.nullcontext():
        return _run_held(cfg, out, comm, resume=resume, overwrite=overwrite)


def _run_held(cfg: Config, out: Path, comm, *, resume: bool, overwrite: bool) -> Outcome:
    # before the tracker touches the folder's spool: is this the run to continue or start?
    RunCheckpoints(out, cfg, comm).check_start(resume=resume, overwrite=overwrite)
    tracker = make_tracker(cfg, out, is_main=comm.is_main, fresh=not resume)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        metrics = run_training(cfg, out, resume=resume, comm=comm, tracker=tracker)
    except BaseException as exc:
        stopped = isinstance(exc, (KeyboardInterrupt, Terminated))
        tracker.finish("KILLED" if stopped else "FAILED")
        comm.abort()
        if isinstance(exc, Terminated):
            print(f"terminated; resume with --resume --output {out}", file=sys.stderr)
            return Outcome(128 + signal.SIGTERM, out, comm.is_main)
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    comm.close()
    tracking = None
    if tracker.run_id:
        tracking = (
            f"MLflow run {tracker.run_id} in experiment {cfg.track.experiment!r} at "
            f"{tracker.uri}; browse it with: mlflow ui --backend-store-uri {tracker.uri}"
        )
    return Outcome(0, out, comm.is_main, metrics, tracking)


def exit_process(code: int) -> int:
    """``code``, or, in a torchrun worker whose process group has closed, no return at all:
    the process ends at once (see :func:`dist_tp.parallel.distributed.leave`)."""
    if closed():
        leave(code)
    return code
