"""Where a run computes: ``train.device`` resolved to a ``torch.device``.

``auto`` is the process's own GPU when CUDA is present (``cuda:LOCAL_RANK`` under torchrun,
shared round-robin when there are more local ranks than GPUs), else the CPU. Data is prepared
on the CPU (numpy) and moved with ``to_device`` just before the model sees it; figures that
leave the model (ranks, logits) come back to the CPU.
"""

from __future__ import annotations

import itertools
import logging
import os

import numpy as np
import torch

from dist_tp.config import ConfigError

log = logging.getLogger(__name__)


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto``, ``cpu``, ``cuda`` (this rank's GPU) or ``cuda:N`` (checked by the config)."""
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"train.device={spec}: CUDA is not available on this machine")
    if spec in ("auto", "cuda"):  # more local ranks than GPUs: they share them round-robin
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    index = int(spec.split(":")[1])
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"train.device={spec}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return torch.device(spec)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for an empty module)."""
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return torch.device("cpu") if first is None else first.device


def to_device(array: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A numpy array or tensor on ``device`` (no copy when it is already there)."""
    tensor = torch.from_numpy(array) if isinstance(array, np.ndarray) else array
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def mps_running() -> bool:
    """Whether NVIDIA's MPS control daemon has its pipe in the directory that CUDA clients
    look in (``CUDA_MPS_PIPE_DIRECTORY``, default ``/tmp/nvidia-mps``)."""
    pipes = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    return os.path.exists(os.path.join(pipes, "control"))


def cpu_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_threads(threads: int) -> None:
    """torch's intra-op threads (``train.threads``); 0 keeps torch's default."""
    if threads > 0:
        torch.set_num_threads(threads)


def warn_if_oversubscribed() -> bool:
    """Warn (and return True) when torch's CPU threads plus the work already running exceed
    the cores: OpenMP threads then wait on each other (a tiny TP epoch on 2 cores beside a
    1-thread job: 9,046 windows/s with 2 threads, 27,060 with 1). ``train.threads`` fixes it."""
    threads = torch.get_num_threads()
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform
        return False
    cores = cpu_cores()
    if threads <= 1 or threads + busy <= cores + 0.5:
        return False
    free = max(1, int(cores - busy + 0.5))
    log.warning(
        "%d torch threads on %d cores with a load of %.1f already running: OpenMP threads "
        "will oversubscribe them and can slow training many times over; set "
        "train.threads=%d (or OMP_NUM_THREADS=%d)",
        threads,
        cores,
        busy,
        free,
        free,
    )
    return True
