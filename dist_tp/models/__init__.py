"""Sequential recommender models: encoders φ, the shared scorer, and the factory.

``build_model(cfg, num_items)`` wraps the encoder named by ``cfg.name`` in a
:class:`Recommender`. Item ids are ``1..num_items``; 0 is padding, and every item table
has ``num_items + 1`` rows with row 0 the (zero) padding row. The ``pop`` baseline needs
training counts instead of a config, so it is built directly as ``Popularity(counts)``.
"""

from __future__ import annotations

from torch import nn

from dist_tp.config import ModelConfig
from dist_tp.models.caser import Caser
from dist_tp.models.gru4rec import GRU4Rec
from dist_tp.models.sasrec import SASRec
from dist_tp.models.scoring import Popularity, Recommender, sample_negatives

ENCODERS: dict[str, type[nn.Module]] = {
    "sasrec": SASRec,
    "gru4rec": GRU4Rec,
    "caser": Caser,
}


def build_model(cfg: ModelConfig, num_items: int) -> Recommender:
    """A freshly initialised :class:`Recommender` with the encoder ``cfg.name``."""
    if cfg.name == "pop":
        raise ValueError("model 'pop' is built from item counts: use Popularity(counts)")
    if cfg.name not in ENCODERS:
        known = ", ".join(sorted(ENCODERS))
        raise ValueError(f"unknown model {cfg.name!r} (known: {known}, pop)")
    return Recommender(cfg, num_items, ENCODERS[cfg.name])


__all__ = [
    "ENCODERS",
    "Caser",
    "GRU4Rec",
    "Popularity",
    "Recommender",
    "SASRec",
    "build_model",
    "sample_negatives",
]
