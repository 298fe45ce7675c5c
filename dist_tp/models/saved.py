"""Models from configs and from saved runs: what training, evaluation and serving build."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path

from torch import nn

from dist_tp.config import Config, ConfigError, from_dict
from dist_tp.core.files import load_checkpoint
from dist_tp.data.errors import DataError
from dist_tp.data.stream import PreparedData
from dist_tp.models import Popularity, build_model

log = logging.getLogger(__name__)
BEST = "checkpoint.pt"  # a run folder's best model (written by the run's checkpoints)


CE_WARN_ITEMS = 200_000
"""Above this many items, ``train.loss=ce`` warns with the memory its logits take."""
SPARSE_ITEMS_FROM = 50_000
"""``train.item_updates=auto`` updates the item tables row-wise from this many items on."""


def sparse_item_updates(cfg: Config, num_items: int) -> bool:
    """Whether the item tables are updated row-wise (``train.item_updates``; ``auto``: a
    sampled loss, the plain engine, Adam (TP's outer optimizer too) and at least
    ``SPARSE_ITEMS_FROM`` items)."""
    train = cfg.train
    if train.item_updates != "auto":
        return train.item_updates == "sparse"
    outer_adam = train.method != "tp" or cfg.tp.outer_optimizer == "adam"
    big = num_items >= SPARSE_ITEMS_FROM
    return train.loss != "ce" and train.engine == "plain" and outer_adam and big


def check_loss_fits(cfg: Config, num_items: int, memory_bytes: int | None = None) -> int:
    """Bytes the full-softmax logits of one mini-batch take (forward, softmax and gradient:
    three float32 copies of [windows x items]); a warning above ``CE_WARN_ITEMS`` items, a
    ConfigError naming ``train.loss`` when that exceeds ``memory_bytes`` (default: this
    machine's memory). 0 for the sampled losses."""
    train = cfg.train
    if train.loss != "ce" or cfg.model.name == "pop":
        return 0
    windows = (
        train.batch_size
        if train.method == "joint"
        else (cfg.tp.lanes * cfg.tp.users_per_step * cfg.tp.inner_batch)
    )
    need = 3 * 4 * windows * num_items
    if memory_bytes is None:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    advice = (
        "use train.loss=sampled_softmax (train.negatives=popularity or in_batch, "
        "train.num_negatives=128) or bce"
    )
    if need > memory_bytes:
        raise ConfigError(
            f"train.loss=ce over {num_items:,} items needs ~{need / 2**30:.1f} GiB of logits "
            f"per mini-batch of {windows:,} windows, more than the {memory_bytes / 2**30:.0f} "
            f"GiB here: {advice}"
        )
    if num_items > CE_WARN_ITEMS:
        log.warning(
            "train.loss=ce over %s items: ~%.1f GiB of logits per mini-batch of %s windows; %s",
            f"{num_items:,}",
            need / 2**30,
            f"{windows:,}",
            advice,
        )
    return need


def build(cfg: Config, data: PreparedData) -> nn.Module:
    """The model named by the config; popularity is counted from the training items."""
    if cfg.model.name == "pop":
        return Popularity(data.training_counts())
    return build_model(cfg.model, data.num_items)


def initial_weights(cfg: Config, data: PreparedData) -> dict:
    """The best model weights of run ``cfg.train.init_from`` (a run folder or a checkpoint
    file), checked before anything is trained or written: the source must have the same
    ``model`` settings and have been trained on prepared data of the same
    :attr:`~dist_tp.data.stream.PreparedData.identity`. Anything else is a ConfigError
    naming ``train.init_from`` and the file. Load them with :func:`load_initial_weights`."""
    source = Path(cfg.train.init_from)
    ckpt_path = source / BEST if source.is_dir() else source
    key = f"train.init_from={cfg.train.init_from}"
    try:
        state = load_checkpoint(ckpt_path)
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    theirs = from_dict(Config, state["config"])
    pairs = [
        (f.name, getattr(theirs.model, f.name), getattr(cfg.model, f.name))
        for f in fields(cfg.model)
    ]
    differ = [f"model.{name}: {a!r} there, {b!r} here" for name, a, b in pairs if a != b]
    if differ:
        raise ConfigError(f"{key}: {ckpt_path} has other model settings ({'; '.join(differ)})")
    if "model" not in state:
        raise ConfigError(f"{key}: {ckpt_path} holds no model weights")
    try:
        same = PreparedData.of(theirs.data.path).identity == data.identity
    except (DataError, OSError, ValueError, KeyError):  # its data is gone: ids uncheckable
        same = False
    if not same:
        raise ConfigError(
            f"{key}: {ckpt_path} was not trained on the same prepared data as {cfg.data.path} "
            f"(it names {theirs.data.path}); its item ids would not match"
        )
    return {"source": str(ckpt_path), "epoch": state.get("epoch"), "model": state["model"]}


def _load_state(model: nn.Module, state: dict, what: str) -> None:
    """``model.load_state_dict(state)``; keys or shapes that differ (a checkpoint of another
    version or config) are a ConfigError ``"{what}: <torch's first complaint>"``."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise ConfigError(f"{what}: {first}") from None


def load_initial_weights(model: nn.Module, weights: dict) -> None:
    """Load what :func:`initial_weights` returned into ``model``."""
    _load_state(
        model, weights["model"], f"train.init_from: {weights['source']} does not fit this model"
    )
    log.info("model initialised from %s (epoch %s)", weights["source"], weights["epoch"])


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
        what = (
            f"{ckpt_path}: the checkpoint does not fit the model its config describes "
            "(written by another version of dist_tp?)"
        )
        _load_state(model, state["model"], what)
    model.eval()
    return SavedRun(model, cfg, state, data, path if path.is_dir() else path.parent)
