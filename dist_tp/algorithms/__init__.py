"""Training methods behind one stepper interface (:class:`Stepper`): joint training and TP.

``make_stepper`` builds the method ``train.method`` names, handing it the optimizer host and
the prepared data the run opened; the methods register themselves in ``METHODS``.
"""

from dist_tp.algorithms import joint as _joint  # noqa: F401  registers "joint"
from dist_tp.algorithms.base import METHODS, OnStep, Stepper, StreamPosition
from dist_tp.algorithms.tp import trainer as _trainer  # noqa: F401  registers "tp"


def make_stepper(model, cfg, *, host, data) -> Stepper:
    """The stepper of ``cfg.train.method`` for ``model``, updating through ``host``."""
    return METHODS[cfg.train.method](model, cfg, host=host, data=data)


__all__ = ["METHODS", "OnStep", "Stepper", "StreamPosition", "make_stepper"]
