"""Full-ranking metrics against hand-computed ranks, masks, HR and NDCG values."""

from __future__ import annotations

import math

import pytest
import torch

from dist_tp.evaluation.metrics import finalize, metric_sums, ranks_from_scores, ranks_in_chunks


def test_plain_ranks() -> None:
    # Items 1..5; column 0 is padding and scored highest to check it is ignored.
    scores = torch.tensor(
        [
            [9.0, 0.5, 0.4, 0.3, 0.2, 0.1],
            [9.0, 0.5, 0.4, 0.3, 0.2, 0.1],
            [9.0, 0.5, 0.4, 0.3, 0.2, 0.1],
        ]
    )
    ranks = ranks_from_scores(scores, torch.tensor([1, 3, 5]))
    assert ranks.tolist() == [1, 3, 5]
    assert ranks.dtype == torch.long


def test_ties_count_against_the_model() -> None:
    constant = torch.zeros(2, 6)  # N = 5 items, all tied
    assert ranks_from_scores(constant, torch.tensor([1, 4])).tolist() == [5, 5]
    scores = torch.tensor([[0.0, 0.9, 0.5, 0.5, 0.5, 0.1]])
    # Target 3 ties with items 2 and 4 and trails item 1: 1 + 1 + 2 = 4.
    assert ranks_from_scores(scores, torch.tensor([3])).tolist() == [4]


def test_history_mask() -> None:
    scores = torch.tensor([[0.0, 0.9, 0.8, 0.7, 0.6, 0.5]])
    target = torch.tensor([4])
    assert ranks_from_scores(scores, target).tolist() == [4]
    # Items 1 and 2 are history: masked. 0 entries are padding.
    history = torch.tensor([[0, 0, 1, 2]])
    assert ranks_from_scores(scores, target, history=history).tolist() == [2]
    # The target itself in history is never masked; item 3 is.
    history = torch.tensor([[1, 4, 3, 2]])
    assert ranks_from_scores(scores, target, history=history).tolist() == [1]


def test_masked_items_do_not_tie_with_constant_target() -> None:
    scores = torch.zeros(1, 6)
    history = torch.tensor([[0, 1, 2, 3]])
    # Masked items drop to -inf; target 5 ties only with item 4 -> rank 2.
    assert ranks_from_scores(scores, torch.tensor([5]), history=history).tolist() == [2]


def test_input_not_modified_and_bad_targets() -> None:
    scores = torch.rand(2, 6)
    before = scores.clone()
    ranks_from_scores(scores, torch.tensor([1, 2]), history=torch.tensor([[1], [3]]))
    assert torch.equal(scores, before)
    with pytest.raises(ValueError):
        ranks_from_scores(scores, torch.tensor([0, 2]))
    with pytest.raises(ValueError):
        ranks_from_scores(scores, torch.tensor([1, 6]))


def test_nan_target_gets_worst_rank() -> None:
    scores = torch.tensor([[0.0, float("nan"), 0.3, 0.2]])
    assert ranks_from_scores(scores, torch.tensor([1])).tolist() == [3]


def test_metric_sums_and_finalize() -> None:
    ranks = torch.tensor([1, 3, 7])
    sums = metric_sums(ranks, [1, 5])
    assert sums["count"] == 3.0
    assert sums["HR@1"] == 1.0
    assert sums["NDCG@1"] == pytest.approx(1.0)
    assert sums["HR@5"] == 2.0
    assert sums["NDCG@5"] == pytest.approx(1.0 + 0.5)  # 1/log2(2) + 1/log2(4)
    means = finalize(sums, sums["count"])
    assert "count" not in means
    assert means["HR@5"] == pytest.approx(2 / 3)
    assert means["NDCG@5"] == pytest.approx(1.5 / 3)
    big = metric_sums(ranks, [10])
    assert big["NDCG@10"] == pytest.approx(1.0 + 0.5 + 1 / math.log2(8))


def test_sums_add_across_parts() -> None:
    ranks = torch.tensor([2, 1, 9, 4, 30])
    whole = metric_sums(ranks, [5, 10])
    a, b = metric_sums(ranks[:2], [5, 10]), metric_sums(ranks[2:], [5, 10])
    added = {k: a[k] + b[k] for k in a}
    assert added.keys() == whole.keys()
    for k in whole:
        assert added[k] == pytest.approx(whole[k])


def test_finalize_with_no_users() -> None:
    sums = metric_sums(torch.tensor([], dtype=torch.long), [1, 10])
    assert sums["count"] == 0.0
    assert finalize(sums, 0) == {"HR@1": 0.0, "NDCG@1": 0.0, "HR@10": 0.0, "NDCG@10": 0.0}


@pytest.mark.parametrize("chunk", [1, 3, 7, 50, 51])
def test_ranks_in_item_chunks_equal_the_whole_matrix(chunk) -> None:
    """Ranking the catalogue a chunk of items at a time gives the ranks of the whole score
    matrix: ties (integer scores), the history mask, a target inside its own history,
    padding in column 0, a NaN target."""
    gen = torch.Generator().manual_seed(0)
    batch, cols = 40, 51
    scores = torch.randint(0, 6, (batch, cols), generator=gen).float()  # many ties
    scores[3, 0] = 100.0  # padding never ranked
    targets = torch.randint(1, cols, (batch,), generator=gen)
    history = torch.randint(0, cols, (batch, 9), generator=gen)
    history[5, 2] = targets[5]  # never masked
    scores[7, targets[7]] = float("nan")
    whole = ranks_from_scores(scores, targets, history=history)

    def score_range(lo, hi, rows):
        return (scores if rows is None else scores[rows])[:, lo:hi].clone()

    chunked = ranks_in_chunks(score_range, cols, targets, history=history, chunk=chunk)
    assert torch.equal(whole, chunked)
    assert chunked[7] == cols - 1
    plain = ranks_in_chunks(score_range, cols, targets, chunk=chunk)
    assert torch.equal(plain, ranks_from_scores(scores, targets))


def test_evaluation_in_item_chunks_gives_the_same_figures(prepared) -> None:
    """``eval.item_chunk`` smaller than the catalogue: every figure of every split and group
    as with the whole score matrix, for a model and for popularity (all ties)."""
    import numpy as np

    from dist_tp.config import load_config
    from dist_tp.evaluation.evaluate import evaluate
    from dist_tp.models import build_model
    from dist_tp.models.scoring import Popularity

    path = prepared("ml-100k")
    cfg = load_config("configs/tiny.yaml", ["data.path=" + path])
    torch.manual_seed(0)
    model = build_model(cfg.model, 1349)
    pop = Popularity(np.random.default_rng(0).integers(0, 30, 1350))
    for m in (model, pop):
        kw = dict(max_len=cfg.model.max_len, ks=[1, 10, 50], batch_size=128)
        whole = evaluate(m, path, **kw)
        assert evaluate(m, path, item_chunk=97, **kw) == whole


def test_a_seeded_sample_of_users_with_95_percent_intervals(prepared) -> None:
    """``max_users``: about that many users of each role, the same for a seed, another set
    for another seed; every figure with an interval around it that holds the figure of all
    users here (popularity, existing users: HR@10 and NDCG@10)."""
    import numpy as np

    from dist_tp.evaluation.evaluate import evaluate
    from dist_tp.models.scoring import Popularity

    path = prepared("ml-100k")
    pop = Popularity(np.random.default_rng(0).integers(0, 30, 1350))
    kw = dict(max_len=20, ks=[10], splits=("test",))
    full = evaluate(pop, path, **kw)["test"]
    a = evaluate(pop, path, max_users=300, sample_seed=1, **kw)["test"]
    assert a == evaluate(pop, path, max_users=300, sample_seed=1, **kw)["test"]
    b = evaluate(pop, path, max_users=300, sample_seed=2, **kw)["test"]
    existing = a["existing"]["all"]
    assert 240 < existing["users"] < 360 and existing != b["existing"]["all"]
    assert a["new"]["all"]["users"] == full["new"]["all"]["users"]  # 189 < 300: everyone
    for metric in ("HR@10", "NDCG@10"):
        lo, hi = existing[f"{metric}_lo"], existing[f"{metric}_hi"]
        assert lo <= existing[metric] <= hi and hi - lo < 0.2
        assert lo <= full["existing"]["all"][metric] <= hi
    assert "HR@10_lo" not in full["existing"]["all"]
