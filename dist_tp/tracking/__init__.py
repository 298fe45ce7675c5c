"""Experiment tracking in MLflow, with a local spool so that nothing is lost.

Rank 0 of ``dist-tp train`` owns a :class:`Tracker`; the other ranks get a :class:`NullTracker`.
Every event (run start with params and tags, a batch of metrics, an artifact, the run's end)
is first appended to ``<run folder>/mlflow/spool.jsonl`` and then delivered to MLflow. If the
tracking server cannot be reached at the start, or stops answering mid-run, training goes on
with one warning; the undelivered events stay in the spool and ``dist-tp mlflow-sync DIR``
replays them later into the same MLflow run.

The package, by job:

- :mod:`~dist_tp.tracking.names`: metric names and the flatteners that make them;
- :mod:`~dist_tp.tracking.spool`: the spool of a run folder and its delivery to MLflow;
- :mod:`~dist_tp.tracking.store`: the tracking URI, the client, experiments, the figures' run;
- :mod:`~dist_tp.tracking.tags`: a run's params and tags;
- :mod:`~dist_tp.tracking.tracker`: the tracker of a training run, and replaying a spool;
- :mod:`~dist_tp.tracking.plots`: every figure (training curves, the paper's figures).

Every name other rooms use is importable from ``dist_tp.tracking`` itself.
"""

from dist_tp.tracking.names import (
    EPOCH_KEYS,
    GROUPS,
    KIND_TAG,
    ROLES,
    epoch_metrics,
    extra_metrics_to_flat,
    final_metrics_to_flat,
    key_for,
    metric_key,
    metrics_to_flat,
    step_metrics,
)
from dist_tp.tracking.spool import SPOOL_DIR, Delivery, Spool
from dist_tp.tracking.store import (
    ensure_experiment,
    log_figures,
    open_client,
    prepare_store,
    resolve_uri,
)
from dist_tp.tracking.tags import dataset_name, device_name, git_commit, run_params, run_tags
from dist_tp.tracking.tracker import (
    NullTracker,
    Tracker,
    finish_run,
    make_tracker,
    reopen,
    start_run,
    sync,
)

__all__ = [
    "EPOCH_KEYS",
    "GROUPS",
    "KIND_TAG",
    "ROLES",
    "SPOOL_DIR",
    "Delivery",
    "NullTracker",
    "Spool",
    "Tracker",
    "dataset_name",
    "device_name",
    "ensure_experiment",
    "epoch_metrics",
    "extra_metrics_to_flat",
    "final_metrics_to_flat",
    "finish_run",
    "git_commit",
    "key_for",
    "log_figures",
    "make_tracker",
    "metric_key",
    "metrics_to_flat",
    "open_client",
    "prepare_store",
    "reopen",
    "resolve_uri",
    "run_params",
    "run_tags",
    "start_run",
    "step_metrics",
    "sync",
]
