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
from dist_tp.parallel.rows import RowAdam, clip_grad_norm, row_gradient, touched_rows


@dataclass(frozen=True)
class OptimizerSpec:
    """What the algorithm asks of its optimizer (the run config owns these values)."""

    lr: float
    kind: str = "adam"  # adam | sgd
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # max gradient norm; 0: no clipping
    compress: str = "none"  # wire dtype of averaged pseudo-gradients: none | bf16 | fp16
    sparse_rows: tuple[str, ...] = ()
    """Names (``module.named_parameters()``; for several modules ``key.name``) of item tables
    updated row by row (:class:`~dist_tp.parallel.rows.RowAdam`) from sparse gradients."""


class GradientOptimizer(Protocol):
    def __call__(self, *args, **kwargs) -> Tensor: ...

    def update(self, loss: Tensor) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def restart(self, lr: float) -> None:
        """Forget the optimizer's state (moments, step counts) and go on at rate ``lr``."""
        ...


class PseudoGradientOptimizer(Protocol):
    bytes_sent: int

    def step(self, grads: list[Tensor]) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def restart(self, lr: float) -> None: ...


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


def _split_rows(
    named: list[tuple[str, nn.Parameter]], spec: OptimizerSpec
) -> tuple[list[nn.Parameter], RowAdam | None]:
    """(the parameters a torch optimizer updates, a :class:`RowAdam` over the item tables
    ``spec.sparse_rows`` names, or None when it names none)."""
    names = [n for n, _ in named]
    unknown = sorted(set(spec.sparse_rows) - set(names))
    if unknown:
        raise ValueError(f"sparse_rows names no parameter: {unknown}")
    if spec.sparse_rows and spec.kind != "adam":
        raise ConfigError("row-wise item updates (train.item_updates=sparse) need Adam")
    rows = [p for n, p in named if n in spec.sparse_rows]
    dense = [p for n, p in named if n not in spec.sparse_rows]
    if not rows:
        return dense, None
    return dense, RowAdam(rows, lr=spec.lr, weight_decay=spec.weight_decay)


def _rows_state(rows: RowAdam | None, state: dict) -> dict:
    """``state`` with the row-wise optimizer's under ``rows`` (when there is one)."""
    return state if rows is None else {**state, "rows": rows.state_dict()}


def _load_rows(rows: RowAdam | None, state: dict) -> None:
    if (rows is None) != ("rows" not in state):
        written = "row-wise" if "rows" in state else "dense"
        raise ConfigError(
            f"cannot resume: last.pt was written with {written} item-table updates "
            "(train.item_updates), this run uses the other"
        )
    if rows is not None:
        rows.load_state_dict(state["rows"])


def _restart(opts: list[torch.optim.Optimizer | None], lr: float) -> None:
    """Each optimizer as if new (its state is made again at its next step), at rate ``lr``."""
    for opt in opts:
        if opt is None:
            continue
        opt.state.clear()
        for group in opt.param_groups:
            group["lr"] = lr


def _torch_optimizer(params: list[nn.Parameter], spec: OptimizerSpec) -> torch.optim.Optimizer:
    if spec.kind == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.kind == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, weight_decay=spec.weight_decay)
    raise ConfigError(f"optimizer must be adam or sgd, got {spec.kind!r}")


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _on_wire(tensor: Tensor, wire: torch.dtype | None) -> Tensor:
    """``tensor`` as it travels: in ``wire`` dtype when given (``tp.compress``)."""
    return tensor if wire is None else tensor.to(wire)


def average_rows(
    grad: Tensor, comm: LocalComm, wire: torch.dtype | None = None
) -> tuple[Tensor, int]:
    """(an item table's gradient, sparse or dense, averaged over processes as a sparse one;
    the bytes this rank sent). Every rank's touched rows travel (an all-gather of row ids and
    values, the values as ``wire`` when given), never the table."""
    rows, values = touched_rows(grad)
    dtype, sent = values.dtype, 0
    if comm.world_size > 1:
        wired = _on_wire(values, wire)
        sent = _nbytes(rows) + _nbytes(wired)
        rows, values = comm.all_gather_rows(rows, wired)
        values = values.to(torch.float32) / comm.world_size
    return row_gradient(rows, values.to(dtype), grad.shape), sent


def _no_rows(p: Tensor) -> Tensor:
    """A sparse gradient of ``p`` that touches no row."""
    empty = torch.zeros((1, 0), dtype=torch.int64, device=p.device)
    values = p.new_zeros((0, *p.shape[1:]))
    return torch.sparse_coo_tensor(empty, values, p.shape, check_invariants=False)


class TorchGradientOptimizer:
    """torch's optimizer over ``module``; under torchrun the forward runs through DDP, whose
    constructor broadcasts rank 0's parameters and whose backward averages the gradients.

    Item tables updated row-wise are left out of DDP: their sparse gradients are averaged by
    :func:`average_rows` after the backward. DDP's own sparse all-reduce over gloo corrupts
    memory now and then (a SIGSEGV or a heap-corruption abort: 1 of 60 looped runs of
    ``tests/scripts/joint_steps.py``'s 1,700-step epoch here, torch 2.13; a plain DDP script
    with sparse embeddings crashes the same way), and it is not the same collective on every
    backend."""

    def __init__(self, module: nn.Module, spec: OptimizerSpec, comm: LocalComm) -> None:
        self.module, self.spec, self.comm = module, spec, comm
        named = list(module.named_parameters())
        dense, self.rows = _split_rows(named, spec)
        self.row_params = [p for n, p in named if n in spec.sparse_rows]
        self.net = module
        if comm.world_size > 1:
            self.net = _data_parallel(module, ignore=spec.sparse_rows)
            for p in self.row_params:  # DDP broadcasts only the parameters it holds
                comm.broadcast_(p.data, src=0)
        self.opt = _torch_optimizer(dense, spec)

    def __call__(self, *args, **kwargs) -> Tensor:
        return self.net(*args, **kwargs)

    def update(self, loss: Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        if self.rows is not None:
            self.rows.zero_grad(set_to_none=True)
        loss.backward()  # under DDP: gradients averaged over ranks
        if self.comm.world_size > 1:  # every rank joins, whether its step read the table
            for p in self.row_params:
                grad = p.grad if p.grad is not None else _no_rows(p)
                p.grad, _ = average_rows(grad, self.comm)
        if self.spec.grad_clip > 0 and self.rows is not None:
            clip_grad_norm(list(self.module.parameters()), self.spec.grad_clip)
        elif self.spec.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.spec.grad_clip)
        self.opt.step()
        if self.rows is not None:
            self.rows.step()

    def state_dict(self) -> dict:
        return _rows_state(self.rows, {"optimizer": self.opt.state_dict()})

    def load_state_dict(self, state: dict) -> None:
        if "optimizer" not in state:
            raise ConfigError("cannot resume: last.pt was written by a DeepSpeed engine")
        _load_rows(self.rows, state)
        self.opt.load_state_dict(state["optimizer"])

    def restart(self, lr: float) -> None:
        _restart([self.opt, self.rows], lr)


def _data_parallel(module: nn.Module, ignore: tuple[str, ...] = ()) -> nn.Module:
    """DDP: its constructor broadcasts rank 0's parameters and buffers, and each backward
    all-reduces (averages) the gradients in buckets, overlapped with compute. The parameters
    named in ``ignore`` are neither broadcast nor averaged."""
    from torch.nn.parallel import DistributedDataParallel

    if ignore:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, list(ignore))
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
        named = [(f"{key}.{n}", p) for key, m in modules.items() for n, p in m.named_parameters()]
        self.params = [p for _, p in named]
        self.is_row = [n in spec.sparse_rows for n, _ in named]
        wire = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
        self.wire_dtype = wire[spec.compress]
        self.bytes_sent = 0  # pseudo-gradient bytes put on the wire by this rank
        dense, self.rows = _split_rows(
            named, OptimizerSpec(lr=spec.lr, kind=spec.kind, sparse_rows=spec.sparse_rows)
        )
        self.opt = _torch_optimizer(dense, OptimizerSpec(lr=spec.lr, kind=spec.kind))

    def _wire(self, tensor: Tensor) -> Tensor:
        wired = _on_wire(tensor, self.wire_dtype)
        self.bytes_sent += _nbytes(wired)
        return wired

    def step(self, grads: list[Tensor]) -> None:
        """Average ``grads`` (aligned with the parameters; an item table's may be sparse)
        over processes, then one step."""
        dense = [g for g, row in zip(grads, self.is_row) if not row]
        flat = torch.cat([g.reshape(-1) for g in dense])  # one bucket
        if self.comm.world_size > 1:
            flat = self.comm.all_reduce_mean(self._wire(flat)).to(torch.float32)
        offset = 0
        for p, g, row in zip(self.params, grads, self.is_row):
            if row:
                p.grad, sent = average_rows(g, self.comm, self.wire_dtype)
                self.bytes_sent += sent
                continue
            p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.rows is not None:
            self.rows.step()
            self.rows.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return _rows_state(self.rows, self.opt.state_dict())

    def load_state_dict(self, state: dict) -> None:
        _load_rows(self.rows, state)
        self.opt.load_state_dict({k: v for k, v in state.items() if k != "rows"})

    def restart(self, lr: float) -> None:
        _restart([self.opt, self.rows], lr)


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
        if spec.sparse_rows:
            raise ConfigError("train.item_updates=sparse needs train.engine=plain")
        return EngineGradientOptimizer(module, spec, path=self.path, comm=self.comm)

    def pseudo_gradient_optimizer(
        self, modules: dict[str, nn.Module], spec: OptimizerSpec
    ) -> PseudoGradientOptimizer:
        from dist_tp.parallel.deepspeed_engine import EngineOuter

        if spec.sparse_rows:
            raise ConfigError("train.item_updates=sparse needs train.engine=plain")
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
