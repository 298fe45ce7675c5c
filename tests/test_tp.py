"""Golden math for TP: inner SGD steps, the outer update, lanes, gradient reversal, λ = 0."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import NUM_ITEMS, tp_batch, tp_config, tp_sampler, tp_setup, uneven_batch

from dist_tp.algorithms.tp.discriminator import Discriminator, auc, grad_reverse
from dist_tp.algorithms.tp.lanes import BucketCost, InnerLoop, plan_buckets
from dist_tp.algorithms.tp.sampler import TaskSampler
from dist_tp.algorithms.tp.trainer import TPStepper
from dist_tp.config import ConfigError, load_config
from dist_tp.models import build_model
from dist_tp.run.loop import run_training


def _reference_theta_k(model, disc, cfg, batch):
    """The paper's inner loop written out with plain autograd, one lane, no GRL trick:
    θ ← θ − α(∇L − λ ∇_θ BCE_d), θ_d ← θ_d − α ∇_{θ_d} BCE_d."""
    model, disc = copy.deepcopy(model), copy.deepcopy(disc)
    alpha, lam = cfg.tp.inner_lr, cfg.tp.lambda_adv
    for s in range(cfg.tp.k):
        inputs = torch.from_numpy(batch.windows[0, s])
        pos = torch.from_numpy(batch.targets[0, s])
        labels = torch.from_numpy(batch.labels[0, s])
        emb = model.encode(inputs)
        if cfg.train.loss == "ce":
            pred = F.cross_entropy(model.score_all(emb)[:, 1:], pos - 1)
        elif cfg.train.loss == "sampled_softmax":
            in_batch = cfg.train.negatives == "in_batch"
            neg = None if in_batch else torch.from_numpy(batch.negatives[0, s])
            pred = model.loss(
                emb, pos, kind="sampled_softmax", negatives=neg, sampling=cfg.train.negatives
            )
        else:
            neg = torch.from_numpy(batch.negatives[0, s])
            scores = model.score_items(emb, torch.cat([pos[:, None], neg], 1))
            pred = (-F.logsigmoid(scores[:, 0]) - F.logsigmoid(-scores[:, 1:]).sum(1)).mean()
        bce_d = F.binary_cross_entropy_with_logits(disc(emb), labels)
        theta = list(model.parameters())
        g_pred = torch.autograd.grad(pred, theta, retain_graph=True, allow_unused=True)
        g_adv = torch.autograd.grad(bce_d, theta + list(disc.parameters()), allow_unused=True)
        with torch.no_grad():
            for p, gp, ga in zip(theta, g_pred, g_adv[: len(theta)]):
                gp = torch.zeros_like(p) if gp is None else gp
                ga = torch.zeros_like(p) if ga is None else ga
                p -= alpha * (gp - lam * ga)
            for p, gd in zip(disc.parameters(), g_adv[len(theta) :]):
                p -= alpha * gd
    return model, disc


def _theta_k(module, grads):
    return {n: p.detach() - grads[n] for n, p in module.named_parameters()}


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec", "caser"])
@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_k_inner_steps_match_the_written_out_computation(backbone, loss):
    cfg = tp_config(backbone, loss)
    model, disc = tp_setup(cfg)
    batch = tp_batch(cfg, lanes=1)
    inner = InnerLoop(
        model, disc, loss=loss, inner_lr=cfg.tp.inner_lr, lambda_adv=cfg.tp.lambda_adv
    )
    grads, dgrads, stats = inner.pseudo_gradients(batch)
    ref_model, ref_disc = _reference_theta_k(model, disc, cfg, batch)
    for name, value in _theta_k(model, grads).items():
        torch.testing.assert_close(
            value, dict(ref_model.named_parameters())[name], atol=1e-5, rtol=1e-5
        )
    for name, value in _theta_k(disc, dgrads).items():
        torch.testing.assert_close(
            value, dict(ref_disc.named_parameters())[name], atol=1e-5, rtol=1e-5
        )
    assert any(g.abs().sum() > 0 for g in grads.values())
    if loss == "bce":  # sparse lanes carry only the touched rows
        assert 1 < stats.touched_rows <= NUM_ITEMS + 1


SAMPLED = ["sampled_softmax-uniform", "sampled_softmax-popularity", "sampled_softmax-in_batch"]


@pytest.mark.parametrize("loss", SAMPLED)
def test_sampled_softmax_inner_steps_match_the_written_out_computation(loss):
    """Sampled softmax in sparse lanes (the lane's rows, local ids, its rows of log q) takes
    the same k steps as plain autograd on the whole tables."""
    cfg = tp_config("sasrec", loss)
    model, disc = tp_setup(cfg)
    model.set_item_popularity(np.arange(NUM_ITEMS + 1) % 5)
    batch = tp_batch(cfg, lanes=1, negative_cdf=model.neg_cdf.numpy())
    inner = InnerLoop(
        model,
        disc,
        loss="sampled_softmax",
        inner_lr=cfg.tp.inner_lr,
        lambda_adv=cfg.tp.lambda_adv,
        sampling=cfg.train.negatives,
    )
    grads, dgrads, stats = inner.pseudo_gradients(batch)
    ref_model, _ = _reference_theta_k(model, disc, cfg, batch)
    for name, value in _theta_k(model, grads).items():
        torch.testing.assert_close(
            value, dict(ref_model.named_parameters())[name], atol=1e-5, rtol=1e-5
        )
    assert 1 < stats.touched_rows <= NUM_ITEMS + 1


@pytest.mark.parametrize(
    "backbone,loss", [("sasrec", "bce"), ("gru4rec", "bce"), ("caser", "bce"), ("sasrec", "ce")]
)
def test_lanes_equal_the_average_of_sequential_single_lane_runs(backbone, loss):
    cfg = tp_config(backbone, loss)
    model, disc = tp_setup(cfg)
    batch = tp_batch(cfg, lanes=4)
    inner = InnerLoop(
        model, disc, loss=loss, inner_lr=cfg.tp.inner_lr, lambda_adv=cfg.tp.lambda_adv
    )
    grads, dgrads, _ = inner.pseudo_gradients(batch)
    singles = [inner.pseudo_gradients(batch.lane(m)) for m in range(4)]
    for name, g in grads.items():
        mean = torch.stack([s[0][name] for s in singles]).mean(0)
        torch.testing.assert_close(g, mean, atol=1e-5, rtol=1e-5)
    for name, g in dgrads.items():
        mean = torch.stack([s[1][name] for s in singles]).mean(0)
        torch.testing.assert_close(g, mean, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "backbone,loss", [("sasrec", "bce"), ("gru4rec", "bce"), ("sasrec", "ce"), ("gru4rec", "ce")]
)
def test_bucketed_inner_loop_equals_one_padded_call(backbone, loss):
    cfg = tp_config(backbone, loss)
    model, disc = tp_setup(cfg)
    batch = uneven_batch(cfg)
    real = batch.rows != 0
    rows, cols = real.any(-1).sum(-1), real.sum(-1).max(-1)  # [M, k]
    assert rows.min() == 1 and rows.max() >= 4 and cols.min() < cfg.model.max_len
    kw = dict(loss=loss, inner_lr=cfg.tp.inner_lr, lambda_adv=cfg.tp.lambda_adv)
    padded = InnerLoop(model, disc, bucketing=False, **kw).pseudo_gradients(batch)
    # no call cost: a bucket per shape; the default cost: these small lanes in one trimmed call
    for cost, many in ((BucketCost(call=0.0), True), (None, False)):
        inner = InnerLoop(model, disc, **kw)
        inner.bucket_cost = cost or inner.bucket_cost
        plans = inner._plans(batch)
        assert all(
            sorted(np.concatenate([m for m, _, _ in p]).tolist()) == list(range(6)) for p in plans
        )
        assert max(len(p) for p in plans) > 1 if many else all(len(p) == 1 for p in plans)
        grads, dgrads, stats = inner.pseudo_gradients(batch)
        for name, g in grads.items():
            torch.testing.assert_close(g, padded[0][name], atol=1e-5, rtol=1e-5)
        for name, g in dgrads.items():
            torch.testing.assert_close(g, padded[1][name], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stats.disc_logits, padded[2].disc_logits, atol=1e-5, rtol=1e-5)
        assert stats.pred_loss == pytest.approx(padded[2].pred_loss, rel=1e-5)
        assert stats.disc_loss == pytest.approx(padded[2].disc_loss, rel=1e-5)


def test_bucketed_inner_loop_with_dropout_is_reproducible_for_a_seed():
    cfg = tp_config("sasrec", "bce")
    cfg.model.dropout = 0.3
    model, disc = tp_setup(cfg)
    batch = uneven_batch(cfg)
    inner = InnerLoop(model, disc, loss="bce", inner_lr=0.5, lambda_adv=0.7)
    inner.bucket_cost = BucketCost(call=0.0)
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        runs.append(inner.pseudo_gradients(batch)[0])
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


def test_plan_buckets_covers_every_lane_once_and_splits_off_a_long_lane():
    cost = BucketCost(call=800.0)
    rows = np.array([1] * 15 + [33])
    cols = np.array([10] * 15 + [50])
    plan = plan_buckets(rows, cols, cost)
    assert [(m.tolist(), r, c) for m, r, c in plan] == [(list(range(15)), 1, 10), ([15], 33, 50)]
    rng = np.random.default_rng(0)
    rows, cols = rng.integers(1, 34, 16), rng.integers(1, 51, 16)
    plan = plan_buckets(rows, cols, cost)
    assert sorted(np.concatenate([m for m, _, _ in plan]).tolist()) == list(range(16))
    for members, r, c in plan:
        assert r == rows[members].max() and c == cols[members].max()
    assert sum(cost(len(m), r, c) for m, r, c in plan) <= cost(16, rows.max(), cols.max())


@pytest.mark.parametrize("lanes", [5, 100, 300])
def test_vectorised_bucket_split_equals_the_python_one(lanes):
    from dist_tp.algorithms.tp.lanes import (
        BUCKET_COSTS,
        DEFAULT_BUCKET_COST,
        split_numpy,
        split_python,
    )

    rng = np.random.default_rng(lanes)
    rows = rng.integers(1, 34, lanes)
    cols = np.where(rng.random(lanes) < 0.3, 50, rng.integers(1, 51, lanes))  # ties included
    for cost in [*BUCKET_COSTS.values(), DEFAULT_BUCKET_COST, BucketCost(call=0.0)]:
        total, cut = split_python(rows, cols, cost)
        assert split_numpy(rows, cols, cost) == (total, cut)
    many = plan_buckets(rows, cols, BUCKET_COSTS["SASRec"])  # numpy above VECTOR_DP_FROM (32) lanes
    assert sorted(np.concatenate([m for m, _, _ in many]).tolist()) == list(range(lanes))


def _shared_rows_loop(sampler, target_pos, lanes, k, per_step):
    """The all-positions rows written out step by step, user by user, draw by draw."""
    L = sampler.max_len
    steps = target_pos.reshape(lanes * k, per_step, -1)
    user_start = sampler.starts[sampler.users_of(steps)]
    per_step_rows, slots = [], []
    for s in range(lanes * k):
        rows, slot_row, slot_pos = [], [], []
        for u in range(per_step):
            start, tpos = user_start[s, u], steps[s, u]
            offset = tpos - start
            n = int(sampler.n_windows[np.searchsorted(sampler.starts, start)])
            m = min(L, n)
            if (offset <= L).any():
                rows.append(sampler._windows(np.array([start + m]), np.array([start]))[0])
                first = len(rows) - 1
            late = {}
            for off, t in zip(offset, tpos):
                if off <= L:
                    slot_row.append(first)
                    slot_pos.append(L - m + off - 1)
                    continue
                if t not in late:
                    rows.append(sampler._windows(np.array([t]), np.array([start]))[0])
                    late[t] = len(rows) - 1
                slot_row.append(late[t])
                slot_pos.append(L - 1)
        per_step_rows.append(rows)
        slots.append((slot_row, slot_pos))
    width = max(len(r) for r in per_step_rows)
    out = np.zeros((lanes * k, width, L), dtype=np.int64)
    for s, rows in enumerate(per_step_rows):
        out[s, : len(rows)] = rows
    slot_row = np.array([r for r, _ in slots]).reshape(lanes, k, -1)
    slot_pos = np.array([p for _, p in slots]).reshape(lanes, k, -1)
    return out.reshape(lanes, k, width, L), slot_row, slot_pos


@pytest.mark.parametrize("per_step,inner_batch", [(1, 8), (2, 4), (3, 16)])
def test_vectorised_shared_rows_equal_the_written_out_loop(per_step, inner_batch):
    """Rows, slots and their order as the loop makes them: short and long users, repeated
    draws of a target (with replacement), several users per step."""
    sampler, lanes, k = tp_sampler(seed=per_step), 7, 2
    rng = np.random.default_rng(inner_batch)
    users = rng.integers(0, len(sampler), lanes * k * per_step)
    picks = rng.integers(0, sampler.n_windows[users][:, None], (len(users), inner_batch))
    target_pos = sampler.starts[users, None] + 1 + picks
    got = sampler._shared_rows(target_pos, lanes, k, per_step)
    want = _shared_rows_loop(sampler, target_pos, lanes, k, per_step)
    for a, b in zip(got, want):
        assert a.shape == b.shape and np.array_equal(a, b)
    rows, slot_row, slot_pos = got  # and every window is its row up to its slot
    windows = sampler._windows(target_pos, sampler.starts[users, None]).reshape(lanes, k, -1, 6)
    for m, s, b in np.ndindex(*slot_row.shape):
        seen = rows[m, s, slot_row[m, s, b], : slot_pos[m, s, b] + 1]
        padded = np.concatenate([np.zeros(6 - len(seen), int), seen])
        assert np.array_equal(padded, windows[m, s, b])


def test_sgd_outer_step_with_lr_1_and_one_lane_lands_on_theta_k():
    cfg = tp_config(lanes=1, outer_optimizer="sgd")
    cfg.train.lr = 1.0  # TP's outer lr is train.lr
    model, _ = tp_setup(cfg)
    stepper = TPStepper(model, cfg, sampler=tp_sampler())
    before_model = copy.deepcopy(model)
    before_disc = copy.deepcopy(stepper.disc)
    stepper.outer_step(0, 0)
    # replay the same inner loop from the saved Θ
    inner = InnerLoop(before_model, before_disc, loss="bce", inner_lr=0.5, lambda_adv=0.7)
    batch = stepper.sampler.sample(
        [np.random.default_rng([cfg.train.seed, 0, 0, 0])],
        k=3,
        users_per_step=1,
        inner_batch=5,
        num_negatives=3,
        num_items=NUM_ITEMS,
        all_positions=True,
    )
    grads, dgrads, _ = inner.pseudo_gradients(batch)
    for name, value in _theta_k(before_model, grads).items():
        torch.testing.assert_close(
            dict(model.named_parameters())[name].detach(), value, atol=1e-6, rtol=1e-6
        )
    for name, value in _theta_k(before_disc, dgrads).items():
        torch.testing.assert_close(
            dict(stepper.disc.named_parameters())[name].detach(), value, atol=1e-6, rtol=1e-6
        )


def test_gradient_reversal_scales_the_encoder_gradient_by_minus_lambda():
    torch.manual_seed(0)
    emb = torch.randn(7, 8, requires_grad=True)
    disc = Discriminator(8, [5])
    labels = (torch.rand(7) > 0.5).float()
    bce = F.binary_cross_entropy_with_logits(disc(emb), labels)
    g_emb, *g_disc = torch.autograd.grad(bce, [emb, *disc.parameters()])
    lam = 0.37
    out = grad_reverse(emb, lam)
    assert torch.equal(out, emb)  # identity forward, exactly
    bce_rev = F.binary_cross_entropy_with_logits(disc(out), labels)
    r_emb, *r_disc = torch.autograd.grad(bce_rev, [emb, *disc.parameters()])
    torch.testing.assert_close(r_emb, -lam * g_emb)
    for a, b in zip(r_disc, g_disc):
        torch.testing.assert_close(a, b)  # the discriminator still descends BCE_d


def test_lambda_zero_leaves_the_encoder_as_without_discriminator():
    results = []
    for use_disc in (True, False):
        cfg = tp_config(lambda_adv=0.0, discriminator=use_disc, lanes=3)
        cfg.model.dropout = 0.2  # dropout consumes the same random numbers either way
        model, _ = tp_setup(cfg)
        torch.manual_seed(5)
        stepper = TPStepper(model, cfg, sampler=tp_sampler())
        for step in range(3):
            stepper.outer_step(0, step)
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name


def test_lane_batches_drawn_ahead_on_a_thread_give_the_same_epoch(monkeypatch):
    """run_epoch's batches, drawn in the loop or ahead on a thread, are the ones each outer
    step draws for itself (steps called one by one, no batch given)."""
    import threading

    where = []
    sample_step = TPStepper.sample_step

    def recorded(self, *args):
        where.append(threading.current_thread().name)
        return sample_step(self, *args)

    def stepper_for(prefetch: int) -> TPStepper:
        cfg = tp_config(lanes=2, inner_batch=2)
        cfg.model.dropout = 0.2  # the thread must not take the dropout's random numbers
        cfg.train.method, cfg.train.prefetch = "tp", prefetch  # 12 windows per outer step
        return TPStepper(tp_setup(cfg)[0], cfg, sampler=tp_sampler())

    reference = stepper_for(0)
    assert reference.steps_per_epoch >= 4
    steps = range(1, reference.steps_per_epoch)  # a resumed epoch: from its second step
    losses = [reference.outer_step(0, step).pred_loss for step in steps]
    monkeypatch.setattr(TPStepper, "sample_step", recorded)
    for prefetch in (0, 2):
        stepper = stepper_for(prefetch)
        where.clear()
        record = stepper.run_epoch(0, start_step=1)
        assert len(where) == len(steps)
        off_main = {name != threading.main_thread().name for name in where}
        assert off_main == ({True} if prefetch else {False})
        assert record["loss"] == float(np.mean(losses))
        for (name, value), ref in zip(stepper.model.named_parameters(), reference.params):
            assert torch.equal(value, ref), name


def _user_frequencies(sampler, draws: int, **kwargs) -> np.ndarray:
    batch = sampler.sample(
        [np.random.default_rng(3)], k=draws, users_per_step=1, inner_batch=1, **kwargs
    )
    return np.bincount(batch.users.ravel(), minlength=len(sampler)) / draws


def test_users_are_picked_uniformly_or_in_proportion_to_their_windows():
    sampler = tp_sampler()
    n = sampler.n_windows.astype(float)
    uniform, by_windows = np.full(len(n), 1 / len(n)), n / n.sum()
    assert np.abs(by_windows - uniform).max() > 0.04  # the two laws are told apart
    draws = 40_000  # σ of a frequency <= .0025
    assert np.abs(_user_frequencies(sampler, draws) - uniform).max() < 0.012
    assert np.abs(_user_frequencies(sampler, draws, user_power=1.0) - by_windows).max() < 0.012
    # a lane pinned to a pool draws from the pool alone, in proportion within it
    pool = np.array([1, 4, 7])
    freq = _user_frequencies(sampler, draws, user_power=1.0, lane_users=[pool])
    assert freq[np.setdiff1d(np.arange(len(n)), pool)].sum() == 0
    assert np.abs(freq[pool] - n[pool] / n[pool].sum()).max() < 0.012


def test_the_trainer_picks_users_as_configured(monkeypatch):
    seen = []
    sample = TaskSampler.sample
    monkeypatch.setattr(
        TaskSampler,
        "sample",
        lambda self, *a, **kw: seen.append(kw["user_power"]) or sample(self, *a, **kw),
    )
    for choice in ("uniform", "windows", "power"):
        cfg = tp_config(lanes=2, user_sampling=choice, user_power=0.3)
        model, _ = tp_setup(cfg)
        TPStepper(model, cfg, sampler=tp_sampler()).outer_step(0, 0)
    assert seen == [0.0, 1.0, 0.3]
    with pytest.raises(ConfigError, match="tp.user_sampling must be 'uniform', 'windows' or"):
        tp_config(user_sampling="head")


def test_lane_buckets_follow_the_config_and_the_device():
    from dist_tp.algorithms.tp.lanes import bucketing

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert [bucketing(c, cpu) for c in ("auto", "cost", "one")] == [True, True, False]
    assert [bucketing(c, gpu) for c in ("auto", "cost", "one")] == [False, True, False]
    for choice, want in (("auto", True), ("one", False)):
        cfg = tp_config(lanes=2, buckets=choice)
        stepper = TPStepper(tp_setup(cfg)[0], cfg, sampler=tp_sampler())
        assert stepper.inner.bucketing is want
    with pytest.raises(ConfigError, match="tp.buckets must be auto, cost or one"):
        tp_config(buckets="many")


def test_auc():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8])
    labels = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert auc(scores, labels) == pytest.approx(0.75)
    assert auc(torch.zeros(4), labels) == pytest.approx(0.5)


def test_short_tp_run_beats_popularity_and_its_initialisation(prepared, tmp_path):
    from dist_tp.evaluation.evaluate import evaluate

    path = prepared("ml-100k")
    base = ["data.path=" + path, "train.method=tp", "train.epochs=2", "train.progress=false"]
    cfg = load_config("configs/tiny.yaml", base)
    pop = run_training(
        load_config("configs/tiny.yaml", [*base, "model.name=pop", "train.method=joint"]),
        tmp_path / "pop",
    )
    torch.manual_seed(cfg.train.seed)
    init = evaluate(
        build_model(cfg.model, 1349), path, max_len=cfg.model.max_len, ks=[10], splits=("test",)
    )
    metrics = run_training(cfg, tmp_path / "tp")
    hr = metrics["existing"]["all"]["HR@10"]
    assert hr > pop["existing"]["all"]["HR@10"]
    assert hr > init["test"]["existing"]["all"]["HR@10"]
    assert metrics["new"]["all"]["HR@10"] > init["test"]["new"]["all"]["HR@10"]
    disc = metrics["discriminator"]
    assert 0.0 <= disc["disc_auc"] <= 1.0 and disc["disc_majority"] == pytest.approx(
        603 / 754, abs=1e-3
    )


@pytest.mark.parametrize("negatives", ["popularity", "in_batch"])
def test_tp_with_sampled_softmax_learns(prepared, tmp_path, negatives):
    """One epoch of SASRec-TP on ML-100K with sampled softmax (sparse lanes, logQ from the
    training counts) beats its initialisation on existing and new users."""
    from dist_tp.evaluation.evaluate import evaluate

    path = prepared("ml-100k")
    cfg = load_config(
        "configs/tiny.yaml",
        [
            "data.path=" + path,
            "train.method=tp",
            "train.epochs=1",
            "train.progress=false",
            "train.loss=sampled_softmax",
            f"train.negatives={negatives}",
            "train.num_negatives=32",
        ],
    )
    torch.manual_seed(cfg.train.seed)
    init = evaluate(
        build_model(cfg.model, 1349), path, max_len=cfg.model.max_len, ks=[10], splits=("test",)
    )
    metrics = run_training(cfg, tmp_path / "tp")
    for role in ("existing", "new"):
        assert metrics[role]["all"]["HR@10"] > init["test"][role]["all"]["HR@10"]


def test_lane_unique_is_each_lanes_sorted_unique_padded_with_its_largest():
    from dist_tp.algorithms.tp.lanes import lane_unique

    gen = torch.Generator().manual_seed(0)
    for lanes, width, high in [(1, 5, 3), (7, 40, 30), (64, 200, 5000)]:
        ids = torch.randint(0, high, (lanes, width), generator=gen)
        ids[0, :] = 2  # a lane with one distinct id
        rows = [torch.unique(ids[m]) for m in range(lanes)]
        widest = max(len(r) for r in rows)
        expected = torch.stack([torch.cat([r, r[-1:].expand(widest - len(r))]) for r in rows])
        assert torch.equal(lane_unique(ids), expected)
