"""Joint training under torchrun: DDP and DeepSpeed (ZeRO 0/1/2), and TP with DeepSpeed
hosting the outer Adam; 2 processes on CPU with gloo.

The reference for every joint engine is one process stepping Adam on the union of the two
ranks' mini-batches, step by step; for TP it is the plain engine's 2-rank run (itself equal
to one process with all lanes, see test_distributed.py).
"""

from __future__ import annotations

import json
import subprocess
from itertools import zip_longest
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ENV, REPO, ROW_WISE, tiny_tp_args, torchrun, torchrun_cmd

from dist_tp.algorithms.joint import JointStepper, batch_loss
from dist_tp.config import ConfigError, load_config
from dist_tp.core.seeding import seed_step
from dist_tp.data.examples import Rows, training_rows
from dist_tp.data.stream import load_sequences, open_prepared
from dist_tp.models import build_model
from dist_tp.parallel.comm import LocalComm
from dist_tp.parallel.host import TorchHost

ZERO = {s: f"configs/deepspeed/zero{s}.json" for s in (0, 1, 2)}
# DeepSpeed is installed by launch/setup.sh (CI runs these tests), which also compiles its
# CPU communication op once into the environment's TORCH_EXTENSIONS_DIR


class RankView(LocalComm):
    """Rank ``rank`` of ``world`` for reading its data; its collectives are no-ops."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world_size = rank, world


def _flat(params: dict) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in params.values()])


def _two_rank_views(path: str, *overrides: str):
    """(config, one model with rank 0's initialisation, a stepper reading each of 2 ranks'
    mini-batches of that model)."""
    cfg = load_config(
        "configs/tiny.yaml",
        [f"data.path={path}", "model.dropout=0.0", "train.seed=3", *overrides],
    )
    torch.manual_seed(0)  # rank 0's initialisation
    model = build_model(cfg.model, open_prepared(path).num_items)
    views = [JointStepper(model, cfg, RankView(r, 2), host=TorchHost()) for r in range(2)]
    return cfg, model, views


def _union_reference(path: str, *overrides: str):
    """One process, one epoch: Adam on the union of rank 0's and rank 1's t-th mini-batch."""
    cfg, model, views = _two_rank_views(path, *overrides)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    steps = 0
    for pair in zip_longest(*(v.epoch_batches(0) for v in views)):
        parts = [b for b in pair if b is not None]
        weights = None if parts[0].weights is None else np.concatenate([b.weights for b in parts])
        union = Rows(
            np.concatenate([b.inputs for b in parts]),
            np.concatenate([b.targets for b in parts]),
            weights,
        )
        loss = batch_loss(model, union, cfg, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    return {n: p.detach().clone() for n, p in model.named_parameters()}, steps


@pytest.fixture(scope="module")
def union_reference(prepared):
    return _union_reference(prepared("ml-100k"))


def _joint_run(path: str, out: Path, *overrides: str, env=ENV) -> dict:
    cmd = torchrun_cmd("tests/scripts/joint_steps.py", path, str(out), *overrides)
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    state = torch.load(out, weights_only=True)
    # replicas identical (ranks were initialised differently: rank 0's parameters won)
    flat = _flat(state["params"])
    torch.testing.assert_close(state["sum_over_ranks"], 2 * flat, rtol=0, atol=0)
    return state


def _determined(name: str, value: torch.Tensor) -> torch.Tensor:
    """The parameter without SASRec's key bias: attention is invariant to it (softmax of a
    query's scores shifted by one constant), so its true gradient is 0 and Adam turns the
    rounding noise of any two summation orders into ±lr steps. Every other parameter is
    determined by the data and must agree."""
    if name.endswith("qkv.bias"):
        d = value.shape[0] // 3
        return torch.cat([value[:d], value[2 * d :]])
    return value


def _assert_close_params(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(
            _determined(name, got[name]), _determined(name, value), rtol=1e-5, atol=1e-5
        )


def _assert_matches(state: dict, reference) -> None:
    params, steps = reference
    # the ranks' shares differ, so the lighter rank stepped on idle: the padding is exercised
    assert state["batches"][0] != state["batches"][1]
    assert state["record"]["steps"] == steps == int(state["batches"].max())
    _assert_close_params(state["params"], params)


def test_ddp_epoch_equals_one_process_on_the_union_of_the_ranks_batches(
    prepared, tmp_path, union_reference
):
    state = _joint_run(prepared("ml-100k"), tmp_path / "ddp.pt")
    _assert_matches(state, union_reference)
    existing = load_sequences(prepared("ml-100k"), roles=["existing"])
    rows = training_rows(existing, max_len=10, all_positions=True)
    assert state["record"]["windows"] == int(rows.windows.sum())  # no window dropped


def test_ddp_with_user_balanced_weights_equals_the_union(prepared, tmp_path):
    """Each rank's weighted mean loss, window-weighted across ranks, is the union's."""
    path = prepared("ml-100k")
    state = _joint_run(path, tmp_path / "ddp.pt", "train.balance=user")
    _assert_matches(state, _union_reference(path, "train.balance=user"))


def _per_rank_reference(path: str, *overrides: str):
    """One process, one epoch: at step t, each rank's t-th mini-batch with that rank's own
    negatives (its step seed), their losses weighted by their windows; the host's optimizer
    (row-wise for the item table)."""
    cfg, model, views = _two_rank_views(path, *overrides)
    opt, gen = views[0].opt, torch.Generator()
    steps = 0
    for pair in zip_longest(*(v.epoch_batches(0) for v in views)):
        n_all = sum(int(b.windows.sum()) for b in pair if b is not None)
        loss = 0.0
        for rank, mb in enumerate(pair):
            if mb is None:
                continue
            (negatives,) = seed_step(cfg.train.seed, 0, steps, rank, extra=1)
            gen.manual_seed(negatives)
            part = opt(torch.as_tensor(mb.inputs), torch.as_tensor(mb.targets), generator=gen)
            loss = loss + part * int(mb.windows.sum()) / n_all
        opt.update(loss)
        steps += 1
    return {n: p.detach().clone() for n, p in model.named_parameters()}, steps


def test_ddp_with_row_wise_item_updates_equals_the_ranks_steps_in_one_process(prepared, tmp_path):
    """Sparse item-table gradients averaged by the host's all-gather of touched rows (DDP
    holds the dense parameters only: its sparse all-reduce over gloo corrupts memory now and
    then), then the row-wise Adam: the same parameters as one process stepping on both
    ranks' losses (an idle rank's zero-weight rows touch nothing)."""
    path = prepared("ml-100k")
    state = _joint_run(path, tmp_path / "rows.pt", *ROW_WISE)
    ignored = [name.removeprefix("model.") for name in state["ddp_ignores"]]
    assert ignored == sorted(state["tables"]) == ["item_emb.weight"]
    reference = _per_rank_reference(path, *ROW_WISE)
    _assert_matches(state, reference)


def test_row_averages_join_ranks_whose_step_touched_no_row(tmp_path):
    """The item tables' all-gather of touched rows: a rank with no rows still takes part
    (one collective sequence on every rank), duplicates are summed, the sum is halved."""
    out = tmp_path / "rows.pt"
    cmd = torchrun_cmd("tests/scripts/row_average.py", str(out))
    res = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    state = torch.load(out, weights_only=True)
    expected = torch.zeros(5, 2)
    expected[1], expected[3] = torch.tensor([1.5, 2.0]), torch.tensor([3.0, 4.0])
    torch.testing.assert_close(state["some"], expected, rtol=0, atol=0)
    assert state["nnz"] == 0 and not state["none"].any()


def test_cli_joint_under_torchrun_writes_the_run_folder(prepared, tmp_path):
    """At lr 1e-12 nothing moves, so every validation after the first is no better: epoch 1
    lowers the rate (the ranks restore the best weights together), epoch 2 stops the run."""
    out = tmp_path / "run"
    args = ["configs/tiny.yaml", f"data.path={prepared('ml-100k')}", "train.epochs=5"]
    decay = ["train.lr=1e-12", "train.patience=1", "train.lr_decays=1"]
    torchrun(2, "-m", "dist_tp", "train", *args, *decay, "--output", str(out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["existing"]["all"]["users"] == 754 and metrics["new"]["all"]["users"] == 189
    history = json.loads((out / "history.json").read_text())
    existing = load_sequences(prepared("ml-100k"), roles=["existing"])
    rows = training_rows(existing, max_len=10, all_positions=True)
    assert history[0]["windows"] == int(rows.windows.sum())
    assert [h["lr"] for h in history] == pytest.approx([1e-12, 1e-12, 1e-13])
    assert (out / "checkpoint.pt").is_file() and (out / "last.pt").is_file()


# ---------------------------------------------------------------- DeepSpeed


def test_deepspeed_config_errors_name_the_key_and_file(tmp_path, prepared, monkeypatch):
    from dist_tp.parallel.deepspeed_engine import read_config

    with pytest.raises(ConfigError, match="train.engine must be"):
        load_config("configs/tiny.yaml", ["train.engine=ds"])
    with pytest.raises(ConfigError, match="train.deepspeed=FILE.json"):
        load_config("configs/tiny.yaml", ["train.engine=deepspeed"])
    with pytest.raises(ConfigError, match="train.deepspeed: expected str"):
        load_config("configs/tiny.yaml", ["train.deepspeed=3"])
    with pytest.raises(ConfigError, match="train.deepspeed: cannot read .*nope.json"):
        read_config(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{stage: 1")
    with pytest.raises(ConfigError, match="bad.json is not valid JSON"):
        read_config(str(bad))
    bad.write_text('{"optimizer": {"type": "Adam"}, "train_batch_size": 8}')
    with pytest.raises(ConfigError, match="sets optimizer, train_batch_size; the run config"):
        read_config(str(bad))
    bad.write_text('{"zero_optimization": {"stage": 3}}')
    with pytest.raises(ConfigError, match="stage must be 0, 1 or 2, got 3"):
        read_config(str(bad))
    for stage, file in ZERO.items():
        assert read_config(file)["zero_optimization"]["stage"] == stage
    # outside torchrun: one clear line instead of DeepSpeed's MPI discovery
    monkeypatch.delenv("RANK", raising=False)
    from dist_tp.run.loop import run_training

    cfg = load_config(
        "configs/tiny.yaml",
        [
            f"data.path={prepared('ml-100k')}",
            "train.engine=deepspeed",
            f"train.deepspeed={ZERO[1]}",
        ],
    )
    with pytest.raises(ConfigError, match="runs under torchrun"):
        run_training(cfg, tmp_path / "run")


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_deepspeed_joint_equals_one_process_on_the_union(
    prepared, tmp_path, union_reference, stage
):
    engine = ["train.engine=deepspeed", f"train.deepspeed={ZERO[stage]}"]
    state = _joint_run(prepared("ml-100k"), tmp_path / "ds.pt", *engine, env=ENV)
    _assert_matches(state, union_reference)


@pytest.fixture(scope="module")
def plain_tp(prepared, tmp_path_factory) -> dict:
    """3 outer steps of TP on 2 ranks × 2 lanes with the plain outer update."""
    out = tmp_path_factory.mktemp("plain-tp") / "plain.pt"
    torchrun(2, "tests/scripts/tp_steps.py", prepared("ml-100k"), str(out), "2", "3")
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("stage", [0, 2])
def test_deepspeed_tp_outer_step_equals_the_plain_outer_update(prepared, tmp_path, plain_tp, stage):
    engine = ["train.engine=deepspeed", f"train.deepspeed={ZERO[stage]}"]
    out = tmp_path / "ds.pt"
    torchrun(2, "tests/scripts/tp_steps.py", prepared("ml-100k"), str(out), "2", "3", *engine)
    ds = torch.load(out, weights_only=True)
    torch.testing.assert_close(ds["sum_over_ranks"], 2 * _flat(ds["params"]), rtol=0, atol=0)
    _assert_close_params(ds["params"], plain_tp["params"])


@pytest.mark.parametrize("method,stage", [("tp", 1), ("joint", 2)])
def test_deepspeed_zero_run_resumes_exactly(prepared, tmp_path, method, stage):
    """1 epoch, then --resume to 2, equals 2 epochs straight: each rank's ZeRO partition
    (Adam's state, fp32 masters) goes through rank 0's last.pt and back to its rank."""
    args = tiny_tp_args(
        prepared("ml-100k"),
        "train.engine=deepspeed",
        f"train.deepspeed={ZERO[stage]}",
        f"train.method={method}",
        "train.patience=9",
        "train.epoch_steps=6",  # the resume is at an epoch's end: a part of a pass will do
        "track.enabled=false",
    )
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    torchrun(2, *args, "train.epochs=2", "--output", str(straight))
    torchrun(2, *args, "train.epochs=1", "--output", str(resumed))
    key = "outer" if method == "tp" else "engine"
    saved = torch.load(resumed / "last.pt", weights_only=True)["stepper"][key]
    assert saved["zero_stage"] == stage and len(saved["partitions"]) == 2
    if method == "tp":  # another number of ranks cannot take the partitions back
        cmd = torchrun_cmd(*args, "train.epochs=2", "--output", str(resumed), "--resume", nproc=1)
        res = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
        assert res.returncode != 0
        assert "partitions of 2 ranks; start it again with 2 ranks" in res.stdout + res.stderr
    torchrun(2, *args, "train.epochs=2", "--output", str(resumed), "--resume")
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(resumed / "last.pt", weights_only=True)
    assert len(a["history"]) == len(b["history"]) == 2
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=0, atol=1e-6)
    for part_a, part_b in zip(a["stepper"][key]["partitions"], b["stepper"][key]["partitions"]):
        for x, y in zip(
            part_a["single_partition_of_fp32_groups"], part_b["single_partition_of_fp32_groups"]
        ):
            torch.testing.assert_close(y, x, rtol=0, atol=1e-6)
    ma = json.loads((straight / "metrics.json").read_text())
    mb = json.loads((resumed / "metrics.json").read_text())
    assert mb["existing"]["all"]["HR@10"] == pytest.approx(ma["existing"]["all"]["HR@10"], abs=1e-9)
