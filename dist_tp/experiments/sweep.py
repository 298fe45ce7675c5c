"""``dist-tp sweep``: a grid of training runs × seeds into one MLflow experiment.

Each run is a ``dist-tp train`` subprocess writing ``OUT/<name>``. A run whose folder has
``metrics.json`` is finished and skipped (its spool is replayed if MLflow missed part of it);
a run with a ``last.pt`` but no metrics was interrupted and continues with ``--resume``. So
re-running an interrupted sweep finishes it without repeating work. A folder that holds a run
with other settings is never reused: that run fails, naming the settings that differ.

``--extra-eval "TAG eval.key=value ..."`` also evaluates every finished run's best checkpoint
with those settings into ``metrics_<TAG>.json`` (and its MLflow run), once. SIGTERM (a
deadline) stops the running trainings, which can be resumed, or finished from their best
checkpoints with ``dist-tp finish``.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

from dist_tp.config import ConfigError, flatten, load_config, to_dict
from dist_tp.experiments.folders import (
    CONFIG,
    METRICS,
    STOPPED,
    ExtraEval,
    extra_evaluations,
    read_config,
)
from dist_tp.run.checkpoints import has_resume_point

log = logging.getLogger(__name__)


@dataclass
class SweepRun:
    name: str
    overrides: list[str]
    folder: Path


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``["tp.k=1,2,3", ...]`` → ``[("tp.k", ["1", "2", "3"]), ...]``."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r} is not of the form key=v1,v2,...")
        key, values = item.split("=", 1)
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not vals:
            raise ConfigError(f"--grid {key}: no values")
        out.append((key.strip(), vals))
    return out


def parse_seeds(seeds: int | str | list[int]) -> list[int]:
    """``3`` → seeds 0, 1, 2; ``"1,2"`` → 1 and 2; ``"3-5"`` → 3, 4, 5."""
    if isinstance(seeds, (list, tuple)):
        return [int(s) for s in seeds]
    text = str(seeds).strip()
    try:
        if "," in text:
            return [int(s) for s in text.split(",") if s.strip()]
        if "-" in text:
            first, last = text.split("-", 1)
            return list(range(int(first), int(last) + 1))
        return list(range(int(text)))
    except ValueError:
        raise ConfigError(
            f"--seeds {text!r}: give a count (3: seeds 0-2), a list (1,2) or a range (3-5)"
        ) from None


def plan(
    config: str,
    grid: list[str],
    seeds: int | str | list[int],
    *,
    out: str | Path,
    experiment: str,
    overrides: list[str] = (),
) -> list[SweepRun]:
    """Every (grid point, seed) as a run; each is type-checked now, before anything starts.
    ``{seed}`` in an override's value is the run's seed (a seed's own source run for
    ``train.init_from``, say)."""
    axes = parse_grid(grid)
    stem = Path(config).stem
    runs = []
    for combo in itertools.product(*[[(k, v) for v in vals] for k, vals in axes]):
        for seed in parse_seeds(seeds):
            point = [f"{k}={v}" for k, v in combo]
            name = "_".join([stem, *(f"{k.split('.')[-1]}={v}" for k, v in combo), f"seed{seed}"])
            run_overrides = [
                *(o.replace("{seed}", str(seed)) for o in overrides),
                *point,
                f"train.seed={seed}",
                f"track.experiment={experiment}",
                f"track.run_name={name}",
            ]
            load_config(config, run_overrides)  # fails here, naming the key, if any is wrong
            runs.append(SweepRun(name, run_overrides, Path(out) / name))
    return runs


def _command(config: str, run: SweepRun, threads: int | None, quiet: bool) -> list[str]:
    cmd = [sys.executable, "-m", "dist_tp", "train", config, *run.overrides]
    if threads and not any(o.startswith("train.threads=") for o in run.overrides):
        cmd.append(f"train.threads={threads}")
    if quiet:
        cmd.append("train.progress=false")
    cmd += ["--output", str(run.folder)]
    if has_resume_point(run.folder):
        cmd.append("--resume")
    return cmd


# settings that do not change what a run computes: a folder may be resumed with other values
_FREE = {"train.threads", "train.progress", "train.device", "train.checkpoint_every",
         "tp.check_replicas_every", "eval.batch_size"}  # fmt: skip


def other_settings(config: str, run: SweepRun) -> list[str]:
    """What the run already in ``run.folder`` was trained with that this run would not be
    (``key=there, value here``), besides tracking and speed settings and keys only one of the
    two versions of the config knows; empty for a fresh folder."""
    if not (run.folder / CONFIG).is_file():
        return []
    planned = yaml.safe_dump(to_dict(load_config(config, run.overrides)))
    want = {k: str(v)[:6000] for k, v in flatten(yaml.safe_load(planned)).items()}
    have = read_config(run.folder)
    keys = sorted((set(want) & set(have)) - _FREE)
    return [
        f"{k}={have[k]} there, {want[k]} here"
        for k in keys
        if not k.startswith("track.") and want[k] != have[k]
    ]


def _prepare_tracking(config: str, run: SweepRun) -> None:
    """Create the MLflow store and experiment before the runs start: parallel runs on a fresh
    sqlite store would otherwise race to create its tables. A store that does not answer is
    left to each run, which spools its events."""
    from dist_tp.tracking import prepare_store, resolve_uri

    track = load_config(config, run.overrides).track
    if not track.enabled:
        return
    uri = resolve_uri(track.uri)
    try:
        prepare_store(uri, track.experiment)
    except Exception as exc:  # noqa: BLE001 - tracking must not stop the sweep
        log.warning("MLflow at %s not prepared (%s); each run spools its events", uri, exc)


def gpu_sharing_hint(config: str, run: SweepRun, parallel: int) -> str | None:
    """Advice when ``parallel`` runs would share a GPU without MPS. Without it they take turns
    on the GPU (17 ML-1M runs on one H200: ~90 s per SASRec epoch each); with it their kernels
    run at once (14 runs: ~15 s, against 12 s alone)."""
    import torch

    from dist_tp.core.device import mps_running

    if parallel < 2 or mps_running():
        return None
    if load_config(config, run.overrides).train.device == "cpu" or not torch.cuda.is_available():
        return None
    return (
        f"{parallel} runs will share the GPU by taking turns; start NVIDIA's MPS daemon "
        "(nvidia-cuda-mps-control -d) before the sweep so that their kernels run at once"
    )


def execute(
    config: str, runs: list[SweepRun], parallel: int = 1, extras: list[ExtraEval] = ()
) -> dict[str, str]:
    """Run what is not finished, ``parallel`` at a time, then the extra evaluations the
    finished runs lack: run name → finished/skipped/failed/stopped."""
    from dist_tp.tracking import Spool, sync

    status: dict[str, str] = {}
    todo = []
    for run in runs:
        differ = other_settings(config, run)
        if differ:
            status[run.name] = (
                f"failed ({run.folder} holds a run with other settings: {'; '.join(differ[:3])}"
                f"{' ...' if len(differ) > 3 else ''}; use another --out)"
            )
        elif (run.folder / METRICS).is_file():
            stopped = (run.folder / STOPPED).is_file()
            status[run.name] = "skipped (finished" + (", stopped from outside)" if stopped else ")")
            spool = Spool(run.folder)
            if spool.exists() and len(spool.events()) > spool.state().get("delivered", 0):
                try:
                    sent, _, uri = sync(run.folder)
                    log.info("%s: replayed %d spooled events into %s", run.name, sent, uri)
                except Exception as exc:  # noqa: BLE001 - tracking must not stop the sweep
                    log.warning("%s: spool not replayed: %s", run.name, exc)
        else:
            todo.append(run)
    if todo:
        _prepare_tracking(config, todo[0])
        hint = gpu_sharing_hint(config, todo[0], parallel)
        if hint:
            log.warning(hint)
    threads = max(1, (os.cpu_count() or 1) // parallel) if parallel > 1 else None
    children: set[subprocess.Popen] = set()
    lock, stop = threading.Lock(), threading.Event()

    def one(run: SweepRun) -> tuple[str, str]:
        with lock:
            if stop.is_set():
                return run.name, "not started (the sweep was stopped)"
            run.folder.mkdir(parents=True, exist_ok=True)
            cmd = _command(config, run, threads, quiet=parallel > 1)
            log.info("start %s", run.name)
            logf = open(run.folder / "train.log", "a") if parallel > 1 else None
            child = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT if logf else None)
            children.add(child)
        rc = child.wait()
        with lock:
            children.discard(child)
        if logf is not None:
            logf.close()
        if rc == 0:
            result = "finished"
        elif stop.is_set():
            result = f"stopped (exit {rc}; resume it by running the sweep again)"
        else:
            result = f"failed (exit {rc})"
        log.info("%s: %s", run.name, result)
        return run.name, result

    def terminate(signum, frame) -> None:  # a deadline: stop the trainings, keep their files
        stop.set()
        with lock:
            for child in children:
                child.terminate()

    handle = todo and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminate) if handle else None
    try:
        with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
            for name, result in pool.map(one, todo):
                status[name] = result
    finally:
        if handle:
            signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)
    if extras and not stop.is_set():
        for run in runs:
            if (run.folder / METRICS).is_file() and not status[run.name].startswith("failed"):
                try:
                    written = extra_evaluations(run.folder, list(extras))
                except ConfigError as exc:
                    status[run.name] += f"; extra evaluation failed: {exc}"
                    continue
                if written:
                    status[run.name] += f"; wrote {', '.join(written)}"
    return status
