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

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return tensor

    def gather_object(self, obj):
        """Every rank's ``obj`` as a list on rank 0 (rank order); None on the others."""
        return [obj]

    def all_gather_rows(
        self, rows: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's ``rows [n_r]`` and ``values [n_r, ...]``, concatenated in rank order
        on every rank (the counts may differ between ranks)."""
        return rows, values

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


def check_replicas(params: list[torch.Tensor], comm: LocalComm, *, step: int) -> None:
    """Fail loudly when the ranks' parameters have drifted apart (debug option).

    Compares a float64 checksum per parameter tensor: the max over ranks of (x, -x) gives
    both the largest and the smallest value in one collective.
    """
    sums = torch.stack([p.detach().double().sum() for p in params])  # [P]
    both = comm.all_reduce_max(torch.cat([sums, -sums]))
    spread = both[: len(sums)] + both[len(sums) :]  # max - min per tensor
    if float(spread.max()) > 0.0:
        worst = int(spread.argmax())
        raise RuntimeError(
            f"replicas drifted at outer step {step}: parameter #{worst} differs across ranks "
            f"by {float(spread[worst]):.3e} (checksum)"
        )
