"""Test-time adaptation (``eval.adapt_*``, dist_tp/evaluation/adapt.py): each user's own SGD
steps on its windows before the query, vectorised over users, checked against a plain
per-user loop; the windows never hold the query's target; evaluation, the CLI and the
Predictor with it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_tp.cli import main
from dist_tp.config import load_config
from dist_tp.data.examples import eval_queries
from dist_tp.data.stream import UserSequences, load_sequences
from dist_tp.evaluation import adapt as adapt_module
from dist_tp.evaluation.adapt import (
    Adaptation,
    adapt_users,
    adaptation_negatives,
    adaptation_windows,
    encoder_rows,
    last_parameter_names,
    sequence_windows,
)
from dist_tp.evaluation.evaluate import evaluate
from dist_tp.evaluation.recommend import Predictor
from dist_tp.models import build_model
from dist_tp.run.loop import run_training

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
NUM_ITEMS = 30
STEPS, LR, WINDOWS, MAX_LEN = 3, 0.3, 4, 6


def small_users(seed: int = 0, users: int = 8) -> UserSequences:
    """Users of 2..14 distinct items (some with no window at all, some with more than W)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 15, users)
    lengths[0] = 2  # offset 1: one input item, no adaptation window
    items = np.concatenate(
        [rng.choice(np.arange(1, NUM_ITEMS + 1), n, replace=False) for n in lengths]
    )
    return UserSequences(
        user=np.arange(users, dtype=np.int32) + 5,
        is_new=np.zeros(users, bool),
        is_head=np.zeros(users, bool),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        items=items.astype(np.int32),
    )


def small_model(backbone: str, loss: str, *overrides: str):
    """A tiny model (dropout on: adaptation must switch it off), an output table with a
    non-zero bias where asked, item popularity set."""
    loss, _, negatives = loss.partition("-")
    cfg = load_config(
        None,
        [
            f"model.name={backbone}",
            "model.dim=8",
            f"model.max_len={MAX_LEN}",
            "model.num_heads=2",
            "model.num_layers=2",
            "model.dropout=0.3",
            "model.caser_nh=2",
            "model.caser_nv=2",
            f"train.loss={loss}",
            f"train.negatives={negatives or 'uniform'}",
            "train.num_negatives=3",
            *overrides,
        ],
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, NUM_ITEMS)
    if model.out_bias is not None:
        with torch.no_grad():
            model.out_bias.normal_()
    model.set_item_popularity(np.arange(NUM_ITEMS + 1) % 5)
    model.train()  # left as training left it: adaptation runs in eval mode all the same
    return model, Adaptation(
        steps=STEPS,
        lr=LR,
        params="all",
        windows=WINDOWS,
        loss=loss,
        num_negatives=3,
        negatives=negatives or "uniform",
    )


def reference(model, win, u: int, adaptation: Adaptation, query: np.ndarray):
    """User ``u`` adapted the plain way: a copy of the model in eval mode, torch.optim.SGD on
    the selected parameters over its real windows (mean loss), for ``last`` the item rows'
    gradients zeroed outside its own items. Returns (model, scores of its query)."""
    m = copy.deepcopy(model).eval()
    n = int(win.counts[u])
    rows = set(m.item_row_names())
    chosen = set(last_parameter_names(m)) | rows
    own = torch.zeros(m.num_items + 1, dtype=torch.bool)
    own[torch.as_tensor(np.concatenate([win.inputs[u].ravel(), win.targets[u], query]))] = True
    own[0] = False
    params = [p for name, p in m.named_parameters() if adaptation.params == "all" or name in chosen]
    opt = torch.optim.SGD(params, lr=adaptation.lr)
    negatives = adaptation_negatives(win, adaptation, m.num_items, m.neg_cdf)
    kind, sampling = adaptation.loss, adaptation.negatives
    for step in range(adaptation.steps):
        opt.zero_grad()
        emb = m.encode(torch.as_tensor(win.inputs[u, :n]))
        kwargs = {"sampling": sampling} if kind == "sampled_softmax" else {}
        if negatives is not None and sampling != "in_batch":
            kwargs["negatives"] = torch.as_tensor(negatives[u, step, :n])
        loss = m.loss(emb, torch.as_tensor(win.targets[u, :n]), kind=kind, **kwargs)
        loss.backward()
        if adaptation.params == "last":
            for name, p in m.named_parameters():
                if name in rows and p.grad is not None:
                    p.grad[~own] = 0
        opt.step()
    with torch.no_grad():
        scores = m.score_all(m.encode(torch.as_tensor(query[None])))[0]
    return m, scores


CASES = [
    ("sasrec", "ce", "all"),
    ("sasrec", "ce", "last"),
    ("sasrec", "bce", "all"),
    ("sasrec", "bce", "last"),
    ("sasrec", "sampled_softmax-popularity", "last"),
    ("sasrec", "sampled_softmax-in_batch", "all"),
    ("gru4rec", "ce", "all"),
    ("gru4rec", "ce", "last"),
    ("gru4rec", "sampled_softmax-uniform", "all"),
    ("gru4rec", "bce", "last"),
    ("caser", "bce", "last"),
]


@pytest.mark.parametrize("backbone,loss,params", CASES)
@pytest.mark.parametrize("output_table", [False, True])
def test_vectorised_adaptation_equals_a_per_user_sgd_loop(backbone, loss, params, output_table):
    """Every user's adapted parameters and query scores as with its own copy of the model and
    torch.optim.SGD (to 1e-5): dense tables (ce), the touched rows of the sampled losses,
    ``last``'s masks, pad windows left out, dropout off."""
    model, adaptation = small_model(backbone, loss, f"model.output_table={output_table}")
    adaptation = Adaptation(**{**adaptation.__dict__, "params": params})
    seqs = small_users()
    win = adaptation_windows(seqs, max_len=MAX_LEN, offset=1, windows=WINDOWS)
    queries = eval_queries(seqs, max_len=MAX_LEN, offset=1)
    keep = np.flatnonzero(win.counts > 0)
    assert 0 < len(keep) < len(win) and win.counts.max() == WINDOWS  # padding and no window
    win = win.take(keep)
    users = adapt_users(model, win, adaptation, query_inputs=queries.inputs[keep])
    scores = users.score_all(users.encode(torch.as_tensor(queries.inputs[keep])))
    assert model.training  # left as it was
    theta = {n: p.detach() for n, p in model.named_parameters()}
    moved = 0.0
    for u in range(len(win)):
        ref, ref_scores = reference(model, win, u, adaptation, queries.inputs[keep][u])
        got = users.parameters(u)
        for name, value in ref.named_parameters():
            torch.testing.assert_close(got[name], value.detach(), atol=1e-5, rtol=1e-4)
            moved = max(moved, float((value.detach() - theta[name]).abs().max()))
        torch.testing.assert_close(scores[u], ref_scores, atol=1e-5, rtol=1e-5)
    assert moved > 1e-3  # not a no-op


def test_the_unrolled_gru_of_a_gpu_adapts_the_same(monkeypatch):
    """GRU4Rec as a GPU runs it (unrolled into plain tensor operations), here on the CPU:
    the same adapted parameters as the per-user loop."""
    from dist_tp.models.gru4rec import GRU4Rec

    monkeypatch.setattr(GRU4Rec, "unrolled", True)
    model, adaptation = small_model("gru4rec", "bce")
    adaptation = Adaptation(**{**adaptation.__dict__, "params": "last"})
    seqs = small_users()
    win = adaptation_windows(seqs, max_len=MAX_LEN, offset=1, windows=WINDOWS)
    keep = np.flatnonzero(win.counts > 0)
    q = eval_queries(seqs, max_len=MAX_LEN, offset=1).inputs[keep]
    win = win.take(keep)
    users = adapt_users(model, win, adaptation, query_inputs=q)
    scores = users.score_all(users.encode(torch.as_tensor(q)))
    monkeypatch.setattr(GRU4Rec, "unrolled", False)
    for u in range(len(win)):
        ref, ref_scores = reference(model, win, u, adaptation, q[u])
        got = users.parameters(u)
        for name, value in ref.named_parameters():
            torch.testing.assert_close(got[name], value.detach(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(scores[u], ref_scores, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec"])
def test_shared_rows_give_every_window_its_own_embedding(backbone):
    """An all-positions encoder reads a user's windows from shared rows: the windows within
    its first L+1 items from one row, each later one from a row of its own. Every window's
    embedding there equals encoding it alone, and short users need one row, not W."""
    model, _ = small_model(backbone, "bce")
    model.eval()
    seqs = small_users(seed=3, users=30)
    win = adaptation_windows(seqs, max_len=MAX_LEN, offset=1, windows=WINDOWS)
    win = win.take(np.flatnonzero(win.counts > 0))
    assert adapt_module.row_mode(model) == "prefix"
    layout = encoder_rows(win, MAX_LEN, mode="prefix")
    late = ((win.positions > MAX_LEN) & (win.weights > 0)).sum(1)
    early = ((win.positions <= MAX_LEN) & (win.weights > 0)).any(1)
    assert np.array_equal(layout.counts, late + early)
    assert (layout.counts < win.counts).any() and (late > 0).any() and (late * early).any()
    assert (layout.counts[win.positions[:, 0] <= MAX_LEN] == 1).all()  # short users: one row
    with torch.no_grad():
        out = model.encode_all(torch.as_tensor(layout.rows.reshape(-1, MAX_LEN)))
        out = out.reshape(*layout.rows.shape, -1)  # [U, R, L, D]
        alone = model.encode(torch.as_tensor(win.inputs.reshape(-1, MAX_LEN)))  # [U*W, D]
    u = np.arange(len(win))[:, None]
    got = out[u, layout.slot_row, layout.slot_pos].reshape(alone.shape)
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)


def test_row_modes_follow_what_the_encoder_reads():
    """Caser reads whole windows only; an encoder's all-positions pass takes no row longer
    than L (a later position would read more than L items)."""
    gru, _ = small_model("gru4rec", "bce")
    with pytest.raises(ValueError, match="model.max_len"):
        gru.encode_all(torch.ones(2, MAX_LEN + 1, dtype=torch.long))
    caser, _ = small_model("caser", "bce")
    assert adapt_module.row_mode(caser) == "windows"
    assert adapt_module.row_mode(gru, "windows") == "windows"
    with pytest.raises(ValueError, match="prefix"):
        adapt_module.row_mode(caser, "prefix")


def test_users_are_chunked_by_their_rows_within_the_budget(monkeypatch):
    """Users with a window, each once, ordered by the positions their rows hold, and no
    chunk over the budget its largest user sets (nor over ``limit``)."""
    model, adaptation = small_model("gru4rec", "bce")
    seqs = small_users(seed=3, users=30)
    win = adaptation_windows(seqs, max_len=MAX_LEN, offset=1, windows=WINDOWS)
    rows = encoder_rows(win, MAX_LEN, mode="prefix").counts
    per_user = adapt_module.users_per_chunk(model, adaptation, MAX_LEN, 1)
    monkeypatch.setattr(adapt_module, "BUDGET_FLOATS", adapt_module.BUDGET_FLOATS * 3 // per_user)
    chunks = adapt_module.user_chunks(model, win, adaptation)
    together = np.concatenate(chunks)
    assert sorted(together) == list(np.flatnonzero(win.counts > 0))
    assert (np.diff(rows[together]) >= 0).all()
    assert len(chunks) > 2 and max(map(len, chunks)) == 3
    for idx in chunks:
        assert len(idx) <= adapt_module.users_per_chunk(model, adaptation, MAX_LEN, rows[idx].max())
    assert max(map(len, adapt_module.user_chunks(model, win, adaptation, limit=2))) == 2


def test_last_changes_only_the_last_block_the_norms_and_the_users_own_rows():
    for backbone, expect in (
        ("sasrec", {"encoder.blocks.1.", "encoder.final_ln.", "encoder.blocks.0.ln_"}),
        ("gru4rec", {"encoder.gru.weight_ih_l1", "encoder.gru.bias_hh_l1"}),
        ("caser", {"encoder.fc."}),
    ):
        model, adaptation = small_model(backbone, "bce", "model.output_table=true")
        names = last_parameter_names(model)
        for prefix in expect:
            assert any(n.startswith(prefix) for n in names), (backbone, prefix, names)
        assert not any(
            n.startswith(("encoder.blocks.0.qkv", "encoder.gru.weight_ih_l0")) for n in names
        )
        adaptation = Adaptation(**{**adaptation.__dict__, "params": "last"})
        seqs = small_users()
        win = adaptation_windows(seqs, max_len=MAX_LEN, offset=1, windows=WINDOWS)
        keep = np.flatnonzero(win.counts > 0)
        q = eval_queries(seqs, max_len=MAX_LEN, offset=1).inputs[keep]
        win = win.take(keep)
        users = adapt_users(model, win, adaptation, query_inputs=q)
        theta = {n: p.detach() for n, p in model.named_parameters()}
        rows = set(model.item_row_names())
        for u in range(len(win)):
            got = users.parameters(u)
            own = np.zeros(NUM_ITEMS + 1, dtype=bool)
            own[np.concatenate([win.inputs[u].ravel(), win.targets[u], q[u]])] = True
            own[0] = False
            for name, value in got.items():
                changed = (value != theta[name]).reshape(value.shape[0], -1).any(1)
                if name in rows:
                    assert not changed[torch.from_numpy(~own)].any(), name  # other rows fixed
                    assert changed[torch.from_numpy(own)].any(), name
                elif name not in names:
                    assert not changed.any(), name


def test_the_windows_stop_before_the_query_target():
    """offset 1 (test): targets s_2..s_{n-1}, the latest W, windows of the L items before
    each; offset 2 (validation) one fewer; the last item(s) never reach the adapted
    parameters."""
    seqs = small_users()
    n = seqs.lengths
    for offset in (1, 2):
        win = adaptation_windows(seqs, max_len=MAX_LEN, offset=offset, windows=WINDOWS)
        q = eval_queries(seqs, max_len=MAX_LEN, offset=offset)
        assert np.array_equal(win.user, q.user)
        ok = n - offset >= 1
        for u, (start, length) in enumerate(zip(seqs.offsets[:-1][ok], n[ok])):
            items = seqs.items[start : start + length]
            count = min(max(length - offset - 1, 0), WINDOWS)
            assert win.counts[u] == count and win.weights[u].sum() == count
            for j in range(count):  # most recent first: target at 0-based n-offset-1-j
                pos = length - offset - 1 - j
                assert win.targets[u, j] == items[pos] and pos <= length - offset - 1
                window = items[max(0, pos - MAX_LEN) : pos]
                assert list(win.inputs[u, j][MAX_LEN - len(window) :]) == list(window)
                assert not win.inputs[u, j][: MAX_LEN - len(window)].any()
            if count:  # the test target (and for validation, the validation one) nowhere
                latest = win.inputs[u, 0][-1] if offset == 1 else None
                assert win.targets[u, 0] == items[length - offset - 1]
                assert latest is None or latest == items[length - 3]
    # changing each user's last item (and second-to-last, for validation) changes nothing
    model, adaptation = small_model("sasrec", "bce")
    for offset in (1, 2):
        other = copy.deepcopy(seqs)
        ends = other.offsets[1:]
        for back in range(1, offset + 1):
            other.items[ends - back] = (other.items[ends - back] % NUM_ITEMS) + 1
        a = adaptation_windows(seqs, max_len=MAX_LEN, offset=offset, windows=WINDOWS)
        b = adaptation_windows(other, max_len=MAX_LEN, offset=offset, windows=WINDOWS)
        keep = np.flatnonzero(a.counts > 0)
        ua = adapt_users(model, a.take(keep), adaptation)
        ub = adapt_users(model, b.take(keep), adaptation)
        for u in range(len(keep)):
            pa, pb = ua.parameters(u), ub.parameters(u)
            assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_sampled_negatives_are_seeded_by_the_user_not_the_batch():
    seqs = small_users()
    _, adaptation = small_model("sasrec", "bce")
    win = adaptation_windows(seqs, max_len=MAX_LEN, offset=1, windows=WINDOWS)
    whole = adaptation_negatives(win, adaptation, NUM_ITEMS)
    assert whole.shape == (len(win), STEPS, WINDOWS, 3)
    assert (whole != win.targets[:, None, :, None]).all() and whole.min() >= 1
    assert whole.max() <= NUM_ITEMS
    part = adaptation_negatives(win.take(np.array([5, 2])), adaptation, NUM_ITEMS)
    assert np.array_equal(part, whole[[5, 2]])
    assert not np.array_equal(whole[:, 0], whole[:, 1])  # new negatives each step


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    """A tiny SASRec trained one epoch on ML-100K with ``eval.adapt_steps=1`` (adapted
    final evaluation, on a sample of users): its run folder and saved run."""
    path = prepared("ml-100k")
    folder = tmp_path_factory.mktemp("adapt-run")
    overrides = ["train.epochs=1", "track.enabled=false", "eval.max_users=60"]
    overrides += ["eval.adapt_steps=1", "eval.adapt_windows=4"]
    cfg = load_config(TINY, [f"data.path={path}", *overrides])
    run_training(cfg, folder)
    from dist_tp.models.saved import load_run

    return folder, load_run(folder)


def flat(metrics: dict, prefix: str = "") -> dict:
    """Nested figures as one level: ``test/new/all/HR@10``."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = value
    return out


def eval_kw(cfg, **extra):
    return dict(max_len=cfg.model.max_len, ks=[1, 10], max_users=150, sample_seed=3, **extra)


def test_zero_steps_is_the_unadapted_evaluation_without_the_adaptation_code(trained, monkeypatch):
    _, saved = trained
    kw = eval_kw(saved.cfg)
    plain = evaluate(saved.model, saved.data, **kw)

    def refuse(*args, **kwargs):
        raise AssertionError("adaptation ran")

    monkeypatch.setattr("dist_tp.evaluation.evaluate.adapt_users", refuse)
    assert evaluate(saved.model, saved.data, adapt_steps=0, adapt_params="last", **kw) == plain


@pytest.mark.parametrize("params", ["all", "last"])
def test_adaptation_changes_the_metrics_whatever_the_batching(trained, params):
    """On ML-100K: adapted figures differ from the unadapted ones; users per batch, users
    per adaptation chunk and items per scoring chunk leave them as they are."""
    _, saved = trained
    kw = eval_kw(saved.cfg, adapt_lr=1.0, adapt_params=params, adapt_windows=8)
    plain = evaluate(saved.model, saved.data, **eval_kw(saved.cfg))
    adapted = evaluate(saved.model, saved.data, adapt_steps=2, batch_size=512, **kw)
    assert adapted != plain
    for split in ("validation", "test"):
        for role in adapted[split]:
            a, p = adapted[split][role]["all"], plain[split][role]["all"]
            assert a["users"] == p["users"] > 0
    changed = [
        adapted[s][r]["all"]["NDCG@10"] != plain[s][r]["all"]["NDCG@10"]
        for s in adapted
        for r in adapted[s]
    ]
    assert all(changed)
    small = evaluate(saved.model, saved.data, adapt_steps=2, batch_size=37, item_chunk=300, **kw)
    # the same ranks; the sums of NDCG only added in another order
    assert flat(small) == pytest.approx(flat(adapted), abs=1e-12)


def test_adaptation_with_a_sampled_loss_in_item_chunks(trained, monkeypatch):
    """bce (touched rows, seeded negatives): the same figures with the catalogue scored in
    chunks, and in small adaptation chunks; twice the same."""
    _, saved = trained
    kw = eval_kw(saved.cfg, adapt_steps=1, loss="bce", num_negatives=2, splits=("test",))
    whole = evaluate(saved.model, saved.data, **kw)
    assert whole == evaluate(saved.model, saved.data, **kw)
    monkeypatch.setattr(adapt_module, "BUDGET_FLOATS", 1)  # one user per chunk
    chunked = evaluate(saved.model, saved.data, item_chunk=97, **kw)
    assert flat(chunked) == pytest.approx(flat(whole), abs=1e-12)
    assert chunked == whole


def test_a_run_adapts_its_final_evaluation_and_evaluate_can_change_it(trained, tmp_path, capsys):
    """``dist-tp train ... eval.adapt_steps=1``: metrics.json adapted and saying so, the
    validation of model selection unadapted; ``dist-tp evaluate RUN eval.adapt_steps=...``
    recomputes it with other settings."""
    folder, saved = trained
    record = {"steps": 1, "lr": 0.1, "params": "all", "windows": 4}
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["adapt"] == record
    kw = dict(max_len=saved.cfg.model.max_len, ks=[10], max_users=60, splits=("validation",))
    history = json.loads((folder / "history.json").read_text())
    plain = evaluate(saved.model, saved.data, **kw)["validation"]["existing"]["all"]
    adapted = evaluate(saved.model, saved.data, adapt_steps=1, adapt_windows=4, **kw)
    assert history[-1]["valid_ndcg10"] == plain["NDCG@10"]  # selection: unadapted
    assert metrics["validation"]["existing"]["all"]["NDCG@10"] == pytest.approx(
        adapted["validation"]["existing"]["all"]["NDCG@10"], abs=1e-12
    )
    out = tmp_path / "other.json"
    assert main(["evaluate", str(folder), "eval.adapt_steps=0", "--out", str(out)]) == 0
    assert "adapt" not in json.loads(out.read_text())
    argv = ["evaluate", str(folder), "eval.adapt_steps=2", "eval.adapt_params=last"]
    assert main([*argv, "eval.adapt_lr=1", "--out", str(out)]) == 0
    again = json.loads(out.read_text())
    assert again["adapt"] == {**record, "steps": 2, "params": "last", "lr": 1.0}
    assert again["validation"] != metrics["validation"]
    capsys.readouterr()


def test_predictor_adapts_a_sequence_on_its_own_windows(trained):
    folder, saved = trained
    predictor = Predictor.from_run(folder)
    assert predictor.adaptation.steps == 1  # the run's eval config
    seqs = load_sequences(saved.data, roles=["new"])
    ids = predictor.original
    sequences = [
        [ids[i - 1] for i in seqs.items[seqs.offsets[u] : seqs.offsets[u + 1]]] for u in range(20)
    ]
    plain = predictor.recommend_many(sequences, n=10, adapt_steps=0)
    assert predictor.recommend_many(sequences, n=10) == predictor.recommend_many(
        sequences, n=10, adapt_steps=1
    )
    adapted = predictor.recommend_many(sequences, n=10, adapt_steps=3)
    assert adapted != plain
    # one at a time as in a batch; the same again (no randomness, dropout off)
    assert predictor.recommend(sequences[3], n=10, adapt_steps=3) == adapted[3]
    assert predictor.recommend_many(sequences, n=10, adapt_steps=3, batch_size=7) == adapted
    # a single-item sequence has no window: unadapted
    assert predictor.recommend([sequences[0][0]], adapt_steps=3) == predictor.recommend(
        [sequences[0][0]], adapt_steps=0
    )


def test_sequence_windows_cover_every_target_after_the_first():
    win = sequence_windows([[3, 4, 5, 6], [7], []], max_len=2, windows=8)
    assert list(win.counts) == [3, 0, 0]
    assert list(win.targets[0, :3]) == [6, 5, 4]
    assert win.inputs[0, :3].tolist() == [[4, 5], [3, 4], [0, 3]]
