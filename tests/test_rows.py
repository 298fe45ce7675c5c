"""Row-wise item updates (train.item_updates=sparse) and shared negatives: the lazy Adam
against torch's, the clipping against torch's, the joint and TP steps against their dense
forms, and the errors."""

from __future__ import annotations

import pytest
import torch
from helpers import tp_batch, tp_config, tp_setup

from dist_tp.algorithms.joint import JointStepper
from dist_tp.algorithms.tp.lanes import InnerLoop
from dist_tp.config import ConfigError, load_config
from dist_tp.data.stream import open_prepared
from dist_tp.models import build_model
from dist_tp.models.saved import SPARSE_ITEMS_FROM, sparse_item_updates
from dist_tp.parallel.host import OptimizerSpec, TorchHost
from dist_tp.parallel.rows import RowAdam, clip_grad_norm, row_gradient, touched_rows


def test_row_adam_equals_adam_when_every_row_is_touched():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(6, 4))
    b = torch.nn.Parameter(a.detach().clone())
    adam = torch.optim.Adam([a], lr=0.01, weight_decay=0.1)
    rows = RowAdam([b], lr=0.01, weight_decay=0.1)
    for _ in range(4):
        g = torch.randn(6, 4)
        a.grad, b.grad = g.clone(), row_gradient(torch.arange(6), g.clone(), b.shape)
        adam.step()
        rows.step()
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_row_adam_leaves_untouched_rows_and_their_moments_alone():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3))
    opt = RowAdam([p], lr=0.1)
    p.grad = row_gradient(torch.tensor([1, 3, 3]), torch.randn(3, 3), p.shape)  # 3 repeats
    opt.step()
    after_one = p.detach().clone()
    moments = opt.state[p]["exp_avg"].clone()
    # step 2 touches row 3 only, and row 1 with an all-zero gradient: not touched
    p.grad = row_gradient(
        torch.tensor([3, 1]), torch.stack([torch.randn(3), torch.zeros(3)]), p.shape
    )
    opt.step()
    for row in (0, 1, 2, 4):
        torch.testing.assert_close(p[row], after_one[row], rtol=0, atol=0)
        torch.testing.assert_close(opt.state[p]["exp_avg"][row], moments[row], rtol=0, atol=0)
    assert not torch.equal(p[3], after_one[3])
    assert float(opt.state[p]["step"]) == 2  # the table's steps: the bias correction


def test_touched_rows_sums_repeats_and_drops_zero_rows():
    grad = row_gradient(torch.tensor([4, 0, 4]), torch.tensor([[1.0], [0.0], [2.0]]), (6, 1))
    rows, values = touched_rows(grad)
    assert rows.tolist() == [4] and values.tolist() == [[3.0]]
    rows, values = touched_rows(torch.tensor([[0.0], [5.0], [0.0]]))  # a dense gradient
    assert rows.tolist() == [1] and values.tolist() == [[5.0]]


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_grad_norm_of_sparse_gradients_equals_torch_on_dense(max_norm):
    torch.manual_seed(1)
    dense = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(2)]
    mixed = [torch.nn.Parameter(p.detach().clone()) for p in dense]
    grads = [torch.randn(4, 3), torch.zeros(4, 3)]
    grads[1][2] = torch.randn(3)
    for p, g in zip(dense, grads):
        p.grad = g.clone()
    mixed[0].grad = grads[0].clone()
    mixed[1].grad = row_gradient(torch.tensor([2]), grads[1][2:3].clone(), (4, 3))
    want = torch.nn.utils.clip_grad_norm_(dense, max_norm)
    got = clip_grad_norm(mixed, max_norm)
    torch.testing.assert_close(got.float(), want, rtol=1e-6, atol=1e-6)
    for p, q in zip(dense, mixed):
        torch.testing.assert_close(q.grad.to_dense(), p.grad, rtol=1e-6, atol=1e-7)


def _model(num_items=50, sparse=False):
    cfg = load_config(None, ["model.dim=8", "model.max_len=6", "model.dropout=0.0"])
    torch.manual_seed(0)
    model = build_model(cfg.model, num_items)
    model.set_sparse_items(sparse)
    return model


@pytest.mark.parametrize("sampling", ["uniform", "popularity"])
def test_shared_negatives_equal_the_same_negatives_given_to_every_window(sampling):
    model = _model()
    model.set_item_popularity(torch.arange(51).numpy())
    emb = torch.randn(7, 8)
    pos = torch.tensor([1, 5, 9, 5, 20, 3, 7])
    neg = torch.tensor([5, 2, 3, 40, 9])  # hits some windows' positives: masked there
    kw = dict(kind="sampled_softmax", sampling=sampling)
    shared = model.loss(emb, pos, negatives=neg, reduction="none", **kw)
    per_window = model.loss(emb, pos, negatives=neg.expand(7, 5), reduction="none", **kw)
    torch.testing.assert_close(shared, per_window, rtol=1e-6, atol=1e-6)
    drawn = model.loss(emb, pos, num_negatives=16, shared=True, **kw)
    assert torch.isfinite(drawn)


def test_sparse_lookups_give_the_dense_gradient_rows():
    dense, sparse = _model(), _model(sparse=True)
    seq = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 9]])
    for model in (dense, sparse):
        emb = model.encode(seq)
        model.loss(
            emb, torch.tensor([7, 8]), kind="bce", negatives=torch.tensor([[11], [3]])
        ).backward()
    assert sparse.item_emb.weight.grad.is_sparse
    torch.testing.assert_close(
        sparse.item_emb.weight.grad.to_dense(), dense.item_emb.weight.grad, rtol=1e-5, atol=1e-7
    )


def _joint(prepared, *overrides):
    path = prepared("ml-100k")
    cfg = load_config(
        "configs/tiny.yaml",
        [
            f"data.path={path}",
            "model.dropout=0.0",
            "train.loss=sampled_softmax",
            "train.negatives=popularity",
            "train.num_negatives=8",
            "train.shared_negatives=true",
            *overrides,
        ],
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, open_prepared(path).num_items)
    return model, JointStepper(model, cfg, host=TorchHost())


def test_joint_sparse_step_matches_dense_then_leaves_untouched_rows(prepared):
    """Adam's first step moves no row with a zero gradient, so dense and row-wise agree after
    one step; after the second, a row the second step did not touch has not moved."""
    runs = {}
    for mode in ("dense", "sparse"):
        model, stepper = _joint(prepared, f"train.item_updates={mode}")
        assert model.sparse_items == (mode == "sparse")
        batches = stepper.epoch_batches(0)
        snapshots = []
        for step in range(2):
            mb = next(batches)
            stepper.gen.manual_seed(step)
            loss = stepper.opt(
                torch.as_tensor(mb.inputs), torch.as_tensor(mb.targets), generator=stepper.gen
            )
            stepper.opt.update(loss)
            snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
        runs[mode] = snapshots
    for name, value in runs["dense"][0].items():
        torch.testing.assert_close(runs["sparse"][0][name], value, rtol=1e-5, atol=1e-6)
    table_1, table_2 = (s["item_emb.weight"] for s in runs["sparse"])
    still = (table_1 == table_2).all(1)
    assert 0 < int(still.sum()) < len(still)  # some rows touched by step 2, most not
    moved_dense = (runs["dense"][0]["item_emb.weight"] != runs["dense"][1]["item_emb.weight"]).any(
        1
    )
    assert bool((moved_dense & still).any())  # dense Adam moved rows the step did not touch


def test_tp_row_outer_step_matches_dense_on_its_first_step():
    grads = {}
    for sparse in (False, True):
        cfg = tp_config("sasrec", "bce", lanes=3, k=2)
        model, disc = tp_setup(cfg)
        inner = InnerLoop(
            model,
            disc,
            loss="bce",
            inner_lr=cfg.tp.inner_lr,
            lambda_adv=cfg.tp.lambda_adv,
            row_tables=sparse,
        )
        host = TorchHost()
        names = tuple(f"model.{n}" for n in inner.row_tables)
        outer = host.pseudo_gradient_optimizer(
            {"model": model}, OptimizerSpec(lr=1e-3, sparse_rows=names)
        )
        g, _, _ = inner.pseudo_gradients(tp_batch(cfg, lanes=3))
        assert g["item_emb.weight"].is_sparse == sparse
        outer.step([g[n] for n, _ in model.named_parameters()])
        grads[sparse] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, value in grads[False].items():
        torch.testing.assert_close(grads[True][name], value, rtol=1e-6, atol=1e-7)


def test_auto_turns_sparse_for_large_catalogues_with_sampled_losses():
    def cfg(*o):
        return load_config(None, list(o))

    sampled = ("train.loss=sampled_softmax",)
    assert sparse_item_updates(cfg(*sampled), SPARSE_ITEMS_FROM)
    assert not sparse_item_updates(cfg(*sampled), SPARSE_ITEMS_FROM - 1)
    assert not sparse_item_updates(cfg(), 10 * SPARSE_ITEMS_FROM)  # ce
    assert sparse_item_updates(cfg(*sampled, "train.item_updates=sparse"), 10)
    tp_sgd = cfg(*sampled, "train.method=tp", "tp.outer_optimizer=sgd")
    assert not sparse_item_updates(tp_sgd, SPARSE_ITEMS_FROM)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["train.item_updates=sparse"], "train.item_updates"),
        (["train.item_updates=rows", "train.loss=bce"], "train.item_updates"),
        (["train.shared_negatives=true", "train.loss=bce"], "train.shared_negatives"),
    ],
)
def test_bad_row_settings_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, overrides)


def test_resume_across_item_update_modes_is_refused(prepared):
    _, dense = _joint(prepared, "train.item_updates=dense")
    _, sparse = _joint(prepared, "train.item_updates=sparse")
    with pytest.raises(ConfigError, match="train.item_updates"):
        sparse.load_state_dict(dense.state_dict())
    with pytest.raises(ConfigError, match="train.item_updates"):
        dense.load_state_dict(sparse.state_dict())
