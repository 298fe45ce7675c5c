"""Gradient alignment between users in trained runs: do TP's users' gradients agree more?

    .venv/bin/python benchmarks/alignment.py RUN [RUN ...] [--users 300] [--seed 0]

The paper's argument for TP: its first-order outer update rewards the alignment of the
gradients of different users (tasks), so the parameters it finds should sit where users'
gradients agree. This measures that on trained models. For each run (its best checkpoint,
in eval mode) it samples ``--users`` existing users (seeded: the same users for every run on
the same data), takes each user's gradient of the mean ``ce`` loss over all of the user's
training windows, and prints the users' training loss (mean per user, as TP's uniform user
sampling weighs it; per window, as joint training does; head and tail), the mean pairwise
cosine similarity of the gradients over all pairs of users, head-head, tail-tail and
head-tail pairs, and the mean gradient norm of head and tail users. ``encoder`` leaves the
item table out; ``all`` includes it. Runs at different losses are not directly comparable:
near a minimum of the training loss, the users' gradients cancel on average.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from dist_tp.algorithms.joint import rows_loss
from dist_tp.data.examples import training_rows
from dist_tp.data.stream import load_sequences
from dist_tp.models.saved import load_run

TABLES = ("item_emb.weight", "out_emb.weight", "out_bias")


def user_gradients(
    model, seqs, users: np.ndarray, max_len: int
) -> tuple[dict[str, torch.Tensor], np.ndarray, np.ndarray]:
    """``({"encoder": [U, P_enc], "all": [U, P]}, losses [U], windows [U])``: each user's
    flattened gradient of its mean training loss, that loss and its number of windows."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    rows_enc, rows_all, losses, counts = [], [], [], []
    for u in users:
        mask = np.zeros(len(seqs), dtype=bool)
        mask[u] = True
        rows = training_rows(
            seqs.select(mask), max_len=max_len, all_positions=model.supports_all_positions
        )
        model.zero_grad(set_to_none=True)
        loss = rows_loss(
            model,
            torch.from_numpy(rows.inputs),
            torch.from_numpy(rows.targets),
            kind="ce",
            num_negatives=1,
            generator=None,
        )
        loss.backward()
        losses.append(float(loss.detach()))
        counts.append(int(rows.windows.sum()))
        params = dict(model.named_parameters())
        grads = {
            n: (params[n].grad if params[n].grad is not None else torch.zeros_like(params[n]))
            for n in names
        }
        rows_enc.append(torch.cat([grads[n].reshape(-1) for n in names if n not in TABLES]))
        rows_all.append(torch.cat([grads[n].reshape(-1) for n in names]))
    grads = {"encoder": torch.stack(rows_enc), "all": torch.stack(rows_all)}
    return grads, np.array(losses), np.array(counts)


def alignment(grads: torch.Tensor, is_head: np.ndarray) -> dict[str, float]:
    """Mean pairwise cosine (distinct pairs) by group, and mean norms."""
    norms = grads.norm(dim=1)
    unit = grads / norms.clamp(min=1e-12).unsqueeze(1)
    cos = (unit @ unit.t()).numpy()
    head = is_head.astype(bool)
    off = ~np.eye(len(head), dtype=bool)

    def mean(a: np.ndarray, b: np.ndarray) -> float:
        block = cos[np.ix_(a, b)]
        keep = off[np.ix_(a, b)]
        return float(block[keep].mean()) if keep.any() else float("nan")

    return {
        "all": mean(np.ones_like(head), np.ones_like(head)),
        "head-head": mean(head, head),
        "tail-tail": mean(~head, ~head),
        "head-tail": mean(head, ~head),
        "norm head": float(norms[torch.from_numpy(head)].mean()),
        "norm tail": float(norms[torch.from_numpy(~head)].mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (or checkpoint files)")
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    columns = ["all", "head-head", "tail-tail", "head-tail", "norm head", "norm tail"]
    print(f"mean pairwise cosine of per-user ce gradients, {args.users} users, seed {args.seed}")
    losses = ["loss per user", "loss per window", "head loss", "tail loss"]
    print("| run | method | " + " | ".join(losses) + " | params | " + " | ".join(columns) + " |")
    print("| --- " * (3 + len(losses) + len(columns)) + "|")
    for run in args.runs:
        saved = load_run(run)
        model, cfg = saved.model, saved.cfg
        seqs = load_sequences(cfg.data.path, roles=["existing"])
        trainable = np.flatnonzero(seqs.lengths >= 4)  # at least one training window
        rng = np.random.default_rng(args.seed)
        users = np.sort(rng.choice(trainable, size=min(args.users, len(trainable)), replace=False))
        grads, loss, count = user_gradients(model, seqs, users, cfg.model.max_len)
        head = seqs.is_head[users].astype(bool)
        fits = [
            loss.mean(),
            (loss * count).sum() / count.sum(),
            loss[head].mean(),
            loss[~head].mean(),
        ]
        fit = " | ".join(f"{x:.3f}" for x in fits)
        for part, g in grads.items():
            figures = alignment(g, head)
            cells = " | ".join(f"{figures[c]:.4f}" for c in columns)
            name = Path(run).as_posix()
            print(f"| {name} | {cfg.train.method} | {fit} | {part} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
