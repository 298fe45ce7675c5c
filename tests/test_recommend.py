"""Recommendations for a sequence with no known item (cold start): the most popular training
items, said so in the Python result, on stderr and in ``--json``."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import torch

from dist_tp.cli import main
from dist_tp.data.stream import load_sequences, open_prepared
from dist_tp.evaluation.recommend import Predictor, Recommendation


class Scorer(torch.nn.Module):
    """A stand-in model: item i's score is a fixed weight plus the sum of the window (so an
    empty window ties every item, as a trained model's tie order would)."""

    def __init__(self, num_items: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0, 1, num_items + 1))

    def encode(self, seq: torch.Tensor) -> torch.Tensor:
        return (seq > 0).float().sum(1, keepdim=True)  # [B, 1]

    def score_all(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.weight[None, :]  # [B, N+1]: all zero for an empty window


ITEMS = [f"i{k}" for k in range(1, 9)]  # item k+1 has original id i{k+1}
COUNTS = np.array([0, 5, 1, 9, 9, 0, 2, 7, 3])  # [N+1]: popularity of items 1..8


def predictor(**kwargs) -> Predictor:
    return Predictor(Scorer(len(ITEMS)), item_ids=ITEMS, max_len=4, **kwargs)


def test_an_empty_or_unknown_sequence_gets_the_most_popular_items():
    p = predictor(popularity=COUNTS)
    popular = ["i3", "i4", "i7", "i1", "i8"]  # counts 9, 9 (ties: lower index), 7, 5, 3
    assert p.recommend_result([], n=5) == Recommendation(popular, True, 0)
    assert p.recommend_result(["nope", "x"], n=5) == Recommendation(popular, True, 2)
    known = p.recommend_result(["i1", "nope"], n=3)
    assert known.fallback is False and known.unknown == 1
    assert known.items == ["i8", "i7", "i6"]  # the model's order, history excluded
    # the list API keeps its shape, and falls back the same way
    assert p.recommend([], n=5) == popular
    assert p.recommend_many([[], ["i1"]], n=3) == [popular[:3], known.items]


def test_without_popularity_the_fallback_is_still_flagged():
    result = predictor().recommend_result([], n=3)
    assert result.fallback is True and len(result.items) == 3


def test_popularity_comes_from_the_prepared_training_items(prepared):
    folder = prepared("ml-100k")
    data = open_prepared(folder)
    ids = pq.read_table(f"{folder}/items.parquet").column("original_id").to_pylist()
    p = Predictor(Scorer(len(ids)), item_ids=ids, max_len=5, data=data)
    # an independent count: every existing user's items but its last two
    seqs = load_sequences(folder, roles=["existing"])
    counts = np.zeros(len(ids) + 1, dtype=np.int64)
    for u in range(len(seqs)):
        np.add.at(counts, seqs.items[seqs.offsets[u] : seqs.offsets[u + 1] - 2], 1)
    expected = [ids[i - 1] for i in np.argsort(-counts[1:], kind="stable")[:10] + 1]
    result = p.recommend_result([], n=10)
    assert result.fallback and result.items == expected


def test_recommend_command_says_when_it_falls_back(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        Predictor, "from_run", classmethod(lambda cls, run: predictor(popularity=COUNTS))
    )
    lines = tmp_path / "seqs.txt"
    lines.write_text("i1,nope\n\nnope x\n")
    assert main(["recommend", "run", "--input", str(lines), "-n", "2", "--json"]) == 0
    captured = capsys.readouterr()
    assert [json.loads(x) for x in captured.out.splitlines()] == [
        {"items": ["i8", "i7"], "fallback": False, "unknown": 1},
        {"items": ["i3", "i4"], "fallback": True, "unknown": 0},
        {"items": ["i3", "i4"], "fallback": True, "unknown": 2},
    ]
    assert captured.err.splitlines() == [
        f"warning: {lines}:2: empty line: its recommendations are the most popular training items",
        f"warning: {lines}:1: 1 unknown ids left out",
        f"warning: {lines}:3: no known item (2 unknown ids): the most popular training items "
        "instead",
    ]
    assert main(["recommend", "run", "nope", "-n", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.out.split() == ["i3", "i4", "i7"]
    assert captured.err.startswith("warning: the sequence: no known item (1 unknown ids)")
