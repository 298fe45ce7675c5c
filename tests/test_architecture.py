"""The architecture's promises, checked: distribution is applied from outside the algorithms,
the run loop owns the run's state, TP uses the model's own loss, and a run opens its
prepared data once."""

from __future__ import annotations

import ast
import copy
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_tp.algorithms import METHODS, Stepper
from dist_tp.algorithms.joint import JointStepper, batch_loss
from dist_tp.algorithms.tp.lanes import InnerLoop
from dist_tp.algorithms.tp.sampler import TaskSampler
from dist_tp.algorithms.tp.trainer import TPStepper
from dist_tp.config import load_config
from dist_tp.data.examples import training_rows
from dist_tp.data.stream import load_sequences, open_prepared
from dist_tp.models import build_model
from dist_tp.models.scoring import Recommender

PACKAGE = Path(__file__).resolve().parents[1] / "dist_tp"
TINY = "configs/tiny.yaml"
ENGINE_NAMES = ("deepspeed", "DistributedDataParallel", "torch.distributed", "torch.nn.parallel")


def _modules() -> dict[str, ast.Module]:
    return {
        str(path.relative_to(PACKAGE.parent)): ast.parse(path.read_text())
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def _imports(tree: ast.Module) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def test_only_the_parallel_room_imports_engines_or_torch_distributed():
    offenders = {
        name: [i for i in _imports(tree) if any(e in i for e in ENGINE_NAMES)]
        for name, tree in _modules().items()
        if not name.startswith("dist_tp/parallel/")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_algorithms_have_no_engine_branch():
    """joint.py and tp/ never ask which engine runs them (``train.engine``)."""
    for name, tree in _modules().items():
        if name.startswith("dist_tp/algorithms/"):
            attributes = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
            constants = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)}
            assert "engine" not in attributes, name
            assert "deepspeed" not in constants, name


def test_one_module_names_last_pt_and_cmd_train_is_short():
    owners = [
        name
        for name, tree in _modules().items()
        if any(isinstance(n, ast.Constant) and n.value == "last.pt" for n in ast.walk(tree))
    ]
    assert owners == ["dist_tp/run/checkpoints.py"]
    from dist_tp.cli import cmd_train

    assert len(inspect.getsource(cmd_train).splitlines()) <= 30


def test_both_methods_implement_the_stepper_interface(prepared):
    cfg = load_config(TINY, [f"data.path={prepared('ml-100k')}"])
    model = build_model(cfg.model, open_prepared(cfg.data.path).num_items)
    assert set(METHODS) == {"joint", "tp"}
    for stepper in (JointStepper(model, cfg), TPStepper(model, cfg)):
        assert isinstance(stepper, Stepper)


def _scaled_loss(monkeypatch, factor: float) -> list[str]:
    """Recommender.loss, times ``factor``; returns the kinds it was called with."""
    calls: list[str] = []
    original = Recommender.loss

    def scaled(self, *args, **kwargs):
        calls.append(kwargs["kind"])
        return factor * original(self, *args, **kwargs)

    monkeypatch.setattr(Recommender, "loss", scaled)
    return calls


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_a_change_to_the_shared_loss_reaches_joint_training_and_tp(prepared, monkeypatch, loss):
    """Scaling the model's loss by 3 triples the joint loss and TP's pseudo-gradient (k = 1,
    no discriminator: Θ − θ_1 = α ∇L): both methods go through ``Recommender.loss``."""
    path = prepared("ml-100k")
    cfg = load_config(
        TINY, [f"data.path={path}", "model.dropout=0.0", f"train.loss={loss}", "tp.k=1"]
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, open_prepared(path).num_items)
    seqs = load_sequences(path, roles=["existing"])
    rows = training_rows(seqs, max_len=cfg.model.max_len, all_positions=True)
    sampler = TaskSampler(seqs, max_len=cfg.model.max_len)
    batch = sampler.sample(
        [np.random.default_rng(m) for m in range(2)],
        k=1,
        users_per_step=1,
        inner_batch=4,
        num_negatives=2 if loss == "bce" else 0,
        num_items=model.num_items,
        all_positions=True,
    )

    def figures():
        joint = batch_loss(model, rows.take(np.arange(16)), cfg, torch.Generator().manual_seed(1))
        inner = InnerLoop(model, None, loss=loss, inner_lr=0.1, lambda_adv=0.0)
        grads, _, _ = inner.pseudo_gradients(copy.deepcopy(batch))
        return joint.detach(), torch.cat([g.reshape(-1) for g in grads.values()])

    joint, tp = figures()
    calls = _scaled_loss(monkeypatch, 3.0)
    joint3, tp3 = figures()
    assert calls.count(loss) >= 2  # joint training's call and the vmapped inner step's
    torch.testing.assert_close(joint3, 3 * joint)
    torch.testing.assert_close(tp3, 3 * tp, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("method", ["joint", "tp"])
def test_a_run_opens_its_prepared_data_once(prepared, tmp_path, monkeypatch, method):
    """One ``open_prepared`` per run, and every reader (training stream, evaluation, TP's
    sampler, the discriminator's figures) reads through that one handle."""
    import dist_tp.data.stream as stream
    from dist_tp.run.loop import run_training

    opened, handles = [], set()
    real_open, real_init = stream.open_prepared, stream.UserStream.__init__

    def counting_open(path):
        opened.append(path)
        return real_open(path)

    def recording_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        handles.add(id(self.prepared))

    monkeypatch.setattr(stream, "open_prepared", counting_open)
    monkeypatch.setattr(stream.UserStream, "__init__", recording_init)
    cfg = load_config(
        TINY,
        [f"data.path={prepared('ml-100k')}", "train.epochs=1", f"train.method={method}"]
        + (["tp.lanes=2", "tp.k=1", "train.epoch_steps=40"] if method == "tp" else []),
    )
    run_training(cfg, tmp_path / "run")
    assert len(opened) == 1 and len(handles) == 1
