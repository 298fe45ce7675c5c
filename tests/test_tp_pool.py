"""TP with ``tp.pool_users``: each rank holds a bounded pool of its own users, refilled from
its row groups as the epoch goes on; the pools cover the ranks' users disjointly, a mid-epoch
resume reads only the pool in use, and two ranks under torchrun stay replicas."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from helpers import TINY, torchrun

from dist_tp.algorithms.tp.pool import BATCHES_PER_POOL
from dist_tp.algorithms.tp.trainer import TPStepper
from dist_tp.config import ConfigError, load_config
from dist_tp.data.stream import open_prepared
from dist_tp.models import build_model
from dist_tp.parallel.comm import LocalComm
from dist_tp.parallel.host import TorchHost


class RankView(LocalComm):
    """Rank ``rank`` of ``world`` for reading its data; its collectives are no-ops."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world_size = rank, world


def _stepper(path: str, *overrides: str, comm=None, seed: int = 0) -> TPStepper:
    cfg = load_config(TINY, [f"data.path={path}", "train.method=tp", "tp.lanes=2", *overrides])
    torch.manual_seed(seed)
    model = build_model(cfg.model, open_prepared(path).num_items)
    return TPStepper(model, cfg, comm, host=TorchHost())


def _epoch_pools(stepper: TPStepper, epoch: int) -> list:
    """Every pool of ``epoch``, in order: (first step, end step, users)."""
    pools, step, steps = [], 0, stepper.steps_per_pass
    while step < steps:
        pool = stepper.pools.pool_at(epoch, step, steps)
        pools.append((pool.cursor.first_step, pool.end_step, pool.users.copy()))
        step = pool.end_step
    return pools


def test_pool_users_must_not_be_negative():
    with pytest.raises(ConfigError, match="tp.pool_users"):
        load_config(None, ["tp.pool_users=-1"])


def test_pools_are_bounded_and_cover_each_ranks_users_disjointly(prepared):
    path = prepared("ml-100k")
    P = 40
    users, lengths = open_prepared(path).lengths(["existing"])
    trainable = set(users[lengths >= 4].tolist())  # >= 1 training window
    whole = _stepper(path)
    assert whole.pools is None
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            stepper = _stepper(path, f"tp.pool_users={P}", comm=RankView(rank, 2))
            assert stepper.sampler is None  # no sampler of the rank's whole share
            pools = _epoch_pools(stepper, epoch)
            assert pools[0][0] == 0 and pools[-1][1] == stepper.steps_per_pass
            assert all(a[1] == b[0] for a, b in zip(pools, pools[1:]))  # consecutive steps
            assert all(end > first for first, end, _ in pools)
            # P users, overshot by less than one batch of ceil(P / 4) rows
            assert all(len(u) < P + -(-P // BATCHES_PER_POOL) for *_, u in pools[:-1])
            assert len(pools) > 2
            mine = np.concatenate([u for *_, u in pools]).tolist()
            assert len(mine) == len(set(mine))  # each user once in the epoch
            seen.append(set(mine))
        assert not seen[0] & seen[1]  # disjoint ranks
        assert seen[0] | seen[1] == trainable  # together every trainable user
    # an epoch has as many steps as with every user loaded
    streamed = _stepper(path, f"tp.pool_users={P}")
    assert streamed.steps_per_epoch == whole.steps_per_epoch
    streamed.outer_step(0, 0)
    assert len(streamed.pools.current) < P + -(-P // BATCHES_PER_POOL)
    # an epoch cut short by train.epoch_steps still spreads the pools over a whole pass
    short = _stepper(path, f"tp.pool_users={P}", "train.epoch_steps=3")
    assert short.steps_per_epoch == 3 and short.steps_per_pass == whole.steps_per_epoch


def _state(stepper: TPStepper) -> dict:
    """The stepper's and its modules' states, through torch.save as a checkpoint does."""
    state = {"stepper": stepper.state_dict()}
    state.update({n: m.state_dict() for n, m in stepper.modules().items()})
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _params(stepper: TPStepper) -> dict:
    return {
        f"{name}.{n}": p.detach().clone()
        for name, module in stepper.modules().items()
        for n, p in module.named_parameters()
    }


def test_mid_epoch_resume_with_pools_equals_the_straight_run(prepared):
    """Pools of 2 users (a step or two each); checkpoints inside a pool and at a pool's end.
    The resumed stepper (another initialisation, overwritten by the checkpoint) reads the
    pool in use at the checkpoint and what follows, nothing before."""
    path = prepared("ml-100k")
    overrides = ("tp.pool_users=2", "tp.user_sampling=windows", "train.loss=bce")
    straight = _stepper(path, *overrides)
    pools = _epoch_pools(straight, 0)
    inside = next(first + 1 for first, end, _ in pools if first > 0 and end - first > 1)
    boundary = next(first for first, _, _ in pools if first > inside)
    steps = boundary + 2
    for step in range(steps):
        straight.outer_step(0, step)
    expected = _params(straight)
    for at, reads in ((inside, 1), (boundary, 2)):
        first = _stepper(path, *overrides)
        for step in range(at):
            first.outer_step(0, step)
        state = _state(first)
        resumed = _stepper(path, *overrides, seed=1)
        for name, module in resumed.modules().items():
            module.load_state_dict(state[name])
        resumed.load_state_dict(state["stepper"])
        resumed.outer_step(0, at)
        assert resumed.pools.reads == reads  # the checkpoint's pool (and the next one)
        for step in range(at + 1, steps):
            resumed.outer_step(0, step)
        for name, value in _params(resumed).items():
            torch.testing.assert_close(value, expected[name], rtol=0, atol=0)


def test_two_ranks_with_pools_stay_replicas(prepared, tmp_path):
    path = prepared("ml-100k")
    out = tmp_path / "dist.pt"
    torchrun(2, "tests/scripts/tp_steps.py", path, str(out), "2", "3", "tp.pool_users=50")
    dist = torch.load(out, weights_only=True)
    flat = torch.cat([p.reshape(-1) for p in dist["params"].values()])
    torch.testing.assert_close(dist["sum_over_ranks"], 2 * flat, rtol=0, atol=1e-6)


def test_each_rank_resumes_from_its_own_pool(prepared):
    """A checkpoint holds every rank's pool (gathered, in rank order); rank 1 of 2 resumes
    from its own entry (one read: the pool in use), not from rank 0's."""
    path = prepared("ml-100k")
    overrides = ("tp.pool_users=2",)
    at, steps = 3, 5
    views = [_stepper(path, *overrides, comm=RankView(r, 2)) for r in (0, 1)]
    states = []
    for view in views:
        for step in range(at):
            view.outer_step(0, step)
        states.append(_state(view))
    assert states[0]["stepper"]["pools"] != states[1]["stepper"]["pools"]
    state = states[1]
    state["stepper"]["pools"] = [s["stepper"]["pools"][0] for s in states]
    resumed = _stepper(path, *overrides, comm=RankView(1, 2), seed=1)
    for name, module in resumed.modules().items():
        module.load_state_dict(state[name])
    resumed.load_state_dict(state["stepper"])
    for step in range(at, steps):
        views[1].outer_step(0, step)
        resumed.outer_step(0, step)
    assert resumed.pools.current.cursor == views[1].pools.current.cursor
    assert resumed.pools.reads == 1 + sum(
        1 for first, _, _ in _epoch_pools(views[1], 0) if at <= first < steps
    )
    for name, value in _params(resumed).items():
        torch.testing.assert_close(value, _params(views[1])[name], rtol=0, atol=0)
