"""A TP run killed mid-epoch resumes with the whole epoch in its history: the figures of the
outer steps before the checkpoint travel in ``last.pt`` and are added to the rest."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import crash_after_checkpoint

from dist_tp.config import load_config
from dist_tp.run.loop import run_training

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def test_tp_run_killed_mid_epoch_keeps_the_whole_epoch_in_its_history(
    prepared, tmp_path, monkeypatch
):
    cfg = load_config(
        TINY,
        [
            f"data.path={prepared('ml-100k')}",
            "train.method=tp",
            "train.epochs=1",
            "train.checkpoint_every=4",
            "train.epoch_steps=40",
            "tp.lanes=2",
            "track.enabled=false",
        ],
    )
    straight = run_training(cfg, tmp_path / "straight")
    out = tmp_path / "crashed"
    crash_after_checkpoint(monkeypatch, lambda folder: run_training(cfg, folder), out, 8)
    saved = torch.load(out / "last.pt", weights_only=True)
    assert len(saved["stepper"]["epoch_figures"]["losses"]) == 8
    resumed = run_training(cfg, out, resume=True)
    assert resumed["existing"] == straight["existing"] and resumed["new"] == straight["new"]
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["history"]
    b = torch.load(out / "last.pt", weights_only=True)["history"]
    for x, y in zip(a, b, strict=True):
        assert x["windows"] == y["windows"]
        for key in ("loss", "disc_loss", "disc_acc", "disc_auc", "valid_ndcg10"):
            assert x[key] == pytest.approx(y[key], rel=1e-12), key
