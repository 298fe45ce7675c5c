"""Run folders as runs: found under roots, read into the same :class:`RunRecord` values as
MLflow's runs (so every table is made one way from either), and finished when they were
stopped from outside.

A run folder is what ``dist-tp train --output`` writes (``config.yaml`` first). Its state:

- *finished*: ``metrics.json`` is there (``STOPPED`` beside it: finished by :func:`finish`
  from its best checkpoint after a kill or a deadline);
- *interrupted*: ``last.pt`` but no metrics: ``dist-tp sweep`` resumes it;
- *stoppable*: ``checkpoint.pt`` (the best validation checkpoint) but no metrics:
  :func:`finish` evaluates that checkpoint instead of training on.

An extra evaluation of a finished run with other ``eval.*`` settings is the file
``metrics_<tag>.json`` (``nohist``: ``eval.exclude_history=false``); its figures appear in the
tables as the split ``<tag>`` (``nohist/existing/all/HR@10``) and in MLflow under that name.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from dist_tp.config import ConfigError, flatten
from dist_tp.core.files import write_text
from dist_tp.experiments.report import RunRecord
from dist_tp.run.folder_lock import run_folder_held
from dist_tp.tracking import (
    dataset_name,
    extra_metrics_to_flat,
    final_metrics_to_flat,
    finish_run,
    reopen,
)

log = logging.getLogger(__name__)

CONFIG, METRICS, STOPPED = "config.yaml", "metrics.json", "STOPPED"
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


@dataclass(frozen=True)
class ExtraEval:
    """An extra evaluation of every finished run: ``metrics_<tag>.json`` with ``overrides``."""

    tag: str
    overrides: tuple[str, ...]

    @property
    def file(self) -> str:
        return f"metrics_{self.tag}.json"


def parse_extra_eval(text: str) -> ExtraEval:
    """``"nohist eval.exclude_history=false"`` → tag ``nohist`` with its ``eval.*`` overrides."""
    tag, *overrides = text.split()
    if not _TAG.fullmatch(tag) or not overrides:
        raise ConfigError(
            f"--extra-eval {text!r}: give a name (letters, digits, - and _) and eval.* "
            "overrides, e.g. 'nohist eval.exclude_history=false'"
        )
    bad = [o for o in overrides if not o.startswith("eval.") or "=" not in o]
    if bad:
        raise ConfigError(f"--extra-eval {text!r}: {bad[0]!r} is not an eval.key=value override")
    return ExtraEval(tag, tuple(overrides))


def run_folders(paths: list[str | Path], *, finished: bool = False) -> list[Path]:
    """Each path that is a run folder, else the run folders anywhere under it (sorted), in
    the order given, each once; ``finished``: only those with ``metrics.json``."""
    out: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise ConfigError(f"{path}: no such folder")
        if (path / CONFIG).is_file() or (path / METRICS).is_file():
            found = [path]
        else:
            found = sorted(p.parent for p in path.rglob(CONFIG))
        found = [f for f in found if not finished or (f / METRICS).is_file()]
        if not found:
            what = "finished run folder (metrics.json)" if finished else "run folder"
            raise ConfigError(f"{path}: no {what} here or below")
        out += [f for f in found if f not in out]
    return out


def read_config(folder: Path) -> dict[str, str]:
    """A run folder's resolved config, flattened, values as MLflow's params hold them."""
    try:
        raw = yaml.safe_load((folder / CONFIG).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{folder / CONFIG}: cannot read: {exc}") from exc
    return {k: str(v)[:6000] for k, v in flatten(raw).items()}


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc


def epochs_run(folder: Path) -> int | None:
    """Epochs a run trained (``history.json``); None when nothing was trained."""
    path = folder / "history.json"
    history = _json(path) if path.is_file() else []
    return max(h["epoch"] for h in history) + 1 if history else None


def load_folder(folder: str | Path) -> RunRecord:
    """One finished run folder as a :class:`RunRecord`: the tags and params its MLflow run
    has, its test metrics (and extra evaluations) under their MLflow names."""
    folder = Path(folder)
    params = read_config(folder)
    data_path = params.get("data.path", "")
    meta_path = folder / "dataset_meta.json"
    if not meta_path.is_file():
        meta_path = Path(data_path) / "meta.json"
    meta = _json(meta_path) if meta_path.is_file() else {}
    metrics = final_metrics_to_flat(_json(folder / METRICS))
    for extra in sorted(folder.glob("metrics_*.json")):
        tag = extra.stem.removeprefix("metrics_")
        if _TAG.fullmatch(tag):
            metrics.update(extra_metrics_to_flat(_json(extra), tag))
    return RunRecord(
        run_id=str(folder),
        dataset=dataset_name(data_path, meta),
        backbone=params.get("model.name", "?"),
        method=params.get("train.method", "joint"),
        seed=int(params.get("train.seed", 0)),
        params=params,
        metrics=metrics,
        epochs=epochs_run(folder),
    )


def load_folders(paths: list[str | Path]) -> list[RunRecord]:
    """The finished runs in or under ``paths``, in the order given (the first of two runs of
    one model and seed is the one a table keeps)."""
    return [load_folder(f) for f in run_folders(paths, finished=True)]


def evaluate(folder: Path, overrides: tuple[str, ...] = (), out: str = METRICS) -> dict:
    """``dist-tp evaluate FOLDER [overrides] --out FOLDER/out`` (its best checkpoint, on the
    GPU when there is one), in a process of its own: the metrics written."""
    cmd = [sys.executable, "-m", "dist_tp", "evaluate", str(folder), *overrides]
    cmd += ["--out", str(folder / out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise ConfigError(
            f"{folder}: dist-tp evaluate failed (exit {done.returncode}): {lines[-1]}"
        )
    return _json(folder / out)


def evaluate_extra(folder: Path, extra: ExtraEval) -> dict:
    """Evaluate a finished run's best checkpoint with ``extra``'s settings into its file, and
    add the figures to the run's MLflow run (through its spool) when it was tracked."""
    metrics = evaluate(folder, extra.overrides, extra.file)
    tracker = reopen(folder)
    if tracker is not None:
        tracker.log_final(extra_metrics_to_flat(metrics, extra.tag), step=0)  # once per run
    return metrics


def extra_evaluations(folder: Path, extras: list[ExtraEval]) -> list[str]:
    """The extra evaluations a finished run lacks, made now: the files written."""
    done = []
    for extra in extras:
        if not (folder / extra.file).is_file():
            evaluate_extra(folder, extra)
            done.append(extra.file)
    return done


def finish_one(folder: Path) -> str:
    """A run stopped from outside (a deadline, a kill): its best checkpoint evaluated into
    ``metrics.json``, a ``STOPPED`` note, and its MLflow run given the final metrics and files
    and marked FINISHED, as a run that stopped by itself is."""
    from dist_tp.config import load_config

    metrics = evaluate(folder)
    epochs = epochs_run(folder)
    write_text(
        folder / STOPPED,
        f"stopped from outside after {epochs or 0} epochs; best checkpoint evaluated "
        "(to train on: delete metrics.json, metrics_*.json and STOPPED, then resume)\n",
    )
    tracker = reopen(folder)
    if tracker is not None:
        finish_run(tracker, load_config(folder / CONFIG), folder, metrics)
    return f"finished from its best checkpoint (stopped after {epochs or 0} epochs)"


def finish(paths: list[str | Path], extras: list[ExtraEval] = ()) -> dict[str, str]:
    """``dist-tp finish``: every run folder in or under ``paths`` that has a best checkpoint
    but no metrics is finished (:func:`finish_one`); every finished run gets the extra
    evaluations it lacks. Returns run folder → what was done."""
    status: dict[str, str] = {}
    for folder in run_folders(paths):
        try:
            with run_folder_held(folder, "finish it once it has stopped"):
                if (folder / METRICS).is_file():
                    result = "finished already"
                elif (folder / "checkpoint.pt").is_file():
                    result = finish_one(folder)
                else:
                    status[str(folder)] = "not finished: no checkpoint.pt yet (resume it instead)"
                    continue
                written = extra_evaluations(folder, list(extras))
        except ConfigError as exc:
            status[str(folder)] = f"failed: {exc}"
            continue
        status[str(folder)] = result + (f"; wrote {', '.join(written)}" if written else "")
    return status
