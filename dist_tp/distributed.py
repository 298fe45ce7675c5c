"""The only module that imports ``torch.distributed``.

``init_distributed()`` returns a communicator: ``LocalComm`` in a plain process, ``DistComm``
under torchrun (``RANK``/``WORLD_SIZE`` in the environment; backend nccl on CUDA, gloo on
CPU). ``DistComm.close()`` waits at a barrier before destroying the process group: without
it, gloo ranks abort when rank 0 leaves first.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from dist_tp.comm import LocalComm

log = logging.getLogger(__name__)


class DistComm(LocalComm):
    """Collectives over the default process group."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / self.world_size

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        dist.broadcast(tensor, src=src)
        return tensor

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        dist.barrier()
        dist.destroy_process_group()

    def abort(self) -> None:
        dist.destroy_process_group()


def init_distributed(timeout_s: int = 600) -> LocalComm:
    """A communicator for this process: distributed when launched by torchrun with W > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return LocalComm()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    comm = DistComm()
    log.info("rank %d of %d (%s)", comm.rank, comm.world_size, backend)
    return comm
