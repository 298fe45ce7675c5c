"""The MLflow store: which URI, a client for it, experiments made once under a lock, and the
figures' run of an experiment."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None

from dist_tp.config import ConfigError
from dist_tp.tracking.names import KIND_TAG


def resolve_uri(configured: str = "") -> str:
    """The config's URI, else ``MLFLOW_TRACKING_URI``, else MLflow's own default
    (MLflow 3: ``sqlite:///mlflow.db`` in the working folder)."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    import mlflow

    return mlflow.get_tracking_uri()


def quiet_http() -> None:
    """Fail fast on an unreachable server instead of MLflow's minutes of retries; a user's
    own settings win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


@contextlib.contextmanager
def store_lock(uri: str):
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
    with store_lock(getattr(client, "tracking_uri", "")):
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
    quiet_http()
    from mlflow.tracking import MlflowClient

    with store_lock(uri):
        return MlflowClient(tracking_uri=uri)


def prepare_store(uri: str, experiment: str) -> str:
    """Create the tracking store and ``experiment`` once, before parallel runs start, so that
    they do not race to create a fresh sqlite store's tables. Returns the experiment id."""
    return ensure_experiment(open_client(uri), experiment)


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
