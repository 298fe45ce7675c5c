"""DeepSpeed engines behind the optimizer host (``train.engine: deepspeed``); only
:mod:`dist_tp.parallel.host` builds them.

The JSON named by ``train.deepspeed`` holds the ZeRO stage (0, 1 or 2) and engine options.
This module adds what the run config owns: Adam with its learning rate and weight decay
(torch's implementation, ``torch_adam``, so no fused kernel is built on CPU), one
micro-batch per optimizer step (the trainers form their own mini-batches) and gradient
clipping. The engine's constructor broadcasts rank 0's parameters.

- Joint training: the engine wraps the loss module; ``engine.backward`` averages the
  gradients over ranks like DDP and ``engine.step`` runs Adam (its state partitioned across
  ranks under ZeRO-1/2, the gradients too under ZeRO-2).
- TP (:class:`EngineOuter`): the inner steps run outside the engine on plain tensors. The
  outer step hands the engine the surrogate Σ_p ⟨p, g_p⟩ with g = Θ − θ_k detached; its
  gradient with respect to p is exactly g, the engine's reduction averages it over ranks,
  and ``engine.step`` applies Adam: the update of the plain host's pseudo-gradient optimizer.

On CPU DeepSpeed picks its CPU accelerator and, on first use, compiles a shared-memory
communication op (about a minute on 2 cores), cached in ``TORCH_EXTENSIONS_DIR``: by default
here a folder of the virtual environment, so it is built once per environment.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from dist_tp.config import ConfigError
from dist_tp.parallel.comm import LocalComm

log = logging.getLogger(__name__)

# keys of the DeepSpeed JSON that the run config owns
OWNED = (
    "optimizer",
    "scheduler",
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
)


NO_RESTART = "train.lr_decays needs train.engine=plain: a DeepSpeed engine's optimizer is its own"


def read_config(path: str) -> dict:
    """The DeepSpeed JSON at ``path`` (``train.deepspeed``), checked."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"train.deepspeed: cannot read {path}: {exc.strerror}") from exc
    try:
        ds = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"train.deepspeed: {path} is not valid JSON: {exc}") from exc
    if not isinstance(ds, dict):
        raise ConfigError(f"train.deepspeed: {path}: the top level must be an object")
    owned = sorted(set(ds) & set(OWNED))
    if owned:
        raise ConfigError(
            f"train.deepspeed: {path} sets {', '.join(owned)}; the run config owns these "
            "(train.lr, tp.outer_lr, train.weight_decay, train.batch_size, train.grad_clip)"
        )
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else zero
    if stage not in (0, 1, 2) or isinstance(stage, bool):
        raise ConfigError(
            f"train.deepspeed: {path}: zero_optimization.stage must be 0, 1 or 2, got "
            f"{stage!r} (ZeRO-3 partitions the parameters, which the TP inner loop and the "
            "evaluation read whole)"
        )
    return ds


def engine_config(ds: dict, *, lr: float, weight_decay: float, grad_clip: float) -> dict:
    """The JSON plus what the run config owns."""
    return {
        "steps_per_print": 1 << 30,  # no periodic step logging unless the JSON asks for it
        **ds,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "optimizer": {
            "type": "Adam",
            # torch.optim.Adam (L2 weight decay, not AdamW): the plain engine's optimizer
            "params": {
                "lr": lr,
                "weight_decay": weight_decay,
                "torch_adam": True,
                "adam_w_mode": False,
            },
        },
    }


def default_extensions_dir() -> None:
    """Keep DeepSpeed's compiled ops with the virtual environment that built them."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ and sys.prefix != sys.base_prefix:
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")


def import_deepspeed():
    default_extensions_dir()
    try:
        import deepspeed
    except ImportError as exc:
        raise ConfigError(
            "train.engine=deepspeed needs DeepSpeed: pip install 'dist_tp[deepspeed]'"
        ) from exc
    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


def build_ops() -> None:
    """Compile (or load from the cache) the op DeepSpeed's CPU communication uses."""
    deepspeed = import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        builder.load()


class Engine:
    """A DeepSpeed engine around ``module`` with Adam over all of its parameters."""

    def __init__(
        self,
        module: nn.Module,
        *,
        path: str,
        lr: float,
        weight_decay: float = 0.0,
        grad_clip: float = 0.0,
        comm=None,
    ) -> None:
        if "RANK" not in os.environ:
            raise ConfigError(
                "train.engine=deepspeed runs under torchrun: "
                "torchrun --nproc-per-node N -m dist_tp train ... (N may be 1)"
            )
        ds = read_config(path)
        self.path, self.comm = path, comm or LocalComm()
        self.zero_stage = ds.get("zero_optimization", {}).get("stage", 0)
        deepspeed = import_deepspeed()
        config = engine_config(ds, lr=lr, weight_decay=weight_decay, grad_clip=grad_clip)
        self.engine, *_ = deepspeed.initialize(
            model=module, model_parameters=list(module.parameters()), config=config
        )

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def update(self, loss: Tensor) -> None:
        """Backward (gradients averaged over ranks), clip, optimizer step, zero the grads."""
        self.engine.backward(loss)
        self.engine.step()

    def state_dict(self) -> dict:
        """The optimizer state; a collective under ZeRO-1/2 (call it on every rank): each
        rank's partition is gathered, and rank 0's dict holds them all, in rank order."""
        if self.zero_stage == 0:
            return {"zero_stage": 0, "optimizer": self.engine.optimizer.state_dict()}
        local = plain_zero_state(self.engine.optimizer.state_dict())
        return {"zero_stage": self.zero_stage, "partitions": self.comm.gather_object(local)}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("zero_stage")
        if saved != self.zero_stage:
            raise ConfigError(
                f"cannot resume: last.pt holds a ZeRO-{saved} optimizer state and this run's "
                f"DeepSpeed config ({self.path}) asks for ZeRO-{self.zero_stage}"
            )
        if self.zero_stage == 0:
            self.engine.optimizer.load_state_dict(state["optimizer"])
            return
        parts = state["partitions"]
        if len(parts) != self.comm.world_size:
            raise ConfigError(
                f"cannot resume: last.pt holds ZeRO-{saved} partitions of {len(parts)} ranks; "
                f"start it again with {len(parts)} ranks (--nproc-per-node x nodes)"
            )
        # each rank takes its own partition; the fp32 master copies are restored exactly
        self.engine.optimizer.load_state_dict(
            parts, load_optimizer_states=True, load_from_fp32_weights=True
        )


def plain_zero_state(state: dict) -> dict:
    """The part of a ZeRO-1/2 optimizer's ``state_dict()`` that resuming needs, as tensors
    and plain values only (it must load with ``weights_only=True``): Adam's state of this
    rank's partition and the partition's fp32 master weights. Left out: the loss scaler
    object (static, 1.0, in fp32 training) and the slice mappings (universal checkpoints)."""
    from deepspeed.checkpoint.constants import (
        BASE_OPTIMIZER_STATE,
        CLIP_GRAD,
        DS_VERSION,
        SINGLE_PARTITION_OF_FP32_GROUPS,
    )

    if not isinstance(state[BASE_OPTIMIZER_STATE], dict):
        raise ConfigError("cannot checkpoint ZeRO with elastic_checkpoint on: turn it off")
    plain = {
        BASE_OPTIMIZER_STATE: state[BASE_OPTIMIZER_STATE],
        SINGLE_PARTITION_OF_FP32_GROUPS: [
            t.detach().cpu() for t in state[SINGLE_PARTITION_OF_FP32_GROUPS]
        ],
        DS_VERSION: str(state[DS_VERSION]),
        "dynamic_loss_scale": bool(state.get("dynamic_loss_scale", False)),
        "overflow": bool(state.get("overflow", False)),
    }
    if isinstance(state.get(CLIP_GRAD), (int, float)):
        plain[CLIP_GRAD] = float(state[CLIP_GRAD])
    return plain


class EngineGradientOptimizer:
    """The host's gradient optimizer (:mod:`dist_tp.parallel.host`) on a DeepSpeed engine
    around the loss module ``module``; ``spec`` holds Adam's lr, weight decay and clipping."""

    def __init__(self, module: nn.Module, spec, *, path: str, comm=None) -> None:
        self.engine = Engine(
            module,
            path=path,
            lr=spec.lr,
            weight_decay=spec.weight_decay,
            grad_clip=spec.grad_clip,
            comm=comm,
        )

    def __call__(self, *args, **kwargs) -> Tensor:
        return self.engine(*args, **kwargs)

    def update(self, loss: Tensor) -> None:
        self.engine.update(loss)  # reduce, clip, step, zero the grads

    def state_dict(self) -> dict:
        return {"engine": self.engine.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "engine" not in state:
            raise ConfigError("cannot resume: last.pt was written without DeepSpeed")
        self.engine.load_state_dict(state["engine"])

    def restart(self, lr: float) -> None:
        raise ConfigError(NO_RESTART)


class _Surrogate(nn.Module):
    """Σ_p ⟨p, g_p⟩ over the parameters of ``modules``: its gradient is exactly g."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(modules)

    def forward(self, grads: list[Tensor]) -> Tensor:
        params = list(self.parameters())
        assert len(params) == len(grads), (len(params), len(grads))
        return sum((p * g.detach()).sum() for p, g in zip(params, grads))


class EngineOuter:
    """The TP outer update's interface (``step(grads)``), DeepSpeed hosting the outer Adam.

    ``grads`` are aligned with the parameters of ``modules`` in order (the model's, then the
    discriminator's), which the modules themselves still hold as Θ after the inner loops.
    """

    def __init__(self, modules: dict[str, nn.Module], *, path: str, lr: float, comm=None) -> None:
        self.engine = Engine(_Surrogate(modules), path=path, lr=lr, comm=comm)
        self.bytes_sent = 0  # the engine's own reduction is not counted

    def step(self, grads: list[Tensor]) -> None:
        self.engine.update(self.engine([g.to(torch.float32) for g in grads]))

    def state_dict(self) -> dict:
        return self.engine.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.engine.load_state_dict(state)

    def restart(self, lr: float) -> None:
        raise ConfigError(NO_RESTART)
