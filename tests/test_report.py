"""Comparing tracked runs (Table 3, Figure 5), the sweep command, and the figures."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from dist_tp.cli import main
from dist_tp.experiments.report import RunRecord, change, compare_tables, make_rows
from dist_tp.experiments.sweep import parse_grid, plan

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
KEY = "test/existing/all/HR_10"


def record(seed, method="joint", value=0.1, **params) -> RunRecord:
    return RunRecord(
        run_id=f"{method}{seed}{params}",
        dataset="d",
        backbone="sasrec",
        method=method,
        seed=seed,
        params={"train.seed": str(seed), **{f"tp.{k}": str(v) for k, v in params.items()}},
        metrics={KEY: value},
    )


def test_paired_test_by_hand():
    tp = {0: 0.30, 1: 0.26, 2: 0.33}
    base = {0: 0.25, 1: 0.25, 2: 0.27}
    c = change(tp, base)
    diffs = [tp[s] - base[s] for s in tp]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    t = mean / (sd / math.sqrt(3))
    from scipy import stats

    assert c.p_value == pytest.approx(2 * stats.t.sf(abs(t), df=2))
    assert c.relative == pytest.approx((sum(tp.values()) - sum(base.values())) / 0.77)
    assert c.pairs == 3
    assert change({0: 0.3}, {0: 0.2}).p_value is None  # one pair: no test


def test_rows_name_the_varying_parameters_and_compare_with_the_backbone():
    runs = [record(s, value=0.2) for s in (0, 1)]
    runs += [record(s, "tp", 0.3 + s / 100, k=1, lanes=4) for s in (0, 1)]
    runs += [record(s, "tp", 0.1, k=3, lanes=4) for s in (0, 1)]
    rows = make_rows(runs)
    assert [r.label for r in rows] == ["SASRec", "SASRec-TP k=1", "SASRec-TP k=3"]
    text, records = compare_tables(rows, ["HR@10"])
    assert "| SASRec-TP k=1 | 0.3050 ± 0.0071 (2) |" in text
    assert "| Δ SASRec-TP k=3 vs backbone | -50.0% (p=n/a, 2 pairs) |" in text
    (k1,) = [r for r in records if r["model"] == "SASRec-TP k=1" and r["role"] == "existing"
             and r["group"] == "all"]  # fmt: skip
    assert k1["relative_change"] == pytest.approx(0.525)


def test_a_seeds_own_source_run_is_one_variant(tmp_path):
    """sweep's {seed}: each seed starts from its own run; the table keeps them one row."""
    runs = plan(str(TINY), [], 2, out=tmp_path, experiment="x",
                overrides=["train.init_from=runs/sasrec_seed{seed}"])  # fmt: skip
    assert [r.overrides[0] for r in runs] == [
        "train.init_from=runs/sasrec_seed0",
        "train.init_from=runs/sasrec_seed1",
    ]
    records = [record(s, "tp", 0.3) for s in (0, 1, 10)] + [record(s, "tp", 0.2) for s in (0, 1)]
    for r in records[:3]:
        r.params["train.init_from"] = f"runs/sasrec_seed{r.seed}"
    records[2].params["train.init_from"] = "runs/sasrec_seed1"  # seed 10 from seed 1's run
    records[4].params["train.init_from"] = ""  # the default: as seed 0, tracked before the key
    labels = [row.label for row in make_rows(records)]
    assert labels == ['SASRec-TP init_from=""', "SASRec-TP init_from=runs/sasrec_seed1",
                      "SASRec-TP init_from=runs/sasrec_seed{seed}"]  # fmt: skip
    (fresh,) = [row for row in make_rows(records) if row.label == 'SASRec-TP init_from=""']
    assert [r.seed for r in fresh.runs] == [0, 1]


def test_grid_parsing_and_plan_errors_name_the_key(tmp_path):
    assert parse_grid(["tp.k=1,2", "tp.lambda_adv=0"]) == [("tp.k", ["1", "2"]),
                                                            ("tp.lambda_adv", ["0"])]  # fmt: skip
    runs = plan(str(TINY), ["tp.k=1,2"], 2, out=tmp_path, experiment="x")
    assert [r.name for r in runs] == ["tiny_k=1_seed0", "tiny_k=1_seed1", "tiny_k=2_seed0",
                                      "tiny_k=2_seed1"]  # fmt: skip
    assert main(["sweep", str(TINY), "--grid", "tp.kk=1,2", "--out", str(tmp_path)]) == 2


def test_sweep_creates_the_store_and_experiment_before_its_runs(tmp_path):
    """Parallel runs on a fresh sqlite store raced to create its tables; the sweep now makes
    the store and the experiment once, before any run starts."""
    from mlflow.tracking import MlflowClient

    from dist_tp.experiments.sweep import _prepare_tracking

    uri = f"sqlite:///{tmp_path}/store.db"
    (run,) = plan(str(TINY), [], 1, out=tmp_path, experiment="early",
                  overrides=[f"track.uri={uri}"])  # fmt: skip
    _prepare_tracking(str(TINY), run)
    assert MlflowClient(tracking_uri=uri).get_experiment_by_name("early") is not None
    assert not run.folder.exists()  # nothing ran


def test_parallel_gpu_runs_without_mps_get_the_advice(tmp_path, monkeypatch):
    import torch

    from dist_tp.experiments.sweep import gpu_sharing_hint

    pipes = tmp_path / "mps"
    pipes.mkdir()
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(pipes))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    (gpu,) = plan(str(TINY), [], 1, out=tmp_path, experiment="x", overrides=["train.device=cuda"])
    (auto,) = plan(str(TINY), [], 1, out=tmp_path, experiment="x")
    (cpu,) = plan(str(TINY), [], 1, out=tmp_path, experiment="x", overrides=["train.device=cpu"])
    assert "nvidia-cuda-mps-control -d" in gpu_sharing_hint(str(TINY), gpu, 4)
    assert gpu_sharing_hint(str(TINY), auto, 4) is not None  # auto picks the GPU here
    assert gpu_sharing_hint(str(TINY), gpu, 1) is None  # one run at a time shares nothing
    assert gpu_sharing_hint(str(TINY), cpu, 4) is None
    (pipes / "control").touch()  # the daemon's pipe: MPS is on
    assert gpu_sharing_hint(str(TINY), gpu, 4) is None


@pytest.mark.slow
def test_processes_opening_a_fresh_sqlite_store_at_once_all_succeed(tmp_path):
    """Four processes make the same fresh store and experiment at the same moment (a sweep's
    children, or runs started by hand): the store's lock lets one create the tables."""
    import subprocess
    import sys
    import time

    uri = f"sqlite:///{tmp_path}/fresh.db"
    go = tmp_path / "go"
    code = (
        "import pathlib, sys, time\n"
        "from dist_tp.tracking import prepare_store\n"
        f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.01)\n"
        f"print(prepare_store({uri!r}, 'race'))\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    time.sleep(4)  # every process has imported mlflow and waits
    go.touch()
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    assert len(set(outs)) == 1  # one experiment, the same id everywhere


def test_a_lost_create_race_reuses_the_other_process_experiment():
    from dist_tp.tracking import ensure_experiment

    class Client:  # another process creates "x" between our lookup and our create
        def __init__(self):
            self.calls = 0

        def get_experiment_by_name(self, name):
            self.calls += 1
            return None if self.calls == 1 else type("E", (), {"experiment_id": "7"})()

        def create_experiment(self, name):
            raise RuntimeError("UNIQUE constraint failed: experiments.name")

    assert ensure_experiment(Client(), "x") == "7"


@pytest.mark.slow
def test_sweep_compare_and_plot_on_real_runs(prepared, tmp_path, capsys):
    from mlflow.tracking import MlflowClient
    from scipy import stats

    uri = f"sqlite:///{tmp_path}/store.db"
    common = [f"data.path={prepared('ml-100k')}", "train.epochs=1", f"track.uri={uri}",
              "train.epoch_steps=3", "tp.lanes=4", "tp.inner_batch=32",
              "--experiment", "cmp", "--out", str(tmp_path)]  # fmt: skip
    sweep = ["sweep", str(TINY), *common, "--seeds", "2"]
    assert main([*sweep, "--grid", "train.method=joint,tp", "--parallel", "2"]) == 0
    assert main([*sweep, "--grid", "train.method=tp", "--grid", "tp.k=1"]) == 0
    # an interrupted sweep: one run lost its metrics (kept its last.pt), the rest are done
    (tmp_path / "tiny_method=joint_seed1" / "metrics.json").unlink()
    capsys.readouterr()
    assert main([*sweep, "--grid", "train.method=joint,tp"]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped (finished)") == 3 and "tiny_method=joint_seed1: finished" in out

    table = str(tmp_path / "t.csv")
    assert main(["compare", "--experiment", "cmp", "--uri", uri, "--csv", table]) == 0
    text = capsys.readouterr().out
    for label in ("| SASRec |", "| SASRec-TP k=1 |", "| SASRec-TP k=2 |", "| Δ SASRec-TP k=1 vs"):
        assert label in text
    # the CSV's relative change and p-value are those of the stored runs
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("cmp")
    runs = client.search_runs([exp.experiment_id], "tags.`dist_tp.kind` = 'train'")
    assert len(runs) == 6  # the resumed run continued its MLflow run
    by = {}
    for r in runs:
        variant = r.data.params["tp.k"] if r.data.tags["method"] == "tp" else "joint"
        by.setdefault(variant, {})[int(r.data.tags["seed"])] = r.data.metrics[KEY]
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    (k1,) = [r for r in rows if r["model"] == "SASRec-TP k=1" and r["role"] == "existing"
             and r["group"] == "all" and r["metric"] == "HR@10"]  # fmt: skip
    base, tp = by["joint"], by["1"]
    assert float(k1["relative_change"]) == pytest.approx(
        (sum(tp.values()) - sum(base.values())) / sum(base.values())
    )
    expected_p = stats.ttest_rel([tp[0], tp[1]], [base[0], base[1]]).pvalue
    assert float(k1["p_value"]) == pytest.approx(expected_p)

    figs = tmp_path / "figs"
    assert main(["plot", "--experiment", "cmp", "--uri", uri, "--out", str(figs)]) == 0
    names = sorted(p.name for p in figs.iterdir())
    assert names == ["fig4_topn_ml-100k.png", "fig5_head_tail_ml-100k.png",
                     "fig6_k_ml-100k_sasrec.png"]  # fmt: skip
    for name in names:
        assert (figs / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (plots,) = client.search_runs([exp.experiment_id], "tags.`dist_tp.kind` = 'plots'")
    logged = {a.path for a in client.list_artifacts(plots.info.run_id, "figures")}
    assert logged == {f"figures/{n}" for n in names}
