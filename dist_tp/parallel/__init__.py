"""Distribution applied from outside the algorithms: the communicator (one process, or
torchrun's process group) and the optimizer host (plain, DDP, DeepSpeed ZeRO 0/1/2).

The rest of the package sees only the communicator's interface (``comm.LocalComm``) and the
host's (``host.Host``); only this room imports ``torch.distributed``, DDP and DeepSpeed.
"""

from dist_tp.parallel.comm import LocalComm
from dist_tp.parallel.distributed import closed, init_distributed, leave
from dist_tp.parallel.host import Host, OptimizerSpec, build_host

__all__ = [
    "Host",
    "LocalComm",
    "OptimizerSpec",
    "build_host",
    "closed",
    "init_distributed",
    "leave",
]
