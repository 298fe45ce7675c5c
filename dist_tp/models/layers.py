"""Small pieces the encoders share: the item-table reference and a vmap-friendly dropout."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn


def share_table(encoder: nn.Module, item_emb: nn.Embedding) -> None:
    """Give ``encoder`` a reference to ``item_emb`` without registering it as a submodule.

    The table is registered once, on the Recommender. A second registration (a tied
    submodule) makes ``torch.func.functional_call`` leave a plain tensor behind in place of
    the parameter after the call, which the per-lane TP inner loop relies on not to happen.
    """
    object.__setattr__(encoder, "item_emb", item_emb)


class Dropout(nn.Module):
    """Inverted dropout as ``x * (rand >= p) / (1 - p)``, for the encoders.

    Same semantics as ``nn.Dropout``; built from ``rand_like`` because under
    ``torch.func.vmap(..., randomness="different")`` (the TP lanes) that op batches over lanes
    directly, while the fused dropout op there was measured ~1.4x slower end to end.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand_like(x) >= self.p
        return x * keep / (1.0 - self.p)


@contextlib.contextmanager
def unrolled_rnns(model: nn.Module):
    """Within the block, every module of ``model`` with an ``unrolled`` switch (GRU4Rec) runs
    its recurrence as plain tensor operations, which ``torch.func.vmap`` batches (``nn.GRU``
    has no batching rule: one call per lane)."""
    switched = [m for m in model.modules() if hasattr(type(m), "unrolled")]
    for m in switched:
        m.unrolled = True
    try:
        yield
    finally:
        for m in switched:
            del m.unrolled  # back to the class's default
