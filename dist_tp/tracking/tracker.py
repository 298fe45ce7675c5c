"""The tracker of one run folder: every event goes to the spool first, then to MLflow while it
answers. Rank 0 of ``dist-tp train`` owns a :class:`Tracker`; the other ranks get a
:class:`NullTracker`."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from dist_tp.config import ConfigError
from dist_tp.core.files import write_json
from dist_tp.tracking.names import KIND_TAG, final_metrics_to_flat
from dist_tp.tracking.spool import SPOOL_DIR, Delivery, Spool, first_line
from dist_tp.tracking.store import resolve_uri
from dist_tp.tracking.tags import run_params, run_tags

log = logging.getLogger("dist_tp.tracking")


class NullTracker:
    """What the non-zero ranks (and ``track.enabled=false``) get: every call does nothing."""

    run_id = None

    def start(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        pass

    def log_final(self, values: dict[str, float], step: int = 0) -> None:
        pass

    def log_artifact(self, path: str | Path, directory: str = "") -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


class Tracker:
    """Rank 0's tracker for one run folder: spool first, then MLflow while it answers."""

    def __init__(self, out: str | Path, *, uri: str = "", experiment: str = "dist-tp") -> None:
        self.out = Path(out)
        self.spool = Spool(self.out)
        self.state = self.spool.state()
        # a resumed run goes on in its first URI, whatever the environment says now
        self.uri = self.state.get("uri") or resolve_uri(uri)
        self.experiment = experiment
        self.online = True
        self._pending: list[dict] = []
        self._delivery: Delivery | None = None
        self.started = False  # no run to end before start(): a config error, say
        if self.spool.exists():  # earlier events of this run folder not yet delivered
            self._pending = self.spool.events()[self.state.get("delivered", 0) :]

    @property
    def run_id(self) -> str | None:
        return self.state.get("run_id")

    @property
    def client(self):
        """The ``MlflowClient`` this tracker delivers to (opened on first use)."""
        if self._delivery is None:
            self._delivery = Delivery(self.spool, self.uri)
        return self._delivery.client

    def _emit(self, event: dict) -> None:
        self.spool.append(event)
        self._pending.append(event)
        self._flush()

    def _flush(self) -> None:
        if not self.online or not self._pending:
            return
        try:
            if self._delivery is None:
                self._delivery = Delivery(self.spool, self.uri)
            sent = self._delivery.send(self._pending, self.state)
            self._pending = self._pending[sent:]
        except Exception as exc:  # noqa: BLE001 - any failure of the tracking side
            self.online = False
            self.state = self.spool.state()
            self._pending = self.spool.events()[self.state.get("delivered", 0) :]
            log.warning(
                "MLflow at %s is not answering (%s: %s); training goes on and every event is "
                "spooled to %s: replay it with 'dist-tp mlflow-sync %s'",
                self.uri,
                type(exc).__name__,
                first_line(exc, 200),
                self.spool.path,
                self.out,
            )

    def start(self, *, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        self.started = True
        if self.state.get("uri") != self.uri:  # the intended store, even if it never answers
            self.state["uri"] = self.uri
            self.spool.save_state(self.state)
        event = {
            "op": "start",
            "experiment": self.experiment,
            "run_name": run_name,
            "params": {k: str(v)[:6000] for k, v in params.items()},
            "tags": {KIND_TAG: "train", **{k: str(v) for k, v in tags.items()}},
        }
        self._emit(event)

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        if values:
            ts = int(time.time() * 1000)
            self._emit({"op": "metrics", "step": step, "ts": ts, "values": values})

    def log_final(self, values: dict[str, float], step: int = 0) -> None:
        """A run's final figures (its test metrics): each key is logged once per MLflow run
        with a given value, however often the end of the run is repeated (killed after its
        final metrics and resumed, replayed after a kill mid-delivery)."""
        if values:
            ts = int(time.time() * 1000)
            event = {"op": "metrics", "step": step, "ts": ts, "values": values, "final": True}
            self._emit(event)

    def log_artifact(self, path: str | Path, directory: str = "") -> None:
        rel = os.path.relpath(Path(path), self.out)
        self._emit({"op": "artifact", "path": rel, "dir": directory})

    def finish(self, status: str = "FINISHED") -> None:
        if not self.started:
            return
        self._emit({"op": "end", "status": status})
        if self._pending:
            self.online = True  # one more try: the server may be back
            self._flush()


def make_tracker(
    cfg, out: str | Path, *, is_main: bool, fresh: bool = True
) -> Tracker | NullTracker:
    """The tracker of a ``dist-tp train`` run: live on rank 0 when ``track.enabled``.

    A fresh (not resumed) run into a folder that holds an older run's spool starts a new
    MLflow run; the old spool is kept aside as ``mlflow.<time>`` if it still had undelivered
    events, removed otherwise."""
    if not (is_main and cfg.track.enabled):
        return NullTracker()
    spool = Spool(out)
    if fresh and spool.dir.exists():
        if spool.exists() and len(spool.events()) > spool.state().get("delivered", 0):
            aside = spool.dir.with_name(f"{SPOOL_DIR}.{time.strftime('%Y%m%d-%H%M%S')}")
            spool.dir.rename(aside)
            log.warning("%s had undelivered MLflow events; kept as %s", spool.dir, aside)
        else:
            import shutil

            shutil.rmtree(spool.dir)
    return Tracker(out, uri=cfg.track.uri, experiment=cfg.track.experiment)


def reopen(out: str | Path) -> Tracker | None:
    """The tracker of a run folder whose training has ended, to add to its MLflow run (an
    extra evaluation, the end of a run stopped from outside); None when the run was not
    tracked (no spool). Events go to the spool first, as during training."""
    spool = Spool(out)
    if not spool.exists():
        return None
    starts = [e for e in spool.events() if e.get("op") == "start"]
    tracker = Tracker(out, experiment=starts[0]["experiment"] if starts else "dist-tp")
    tracker.started = bool(starts)
    return tracker


def sync(out: str | Path, uri: str | None = None) -> tuple[int, str, str]:
    """Replay the undelivered spool events of a run folder: (events sent, run id, URI)."""
    spool = Spool(out)
    if not spool.exists():
        raise ConfigError(f"{spool.path}: no MLflow spool here; is {out} a dist-tp run folder?")
    state = spool.state()
    uri = uri or state.get("uri") or resolve_uri()
    if state.get("run_id") and state.get("uri") and uri != state["uri"]:
        raise ConfigError(
            f"{spool.state_path}: this run lives in {state['uri']}, not {uri}; "
            "to copy it elsewhere, remove the run id from the state file first"
        )
    events = spool.events()
    pending = events[state.get("delivered", 0) :]
    state["uri"] = uri
    if not pending:
        return 0, state.get("run_id", ""), uri
    try:
        sent = Delivery(spool, uri).send(pending, state)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the tracking side: one line
        left = len(events) - spool.state().get("delivered", 0)
        raise ConfigError(
            f"MLflow at {uri} failed ({type(exc).__name__}: {first_line(exc)}); "
            f"{left} of {len(events)} events stay spooled in {spool.path}: "
            f"run 'dist-tp mlflow-sync {out}' again when it answers"
        ) from exc
    return sent, state.get("run_id", ""), uri


def start_run(tracker, cfg, out: Path, meta: dict, *, world_size: int) -> None:
    """Open (or, on resume, reopen) the run: params, tags, and the dataset's meta.json."""
    if isinstance(tracker, NullTracker):
        return
    write_json(out / "dataset_meta.json", meta)
    name = cfg.track.run_name or out.name
    tracker.start(run_name=name, params=run_params(cfg), tags=run_tags(cfg, meta, world_size))


def finish_run(tracker, cfg, out: Path, metrics: dict) -> None:
    """Final test metrics for every group and N, the run's files and its training curves."""
    if isinstance(tracker, NullTracker):
        return
    tracker.log_final(final_metrics_to_flat(metrics), step=0)
    from dist_tp.tracking.plots import training_curves

    history_path = out / "history.json"
    if history_path.is_file():
        training_curves(json.loads(history_path.read_text()), out / "curves.png")
    for name in ("config.yaml", "dataset_meta.json", "metrics.json", "history.json", "curves.png"):
        if (out / name).is_file():
            tracker.log_artifact(out / name)
    if cfg.track.log_checkpoint and (out / "checkpoint.pt").is_file():
        tracker.log_artifact(out / "checkpoint.pt", "checkpoint")
    tracker.finish("FINISHED")
