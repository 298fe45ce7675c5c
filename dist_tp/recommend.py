"""Top-n recommendations for any item sequence, in the dataset's original item ids.

    from dist_tp.recommend import Predictor
    predictor = Predictor.from_run("runs/ml-100k-sasrec")
    predictor.recommend([50, 172, 133], n=10)   # original MovieLens ids, oldest first

The sequence need not belong to a known user: new users are the point. Items the model has
never seen (filtered out by the protocol, or unknown) are left out of the input.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from dist_tp.data.stream import open_prepared
from dist_tp.device import module_device, to_device

log = logging.getLogger(__name__)


class Predictor:
    """A trained model plus the item id map of its prepared data."""

    def __init__(self, model, *, item_ids: Sequence, max_len: int) -> None:
        self.model = model.eval()
        self.max_len = max_len
        self.original = list(item_ids)  # index i-1 → original id of item i
        self.index = {orig: i + 1 for i, orig in enumerate(self.original)}
        # ids read from a text file come back as strings; accept those for integer ids too
        self.index.update({str(orig): i + 1 for i, orig in enumerate(self.original)})

    @classmethod
    def from_run(cls, run: str | Path) -> Predictor:
        from dist_tp.train import load_run

        model, cfg = load_run(run)
        prepared = open_prepared(cfg.data.path)
        with prepared.fs.open(f"{prepared.root}/items.parquet", "rb") as f:
            item_ids = pq.read_table(f, columns=["original_id"]).column(0).to_pylist()
        return cls(model, item_ids=item_ids, max_len=cfg.model.max_len)

    @torch.no_grad()
    def recommend(
        self, item_sequence: Sequence, n: int = 10, *, exclude_history: bool = True
    ) -> list:
        """The top-``n`` original item ids after ``item_sequence`` (oldest first)."""
        known = [self.index[x] for x in item_sequence if x in self.index]
        if len(known) < len(item_sequence):
            log.warning("%d unknown items ignored", len(item_sequence) - len(known))
        window = np.zeros(self.max_len, dtype=np.int64)
        tail = known[-self.max_len :]
        if tail:
            window[-len(tail) :] = tail
        seq = to_device(window[None], module_device(self.model))  # [1, L]
        scores = self.model.score_all(self.model.encode(seq))[0].cpu()  # [N+1]
        scores[0] = float("-inf")
        if exclude_history and known:
            scores[torch.tensor(known)] = float("-inf")
        top = torch.topk(scores, min(n, len(self.original))).indices.tolist()
        return [self.original[i - 1] for i in top if scores[i] > float("-inf")]
