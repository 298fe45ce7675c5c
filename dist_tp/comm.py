"""The communicator the training code talks to; a no-op in a single process.

Only the distributed implementation imports ``torch.distributed``; everything else sees this
small interface, so the same training code runs alone and under torchrun.
"""

from __future__ import annotations

import torch


class LocalComm:
    """World of one: every collective returns its input."""

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        """Leave cleanly (all ranks reached the end)."""

    def abort(self) -> None:
        """Leave after a failure, without waiting for the other ranks."""


def broadcast_module(module: torch.nn.Module, comm: LocalComm) -> None:
    """Every rank starts from rank 0's parameters and buffers."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            comm.broadcast_(tensor.data, src=0)
