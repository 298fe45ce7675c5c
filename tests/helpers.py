"""What several test files share: where the data and the repository are, torchrun on
loopback, a real MLflow server, and the small TP set-ups. Test files import from here, never
from each other."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_tp.algorithms.tp.discriminator import Discriminator
from dist_tp.algorithms.tp.sampler import TaskSampler
from dist_tp.config import load_config
from dist_tp.data.stream import UserSequences
from dist_tp.models import build_model

REPO = Path(__file__).resolve().parents[1]

TINY = REPO / "configs" / "tiny.yaml"
SHARED_DATA = Path(os.environ.get("DIST_TP_SHARED_DATA", REPO.parent / "shared" / "data"))

REAL = {
    "ml-100k": ("ml-100k/u.data.gz", "ml-100k"),
    "amazon-music": ("amazon-music/Music.txt.gz", "seq-txt"),
    "amazon-games": ("amazon-games/Video.txt.gz", "seq-txt"),
    "ml-1m-part": ("ml-1m/partial/ratings.dat.gz", "ml-1m"),
}


def real_file(name: str) -> tuple[str, str]:
    """(path, format) of a shared dataset; skips (with the reason) when it is not there."""
    rel, fmt = REAL[name]
    path = SHARED_DATA / rel
    if not path.is_file():
        pytest.skip(f"shared dataset {path} not present")
    return str(path), fmt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(*args: str, nproc: int = 2, launcher: tuple[str, ...] = ()) -> list[str]:
    """A torchrun command line on loopback with a fresh rendezvous port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        *launcher,
        *args,
    ]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def tiny_tp_args(data: str, *extra: str) -> list[str]:
    """``-m dist_tp train`` on configs/tiny.yaml with TP and 2 lanes, plus ``extra``."""
    return [
        "-m",
        "dist_tp",
        "train",
        "configs/tiny.yaml",
        f"data.path={data}",
        "train.method=tp",
        "tp.lanes=2",
        *extra,
    ]


def torchrun(nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = torchrun_cmd(*args, nproc=nproc)
    res = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


# --- a real MLflow server -------------------------------------------------------------


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


class Server:
    """``mlflow server`` on 127.0.0.1 in its own process group."""

    def __init__(self, store: Path, port: int) -> None:
        self.store, self.port = store, port
        self.uri = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> Server:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.store}/mlflow.db",
               "--artifacts-destination", str(self.store / "artifacts")]  # fmt: skip
        log = open(self.store / f"server-{time.time():.0f}.log", "w")
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.store / "server.log"
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"mlflow server on port {self.port} did not answer")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


ROW_WISE = (  # sampled softmax with shared popularity negatives and row-wise item updates
    "train.loss=sampled_softmax",
    "train.negatives=popularity",
    "train.num_negatives=8",
    "train.shared_negatives=true",
    "train.item_updates=sparse",
)

# sasrec-tp.yaml's TP: Reptile on user tasks, users drawn by n_u^0.5 (gru4rec-tp.yaml's
# distinct_windows and normalize are a part of it)
TP_VARIANT = (
    "tp.same_user=true",
    "tp.distinct_windows=true",
    "tp.normalize=true",
    "tp.user_sampling=power",
)

# --- small TP set-ups --------------------------------------------------------------------

NUM_ITEMS = 30


def tp_config(backbone: str = "sasrec", loss: str = "bce", **tp):
    """A tiny TP config; ``loss`` may be ``sampled_softmax-<negatives>``."""
    loss, _, negatives = loss.partition("-")
    overrides = [
        f"model.name={backbone}",
        "model.dim=8",
        "model.max_len=6",
        "model.dropout=0.0",
        "model.num_heads=2",
        "model.caser_nh=2",
        "model.caser_nv=2",
        f"train.loss={loss}",
        f"train.negatives={negatives or 'uniform'}",
        "train.num_negatives=3",
        "tp.inner_lr=0.5",
        "tp.lambda_adv=0.7",
        "tp.inner_batch=5",
        "tp.k=3",
        "tp.disc_hidden=[6]",
        *(f"tp.{k}={v}" for k, v in tp.items()),
    ]
    return load_config(None, overrides)


def tp_sampler(seed: int = 0) -> TaskSampler:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 15, 12)
    items = np.concatenate(
        [rng.choice(np.arange(1, NUM_ITEMS + 1), n, replace=False) for n in lengths]
    )
    seqs = UserSequences(
        user=np.arange(1, 13, dtype=np.int32),
        is_new=np.zeros(12, bool),
        is_head=np.arange(12) < 3,
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        items=items.astype(np.int32),
    )
    return TaskSampler(seqs, max_len=6)


def tp_setup(cfg, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(cfg.model, NUM_ITEMS)
    disc = Discriminator(cfg.model.dim, cfg.tp.disc_hidden)
    return model, disc


def uneven_batch(cfg, seed: int = 3):
    """Lanes pinned to the shortest and the longest users: 1 row of few columns beside
    several rows of L columns in the same inner step."""
    sampler = tp_sampler()
    order = np.argsort(sampler.n_windows, kind="stable")
    pools = [order[:1], order[-1:], order[:2], order[-2:], order[3:8], order[:1]]
    return sampler.sample(
        [np.random.default_rng([seed, m]) for m in range(len(pools))],
        k=cfg.tp.k,
        users_per_step=cfg.tp.users_per_step,
        inner_batch=cfg.tp.inner_batch,
        num_negatives=cfg.train.num_negatives if cfg.train.loss == "bce" else 0,
        num_items=NUM_ITEMS,
        all_positions=True,
        lane_users=pools,
    )


def tp_batch(cfg, lanes: int, seed: int = 1, negative_cdf=None):
    all_positions = cfg.model.name != "caser"
    train = cfg.train
    sampled = train.loss == "bce" or (
        train.loss == "sampled_softmax" and train.negatives != "in_batch"
    )
    return tp_sampler().sample(
        [np.random.default_rng([seed, m]) for m in range(lanes)],
        all_positions=all_positions,
        k=cfg.tp.k,
        users_per_step=cfg.tp.users_per_step,
        inner_batch=cfg.tp.inner_batch,
        num_negatives=train.num_negatives if sampled else 0,
        num_items=NUM_ITEMS,
        negative_cdf=negative_cdf if train.negatives == "popularity" else None,
    )


class Crash(Exception):
    """Raised by :func:`crash_after_checkpoint`: the run dies right after a save."""


def crash_after_checkpoint(
    monkeypatch, run, out: Path, next_step: int | None = None, *, epoch: int | None = None
) -> None:
    """Call ``run(out)`` with the run dying right after a ``last.pt`` is written (the file is
    whole, as after a kill): the mid-epoch one of step ``next_step``, or, given ``epoch``, the
    one at the end of that epoch. Saving is restored after."""
    import dist_tp.run.checkpoints as checkpoints

    assert (next_step is None) != (epoch is None), "give next_step or epoch"
    save = checkpoints.save_checkpoint

    def dies_after(state) -> bool:
        if epoch is not None:
            return state["epoch_done"] and state["epoch"] == epoch
        return not state["epoch_done"] and state["next_step"] == next_step

    def save_then_crash(path, state):
        save(path, state)
        if Path(path).name == "last.pt" and dies_after(state):
            raise Crash

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_crash)
    try:
        with pytest.raises(Crash):
            run(out)
    finally:
        monkeypatch.setattr(checkpoints, "save_checkpoint", save)


def write_event_log(
    folder: Path,
    *,
    events: int,
    users: int,
    items: int,
    files: int = 3,
    seed: int = 0,
    text_ids: bool = False,
    timestamps: bool = True,
) -> list[Path]:
    """A long-tailed event log as ``files`` Parquet files: Zipf items, heavy-tailed users,
    repeated (user, item) pairs and timestamp ties, rows interleaved across users (as logs
    are). Columns ``u``, ``i``, ``t`` (without ``t`` when ``timestamps`` is False)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    user_weight = rng.pareto(1.2, users) + 0.05
    user = rng.choice(users, size=events, p=user_weight / user_weight.sum())
    rank = np.arange(1, items + 1)
    item = rng.choice(items, size=events, p=rank**-1.1 / (rank**-1.1).sum())
    ts = rng.integers(0, events // 4 + 1, size=events)  # coarse: many ties
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, part in enumerate(np.array_split(np.arange(events), files)):
        columns = {
            "u": pa.array([f"user{u}" for u in user[part]]) if text_ids else user[part] * 7 + 3,
            "i": pa.array([f"it{i:x}" for i in item[part]]) if text_ids else item[part] * 5,
        }
        if timestamps:
            columns["t"] = ts[part]
        path = folder / f"events-{k:03d}.parquet"
        pq.write_table(pa.table(columns), path, row_group_size=max(1, len(part) // 3))
        paths.append(path)
    return paths


def assert_same_prepared(a: Path, b: Path) -> None:
    """Two prepared folders hold the same dataset: items, every shard's rows in order, the
    row groups, and meta.json's statistics, options and shard list."""
    import json

    import pyarrow.parquet as pq

    assert pq.read_table(a / "items.parquet").equals(pq.read_table(b / "items.parquet"))
    names = sorted(p.name for p in (a / "users").iterdir())
    assert names == sorted(p.name for p in (b / "users").iterdir())
    for name in names:
        fa, fb = pq.ParquetFile(a / "users" / name), pq.ParquetFile(b / "users" / name)
        assert fa.read().equals(fb.read()), name
        groups = [
            [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)] for f in (fa, fb)
        ]
        assert groups[0] == groups[1], name
    ma, mb = (json.loads((p / "meta.json").read_text()) for p in (a, b))
    for key in ("stats", "options", "shards"):
        assert ma[key] == mb[key], key
