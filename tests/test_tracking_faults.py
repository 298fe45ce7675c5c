"""MLflow tracking when things go wrong, against real stores: a server that is down from the
start (its URI is still the run's), a sync to a dead server (one error line), a run killed in
its final phase and resumed (one point per final metric), an artifact the store refuses (the
run still ends FINISHED, the spool goes on)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, TINY, Server, client, free_port

from dist_tp.cli import main
from dist_tp.config import ConfigError, load_config
from dist_tp.tracking import Spool, final_metrics_to_flat, finish_run, make_tracker, sync
from dist_tp.tracking.tracker import Tracker

METRICS = {
    "existing": {"all": {"HR@10": 0.5, "NDCG@10": 0.25, "users": 3}},
    "new": {"tail": {"HR@10": 0.125, "users": 2}},
    "discriminator": {"disc_auc": 0.75},
}


def tracked_run(tmp_path: Path, uri: str, experiment: str = "faults") -> tuple[Tracker, Path]:
    """A started tracker on a run folder holding a run's files (no training)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("a: 1\n")
    (out / "metrics.json").write_text("{}\n")
    tracker = Tracker(out, uri=uri, experiment=experiment)
    tracker.start(run_name="r", params={"p": 1}, tags={"t": "x"})
    return tracker, out


def dead_uri() -> str:
    return f"http://127.0.0.1:{free_port()}"


# --- item 8: the intended URI is the run's, even when it never answered ---------------------


def test_the_uri_of_a_server_down_from_the_start_is_recorded_and_sync_goes_there(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # MLflow's default: ./mlflow.db
    monkeypatch.chdir(tmp_path)
    uri = dead_uri()
    tracker, out = tracked_run(tmp_path, uri)
    tracker.log_metrics({"train/loss": 1.0}, step=0)
    tracker.finish()
    assert Spool(out).state()["uri"] == uri  # recorded although nothing was delivered
    assert Spool(out).undelivered() == len(Spool(out).events())
    # a sync without --uri goes to the intended server (down still), not to ./mlflow.db
    assert main(["mlflow-sync", str(out)]) == 2
    assert uri in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()
    assert "run_id" not in Spool(out).state()


@pytest.mark.slow
def test_sync_without_uri_reaches_the_server_that_was_down_at_the_start(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    tracker, out = tracked_run(tmp_path, uri)
    tracker.log_metrics({"train/loss": 1.0}, step=0)
    finish_run(tracker, load_config(TINY, ["track.log_checkpoint=false"]), out, METRICS)
    store = tmp_path / "server"
    store.mkdir()
    server = Server(store, port).start()
    try:
        assert main(["mlflow-sync", str(out)]) == 0
        state = Spool(out).state()
        assert state["uri"] == uri and state["delivered"] == len(Spool(out).events())
        run = client(uri).get_run(state["run_id"])
        assert run.info.status == "FINISHED" and run.data.metrics["train/loss"] == 1.0
        assert "metrics.json" in {a.path for a in client(uri).list_artifacts(state["run_id"])}
    finally:
        server.stop()
    assert not (tmp_path / "mlflow.db").exists()


# --- item 5: a sync to a dead server is one error line ----------------------------------------


def test_sync_to_a_dead_server_is_one_error_line_and_the_events_stay_spooled(tmp_path):
    uri = dead_uri()
    tracker, out = tracked_run(tmp_path, uri)
    tracker.finish()
    events = len(Spool(out).events())
    proc = subprocess.run(
        [sys.executable, "-m", "dist_tp", "mlflow-sync", str(out), "--uri", uri],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert uri in lines[0] and "stay spooled" in lines[0]
    assert f"{events} of {events} events" in lines[0]
    assert Spool(out).undelivered() == events


def test_an_artifact_stays_spooled_while_the_server_is_down(tmp_path):
    """An upload that fails because the server does not answer is not skipped."""
    uri = f"sqlite:///{tmp_path}/store.db"
    tracker, out = tracked_run(tmp_path, uri)
    delivered = Spool(out).state()["delivered"]
    spool = Spool(out)
    spool.append({"op": "artifact", "path": "config.yaml", "dir": ""})
    state = spool.state()
    spool.save_state({**state, "uri": dead_uri()})  # the run's server, gone since
    with pytest.raises(ConfigError, match="stay spooled"):
        sync(out)
    assert spool.state()["delivered"] == delivered and "skipped" not in spool.state()


# --- item 9: the final phase of a run ---------------------------------------------------------


def test_a_run_killed_after_its_final_metrics_and_resumed_has_one_point_each(tmp_path):
    uri = f"sqlite:///{tmp_path}/store.db"
    cfg = load_config(TINY, [f"track.uri={uri}", "track.experiment=final"])
    tracker, out = tracked_run(tmp_path, uri, "final")

    def killed(*args, **kwargs):  # SIGTERM after the final metrics, before FINISHED
        raise KeyboardInterrupt

    tracker.log_artifact = killed
    with pytest.raises(KeyboardInterrupt):
        finish_run(tracker, cfg, out, METRICS)
    tracker.finish("KILLED")  # what the run's lifecycle does on a kill
    c = client(uri)
    assert c.get_run(tracker.run_id).info.status == "KILLED"
    # --resume: the same MLflow run, its end repeated
    resumed = make_tracker(cfg, out, is_main=True, fresh=False)
    resumed.start(run_name="r", params={"p": 1}, tags={"t": "x"})
    finish_run(resumed, cfg, out, METRICS)
    run = c.get_run(tracker.run_id)
    assert resumed.run_id == tracker.run_id and run.info.status == "FINISHED"
    final = final_metrics_to_flat(METRICS)
    for key, value in final.items():
        assert [m.value for m in c.get_metric_history(run.info.run_id, key)] == [value], key
    assert Spool(out).undelivered() == 0


def test_final_metrics_delivered_but_not_counted_are_not_repeated_on_replay(tmp_path):
    uri = f"sqlite:///{tmp_path}/store.db"
    cfg = load_config(TINY, ["track.log_checkpoint=false"])
    tracker, out = tracked_run(tmp_path, uri)
    finish_run(tracker, cfg, out, METRICS)
    spool = Spool(out)
    final = next(
        i for i, e in enumerate(spool.events()) if "test/existing/all/HR_10" in e.get("values", {})
    )
    # killed after MLflow took the final metrics, before the spool counted them
    spool.save_state({**spool.state(), "delivered": final})
    assert sync(out)[0] == len(spool.events()) - final
    c = client(uri)
    for key, value in final_metrics_to_flat(METRICS).items():
        assert [m.value for m in c.get_metric_history(tracker.run_id, key)] == [value], key
    # a final figure that did change (a resume that trained on) is logged: the new one shows
    again = make_tracker(cfg, out, is_main=True, fresh=False)
    again.started = True
    again.log_final({"test/existing/all/HR_10": 0.625, "test/existing/all/NDCG_10": 0.25})
    run = c.get_run(tracker.run_id)
    assert run.data.metrics["test/existing/all/HR_10"] == 0.625
    assert len(c.get_metric_history(tracker.run_id, "test/existing/all/HR_10")) == 2
    assert len(c.get_metric_history(tracker.run_id, "test/existing/all/NDCG_10")) == 1


def test_an_artifact_the_store_refuses_is_skipped_and_the_run_finishes(tmp_path, caplog):
    uri = f"sqlite:///{tmp_path}/store.db"
    blocker = tmp_path / "blocker"  # a file where the artifact store wants a folder
    blocker.write_text("")
    client(uri).create_experiment("refused", artifact_location=str(blocker / "artifacts"))
    tracker, out = tracked_run(tmp_path, uri, "refused")
    tracker.log_metrics({"train/loss": 1.0}, step=0)
    tracker.log_artifact(out / "config.yaml")
    tracker.log_artifact(out / "vanished.txt")  # gone before it could be sent
    tracker.log_metrics({"train/loss": 0.5}, step=1)
    tracker.finish()
    run = client(uri).get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert [m.value for m in client(uri).get_metric_history(tracker.run_id, "train/loss")] == [
        1.0,
        0.5,
    ]
    assert "config.yaml was not uploaded" in caplog.text
    assert "vanished.txt was not uploaded" in caplog.text
    state = Spool(out).state()
    assert state["delivered"] == len(Spool(out).events())  # not stuck on the artifact
    assert state["skipped"] == ["config.yaml", "vanished.txt"]
    assert tracker.online  # the tracker did not take the refusal for an outage
    assert sync(out)[0] == 0
