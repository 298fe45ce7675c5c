"""Top-n recommendations for any item sequence, in the dataset's original item ids.

    from dist_tp.evaluation.recommend import Predictor
    predictor = Predictor.from_run("runs/ml-100k-sasrec")
    predictor.recommend([50, 172, 133], n=10)   # original MovieLens ids, oldest first
    predictor.recommend_result([])              # .items, .fallback (True: cold start)

The sequence need not belong to a known user: new users are the point. Items the model has
never seen (filtered out by the protocol, or unknown) are left out of the input. A sequence
with no known item at all (empty, or only unknown ids) gets the most popular training items
of the prepared data instead (the model's scores would only rank ties), flagged ``fallback``.

Test-time adaptation (:mod:`dist_tp.evaluation.adapt`): with ``adapt_steps`` > 0 (by default
the run's ``eval.adapt_steps``; ``recommend(..., adapt_steps=3)`` per call) each sequence's
own copy of the model first takes that many SGD steps on the sequence's windows (every
target s_2..s_n, the latest ``eval.adapt_windows``), then scores the next item.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from dist_tp.core.device import module_device, to_device
from dist_tp.evaluation.adapt import Adaptation, adapted_scores, sequence_windows
from dist_tp.models.saved import load_run

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recommendation:
    """The top-n of one sequence."""

    items: list
    """Original item ids, best first."""
    fallback: bool
    """True when the sequence had no known item: ``items`` are the most popular training
    items (cold start), not the model's."""
    unknown: int
    """How many ids of the sequence the model does not know (left out)."""


class Predictor:
    """A trained model plus the item id map of its prepared data."""

    def __init__(
        self,
        model,
        *,
        item_ids: Sequence,
        max_len: int,
        popularity: np.ndarray | None = None,
        data=None,
        adaptation: Adaptation | None = None,
    ) -> None:
        """``popularity``: [N+1] training counts of items 0..N, the cold-start fallback's
        order; by default read from ``data`` (a ``PreparedData``) when first needed. With
        neither, the fallback keeps the model's order for an empty sequence.
        ``adaptation``: test-time adaptation of each sequence (None: none; a model without
        item tables, such as popularity, is never adapted)."""
        self.model = model.eval()
        self.max_len = max_len
        self.adaptation = adaptation or Adaptation()
        self._popularity = popularity
        self._data = data
        self.original = list(item_ids)  # index i-1 → original id of item i
        self.index = {orig: i + 1 for i, orig in enumerate(self.original)}
        # ids read from a text file come back as strings; accept those for integer ids too
        self.index.update({str(orig): i + 1 for i, orig in enumerate(self.original)})

    @classmethod
    def from_run(cls, run: str | Path) -> Predictor:
        saved = load_run(run)
        data = saved.data
        with data.fs.open(f"{data.root}/items.parquet", "rb") as f:
            item_ids = pq.read_table(f, columns=["original_id"]).column(0).to_pylist()
        return cls(
            saved.model,
            item_ids=item_ids,
            max_len=saved.cfg.model.max_len,
            data=data,
            adaptation=Adaptation.from_config(saved.cfg),
        )

    def _adapting(self, adapt_steps: int | None) -> Adaptation | None:
        """The adaptation of a call (``adapt_steps`` None: the predictor's), or None."""
        adaptation = self.adaptation
        if adapt_steps is not None:
            adaptation = replace(adaptation, steps=adapt_steps)
        if adaptation.steps == 0 or not hasattr(self.model, "item_row_names"):
            return None
        if adaptation.needs_popularity and self.model.log_q is None:
            if self._data is None:
                raise ValueError(f"{adaptation.negatives} negatives need the prepared data")
            self.model.set_item_popularity(self._data.training_counts())
        return adaptation

    def popular(self) -> list[int] | None:
        """Item indices, most popular training item first (ties: lower index), or None when
        no popularity is known."""
        if self._popularity is None and self._data is not None:
            self._popularity = np.asarray(self._data.training_counts())
        if self._popularity is None:
            return None
        counts = np.asarray(self._popularity)[1 : len(self.original) + 1]
        return (np.argsort(-counts, kind="stable") + 1).tolist()

    def _window(self, item_sequence: Sequence) -> tuple[np.ndarray, list[int]]:
        """The model's input for a sequence (its last L known items, left-padded), and the
        known items."""
        known = [self.index[x] for x in item_sequence if x in self.index]
        window = np.zeros(self.max_len, dtype=np.int64)
        tail = known[-self.max_len :]
        if tail:
            window[-len(tail) :] = tail
        return window, known

    def recommend(
        self,
        item_sequence: Sequence,
        n: int = 10,
        *,
        exclude_history: bool = True,
        adapt_steps: int | None = None,
    ) -> list:
        """The top-``n`` original item ids after ``item_sequence`` (oldest first);
        ``adapt_steps``: test-time adaptation steps (None: the predictor's)."""
        return self.recommend_many(
            [item_sequence], n, exclude_history=exclude_history, adapt_steps=adapt_steps
        )[0]

    def recommend_many(
        self,
        sequences: Sequence[Sequence],
        n: int = 10,
        *,
        exclude_history: bool = True,
        batch_size: int = 512,
        adapt_steps: int | None = None,
    ) -> list[list]:
        """``recommend`` for many sequences, ``batch_size`` per forward pass."""
        results = self.recommend_results(
            sequences,
            n,
            exclude_history=exclude_history,
            batch_size=batch_size,
            adapt_steps=adapt_steps,
        )
        unknown = sum(r.unknown for r in results)
        if unknown:
            log.warning("%d unknown items ignored", unknown)
        fallback = sum(r.fallback for r in results)
        if fallback:
            log.warning(
                "%d sequence(s) with no known item: the most popular training items instead",
                fallback,
            )
        return [r.items for r in results]

    def recommend_result(
        self,
        item_sequence: Sequence,
        n: int = 10,
        *,
        exclude_history: bool = True,
        adapt_steps: int | None = None,
    ) -> Recommendation:
        """``recommend``, with whether it fell back on popularity (cold start)."""
        return self.recommend_results(
            [item_sequence], n, exclude_history=exclude_history, adapt_steps=adapt_steps
        )[0]

    @torch.no_grad()
    def recommend_results(
        self,
        sequences: Sequence[Sequence],
        n: int = 10,
        *,
        exclude_history: bool = True,
        batch_size: int = 512,
        adapt_steps: int | None = None,
    ) -> list[Recommendation]:
        """``recommend_result`` for many sequences, ``batch_size`` per forward pass."""
        out = []
        device = module_device(self.model)
        adaptation = self._adapting(adapt_steps)
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            windows, knowns = zip(*(self._window(s) for s in chunk))
            if adaptation is None:
                seq = to_device(np.stack(windows), device)  # [B, L]
                scores = self.model.score_all(self.model.encode(seq)).cpu()  # [B, N+1]
            else:
                win = sequence_windows(
                    list(knowns), max_len=self.max_len, windows=adaptation.windows
                )
                scores = adapted_scores(self.model, win, np.stack(windows), adaptation).cpu()
            scores[:, 0] = float("-inf")
            if exclude_history:
                for row, known in enumerate(knowns):
                    if known:
                        scores[row, torch.tensor(known)] = float("-inf")
            top = torch.topk(scores, min(n, len(self.original)), dim=1)
            for sequence, known, values, indices in zip(
                chunk, knowns, top.values.tolist(), top.indices.tolist()
            ):
                unknown = len(sequence) - len(known)
                popular = None if known else self.popular()
                if popular is not None:
                    indices, values = popular[:n], [0.0] * min(n, len(popular))
                items = [self.original[i - 1] for v, i in zip(values, indices) if v > float("-inf")]
                out.append(Recommendation(items, not known, unknown))
        return out
