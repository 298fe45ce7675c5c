"""Evaluating a saved run again: the metrics of its best checkpoint, with other ``eval.*``
settings if asked."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dist_tp.algorithms.tp.disc_metrics import discriminator_metrics
from dist_tp.algorithms.tp.discriminator import Discriminator
from dist_tp.config import Config, ConfigError, apply_overrides, from_dict, to_dict
from dist_tp.core.device import resolve_device, set_threads
from dist_tp.models.saved import load_run
from dist_tp.run.loop import test_metrics


def evaluate_run(path: str | Path, overrides: Sequence[str] = ()) -> tuple[dict, Path]:
    """Recompute a run's metrics from its checkpoint: (metrics, run folder). ``overrides``
    change ``eval.*`` keys only (e.g. ``eval.exclude_history=false``). A TP run's
    discriminator figures are recomputed too. Torch uses the run's ``train.threads`` (when
    set), as its training did: a run given one thread because it shares the machine is
    evaluated the same way."""
    saved = load_run(path)
    cfg, model = saved.cfg, saved.model
    set_threads(cfg.train.threads)
    if overrides:
        bad = [o for o in overrides if not o.startswith("eval.")]
        if bad:
            raise ConfigError(
                f"{bad[0]!r}: only eval.* keys can change when evaluating a saved run"
            )
        cfg = from_dict(Config, apply_overrides(to_dict(cfg), list(overrides)))
    device = resolve_device("auto")
    model.to(device)
    metrics = test_metrics(model, cfg, saved.data)
    if "disc" in saved.state:
        disc = Discriminator(cfg.model.dim, cfg.tp.disc_hidden)
        disc.load_state_dict(saved.state["disc"])
        metrics["discriminator"] = discriminator_metrics(
            model, disc.to(device).eval(), saved.data, max_len=cfg.model.max_len
        )
    metrics["dataset"] = {"path": cfg.data.path, "sha256": saved.data.sha256}
    return metrics, saved.folder
