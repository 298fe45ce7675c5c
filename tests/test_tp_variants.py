"""TP's variants: distinct windows for short users, one user per lane for all k steps
(``tp.same_user``), users drawn in proportion to n_u^γ, the pseudo-gradient divided by α
(``tp.normalize``), the last step's gradient alone as the pseudo-gradient
(``tp.outer_gradient=query``), TP's outer learning rate tied to ``train.lr``, and joint training's
``train.balance=power``."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import NUM_ITEMS, tp_config, tp_sampler, tp_setup

from dist_tp.algorithms.joint import JointStepper
from dist_tp.algorithms.tp.lanes import InnerLoop
from dist_tp.algorithms.tp.trainer import TPStepper
from dist_tp.config import ConfigError, load_config
from dist_tp.data.examples import training_rows
from dist_tp.data.stream import open_prepared
from dist_tp.models import build_model


def _sample(sampler, lanes=1, seed=0, **kwargs):
    defaults = dict(k=3, users_per_step=1, inner_batch=8, num_negatives=2, num_items=NUM_ITEMS)
    return sampler.sample(
        [np.random.default_rng([seed, m]) for m in range(lanes)], **{**defaults, **kwargs}
    )


def test_distinct_windows_give_a_short_user_each_of_its_windows_once():
    sampler = tp_sampler()
    short = int(np.argmin(sampler.n_windows))
    n = int(sampler.n_windows[short])
    assert n < 8  # the test needs a user with fewer windows than K
    batch = _sample(sampler, lane_users=[np.array([short])], distinct=True)
    for s in range(3):
        w = batch.weights[0, s]
        real = batch.targets[0, s][w > 0]
        # the user's n windows (distinct targets, each at weight K / n), the rest at weight 0
        assert len(real) == n and (w[w > 0] == pytest.approx(8 / n))
        ends = {tuple(x) for x in batch.windows[0, s][w > 0]}
        assert len(ends) == n
        assert w.sum() == pytest.approx(8)
    # without it: K draws with replacement and no weights (the paper)
    assert _sample(sampler, lane_users=[np.array([short])]).weights is None


def test_distinct_windows_leave_long_users_as_before():
    sampler = tp_sampler()
    long = int(np.argmax(sampler.n_windows))
    assert sampler.n_windows[long] >= 4
    a = _sample(sampler, lane_users=[np.array([long])], inner_batch=4, distinct=True)
    b = _sample(sampler, lane_users=[np.array([long])], inner_batch=4)
    assert np.array_equal(a.windows, b.windows) and (a.weights == 1).all()


def test_same_user_keeps_a_lanes_users_for_all_k_steps():
    sampler = tp_sampler()
    batch = _sample(sampler, lanes=6, k=4, users_per_step=2, same_user=True)
    assert (batch.users == batch.users[:, :1]).all()
    assert len(np.unique(batch.users[:, 0])) > 1  # lanes still differ
    other = _sample(sampler, lanes=6, k=4, users_per_step=2)
    assert not (other.users == other.users[:, :1]).all()
    # the steps draw fresh windows of that user
    assert not np.array_equal(batch.targets[:, 0], batch.targets[:, 1])


def _positions(batch, s):
    """The sampled windows of lane 0's step s, as a list of tuples (one per window)."""
    return [tuple(w) for w in batch.windows[0, s]]


def test_disjoint_steps_give_a_user_new_windows_at_each_step():
    sampler = tp_sampler()
    long = int(np.argmax(sampler.n_windows))
    assert sampler.n_windows[long] >= 9  # k·K = 3 × 3 windows fit
    kwargs = dict(lane_users=[np.array([long])], inner_batch=3, same_user=True, distinct=True)
    batch = _sample(sampler, disjoint_steps=True, **kwargs)
    seen = [set(_positions(batch, s)) for s in range(3)]
    assert all(len(x) == 3 for x in seen)  # no window twice within a step
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert (batch.weights == 1).all()
    # the same user's independent draws per step do overlap here (the draw this replaces)
    overlaps = 0
    for seed in range(20):
        plain = _sample(sampler, seed=seed, **kwargs)
        overlaps += bool(set(_positions(plain, 0)) & set(_positions(plain, 2)))
    assert overlaps > 0


def test_disjoint_steps_of_a_short_user_weigh_its_windows_alike():
    sampler = tp_sampler()
    short = int(np.argmin(sampler.n_windows))
    n = int(sampler.n_windows[short])
    assert n < 8
    batch = _sample(
        sampler, lane_users=[np.array([short])], same_user=True, distinct=True, disjoint_steps=True
    )
    for s in range(3):
        w = batch.weights[0, s]
        assert w.sum() == pytest.approx(8)
        per_window: dict = {}
        for x, weight in zip(_positions(batch, s), w):
            per_window[x] = per_window.get(x, 0.0) + weight
        assert len(per_window) == n  # every window of the user, each at K / n
        assert np.allclose(list(per_window.values()), 8 / n)
    with pytest.raises(ValueError, match="same_user"):
        _sample(sampler, disjoint_steps=True)


def test_users_are_drawn_in_proportion_to_a_power_of_their_windows():
    sampler = tp_sampler()
    n = sampler.n_windows.astype(float)
    draws = 40_000
    batch = _sample(sampler, k=draws, inner_batch=1, num_negatives=0, user_power=0.5)
    freq = np.bincount(batch.users.ravel(), minlength=len(n)) / draws
    law = np.sqrt(n) / np.sqrt(n).sum()
    assert np.abs(law - n / n.sum()).max() > 0.02 and np.abs(law - 1 / len(n)).max() > 0.01
    assert np.abs(freq - law).max() < 0.012


def _step_gradients(model, batch, s):
    """Plain autograd gradients of lane 0's step ``s`` loss, Σ w·l / Σ w (bce)."""
    w = torch.from_numpy(batch.weights[0, s])
    emb = model.encode(torch.from_numpy(batch.windows[0, s]))
    pos = torch.from_numpy(batch.targets[0, s])
    neg = torch.from_numpy(batch.negatives[0, s])
    scores = model.score_items(emb, torch.cat([pos[:, None], neg], 1))
    each = -F.logsigmoid(scores[:, 0]) - F.logsigmoid(-scores[:, 1:]).sum(1)
    loss = (each * w).sum() / w.sum()
    return torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)


def _weighted_reference(model, cfg, batch, steps=None):
    """θ_steps (default θ_k) of one lane with plain autograd, SGD at α."""
    model = copy.deepcopy(model)
    for s in range(cfg.tp.k if steps is None else steps):
        grads = _step_gradients(model, batch, s)
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads):
                if g is not None:
                    p -= cfg.tp.inner_lr * g
    return model


def _config_sample(cfg, seed, **kwargs):
    """One lane with distinct windows, drawn at the config's k, K and negatives."""
    return tp_sampler().sample(
        [np.random.default_rng(seed)],
        k=cfg.tp.k,
        inner_batch=cfg.tp.inner_batch,
        num_negatives=cfg.train.num_negatives,
        num_items=NUM_ITEMS,
        distinct=True,
        **kwargs,
    )


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec", "caser"])
def test_weighted_inner_steps_match_the_written_out_computation(backbone):
    cfg = tp_config(backbone, "bce", discriminator=False, users_per_step=2)
    model, _ = tp_setup(cfg)
    sampler = tp_sampler()
    short = np.argsort(sampler.n_windows)[:4]  # users with fewer windows than K = 5
    batch = _config_sample(
        cfg, 4, users_per_step=2, all_positions=backbone != "caser", lane_users=[short]
    )
    assert (batch.weights == 0).any()
    inner = InnerLoop(model, None, loss="bce", inner_lr=cfg.tp.inner_lr, lambda_adv=0.0)
    grads, _, _ = inner.pseudo_gradients(batch)
    ref = _weighted_reference(model, cfg, batch)
    plain = copy.deepcopy(batch)
    plain.weights = np.ones_like(plain.weights)  # what ignoring the weights would give
    unweighted = _weighted_reference(model, cfg, plain)
    gap = 0.0
    for name, p in ref.named_parameters():
        theta_k = dict(model.named_parameters())[name].detach() - grads[name]
        torch.testing.assert_close(theta_k, p.detach(), atol=1e-5, rtol=1e-5)
        gap = max(gap, float((dict(unweighted.named_parameters())[name] - p).abs().max()))
    assert gap > 1e-3  # the weights matter at this scale


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec"])
def test_query_pseudo_gradient_is_the_last_steps_gradient_after_k_minus_1(backbone):
    """tp.outer_gradient=query (first-order MAML): the outer step gets the gradient of the
    last inner step's loss at θ_{k−1}, not the whole path Θ − θ_k."""
    cfg = tp_config(backbone, "bce", discriminator=False)
    model, _ = tp_setup(cfg)
    batch = _config_sample(
        cfg, 5, users_per_step=1, all_positions=True, same_user=True, disjoint_steps=True
    )
    alpha = cfg.tp.inner_lr
    inner = InnerLoop(model, None, loss="bce", inner_lr=alpha, lambda_adv=0.0, query=True)
    grads, _, _ = inner.pseudo_gradients(copy.deepcopy(batch))
    support = _weighted_reference(model, cfg, batch, steps=cfg.tp.k - 1)
    expected = _step_gradients(support, batch, cfg.tp.k - 1)
    path = InnerLoop(model, None, loss="bce", inner_lr=alpha, lambda_adv=0.0)
    whole, _, _ = path.pseudo_gradients(copy.deepcopy(batch))
    gap = 0.0
    for (name, _), g in zip(model.named_parameters(), expected):
        want = torch.zeros_like(grads[name]) if g is None else alpha * g
        torch.testing.assert_close(grads[name], want, atol=1e-5, rtol=1e-4)
        gap = max(gap, float((whole[name] - grads[name]).abs().max()))
    assert gap > 1e-3  # the path's pseudo-gradient is another thing
    normalized = InnerLoop(
        model, None, loss="bce", inner_lr=alpha, lambda_adv=0.0, query=True, normalize=True
    )
    scaled, _, _ = normalized.pseudo_gradients(copy.deepcopy(batch))
    for name in grads:
        torch.testing.assert_close(scaled[name], grads[name] / alpha)


def test_query_outer_gradient_needs_one_user_per_lane_and_two_steps():
    with pytest.raises(ConfigError, match="same_user=true"):
        load_config(None, ["train.method=tp", "tp.outer_gradient=query"])
    with pytest.raises(ConfigError, match="k=1"):
        load_config(None, ["tp.outer_gradient=query", "tp.same_user=true", "tp.k=1"])
    with pytest.raises(ConfigError, match="tp.outer_gradient must be"):
        load_config(None, ["tp.outer_gradient=reptile"])
    cfg = tp_config(
        "sasrec", "bce", outer_gradient="query", same_user="true", lanes=8, inner_batch=3
    )
    model, _ = tp_setup(cfg)
    stepper = TPStepper(model, cfg, sampler=tp_sampler())
    assert stepper.inner.query
    batch = stepper.sample_step(stepper.sampler, 0, 0)  # the trainer draws disjoint steps
    checked = 0
    for m in range(8):
        lane = batch.lane(m)
        if stepper.sampler.n_windows[lane.users[0, 0, 0]] >= 9:  # k·K windows
            steps = [set(_positions(lane, s)) for s in range(3)]
            assert not (steps[0] & steps[2] or steps[1] & steps[2])
            checked += 1
    assert checked > 0
    stepper.outer_step(0, 0, batch)  # one outer step runs


def test_normalize_divides_the_pseudo_gradient_by_alpha():
    cfg = tp_config("sasrec", "bce")
    model, disc = tp_setup(cfg)
    batch = _sample(
        tp_sampler(), lanes=2, k=cfg.tp.k, inner_batch=5, num_negatives=3, all_positions=True
    )
    out = []
    for normalize in (False, True):
        inner = InnerLoop(
            model, disc, loss="bce", inner_lr=0.5, lambda_adv=0.7, normalize=normalize
        )
        out.append(inner.pseudo_gradients(copy.deepcopy(batch))[:2])
    for plain, scaled in zip(out[0], out[1]):
        for name in plain:
            torch.testing.assert_close(scaled[name], plain[name] / 0.5)


def test_tp_outer_lr_is_train_lr():
    cfg = tp_config("sasrec", "bce", lanes=2)
    assert cfg.tp.outer_lr is None
    model, _ = tp_setup(cfg)
    stepper = TPStepper(model, cfg, sampler=tp_sampler())
    assert stepper.outer.opt.param_groups[0]["lr"] == cfg.train.lr
    load_config(None, ["train.method=tp", "train.lr=0.003", "tp.outer_lr=0.003"])
    with pytest.raises(ConfigError, match=r"tp.outer_lr \(0.001\) differs from train.lr"):
        load_config(None, ["train.method=tp", "train.lr=0.003", "tp.outer_lr=0.001"])


def test_balance_power_spans_user_and_window_weights():
    seqs = tp_sampler().seqs
    rows = {
        b: training_rows(seqs, max_len=6, all_positions=True, balance=b) for b in ("window", "user")
    }

    def power(g):
        return training_rows(seqs, max_len=6, all_positions=True, balance="power", power=g)

    np.testing.assert_allclose(power(0.0).weights, rows["user"].weights, rtol=1e-6)
    real = rows["window"].targets > 0
    np.testing.assert_allclose(power(1.0).weights[real], 1.0, rtol=1e-6)
    half = power(0.5).weights
    assert half[real].mean() == pytest.approx(1.0, rel=1e-5)  # weights average 1
    # a long user's windows weigh less than a short user's, but more than under "user"
    first = half[0][half[0] > 0][0]
    assert np.isfinite(first)
    with pytest.raises(ConfigError, match="train.balance=power is for joint training"):
        load_config(None, ["train.method=tp", "train.balance=power"])


@pytest.mark.parametrize("layers", [1, 2])
def test_unrolled_gru_equals_nn_gru(layers):
    from dist_tp.models.gru4rec import gru_unrolled

    torch.manual_seed(0)
    gru = torch.nn.GRU(8, 6, num_layers=layers, batch_first=True)
    x = torch.randn(5, 7, 8, requires_grad=True)
    want = gru(x)[0]
    got = gru_unrolled(gru, x)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    g_want = torch.autograd.grad(want.square().sum(), [x, *gru.parameters()])
    g_got = torch.autograd.grad(got.square().sum(), [x, *gru.parameters()])
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_gru4rec_lanes_unrolled_equal_native_lanes(loss):
    """The batched (unrolled) GRU in vmapped lanes gives the per-lane native GRU's
    pseudo-gradients to 1e-5."""
    cfg = tp_config("gru4rec", loss, lanes=3)
    model, disc = tp_setup(cfg)
    batch = _sample(
        tp_sampler(),
        lanes=3,
        k=cfg.tp.k,
        inner_batch=5,
        num_negatives=3 if loss == "bce" else 0,
        all_positions=True,
    )
    out = []
    for unroll in (False, True):
        inner = InnerLoop(model, disc, loss=loss, inner_lr=0.5, lambda_adv=0.7, unroll_rnns=unroll)
        out.append(inner.pseudo_gradients(copy.deepcopy(batch))[:2])
    assert not model.encoder.unrolled  # switched back after the step
    for native, unrolled in zip(out[0], out[1]):
        for name in native:
            torch.testing.assert_close(unrolled[name], native[name], atol=1e-5, rtol=1e-5)


def test_lr_scaling_follows_the_windows_per_step(prepared):
    """train.lr_scaling: lr × (B / lr_batch)^p, B the windows of one step over all ranks;
    what the optimizers get, for TP (outer Adam) as for joint training."""
    joint = load_config(None, ["train.batch_size=4096", "train.lr_scaling=sqrt"])
    assert joint.effective_lr() == pytest.approx(1e-3 * 4)
    assert joint.effective_lr(world_size=4) == pytest.approx(1e-3 * 8)
    linear = load_config(None, ["train.batch_size=512", "train.lr_scaling=linear"])
    assert linear.effective_lr() == pytest.approx(2e-3)
    assert load_config(None, ["train.batch_size=4096"]).effective_lr() == 1e-3  # none
    joint.data.path = prepared("ml-100k")
    model = build_model(joint.model, open_prepared(joint.data.path).num_items)
    assert JointStepper(model, joint).opt.opt.param_groups[0]["lr"] == pytest.approx(4e-3)
    cfg = tp_config("sasrec", "bce", lanes=2)  # 2 lanes × k 2 × K 4: 16 windows per step
    cfg.train.lr_scaling, cfg.train.lr_batch = "linear", 4
    model, _ = tp_setup(cfg)
    assert cfg.train.method == "joint"  # TP's own windows all the same (benchmarks do this)
    stepper = TPStepper(model, cfg, sampler=tp_sampler())
    assert stepper.windows_per_step == cfg.step_windows("tp") == 2 * cfg.tp.k * cfg.tp.inner_batch
    expected = cfg.train.lr * stepper.windows_per_step / 4
    assert stepper.outer.opt.param_groups[0]["lr"] == pytest.approx(expected)
    with pytest.raises(ConfigError, match="train.lr_scaling must be none, sqrt or linear"):
        load_config(None, ["train.lr_scaling=cubic"])
    with pytest.raises(ConfigError, match="lr_batch"):
        load_config(None, ["train.lr_batch=0"])
