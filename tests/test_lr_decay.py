"""``train.lr_decays``: validation out of patience lowers the learning rate instead of
stopping: the best weights come back, the optimizer starts afresh at rate × ``lr_decay``."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import crash_after_checkpoint
from torch import nn

import dist_tp.run.loop as loop
from dist_tp.algorithms.joint import JointStepper
from dist_tp.algorithms.tp.trainer import TPStepper
from dist_tp.config import ConfigError, load_config
from dist_tp.parallel.comm import LocalComm
from dist_tp.parallel.host import (
    OptimizerSpec,
    TorchGradientOptimizer,
    TorchPseudoGradientOptimizer,
)
from dist_tp.run.loop import run_training

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


class Toy(nn.Module):
    """An item table (sparse gradients when ``sparse``: row-wise Adam) and a dense layer."""

    def __init__(self, sparse: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.items = nn.Embedding(20, 4, sparse=sparse)
        self.out = nn.Linear(4, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.items(ids)).pow(2).mean()


class Gradient:
    """Joint training's optimizer over a :class:`Toy`."""

    def __init__(self, toy: Toy, lr: float, rows: tuple[str, ...]) -> None:
        self.toy = toy
        self.opt = TorchGradientOptimizer(toy, OptimizerSpec(lr=lr, sparse_rows=rows), LocalComm())

    def step(self, ids: torch.Tensor) -> None:
        self.opt.update(self.opt(ids))


class Pseudo:
    """TP's outer optimizer over a :class:`Toy`, fed the loss gradient as pseudo-gradient."""

    def __init__(self, toy: Toy, lr: float, rows: tuple[str, ...]) -> None:
        self.toy = toy
        spec = OptimizerSpec(lr=lr, sparse_rows=tuple(f"toy.{n}" for n in rows))
        self.opt = TorchPseudoGradientOptimizer({"toy": toy}, spec, LocalComm())

    def step(self, ids: torch.Tensor) -> None:
        self.opt.step(list(torch.autograd.grad(self.toy(ids), list(self.toy.parameters()))))


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("rows", [(), ("items.weight",)], ids=["dense", "row-wise"])
@pytest.mark.parametrize("kind", [Gradient, Pseudo])
def test_restart_is_a_fresh_optimizer_at_the_new_rate(kind, rows):
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(1, 20, (8,), generator=gen) for _ in range(4)]
    used = kind(Toy(sparse=bool(rows)), 1e-2, rows)
    for ids in batches[:3]:
        used.step(ids)
    kept = copy.deepcopy(used)  # the same weights, its moments kept
    fresh = kind(copy.deepcopy(used.toy), 1e-3, rows)
    used.opt.restart(1e-3)
    for each in (used, kept, fresh):
        each.step(batches[3])
    want = _weights(fresh.toy)
    assert all(torch.equal(value, want[name]) for name, value in _weights(used.toy).items())
    assert not all(torch.equal(value, want[name]) for name, value in _weights(kept.toy).items())
    state = used.opt.state_dict()
    groups = state.get("optimizer", state)["param_groups"]
    assert [group["lr"] for group in groups] == [1e-3]


def test_lr_decay_settings_are_checked():
    with pytest.raises(ConfigError, match="train.lr_decay must be in"):
        load_config(TINY, ["train.lr_decay=1.0"])
    with pytest.raises(ConfigError, match="train.lr_decays must be >= 0"):
        load_config(TINY, ["train.lr_decays=-1"])
    with pytest.raises(ConfigError, match="train.lr_decays needs train.engine=plain"):
        load_config(
            TINY,
            ["train.lr_decays=1", "train.engine=deepspeed", "train.deepspeed=x.json"],
        )


# --------------------------------------------------------------- in the run loop

SCRIPT = [0.10, 0.20, 0.15, 0.30, 0.25, 0.40, 0.50, 0.60]
"""Validation NDCG@10 after each epoch: a stall at epoch 2, then at epoch 4."""


REAL = {
    "evaluate": loop.evaluate,
    JointStepper: JointStepper.run_epoch,
    TPStepper: TPStepper.run_epoch,
}
"""What :class:`Scripted` wraps (each instance wraps these, not another's wrappers)."""


class Scripted:
    """Validation scored by :data:`SCRIPT` (the test split as evaluated for real), and the
    weights each epoch starts from."""

    def __init__(self, monkeypatch, start: int = 0) -> None:
        self.calls, self.starts = start, {}
        real = REAL["evaluate"]

        def evaluate(model, data, splits=("validation", "test"), **kwargs):
            out = real(model, data, splits=splits, **kwargs)
            if splits == ("validation",):
                out["validation"]["existing"]["all"]["NDCG@10"] = SCRIPT[self.calls]
                self.calls += 1
            return out

        monkeypatch.setattr(loop, "evaluate", evaluate)
        for cls in (JointStepper, TPStepper):
            run_epoch = REAL[cls]

            def spy(stepper, epoch, *args, _run=run_epoch, **kwargs):
                self.starts[epoch] = _weights(stepper.model)
                return _run(stepper, epoch, *args, **kwargs)

            monkeypatch.setattr(cls, "run_epoch", spy)


def _cfg(prepared, *overrides: str):
    return load_config(
        TINY,
        [
            f"data.path={prepared('ml-100k')}",
            "train.epochs=8",
            "train.patience=1",
            "train.epoch_steps=3",
            "train.lr=0.01",
            *overrides,
        ],
    )


def _history(out: Path) -> list[dict]:
    return json.loads((out / "history.json").read_text())


@pytest.mark.parametrize("method", ["joint", "tp"])
def test_a_stall_lowers_the_rate_from_the_best_weights_then_stops(
    prepared, tmp_path, monkeypatch, method
):
    extra = ["train.method=tp", "tp.lanes=2"] if method == "tp" else []
    scripted = Scripted(monkeypatch)
    run_training(_cfg(prepared, "train.lr_decays=1", *extra), tmp_path / "decay")
    history = _history(tmp_path / "decay")
    # epoch 2 stalls: decay; epoch 3 is better; epoch 4 stalls with no decay left: stop
    assert [h["epoch"] for h in history] == [0, 1, 2, 3, 4]
    assert [h["lr"] for h in history] == pytest.approx([0.01] * 3 + [0.001] * 2)
    best = torch.load(tmp_path / "decay" / "checkpoint.pt", weights_only=True)
    assert best["epoch"] == 3
    # epoch 3 started from epoch 1's weights (the best then), not from epoch 2's
    after_epoch_1, after_epoch_2 = scripted.starts[2], scripted.starts[3]
    for name, value in after_epoch_1.items():
        assert torch.equal(after_epoch_2[name], value), name
    # without decays the first stall stops the run
    Scripted(monkeypatch)
    run_training(_cfg(prepared, *extra), tmp_path / "constant")
    assert [h["lr"] for h in _history(tmp_path / "constant")] == pytest.approx([0.01] * 3)


def test_a_run_killed_after_a_decay_resumes_at_the_lower_rate(prepared, tmp_path, monkeypatch):
    cfg = _cfg(prepared, "train.lr_decays=1")
    Scripted(monkeypatch)
    whole = run_training(cfg, tmp_path / "whole")
    Scripted(monkeypatch)
    crash_after_checkpoint(
        monkeypatch, lambda folder: run_training(cfg, folder), tmp_path / "killed", epoch=2
    )
    Scripted(monkeypatch, start=3)
    resumed = run_training(cfg, tmp_path / "killed", resume=True)
    assert [h["lr"] for h in _history(tmp_path / "killed")] == pytest.approx(
        [0.01] * 3 + [0.001] * 2
    )
    assert resumed["existing"] == whole["existing"] and resumed["new"] == whole["new"]
    # another number of decays is another run
    with pytest.raises(ConfigError, match="train.lr_decays"):
        run_training(_cfg(prepared, "train.lr_decays=2"), tmp_path / "killed", resume=True)
