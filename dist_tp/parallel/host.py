"""The optimizer host: how parameters are updated and kept in step across ranks, applied from
outside the algorithms.

The run builds one host from the config (:func:`build_host`) and hands it to the training
method. A method asks it for the optimizer it needs and never learns which engine is behind:

- :meth:`Host.gradient_optimizer` for a loss module (joint training): ``opt(*inputs)`` runs the
  module's forward (through DDP or a DeepSpeed engine), ``opt.update(loss)`` backpropagates,
  averages the gradients over ranks, clips, steps and zeroes them.
- :meth:`Host.pseudo_gradient_optimizer` for given gradients (TP's outer step):
  ``opt.step(grads)`` averages them over ranks and takes one optimizer step.

Both start every rank from rank 0's parameters and have ``state_dict``/``load_state_dict``.

Hosts: :class:`TorchHost` (one process, or DDP under torchrun: torch's own Adam/SGD) and
:class:`DeepSpeedHost` (ZeRO 0/1/2, ``train.engine: deepspeed``). Adding an engine (FSDP2 for
the dense part, torchft) means a new host here and one line in :func:`build_host`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from dist_tp.config import ConfigError, TrainConfig
from dist_tp.parallel.comm import LocalComm, broadcast_module


@dataclass(frozen=True)
class OptimizerSpec:
    """What the algorithm asks of its optimizer (the run config owns these values)."""

    lr: float
    kind: str = "adam"  # adam | sgd
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # max gradient norm; 0: no clipping
    compress: str = "none"  # wire dtype of averaged pseudo-gradients: none | bf16 | fp16


class GradientOptimizer(Protocol):
    def __call__(self, *args, **kwargs) -> Tensor: ...

    def update(self, loss: Tensor) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class PseudoGradientOptimizer(Protocol):
    bytes_sent: int

    def step(self, grads: list[Tensor]) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Host(Protocol):
    comm: LocalComm

    def gradient_optimizer(self, module: nn.Module, spec: OptimizerSpec) -> GradientOptimizer:
        """``module``'s forward returns the loss; its parameters are the ones updated."""
        ...

    def pseudo_gradient_optimizer(
        self, modules: dict[str, nn.Module], spec: OptimizerSpec
    ) -> PseudoGradientOptimizer:
        """Gradients given to ``step`` align with the modules' parameters, in order."""
        ...


def _torch_optimizer(params: list[nn.Parameter], spec: OptimizerSpec) -> torch.optim.Optimizer:
    if spec.kind == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.kind == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, weight_decay=spec.weight_decay)
    raise ConfigError(f"optimizer must be adam or sgd, got {spec.kind!r}")


class TorchGradientOptimizer:
    """torch's optimizer over ``module``; under torchrun the forward runs through DDP, whose
    constructor broadcasts rank 0's parameters and whose backward averages the gradients."""

    def __init__(self, module: nn.Module, spec: OptimizerSpec, comm: LocalComm) -> None:
        self.module, self.spec = module, spec
        self.net = _data_parallel(module) if comm.world_size > 1 else module
        self.opt = _torch_optimizer(list(module.parameters()), spec)

    def __call__(self, *args, **kwargs) -> Tensor:
        return self.net(*args, **kwargs)

    def update(self, loss: Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()  # under DDP: gradients averaged over ranks
        if self.spec.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.spec.grad_clip)
        self.opt.step()

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "optimizer" not in state:
            raise ConfigError("cannot resume: last.pt was written by a DeepSpeed engine")
        self.opt.load_state_dict(state["optimizer"])


def _data_parallel(module: nn.Module) -> nn.Module:
    """DDP: its constructor broadcasts rank 0's parameters and buffers, and each backward
    all-reduces (averages) the gradients in buckets, overlapped with compute."""
    from torch.nn.parallel import DistributedDataParallel

    device = next(module.parameters()).device
    return DistributedDataParallel(
        module, device_ids=None if device.type == "cpu" else [device.index]
    )


class TorchPseudoGradientOptimizer:
    """The lane- (and rank-) averaged pseudo-gradient goes into torch's Adam (or SGD) as if it
    were a gradient. All parameters travel in one flat buffer, so averaging across processes
    is one collective per step, not one per parameter; ``compress`` sends it as bf16/fp16."""

    def __init__(self, modules: dict[str, nn.Module], spec: OptimizerSpec, comm: LocalComm) -> None:
        self.comm = comm
        if comm.world_size > 1:  # every rank starts from rank 0's parameters
            for module in modules.values():
                broadcast_module(module, comm)
        self.params = [p for module in modules.values() for p in module.parameters()]
        wire = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
        self.wire_dtype = wire[spec.compress]
        self.bytes_sent = 0  # pseudo-gradient bytes put on the wire by this rank
        self.opt = _torch_optimizer(self.params, OptimizerSpec(lr=spec.lr, kind=spec.kind))

    def step(self, grads: list[Tensor]) -> None:
        """Average ``grads`` (aligned with the parameters) over processes, then one step."""
        flat = torch.cat([g.reshape(-1) for g in grads])  # one bucket
        if self.comm.world_size > 1:
            wire = flat if self.wire_dtype is None else flat.to(self.wire_dtype)
            self.bytes_sent += wire.numel() * wire.element_size()
            flat = self.comm.all_reduce_mean(wire).to(torch.float32)
        offset = 0
        for p in self.params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state)


class TorchHost:
    """One process, or DDP-style averaging under torchrun, with torch's optimizers."""

    def __init__(self, comm: LocalComm | None = None) -> None:
        self.comm = comm or LocalComm()

    def gradient_optimizer(self, module: nn.Module, spec: OptimizerSpec) -> GradientOptimizer:
        return TorchGradientOptimizer(module, spec, self.comm)

    def pseudo_gradient_optimizer(
        self, modules: dict[str, nn.Module], spec: OptimizerSpec
    ) -> PseudoGradientOptimizer:
        return TorchPseudoGradientOptimizer(modules, spec, self.comm)


class DeepSpeedHost:
    """DeepSpeed engines (ZeRO 0/1/2) from the JSON at ``path`` (``train.deepspeed``)."""

    def __init__(self, path: str, comm: LocalComm | None = None) -> None:
        self.path, self.comm = path, comm or LocalComm()

    def gradient_optimizer(self, module: nn.Module, spec: OptimizerSpec) -> GradientOptimizer:
        from dist_tp.parallel.deepspeed_engine import EngineGradientOptimizer

        if spec.kind != "adam":
            raise ConfigError("train.engine=deepspeed hosts Adam only")
        return EngineGradientOptimizer(module, spec, path=self.path, comm=self.comm)

    def pseudo_gradient_optimizer(
        self, modules: dict[str, nn.Module], spec: OptimizerSpec
    ) -> PseudoGradientOptimizer:
        from dist_tp.parallel.deepspeed_engine import EngineOuter

        if spec.kind != "adam" or spec.compress != "none":
            raise ConfigError(
                "train.engine=deepspeed hosts an Adam outer step with DeepSpeed's own "
                "reduction: it needs tp.outer_optimizer=adam and tp.compress=none "
                "(DeepSpeed's communication_data_type sets the wire dtype)"
            )
        return EngineOuter(modules, path=self.path, lr=spec.lr, comm=self.comm)


def build_host(train: TrainConfig, comm: LocalComm | None = None) -> Host:
    """The host ``train.engine`` names: ``plain`` (torch; DDP under torchrun) or ``deepspeed``."""
    if train.engine == "deepspeed":
        return DeepSpeedHost(train.deepspeed, comm)
    return TorchHost(comm)
