"""Models from configs and from saved runs: what training, evaluation and serving build."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from dist_tp.config import Config, ConfigError, from_dict
from dist_tp.core.files import load_checkpoint
from dist_tp.data.stream import PreparedData
from dist_tp.models import Popularity, build_model

BEST = "checkpoint.pt"  # a run folder's best model (written by the run's checkpoints)


def build(cfg: Config, data: PreparedData) -> nn.Module:
    """The model named by the config; popularity is counted from the training items."""
    if cfg.model.name == "pop":
        return Popularity(data.training_counts())
    return build_model(cfg.model, data.num_items)


@dataclass
class SavedRun:
    """A run's best model on the CPU (in eval mode), its config, the checkpoint's whole state
    and its prepared data, opened."""

    model: nn.Module
    cfg: Config
    state: dict
    data: PreparedData
    folder: Path


def load_run(path: str | Path) -> SavedRun:
    """The saved run at ``path``: a run folder (its ``checkpoint.pt``) or a checkpoint file."""
    path = Path(path)
    ckpt_path = path / BEST if path.is_dir() else path
    state = load_checkpoint(ckpt_path)
    cfg = from_dict(Config, state["config"])
    data = PreparedData.of(cfg.data.path)
    model = build(cfg, data)
    if not isinstance(model, Popularity):
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:  # keys or shapes differ: another version or config
            first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
            raise ConfigError(
                f"{ckpt_path}: the checkpoint does not fit the model its config describes "
                f"(written by another version of dist_tp?): {first}"
            ) from None
    model.eval()
    return SavedRun(model, cfg, state, data, path if path.is_dir() else path.parent)
