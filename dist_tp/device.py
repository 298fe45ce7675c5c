"""Where a run computes: ``train.device`` resolved to a ``torch.device``.

``auto`` is the process's own GPU when CUDA is present (``cuda:LOCAL_RANK`` under torchrun,
shared round-robin when there are more local ranks than GPUs), else the CPU. Data is prepared
on the CPU (numpy) and moved with ``to_device`` just before the model sees it; figures that
leave the model (ranks, logits) come back to the CPU.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import torch

from dist_tp.config import ConfigError


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
