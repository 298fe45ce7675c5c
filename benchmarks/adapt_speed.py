"""Test-time adaptation's speed: windows read from shared encoder rows against one row each.

    .venv/bin/python benchmarks/adapt_speed.py [--data ml-100k amazon-music] \
        [--backbones sasrec gru4rec] [--users 400] [--threads 1] [--profile]

For ``configs/<data>/<backbone>.yaml`` (``eval.adapt_windows`` 32, one SGD step at lr 0.1,
``adapt_params=all``, the config's loss): every test query of the users in the first stream
batch of up to ``--users`` rows (existing and new; ML-100K's first batch holds 248), adapted
as ``dist-tp evaluate`` adapts them (the same chunks of users, then each user's own encoder
on its query), once with each window a row of its own and once with the windows shared among
rows (:func:`dist_tp.evaluation.adapt.encoder_rows`), in alternating repeats so both see the
same load (best of ``--repeats``; Caser reads whole windows only, so it has nothing to
compare). Prints seconds per pass, the ratio, the rows the encoder reads per user, the share
of users with 2+ windows that share no row (each window past their first L+1 items), and the
largest difference between the two modes' query embeddings (the same up to float rounding).
``--profile``: also the shared pass's chunks of users and its 8 costliest calls
(cProfile, by own time). The weights are the config's initial ones: the work does not
depend on them. Data is prepared from ../shared/data into a temp folder.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dist_tp.config import load_config
from dist_tp.data.examples import eval_queries
from dist_tp.data.prepare import prepare
from dist_tp.data.stream import PreparedData, UserStream, to_sequences
from dist_tp.evaluation.adapt import (
    Adaptation,
    adapt_users,
    adaptation_windows,
    row_mode,
    rows_needed,
    user_chunks,
)
from dist_tp.models.saved import build

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import DATASETS, REPO, SHARED  # noqa: E402


def test_users(path: str, users: int):
    """The first ``users`` users' sequences of the prepared data (both roles)."""
    stream = UserStream(
        PreparedData.of(path),
        shuffle=False,
        batch_rows=users,
        columns=["user", "role", "is_head", "items"],
    )
    return to_sequences(next(iter(stream)))


def adapt_pass(model, win, queries, adaptation, rows: str) -> tuple[float, torch.Tensor]:
    """Seconds to adapt every user and encode its query, and the query embeddings."""
    out = torch.zeros(len(queries), model.item_emb.weight.shape[1])
    started = time.perf_counter()
    for idx in user_chunks(model, win, adaptation, limit=512, rows=rows):
        users = adapt_users(model, win.take(idx), adaptation, query_inputs=queries[idx], rows=rows)
        with torch.no_grad():
            out[torch.from_numpy(idx)] = users.encode(torch.as_tensor(queries[idx]))
    return time.perf_counter() - started, out


def profiled(model, win, queries, adaptation, mode: str) -> str:
    """The shared pass under cProfile: its chunks' sizes and the 8 costliest calls."""
    profile = cProfile.Profile()
    profile.runcall(adapt_pass, model, win, queries, adaptation, mode)
    sizes = [len(c) for c in user_chunks(model, win, adaptation, limit=512, rows=mode)]
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(8)
    return f"chunks of users: {sizes}\n{text.getvalue()}"


def case(data: str, backbone: str, path: str, users: int, repeats: int, profile: bool) -> str:
    config = REPO / "configs" / data / f"{backbone}.yaml"
    cfg = load_config(config, [f"data.path={path}", "eval.adapt_steps=1", "eval.adapt_lr=0.1"])
    torch.manual_seed(0)
    model = build(cfg, PreparedData.of(path)).eval()
    seqs = test_users(path, users)
    max_len = cfg.model.max_len
    win = adaptation_windows(seqs, max_len=max_len, offset=1, windows=cfg.eval.adapt_windows)
    queries = eval_queries(seqs, max_len=max_len, offset=1).inputs
    keep = np.flatnonzero(win.counts > 0)
    win, queries = win.take(keep), queries[keep]
    adaptation = Adaptation.from_config(cfg)
    shared = row_mode(model)
    rows, _ = rows_needed(win, max_len, shared)
    alone_share = (rows[win.counts > 1] == win.counts[win.counts > 1]).mean()  # no row shared
    seconds = {"windows": [], shared: []}
    embeddings = {}
    for _ in range(repeats):
        for mode in seconds:
            took, embeddings[mode] = adapt_pass(model, win, queries, adaptation, mode)
            seconds[mode].append(took)
    alone, together = min(seconds["windows"]), min(seconds[shared])
    diff = float((embeddings[shared] - embeddings["windows"]).abs().max())
    line = (
        f"| {data} | {backbone} | {cfg.train.loss} | {len(win)} | {win.counts.mean():.1f} | "
        f"{rows.mean():.1f} | {alone_share:.0%} | {alone:.1f} | {together:.1f} | "
        f"{alone / together:.1f}x | {diff:.1e} |"
    )
    return line + ("\n" + profiled(model, win, queries, adaptation, shared) if profile else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", default=["ml-100k", "amazon-music"])
    parser.add_argument("--backbones", nargs="+", default=["sasrec", "gru4rec"])
    parser.add_argument("--users", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="also profile the shared pass")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        "| data | backbone | loss | users | windows / user | rows / user | no row shared "
        "| one row each (s) | shared rows (s) | speed-up | max diff |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for data in args.data:
            rel, fmt = DATASETS[data]
            path = f"{tmp}/{data}"
            prepare(input_path=str(SHARED / rel), fmt=fmt, output=path)
            for backbone in args.backbones:
                line = case(data, backbone, path, args.users, args.repeats, args.profile)
                print(line, flush=True)


if __name__ == "__main__":
    main()
