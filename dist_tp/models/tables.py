"""How an encoder reads the item table that its :class:`Recommender` owns."""

from __future__ import annotations

from torch import nn


def share_table(encoder: nn.Module, item_emb: nn.Embedding) -> None:
    """Give ``encoder`` a reference to ``item_emb`` without registering it as a submodule.

    The table is registered once, on the Recommender. A second registration (a tied
    submodule) makes ``torch.func.functional_call`` leave a plain tensor behind in place of
    the parameter after the call, which the per-lane TP inner loop relies on not to happen.
    """
    object.__setattr__(encoder, "item_emb", item_emb)
