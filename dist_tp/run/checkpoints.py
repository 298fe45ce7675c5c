"""The run folder's checkpoints, and the one place that writes and reads them.

- ``last.pt``: the resume point, written at each epoch's end and every
  ``train.checkpoint_every`` steps: the stepper's modules and state (optimizer, and mid-epoch
  each rank's stream position and the epoch's loss sums), the history so far, early stopping's
  counters, and where in the epoch it was taken.
- ``checkpoint.pt``: the best model so far (validation NDCG@10), what evaluation and serving
  load.

Both are one plain dict of tensors and plain values (``torch.load(weights_only=True)``),
written atomically by rank 0; every rank reads them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from dist_tp.config import Config, ConfigError, flatten, from_dict, to_dict
from dist_tp.core.files import load_checkpoint, remove_stale_temp_files, save_checkpoint

log = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "checkpoint.pt"
RUN_FILES = (LAST, BEST, "history.json", "metrics.json")  # a folder with one holds a run
WRITTEN = (*RUN_FILES, "config.yaml", "dataset_meta.json", "curves.png")  # all a run writes
MAY_CHANGE_ON_RESUME = (
    "train.epochs",
    "train.patience",
    "train.eval_every",
    "train.checkpoint_every",
    "train.threads",
    "train.prefetch",
    "train.compile",
    "train.progress",
    "train.device",
    "train.dist_timeout",
    "tp.check_replicas_every",
    "eval.",
    "track.",
)  # keys (or sections) a resumed run may change; any other change makes another run


def has_resume_point(folder: str | Path) -> bool:
    """Whether run folder ``folder`` has a ``last.pt`` to resume from."""
    return (Path(folder) / LAST).is_file()


@dataclass
class Progress:
    """Where the run stands: the epoch to run and the steps of it already done, the history
    of the finished epochs and early stopping's counters."""

    epoch: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)
    best: float = -math.inf
    since_best: int = 0
    decays: int = 0
    """Times the learning rate has been lowered so far (``train.lr_decays``)."""


def checkpoint_state(modules: dict, cfg: Config, epoch: int, history: list, **extra) -> dict:
    """A checkpoint's dict: each module's state by name, the resolved config, the epoch and
    history, and ``extra``."""
    return {
        **{name: m.state_dict() for name, m in modules.items()},
        "config": to_dict(cfg),
        "epoch": epoch,
        "history": history,
        **extra,
    }


class RunCheckpoints:
    """``last.pt`` and ``checkpoint.pt`` of run folder ``out``; rank 0 writes, all ranks read."""

    def __init__(self, out: Path, cfg: Config, comm) -> None:
        self.out, self.cfg, self.comm = Path(out), cfg, comm
        self.last, self.best = self.out / LAST, self.out / BEST

    def check_start(self, *, resume: bool, overwrite: bool = False) -> None:
        """Before anything is written: a resumed run must be the run ``last.pt`` holds (only
        :data:`MAY_CHANGE_ON_RESUME` may differ), and a fresh run must not land on another
        run's files unless ``overwrite`` (then rank 0 removes them)."""
        if self.comm.is_main:  # what writers killed mid-write left (no one writes here yet)
            for folder in (self.out, self.out / "mlflow"):
                remove_stale_temp_files(folder)
        if resume:
            if self.last.is_file():
                self._check_same_run(load_checkpoint(self.last)["config"])
            return
        found = [name for name in RUN_FILES if (self.out / name).is_file()]
        if found and not overwrite:
            raise ConfigError(
                f"{self.out} already holds a run ({', '.join(found)}): continue it with "
                "--resume, replace it with --overwrite, or choose another --output"
            )
        self.comm.barrier()  # every rank has looked before rank 0 removes anything
        if found and self.comm.is_main:
            for name in WRITTEN:
                (self.out / name).unlink(missing_ok=True)
            log.warning("--overwrite: removed %s from %s", ", ".join(found), self.out)
        self.comm.barrier()

    def _check_same_run(self, saved: dict) -> None:
        try:
            before = flatten(to_dict(from_dict(Config, saved)))
        except ConfigError as exc:
            raise ConfigError(f"{self.last}: its config no longer loads ({exc})") from None
        now = flatten(to_dict(self.cfg))
        changed = sorted(
            key
            for key in before.keys() | now.keys()
            if before.get(key) != now.get(key)
            and not any(
                key == allowed or (allowed.endswith(".") and key.startswith(allowed))
                for allowed in MAY_CHANGE_ON_RESUME
            )
        )
        if changed:
            diffs = ", ".join(f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
            raise ConfigError(
                f"{self.last}: --resume continues the run it holds, but these keys differ: "
                f"{diffs}. Drop those overrides, or start a new run in another --output"
            )

    def save_last(self, stepper, progress: Progress, *, epoch_done: bool) -> None:
        """The resume point after ``progress`` (a collective: ZeRO gathers its partitions in
        ``stepper.state_dict()``, and every rank waits until rank 0's file is complete)."""
        stepper_state = stepper.state_dict()
        if self.comm.is_main:
            extra = {
                "best": progress.best,
                "since_best": progress.since_best,
                "decays": progress.decays,
                "stepper": stepper_state,
                "next_step": progress.step,
                "epoch_done": epoch_done,
                "world_size": self.comm.world_size,
            }
            state = checkpoint_state(
                stepper.modules(), self.cfg, progress.epoch, progress.history, **extra
            )
            save_checkpoint(self.last, state)
        self.comm.barrier()

    def resume(self, stepper) -> Progress:
        """Load ``last.pt`` into ``stepper`` and return where to go on; a fresh start when
        there is none (with a warning: resuming was asked for)."""
        if not self.last.is_file():
            log.warning(
                "nothing to resume: %s has no %s; training starts from scratch", self.out, LAST
            )
            return Progress()
        state = load_checkpoint(self.last)
        for name, module in stepper.modules().items():
            module.load_state_dict(state[name])
        stepper.load_state_dict(state["stepper"])
        progress = Progress(
            history=state["history"],
            best=state["best"],
            since_best=state["since_best"],
            decays=state.get("decays", 0),
        )
        if state.get("epoch_done", True):
            progress.epoch = state["epoch"] + 1
        else:
            self._check_mid_epoch_world(state)
            progress.epoch, progress.step = state["epoch"], state["next_step"]
        log.info("resumed from %s at epoch %d, step %d", self.last, progress.epoch, progress.step)
        return progress

    def _check_mid_epoch_world(self, state: dict) -> None:
        """A mid-epoch ``last.pt`` resumes only with the ranks that wrote it: each rank's share
        of the epoch's users (and so the steps already taken) depends on their number."""
        written = state.get("world_size", self.comm.world_size)
        if written != self.comm.world_size:
            raise ConfigError(
                f"{self.last}: written in the middle of epoch {state['epoch']} by {written} "
                f"rank(s); this run has {self.comm.world_size}. Resume it with {written}, or "
                "from an epoch's end."
            )

    def save_best(self, modules: dict, epoch: int, history: list) -> None:
        """The best model so far (rank 0 writes)."""
        if self.comm.is_main:
            save_checkpoint(self.best, checkpoint_state(modules, self.cfg, epoch, history))

    def restore_best(self, modules: dict) -> None:
        """Load the best model back into ``modules``, if one was saved (every rank, once
        rank 0's file is complete)."""
        self.comm.barrier()
        if self.best.is_file():
            state = load_checkpoint(self.best)
            for name, module in modules.items():
                module.load_state_dict(state[name])
