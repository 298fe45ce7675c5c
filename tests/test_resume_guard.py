"""A run folder holds one run: ``--resume`` continues it only with the config that made it
(what may change: epochs, patience, checkpointing, threads, device, evaluation, tracking),
and a fresh run does not land on another run's files unless asked to (``--overwrite``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dist_tp.cli import main
from dist_tp.config import ConfigError, load_config
from dist_tp.run.loop import run_training

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def finished(prepared, tmp_path_factory):
    """A finished one-epoch run and the overrides that made it."""
    args = [f"data.path={prepared('ml-100k')}", "train.epochs=1", "track.enabled=false"]
    out = tmp_path_factory.mktemp("run")
    run_training(load_config(TINY, args), out)
    return out, args


@pytest.mark.parametrize(
    "change,named",
    [
        ("train.lr=0.01", "train.lr"),
        ("model.dim=32", "model.dim"),  # was a 'size mismatch' traceback
        ("train.method=tp", "train.method"),  # was KeyError: 'disc'
        ("train.seed=5", "train.seed"),
        ("train.loss=bce", "train.loss"),
    ],
)
def test_resume_refuses_a_config_that_makes_another_run(finished, change, named):
    out, args = finished
    config = (out / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=rf"last.pt: --resume continues .* {named} "):
        run_training(load_config(TINY, [*args, change, "train.epochs=2"]), out, resume=True)
    assert (out / "config.yaml").read_text() == config  # nothing written


def test_resume_refuses_another_data_folder(finished, prepared):
    out, args = finished
    other = prepared("ml-100k", row_group_size=64)
    cfg = load_config(TINY, [*args, f"data.path={other}", "train.epochs=2"])
    with pytest.raises(ConfigError, match="data.path"):
        run_training(cfg, out, resume=True)


def test_cli_names_the_keys_in_one_line(finished, capsys):
    out, args = finished
    code = main(["train", str(TINY), *args, "train.lr=0.5", "--output", str(out), "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: ") and "train.lr 0.001 -> 0.5" in err[0]


def test_what_may_change_on_resume_does(finished, tmp_path):
    import shutil

    out, args = finished
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    allowed = ["train.epochs=2", "train.patience=3", "train.checkpoint_every=7", "eval.ks=[1,10]"]
    metrics = run_training(load_config(TINY, [*args, *allowed]), copy, resume=True)
    assert "HR@1" in metrics["existing"]["all"] and "HR@5" not in metrics["existing"]["all"]


def test_a_fresh_run_does_not_overwrite_a_finished_one(finished, tmp_path, capsys):
    import shutil

    out, args = finished
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = (copy / "metrics.json").read_bytes()
    code = main(["train", str(TINY), *args, "train.seed=3", "--output", str(copy)])
    err = capsys.readouterr().err
    assert code == 2 and "already holds a run" in err and "--overwrite" in err
    assert (copy / "metrics.json").read_bytes() == before
    assert (
        main(["train", str(TINY), *args, "train.seed=3", "--output", str(copy), "--overwrite"]) == 0
    )
    assert (copy / "metrics.json").read_bytes() != before


def test_a_folder_with_only_a_config_is_not_a_run(prepared, tmp_path):
    """A run that died before its first checkpoint left nothing to protect."""
    (tmp_path / "config.yaml").write_text("old: true\n")
    cfg = load_config(TINY, [f"data.path={prepared('ml-100k')}", "train.epochs=1"])
    run_training(cfg, tmp_path)
    assert "old" not in (tmp_path / "config.yaml").read_text()


def test_a_folder_in_use_by_another_training_is_refused(finished, tmp_path, capsys):
    """Two trainings into one folder would interleave their checkpoints (and the second's
    start removes the first's temp files): the second stops at once, naming the folder."""
    from dist_tp.run.folder_lock import hold_run_folder

    _, args = finished
    run = tmp_path / "run"
    held = hold_run_folder(run)  # what a live `dist-tp train --output run` holds
    try:
        code = main(["train", str(TINY), *args, "--output", str(run), "--resume"])
        err = capsys.readouterr().err
        assert code == 2 and f"{run} is in use by another training (pid " in err
        assert not (run / "metrics.json").exists()  # nothing trained, nothing written
    finally:
        held.release()
    assert main(["train", str(TINY), *args, "--output", str(run), "--resume"]) == 0
    assert (run / "metrics.json").is_file()


def test_the_folder_lock_is_let_go_on_release_and_leaves_nothing(tmp_path):
    import os

    from dist_tp.run.folder_lock import hold_run_folder

    out = tmp_path / "run"
    first = hold_run_folder(out)
    held_by_us = f"{out} is in use by another training .pid {os.getpid()}"
    with pytest.raises(ConfigError, match=held_by_us):
        hold_run_folder(out)
    first.release()
    hold_run_folder(out).release()  # free again
    assert list(tmp_path.iterdir()) == []  # no lock file left, no folder made


def test_finish_and_evaluate_leave_a_folder_in_use_alone(finished, tmp_path, capsys):
    """``dist-tp finish`` on a live training (a checkpoint, no metrics yet) would evaluate
    it and write metrics.json and STOPPED under it; ``dist-tp evaluate`` would rewrite its
    metrics.json. Both refuse a folder whose training holds it, and go ahead once free."""
    import shutil

    from dist_tp.run.folder_lock import hold_run_folder

    source, _ = finished
    run = tmp_path / "run"
    shutil.copytree(source, run)
    (run / "metrics.json").unlink()  # as a training still running leaves it
    held = hold_run_folder(run)
    try:
        assert main(["finish", str(run)]) == 1
        out = capsys.readouterr().out
        assert "failed:" in out and "in use by another training" in out
        assert "finish it once it has stopped" in out
        assert main(["evaluate", str(run)]) == 2
        assert "pass --out FILE" in capsys.readouterr().err
        assert not (run / "metrics.json").exists() and not (run / "STOPPED").exists()
        assert main(["evaluate", str(run), "--out", str(tmp_path / "elsewhere.json")]) == 0
    finally:
        held.release()
    assert main(["finish", str(run)]) == 0
    assert (run / "metrics.json").is_file() and (run / "STOPPED").is_file()
