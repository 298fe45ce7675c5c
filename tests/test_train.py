"""Configs, training rows, the joint trainer, evaluation output, the CLI and recommend()."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import crash_after_checkpoint

from dist_tp.algorithms.joint import rows_loss
from dist_tp.cli import main
from dist_tp.config import ConfigError, load_config
from dist_tp.data.examples import Rows, eval_queries, training_rows
from dist_tp.data.protocol import ProtocolOptions
from dist_tp.data.stream import UserSequences, UserStream, load_sequences, open_prepared
from dist_tp.models import build_model
from dist_tp.run.loop import run_training

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def tiny(prepared, *overrides: str):
    return load_config(TINY, [f"data.path={prepared('ml-100k')}", *overrides])


# ---------------------------------------------------------------- config


def test_unknown_key_and_wrong_type_are_named():
    with pytest.raises(ConfigError, match="'train.epoch'"):
        load_config(TINY, ["train.epoch=3"])
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        load_config(TINY, ["train.epochs=three"])
    with pytest.raises(ConfigError, match="model.dropout"):
        load_config(TINY, ["model.dropout=high"])
    cfg = load_config(TINY, ["train.lr=1", "eval.ks=[1,2]", "data.path=x"])
    assert cfg.train.lr == 1.0 and cfg.eval.ks == [1, 2] and cfg.data.path == "x"
    # YAML 1.1 reads 1e-3 (no dot) as a string; a float key takes it as the number it is
    cfg = load_config(TINY, ["train.lr=1e-3", "tp.inner_lr=2E+1", "tp.lambda_adv=.5e-1"])
    assert (cfg.train.lr, cfg.tp.inner_lr, cfg.tp.lambda_adv) == (1e-3, 20.0, 0.05)
    with pytest.raises(ConfigError, match="train.lr: expected float, got '1e-3x'"):
        load_config(TINY, ["train.lr=1e-3x"])


def test_every_shipped_config_loads():
    files = sorted((REPO / "configs").rglob("*.yaml"))
    assert len(files) >= 21
    for path in files:
        cfg = load_config(path)
        if cfg.train.engine == "deepspeed":  # the JSON it names is valid too
            from dist_tp.parallel.deepspeed_engine import read_config

            read_config(str(REPO / cfg.train.deepspeed))


# ---------------------------------------------------------------- rows


def _brute_force_windows(seq: list[int], max_len: int) -> set[tuple]:
    train = seq[:-2]
    return {(tuple(train[max(0, t - max_len) : t]), train[t]) for t in range(1, len(train))}


def _rows_to_windows(rows, all_positions: bool) -> set[tuple]:
    out = set()
    for inp, tgt in zip(rows.inputs, rows.targets):
        for j in np.flatnonzero(tgt):
            window = inp[: j + 1] if all_positions else inp
            out.add((tuple(int(x) for x in window if x), int(tgt[j])))
    return out


def _existing_users(items: list[np.ndarray]) -> UserSequences:
    """Existing users 1..U with these item sequences."""
    users = len(items)
    return UserSequences(
        user=np.arange(1, users + 1, dtype=np.int32),
        is_new=np.zeros(users, bool),
        is_head=np.zeros(users, bool),
        offsets=np.concatenate([[0], np.cumsum([len(x) for x in items])]),
        items=np.concatenate(items).astype(np.int32),
    )


@pytest.mark.parametrize("all_positions", [True, False])
def test_training_rows_are_exactly_the_papers_windows(all_positions):
    rng = np.random.default_rng(0)
    lengths = [3, 4, 7, 12, 25]
    # distinct items per user so each (window, target) pair is unique
    items = [rng.choice(np.arange(1, 500), n, replace=False) for n in lengths]
    seqs = _existing_users(items)
    rows = training_rows(seqs, max_len=5, all_positions=all_positions)
    expected = set().union(*(_brute_force_windows(list(s), 5) for s in items))
    assert _rows_to_windows(rows, all_positions) == expected
    assert rows.windows.sum() == sum(max(n - 3, 0) for n in lengths)


@pytest.mark.parametrize("stride", [2, 3, 5])
def test_strided_rows_hold_every_window_once_with_at_least_l_minus_s_plus_1_items(stride):
    """train.row_stride: targets past a user's first L share rows, S to a row; each target
    is there once, after the last L − S + 1 to L items of its window (the whole window when
    it is shorter); stride 1 is the exact rows."""
    rng = np.random.default_rng(0)
    lengths = [3, 4, 7, 12, 25, 31]
    distinct = rng.permutation(np.arange(1, 500))  # no item twice, in any user: targets are keys
    seqs = _existing_users(np.split(distinct[: sum(lengths)], np.cumsum(lengths)[:-1]))
    exact = training_rows(seqs, max_len=5, all_positions=True)
    one = training_rows(seqs, max_len=5, all_positions=True, stride=1)
    assert np.array_equal(one.inputs, exact.inputs) and np.array_equal(one.targets, exact.targets)
    rows = training_rows(seqs, max_len=5, all_positions=True, stride=stride)
    windows = {target: window for window, target in _rows_to_windows(exact, True)}
    seen = [(w, t) for i, t_row in zip(rows.inputs, rows.targets) for w, t in
            _rows_to_windows(Rows(i[None], t_row[None]), True)]  # fmt: skip
    assert sorted(t for _, t in seen) == sorted(windows)  # every target, once
    for window, target in seen:
        full = windows[target]
        assert full[len(full) - len(window) :] == window  # a suffix of its window
        assert len(window) >= min(len(full), 5 - stride + 1)
    later = sum(max(n - 3 - 5, 0) for n in lengths)  # targets past the first L = 5
    assert len(exact) - len(rows) == later - sum(-(-max(n - 8, 0) // stride) for n in lengths)


@pytest.mark.parametrize("all_positions", [True, False])
def test_user_balanced_rows_give_the_mean_of_per_user_losses(all_positions):
    rng = np.random.default_rng(1)
    lengths = [3, 4, 7, 12, 25]
    seqs = UserSequences(
        user=np.arange(1, 6, dtype=np.int32),
        is_new=np.zeros(5, bool),
        is_head=np.zeros(5, bool),
        offsets=np.concatenate([[0], np.cumsum(lengths)]),
        items=rng.integers(1, 40, sum(lengths)).astype(np.int32),
    )
    plain = training_rows(seqs, max_len=5, all_positions=all_positions)
    rows = training_rows(seqs, max_len=5, all_positions=all_positions, balance="user")
    assert np.array_equal(rows.inputs, plain.inputs) and plain.weights is None
    assert rows.weights[rows.targets == 0].sum() == 0
    assert rows.weights[rows.targets > 0].mean() == pytest.approx(1.0)
    cfg = load_config(TINY, ["model.dropout=0.0", "model.max_len=5"])
    if not all_positions:
        cfg.model.name = "caser"
    torch.manual_seed(0)
    model = build_model(cfg.model, 40).eval()
    kw = dict(kind="ce", num_negatives=1, generator=None)
    t = torch.from_numpy
    weighted = rows_loss(model, t(rows.inputs), t(rows.targets), weights=t(rows.weights), **kw)
    per_user = []  # each user with windows, alone: its mean loss
    for u, n in enumerate(lengths):
        if n - 3 > 0:
            one = training_rows(seqs.select(np.arange(5) == u), max_len=5,
                                all_positions=all_positions)  # fmt: skip
            per_user.append(float(rows_loss(model, t(one.inputs), t(one.targets), **kw).detach()))
    assert float(weighted) == pytest.approx(np.mean(per_user), rel=1e-5)
    # 22 windows of the longest user share what the one window of the 4-item user has
    assert rows.weights.max() == pytest.approx(22 * rows.weights[rows.weights > 0].min())


def test_user_balance_is_for_joint_training():
    with pytest.raises(ConfigError, match="TP weighs users by tp.user_sampling"):
        load_config(TINY, ["train.method=tp", "train.balance=user"])
    with pytest.raises(ConfigError, match="train.balance must be window, user or power"):
        load_config(TINY, ["train.balance=items"])


def test_eval_queries_use_the_items_before_the_target():
    seqs = UserSequences(
        np.array([1], np.int32),
        np.zeros(1, bool),
        np.array([True]),
        np.array([0, 6]),
        np.array([9, 8, 7, 6, 5, 4], np.int32),
    )
    val = eval_queries(seqs, max_len=3, offset=2)
    test = eval_queries(seqs, max_len=3, offset=1)
    assert val.inputs.tolist() == [[8, 7, 6]] and val.targets.tolist() == [5]
    assert test.inputs.tolist() == [[7, 6, 5]] and test.targets.tolist() == [4]
    assert sorted(test.history[0].tolist()) == [5, 6, 7, 8, 9]


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def pop_metrics(prepared, tmp_path_factory):
    cfg = tiny(prepared, "model.name=pop")
    return run_training(cfg, tmp_path_factory.mktemp("pop"))


def test_popularity_counts_each_existing_users_training_items(prepared):
    """Streamed counts: every existing user's items but the last two (validation, test)."""
    path = prepared("ml-100k", row_group_size=100)
    seqs = load_sequences(path, roles=["existing"])
    expected = np.zeros(open_prepared(path).num_items + 1, dtype=np.int64)
    for u in range(len(seqs)):
        for item in seqs.items[seqs.offsets[u] : seqs.offsets[u + 1] - 2]:
            expected[item] += 1
    np.testing.assert_array_equal(open_prepared(path).training_counts(), expected)


def test_metrics_json_shape(prepared, pop_metrics, tmp_path):
    ks = [1, 5, 10]
    for role in ("existing", "new"):
        for group in ("all", "head", "tail"):
            assert set(pop_metrics[role][group]) == {
                *(f"HR@{k}" for k in ks),
                *(f"NDCG@{k}" for k in ks),
                "users",
            }
    assert pop_metrics["existing"]["all"]["users"] == 754
    assert pop_metrics["new"]["all"]["users"] == 189
    head, tail = pop_metrics["new"]["head"]["users"], pop_metrics["new"]["tail"]["users"]
    assert (head, tail) == (38, 151)
    assert set(pop_metrics["validation"]) == {"existing", "new"}
    assert pop_metrics["validation"]["new"]["all"]["users"] == 189


@pytest.mark.parametrize(
    "backbone,overrides",
    [
        ("sasrec", ["train.epochs=2"]),
        ("gru4rec", ["model.dim=32", "train.epochs=3"]),
        ("caser", ["model.dim=32", "train.epochs=3"]),
        ("sasrec", ["train.epochs=2", "train.loss=sampled_softmax", "train.negatives=popularity"]),
        ("sasrec", ["train.epochs=2", "train.loss=sampled_softmax", "train.negatives=in_batch"]),
    ],
    ids=["sasrec", "gru4rec", "caser", "sasrec-sampled-popularity", "sasrec-in-batch"],
)
def test_short_run_beats_popularity(prepared, pop_metrics, tmp_path, backbone, overrides):
    cfg = tiny(prepared, f"model.name={backbone}", *overrides)
    metrics = run_training(cfg, tmp_path)
    assert metrics["existing"]["all"]["HR@10"] > pop_metrics["existing"]["all"]["HR@10"]
    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.yaml", "checkpoint.pt", "last.pt", "metrics.json", "history.json"} <= files


def test_same_seed_same_metrics_and_resume(prepared, tmp_path):
    cfg = tiny(prepared, "train.epochs=2", "train.loss=bce", "train.patience=9")
    a = run_training(cfg, tmp_path / "a")
    # mini-batches made in the loop, not ahead on a thread: the same run
    b = run_training(replace(cfg, train=replace(cfg.train, prefetch=0)), tmp_path / "b")
    assert a == {**b, "dataset": a["dataset"]}
    history = [json.loads((tmp_path / r / "history.json").read_text()) for r in "ab"]
    assert [h["loss"] for h in history[0]] == [h["loss"] for h in history[1]]
    # one epoch, then resume for the second: same result as two epochs in one go
    run_training(tiny(prepared, "train.epochs=1", "train.loss=bce"), tmp_path / "c")
    c = run_training(cfg, tmp_path / "c", resume=True)
    assert c["existing"] == a["existing"] and c["new"] == a["new"]
    other = run_training(tiny(prepared, "train.epochs=2", "train.seed=7"), tmp_path / "d")
    assert other["existing"] != a["existing"]


def test_a_run_starts_from_another_runs_weights(prepared, tmp_path, capsys):
    """train.init_from: joint weights as TP's start. At learning rates of 1e-12 (inner and
    outer) nothing moves, so the started run scores exactly as its source (a fresh
    initialisation would not: it is far from the trained source at any such tolerance)."""
    source = run_training(tiny(prepared, "train.epochs=1"), tmp_path / "source")
    still = ["train.method=tp", "train.lr=1e-12", "tp.inner_lr=1e-12", "tp.lanes=2"]
    started = run_training(
        tiny(
            prepared,
            "train.epochs=1",
            "train.epoch_steps=2",
            *still,
            f"train.init_from={tmp_path / 'source'}",
        ),
        tmp_path / "started",
    )
    for role in ("existing", "new"):
        for metric in ("HR@10", "NDCG@10"):
            got, want = started[role]["all"][metric], source[role]["all"][metric]
            assert got == pytest.approx(want, abs=1e-12)
    # other model settings, other prepared data, no such run: an error naming the key, and
    # nothing of the new run written
    out = ["--output", str(tmp_path / "bad")]
    data = f"data.path={prepared('ml-100k')}"
    other = f"data.path={prepared('ml-100k', options=ProtocolOptions(new_user_fraction=0.3))}"
    # the same ids laid out in other row groups are the same data; other splits are not
    identity = open_prepared(prepared("ml-100k")).identity
    assert open_prepared(prepared("ml-100k", row_group_size=100)).identity == identity
    assert open_prepared(other.split("=", 1)[1]).identity != identity
    init = f"train.init_from={tmp_path / 'source'}"
    for args, says in [
        ([data, init, "model.dim=8"], "model.dim: 16 there, 8 here"),
        ([other, init], "was not trained on the same prepared data"),
        ([data, f"train.init_from={tmp_path / 'nowhere'}"], "no such checkpoint"),
    ]:
        assert main(["train", str(TINY), "train.epochs=1", *args, *out]) == 2
        err = capsys.readouterr().err
        assert "train.init_from=" in err and says in err and "Traceback" not in err
        assert not (tmp_path / "bad" / "config.yaml").exists()


@pytest.mark.parametrize("method", ["joint", "tp"])
def test_epoch_steps_caps_each_epoch_and_each_epoch_reshuffles(prepared, tmp_path, method):
    cfg = tiny(
        prepared,
        f"train.method={method}",
        "tp.lanes=2",
        "train.epochs=2",
        "train.epoch_steps=3",
        "train.loss=sampled_softmax",
        "train.num_negatives=4",
        "train.patience=9",
    )
    run_training(cfg, tmp_path)
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history) == 2 and all("valid_ndcg10" in h for h in history)
    if method == "joint":
        assert [h["steps"] for h in history] == [3, 3]
        assert history[0]["windows"] < 3 * 2 * cfg.train.batch_size  # a part of a pass
    else:
        windows = 3 * 2 * cfg.tp.k * cfg.tp.users_per_step * cfg.tp.inner_batch
        assert [h["windows"] for h in history] == [windows, windows]
    assert history[0]["loss"] != history[1]["loss"]


def test_joint_run_killed_mid_epoch_resumes_exactly(prepared, tmp_path, monkeypatch):
    """A crash right after the mid-epoch checkpoint of step 10; ``--resume`` reads on from the
    stream position in ``last.pt`` (only the row groups from the checkpoint's pool on) and
    ends with the parameters, history and metrics of an uninterrupted run (dropout and
    negatives are seeded per step). A ``last.pt`` without positions (written by an earlier
    version) resumes the same way by skipping the epoch's first 10 mini-batches."""
    import shutil

    data = prepared("ml-100k", row_group_size=16)  # many small row groups: many pools
    cfg = load_config(
        TINY, [f"data.path={data}", "train.epochs=2", "train.loss=bce", "train.checkpoint_every=5"]
    )
    reads: list[tuple[int, str, int]] = []  # (epoch, file, row group) read for training
    read_unit = UserStream._read_unit

    def logged_read(self, file, group, position):
        if self.shuffle:
            reads.append((self.epoch, file, group))
        return read_unit(self, file, group, position)

    monkeypatch.setattr(UserStream, "_read_unit", logged_read)
    straight = run_training(cfg, tmp_path / "straight")
    straight_reads, reads[:] = list(reads), []

    out = tmp_path / "crashed"
    crash_after_checkpoint(monkeypatch, lambda folder: run_training(cfg, folder), out, 10)
    saved = torch.load(out / "last.pt", weights_only=True)
    saved.pop("checksum")  # edited below, as written by other ranks or an earlier version
    assert (saved["epoch"], saved["next_step"]) == (0, 10)
    assert saved["stepper"]["epoch_sums"]["count"] > 0
    [(unit, row, pool, done)] = saved["stepper"]["positions"]
    assert pool > 0 and done > 0  # past the first pool: something to skip
    other = tmp_path / "other-world"
    other.mkdir()
    torch.save({**saved, "world_size": 2}, other / "last.pt")
    with pytest.raises(ConfigError, match=r"last.pt: written in the middle of epoch 0 by 2"):
        run_training(cfg, other, resume=True)
    legacy = tmp_path / "legacy"
    shutil.copytree(out, legacy)
    del saved["stepper"]["positions"]
    torch.save(saved, legacy / "last.pt")

    reads.clear()
    resumed = run_training(cfg, out, resume=True)
    epoch0 = [r for r in straight_reads if r[0] == 0]
    assert [r for r in reads if r[0] == 0] == epoch0[unit:]  # the earlier row groups unread
    assert [r for r in reads if r[0] == 1] == [r for r in straight_reads if r[0] == 1]
    for run, metrics in ((out, resumed), (legacy, run_training(cfg, legacy, resume=True))):
        assert metrics["existing"] == straight["existing"] and metrics["new"] == straight["new"]
        a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
        b = torch.load(run / "last.pt", weights_only=True)
        for name, value in a["model"].items():
            torch.testing.assert_close(b["model"][name], value, rtol=0, atol=0)
        for x, y in zip(a["history"], b["history"], strict=True):
            assert (x["windows"], x["steps"]) == (y["windows"], y["steps"])
            assert x["loss"] == pytest.approx(y["loss"], rel=1e-12)
            assert x["valid_ndcg10"] == y["valid_ndcg10"]


def test_cli_train_then_evaluate_recomputes_the_same_metrics(prepared, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", str(TINY), f"data.path={prepared('ml-100k')}", "train.epochs=1"]
    threads = torch.get_num_threads()
    try:
        assert main([*args, "train.threads=1", "--output", str(out)]) == 0
        first = json.loads((out / "metrics.json").read_text())
        (out / "metrics.json").unlink()
        torch.set_num_threads(2)
        assert main(["evaluate", str(out)]) == 0
        assert torch.get_num_threads() == 1  # as the run was trained: it shares the machine
    finally:
        torch.set_num_threads(threads)
    assert json.loads((out / "metrics.json").read_text()) == first
    assert "| existing | all | 754 |" in capsys.readouterr().out
    # a checkpoint that does not fit its config: a clear error naming the file, no traceback
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state.pop("checksum")  # edited by hand: no longer the content it was written with
    state["model"]["encoder.extra.weight"] = torch.zeros(1)
    torch.save(state, out / "checkpoint.pt")
    assert main(["evaluate", str(out)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt: the checkpoint does not fit the model" in err
    assert '"encoder.extra.weight"' in err and "Traceback" not in err
    # a missing run and a file that is not a checkpoint: errors naming them
    assert main(["evaluate", str(tmp_path / "nowhere")]) == 2
    assert (
        "nowhere: no such checkpoint (a run folder holds checkpoint.pt)" in capsys.readouterr().err
    )
    (out / "checkpoint.pt").write_text("not a checkpoint")
    assert main(["evaluate", str(out)]) == 2
    assert "checkpoint.pt: not a dist_tp checkpoint" in capsys.readouterr().err


def test_evaluate_a_tp_run_and_with_other_eval_settings(prepared, tmp_path, capsys):
    run = tmp_path / "tp"
    cfg = tiny(prepared, "train.method=tp", "tp.lanes=2", "train.epochs=1", "train.seed=3")
    first = json.loads(json.dumps(run_training(cfg, run)))
    assert "discriminator" in first
    (run / "metrics.json").unlink()
    assert main(["evaluate", str(run)]) == 0
    assert json.loads((run / "metrics.json").read_text()) == first  # discriminator included
    out = tmp_path / "nohist.json"
    assert main(["evaluate", str(run), "eval.exclude_history=false", "--out", str(out)]) == 0
    nohist = json.loads(out.read_text())
    assert nohist["existing"]["all"]["HR@10"] != first["existing"]["all"]["HR@10"]
    assert json.loads((run / "metrics.json").read_text()) == first  # the run's own untouched
    capsys.readouterr()
    assert main(["evaluate", str(run), "eval.ks=[5]"]) == 0  # printed, not written
    assert "pass --out FILE" in capsys.readouterr().out
    assert main(["evaluate", str(run), "train.lr=1"]) == 2
    assert "only eval.* keys can change" in capsys.readouterr().err


def test_cli_reports_config_errors(tmp_path, capsys):
    assert main(["train", str(TINY), "train.bogus=1"]) == 2
    assert "unknown config key 'train.bogus'" in capsys.readouterr().err
    bad = {
        "train.epochs=-1": "train.epochs must be >= 1, got -1",
        "train.lr=0": "train.lr must be > 0, got 0.0",
        "tp.outer_lr=-1": "tp.outer_lr must be > 0, got -1.0",
        "eval.ks=[10,0]": "eval.ks[1] must be >= 1, got 0",
        "model.num_layers=0": "model.num_layers must be >= 1, got 0",
        "train.threads=-2": "train.threads must be >= 0, got -2",
    }
    for override, message in bad.items():
        assert main(["train", str(TINY), "data.path=x", override]) == 2
        assert message in capsys.readouterr().err, override
    assert main(["train", str(TINY)]) == 2
    assert "data.path is not set" in capsys.readouterr().err


def test_recommend_any_sequence(prepared, tmp_path):
    from dist_tp.evaluation.recommend import Predictor

    run_training(tiny(prepared, "train.epochs=1"), tmp_path)
    predictor = Predictor.from_run(tmp_path)
    seqs = load_sequences(prepared("ml-100k"), roles=["new"])
    history = [predictor.original[i - 1] for i in seqs.items[: seqs.offsets[1]]]
    top = predictor.recommend(history, n=10)
    assert len(top) == 10 and len(set(top)) == 10
    assert not set(top) & set(history)
    assert len(predictor.recommend(["no-such-item"], n=5)) == 5
    # batched: the same lists as one at a time, in order
    histories = [
        [predictor.original[i - 1] for i in seqs.items[seqs.offsets[u] : seqs.offsets[u + 1]]]
        for u in range(5)
    ]
    many = predictor.recommend_many([*histories, []], n=7, batch_size=2)
    assert many == [predictor.recommend(h, n=7) for h in [*histories, []]]


def test_recommend_command(prepared, tmp_path, capsys):
    from dist_tp.evaluation.recommend import Predictor

    run = tmp_path / "run"
    run_training(tiny(prepared, "train.epochs=1"), run)
    predictor = Predictor.from_run(run)
    ids = [str(x) for x in predictor.original[:3]]
    capsys.readouterr()
    assert main(["recommend", str(run), *ids, "-n", "5"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.split() == [str(x) for x in predictor.recommend(ids, n=5)]
    lines = tmp_path / "seqs.txt"
    lines.write_text(f"{ids[0]},{ids[1]}\n\n{ids[2]}\n")
    assert main(["recommend", str(run), "--input", str(lines), "-n", "3", "--json"]) == 0
    out = [json.loads(x)["items"] for x in capsys.readouterr().out.splitlines()]
    assert out == [predictor.recommend(s, n=3) for s in [ids[:2], [], ids[2:]]]
    assert main(["recommend", str(run)]) == 2  # no sequence given
    assert "give the items of one sequence" in capsys.readouterr().err
    assert main(["recommend", str(run), "--input", str(tmp_path / "nope.txt")]) == 2
    assert "nope.txt: cannot read" in capsys.readouterr().err


def test_a_run_evaluated_on_a_sample_writes_intervals_and_the_sample(prepared, tmp_path):
    from dist_tp.cli import format_metrics

    cfg = tiny(prepared, "model.name=pop", "eval.max_users=200", "eval.sample_seed=4")
    metrics = run_training(cfg, tmp_path)
    assert metrics["sample"] == {"max_users": 200, "seed": 4}
    existing = metrics["existing"]["all"]
    assert existing["users"] < 754 and existing["HR@10_lo"] <= existing["HR@10"]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["existing"]["all"]["NDCG@10_hi"] == existing["NDCG@10_hi"]
    assert "| existing | all |" in format_metrics(metrics)


def test_compiled_joint_step_trains_as_the_eager_one(prepared, tmp_path, monkeypatch):
    """train.compile: the joint forward and loss go through torch.compile (dynamic shapes)
    and train to the same losses and metrics. The compiler's graph capture and autograd run
    for real; the backend is AOT autograd's eager one (inductor's C++ code generation took
    minutes per shape on 2 cores and is for GPUs)."""
    real, modes = torch.compile, []

    def aot_eager(fn, **kwargs):
        modes.append(kwargs.get("mode"))
        return real(fn, backend="aot_eager", dynamic=kwargs.get("dynamic"))

    monkeypatch.setattr(torch, "compile", aot_eager)
    base = ["train.epochs=1", "train.epoch_steps=8", "model.dropout=0", "train.patience=9"]
    eager = run_training(tiny(prepared, *base), tmp_path / "eager")
    compiled = run_training(tiny(prepared, *base, "train.compile=default"), tmp_path / "c")
    assert modes == ["default"]
    history = [json.loads((tmp_path / r / "history.json").read_text()) for r in ("eager", "c")]
    assert history[1][0]["loss"] == pytest.approx(history[0][0]["loss"], rel=1e-5)
    for role in ("existing", "new"):
        got, want = compiled[role]["all"]["NDCG@10"], eager[role]["all"]["NDCG@10"]
        assert got == pytest.approx(want, abs=1e-4)
    for bad, says in [
        (["train.compile=fast"], "train.compile must be none, default"),
        (["train.compile=default", "train.method=tp"], "is for joint training on the plain"),
    ]:
        with pytest.raises(ConfigError, match=says):
            tiny(prepared, *bad)
