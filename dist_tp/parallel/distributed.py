"""The only module that imports ``torch.distributed``.

``init_distributed()`` returns a communicator: ``LocalComm`` in a plain process, ``DistComm``
under torchrun (``RANK``/``WORLD_SIZE`` in the environment; backend nccl when each local rank
has a GPU of its own, gloo otherwise; ``DIST_TP_BACKEND`` overrides). ``DistComm.close()``
waits at a barrier before destroying the process group: without it, gloo ranks abort when
rank 0 leaves first.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

from dist_tp.core.process import exit_now
from dist_tp.parallel.comm import LocalComm

log = logging.getLogger(__name__)


class DistComm(LocalComm):
    """Collectives over the default process group.

    The backend's device (this rank's GPU for nccl, the CPU for gloo) is where the reduction
    runs; a tensor given on another device is copied there and the result comes back to the
    caller's device, so small CPU counters work under nccl too.
    """

    def __init__(self, store=None) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.store = store
        if dist.get_backend() == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")

    def _reduce(self, tensor: torch.Tensor, op) -> torch.Tensor:
        out = tensor.to(self.device, copy=True)
        dist.all_reduce(out, op=op)
        return out.to(tensor.device)

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, dist.ReduceOp.SUM) / self.world_size

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, dist.ReduceOp.SUM)

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, dist.ReduceOp.MAX)

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if tensor.device == self.device:
            dist.broadcast(tensor, src=src)
        else:
            staged = tensor.to(self.device)
            dist.broadcast(staged, src=src)
            tensor.copy_(staged)
        return tensor

    def all_gather_rows(
        self, rows: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Counts first, then rows and values padded to the largest count (one all-gather
        each), trimmed back to each rank's count."""
        count = torch.tensor([len(rows)], dtype=torch.int64, device=self.device)
        counts = [torch.zeros_like(count) for _ in range(self.world_size)]
        dist.all_gather(counts, count)
        sizes = [int(c) for c in counts]
        width = max(sizes)
        out = []
        for tensor in (rows, values):
            padded = tensor.new_zeros((width, *tensor.shape[1:]), device=self.device)
            padded[: len(tensor)] = tensor.to(self.device)
            parts = [torch.empty_like(padded) for _ in range(self.world_size)]
            dist.all_gather(parts, padded)
            out.append(torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(tensor.device))
        return out[0], out[1]

    def gather_object(self, obj):
        out = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        dist.barrier()
        dist.destroy_process_group()
        if self.store is not None:
            # leave only once every rank has torn its process group down: a rank exiting
            # while a peer still holds gloo connections to it can abort that peer
            self.store.set(f"exit/{self.rank}", "1")
            self.store.wait([f"exit/{r}" for r in range(self.world_size)])
        global _closed
        _closed = True

    def abort(self) -> None:
        """After a failure another rank may be gone: any collective (a barrier, or
        ``destroy_process_group`` waiting on peers) could block, so leave without one."""


_closed = False
"""Set once this process's ``DistComm`` has closed: every rank reached the end."""


def closed() -> bool:
    return _closed


def leave(code: int) -> NoReturn:
    """End a worker whose ``DistComm`` has closed: flush stdio and logging, then
    ``os._exit(code)``. Interpreter finalization is skipped on purpose: gloo's C++ threads
    can still be releasing tensors then, and a thread that needs the GIL during finalization
    aborts the process (SIGABRT, "terminate called without an active exception"; about one
    two-rank run in a hundred here), so torchrun would report a finished run as failed."""
    exit_now(code)


def choose_backend() -> str:
    """``DIST_TP_BACKEND`` if set; else nccl when every local rank has a GPU of its own,
    gloo otherwise (no GPU, or more ranks than GPUs on this node: NCCL refuses two ranks on
    one GPU, while gloo lets them share it)."""
    forced = os.environ.get("DIST_TP_BACKEND", "")
    if forced:
        if forced not in ("nccl", "gloo"):
            raise ValueError(f"DIST_TP_BACKEND must be nccl or gloo, got {forced!r}")
        return forced
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.is_available() and local_world <= torch.cuda.device_count():
        return "nccl"
    return "gloo"


def init_distributed(timeout_s: int = 600) -> LocalComm:
    """A communicator for this process: distributed when launched by torchrun with W > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return LocalComm()
    backend = choose_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(seconds=timeout_s)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is not None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's store outlives a restart, and so do the previous workers' addresses in
        # it; a key prefix per restart keeps new workers from dialling the dead ones.
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            world,
            is_master=False,
            timeout=timeout,
        )
        store = dist.PrefixStore(f"dist_tp/restart{restart}", store)
        dist.init_process_group(
            backend=backend,
            store=store,
            rank=int(os.environ["RANK"]),
            world_size=world,
            timeout=timeout,
        )
    else:
        store = None
        dist.init_process_group(backend=backend, timeout=timeout)
    comm = DistComm(store)
    log.info("rank %d of %d (%s)", comm.rank, comm.world_size, backend)
    return comm
