"""Experiment tracking in MLflow, with a local spool so that nothing is lost.

Rank 0 of ``dist-tp train`` owns a :class:`Tracker`; the other ranks get a :class:`NullTracker`.
Every event (run start with params and tags, a batch of metrics, an artifact, the run's end)
is first appended to ``<run folder>/mlflow/spool.jsonl`` and then delivered to MLflow. If the
tracking server cannot be reached at the start, or stops answering mid-run, training goes on
with one warning; the undelivered events stay in the spool and ``dist-tp mlflow-sync DIR``
replays them later into the same MLflow run. ``mlflow/state.json`` (written atomically) holds
the tracking URI, the run id and how many spool lines have been delivered, so a replay or a
resumed training run never sends an event twice.

Metric names (MLflow forbids ``@``; ``HR@10`` is written ``HR_10``):

- ``train/loss``, ``train/windows_per_s``, ``train/seconds``, ``train/disc_loss``,
  ``train/disc_acc``, ``train/disc_auc``, ``valid/existing/<all|head|tail>/<HR|NDCG>_<N>``:
  per epoch (step = epoch);
- ``step/loss``, ``step/disc_loss``: TP, the mean over every ``track.log_every`` outer steps
  (step = global outer step);
- ``test/<existing|new>/<all|head|tail>/<HR|NDCG>_<N>`` and ``.../users``: the final test
  metrics of the best checkpoint; ``best_valid/...`` the same on the validation split;
- ``test/discriminator/<acc|auc|majority>``: the discriminator on the existing users' test
  inputs at the end (``majority`` is the accuracy of always guessing the larger group).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None

from dist_tp.config import ConfigError, flatten, to_dict
from dist_tp.core.files import write_json

log = logging.getLogger(__name__)

SPOOL_DIR = "mlflow"
KIND_TAG = "dist_tp.kind"  # "train" for training runs, "plots" for the figures' run
_PARAMS_PER_BATCH = 100  # MLflow's limits per log_batch call
_METRICS_PER_BATCH = 1000


def metric_key(name: str) -> str:
    """``HR@10`` → ``HR_10``: the one spelling MLflow accepts."""
    return name.replace("@", "_")


def metrics_to_flat(metrics: dict, prefix: str) -> dict[str, float]:
    """Nested metrics (role → group → name → value) → ``prefix/role/group/NAME_N``."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(metrics_to_flat(value, f"{prefix}/{key}"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}/{metric_key(key)}"] = float(value)
    return out


def final_metrics_to_flat(metrics: dict) -> dict[str, float]:
    """A run's ``metrics.json`` as MLflow metrics (see the module docstring)."""
    out = {}
    for role in ("existing", "new"):
        if role in metrics:
            out.update(metrics_to_flat(metrics[role], f"test/{role}"))
    for role, groups in metrics.get("validation", {}).items():
        out.update(metrics_to_flat(groups, f"best_valid/{role}"))
    for name, value in metrics.get("discriminator", {}).items():
        out[f"test/discriminator/{name.removeprefix('disc_')}"] = float(value)
    return out


EPOCH_KEYS = {
    "loss": "train/loss",
    "windows_per_s": "train/windows_per_s",
    "seconds": "train/seconds",
    "disc_loss": "train/disc_loss",
    "disc_acc": "train/disc_acc",
    "disc_auc": "train/disc_auc",
    "valid_ndcg10": "valid/existing/all/NDCG_10",
    "valid_hr10": "valid/existing/all/HR_10",
}


def epoch_metrics(record: dict) -> dict[str, float]:
    """One ``history.json`` record → the per-epoch MLflow metrics."""
    return {name: float(record[k]) for k, name in EPOCH_KEYS.items() if k in record}


def resolve_uri(configured: str = "") -> str:
    """The config's URI, else ``MLFLOW_TRACKING_URI``, else MLflow's own default
    (MLflow 3: ``sqlite:///mlflow.db`` in the working folder)."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    import mlflow

    return mlflow.get_tracking_uri()


def git_commit(path: Path | None = None) -> str | None:
    """The commit of the code that runs (None outside a git checkout)."""
    path = path or Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _quiet_http() -> None:
    """Fail fast on an unreachable server instead of MLflow's minutes of retries; a user's
    own settings win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


class Spool:
    """The append-only event log of one run folder, and its delivery state."""

    def __init__(self, out: str | Path) -> None:
        self.dir = Path(out) / SPOOL_DIR
        self.path = self.dir / "spool.jsonl"
        self.state_path = self.dir / "state.json"

    def exists(self) -> bool:
        return self.path.is_file()

    def append(self, event: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        line = json.dumps(event, separators=(",", ":")) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()

    def events(self) -> list[dict]:
        """Every complete event; a torn last line (a kill mid-write) is dropped with a warning."""
        if not self.path.is_file():
            return []
        events = []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError as exc:
                if number == len(lines):
                    log.warning("%s:%d: incomplete last event ignored", self.path, number)
                    break
                raise ConfigError(f"{self.path}:{number}: not a spool event: {exc}") from exc
        return events

    def state(self) -> dict:
        if not self.state_path.is_file():
            return {"delivered": 0}
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.state_path}: unreadable spool state: {exc}") from exc

    def save_state(self, state: dict) -> None:
        write_json(self.state_path, state)


@contextlib.contextmanager
def _store_lock(uri: str):
    """For a local sqlite store, an exclusive lock on ``<db>.lock`` beside it: the first
    use of a fresh store creates its tables, and two processes doing that at once leave it
    broken. Other stores need no lock."""
    if not uri.startswith("sqlite:///") or fcntl is None:
        yield
        return
    lock_path = Path(uri[len("sqlite:///") :] + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_experiment(client, name: str) -> str:
    """The id of experiment ``name``, created if missing, under the store's lock (a fresh
    sqlite store's tables are made on first use). Another process may still create the
    experiment at the same moment on a server: a failed create is followed by a lookup."""
    with _store_lock(getattr(client, "tracking_uri", "")):
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return client.create_experiment(name)
        except Exception:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id


def open_client(uri: str):
    """An ``MlflowClient`` for ``uri``; a fresh sqlite store gets its tables here, under the
    store's lock."""
    _quiet_http()
    from mlflow.tracking import MlflowClient

    with _store_lock(uri):
        return MlflowClient(tracking_uri=uri)


def prepare_store(uri: str, experiment: str) -> str:
    """Create the tracking store and ``experiment`` once, before parallel runs start, so that
    they do not race to create a fresh sqlite store's tables. Returns the experiment id."""
    return ensure_experiment(open_client(uri), experiment)


class Delivery:
    """Sends spool events to one MLflow tracking URI; the run id lives in the spool state."""

    def __init__(self, spool: Spool, uri: str) -> None:
        self.spool, self.uri = spool, uri
        self.client = open_client(uri)

    def send(self, events: list[dict], state: dict) -> int:
        """Deliver ``events`` in order, updating ``state`` (saved after each event batch).
        Returns how many were delivered; raises on the first failure (what was delivered
        before it is recorded)."""
        sent = 0
        try:
            for event in events:
                self._send_one(event, state)
                sent += 1
                state["delivered"] = state.get("delivered", 0) + 1
        finally:
            if sent:
                self.spool.save_state(state)
        return sent

    def _send_one(self, event: dict, state: dict) -> None:
        from mlflow.entities import Metric, Param, RunStatus

        op = event["op"]
        client = self.client
        if op == "start":
            if not state.get("run_id"):
                exp_id = ensure_experiment(client, event["experiment"])
                run = client.create_run(exp_id, run_name=event["run_name"], tags=event["tags"])
                state.update(run_id=run.info.run_id, experiment_id=exp_id, uri=self.uri)
                self.spool.save_state(state)  # the run exists: never create it twice
                params = [Param(k, v) for k, v in event["params"].items()]
                for i in range(0, len(params), _PARAMS_PER_BATCH):
                    client.log_batch(state["run_id"], params=params[i : i + _PARAMS_PER_BATCH])
            else:  # a resumed run continues the same MLflow run
                client.update_run(state["run_id"], status=RunStatus.to_string(RunStatus.RUNNING))
        elif op == "metrics":
            metrics = [
                Metric(k, float(v), int(event["ts"]), int(event["step"]))
                for k, v in event["values"].items()
            ]
            for i in range(0, len(metrics), _METRICS_PER_BATCH):
                client.log_batch(state["run_id"], metrics=metrics[i : i + _METRICS_PER_BATCH])
        elif op == "artifact":
            local = self.spool.dir.parent / event["path"]
            if local.is_file():
                client.log_artifact(state["run_id"], str(local), event.get("dir") or None)
            else:
                log.warning("artifact %s is gone; not sent", local)
        elif op == "end":
            client.set_terminated(state["run_id"], status=event["status"])
        else:
            raise ConfigError(f"{self.spool.path}: unknown spool event {op!r}")


class NullTracker:
    """What the non-zero ranks (and ``track.enabled=false``) get: every call does nothing."""

    run_id = None

    def start(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, values: dict[str, float], step: int) -> None:
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
                str(exc).splitlines()[0][:200] if str(exc) else "",
                self.spool.path,
                self.out,
            )

    def start(self, *, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        self.started = True
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


def log_figures(experiment: str, paths: list[Path], uri: str = "") -> str:
    """Log figures as artifacts of the experiment's ``plots`` run (made once, then reused)."""
    client = open_client(resolve_uri(uri))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"no MLflow experiment {experiment!r}")
    found = client.search_runs([exp.experiment_id], f"tags.`{KIND_TAG}` = 'plots'")
    if found:
        run_id = found[0].info.run_id
    else:
        run = client.create_run(exp.experiment_id, run_name="plots", tags={KIND_TAG: "plots"})
        run_id = run.info.run_id
        client.set_terminated(run_id)
    for path in paths:
        client.log_artifact(run_id, str(path), "figures")
    return run_id


def run_params(cfg) -> dict[str, Any]:
    return flatten(to_dict(cfg))


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
    pending = spool.events()[state.get("delivered", 0) :]
    state["uri"] = uri
    sent = Delivery(spool, uri).send(pending, state) if pending else 0
    return sent, state.get("run_id", ""), uri


def step_metrics(window: list) -> dict[str, float]:
    """Mean TP inner-loop losses over the last ``track.log_every`` outer steps."""
    n = len(window)
    out = {"step/loss": sum(s.pred_loss for s in window) / n}
    if any(s.disc_loss for s in window):
        out["step/disc_loss"] = sum(s.disc_loss for s in window) / n
    return out


def run_tags(cfg, meta: dict, world_size: int) -> dict[str, str]:
    """What a run is, for filtering and comparing: dataset (name and fingerprint), backbone,
    method, engine, loss, seed, world size, device, code version."""
    source = meta.get("source", {})
    tags = {
        "dataset": meta.get("dataset") or Path(str(cfg.data.path).rstrip("/")).name,
        "dataset.sha256": source.get("sha256", ""),
        "backbone": cfg.model.name,
        "method": cfg.train.method,
        "engine": cfg.train.engine,
        "loss": cfg.train.loss,
        "seed": str(cfg.train.seed),
        "world_size": str(world_size),
        "device": device_name(cfg.train.device),
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def device_name(spec: str) -> str:
    """``cpu``, or the GPU's model (``cuda:0 NVIDIA H100 80GB HBM3``): timings differ by it."""
    from dist_tp.core.device import resolve_device

    device = resolve_device(spec)
    if device.type != "cuda":
        return "cpu"
    import torch

    return f"{device} {torch.cuda.get_device_name(device)}"


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
    tracker.log_metrics(final_metrics_to_flat(metrics), step=0)
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
