"""The experiment workflow: run folders read as runs, tables over seeds (the same from run
folders and from MLflow), the sweep's skip/resume/conflict logic, finishing stopped runs, and
the package's layout (each room imports only the rooms below it)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from dist_tp.cli import main
from dist_tp.config import ConfigError, load_config, to_dict
from dist_tp.experiments.folders import load_folders, parse_extra_eval, run_folders
from dist_tp.experiments.report import make_rows
from dist_tp.experiments.sweep import SweepRun, _command, execute, parse_seeds, plan
from dist_tp.experiments.tables import extra_splits, parse_columns
from dist_tp.tracking import extra_metrics_to_flat

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
META = {"dataset": "ml-100k", "source": {"sha256": "abc"}}


def figures(value: float) -> dict:
    """A metrics.json's test figures: every group and N derived from one number."""
    groups = {
        g: {"HR@10": value * f, "NDCG@10": value * f / 2, "users": 10}
        for g, f in (("all", 1.0), ("head", 0.8), ("tail", 1.1))
    }
    return {"existing": groups, "new": {g: dict(v) for g, v in groups.items()}}


def fake_run(folder: Path, overrides: list[str], value: float, epochs: int = 3) -> Path:
    """A finished run folder as ``dist-tp train`` leaves it, without training."""
    cfg = load_config(TINY, ["data.path=data/ml-100k", *overrides])
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (folder / "dataset_meta.json").write_text(json.dumps(META))
    history = [{"epoch": e, "loss": 5.0 - e, "valid_ndcg10": 0.1 + e / 100} for e in range(epochs)]
    (folder / "history.json").write_text(json.dumps(history))
    (folder / "metrics.json").write_text(json.dumps(figures(value)))
    return folder


# existing users' all-HR@10 by model and seed
JOINT_CE = {0: 0.20, 1: 0.22, 2: 0.21}
JOINT_BCE = {0: 0.10, 1: 0.12}
TP_K2 = {0: 0.18, 1: 0.19, 2: 0.185}
TP_K1 = {0: 0.17, 1: 0.21}


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "runs"
    for name, values, overrides in [
        ("joint-ce", JOINT_CE, ["train.loss=ce"]),
        ("joint-bce", JOINT_BCE, ["train.loss=bce"]),
        ("tp-k2", TP_K2, ["train.method=tp", "tp.k=2"]),
        ("tp-k1", TP_K1, ["train.method=tp", "tp.k=1"]),
    ]:
        for seed, value in values.items():
            fake_run(root / name / f"seed{seed}", [*overrides, f"train.seed={seed}"], value)
    return root


def test_run_folders_read_as_the_records_mlflow_gives(root):
    runs = load_folders([root])
    assert len(runs) == 10 and {r.dataset for r in runs} == {"ml-100k"}
    tp = [r for r in runs if r.method == "tp" and r.params["tp.k"] == "1"]
    assert sorted(r.seed for r in tp) == [0, 1] and tp[0].epochs == 3
    assert tp[0].metrics["test/existing/all/HR_10"] == pytest.approx(TP_K1[tp[0].seed])
    labels = [row.label for row in make_rows(runs)]
    assert labels == ["SASRec loss=bce", "SASRec loss=ce", "SASRec-TP k=1", "SASRec-TP k=2"]
    (root.parent / "empty").mkdir()
    with pytest.raises(ConfigError, match="no finished run folder"):
        load_folders([root.parent / "empty"])
    with pytest.raises(ConfigError, match="no such folder"):
        run_folders([root.parent / "missing"])


def test_pairs_table_by_hand(root, capsys):
    from scipy import stats

    assert main(["table", "--pairs", str(root), "--column", "existing/all/HR@10"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| data | backbone → TP | seeds | epochs (joint; TP) | existing all HR@10 |"
    # each TP model is paired with the joint model of its own loss (ce), over shared seeds
    k1 = next(line for line in out if "SASRec-TP k=1" in line)
    base, tp = [JOINT_CE[s] for s in (0, 1)], [TP_K1[s] for s in (0, 1)]
    rel = (sum(tp) - sum(base)) / sum(base)
    p = stats.ttest_rel(tp, base).pvalue
    mean_sd = [f"{sum(v) / 2:.4f} ± {math.sqrt(sum((x - sum(v) / 2) ** 2 for x in v)):.4f}"
               for v in (base, tp)]  # fmt: skip
    assert k1 == (
        f"| ml-100k | SASRec loss=ce → SASRec-TP k=1 | 0,1 | 3/3; 3/3 | "
        f"{mean_sd[0]} → {mean_sd[1]} ({rel:+.1%}, p {p:.2f}) |"
    )
    assert "| ml-100k | SASRec loss=ce → SASRec-TP k=2 | 0,1,2 |" in "\n".join(out)


def test_mean_and_reference_tables(root, capsys):
    (root / "joint-ce" / "seed0" / "metrics_nohist.json").write_text(json.dumps(figures(0.15)))
    assert main(["table", "--mean", str(root)]) == 0
    out = capsys.readouterr().out
    assert "existing all HR@10 (nohist) |" in out.splitlines()[0]  # extra evaluations join
    assert "| ml-100k | SASRec loss=ce | 0,1,2 | 3/3/3 | 0.2100 ± 0.0100 |" in out
    assert "| ml-100k | SASRec loss=bce | 0,1 | 3/3 | 0.1100 ± 0.0141 |" in out
    assert out.splitlines()[3].endswith("| 0.1500 |")  # SASRec loss=ce: one seed has nohist
    assert main(["table", str(root), "--reference", "sasrec-tp k=2", "--column", "groups"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2].startswith("| ml-100k | SASRec-TP k=2 | 0,1,2 | 0.1850 ± 0.0050 |")
    assert "(+" not in out[2] and "%" in out[3]
    assert main(["table", str(root), "--reference", "nothing"]) == 2


def test_ignore_merges_models_and_the_first_folder_wins_a_seed(tmp_path, capsys):
    fake_run(tmp_path / "a" / "s0", ["train.epochs=10", "train.seed=0"], 0.3)
    fake_run(tmp_path / "b" / "s0", ["train.epochs=20", "train.seed=0"], 0.1)
    fake_run(tmp_path / "b" / "s1", ["train.epochs=20", "train.seed=1"], 0.1)
    assert main(["table", "--mean", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "SASRec epochs=10" in capsys.readouterr().out
    args = ["table", "--mean", "--ignore", "train.epochs", "--column", "existing/all/HR@10"]
    assert main([*args, str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "| ml-100k | SASRec | 0,1 | 3/3 | 0.2000 ± 0.1414 |" in capsys.readouterr().out
    assert main([*args, "--where", "train.epochs=20", str(tmp_path)]) == 0
    assert "| ml-100k | SASRec | 0,1 | 3/3 | 0.1000 ± 0.0000 |" in capsys.readouterr().out


def test_plain_table_of_run_folders_and_roots(root, capsys):
    one = root / "joint-ce" / "seed1"
    assert main(["table", str(one)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2] == f"| {one} | 0.2200 | 0.1100 | 0.2420 | 0.2200 | 0.1100 | 0.2420 |"
    assert main(["table", str(root / "tp-k1")]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4  # header, rule, two runs


def _track(folder: Path, uri: str, experiment: str) -> None:
    """Log a fake run folder into MLflow as ``dist-tp train`` would have."""
    from dist_tp.tracking import (
        Tracker,
        epoch_metrics,
        extra_metrics_to_flat,
        final_metrics_to_flat,
        start_run,
    )

    cfg = load_config(folder / "config.yaml", [f"track.experiment={experiment}"])
    tracker = Tracker(folder, uri=uri, experiment=experiment)
    start_run(tracker, cfg, folder, META, world_size=1)
    for record in json.loads((folder / "history.json").read_text()):
        tracker.log_metrics(epoch_metrics(record), step=record["epoch"])
    tracker.log_metrics(final_metrics_to_flat(json.loads((folder / "metrics.json").read_text())), 0)
    tracker.finish()
    extra = folder / "metrics_nohist.json"
    if extra.is_file():  # what an extra evaluation adds (dist_tp.experiments.folders)
        tracker.log_metrics(extra_metrics_to_flat(json.loads(extra.read_text()), "nohist"), 0)


def test_tables_from_folders_equal_tables_from_mlflow(root, tmp_path, capsys):
    (root / "tp-k2" / "seed1" / "metrics_nohist.json").write_text(json.dumps(figures(0.15)))
    uri = f"sqlite:///{tmp_path}/store.db"
    for folder in run_folders([root]):
        _track(folder, uri, "fake")
    mlflow = ["--experiment", "fake", "--uri", uri]
    commands = [
        ["table", "--mean"],
        ["table", "--pairs"],
        ["table", "--reference", "SASRec-TP k=2"],
        ["compare", "--metric", "HR@10"],
    ]
    for args in commands:
        assert main([*args, str(root)]) == 0
        from_folders = capsys.readouterr().out
        assert main([*args, *mlflow]) == 0
        assert capsys.readouterr().out == from_folders, args


def test_seeds_and_extra_evaluations_parse():
    assert parse_seeds(3) == parse_seeds("3") == [0, 1, 2]
    assert parse_seeds("1,2") == [1, 2] and parse_seeds("2-4") == [2, 3, 4]
    assert parse_seeds("2,") == [2]
    extra = parse_extra_eval("nohist eval.exclude_history=false")
    assert extra.file == "metrics_nohist.json" and extra.overrides == (
        "eval.exclude_history=false",
    )
    for bad in ("nohist", "no/hist eval.ks=[5]", "nohist train.epochs=3"):
        with pytest.raises(Exception, match="--extra-eval"):
            parse_extra_eval(bad)
    assert main(["sweep", str(TINY), "--seeds", "x"]) == 2


def test_an_extra_evaluations_validation_is_a_column_only_when_asked():
    metrics = {
        "existing": {"all": {"HR@10": 0.2}},
        "new": {"tail": {"NDCG@10": 0.3}},
        "validation": {"existing": {"all": {"HR@10": 0.1}}, "new": {"all": {"NDCG@10": 0.05}}},
    }
    flat = extra_metrics_to_flat(metrics, "a1")
    assert flat == {
        "a1/existing/all/HR_10": 0.2,
        "a1/new/tail/NDCG_10": 0.3,
        "a1_valid/existing/all/HR_10": 0.1,
        "a1_valid/new/all/NDCG_10": 0.05,
    }

    class Run:
        pass

    run = Run()
    run.metrics = flat
    assert extra_splits([run]) == ["a1"]  # default columns: the test figures
    (column,) = parse_columns(["a1_valid/new/all/NDCG@10"])
    assert column.key in flat


def test_sweep_skips_finished_resumes_interrupted_and_refuses_other_settings(tmp_path):
    runs = plan(str(TINY), ["train.loss=ce,bce"], "0-1", out=tmp_path, experiment="x",
                overrides=["data.path=data/ml-100k", "track.enabled=false"])  # fmt: skip
    names = [r.name for r in runs]
    assert names == ["tiny_loss=ce_seed0", "tiny_loss=ce_seed1", "tiny_loss=bce_seed0",
                     "tiny_loss=bce_seed1"]  # fmt: skip
    for run in runs:  # every folder finished, one stopped from outside and finished later
        fake_run(run.folder, run.overrides, 0.2)
    (runs[1].folder / "STOPPED").write_text("stopped\n")
    status = execute(str(TINY), runs)  # nothing to train: no subprocess starts
    assert status[names[0]] == "skipped (finished)"
    assert status[names[1]] == "skipped (finished, stopped from outside)"
    # an interrupted run (last.pt, no metrics) resumes; a fresh one does not
    (runs[2].folder / "metrics.json").unlink()
    (runs[2].folder / "last.pt").write_bytes(b"")
    assert "--resume" in _command(str(TINY), runs[2], None, quiet=True)
    fresh = SweepRun("new", runs[3].overrides, tmp_path / "new")
    assert "--resume" not in _command(str(TINY), fresh, None, quiet=True)
    # the same names with other settings: those folders are not reused
    longer = ["data.path=data/ml-100k", "track.enabled=false", "train.epochs=5"]
    other = plan(str(TINY), ["train.loss=ce,bce"], 2, out=tmp_path, experiment="x",
                 overrides=longer)  # fmt: skip
    result = execute(str(TINY), [other[0]])[names[0]]
    assert result.startswith("failed") and "train.epochs=2 there, 5 here" in result


@pytest.mark.slow
def test_finish_evaluates_a_stopped_run_and_completes_its_mlflow_run(prepared, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/store.db"
    run = tmp_path / "root" / "run"
    common = [f"data.path={prepared('ml-100k')}", "train.epochs=1", f"track.uri={uri}",
              "track.experiment=fin"]  # fmt: skip
    assert main(["train", str(TINY), *common, "--output", str(run)]) == 0
    finished = json.loads((run / "metrics.json").read_text())
    # as if a deadline had stopped it: no metrics, the MLflow run KILLED
    (run / "metrics.json").unlink()
    client = MlflowClient(tracking_uri=uri)
    run_id = json.loads((run / "mlflow" / "state.json").read_text())["run_id"]
    client.set_terminated(run_id, "KILLED")
    capsys.readouterr()
    extra = ["--extra-eval", "nohist eval.exclude_history=false"]
    assert main(["finish", str(tmp_path / "root"), *extra]) == 0
    out = capsys.readouterr().out
    assert "finished from its best checkpoint (stopped after 1 epochs)" in out
    assert "wrote metrics_nohist.json" in out
    again = json.loads((run / "metrics.json").read_text())
    assert again["existing"] == finished["existing"] and again["new"] == finished["new"]
    assert (run / "STOPPED").is_file() and (run / "metrics_nohist.json").is_file()
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.info.status == "FINISHED"
    assert "nohist/existing/all/HR_10" in mlflow_run.data.metrics
    assert main(["finish", str(run)]) == 0  # nothing left to do
    assert "finished already" in capsys.readouterr().out
