"""MLflow tracking against real stores: sqlite in a temp folder, and a real ``mlflow server``
over HTTP (started on a free port, stopped by its pid) that dies mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import Server, client, free_port

from dist_tp.cli import main
from dist_tp.config import flatten, load_config, to_dict
from dist_tp.tracking import Spool, final_metrics_to_flat

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
TP = ["train.method=tp", "tp.lanes=4", "tp.k=2", "tp.inner_batch=32", "track.log_every=20"]


def the_run(uri: str, experiment: str):
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    (run,) = c.search_runs([exp.experiment_id])
    return c, run


def spooled_metrics(folder: Path) -> dict[str, set[int]]:
    """metric key → the steps it was logged at, from the run's spool."""
    out: dict[str, set[int]] = {}
    for event in Spool(folder).events():
        if event["op"] == "metrics":
            for key in event["values"]:
                out.setdefault(key, set()).add(event["step"])
    return out


def assert_store_has_spool(c, run_id: str, folder: Path) -> None:
    expected = spooled_metrics(folder)
    assert expected
    for key, steps in expected.items():
        got = {m.step for m in c.get_metric_history(run_id, key)}
        assert got == steps, key


@pytest.mark.slow
def test_train_logs_params_tags_metrics_and_artifacts(prepared, tmp_path):
    uri = f"sqlite:///{tmp_path}/store.db"
    out = tmp_path / "run"
    args = [f"data.path={prepared('ml-100k')}", *TP, f"track.uri={uri}", "track.experiment=e1",
            "train.epoch_steps=60"]  # fmt: skip
    assert main(["train", str(TINY), *args, "--output", str(out)]) == 0
    c, run = the_run(uri, "e1")
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    cfg = load_config(TINY, args)
    assert set(run.data.params) == set(flatten(to_dict(cfg)))
    assert run.data.params["tp.lanes"] == "4"
    tags = run.data.tags
    assert (tags["dataset"], tags["backbone"], tags["method"]) == ("ml-100k", "sasrec", "tp")
    meta = json.loads((Path(prepared("ml-100k")) / "meta.json").read_text())
    assert tags["dataset.sha256"] == meta["source"]["sha256"]
    assert tags["world_size"] == "1"
    gpu = torch.cuda.is_available()
    assert tags["device"] == (f"cuda:0 {torch.cuda.get_device_name(0)}" if gpu else "cpu")
    # every final figure, every group and N, equals metrics.json
    metrics = json.loads((out / "metrics.json").read_text())
    final = final_metrics_to_flat(metrics)
    for role in ("existing", "new"):
        for group in ("all", "head", "tail"):
            for n in (1, 5, 10):
                for name in ("HR", "NDCG"):
                    key = f"test/{role}/{group}/{name}_{n}"
                    assert run.data.metrics[key] == pytest.approx(final[key])
    assert run.data.metrics["test/discriminator/auc"] == metrics["discriminator"]["disc_auc"]
    # per-epoch and per-N-outer-steps histories, and the shared discriminator's
    assert [m.step for m in c.get_metric_history(run.info.run_id, "train/loss")] == [0, 1]
    assert len(c.get_metric_history(run.info.run_id, "train/disc_auc")) == 2
    assert len(c.get_metric_history(run.info.run_id, "valid/existing/tail/NDCG_5")) == 2
    steps = c.get_metric_history(run.info.run_id, "step/loss")
    assert len(steps) >= 2 and all((m.step + 1) % 20 == 0 for m in steps)
    assert_store_has_spool(c, run.info.run_id, out)
    files = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.json", "dataset_meta.json", "curves.png"} <= files
    assert [a.path for a in c.list_artifacts(run.info.run_id, "checkpoint")] == [
        "checkpoint/checkpoint.pt"
    ]


@pytest.mark.slow
def test_resumed_run_continues_the_same_mlflow_run(prepared, tmp_path):
    uri = f"sqlite:///{tmp_path}/store.db"
    out = tmp_path / "run"
    base = ["train", str(TINY), f"data.path={prepared('ml-100k')}", f"track.uri={uri}"]
    where = ["--output", str(out)]
    assert main([*base, "train.epochs=1", *where]) == 0
    assert main([*base, "train.epochs=2", "train.patience=9", *where, "--resume"]) == 0
    c, run = the_run(uri, "dist-tp")
    assert [m.step for m in c.get_metric_history(run.info.run_id, "train/loss")] == [0, 1]
    assert run.info.status == "FINISHED"
    # a fresh run into the same folder (it holds a run: --overwrite) is a new MLflow run
    assert main([*base, "train.epochs=1", *where, "--overwrite"]) == 0
    exp = c.get_experiment_by_name("dist-tp")
    assert len(c.search_runs([exp.experiment_id])) == 2


@pytest.mark.slow
def test_unreachable_server_spools_and_sync_replays(prepared, tmp_path, caplog):
    dead = f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "run"
    args = [f"data.path={prepared('ml-100k')}", f"track.uri={dead}", "train.epochs=1"]
    assert main(["train", str(TINY), *args, "--output", str(out)]) == 0  # training goes on
    assert "is not answering" in caplog.text and "mlflow-sync" in caplog.text
    assert (out / "metrics.json").is_file()
    assert Spool(out).state().get("delivered", 0) == 0
    # replay into a store that exists now
    uri = f"sqlite:///{tmp_path}/later.db"
    assert main(["mlflow-sync", str(out), "--uri", uri]) == 0
    c, run = the_run(uri, "dist-tp")
    assert run.info.status == "FINISHED"
    assert_store_has_spool(c, run.info.run_id, out)
    # a second replay sends nothing
    assert main(["mlflow-sync", str(out)]) == 0
    assert len(c.get_metric_history(run.info.run_id, "train/loss")) == 1


def test_a_run_that_fails_before_it_starts_leaves_no_mlflow_run(tmp_path, capsys, caplog):
    uri = f"sqlite:///{tmp_path}/store.db"
    out = tmp_path / "run"
    args = [f"data.path={tmp_path}/missing", f"track.uri={uri}", "--output", str(out)]
    assert main(["train", str(TINY), *args]) == 2
    assert "no meta.json" in capsys.readouterr().err
    assert "not answering" not in caplog.text
    assert not Spool(out).exists()


def test_spool_ignores_a_torn_last_line(tmp_path):
    spool = Spool(tmp_path)
    spool.append({"op": "metrics", "step": 0, "ts": 1, "values": {"a": 1.0}})
    with open(spool.path, "a") as f:
        f.write('{"op": "metr')  # killed mid-write
    assert len(spool.events()) == 1


def test_sync_without_spool_names_the_folder(tmp_path, capsys):
    assert main(["mlflow-sync", str(tmp_path)]) == 2
    assert "no MLflow spool" in capsys.readouterr().err


# --- a real MLflow server -------------------------------------------------------------------


@pytest.fixture
def server(tmp_path):
    store = tmp_path / "server"
    store.mkdir()
    srv = Server(store, free_port()).start()
    yield srv
    srv.stop()


@pytest.mark.slow
def test_logs_a_real_run_over_http(prepared, tmp_path, server):
    out = tmp_path / "run"
    args = [f"data.path={prepared('ml-100k')}", f"track.uri={server.uri}", "train.epochs=1"]
    assert main(["train", str(TINY), *args, "--output", str(out)]) == 0
    c, run = the_run(server.uri, "dist-tp")
    assert run.info.status == "FINISHED"
    assert_store_has_spool(c, run.info.run_id, out)
    assert "metrics.json" in {a.path for a in c.list_artifacts(run.info.run_id)}
    assert Spool(out).state()["delivered"] == len(Spool(out).events())


@pytest.mark.slow
def test_server_dies_mid_run_then_sync_completes_the_run(prepared, tmp_path, server):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dist_tp", "train", str(TINY), f"data.path={prepared('ml-100k')}",
           *TP, "train.epochs=3", "train.patience=9", "track.log_every=5", "train.threads=1",
           "train.epoch_steps=150",
           f"track.uri={server.uri}", "--output", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    spool = Spool(out)
    deadline = time.monotonic() + 300
    while spool.state().get("delivered", 0) < 4:  # the run exists and metrics arrived
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    server.stop(signal.SIGKILL)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    assert "is not answering" in output
    state = spool.state()
    assert 4 <= state["delivered"] < len(spool.events())  # part went through, part waits
    server.start()  # the same store, the same port
    assert main(["mlflow-sync", str(out)]) == 0
    c = client(server.uri)
    run = c.get_run(state["run_id"])
    assert run.info.status == "FINISHED"
    assert_store_has_spool(c, run.info.run_id, out)
    assert [m.step for m in c.get_metric_history(run.info.run_id, "train/loss")] == [0, 1, 2]


@pytest.mark.slow
def test_sigterm_marks_the_run_killed_and_resume_finishes_it(prepared, tmp_path):
    uri = f"sqlite:///{tmp_path}/store.db"
    out = tmp_path / "run"
    args = [sys.executable, "-m", "dist_tp", "train", str(TINY), f"data.path={prepared('ml-100k')}",
            f"track.uri={uri}", "train.epochs=40", "train.patience=40"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [*args, "--output", str(out)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 240
    while not (out / "last.pt").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "resume with --resume" in output
    c, run = the_run(uri, "dist-tp")
    assert run.info.status == "KILLED"
    assert not list(out.glob(".*.tmp"))  # no half-written file left behind
    done = json.loads((out / "history.json").read_text())
    # resuming with a shorter budget finishes the same MLflow run
    epochs = len(done) + 1
    resumed = main(["train", str(TINY), f"data.path={prepared('ml-100k')}", f"track.uri={uri}",
                    f"train.epochs={epochs}", "train.patience=40", "--output", str(out),
                    "--resume"])  # fmt: skip
    assert resumed == 0
    c, again = the_run(uri, "dist-tp")
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    steps = [m.step for m in c.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == list(range(epochs))


def test_a_finished_run_reopens_to_add_figures_and_the_client_is_public(tmp_path):
    """What ``dist-tp sweep --extra-eval`` and ``dist-tp finish`` do after training: reopen a
    run folder's tracker and add to its MLflow run, through the spool."""
    from dist_tp.tracking import Tracker, reopen

    uri = f"sqlite:///{tmp_path}/store.db"
    tracker = Tracker(tmp_path / "run", uri=uri, experiment="again")
    tracker.start(run_name="r", params={"a": 1}, tags={})
    tracker.finish()
    assert tracker.client.tracking_uri == uri  # the benchmark's handle on the store
    again = reopen(tmp_path / "run")
    assert again.run_id == tracker.run_id and again.experiment == "again"
    again.log_metrics({"nohist/existing/all/HR_10": 0.5}, step=0)
    run = tracker.client.get_run(tracker.run_id)
    assert run.data.metrics["nohist/existing/all/HR_10"] == 0.5
    assert run.info.status == "FINISHED"
    assert reopen(tmp_path / "untracked") is None
