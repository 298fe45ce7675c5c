"""Metric names: how a run's figures are spelled in MLflow, and the flatteners that make them.

MLflow forbids ``@``: ``HR@10`` is written ``HR_10``.

- ``train/loss``, ``train/windows_per_s``, ``train/seconds``, ``train/disc_loss``,
  ``train/disc_acc``, ``train/disc_auc``,
  ``valid/<existing|new>/<all|head|tail>/<HR|NDCG>_<N>``: per epoch (step = epoch);
- ``step/loss``, ``step/disc_loss``: TP, the mean over every ``track.log_every`` outer steps
  (step = global outer step);
- ``test/<existing|new>/<all|head|tail>/<HR|NDCG>_<N>`` and ``.../users``: the final test
  metrics of the best checkpoint; ``best_valid/...`` the same on the validation split;
- ``test/discriminator/<acc|auc|majority>``: the discriminator on the existing users' test
  inputs at the end (``majority`` is the accuracy of always guessing the larger group);
- ``<tag>/<existing|new>/<all|head|tail>/<HR|NDCG>_<N>``: an extra evaluation of the best
  checkpoint with other ``eval.*`` settings (the run folder's ``metrics_<tag>.json``, e.g.
  ``nohist`` for ``eval.exclude_history=false``), added by ``dist-tp sweep --extra-eval``;
  ``<tag>_valid/...`` its validation figures (what tunes ``eval.adapt_*``).
"""

from __future__ import annotations

KIND_TAG = "dist_tp.kind"  # "train" for training runs, "plots" for the figures' run
ROLES = ("existing", "new")
GROUPS = ("head", "tail")

EPOCH_KEYS = {
    "loss": "train/loss",
    "windows_per_s": "train/windows_per_s",
    "seconds": "train/seconds",
    "lr": "train/lr",
    "disc_loss": "train/disc_loss",
    "disc_acc": "train/disc_acc",
    "disc_auc": "train/disc_auc",
    "valid_ndcg10": "valid/existing/all/NDCG_10",
    "valid_hr10": "valid/existing/all/HR_10",
}


def metric_key(name: str) -> str:
    """``HR@10`` → ``HR_10``: the one spelling MLflow accepts."""
    return name.replace("@", "_")


def key_for(role: str, group: str, metric: str, split: str = "test") -> str:
    """The MLflow name of one figure: ``test/existing/all/HR_10`` (``split`` may name an
    extra evaluation: ``nohist/existing/all/HR_10``)."""
    return f"{split}/{role}/{group}/{metric_key(metric)}"


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
    for role in ROLES:
        if role in metrics:
            out.update(metrics_to_flat(metrics[role], f"test/{role}"))
    for role, groups in metrics.get("validation", {}).items():
        out.update(metrics_to_flat(groups, f"best_valid/{role}"))
    for name, value in metrics.get("discriminator", {}).items():
        out[f"test/discriminator/{name.removeprefix('disc_')}"] = float(value)
    return out


def extra_metrics_to_flat(metrics: dict, tag: str) -> dict[str, float]:
    """An extra evaluation's metrics (``metrics_<tag>.json``) as ``tag/role/group/NAME_N``
    (test) and ``tag_valid/role/group/NAME_N`` (validation)."""
    out = {}
    for role in ROLES:
        if role in metrics:
            out.update(metrics_to_flat(metrics[role], f"{tag}/{role}"))
    for role, groups in metrics.get("validation", {}).items():
        out.update(metrics_to_flat(groups, f"{tag}_valid/{role}"))
    return out


def epoch_metrics(record: dict) -> dict[str, float]:
    """One ``history.json`` record → the per-epoch MLflow metrics."""
    return {name: float(record[k]) for k, name in EPOCH_KEYS.items() if k in record}


def step_metrics(window: list[dict]) -> dict[str, float]:
    """Mean per-step figures over the last ``track.log_every`` steps (joint: the mini-batch
    ``loss``, read from the device only here; TP: the inner loop's ``loss`` and
    ``disc_loss``) → ``step/<name>``; a figure that is zero throughout (no discriminator) is
    left out."""
    n = len(window)
    out = {}
    for name in window[0]:
        if name == "loss" or any(figures[name] for figures in window):
            out[f"step/{name}"] = float(sum(figures[name] for figures in window)) / n
    return out
