"""The interface every training method implements, and the registry the run picks from.

A method is a *stepper*: it owns its model's optimizer (from the optimizer host it is given),
its data stream and its random streams, and runs one epoch at a time. The run loop
(:mod:`dist_tp.run.loop`) owns everything else: epochs, validation, early stopping,
checkpoints and tracking. A new method plugs in by implementing :class:`Stepper` and adding
itself to :data:`METHODS` (``train.method`` names it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import nn

from dist_tp.parallel.comm import LocalComm
from dist_tp.parallel.host import Host, build_host

log = logging.getLogger(__name__)

OnStep = Callable[[int, Mapping[str, float]], None]
"""Called after every step of an epoch with the step's index within the epoch and the figures
the method reports per step (``{}`` when it reports none: reading them would wait on the
device). Mid-epoch checkpoints are taken from here."""


@dataclass(frozen=True)
class StreamPosition:
    """Where a rank's epoch stands: its pool of users starts at row ``row`` of the ``unit``-th
    row group of its stream, is the epoch's ``pool``-th pool, and ``done`` of that pool's
    mini-batches are done. Stored in checkpoints as the plain list ``[unit, row, pool, done]``
    (so they load with ``weights_only=True``)."""

    unit: int
    row: int
    pool: int
    done: int

    def to_list(self) -> list[int]:
        return [self.unit, self.row, self.pool, self.done]

    @classmethod
    def from_list(cls, values: list[int] | tuple[int, ...]) -> StreamPosition:
        unit, row, pool, done = (int(v) for v in values)
        return cls(unit, row, pool, done)


@runtime_checkable
class Stepper(Protocol):
    """One training method, as the run loop drives it."""

    model: nn.Module
    steps_per_epoch: int | None
    """Steps in every epoch, when known in advance (TP); None when the epoch ends with its
    data (joint training streams users until they run out)."""

    def modules(self) -> dict[str, nn.Module]:
        """What a checkpoint saves and restores by name (the model, and e.g. TP's
        discriminator)."""
        ...

    def run_epoch(self, epoch: int, start_step: int = 0, on_step: OnStep | None = None) -> dict:
        """Steps ``start_step..`` of epoch ``epoch``; the epoch's figures for ``history.json``
        (``loss``, ``windows``, ``windows_per_s``, ``seconds`` and the method's own)."""
        ...

    def state_dict(self) -> dict:
        """The method's state beyond its modules' parameters: the optimizer's, and mid-epoch
        (when called from ``on_step``; on every rank at once) what resuming there needs, such
        as each rank's :class:`StreamPosition`. Plain values and tensors only."""
        ...

    def load_state_dict(self, state: dict) -> None: ...

    def final_metrics(self) -> dict:
        """Figures of the trained method beyond the ranking metrics, for ``metrics.json``
        (TP: its discriminator's); a collective: called on every rank."""
        ...

    def restart_optimizer(self, lr_scale: float) -> None:
        """The optimizer afresh (no moments, step counts from zero) at the method's learning
        rate × ``lr_scale`` (``train.lr_decays``); the rate is in ``state_dict()`` after."""
        ...


def comm_and_host(cfg, comm=None, host: Host | None = None) -> tuple[LocalComm, Host]:
    """A stepper's communicator and optimizer host: ``comm`` defaults to the host's (or a
    single process), ``host`` to the one ``train.engine`` names over ``comm``. A ``comm``
    given beside a ``host`` only decides this rank's share of the data."""
    comm = comm or (host.comm if host is not None else LocalComm())
    return comm, host or build_host(cfg.train, comm)


def step_lr(cfg, world_size: int, method: str) -> float:
    """The learning rate of ``method``'s optimizer (``train.lr`` after ``train.lr_scaling``),
    logged when it differs from ``train.lr``."""
    lr = cfg.effective_lr(world_size, method)
    if lr != cfg.train.lr:
        log.info(
            "train.lr_scaling=%s: lr %g for %d windows per step (train.lr %g at %d)",
            cfg.train.lr_scaling,
            lr,
            cfg.step_windows(method) * world_size,
            cfg.train.lr,
            cfg.train.lr_batch,
        )
    return lr


METHODS: dict[str, Callable[..., Stepper]] = {}
"""``train.method`` → the stepper's constructor ``(model, cfg, comm, *, host, data)``."""


def register(name: str):
    """Class decorator: the method ``train.method=name``."""

    def add(cls):
        METHODS[name] = cls
        return cls

    return add
