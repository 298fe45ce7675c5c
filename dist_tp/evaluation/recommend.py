"""Top-n recommendations for any item sequence, in the dataset's original item ids.

    from dist_tp.evaluation.recommend import Predictor
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

from dist_tp.core.device import module_device, to_device
from dist_tp.data.stream import open_prepared

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
        from dist_tp.run.loop import load_run

        model, cfg = load_run(run)
        prepared = open_prepared(cfg.data.path)
        with prepared.fs.open(f"{prepared.root}/items.parquet", "rb") as f:
            item_ids = pq.read_table(f, columns=["original_id"]).column(0).to_pylist()
        return cls(model, item_ids=item_ids, max_len=cfg.model.max_len)

    def _window(self, item_sequence: Sequence) -> tuple[np.ndarray, list[int]]:
        """The model's input for a sequence (its last L known items, left-padded), and the
        known items."""
        known = [self.index[x] for x in item_sequence if x in self.index]
        if len(known) < len(item_sequence):
            log.warning("%d unknown items ignored", len(item_sequence) - len(known))
        window = np.zeros(self.max_len, dtype=np.int64)
        tail = known[-self.max_len :]
        if tail:
            window[-len(tail) :] = tail
        return window, known

    def recommend(
        self, item_sequence: Sequence, n: int = 10, *, exclude_history: bool = True
    ) -> list:
        """The top-``n`` original item ids after ``item_sequence`` (oldest first)."""
        return self.recommend_many([item_sequence], n, exclude_history=exclude_history)[0]

    @torch.no_grad()
    def recommend_many(
        self,
        sequences: Sequence[Sequence],
        n: int = 10,
        *,
        exclude_history: bool = True,
        batch_size: int = 512,
    ) -> list[list]:
        """``recommend`` for many sequences, ``batch_size`` per forward pass."""
        out = []
        device = module_device(self.model)
        for start in range(0, len(sequences), batch_size):
            windows, knowns = zip(*(self._window(s) for s in sequences[start : start + batch_size]))
            seq = to_device(np.stack(windows), device)  # [B, L]
            scores = self.model.score_all(self.model.encode(seq)).cpu()  # [B, N+1]
            scores[:, 0] = float("-inf")
            if exclude_history:
                for row, known in enumerate(knowns):
                    if known:
                        scores[row, torch.tensor(known)] = float("-inf")
            top = torch.topk(scores, min(n, len(self.original)), dim=1)
            for values, indices in zip(top.values.tolist(), top.indices.tolist()):
                out.append(
                    [self.original[i - 1] for v, i in zip(values, indices) if v > float("-inf")]
                )
        return out
