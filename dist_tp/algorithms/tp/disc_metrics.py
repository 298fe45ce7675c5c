"""How well the discriminator tells head users from tail users: during training (the inner
steps' logits) and at the end (the existing users' test inputs)."""

from __future__ import annotations

import numpy as np
import torch

from dist_tp.algorithms.tp.discriminator import auc
from dist_tp.core.device import module_device, to_device
from dist_tp.data.examples import eval_queries
from dist_tp.data.stream import PreparedData, UserStream, to_sequences
from dist_tp.parallel.comm import LocalComm

DISC_BATCH = 1024  # users encoded at once for the discriminator's final figures
DISC_KEYS = ("disc_acc", "disc_auc", "disc_majority")  # what ``disc_figures`` returns


def disc_figures(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Accuracy, AUC and the majority share (accuracy of always guessing the majority)."""
    if len(labels) == 0:
        return {"disc_acc": float("nan"), "disc_auc": float("nan"), "disc_majority": float("nan")}
    head = float(labels.mean())
    return {
        "disc_acc": float(((logits > 0).float() == labels).float().mean()),
        "disc_auc": auc(logits, labels),
        "disc_majority": max(head, 1 - head),
    }


def discriminator_metrics(
    model, disc, data: PreparedData | str, *, max_len: int, comm=None
) -> dict:
    """The discriminator on the existing users' test inputs: accuracy, AUC, majority share.

    Users are streamed (each rank its own row groups, ``DISC_BATCH`` at a time); the ranks'
    logits meet on rank 0, which computes the figures and sends them to every rank."""
    comm = comm or LocalComm()
    stream = UserStream(
        data,
        rank=comm.rank,
        world_size=comm.world_size,
        shuffle=False,
        roles=["existing"],
        batch_rows=DISC_BATCH,
        columns=["user", "role", "is_head", "items"],
    )
    device = module_device(model)
    model.eval()
    logits, labels = [torch.zeros(0)], [torch.zeros(0)]
    with torch.no_grad():
        for batch in stream:
            q = eval_queries(to_sequences(batch), max_len=max_len, offset=1)
            logits.append(disc(model.encode(to_device(q.inputs, device))).float().cpu())
            labels.append(torch.from_numpy(q.is_head.astype(np.float32)))
    mine = (torch.cat(logits), torch.cat(labels))
    if comm.world_size == 1:
        return disc_figures(*mine)
    gathered = comm.gather_object(mine)
    figures = torch.zeros(3, dtype=torch.float64)
    if comm.is_main:
        result = disc_figures(*(torch.cat(parts) for parts in zip(*gathered, strict=True)))
        figures = torch.tensor([result[key] for key in DISC_KEYS], dtype=torch.float64)
    comm.broadcast_(figures, src=0)
    return dict(zip(DISC_KEYS, figures.tolist(), strict=True))
