"""Multi-process TP on CPU with gloo: 2 ranks started by torchrun on loopback."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ENV, REPO, ROW_WISE, TP_VARIANT, tiny_tp_args, torchrun, torchrun_cmd

from dist_tp.algorithms.tp.sampler import TaskSampler
from dist_tp.algorithms.tp.trainer import TPStepper
from dist_tp.config import load_config
from dist_tp.data.stream import open_prepared
from dist_tp.models import build_model


def test_partition_is_disjoint_complete_and_balanced(prepared):
    from dist_tp.data.stream import load_sequences

    sampler = TaskSampler(load_sequences(prepared("ml-100k"), roles=["existing"]), max_len=10)
    for world in (1, 2, 3):
        parts = sampler.partition(world)
        flat = np.concatenate(parts)
        assert sorted(flat.tolist()) == list(range(len(sampler)))
        loads = [sampler.n_windows[p].sum() for p in parts]
        assert max(loads) - min(loads) <= sampler.n_windows.max()


def test_balanced_parts_is_the_greedy_split_with_lowest_part_ties():
    """Largest user first, each to the currently lightest part, ties to the lowest part and,
    among equal users, the lower row first: checked against a plain argmin loop on data
    with many ties."""
    from dist_tp.algorithms.tp.sampler import balanced_parts

    rng = np.random.default_rng(0)
    for world in (1, 2, 3, 8):
        n_windows = rng.integers(1, 6, size=500)
        loads, owner = np.zeros(world, dtype=np.int64), np.empty(500, dtype=np.int64)
        for u in np.lexsort((np.arange(500), -n_windows)):
            owner[u] = np.argmin(loads)
            loads[owner[u]] += n_windows[u]
        parts = balanced_parts(n_windows, world)
        for r in range(world):
            np.testing.assert_array_equal(parts[r], np.flatnonzero(owner == r))


def test_each_rank_loads_only_its_own_part(prepared):
    """``load_part`` reads all users' lengths, then only this rank's users: the sampler it
    returns is exactly the whole sampler's ``subset(partition(W)[rank])``, and the ranks'
    items add up to the whole."""
    from dist_tp.algorithms.tp.sampler import load_part
    from dist_tp.data.stream import load_sequences

    path = prepared("ml-100k")
    whole = TaskSampler(load_sequences(path, roles=["existing"]), max_len=10)
    for world in (1, 2, 3):
        parts = whole.partition(world)
        held = 0
        for rank in range(world):
            part, loads = load_part(path, max_len=10, rank=rank, world_size=world)
            expected = whole.subset(parts[rank])
            assert loads == [int(whole.n_windows[p].sum()) for p in parts]
            for name in ("user", "is_head", "offsets", "items"):
                np.testing.assert_array_equal(
                    getattr(part.seqs, name), getattr(expected.seqs, name), err_msg=name
                )
            np.testing.assert_array_equal(part.n_windows, expected.n_windows)
            held += len(part.seqs.items)
        assert held == len(whole.seqs.items)


@pytest.mark.parametrize(
    "extra", [(), ROW_WISE, TP_VARIANT], ids=["dense", "row-wise", "tp-variant"]
)
def test_two_ranks_times_two_lanes_equal_one_process_with_four_lanes(prepared, tmp_path, extra):
    path = prepared("ml-100k")
    out = tmp_path / "dist.pt"
    torchrun(2, "tests/scripts/tp_steps.py", path, str(out), "2", "3", *extra)
    dist = torch.load(out, weights_only=True)
    # replicas identical: the sum over ranks is twice rank 0's parameters
    flat = torch.cat([p.reshape(-1) for p in dist["params"].values()])
    torch.testing.assert_close(dist["sum_over_ranks"], 2 * flat, rtol=0, atol=1e-6)

    cfg = load_config(
        "configs/tiny.yaml",
        [
            f"data.path={path}",
            "model.dropout=0.0",
            "train.loss=bce",
            "train.method=tp",
            "tp.lanes=4",
            "tp.inner_batch=8",
            *extra,
        ],
    )
    torch.manual_seed(0)  # rank 0's initialisation
    model = build_model(cfg.model, open_prepared(path).num_items)
    stepper = TPStepper(model, cfg)
    assert bool(stepper.inner.row_tables) == (extra == ROW_WISE)
    parts = stepper.sampler.partition(2)
    stepper.lane_users = [parts[0], parts[0], parts[1], parts[1]]  # lane l on rank l // 2
    for step in range(3):
        stepper.outer_step(0, step)
    single = {n: p.detach() for n, p in model.named_parameters()}
    single.update({f"disc.{n}": p.detach() for n, p in stepper.disc.named_parameters()})
    assert single.keys() == dist["params"].keys()
    for name, value in single.items():
        got = dist["params"][name]
        if name.endswith("qkv.bias"):  # [query; key; value] biases
            # the key bias's gradient is zero in theory (softmax ignores a shift common to a
            # query's scores), so it is rounding noise, which Adam scales up to a fraction of
            # its lr (more so with tp.normalize): there the ranks and one process agree to 1e-4
            d = len(value) // 3
            torch.testing.assert_close(got[d : 2 * d], value[d : 2 * d], rtol=0, atol=1e-4)
            got, value = torch.cat([got[:d], got[2 * d :]]), torch.cat([value[:d], value[2 * d :]])
        torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-5)


def test_cli_under_torchrun_trains_and_evaluates_like_one_process(prepared, tmp_path):
    path = prepared("ml-100k")
    out = tmp_path / "run"
    res = torchrun(
        2,
        *tiny_tp_args(path, "train.epochs=1", f"track.uri=sqlite:///{tmp_path}/mlflow.db"),
        "--output",
        str(out),
    )
    # the workers leave without interpreter finalization: rank 0's last lines still arrive
    assert f"run folder: {out}" in res.stdout and "| existing | all | 754 |" in res.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["existing"]["all"]["users"] == 754 and metrics["new"]["all"]["users"] == 189
    # the epoch's windows are both ranks': an epoch holds about a joint epoch's windows
    (record,) = json.loads((out / "history.json").read_text())
    _, lengths = open_prepared(path).lengths(["existing"])
    windows = int(np.maximum(lengths - 3, 0).sum())
    tp = load_config("configs/tiny.yaml", ["tp.lanes=2"]).tp
    per_step = 2 * tp.lanes * tp.k * tp.users_per_step * tp.inner_batch  # both ranks'
    assert windows <= record["windows"] < windows + per_step
    # rank 0 alone tracks: one MLflow run, tagged with the world size
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("dist-tp").experiment_id])
    assert run.data.tags["world_size"] == "2" and run.info.status == "FINISHED"
    from dist_tp.run.saved import evaluate_run

    single, _ = evaluate_run(out)
    for role in ("existing", "new"):
        for group in ("all", "head", "tail"):
            for key, value in single[role][group].items():
                assert metrics[role][group][key] == pytest.approx(value, abs=1e-12)
    # the discriminator's figures: each rank encodes its own users, rank 0 pools the logits
    assert metrics["discriminator"].keys() == single["discriminator"].keys()
    for key, value in single["discriminator"].items():
        assert metrics["discriminator"][key] == pytest.approx(value, abs=1e-6), key


def _last_state(path: Path) -> dict | None:
    try:
        return torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError):
        return None


@pytest.mark.parametrize(
    ("method", "loss", "every", "kill_at", "epoch_steps"),
    [("tp", "ce", 50, 100, 130), ("joint", "bce", 10, 40, 70)],  # joint: ~150 DDP steps a pass
)
def test_kill_one_rank_then_torchrun_restarts_and_resumes_exactly(
    prepared, tmp_path, method, loss, every, kill_at, epoch_steps
):
    """SIGKILL one rank after a mid-epoch checkpoint; torchrun restarts both, they resume
    from ``last.pt`` and end as an uninterrupted run (TP: outer steps; joint: DDP steps,
    each rank reading on from its own stream position, past its first pools of users)."""
    import signal
    import time

    path = prepared("ml-100k", **({"row_group_size": 16} if method == "joint" else {}))
    args = [
        "-m",
        "dist_tp",
        "train",
        "configs/tiny.yaml",
        f"data.path={path}",
        f"train.method={method}",
        "train.epochs=2",
        "train.patience=9",
        f"train.loss={loss}",
        f"train.checkpoint_every={every}",
        f"train.epoch_steps={epoch_steps}",
        "tp.lanes=2",
    ]
    torchrun(2, *args, "--output", str(tmp_path / "plain"))

    out = tmp_path / "killed"
    cmd = torchrun_cmd(*args, "--output", str(out), launcher=("--max-restarts=1",))
    agent = subprocess.Popen(
        cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.time() + 240
        killed = False
        while time.time() < deadline and not killed:
            state = _last_state(out / "last.pt")
            if state is not None and not state["epoch_done"] and state["next_step"] >= kill_at:
                if method == "joint":
                    positions = state["stepper"]["positions"]  # [unit, row, pool, done] a rank
                    assert len(positions) == 2 and all(p[2] > 0 for p in positions), positions
                workers = subprocess.run(
                    ["pgrep", "-P", str(agent.pid)], capture_output=True, text=True
                ).stdout.split()
                assert len(workers) == 2, workers
                os.kill(int(workers[-1]), signal.SIGKILL)
                killed = True
            time.sleep(0.05)
        assert killed, f"the run never reached step {kill_at}"
        log, _ = agent.communicate(timeout=300)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode == 0, log.decode()[-3000:]
    assert b"resumed from" in log
    plain = torch.load(tmp_path / "plain" / "last.pt", weights_only=True)
    resumed = torch.load(out / "last.pt", weights_only=True)
    for part in ("model", "disc") if method == "tp" else ("model",):
        for name, value in plain[part].items():
            torch.testing.assert_close(resumed[part][name], value, rtol=0, atol=1e-6)
    a = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    assert a["existing"] == b["existing"] and a["new"] == b["new"]


def test_two_torchrun_nodes_on_loopback(prepared, tmp_path):
    """Two torchrun agents ("nodes", one process each) meet through c10d rendezvous."""
    out = tmp_path / "run"
    launcher = ("--nnodes=2", "--rdzv-id=loopback")
    cmd = torchrun_cmd(
        *tiny_tp_args(prepared("ml-100k"), "train.epochs=1", "train.epoch_steps=20"),
        "--output",
        str(out),
        nproc=1,
        launcher=launcher,
    )
    nodes = [
        subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]
    logs = [node.communicate(timeout=300)[0].decode() for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert "rank 0 of 2" in "".join(logs)
    assert json.loads((out / "metrics.json").read_text())["existing"]["all"]["users"] == 754


def test_fp16_pseudo_gradients_and_the_replica_check(prepared, tmp_path):
    path = prepared("ml-100k")
    checks = ["tp.check_replicas_every=1"]
    torchrun(2, "tests/scripts/tp_steps.py", path, str(tmp_path / "f32.pt"), "2", "2", *checks)
    torchrun(
        2,
        "tests/scripts/tp_steps.py",
        path,
        str(tmp_path / "f16.pt"),
        "2",
        "2",
        "tp.compress=fp16",
        *checks,
    )
    f32 = torch.load(tmp_path / "f32.pt", weights_only=True)["params"]
    f16 = torch.load(tmp_path / "f16.pt", weights_only=True)["params"]
    for name, value in f32.items():  # Adam steps of 1e-3 from slightly rounded gradients
        torch.testing.assert_close(f16[name], value, rtol=0, atol=5e-3)
    assert any(not torch.equal(f16[n], v) for n, v in f32.items())  # fp16 was on the wire
    # a replica nudged on one rank is caught at the next check
    cmd = torchrun_cmd(
        "tests/scripts/tp_steps.py", path, str(tmp_path / "x.pt"), "2", "3", "perturb=1", *checks
    )
    res = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "replicas drifted at outer step 1" in res.stdout + res.stderr
